"""Render one C file holding every layer of an artifact (templates/ + string.Template.substitute).

Two translation units, linked into one shared library:

core (the same for every library, so build.py compiles it once and caches the object):
  common.h        error codes, the qc_job struct, the epilogue store, prototypes of the core functions
  core.c          dispatch (cpuid + QCOMPILE_CPU_PATH), threads, packing codes -> planes (one per path), im2col helpers
  mk_*.c          register-tiled microkernels, one instance per (path, tile shape, mode)
  driver.c        the blocked, OpenMP-parallel bit GEMM per (path, mode)
  qc_run_job      picks the driver
layers (this library's):
  common.h
  layer_*.c       one exported function per layer: ``int qc_layer_<cname>(const uint8_t* x, void* y, int64_t batch)``
                  with the layer's shapes as compile-time constants
  footer.c        the manifest (JSON) and path queries
Each layer's constants (packed weights in the kernel layout, wzero2, mult, bias, thresholds) go to a binary blob that
the assembler embeds with ``.incbin``, so the shared library is self-contained and big weights cost no C parsing.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from importlib import resources
from string import Template

import numpy as np

from qcompile import __version__, packing
from qcompile.reference import conv_output_shape

from .spec import LayerSpec

__all__ = ["ABI_VERSION", "PATHS", "GeneratedLibrary", "core_source", "generate", "c_name", "pack_layer_weights",
           "lut_acc16", "lut_conv", "lut_gemm", "lut_layer", "pack_lut_weights", "x86_kernels"]

ABI_VERSION = 1
PATHS = ("generic", "avx2", "avx512")  # index = the C QC_PATH_* value
MODES = ("QC_AND", "QC_XOR", "QC_XORM")
EPI_C = {"none": "QC_EPI_NONE", "float": "QC_EPI_FLOAT", "threshold": "QC_EPI_THRESHOLD"}
OUT_CTYPE = {"none": "int32", "float": "float32", "threshold": "uint8"}

# (rows, channels) of each path's main register tile; leftover rows use 1 x channels.
TILES = {"avx512": (4, 4), "avx2": (2, 4), "generic": (4, 2)}
# words a microkernel walks per plane: AVX-512 whole vectors of 8, AVX2 vectors of 4, generic the real words
KWN = {"avx512": "j->kwp", "avx2": "((j->kw + 3) & ~(int64_t)3)", "generic": "j->kw"}
# (output pixels, channels) of the direct conv's register tile
DIRECT_TILE = (4, 2)
# (rows, channels) of the per-layer BitGemm kernel's register tile (layer_dgemm.c): 2x4 keeps the eight counters,
# the two base pointers and the loop index in x86-64's general registers (2x4 measured best of 2x3..4x4)
GEMM_TILE = (2, 4)
TGT = {"avx512": "AVX512", "avx2": "AVX2", "generic": "GENERIC"}


def _template(name: str) -> Template:
    return Template(resources.files("qcompile.targets.cpu").joinpath("templates", name).read_text())


def c_name(index: int, name: str) -> str:
    """A C identifier for layer ``index`` named ``name`` (unique by the index)."""
    return f"L{index}_" + re.sub(r"[^0-9A-Za-z_]", "_", name)[:48]


def comment_text(name: str) -> str:
    """An ONNX node name as it may appear inside a C comment: printable ASCII, never closing the comment."""
    return re.sub(r"[^\x20-\x7e]", "?", name).replace("*/", "*_/")[:120]


def _mode(spec: LayerSpec) -> str:
    if not spec.xor_mode:
        return "QC_AND"
    return "QC_XORM" if spec.op == "conv" and any(spec.pads) else "QC_XOR"


def _kwp(spec: LayerSpec) -> int:
    return packing.round_up(packing.n_words(spec.K), 8)


def pack_layer_weights(spec: LayerSpec) -> np.ndarray:
    """Weights in the kernel layout [N, bits_w, Kwp] uint64 (gemm rows, or conv rows in tap-major order)."""
    planes = (packing.pack_gemm_weights(spec.w, spec.bits_w) if spec.op == "gemm"
              else packing.pack_conv_weights(spec.w, spec.bits_w))
    return packing.kernel_weight_layout(planes, 8)


def pack_lane_weights(spec: LayerSpec) -> np.ndarray:
    """BitGemm weights with channels in lanes for the AVX-512 kernel (layer_dgemm.c): [ceil(N/8), bits_w, Kwp, 8]
    uint64, word k of plane j of channel 8g + l at [g, j, k, l]; the padded channels are zero."""
    w = pack_layer_weights(spec)                       # [N, bits_w, Kwp]
    n = w.shape[0]
    w = np.pad(w, ((0, packing.round_up(n, 8) - n), (0, 0), (0, 0)))
    return np.ascontiguousarray(w.reshape(-1, 8, *w.shape[1:]).transpose(0, 2, 3, 1))


def direct_conv(spec: LayerSpec) -> bool:
    """Whether a BitConv also gets the direct kernel over packed pixels (generic and AVX2 paths; templates/
    layer_dconv.c): one group and no horizontal dilation, so a kernel row's taps are adjacent pixels."""
    return spec.op == "conv" and spec.group == 1 and spec.dilations[1] == 1


def _lut_group_max(spec: LayerSpec) -> int:
    """The largest value one lookup adds: 4 codes times the top weight code times the top activation code."""
    return 4 * (2 ** spec.bits_w - 1) * (2 ** spec.bits_a - 1)


def _lut_sums_fit(spec: LayerSpec) -> bool:
    """AND mode, one lookup's sum fits a byte and the whole sum S fits 16 bits (the LUT kernels' accumulators)."""
    return _mode(spec) == "QC_AND" and _lut_group_max(spec) <= 255 and spec.K * _lut_group_max(spec) // 4 <= 65535


def lut_conv(spec: LayerSpec) -> bool:
    """Whether a BitConv's x86 AVX2 path sums by 4-channel lookup tables (templates/layer_lconv.c) rather than
    popcounts: a direct conv whose sums fit (_lut_sums_fit)."""
    return direct_conv(spec) and _lut_sums_fit(spec)


def lut_gemm(spec: LayerSpec) -> bool:
    """Whether a BitGemm's x86 AVX2 path sums by lookup tables (templates/layer_lgemm.c): more than one plane
    pair (at W1A1 a lookup and a popcount cover the same 128 multiply-adds per cycle here and the popcount kernel
    is the tuned one) and sums that fit."""
    return spec.op == "gemm" and spec.bits_a * spec.bits_w >= 2 and _lut_sums_fit(spec)


def lut_layer(spec: LayerSpec) -> bool:
    """Whether the layer's AVX2 path uses a lookup-table kernel (lut_conv or lut_gemm)."""
    return lut_conv(spec) or lut_gemm(spec)


def _lut_geometry(spec: LayerSpec) -> dict[str, int]:
    """Group count, 32-channel blocks, register-tile pixels/rows and blocks, and the byte-accumulation run of a LUT
    kernel."""
    per_byte = 255 // _lut_group_max(spec)                      # lookups a byte sum holds
    nb = -(-spec.N // 32)
    if spec.op == "gemm":
        g4 = -(-spec.K // 4)
        return dict(G4=g4, NB=nb, LR=4, LV=1, LCH=min(per_byte, g4))
    g4 = -(-spec.in_shape[0] // 4)
    run = spec.kernel[1] * g4                                    # lookups per kernel row
    step = min(per_byte, run)
    while run % step:                                            # a divisor of the row, so no partial runs
        step -= 1
    wo = spec.out_hw[1]
    # channel blocks per step: two share each table load, which paid on the bundled CNN's convs (C = 32, 64:
    # 6-20% per layer) but not with many channels (C = 256: 4 pixels x 1 block ~10% faster; C = 128 even)
    blocks = 2 if nb >= 2 and g4 <= 16 else 1
    # pixels per register tile: 2 with two blocks (their 16-bit sums fill the registers), else the fewest computed
    # pixels per output row (a short tile still computes R), ties to the wider tile
    tile = 2 if blocks == 2 else min((4, 3, 2), key=lambda r: (-(-wo // r) * r, -r))
    return dict(G4=g4, NB=nb, LR=tile, LV=blocks, LCH=step)


def lut_acc16(spec: LayerSpec) -> bool:
    """Whether a LUT conv's threshold epilogue runs in 16-bit lanes (16 channels per vector instead of 8): every
    acc = 2*S - wzero2*rowsum lies strictly inside int16, so wrap-around 16-bit arithmetic gives it exactly and
    thresholds clamped to int16 compare the same."""
    if spec.op != "conv" or spec.epilogue != "threshold" or not lut_conv(spec):
        return False
    pmax, qmax = 2 ** spec.bits_a - 1, 2 ** spec.bits_w - 1
    s_max, rs_max = spec.K * qmax * pmax, spec.K * pmax
    z = spec.wzero2.astype(np.int64)
    hi = 2 * s_max + max(0, -int(z.min())) * rs_max
    lo = -max(0, int(z.max())) * rs_max
    return max(hi, -lo) <= 32766


def lut_rowbuf(spec: LayerSpec) -> bool:
    """Whether a LUT conv gathers an output row's threshold codes pixel-major on the stack (at most 64 KiB) and
    transposes them to NCHW at the row's end, instead of storing each channel's few codes from the epilogue."""
    if spec.op != "conv" or spec.epilogue != "threshold":
        return False
    geo = _lut_geometry(spec)
    return max(16, spec.out_hw[1] + geo["LR"]) * geo["NB"] * 32 <= 65536


def lut_pool_fused(spec: LayerSpec) -> bool:
    """Whether a conv's folded pool runs inside its LUT kernel (on the row buffer: pooled pixel-major, then one
    transpose); otherwise the conv writes a scratch buffer and the max-pool kernel reads it."""
    return spec.pool is not None and lut_conv(spec) and lut_rowbuf(spec)


def lut_channel(p: int) -> int:
    """The output channel (within a 32-channel block) that byte ``p`` of a LUT index vector holds: the even/odd
    byte split of the 8 -> 16-bit widening then yields channels 0..15 and 16..31 in order."""
    lane, b = divmod(p, 16)
    return (b & 1) * 16 + lane * 8 + (b >> 1)


def pack_lut_weights(spec: LayerSpec) -> np.ndarray:
    """Index bytes of the LUT conv: [NB, KH, KW*G4, bits_w, 32] uint8; entry (block, ky, kx*G4 + g, j, p) holds
    bit j of the weight codes of channels 4g..4g+3 (bit i = channel 4g+i) at tap (ky, kx) for output channel
    block*32 + lut_channel(p); zero for padded channels. BitGemm: [NB, G4, bits_w, 32], K in the channels' place."""
    w4 = spec.w[:, :, None, None] if spec.op == "gemm" else spec.w
    n, c, kh, kw = w4.shape
    g4, nb = -(-c // 4), -(-n // 32)
    w = np.zeros((nb * 32, g4 * 4, kh, kw), np.uint8)
    w[:n, :c] = w4
    out = np.zeros((nb, kh, kw, g4, spec.bits_w, 32), np.uint8)
    perm = np.array([lut_channel(p) for p in range(32)])
    for j in range(spec.bits_w):
        bits = ((w >> j) & 1).reshape(nb, 32, g4, 4, kh, kw)                 # [nb, ch, g, i, ky, kx]
        idx = sum(bits[:, :, :, i] << i for i in range(4))                   # [nb, ch, g, ky, kx]
        out[:, :, :, :, j, :] = idx[:, perm].transpose(0, 3, 4, 2, 1)        # [nb, ky, kx, g, p]
    out = out.reshape(nb, kh, kw * g4, spec.bits_w, 32)
    return out[:, 0] if spec.op == "gemm" else out


def _direct_geometry(spec: LayerSpec) -> dict[str, int]:
    c, h, w = spec.in_shape
    cp = packing.round_up(c, 32)
    return dict(CP=cp, CU=cp // 32, HP=h + spec.pads[0] + spec.pads[2], WP=w + spec.pads[1] + spec.pads[3],
                RW=packing.n_words(spec.kernel[1] * cp), DPL=2 if _mode(spec) == "QC_XORM" else spec.bits_a)


def pack_direct_weights(spec: LayerSpec) -> np.ndarray:
    """Weights of the direct conv: [N, KH, bits_w, RW] uint64; kernel row ky of plane j is one bit segment with
    channel c of tap kx at bit kx*CP + c (CP = C rounded up to 32), zero elsewhere."""
    n, c, kh, kw = spec.w.shape
    cp = packing.round_up(c, 32)
    planes = []
    for j in range(spec.bits_w):
        bits = np.zeros((n, kh, kw, cp), np.uint8)
        bits[..., :c] = ((spec.w >> j) & 1).transpose(0, 2, 3, 1)
        planes.append(packing.pack_bits(bits.reshape(n, kh, kw * cp)))
    return np.ascontiguousarray(np.stack(planes, axis=2))


def _blob(spec: LayerSpec, layer_avx512: bool = False) -> tuple[bytes, dict[str, int]]:
    lanes = layer_avx512 and spec.op == "gemm"  # the AVX-512 BitGemm kernel: weights and epilogue by channel lanes
    parts = {
        "W": pack_layer_weights(spec).astype("<u8").tobytes(),
        "WD": pack_direct_weights(spec).astype("<u8").tobytes() if direct_conv(spec) else b"",
        "W8": pack_lane_weights(spec).astype("<u8").tobytes() if lanes else b"",
        "WZ2": spec.wzero2.astype("<i4").tobytes(),
        "MULT": (spec.mult if spec.epilogue == "float" else np.zeros(spec.N, np.float32)).astype("<f4").tobytes(),
        "BIAS": (spec.bias if spec.epilogue == "float" else np.zeros(spec.N, np.float32)).astype("<f4").tobytes(),
        "THR": (spec.thresholds if spec.L else np.zeros((spec.N, 1), np.int32)).astype("<i4").tobytes(),
        "WL": b"", "WZ2P": b"", "THRT": b"", "MULTP": b"", "BIASP": b"", "WZ2P16": b"", "THRT16": b"",
    }
    if lut_layer(spec) or lanes:  # the epilogue's arrays by channel, padded to a multiple of 32
        npad = packing.round_up(spec.N, 32)
        thrt = np.full((max(spec.L, 1), npad), np.iinfo(np.int32).max, np.int32)  # [L][npad]
        if spec.L:
            thrt[:, :spec.N] = spec.thresholds.T
        wz2p = np.pad(spec.wzero2.astype(np.int32), (0, npad - spec.N))
        vec = (lambda a: np.pad(a.astype("<f4"), (0, npad - spec.N)).tobytes()) if spec.epilogue == "float" else \
            (lambda a: b"")
        parts.update(MULTP=vec(spec.mult), BIASP=vec(spec.bias), WZ2P=wz2p.astype("<i4").tobytes(),
                     THRT=thrt.astype("<i4").tobytes())
        if lut_acc16(spec):  # the LUT conv's 16-bit threshold epilogue: the same arrays as int16, thresholds clamped
            parts.update(WZ2P16=wz2p.astype("<i2").tobytes(),
                         THRT16=np.clip(thrt, -32768, 32767).astype("<i2").tobytes())
    if lut_layer(spec):  # the LUT kernel's index bytes
        parts.update(WL=pack_lut_weights(spec).tobytes())
    out, offsets = bytearray(), {}
    for key, data in parts.items():
        out += b"\0" * (packing.round_up(len(out), 64) - len(out))
        offsets[key] = len(out)
        out += data
    return bytes(out), offsets


@dataclass
class GeneratedLibrary:
    core_source: str            # the kernel core (identical for every library of this version and mode)
    head: str                   # what every layer file starts with (defines, common.h)
    layer_parts: list[str]      # one layer's C each
    footer: str                 # the entry points (manifest)
    blobs: dict[str, bytes]     # file name (relative to the build dir) -> contents, embedded by .incbin
    manifest: dict              # what qc_manifest() returns, as a dict

    def sources(self, files: int = 1) -> list[str]:
        """The layers' C as ``files`` files (fewer if there are fewer layers), balanced by length; the first also
        holds the entry points. Files compile side by side: one file of the bundled CNN's layers took 5.5 s of gcc
        on one core, two took 2.8 + 3.5 s (each file parses the headers again, ~0.6 s)."""
        n = max(1, min(len(self.layer_parts), files))
        groups: list[list[str]] = [[] for _ in range(n)]
        sizes = [0] * n
        for part in sorted(self.layer_parts, key=len, reverse=True):
            i = sizes.index(min(sizes))
            groups[i].append(part)
            sizes[i] += len(part)
        return [self.head + "".join(g) + (self.footer if i == 0 else "") for i, g in enumerate(groups) if g]


def _path_code() -> str:
    """Microkernels and drivers of every (path, mode), then ``qc_run_job`` that dispatches between them.
    The SIMD paths exist only on x86 (QC_HAVE_SIMD); elsewhere they compile out and qc_path_supported says no."""
    parts, cases = [], []
    mk_driver = _template("driver.c")
    for p, (path, (mr, nr)) in enumerate((path, TILES[path]) for path in PATHS):
        tmpl, chunk = _template(f"mk_{path}.c"), []
        for m, mode in enumerate(MODES):
            big, one = f"mk_{path}_{mr}x{nr}_{mode[3:]}", f"mk_{path}_1x{nr}_{mode[3:]}"
            for name, rows in dict(((big, mr), (one, 1))).items():  # one instance when the tile has 1 row
                chunk.append(tmpl.substitute(NAME=name, MR=rows, NR=nr, MODE=mode, TGT=TGT[path]))
            chunk.append(mk_driver.substitute(PATH=path, MODE=mode[3:], TGT=TGT[path], MR=mr, NR=nr,
                                              KWN=KWN[path], MK_BIG=big, MK_ONE=one))
            case = f"    case {p * 3 + m}: qc_gemm_{path}_{mode[3:]}(j); return;\n"
            cases.append(case if path == "generic" else f"#if defined(QC_HAVE_SIMD)\n{case}#endif\n")
        code = "".join(chunk)
        parts.append(code if path == "generic" else f"#if defined(QC_HAVE_SIMD)\n{code}#endif\n")
    parts.append("QC_CORE void qc_run_job(int path, const qc_job* j) {\n  switch (path * 3 + j->mode) {\n"
                 + "".join(cases) + "    default: return;\n  }\n}\n\n")
    return "".join(parts)


def _layer_source(index: int, spec: LayerSpec, blob_name: str, offsets: dict[str, int], lut: bool) -> str:
    cname = c_name(index, spec.name)
    kwp = _kwp(spec)
    common = dict(LAYER=comment_text(spec.name), CNAME=cname, BLOB=blob_name, KA=spec.bits_a, KB=spec.bits_w, KWP=kwp,
                  MODE=_mode(spec), EPI=EPI_C[spec.epilogue], OUT_CTYPE=OUT_CTYPE[spec.epilogue],
                  L=max(spec.L, 1), N=spec.N, KWORDS=packing.n_words(spec.K),
                  **{f"OFF_{k}": v for k, v in offsets.items()})
    out_c = {"none": "int32_t", "float": "float", "threshold": "uint8_t"}[spec.epilogue]
    if spec.op == "gemm":
        gmr, gnr = GEMM_TILE
        direct = _template("layer_dgemm.c").substitute(common, GMR=gmr, GNR=gnr, OUT_CTYPE_C=out_c, K=spec.K)
        lut_call = ""
        if lut and lut_gemm(spec):
            geo = _lut_geometry(spec)
            direct += _template("layer_lgemm.c").substitute(common, **geo, K=spec.K, OUT_CTYPE_C=out_c)
            # one row streams every index byte once (2x the packed planes' bytes at W1): when they spill the
            # last-level cache (> 4 MiB) the popcount kernel is faster (measured: W2A2 K=N=4096 M=1 0.33 vs 0.26 ms)
            wl_bytes = geo["NB"] * geo["G4"] * spec.bits_w * 32
            lut_call = (f"#if defined(QC_X86)\n    if (QC_LUT_GEMM(path) && (batch > 1 || {wl_bytes} <= (4 << 20)))"
                        f" return {cname}_lut(x, y, batch);\n#endif\n")
        # a BitGemm that quantizes its float input itself: the exported function makes the codes, then calls it
        quantizing = spec.in_thresholds is not None
        export = f"static int {cname}_gemm" if quantizing else f"QC_EXPORT int qc_layer_{cname}"
        return _template("layer_gemm.c").substitute(common, K=spec.K, DIRECT_CODE=direct, OUT_CTYPE_C=out_c,
                                                    LUT_CALL=lut_call, EXPORT=export) \
            + (_in_quant_source(spec, cname, "") if quantizing else "")
    c, h, w = spec.in_shape
    ho, wo = spec.out_hw
    if spec.op == "maxpool":
        return _maxpool_source(spec.name, cname, (c, h, w), spec.kernel, spec.strides, spec.dilations)
    direct_code = direct_call = ""
    lut_pool = lut and lut_pool_fused(spec)
    # the LUT kernel reads the float input itself (stage 1 compares) unless it would have to leave a pool to scratch
    lut_float = lut and lut_conv(spec) and spec.in_thresholds is not None and (spec.pool is None or lut_pool)
    if direct_conv(spec):
        store = {
            "none": "yo[r] = a;",
            "float": "float f = (float)a; f = f * mult[n]; f = f + bias[n]; yo[r] = f;",
            "threshold": "const int32_t* tq = thr + n * L; int q8 = 0; for (int q = 0; q < L; ++q) q8 += a >= tq[q]; "
                         "yo[r] = (uint8_t)q8;",
        }[spec.epilogue]
        mr, nr = DIRECT_TILE
        direct_code = _template("layer_dconv.c").substitute(
            common, **_direct_geometry(spec), C=c, H=h, W=w, DMR=mr, DNR=nr, STORE=store,
            THR_SIMD=int(spec.epilogue == "threshold"),
            OUT_CTYPE_C=out_c)
        direct_call = f"    if (QC_PER_LAYER(path)) return {cname}_direct(x, y, batch, path);\n"
        if lut and lut_conv(spec):
            lstore = {"none": "yo[r] = a;",
                      "float": "float f = (float)a; f = f * mult[n]; f = f + bias[n]; yo[r] = f;",
                      "threshold": "yo[r] = (uint8_t)a;"}[spec.epilogue]
            pkh, pkw = spec.pool if lut_pool else (1, 1)
            pho, pwo = spec.pooled_hw if lut_pool else (ho, wo)
            qthr = spec.in_thresholds if lut_float else np.zeros(1, np.float32)
            direct_code += _template("layer_lconv.c").substitute(
                common, **_direct_geometry(spec), **_lut_geometry(spec), C=c, KW=spec.kernel[1], LSTORE=lstore,
                ACC16=int(lut_acc16(spec)), ROWBUF=int(lut_rowbuf(spec)), POOL=int(lut_pool), PKH=pkh, PKW=pkw,
                PHO=pho, PWO=pwo, OUT_CTYPE_C=out_c, IN_FLOAT=int(lut_float), IN_T="float" if lut_float else "uint8_t",
                QL=qthr.size, LQTHR_DECL=f"static const float {cname}_lqthr[{qthr.size}] = "
                                         f"{{{', '.join(_c_float(v) for v in qthr)}}};" if lut_float else "")
            # x86: the AVX2 path runs the LUT kernel (the popcount direct conv then serves no path there); with
            # the pool folded into it, the pooling wrapper below calls it
            lut_call = "" if lut_pool or lut_float else _lut_line(cname)
            direct_call = f"#if defined(QC_X86)\n{lut_call}#else\n{direct_call}#endif\n"
    # the exported qc_layer_<cname> is the outermost of: input quantizer -> pooling wrapper -> conv
    quantizing = spec.in_thresholds is not None
    wrapped = spec.pool is not None or quantizing
    export, pooling = (f"static int {cname}_conv" if wrapped else f"QC_EXPORT int qc_layer_{cname}"), ""
    if spec.pool is not None:  # the conv writes NCHW codes into a scratch buffer that a max-pool reads, unless the
        # LUT kernel pools
        pooling = _maxpool_source(spec.name, f"{cname}_p", (spec.N, ho, wo), spec.pool, spec.pool, (1, 1),
                                  export=f"static int {cname}_p_run")
        pooling += _template("layer_pool_wrap.c").substitute(
            LAYER=comment_text(spec.name), CNAME=cname, N=spec.N, HO=ho, WO=wo, PHO=spec.pooled_hw[0],
            PWO=spec.pooled_hw[1],
            EXPORT=f"static int {cname}_pooled" if quantizing else f"QC_EXPORT int qc_layer_{cname}",
            LUT_CALL=_lut_call(cname) if lut_pool and not lut_float else "")
    return _template("layer_conv.c").substitute(
        common, EXPORT=export, DIRECT_CODE=direct_code, DIRECT_CALL=direct_call, C=c, H=h, W=w, G=spec.group, CG=c // spec.group, NG=spec.N // spec.group,
        KH=spec.kernel[0], KW=spec.kernel[1], SH=spec.strides[0], SW=spec.strides[1],
        PT=spec.pads[0], PL=spec.pads[1], PB=spec.pads[2], PR=spec.pads[3],
        DH=spec.dilations[0], DW=spec.dilations[1], HO=ho, WO=wo,
        CGW=packing.n_words(c // spec.group), A_PLANES=2 if _mode(spec) == "QC_XORM" else spec.bits_a) + pooling \
        + (_in_quant_source(spec, cname, _lut_call(cname) if lut_float else "") if quantizing else "")


def _lut_line(cname: str) -> str:
    """The x86 SIMD paths' call of a layer's LUT kernel (inside a function that has x, y, batch and path)."""
    return f"    if (QC_PER_LAYER(path)) return {cname}_lut(x, y, batch);\n"


def _lut_call(cname: str) -> str:
    return f"#if defined(QC_X86)\n{_lut_line(cname)}#endif\n"


def _c_float(v: float) -> str:
    """An exact C float literal (hex), or the NaN / infinity builtins."""
    if np.isnan(v):
        return "__builtin_nanf(\"\")"
    if np.isinf(v):
        return "__builtin_inff()" if v > 0 else "-__builtin_inff()"
    return float(np.float32(v)).hex() + "f"


def _in_quant_source(spec: LayerSpec, cname: str, lut_call: str) -> str:
    out_bytes = int(np.prod(spec.out_shape)) * spec.out_dtype.itemsize
    c, h, w = spec.in_shape if spec.op == "conv" else (spec.K, 1, 1)   # a BitGemm row: K values
    inner = f"{cname}_gemm" if spec.op == "gemm" else f"{cname}_pooled" if spec.pool is not None else f"{cname}_conv"
    return _template("layer_in_quant.c").substitute(
        LAYER=comment_text(spec.name), CNAME=cname, C=c, H=h, W=w,
        QL=spec.in_thresholds.size, QTHR=", ".join(_c_float(v) for v in spec.in_thresholds),
        OUT_IMG_BYTES=out_bytes, INNER=inner, LUT_CALL=lut_call)


def _maxpool_source(name: str, cname: str, in_shape, kernel, strides, dilations, *, export: str = "") -> str:
    c, h, w = in_shape
    ho, wo = conv_output_shape((h, w), kernel, strides, (0, 0, 0, 0), dilations)
    return _template("layer_maxpool.c").substitute(
        LAYER=comment_text(name), CNAME=cname, C=c, H=h, W=w, HO=ho, WO=wo, KH=kernel[0], KW=kernel[1],
        SH=strides[0], SW=strides[1], DH=dilations[0], DW=dilations[1],
        PPT=max(1, 16384 // (h * w)), EXPORT=export or f"QC_EXPORT int qc_layer_{cname}")


def _rnn_source(r, cname: str, symbols: dict[str, str]) -> str:
    """One recurrent layer's time loop (templates/layer_rnn.c) around its gate-product layers ``symbols``."""
    floats = lambda a: ", ".join(_c_float(v) for v in a)  # noqa: E731
    fns = {k: [symbols[d[k].name] if d[k] is not None else "NULL" for d in r.sublayers] for k in ("W", "R", "Rh")}
    protos = "".join(f"int {sym}(const uint8_t* x, void* y, int64_t batch);\n"
                     for sym in sorted({f for v in fns.values() for f in v if f != "NULL"}))
    return _template("layer_rnn.c").substitute(
        LAYER=comment_text(r.name), CNAME=cname, DESC=r.describe(), NL=r.h_thresholds.size,
        XTHR=floats(r.x_thresholds), HTHR=floats(r.h_thresholds), INV_N=_c_float(1.0 / ((1 << r.bits_a) - 1)),
        PROTOS=protos,
        WFNS=", ".join(fns["W"]), RFNS=", ".join(fns["R"]), RHFNS=", ".join(fns["Rh"]), D=r.num_directions,
        H=r.hidden, I=r.input_size, G=4 if r.cell == "LSTM" else 3, LSTM=int(r.cell == "LSTM"),
        LBR=int(r.linear_before_reset), REVERSE=int(r.direction == "reverse"))


def _rnn_table(recurrent, rnn: dict) -> str:
    """qc_rnn_table: every recurrent layer's name, time loop and sizes, for the onnxruntime custom op Recurrent."""
    protos, rows = [], []
    for r in recurrent:
        sym = rnn[r.name]["symbol"]
        protos.append(f"int {sym}(const float*, const int32_t*, const float*, const float*, float*, float*, float*, "
                      "int64_t, int64_t);\n")
        rows.append(f"    {{{_c_literal(r.name)}, {sym}, {r.num_directions}, {r.hidden}, {r.input_size}, "
                    f"{int(r.cell == 'LSTM')}}},\n")
    rows = rows or ["    {0}\n"]  # C has no empty arrays: one zeroed entry, count 0
    return ("/* ---- the recurrent layers, for the onnxruntime custom op Recurrent (ort_ops.c) ---- */\n"
            + "".join(protos) + "const qc_rnn_entry qc_rnn_table[] = {\n" + "".join(rows) + "};\n"
            + f"const int qc_rnn_count = {len(recurrent)};\n")


def _c_string(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')


def _c_literal(text: str) -> str:
    """A C string literal of any text (node names hold quotes, newlines, non-ASCII): bytes outside plain printable
    ASCII as octal escapes."""
    out = []
    for b in text.encode():
        ch = chr(b)
        out.append(ch if 32 <= b < 127 and ch not in '"\\?' else f"\\{b:03o}")
    return '"' + "".join(out) + '"'


_ONNX_TYPE = {"float32": 1, "uint8": 2, "int32": 6}


def _layer_table(specs, symbols: list[str]) -> str:
    """qc_layer_table: every layer's name, function, element types and shapes, for the onnxruntime custom ops."""
    protos, rows = [], []
    for spec, sym in zip(specs, symbols):
        in_type = 1 if spec.in_thresholds is not None else 2
        ins, outs = list(spec.in_shape), list(spec.out_shape)
        pad = lambda v: ", ".join(str(int(x)) for x in (v + [0, 0, 0])[:3])  # noqa: E731
        protos.append(f"int {sym}(const uint8_t* x, void* y, int64_t batch);\n")
        rows.append(f"    {{{_c_literal(spec.name)}, {sym}, {in_type}, {_ONNX_TYPE[str(spec.out_dtype)]}, "
                    f"{int(spec.op == 'gemm')}, {len(ins)}, {len(outs)}, {{{pad(ins)}}}, {{{pad(outs)}}}, "
                    f"{int(np.prod(ins))}}},\n")
    return ("/* ---- the layers, for the onnxruntime custom ops (ort_ops.c) ---- */\n" + "".join(protos)
            + "const qc_layer_entry qc_layer_table[] = {\n" + "".join(rows) + "};\n"
            + f"const int qc_layer_count = {len(rows)};\n")


def core_source(*, emulate_avx512: bool = False) -> str:
    """The kernel core's C: the same for every library of this qcompile version (and emulation mode)."""
    core = _template("common.h").substitute(VERSION=__version__) + _template("core.c").template + _path_code() \
        + _template("ort_ops.c").template
    return ("#define QC_EMULATE_AVX512 1\n" + core) if emulate_avx512 else core


def x86_kernels(spec: LayerSpec, *, lut: bool = True, layer_avx512: bool = True) -> dict[str, str]:
    """What sums the layer on each x86 SIMD path, "lut" or "popcount" (the manifest's avx2_kernel/avx512_kernel;
    the planner reads the same): the AVX-512 path runs the LUT kernels too, except a BitGemm that has its own
    AVX-512 kernel (QC_LUT_GEMM, the C side of this rule)."""
    on = lut and lut_layer(spec)
    return {"avx2_kernel": "lut" if on else "popcount",
            "avx512_kernel": "lut" if on and (spec.op == "conv" or not layer_avx512) else "popcount"}


def generate(specs: list[LayerSpec], *, emulate_avx512: bool = False, layer_avx512: bool = False,
             lut: bool = True, recurrent=()) -> GeneratedLibrary:
    """The C source, blobs and manifest of one library holding ``specs``. ``layer_avx512``: the BitGemm layers also
    get their own AVX-512 kernel (for an AVX-512 target; without it that path runs the core's kernels). ``lut``:
    layers that :func:`lut_layer` accepts sum by lookup tables on the x86 AVX2 path (else by popcounts).
    ``recurrent``: targets.cpu.recurrent.RecurrentLayer's; their gate products join ``specs`` as BitGemm layers and
    each gets a ``qc_rnn_<cname>`` time loop (templates/layer_rnn.c)."""
    specs = list(specs) + [s for r in recurrent for s in r.specs()]
    if not specs:
        raise ValueError("generate: no layers")
    seen = set()
    for s in specs:
        if s.name in seen:
            raise ValueError(f"generate: duplicate layer name {s.name!r}")
        seen.add(s.name)
    common = _template("common.h").substitute(VERSION=__version__)
    parts = []
    blobs, layers = {}, {}
    for i, spec in enumerate(specs):
        blob_name = f"{c_name(i, spec.name)}.bin"
        offsets = {}
        if spec.op != "maxpool":  # a max-pool has no constants
            blob, offsets = _blob(spec, layer_avx512)
            blobs[blob_name] = blob
        parts.append(_layer_source(i, spec, blob_name, offsets, lut))
        layers[spec.name] = {
            "symbol": f"qc_layer_{c_name(i, spec.name)}", "op": spec.op, "bits_a": spec.bits_a,
            "bits_w": spec.bits_w, "in_shape": list(spec.in_shape), "out_shape": list(spec.out_shape),
            "out_dtype": str(spec.out_dtype), "epilogue": spec.epilogue, "xor": spec.xor_mode,
            "K": spec.K, "N": spec.N, **({"extra": spec.extra} if spec.extra else {}),
            **(x86_kernels(spec, lut=lut, layer_avx512=layer_avx512) if spec.op != "maxpool" else {}),
        }
        if spec.op in ("conv", "maxpool"):
            layers[spec.name].update(kernel=list(spec.kernel), strides=list(spec.strides), pads=list(spec.pads),
                                     dilations=list(spec.dilations), group=spec.group)
        if spec.pool is not None:
            layers[spec.name]["pool"] = list(spec.pool)
        if spec.in_thresholds is not None:
            layers[spec.name]["in_dtype"] = "float32"
    rnn = {}
    for j, r in enumerate(recurrent):
        cname = c_name(j, r.name)
        parts.append(_rnn_source(r, cname, {s.name: layers[s.name]["symbol"] for s in r.specs()}))
        rnn[r.name] = {"symbol": f"qc_rnn_{cname}", "cell": r.cell, "direction": r.direction, "hidden": r.hidden,
                       "input_size": r.input_size, "bits_a": r.bits_a,
                       "gate_layers": [{k: (s.name if s is not None else None) for k, s in d.items()}
                                       for d in r.sublayers]}
    manifest = {"abi": ABI_VERSION, "qcompile": __version__, "emulate_avx512": emulate_avx512,
                "layer_avx512": layer_avx512, "layers": layers, **({"recurrent": rnn} if rnn else {})}
    footer = _template("footer.c").substitute(MANIFEST=_c_string(json.dumps(manifest, sort_keys=True)),
                                              ABI=ABI_VERSION) \
        + _layer_table(specs, [layers[s.name]["symbol"] for s in specs]) + _rnn_table(recurrent, rnn)
    head = ("#define QC_EMULATE_AVX512 1\n" if emulate_avx512 else "") + \
        ("#define QC_LAYER_AVX512 1\n" if layer_avx512 else "") + common
    return GeneratedLibrary(core_source=core_source(emulate_avx512=emulate_avx512), head=head, layer_parts=parts,
                            footer=footer, blobs=blobs, manifest=manifest)
