"""Vitis HLS C++ of a streaming dataflow accelerator: one stage per fused layer (FINN's architecture).

A chain of LayerSpecs (qcompile.artifact.layer_specs with folded pools and input quantizers) becomes a list of
:class:`Stage` s joined by ``hls::stream`` s under ``#pragma HLS DATAFLOW``:

- ``quant``: the first layer's folded input quantizer (float lanes -> codes by its float thresholds);
- ``swg``: a conv's sliding-window generator (zero padding = code 0, as reference.bit_conv);
- ``mvau``: the matrix-vector-activation unit folded PE x SIMD: per cycle SIMD synapses of PE neurons, XNOR/AND
  popcount for 1-bit operands, bit-plane (bit-serial) sums for 2-8 bits, then the threshold epilogue (codes), the
  float epilogue (``float(acc) * mult + bias``, two float32 operations like the CPU kernel) or the accumulator;
- ``pool``: a folded max pool on codes (window = strides), ``swg`` + ``wmax`` for a general MaxPoolCodes;
- ``dwc``: a lane width converter where one stage's output lanes differ from the next one's input lanes.

Values flow in raster order with channels innermost (NHWC); a Gemm after a conv has its weight columns permuted from
the ONNX (C, H, W) flatten order to that stream order. Weights, thresholds and epilogue constants are ROM arrays.
"""

from __future__ import annotations

import math
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from qcompile import reference as ref
from qcompile.errors import ConfigError, QuantizationError
from qcompile.packing import conv_weight_rows

__all__ = ["Stage", "HlsDesign", "build_design", "write_sources", "reference_chain", "to_stream", "stream_words",
           "TEMPLATES", "check_folding"]

TEMPLATES = Path(__file__).parent / "templates" / "hls"
HEADER = "qc_hls.h"


def _ident(index: int, name: str) -> str:
    return f"L{index}_" + re.sub(r"[^0-9A-Za-z_]", "_", name)[:40]


def _comment(name: str) -> str:
    return re.sub(r"[^\x20-\x7e]", "?", name).replace("*/", "*_/")[:120]


@dataclass
class Stage:
    """One dataflow process: ``words_in`` words of ``in_lanes`` x ``in_bits`` in, ``words_out`` out, per frame."""

    kind: str  # quant, swg, mvau, pool, wmax, dwc
    name: str  # C function name
    layer: str  # the LayerSpec it belongs to (dwc: the consumer's)
    in_lanes: int
    in_bits: int
    out_lanes: int
    out_bits: int
    words_in: int
    words_out: int
    params: dict = field(default_factory=dict)

    @property
    def cycles(self) -> int:
        """Cycles per frame in steady state (the MVAU reads its buffered vector NF times)."""
        if self.kind == "mvau":
            return self.params["ROWS"] * self.params["NF"] * self.params["SF"]
        if self.kind == "dwc":
            return self.params["TOTAL"] // self.params["CHUNK"]
        return max(self.words_in, self.words_out)


@dataclass
class HlsDesign:
    stages: list
    specs: list
    foldings: dict
    in_float: bool  # the first stage reads float32 lanes (IEEE bit patterns)
    out_kind: str  # "codes", "int32" or "float32"
    in_elems: int
    out_elems: int
    in_shape: tuple  # per frame, ONNX order (C, H, W) or (K,)
    out_shape: tuple

    @property
    def first(self) -> Stage:
        return self.stages[0]

    @property
    def last(self) -> Stage:
        return self.stages[-1]


# ---- the chain ---------------------------------------------------------------------------------------------------

def check_folding(spec, pe: int, simd: int) -> None:
    """PE must divide N, SIMD must divide K (conv: the input channels, so a SIMD word never spans two taps)."""
    where = f"layer {spec.name!r}"
    k_div = spec.in_shape[0] if spec.op == "conv" else spec.K
    what = "its input channels" if spec.op == "conv" else "K"
    if pe < 1 or simd < 1 or spec.N % pe or k_div % simd:
        raise ConfigError(f"{where}: folding PE={pe} x SIMD={simd} does not divide the layer (N={spec.N}, "
                          f"{what}={k_div}); PE must divide N and SIMD must divide {what}")


def _supported(spec) -> None:
    where = f"layer {spec.name!r}"
    if spec.op == "conv" and spec.group != 1:
        raise QuantizationError(f"{where}: the fpga target takes group-1 convs (group={spec.group}); keep it in float")
    if spec.op == "conv" and spec.xor_mode and any(spec.pads):
        raise QuantizationError(f"{where}: an xor-mode conv with padding has no fpga form (a padded tap is 0, not -1)")
    if "lead_shape" in spec.extra:
        raise QuantizationError(f"{where}: a BitGemm over a sequence has no fpga form (one vector per frame)")


def _in_elems(spec) -> int:
    return int(np.prod(spec.in_shape))


def _stream_bits(specs, i: int) -> int:
    """Bits of the codes a threshold layer ``i`` writes into the stream: its consumer's bits_a (maxpools pass)."""
    need = max(1, specs[i].L.bit_length())
    for s in specs[i + 1:]:
        if s.op != "maxpool":
            if s.bits_a < need:
                raise QuantizationError(f"layer {s.name!r}: reads {need}-bit codes from {specs[i].name!r} "
                                        f"but has bits_a={s.bits_a}")
            return s.bits_a
    return need


def _gemm_weights(spec, prev_shape) -> np.ndarray:
    """Gemm weight codes [N, K] with columns in stream order: after a conv, (h, w, c) instead of (c, h, w)."""
    if len(prev_shape) == 3:
        c, h, w = prev_shape
        return spec.w.reshape(spec.N, c, h, w).transpose(0, 2, 3, 1).reshape(spec.N, spec.K)
    return spec.w


def _acc_width(spec, w_rows: np.ndarray) -> tuple[int, int]:
    """(accumulator bits, largest |acc|): holds every partial sum of dot_and/dot_xor, and the thresholds clipped."""
    pmax, k = (1 << spec.bits_a) - 1, w_rows.shape[1]
    if spec.xor_mode:
        return (k + 1).bit_length() + 1, k
    acc_max = int(np.abs(ref.weight_values(w_rows, spec.wzero2)).sum(axis=1).max()) * pmax
    partial = 2 * k * pmax * ((1 << spec.bits_w) - 1) + int(np.abs(spec.wzero2).max()) * k * pmax
    return max(acc_max + 1, partial).bit_length() + 1, acc_max


def build_design(specs, foldings: dict) -> HlsDesign:
    """Plan the stages of a chain of specs (each reads the previous one's output) folded as ``foldings``
    {name: (pe, simd)}."""
    if not specs:
        raise QuantizationError("the fpga target found no quantized (BitGemm/BitConv) layer to put on the device")
    stages: list[Stage] = []
    prev_shape, prev_lanes, prev_bits = None, None, None
    for i, spec in enumerate(specs):
        _supported(spec)
        where = f"layer {spec.name!r}"
        if i and spec.in_thresholds is not None:
            raise QuantizationError(f"{where}: only the first layer of the fpga chain may take float input")
        if i and _in_elems(spec) != int(np.prod(prev_shape)):
            raise QuantizationError(f"{where}: reads {spec.in_shape} but the layer before writes {prev_shape}; "
                                    "the fpga target takes one chain of layers")
        if i and specs[i - 1].op != "maxpool" and specs[i - 1].epilogue != "threshold":
            raise QuantizationError(f"layer {specs[i - 1].name!r}: its {specs[i - 1].epilogue} output feeds "
                                    f"{spec.name!r}; inside the fpga chain layers pass codes (threshold epilogue)")
        ident = _ident(i, spec.name)
        if spec.op == "maxpool":
            lanes = prev_lanes or foldings.get(spec.name, (1, 1))[0]
            bits = prev_bits or spec.bits_a
            c, h, w = spec.in_shape
            if c % lanes:
                raise ConfigError(f"{where}: {lanes} lanes do not divide its {c} channels")
            cf = c // lanes
            (kh, kw), (sh, sw), (dh, dw) = spec.kernel, spec.strides, spec.dilations
            ho, wo = spec.out_shape[1:]
            if (kh, kw) == (sh, sw) and (dh, dw) == (1, 1):
                stages.append(Stage("pool", ident + "_pool", spec.name, lanes, bits, lanes, bits, h * w * cf,
                                    ho * wo * cf, dict(CF=cf, H=h, W=w, PH=kh, PW=kw)))
            else:
                geo = dict(CF=cf, H=h, W=w, KH=kh, KW=kw, SH=sh, SW=sw, PT=0, PL=0, DH=dh, DW=dw, HO=ho, WO=wo)
                stages.append(Stage("swg", ident + "_swg", spec.name, lanes, bits, lanes, bits, h * w * cf,
                                    ho * wo * kh * kw * cf, geo))
                stages.append(Stage("wmax", ident + "_max", spec.name, lanes, bits, lanes, bits,
                                    ho * wo * kh * kw * cf, ho * wo * cf, dict(CF=cf, PIXELS=ho * wo, TAPS=kh * kw)))
            prev_shape, prev_lanes, prev_bits = spec.out_shape, lanes, bits
            continue
        if spec.name not in foldings:
            raise ConfigError(f"{where}: no folding given (PE, SIMD)")
        pe, simd = (int(v) for v in foldings[spec.name])
        check_folding(spec, pe, simd)
        if spec.in_thresholds is not None:
            stages.append(Stage("quant", ident + "_quant", spec.name, simd, 32, simd, spec.bits_a,
                                _in_elems(spec) // simd, _in_elems(spec) // simd,
                                dict(L=spec.in_thresholds.size, T=spec.in_thresholds)))
        elif prev_lanes is not None and prev_lanes != simd:
            total = _in_elems(spec)
            stages.append(Stage("dwc", ident + "_dwc", spec.name, prev_lanes, spec.bits_a, simd, spec.bits_a,
                                total // prev_lanes, total // simd,
                                dict(TOTAL=total, CHUNK=math.gcd(prev_lanes, simd))))
        if spec.op == "conv":
            c, h, w = spec.in_shape
            cf = c // simd
            (kh, kw), (sh, sw), (dh, dw) = spec.kernel, spec.strides, spec.dilations
            ho, wo = spec.out_hw
            geo = dict(CF=cf, H=h, W=w, KH=kh, KW=kw, SH=sh, SW=sw, PT=spec.pads[0], PL=spec.pads[1], DH=dh, DW=dw,
                       HO=ho, WO=wo)
            stages.append(Stage("swg", ident + "_swg", spec.name, simd, spec.bits_a, simd, spec.bits_a,
                                h * w * cf, ho * wo * kh * kw * cf, geo))
            w_rows, rows = conv_weight_rows(spec.w), ho * wo
        else:
            w_rows, rows = _gemm_weights(spec, prev_shape or spec.in_shape), 1
        acc_w, acc_max = _acc_width(spec, w_rows)
        nf, sf = spec.N // pe, spec.K // simd
        if spec.epilogue == "threshold":
            out_bits, out_kind = _stream_bits(specs, i), "codes"
        else:
            out_bits, out_kind = 32, {"float": "float32", "none": "int32"}[spec.epilogue]
        stages.append(Stage("mvau", ident, spec.name, simd, spec.bits_a, pe, out_bits, rows * sf, rows * nf,
                            dict(K=spec.K, N=spec.N, PE=pe, SIMD=simd, NF=nf, SF=sf, ROWS=rows, BA=spec.bits_a,
                                 BW=spec.bits_w, ACC_W=acc_w, ACC_MAX=acc_max, XOR=spec.xor_mode, W_ROWS=w_rows,
                                 EPI=spec.epilogue, OUT_KIND=out_kind)))
        if spec.pool is not None:
            ho, wo = spec.out_hw
            ph, pw = spec.pool
            stages.append(Stage("pool", ident + "_pool", spec.name, pe, out_bits, pe, out_bits, ho * wo * nf,
                                (ho // ph) * (wo // pw) * nf, dict(CF=nf, H=ho, W=wo, PH=ph, PW=pw)))
        prev_shape, prev_lanes, prev_bits = spec.out_shape, pe, out_bits
    last = specs[-1]
    last_mvau = next(s for s in reversed(stages) if s.kind == "mvau") if any(s.kind == "mvau" for s in stages) else None
    out_kind = "codes" if last.op == "maxpool" or last_mvau is None else last_mvau.params["OUT_KIND"]
    return HlsDesign(stages, list(specs), dict(foldings), specs[0].in_thresholds is not None, out_kind,
                     _in_elems(specs[0]), int(np.prod(last.out_shape)), tuple(specs[0].in_shape),
                     tuple(last.out_shape))


# ---- the numpy reference of the whole chain, in stream order --------------------------------------------------------

def reference_chain(specs, x: np.ndarray) -> np.ndarray:
    """qcompile.reference applied layer by layer: x [frames, *in_shape] (codes, or float32 for a folded input
    quantizer) -> the last layer's output [frames, *out_shape] in ONNX order (NCHW / NC)."""
    v = np.asarray(x)
    for spec in specs:
        if spec.in_thresholds is not None:
            v = (v[..., None] >= spec.in_thresholds).sum(-1).astype(np.uint8)
        if spec.op == "maxpool":
            v = ref.max_pool_codes(v.astype(np.uint8), spec.kernel, spec.strides, spec.dilations)
            continue
        if spec.op == "gemm":
            v = v.reshape(v.shape[0], -1)
            acc = ref.bit_gemm_xor(v, spec.w) if spec.xor_mode else ref.bit_gemm(v, spec.w, spec.wzero2)
        else:
            v = v.reshape(v.shape[0], *spec.in_shape)
            geo = (spec.strides, spec.pads, spec.dilations, spec.group)
            acc = ref.bit_conv_xor(v, spec.w, *geo) if spec.xor_mode else ref.bit_conv(v, spec.w, spec.wzero2, *geo)
        if spec.epilogue == "threshold":
            v = ref.epilogue_threshold(acc, spec.thresholds)
            if spec.pool is not None:
                v = ref.max_pool_codes(v, spec.pool, spec.pool)
        elif spec.epilogue == "float":
            v = ref.epilogue_float(acc, spec.mult, spec.bias)
        else:
            v = acc
    return v


def to_stream(values: np.ndarray) -> np.ndarray:
    """[frames, C, H, W] or [frames, K] -> [frames, elements] in stream order (channels innermost) as uint32 words
    (codes as they are, int32 two's complement, float32 IEEE bits)."""
    v = np.asarray(values)
    if v.ndim == 4:
        v = v.transpose(0, 2, 3, 1)
    v = np.ascontiguousarray(v.reshape(v.shape[0], -1))
    if v.dtype == np.float32:
        return v.view(np.uint32)
    return v.astype(np.int64).astype(np.uint32) if v.dtype.kind == "i" else v.astype(np.uint32)


def stream_words(elements: np.ndarray, lanes: int, bits: int) -> list[int]:
    """Elements of one frame (uint32) -> stream words of ``lanes`` x ``bits`` (lane 0 in the low bits)."""
    mask = (1 << bits) - 1
    e = [int(v) & mask for v in elements.tolist()]
    return [sum(e[i + j] << (j * bits) for j in range(lanes)) for i in range(0, len(e), lanes)]


# ---- C++ ---------------------------------------------------------------------------------------------------------

def _word(bits: int) -> str:
    return f"ap_uint<{bits}>"


def _hex_init(value: int, width: int) -> str:
    if width <= 64:
        return f"0x{value:x}ULL"
    return f'{_word(width)}("{value:x}", 16)'


def _rows_text(items: list[str], per_line: int = 8, indent: str = "    ") -> str:
    return ",\n".join(indent + ", ".join(items[i:i + per_line]) for i in range(0, len(items), per_line))


def _f32_bits(values: np.ndarray) -> list[str]:
    return [f"0x{int(b):08x}u" for b in np.asarray(values, np.float32).reshape(-1).view(np.uint32)]


def _mvau_roms(st: Stage, spec) -> tuple[str, list[str]]:
    """ROM definitions (C++) and the pragmas that partition them by PE."""
    p = st.params
    pe, simd, nf, sf, bw = p["PE"], p["SIMD"], p["NF"], p["SF"], p["BW"]
    w = p["W_ROWS"].astype(np.uint64)  # [N, K]
    width = simd * bw
    tiles = w.reshape(nf, pe, sf, simd)  # [nf, pe, sf, simd]
    lane_weight = (np.uint64(1) << np.arange(simd, dtype=np.uint64))  # only used when simd <= 64
    words = np.zeros((pe, nf * sf), dtype=object)
    for j in range(bw):
        plane = (tiles >> np.uint64(j)) & np.uint64(1)
        if simd <= 64:
            packed = (plane * lane_weight).sum(axis=-1, dtype=np.uint64)  # [nf, pe, sf]
            vals = packed.astype(object)
        else:
            vals = np.zeros((nf, pe, sf), dtype=object)
            for i in range(simd):
                vals = vals + (plane[..., i].astype(object) << i)
        words = words + (vals.transpose(1, 0, 2).reshape(pe, nf * sf) << (j * simd))
    n = st.name
    out = [f"// {_comment(spec.name)}: weight codes, {bw} bit plane(s) of SIMD={simd} synapses per word, "
           f"word nf*SF + sf of PE pe = row nf*PE + pe",
           f"static const {_word(width)} {n}_W[{pe}][{nf * sf}] = {{"]
    out.append(",\n".join("  {\n" + _rows_text([_hex_init(int(v), width) for v in row]) + "\n  }" for row in words))
    out.append("};")
    pragmas = [f"#pragma HLS ARRAY_PARTITION variable={n}_W complete dim=1"]
    acc_w, acc_max = p["ACC_W"], p["ACC_MAX"]
    if not spec.xor_mode:
        z = spec.wzero2.reshape(nf, pe).T
        out.append(f"static const ap_int<8> {n}_Z[{pe}][{nf}] = {{\n" +
                   ",\n".join("  {" + ", ".join(str(int(v)) for v in row) + "}" for row in z) + "\n};")
        pragmas.append(f"#pragma HLS ARRAY_PARTITION variable={n}_Z complete dim=1")
    if spec.epilogue == "threshold":
        t = np.clip(spec.thresholds.astype(np.int64), -acc_max - 1, acc_max + 1)  # no comparison changes
        t = t.reshape(nf, pe, -1).transpose(1, 0, 2)
        out.append(f"static const ap_int<{acc_w}> {n}_T[{pe}][{nf}][{t.shape[2]}] = {{\n" + ",\n".join(
            "  {" + ", ".join("{" + ", ".join(str(int(v)) for v in cell) + "}" for cell in row) + "}" for row in t)
            + "\n};")
        pragmas += [f"#pragma HLS ARRAY_PARTITION variable={n}_T complete dim=1",
                    f"#pragma HLS ARRAY_PARTITION variable={n}_T complete dim=3"]
    elif spec.epilogue == "float":
        for key, arr in (("M", spec.mult), ("B", spec.bias)):
            vals = np.asarray(arr, np.float32).reshape(nf, pe).T
            out.append(f"static const ap_uint<32> {n}_{key}[{pe}][{nf}] = {{\n" + ",\n".join(
                "  {" + ", ".join(_f32_bits(row)) + "}" for row in vals) + "\n};")
            pragmas.append(f"#pragma HLS ARRAY_PARTITION variable={n}_{key} complete dim=1")
    return "\n".join(out) + "\n", pragmas


def _mvau_function(st: Stage, spec, pragmas: list[str]) -> str:
    p = st.params
    pe, simd, nf, sf, acc, ob = p["PE"], p["SIMD"], p["NF"], p["SF"], p["ACC_W"], st.out_bits
    n, iw, ow = st.name, simd * p["BA"], pe * ob
    if spec.xor_mode:
        dot = f"qc::dot_xor<{simd}, {acc}>(x, {n}_W[pe][nf * {sf} + sf])"
        form = "xor (bipolar) popcount"
    else:
        dot = (f"qc::dot_and<{simd}, {p['BA']}, {p['BW']}, {acc}>(x, {n}_W[pe][nf * {sf} + sf], "
               f"ap_int<{acc}>({n}_Z[pe][nf]))")
        form = "XNOR/AND popcount" if p["BA"] == p["BW"] == 1 else f"bit-serial over {p['BA']}x{p['BW']} bit planes"
    lane = f"o.range(pe * {ob} + {ob - 1}, pe * {ob})"
    if spec.epilogue == "threshold":
        epi = (f"            ap_uint<{ob}> code = 0;\n"
               f"            for (int j = 0; j < {spec.L}; j++) {{\n#pragma HLS UNROLL\n"
               f"                code += a >= {n}_T[pe][nf][j] ? 1 : 0;\n            }}\n"
               f"            {lane} = code;\n")
    elif spec.epilogue == "float":  # a float32 multiply, then a separate float32 add: the CPU kernel's order
        epi = (f"            float y = float(a.to_int()) * qc::bits_float({n}_M[pe][nf]);\n"
               f"            y = y + qc::bits_float({n}_B[pe][nf]);\n"
               f"            {lane} = qc::float_bits(y);\n")
    else:
        epi = f"            {lane} = ap_uint<32>((unsigned)a.to_int());\n"
    prag = "\n".join(pragmas)
    return f"""// {_comment(spec.name)}: MVAU K={p['K']} N={p['N']} PE={pe} SIMD={simd} W{p['BW']}A{p['BA']}, {form},
// {spec.epilogue} epilogue; {p['ROWS']} vector(s) per frame, NF={nf} x SF={sf} cycles each
static void {n}(hls::stream<{_word(iw)} > &in, hls::stream<{_word(ow)} > &out) {{
{prag}
    {_word(iw)} vec[{sf}];
    ap_int<{acc}> acc[{pe}];
#pragma HLS ARRAY_PARTITION variable=acc complete
    int nf = 0, sf = 0;
    for (int i = 0; i < {p['ROWS'] * nf * sf}; i++) {{
#pragma HLS PIPELINE II=1
        {_word(iw)} x;
        if (nf == 0) {{  // the first neuron fold reads the stream, later folds re-read the buffered vector
            x = in.read();
            vec[sf] = x;
        }} else {{
            x = vec[sf];
        }}
        {_word(ow)} o = 0;
        for (int pe = 0; pe < {pe}; pe++) {{
#pragma HLS UNROLL
            ap_int<{acc}> a = (sf == 0 ? ap_int<{acc}>(0) : acc[pe]) + {dot};
            acc[pe] = a;
{epi}        }}
        if (sf == {sf - 1}) out.write(o);
        if (++sf == {sf}) {{
            sf = 0;
            if (++nf == {nf}) nf = 0;
        }}
    }}
}}
"""


def _stage_call(st: Stage, src: str, dst: str) -> str:
    p = st.params
    lb = f"{st.in_lanes}, {st.in_bits}"
    if st.kind == "mvau":
        return f"    {st.name}({src}, {dst});"
    if st.kind == "quant":
        return (f"    qc::quantize_input<{st.in_lanes}, {st.out_bits}, {st.words_in}, {p['L']}>({src}, {dst}, "
                f"{st.name}_T);")
    if st.kind == "swg":
        g = ", ".join(str(p[k]) for k in ("CF", "H", "W", "KH", "KW", "SH", "SW", "PT", "PL", "DH", "DW", "HO", "WO"))
        return f"    qc::swg<{lb}, {g}>({src}, {dst});"
    if st.kind == "pool":
        return f"    qc::pool_stream<{lb}, {p['CF']}, {p['H']}, {p['W']}, {p['PH']}, {p['PW']}>({src}, {dst});"
    if st.kind == "wmax":
        return f"    qc::window_max<{lb}, {p['CF']}, {p['PIXELS']}, {p['TAPS']}>({src}, {dst});"
    if st.kind == "dwc":
        return (f"    qc::dwc<{st.in_lanes}, {st.out_lanes}, {st.in_bits}, {p['TOTAL']}, {p['CHUNK']}>"
                f"({src}, {dst});")
    raise ValueError(st.kind)


def _in_word_bits(st: Stage) -> int:
    return st.in_lanes * st.in_bits


def _out_word_bits(st: Stage) -> int:
    return st.out_lanes * st.out_bits


def write_sources(design: HlsDesign, out_dir, *, top: str = "qc_top") -> list[str]:
    """qc_hls.h, qc_params.h (ROMs), qc_top.h and qc_top.cpp (stages + DATAFLOW top) into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(TEMPLATES / HEADER, out / HEADER)
    spec_of = {s.name: s for s in design.specs}
    roms, funcs = [], []
    for st in design.stages:
        spec = spec_of[st.layer]
        if st.kind == "mvau":
            text, pragmas = _mvau_roms(st, spec)
            roms.append(text)
            funcs.append(_mvau_function(st, spec, pragmas))
        elif st.kind == "quant":
            roms.append(f"// {_comment(spec.name)}: input quantizer thresholds (float32 bit patterns)\n"
                        f"static const ap_uint<32> {st.name}_T[{st.params['L']}] = {{"
                        + ", ".join(_f32_bits(st.params["T"])) + "};\n")
    first, last = design.first, design.last
    in_w, out_w = _in_word_bits(first), _out_word_bits(last)
    guard = "QC_TOP_H"
    in_what = "float32 bit patterns" if design.in_float else f"{first.in_bits}-bit codes"
    widest = max(max(_in_word_bits(st), _out_word_bits(st), st.params.get("SIMD", 0) * st.params.get("BW", 0))
                 for st in design.stages)
    if widest > 32768:
        raise ConfigError(f"a stream or weight word of {widest} bits exceeds ap_uint's 32768; choose a smaller SIMD/PE")
    max_w = "" if widest <= 1024 else (f"#ifndef AP_INT_MAX_W\n#define AP_INT_MAX_W {-(-widest // 1024) * 1024}"
                                       "  // words wider than 1024 bits\n#endif\n")
    (out / "qc_params.h").write_text("// generated by qcompile (targets/fpga/hls.py): weight, threshold and epilogue "
                                     "ROMs\n#ifndef QC_PARAMS_H\n#define QC_PARAMS_H\n#include \"qc_hls.h\"\n\n"
                                     + "\n".join(roms) + "\n#endif\n")
    (out / "qc_top.h").write_text(f"""// generated by qcompile (targets/fpga/hls.py): the accelerator's stream interface
#ifndef {guard}
#define {guard}
{max_w}#include "qc_hls.h"

// per frame: {design.in_elems} input values ({in_what}, shape {design.in_shape} channels innermost)
// in {first.words_in} words of {first.in_lanes} lanes;
// {design.out_elems} output values ({design.out_kind}, shape {design.out_shape}) in {last.words_out} words of \
{last.out_lanes} lanes
#define QC_IN_LANES {first.in_lanes}
#define QC_IN_BITS {first.in_bits}
#define QC_IN_WORDS {first.words_in}
#define QC_OUT_LANES {last.out_lanes}
#define QC_OUT_BITS {last.out_bits}
#define QC_OUT_WORDS {last.words_out}
typedef ap_uint<{in_w}> qc_in_t;
typedef ap_uint<{out_w}> qc_out_t;

void {top}(hls::stream<qc_in_t> &in, hls::stream<qc_out_t> &out);

#endif
""")
    body, decls = [], []
    src = "in"
    for i, st in enumerate(design.stages):
        dst = "out" if i == len(design.stages) - 1 else f"s{i}"
        if dst != "out":
            depth = max(2, min(1024, st.words_out // max(1, st.params.get("ROWS", 1)) + 2))
            decls.append(f"    hls::stream<{_word(_out_word_bits(st))} > {dst}(\"{dst}\");\n"
                         f"#pragma HLS STREAM variable={dst} depth={depth}")
        body.append(_stage_call(st, src, dst))
        src = dst
    (out / "qc_top.cpp").write_text(f"""// generated by qcompile (targets/fpga/hls.py): a streaming dataflow
// accelerator, one stage per layer
// stages: {' -> '.join(f'{s.kind}({_comment(s.layer)})' for s in design.stages)}
#include "qc_top.h"
#include "qc_params.h"

{chr(10).join(funcs)}
// One call processes one frame; under DATAFLOW the stages run concurrently, each at II=1.
void {top}(hls::stream<qc_in_t> &in, hls::stream<qc_out_t> &out) {{
#pragma HLS INTERFACE axis port=in
#pragma HLS INTERFACE axis port=out
#pragma HLS INTERFACE ap_ctrl_none port=return
#pragma HLS DATAFLOW
{chr(10).join(decls)}
{chr(10).join(body)}
}}
""")
    return [HEADER, "qc_params.h", "qc_top.h", "qc_top.cpp"]
