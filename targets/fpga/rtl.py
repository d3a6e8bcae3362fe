"""RTL of the bit layers: one parameterised SystemVerilog MVAU (templates/rtl/qc_mvau.sv) per LayerSpec, its
weights / thresholds / wzero2 as ``$readmemh`` ROM files, lane width converters between layers, and the tools that
check it: Verilator (cycle-accurate simulation, lint) and yosys (``synth_xilinx`` LUT / FF counts).

The MVAU keeps docs/ops.md's integer contract for 1-bit weights and 1..8-bit activation codes (AND form with
wzero2, or the bipolar XOR form); the threshold epilogue gives codes, the others give the accumulator (a float
epilogue runs downstream). A conv layer is an MVAU over its im2col rows (tap-major, packing.conv_weight_rows);
the sliding-window generator is the HLS side's.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from qcompile.errors import QuantizationError, ToolchainError
from qcompile.packing import conv_weight_rows
from qcompile.reference import weight_values

__all__ = ["LayerRTL", "ProjectRTL", "layer_rtl", "emit_layer_rtl", "emit_project_rtl", "input_beats", "im2col_rows",
           "output_values", "verilator_build", "verilator_run", "verilator_lint", "yosys_stat", "TEMPLATES"]

TEMPLATES = Path(__file__).parent / "templates" / "rtl"
MVAU_SOURCE, DWC_SOURCE, FIFO_SOURCE, HARNESS_SOURCE = "qc_mvau.sv", "qc_dwc.sv", "qc_fifo.sv", "harness.cpp"


@dataclass
class LayerRTL:
    """One layer as an MVAU: its parameters, the ROM contents ($readmemh lines) and its stream geometry."""

    name: str
    module: str
    params: dict
    roms: dict = field(default_factory=dict)  # parameter (W_FILE, T_FILE, Z_FILE) -> list of hex lines
    rows: int = 1  # input vectors per frame (conv output pixels)

    @property
    def in_lanes(self) -> int:
        return self.params["SIMD"]

    @property
    def in_bits(self) -> int:
        return self.params["BITS_A"]

    @property
    def out_lanes(self) -> int:
        return self.params["PE"]

    @property
    def out_bits(self) -> int:
        return self.params["OUT_W"]

    @property
    def signed_out(self) -> bool:
        return self.params["L"] == 0


@dataclass
class ProjectRTL:
    top: str
    layers: list
    sources: list  # .sv file names in the order to compile, inside the project folder

    @property
    def first(self) -> LayerRTL:
        return self.layers[0]

    @property
    def last(self) -> LayerRTL:
        return self.layers[-1]


def _module_name(index: int, name: str) -> str:
    return f"qc_L{index}_" + re.sub(r"[^0-9A-Za-z_]", "_", name)[:48]


def _hex_lines(words: list[int], width: int) -> list[str]:
    digits = max(1, (width + 3) // 4)
    return [format(w, f"0{digits}x") for w in words]


def _pack(values: np.ndarray, width: int) -> int:
    """Little-endian lanes of ``width`` bits (two's complement) -> one integer."""
    word = 0
    for i, v in enumerate(values.tolist()):
        word |= (int(v) & ((1 << width) - 1)) << (i * width)
    return word


def need_z(spec) -> int:
    """Bits of the signed wzero2 field."""
    return int(np.abs(spec.wzero2).max()).bit_length() + 1


def layer_rtl(spec, pe: int, simd: int, index: int = 0, *, acc_w: int | None = None,
              z_w: int | None = None) -> LayerRTL:
    """MVAU parameters and ROM contents of a BitGemm/BitConv LayerSpec folded as ``pe`` x ``simd``.

    ``acc_w`` / ``z_w``: wider accumulator / wzero2 fields than this layer needs (one build for many layers)."""
    where = f"layer {spec.name!r}"
    if spec.op not in ("gemm", "conv"):
        raise QuantizationError(f"{where}: the RTL MVAU takes gemm and conv layers, not {spec.op}")
    if spec.bits_w != 1:
        raise QuantizationError(f"{where}: the RTL MVAU is binary (1-bit weights), this layer has bits_w={spec.bits_w}; "
                                "use the HLS target for it")
    if spec.in_thresholds is not None:
        raise QuantizationError(f"{where}: a float input (folded input quantizer) has no RTL form; quantize it upstream")
    if spec.op == "conv" and (spec.group != 1 or (spec.xor_mode and any(spec.pads))):
        raise QuantizationError(f"{where}: the RTL MVAU takes group-1 convs (and xor mode only without padding)")
    if spec.pool is not None:
        raise QuantizationError(f"{where}: a folded max pool has no RTL form; emit the spec without pool")
    w = spec.w if spec.op == "gemm" else conv_weight_rows(spec.w)
    n, k = w.shape
    if pe < 1 or simd < 1 or n % pe:
        raise QuantizationError(f"{where}: PE={pe} must divide its {n} output channels and SIMD={simd} must be >= 1")
    rows = 1 if spec.op == "gemm" else spec.out_hw[0] * spec.out_hw[1]
    nf, sf = n // pe, -(-k // simd)
    pmax = (1 << spec.bits_a) - 1
    if spec.xor_mode:
        acc_max, z_w_needed = k, 1
    else:
        acc_max = int(np.abs(weight_values(w, spec.wzero2)).sum(axis=1).max()) * pmax
        z_w_needed = need_z(spec)
    need_acc = (acc_max + 1).bit_length() + 1  # signed, holds [-(acc_max+1), acc_max+1]
    if (acc_w or need_acc) < need_acc or (z_w or z_w_needed) < z_w_needed:
        raise QuantizationError(f"{where}: needs ACC_W >= {need_acc} and Z_W >= {z_w_needed}")
    acc_w, z_w = acc_w or need_acc, z_w or z_w_needed
    n_thr = spec.thresholds.shape[1] if spec.epilogue == "threshold" else 0
    params = {"K": k, "N": n, "PE": pe, "SIMD": simd, "BITS_A": spec.bits_a, "XOR_MODE": int(spec.xor_mode),
              "L": n_thr, "ACC_W": acc_w, "Z_W": z_w,
              "OUT_W": max(1, n_thr.bit_length()) if n_thr else acc_w}
    # weights: word nf*SF + sf holds lane pe*SIMD + i = w[nf*PE + pe, sf*SIMD + i] (zero past K)
    wpad = np.zeros((n, sf * simd), np.uint8)
    wpad[:, :k] = w
    tiles = wpad.reshape(nf, pe, sf, simd).transpose(0, 2, 1, 3).reshape(nf * sf, pe * simd)
    roms = {"W_FILE": _hex_lines([_pack(t, 1) for t in tiles], pe * simd)}
    if n_thr:
        # clipped to the accumulator's range: the comparisons are unchanged for every reachable acc
        t = np.clip(spec.thresholds.astype(np.int64), -acc_max, acc_max + 1).reshape(nf, pe * n_thr)
        roms["T_FILE"] = _hex_lines([_pack(r, acc_w) for r in t], pe * n_thr * acc_w)
    if not spec.xor_mode:
        roms["Z_FILE"] = _hex_lines([_pack(r, z_w) for r in spec.wzero2.reshape(nf, pe)], pe * z_w)
    return LayerRTL(spec.name, _module_name(index, spec.name), params, roms, rows)


def _rom_file(layer: LayerRTL, key: str) -> str:
    return f"{layer.module}_{ {'W_FILE': 'weights', 'T_FILE': 'thresholds', 'Z_FILE': 'wzero2'}[key]}.mem"


def _wrapper(layer: LayerRTL) -> str:
    p = layer.params
    plist = [f"        .{k}({v})" for k, v in p.items()]
    plist += [f'        .{key}("{_rom_file(layer, key)}")' for key in layer.roms]
    return f"""// {layer.name}: generated by qcompile (targets/fpga/rtl.py); ROMs in {layer.module}_*.mem
module {layer.module} (
    input  logic clk,
    input  logic rst_n,
    input  logic [{p['SIMD'] * p['BITS_A'] - 1}:0] in_tdata,
    input  logic in_tvalid,
    output logic in_tready,
    output logic [{p['PE'] * p['OUT_W'] - 1}:0] out_tdata,
    output logic out_tvalid,
    input  logic out_tready
);
    qc_mvau #(
{(',' + chr(10)).join(plist)}
    ) u_mvau (.clk(clk), .rst_n(rst_n), .in_tdata(in_tdata), .in_tvalid(in_tvalid), .in_tready(in_tready),
              .out_tdata(out_tdata), .out_tvalid(out_tvalid), .out_tready(out_tready));
endmodule
"""


def _write_layer(layer: LayerRTL, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(TEMPLATES / MVAU_SOURCE, out / MVAU_SOURCE)
    for key, lines in layer.roms.items():
        (out / _rom_file(layer, key)).write_text("\n".join(lines) + "\n")
    (out / f"{layer.module}.sv").write_text(_wrapper(layer))


def emit_layer_rtl(spec, pe: int, simd: int, out_dir, index: int = 0) -> LayerRTL:
    """Write ``qc_mvau.sv``, the layer's wrapper module ``<module>.sv`` and its ROM files into ``out_dir``."""
    layer = layer_rtl(spec, pe, simd, index)
    _write_layer(layer, Path(out_dir))
    return layer


def emit_project_rtl(specs, foldings: dict, out_dir) -> ProjectRTL:
    """A chain of MVAUs (``foldings``: {layer name: (pe, simd)}) as module ``qc_top`` in ``out_dir/qc_top.sv``.

    Consecutive layers are joined through a ``qc_dwc`` width converter when their lanes differ, then a ``qc_fifo``
    that holds one input vector of the next layer (so the chain runs at its slowest layer's rate).
    """
    out = Path(out_dir)
    layers = []
    for i, spec in enumerate(specs):
        if spec.name not in foldings:
            raise QuantizationError(f"layer {spec.name!r}: no (PE, SIMD) folding given for it")
        layers.append(emit_layer_rtl(spec, *foldings[spec.name], out, index=i))
    for a, b in zip(layers, layers[1:]):
        if a.params["L"] == 0 or a.params["OUT_W"] != b.params["BITS_A"] or a.params["N"] != b.params["K"] \
                or b.rows != 1 or a.rows != 1:
            raise QuantizationError(f"layer {b.name!r}: cannot follow {a.name!r} in one stream (needs {a.name!r}'s "
                                    f"{a.params['N']} threshold codes of {b.params['BITS_A']} bits, dense layers)")
    for source in (DWC_SOURCE, FIFO_SOURCE):
        shutil.copyfile(TEMPLATES / source, out / source)
    lines = ["// qc_top: the layers' MVAUs in one AXI stream, generated by qcompile (targets/fpga/rtl.py)",
             "module qc_top (",
             "    input  logic clk,", "    input  logic rst_n,",
             f"    input  logic [{layers[0].in_lanes * layers[0].in_bits - 1}:0] in_tdata,",
             "    input  logic in_tvalid,", "    output logic in_tready,",
             f"    output logic [{layers[-1].out_lanes * layers[-1].out_bits - 1}:0] out_tdata,",
             "    output logic out_tvalid,", "    input  logic out_tready", ");"]
    prev = "in"
    for i, layer in enumerate(layers):
        p = layer.params
        if i:  # the stream between layer i-1 and i
            a = layers[i - 1]
            mid = f"s{i}"
            lines += [f"    logic [{a.out_lanes * a.out_bits - 1}:0] {mid}_tdata;",
                      f"    logic {mid}_tvalid, {mid}_tready;"]
            lines += [f"    {a.module} u{i - 1} (.clk(clk), .rst_n(rst_n), .in_tdata({prev}_tdata), .in_tvalid({prev}_tvalid), "
                      f".in_tready({prev}_tready), .out_tdata({mid}_tdata), .out_tvalid({mid}_tvalid), "
                      f".out_tready({mid}_tready));"]
            prev = mid
            if a.out_lanes != layer.in_lanes:
                conv = f"c{i}"
                lines += [f"    logic [{layer.in_lanes * layer.in_bits - 1}:0] {conv}_tdata;",
                          f"    logic {conv}_tvalid, {conv}_tready;",
                          f"    qc_dwc #(.IN_LANES({a.out_lanes}), .OUT_LANES({layer.in_lanes}), .LW({p['BITS_A']}), "
                          f".VEC({p['K']})) w{i} (.clk(clk), .rst_n(rst_n), .in_tdata({prev}_tdata), .in_tvalid({prev}_tvalid), "
                          f".in_tready({prev}_tready), .out_tdata({conv}_tdata), .out_tvalid({conv}_tvalid), "
                          f".out_tready({conv}_tready));"]
                prev = conv
            # a whole vector of this layer's input fits: the producer runs on while this layer re-reads its buffer
            sf = -(-p["K"] // layer.in_lanes)
            depth = 1 << max(1, (sf + 1).bit_length())
            fifo = f"f{i}"
            lines += [f"    logic [{layer.in_lanes * layer.in_bits - 1}:0] {fifo}_tdata;",
                      f"    logic {fifo}_tvalid, {fifo}_tready;",
                      f"    qc_fifo #(.W({layer.in_lanes * layer.in_bits}), .DEPTH({depth})) q{i} (.clk(clk), "
                      f".rst_n(rst_n), .in_tdata({prev}_tdata), .in_tvalid({prev}_tvalid), .in_tready({prev}_tready), "
                      f".out_tdata({fifo}_tdata), .out_tvalid({fifo}_tvalid), .out_tready({fifo}_tready));"]
            prev = fifo
    last = len(layers) - 1
    lines += [f"    {layers[-1].module} u{last} (.clk(clk), .rst_n(rst_n), .in_tdata({prev}_tdata), .in_tvalid({prev}_tvalid), "
              f".in_tready({prev}_tready), .out_tdata(out_tdata), .out_tvalid(out_tvalid), .out_tready(out_tready));", "endmodule", ""]
    (out / "qc_top.sv").write_text("\n".join(lines))
    sources = [MVAU_SOURCE, DWC_SOURCE, FIFO_SOURCE] + [f"{layer.module}.sv" for layer in layers] + ["qc_top.sv"]
    return ProjectRTL("qc_top", layers, sources)


# --- stream encoding -------------------------------------------------------------------------------------------

def input_beats(codes: np.ndarray, simd: int) -> np.ndarray:
    """Input vectors [rows, K] -> beats [rows * ceil(K/SIMD), SIMD] (the last beat of each vector zero padded)."""
    codes = np.asarray(codes)
    rows, k = codes.shape
    sf = -(-k // simd)
    pad = np.zeros((rows, sf * simd), np.int64)
    pad[:, :k] = codes
    return pad.reshape(rows * sf, simd)


def im2col_rows(spec, x: np.ndarray) -> np.ndarray:
    """A conv layer's input stream: codes [C, H, W] of one image -> rows [Ho*Wo, kh*kw*C], tap-major (ky, kx, c)
    as packing.conv_weight_rows orders the weights; padded taps are code 0 (what a sliding-window unit emits)."""
    (kh, kw), (sh, sw), (dh, dw) = spec.kernel, spec.strides, spec.dilations
    top, left, bottom, right = spec.pads
    xp = np.pad(np.asarray(x, np.int64), ((0, 0), (top, bottom), (left, right)))
    ho, wo = spec.out_hw
    taps = [xp[:, ky * dh: ky * dh + sh * (ho - 1) + 1: sh, kx * dw: kx * dw + sw * (wo - 1) + 1: sw]
            for ky in range(kh) for kx in range(kw)]  # each [C, Ho, Wo]
    return np.stack(taps).transpose(2, 3, 0, 1).reshape(ho * wo, kh * kw * x.shape[0])


def output_values(beats: np.ndarray, layer: LayerRTL) -> np.ndarray:
    """Output beats [rows * N/PE, PE] -> [rows, N] (accumulators sign extended when the layer outputs them)."""
    v = np.asarray(beats, np.int64).reshape(-1, layer.params["N"])
    if layer.signed_out:
        w = layer.out_bits
        v = np.where(v >= 1 << (w - 1), v - (1 << w), v)
    return v


# --- tools -----------------------------------------------------------------------------------------------------

def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise ToolchainError(f"{name} not found; install it (Debian: apt-get install {name})")
    return path


def _run(cmd: list, cwd, what: str, timeout: float = 600) -> str:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-15:]
        raise ToolchainError(f"{what} failed (exit {proc.returncode}) in {cwd}: " + " | ".join(tail))
    return proc.stdout


def _gflags(params: dict | None) -> list[str]:
    out = []
    for k, v in (params or {}).items():
        out.append(f'-G{k}="{v}"' if isinstance(v, str) else f"-G{k}={v}")
    return out


def verilator_lint(rtl_dir, sources: list, top: str, params: dict | None = None) -> str:
    """``verilator --lint-only -Wall``; returns its output, raises ToolchainError on any warning."""
    return _run([_tool("verilator"), "--lint-only", "-Wall", "--top-module", top, *_gflags(params), *sources],
                rtl_dir, f"verilator lint of {top}")


def verilator_build(rtl_dir, sources: list, top: str, *, in_lanes: int, in_bits: int, out_lanes: int,
                    out_bits: int, build_dir, params: dict | None = None, opt: str = "-O0") -> Path:
    """Verilate ``top`` with the stream harness into ``build_dir``; returns the executable.

    ``params`` override top-level parameters (-G): a bare qc_mvau can be built once for a geometry and run on many
    weight sets, since its ROMs are read by $readmemh when the simulation starts (from the run's folder)."""
    rtl_dir, build_dir = Path(rtl_dir).resolve(), Path(build_dir).resolve()
    build_dir.mkdir(parents=True, exist_ok=True)
    defines = [f"-CFLAGS", f"-DIN_LANES={in_lanes} -DIN_BITS={in_bits} -DOUT_LANES={out_lanes} -DOUT_BITS={out_bits} {opt}"]
    jobs = str(max(1, min(2, os.cpu_count() or 1)))
    _run([_tool("verilator"), "--cc", "--exe", "--build", "-j", jobs, "-Wno-fatal", "--top-module", top,
          "--prefix", "Vtop", "-Mdir", str(build_dir), "-o", "sim", *_gflags(params), *defines,
          *[str(rtl_dir / s) for s in sources], str(TEMPLATES / HARNESS_SOURCE)],
         build_dir, f"verilator build of {top}", timeout=900)
    return build_dir / "sim"


def verilator_run(exe, beats: np.ndarray, out_beats: int, run_dir, *, seed: int = 0, valid_pct: int = 100,
                  ready_pct: int = 100) -> tuple[np.ndarray, int]:
    """Stream ``beats`` [n, in_lanes] through the simulation run in ``run_dir`` (where its ROM files are).

    Returns (output beats [out_beats, out_lanes] as unsigned lane values, cycles from the first input handshake to
    the last output handshake)."""
    run_dir = Path(run_dir)
    beats = np.asarray(beats, np.int64)
    (run_dir / "stream_in.txt").write_text(f"{beats.shape[0]}\n" + "\n".join(" ".join(map(str, r)) for r in beats))
    text = _run([str(exe), "stream_in.txt", "stream_out.txt", str(out_beats), str(seed), str(valid_pct),
                 str(ready_pct)], run_dir, f"simulation {exe}")
    m = re.search(r"cycles (\d+)", text)
    out = np.loadtxt(run_dir / "stream_out.txt", dtype=np.uint64, ndmin=2)
    return out.astype(np.int64), int(m.group(1))


_LUTRAM_LUTS = {"RAM32M": 4, "RAM64M": 4, "RAM32X1D": 2, "RAM64X1D": 2, "RAM128X1D": 4, "RAM32X1S": 1,
                "RAM64X1S": 1, "RAM128X1S": 2, "RAM256X1S": 4, "RAM32M16": 8, "RAM64M8": 8}


def yosys_stat(rtl_dir, sources: list, top: str, params: dict | None = None) -> dict:
    """``synth_xilinx`` (7-series LUT6) of ``top``: {lut, ff, bram, dsp, carry, cells}; LUTRAM counted in LUTs."""
    chparam = " ".join(f"-set {k} {v}" if not isinstance(v, str) else f'-set {k} "{v}"'
                       for k, v in (params or {}).items())
    script = " ".join(f"read_verilog -defer -sv {s};" for s in sources)  # elaborate with the real parameters only
    if chparam:
        script += f" chparam {chparam} {top};"
    script += f" synth_xilinx -top {top} -flatten -noiopad -noclkbuf; tee -q -o yosys_stat.txt stat"
    _run([_tool("yosys"), "-q", "-p", script], rtl_dir, f"yosys of {top}")
    text = (Path(rtl_dir) / "yosys_stat.txt").read_text()
    cells = {m.group(1): int(m.group(2)) for m in re.finditer(r"^\s+([A-Z][A-Z0-9_]+)\s+(\d+)\s*$", text, re.M)}
    lut = sum(v for k, v in cells.items() if re.fullmatch(r"LUT[1-6]", k))
    lut += sum(_LUTRAM_LUTS.get(k, 0) * v for k, v in cells.items())
    ff = sum(v for k, v in cells.items() if re.fullmatch(r"FD[A-Z]*", k))
    bram = sum(v for k, v in cells.items() if k.startswith("RAMB18")) + 2 * sum(
        v for k, v in cells.items() if k.startswith("RAMB36"))
    dsp = sum(v for k, v in cells.items() if k.startswith("DSP"))
    return {"lut": lut, "ff": ff, "bram": bram, "dsp": dsp, "carry": cells.get("CARRY4", 0), "cells": cells}
