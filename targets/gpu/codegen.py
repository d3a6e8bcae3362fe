"""CUDA source and packed constants for BitGemm / BitConv / MaxPoolCodes layers (templates/bitkernels.cuh).

``plan(spec, index)`` fixes a layer's compile-time constants (tiles, padded sizes) as a :class:`GpuLayer`;
``chain_layers(producer, consumer)`` lets a threshold layer write its reader's packed input (targets/gpu/chain.py);
``generate(layers)`` writes one ``.cu`` with a constants struct and ``extern "C" __global__`` entry points per
layer; ``pack_constants(spec, layer)`` lays out the weights and epilogue arrays the kernels read (one blob per
layer, each array 256-byte aligned). The runtime (qcompile.runtime.gpu) reads only ``GpuLayer.manifest()``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from qcompile.packing import round_up
from qcompile.targets.cpu.codegen import comment_text
from qcompile.targets.cpu.spec import LayerSpec

from .chain import chain_refusal, packed_form, shares_words

__all__ = ["GpuLayer", "plan", "chain_layers", "generate", "pack_constants", "mma_tiles", "KWORD_MULTIPLE", "ROW_MULTIPLE"]

KWORD_MULTIPLE = 16   # K is padded to 16 words (512 bits): one shared-memory K tile of either path
ROW_MULTIPLE = 128    # packed GEMM rows and weight channels are padded to the largest tile
POPC_TILE = (64, 64, 256)  # CUDA-core path: rows, channels, threads per block
PACK_THREADS = 128
EPI_CODE = {"none": 0, "float": 1, "threshold": 2}
_ALIGN = 256


def mma_tiles(bits_a: int, bits_w: int) -> tuple[int, int, int, int]:
    """(TM, TN, WARPS_M, WARPS_N) of the tensor-core kernel: the block computes TM rows x TN channels for every
    plane pair. Each warp keeps (WM/16)*(WN/8) accumulator fragments per plane diagonal (at most 16 fragments, 64
    registers), shared memory holds at most 128 plane-rows of A and of B; the largest MMA work per block wins, then
    more warps, then the squarer tile."""
    diagonals = bits_a + bits_w - 1
    best = None
    for warps_m, warps_n in ((4, 2), (2, 4), (2, 2), (1, 4), (4, 1), (1, 2), (2, 1), (1, 1)):
        for wm in (16, 32, 64):
            for wn in (8, 16, 32, 64):
                if (wm // 16) * (wn // 8) * diagonals > 16:
                    continue
                tm, tn = wm * warps_m, wn * warps_n
                if tm * bits_a > 128 or tn * bits_w > 128:
                    continue
                score = (tm * bits_a * tn * bits_w, warps_m * warps_n, -abs(tm * bits_a - tn * bits_w))
                if best is None or score > best[0]:
                    best = (score, (tm, tn, warps_m, warps_n))
    assert best is not None
    return best[1]


def cuda_name(index: int, name: str) -> str:
    return f"L{index}_" + re.sub(r"[^0-9A-Za-z_]", "_", name)[:48]


@dataclass
class GpuLayer:
    """A layer's kernels and constants. ``consts`` become the C++ struct; ``blob`` maps each constant array to its
    (offset, bytes) in the layer's blob."""

    spec: LayerSpec
    cname: str
    consts: dict = field(default_factory=dict)
    pool: dict | None = None          # MaxPoolCodes constants (op "maxpool", or a pool folded into a conv)
    blob: dict = field(default_factory=dict)
    packed: dict | None = None        # chained: the consumer's packed layout this layer can write
    consumer: str | None = None
    zero_act: bool = False            # the consumer's planes must be zeroed first (words shared by two blocks)

    @property
    def kernels(self) -> dict[str, str]:
        if self.spec.op == "maxpool":
            return {"pool": f"qc_{self.cname}_pool"}
        k = {"pack": f"qc_{self.cname}_pack", "mma": f"qc_{self.cname}_mma", "popc": f"qc_{self.cname}_popc"}
        if self.packed is not None:  # the same GEMMs writing the consumer's packed input
            k.update(mma_packed=f"qc_{self.cname}_mma_packed", popc_packed=f"qc_{self.cname}_popc_packed")
        if self.pool is not None:
            k["pool"] = f"qc_{self.cname}_pool"
        return k

    def manifest(self) -> dict:
        s, c = self.spec, self.consts
        entry = {"name": s.name, "cname": self.cname, "op": s.op, "in_shape": list(s.in_shape),
                 "out_shape": list(s.out_shape), "in_dtype": str(s.in_dtype), "out_dtype": str(s.out_dtype),
                 "kernels": self.kernels, "blob": self.blob, "pack_threads": PACK_THREADS}
        if s.op != "maxpool":
            entry.update(bits_a=s.bits_a, bits_w=s.bits_w, epilogue=s.epilogue, xor=bool(s.xor_mode),
                         groups=c["G"], ng=c["NG"], kwp=c["KWP"],
                         mma={"tm": c["TM"], "tn": c["TN"], "threads": 32 * c["WARPS_M"] * c["WARPS_N"]},
                         popc={"tm": POPC_TILE[0], "tn": POPC_TILE[1], "threads": POPC_TILE[2]})
            if s.op == "gemm":  # packed rows: [roundup(M, 128)][BA][KWP] words, one row sum each
                entry.update(act_words_per_row=s.bits_a * c["KWP"], rows_per_sample=1)
            else:  # packed pixels [B][H][W][G][BA][CGW] words, one code sum per pixel and group
                entry.update(act_words_per_sample=c["H"] * c["W"] * c["G"] * s.bits_a * c["CGW"],
                             rowsum_per_sample=c["H"] * c["W"] * c["G"], rows_per_sample=c["HO"] * c["WO"],
                             conv_out_shape=[s.N, *s.out_hw])
        if self.packed is not None:
            entry["packed_out"] = {"consumer": self.consumer, "zero_act": self.zero_act}
        if self.pool is not None:
            entry["pool"] = {"in_shape": [self.pool["C"], self.pool["H"], self.pool["W"]],
                             "out_shape": [self.pool["C"], self.pool["HO"], self.pool["WO"]]}
        return entry


def plan(spec: LayerSpec, index: int) -> GpuLayer:
    layer = GpuLayer(spec, cuda_name(index, spec.name))
    if spec.op == "maxpool":
        (c, h, w), (kh, kw) = spec.in_shape, spec.kernel
        layer.pool = dict(C=c, H=h, W=w, KH=kh, KW=kw, SH=spec.strides[0], SW=spec.strides[1],
                          DH=spec.dilations[0], DW=spec.dilations[1], HO=spec.out_shape[1], WO=spec.out_shape[2])
        return layer
    tm, tn, warps_m, warps_n = mma_tiles(spec.bits_a, spec.bits_w)
    n, g = spec.N, spec.group
    c = dict(OP=0 if spec.op == "gemm" else 1, BA=spec.bits_a, BW=spec.bits_w, XOR=int(spec.xor_mode),
             EPI=EPI_CODE[spec.epilogue], NT=max(spec.L, 1), IN_FLOAT=int(spec.in_thresholds is not None),
             N=n, G=g, NG=n // g, NGP=round_up(n // g, ROW_MULTIPLE), K=spec.K,
             TM=tm, TN=tn, WARPS_M=warps_m, WARPS_N=warps_n)
    if spec.op == "gemm":
        c.update(C=spec.K, H=1, W=1, CG=spec.K, KH=1, KW=1, SH=1, SW=1, PT=0, PL=0, DH=1, DW=1, HO=1, WO=1,
                 TAPS=1, CGW=round_up(spec.K, 32) // 32, VEC=4)
    else:
        (ch, h, w), (kh, kw) = spec.in_shape, spec.kernel
        cgw = round_up(ch // g, 32) // 32
        c.update(C=ch, H=h, W=w, CG=ch // g, KH=kh, KW=kw, SH=spec.strides[0], SW=spec.strides[1],
                 PT=spec.pads[0], PL=spec.pads[1], DH=spec.dilations[0], DW=spec.dilations[1],
                 HO=spec.out_hw[0], WO=spec.out_hw[1], TAPS=kh * kw, CGW=cgw,
                 VEC=4 if cgw % 4 == 0 else 2 if cgw % 2 == 0 else 1)
    c["KWP"] = round_up(c["TAPS"] * c["CGW"], KWORD_MULTIPLE)
    layer.consts = c
    if spec.pool is not None:
        (ho, wo), (ph, pw) = spec.out_hw, spec.pool
        layer.pool = dict(C=n, H=ho, W=wo, KH=ph, KW=pw, SH=ph, SW=pw, DH=1, DW=1, HO=ho // ph, WO=wo // pw)
    return layer


def chain_layers(producer: GpuLayer, consumer: GpuLayer) -> None:
    """Let ``producer``'s threshold epilogue write ``consumer``'s packed input (its ``*_packed`` kernels); raises
    ValueError saying why when the two do not chain (chain.chain_refusal)."""
    why = chain_refusal(producer.spec, consumer.spec)
    if why:
        raise ValueError(f"{producer.spec.name} -> {consumer.spec.name} cannot chain: {why}")
    producer.packed, producer.consumer = packed_form(consumer.consts), consumer.spec.name
    producer.zero_act = shares_words(producer.consts, producer.packed, (producer.consts["TN"], POPC_TILE[1]))


def _struct(name: str, consts: dict) -> str:
    body = "".join(f"    static constexpr int {k} = {int(v)};\n" for k, v in consts.items())
    return f"struct {name} {{\n{body}}};\n"


def generate(layers: list[GpuLayer]) -> str:
    """One CUDA translation unit for all layers."""
    out = ["// generated by qcompile.targets.gpu.codegen: one constants struct and entry points per layer\n",
           '#include "bitkernels.cuh"\n\n']
    for layer in layers:
        out.append(f"// layer {comment_text(layer.spec.name)}: {layer.spec.op}\n")
        k = layer.kernels
        if layer.consts:
            cfg = f"C_{layer.cname}"
            threads = 32 * layer.consts["WARPS_M"] * layer.consts["WARPS_N"]
            out.append(_struct(cfg, layer.consts))
            pack = "pack_rows" if layer.spec.op == "gemm" else "pack_pixels"
            out.append(f'extern "C" __global__ void __launch_bounds__({PACK_THREADS}) {k["pack"]}(QcArgs a) '
                       f"{{ qc::{pack}<{cfg}>(a); }}\n")
            forms = [("", "qc::Codes")]
            if layer.packed is not None:
                out.append(_struct(f"O_{layer.cname}", layer.packed))
                forms.append(("_packed", f"O_{layer.cname}"))
            for suffix, form in forms:
                out.append(f'extern "C" __global__ void __launch_bounds__({threads}) {k["mma" + suffix]}(QcArgs a) '
                           f"{{ qc::bit_mma<{cfg}, {form}>(a); }}\n")
                out.append(f'extern "C" __global__ void __launch_bounds__({POPC_TILE[2]}) {k["popc" + suffix]}'
                           f"(QcArgs a) {{ qc::bit_popc<{cfg}, {form}>(a); }}\n")
        if layer.pool is not None:
            out.append(_struct(f"P_{layer.cname}", layer.pool))
            out.append(f'extern "C" __global__ void __launch_bounds__({PACK_THREADS}) {k["pool"]}(QcArgs a) '
                       f"{{ qc::max_pool<P_{layer.cname}>(a); }}\n")
        out.append("\n")
    return "".join(out)


def _pack_words(bits: np.ndarray) -> np.ndarray:
    """[..., 32*W] of 0/1 -> [..., W] little-endian uint32 (bit t of word w = element 32w + t)."""
    packed = np.packbits(bits.astype(np.uint8), axis=-1, bitorder="little")
    return packed.view("<u4")


def packed_weights(spec: LayerSpec, layer: GpuLayer) -> np.ndarray:
    """uint32 [G][NGP][BW][KWP]: per channel and plane the tap-major receptive field (each tap's channels padded
    to CGW words), zero past K and for the padding channels."""
    c = layer.consts
    if spec.op == "gemm":
        rows = spec.w.reshape(spec.N, 1, spec.K)                     # [N, taps=1, Cg=K]
    else:
        rows = spec.w.transpose(0, 2, 3, 1).reshape(spec.N, c["TAPS"], c["CG"])  # [N, taps, Cg]
    rows = np.pad(rows, ((0, 0), (0, 0), (0, c["CGW"] * 32 - c["CG"]))).reshape(spec.N, -1)
    rows = np.pad(rows, ((0, 0), (0, c["KWP"] * 32 - rows.shape[1])))
    planes = np.stack([(rows >> j) & 1 for j in range(spec.bits_w)], axis=1)   # [N, BW, KWP*32]
    words = _pack_words(planes).reshape(c["G"], c["NG"], spec.bits_w, c["KWP"])
    out = np.zeros((c["G"], c["NGP"], spec.bits_w, c["KWP"]), np.uint32)
    out[:, : c["NG"]] = words
    return out


def tap_popcounts(spec: LayerSpec) -> np.ndarray:
    """xor mode: int32 [N, taps], the number of +1 weights of each channel at each tap."""
    if spec.op == "gemm":
        return spec.w.sum(axis=1, dtype=np.int32).reshape(spec.N, 1)
    return spec.w.sum(axis=1, dtype=np.int32).reshape(spec.N, -1)


def pack_constants(spec: LayerSpec, layer: GpuLayer) -> bytes:
    """The layer's blob; fills ``layer.blob`` with {array: [offset, bytes]}."""
    if spec.op == "maxpool":
        layer.blob = {}
        return b""
    arrays = {"w": packed_weights(spec, layer), "wz2": spec.wzero2.astype(np.int32)}
    if spec.epilogue == "float":
        arrays.update(mult=spec.mult.astype(np.float32), bias=spec.bias.astype(np.float32))
    if spec.epilogue == "threshold":
        arrays["thr"] = spec.thresholds.astype(np.int32)
    if spec.xor_mode:
        arrays["wtap"] = tap_popcounts(spec)
    if spec.in_thresholds is not None:
        arrays["in_thr"] = spec.in_thresholds.astype(np.float32)
    blob, layer.blob = bytearray(), {}
    for name, arr in arrays.items():
        blob += b"\0" * (round_up(len(blob), _ALIGN) - len(blob))
        data = np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<")).tobytes()
        layer.blob[name] = [len(blob), len(data)]
        blob += data
    return bytes(blob)
