"""The FPGA project folder: HLS sources, testbench and test vectors, the Vitis HLS Tcl script, the RTL, the report;
and the C simulation that checks the HLS code here with g++ and Xilinx's open-source ap_types headers.

    fpga/hls/       qc_hls.h qc_params.h qc_top.h qc_top.cpp tb_qc_top.cpp run_hls.tcl csim.sh
    fpga/hls/vectors/input.txt expected.txt
    fpga/rtl/       targets/fpga/rtl.py's chain (or NOT_GENERATED.txt saying why)
    fpga/report.md  the folding table (targets/fpga/folding.py)
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np

from qcompile.errors import QuantizationError, ToolchainError

from . import hls

__all__ = ["ap_types_dir", "write_vectors", "random_input", "write_hls_project", "csim", "TESTBENCH"]

TESTBENCH = "tb_qc_top.cpp"
CSIM_FLAGS = ["-std=c++14", "-O1", "-ffp-contract=off", "-w"]


def ap_types_dir() -> Path | None:
    """Xilinx's open-source ap_types headers (ap_int.h, hls_stream.h): $QCOMPILE_AP_TYPES, else the copy the hls4ml
    wheel ships (``pip install --no-deps hls4ml``; found without importing hls4ml, which needs more packages)."""
    env = os.environ.get("QCOMPILE_AP_TYPES")
    if env:
        return Path(env) if (Path(env) / "ap_int.h").is_file() else None
    spec = importlib.util.find_spec("hls4ml")
    for root in (spec.submodule_search_locations or []) if spec else []:
        path = Path(root) / "templates" / "vivado" / "ap_types"
        if (path / "ap_int.h").is_file() and (path / "hls_stream.h").is_file():
            return path
    return None


def random_input(design: hls.HlsDesign, frames: int, seed: int = 0) -> np.ndarray:
    """Test frames [frames, *in_shape]: codes, or for a folded input quantizer floats at and between its
    thresholds (every boundary's neighbours, so an off-by-one-ulp comparison shows)."""
    rng = np.random.default_rng(seed)
    spec = design.specs[0]
    shape = (frames, *design.in_shape)
    if spec.in_thresholds is None:
        return rng.integers(0, 1 << spec.bits_a, shape).astype(np.uint8)
    t = spec.in_thresholds[np.isfinite(spec.in_thresholds)]
    near = np.concatenate([t, np.nextafter(t, np.float32(-np.inf)), np.nextafter(t, np.float32(np.inf)),
                           np.array([0.0, -1.0], np.float32)]).astype(np.float32)
    lo, hi = (float(t.min()), float(t.max())) if t.size else (-1.0, 1.0)
    span = max(hi - lo, 1e-3)
    x = rng.uniform(lo - 0.2 * span, hi + 0.2 * span, shape).astype(np.float32)
    pick = rng.random(shape) < 0.3
    x[pick] = rng.choice(near, int(pick.sum()))
    return x


def _write_values(path: Path, values: np.ndarray) -> None:
    rows = [" ".join(map(str, r.tolist())) for r in values]
    path.write_text(f"{values.shape[0]} {values.shape[1]}\n" + "\n".join(rows) + "\n")


def write_vectors(design: hls.HlsDesign, x: np.ndarray, out_dir) -> np.ndarray:
    """input.txt (x in stream order) and expected.txt (reference_chain of x) into ``out_dir``; returns expected
    in stream order [frames, values] as uint32."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    want = hls.to_stream(hls.reference_chain(design.specs, x))
    _write_values(out / "input.txt", hls.to_stream(np.asarray(x, np.float32) if design.in_float else x))
    _write_values(out / "expected.txt", want)
    return want


def _tcl(part: str, clock_mhz: float, top: str) -> str:
    period = 1000.0 / clock_mhz
    return f"""# Vitis HLS: C simulation, synthesis and IP export of the qcompile accelerator
# for {part} at {clock_mhz:g} MHz.
# Run in this folder: vitis_hls -f run_hls.tcl   (or vitis-run --mode hls --tcl run_hls.tcl)
open_project -reset qc_hls_prj
set_top {top}
add_files qc_top.cpp -cflags "-std=c++14"
add_files -tb {TESTBENCH} -cflags "-std=c++14"
open_solution -reset solution1 -flow_target vivado
set_part {part}
create_clock -period {period:.3f} -name default
# the float epilogue is written as a float32 multiply then a separate add, the CPU kernel's order
# csim runs in qc_hls_prj/solution1/csim/build: the vector files by absolute path
set vectors [file normalize vectors]
csim_design -argv "$vectors/input.txt $vectors/expected.txt $vectors/csim_output.txt"
csynth_design
export_design -format ip_catalog
exit
"""


def _csim_script() -> str:
    return """#!/bin/sh
# C simulation without Vitis: g++ against Xilinx's open-source ap_types (ap_int.h, hls_stream.h), e.g. from the
# hls4ml wheel (pip install --no-deps hls4ml): AP_TYPES=<site-packages>/hls4ml/templates/vivado/ap_types
set -e
cd "$(dirname "$0")"
: "${AP_TYPES:?set AP_TYPES to the folder holding ap_int.h and hls_stream.h}"
${CXX:-g++} """ + " ".join(CSIM_FLAGS) + """ -I"$AP_TYPES" -I. qc_top.cpp tb_qc_top.cpp -o tb_qc_top
./tb_qc_top vectors/input.txt vectors/expected.txt vectors/csim_output.txt
"""


def write_hls_project(design: hls.HlsDesign, out_dir, *, part: str, clock_mhz: float, frames: int = 8,
                      x: np.ndarray | None = None, seed: int = 0) -> np.ndarray:
    """Sources, testbench, vectors (``x`` or ``frames`` random frames), run_hls.tcl and csim.sh into ``out_dir``.
    Returns the expected output in stream order."""
    out = Path(out_dir)
    hls.write_sources(design, out)
    shutil.copyfile(hls.TEMPLATES / TESTBENCH, out / TESTBENCH)
    (out / "run_hls.tcl").write_text(_tcl(part, clock_mhz, "qc_top"))
    (out / "csim.sh").write_text(_csim_script())
    (out / "csim.sh").chmod(0o755)
    if x is None:
        x = random_input(design, frames, seed)
    return write_vectors(design, x, out / "vectors")


def csim(project_dir, *, build_dir=None, timeout: float = 600) -> np.ndarray:
    """Compile the HLS sources and testbench with g++ (one translation unit each, -O1) and run the vectors.
    Returns the testbench's outputs [frames, values] (uint32); raises ToolchainError when it fails or mismatches."""
    inc = ap_types_dir()
    if inc is None:
        raise ToolchainError("Xilinx ap_types headers not found: pip install --no-deps hls4ml (or set "
                             "QCOMPILE_AP_TYPES to a folder with ap_int.h and hls_stream.h)")
    cxx = shutil.which(os.environ.get("CXX", "g++"))
    if cxx is None:
        raise ToolchainError("g++ not found: apt-get install g++")
    src = Path(project_dir)
    build = Path(build_dir) if build_dir else src
    build.mkdir(parents=True, exist_ok=True)
    exe = build / "tb_qc_top"
    cmd = [cxx, *CSIM_FLAGS, f"-I{inc}", f"-I{src}", str(src / "qc_top.cpp"), str(src / TESTBENCH), "-o", str(exe)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode:
        raise ToolchainError(f"g++ failed on the HLS sources in {src}: " + proc.stderr.strip()[-2000:])
    vec = src / "vectors"
    out_file = build / "csim_output.txt"
    run = subprocess.run([str(exe), str(vec / "input.txt"), str(vec / "expected.txt"), str(out_file)],
                         capture_output=True, text=True, timeout=timeout)
    if run.returncode:
        raise ToolchainError(f"C simulation of {src} failed: " + (run.stdout + run.stderr).strip()[-2000:])
    lines = out_file.read_text().split("\n")
    frames, count = (int(v) for v in lines[0].split())
    return np.array([[int(v) for v in line.split()] for line in lines[1:1 + frames]], np.uint64).astype(np.uint32)


def write_rtl(specs, foldings: dict, out_dir) -> str:
    """PART B's RTL chain (targets/fpga/rtl.py) of the same layers and foldings into ``out_dir``: its top reads
    codes (a folded input quantizer stays on the HLS side). Returns a line for the report."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    try:
        from . import rtl
    except ImportError:
        (out / "NOT_GENERATED.txt").write_text("targets/fpga/rtl.py is not available in this qcompile\n")
        return "RTL: not generated (targets/fpga/rtl.py missing)"
    rtl_specs = [s.replace(in_thresholds=None) for s in specs]
    try:
        project = rtl.emit_project_rtl(rtl_specs, foldings, out)
    except QuantizationError as exc:
        (out / "NOT_GENERATED.txt").write_text(f"{exc}\n")
        return f"RTL: not generated ({exc})"
    return f"RTL: top `{project.top}` in rtl/ ({len(project.layers)} MVAU(s); sources {', '.join(project.sources)})"


# ---- the artifact: qcompile compile MODEL --target fpga --part P --fps F -o OUT -------------------------------------

# ops between two layers of the chain that leave the stream as it is (codes are >= 0, so Relu is the identity)
_PASS_THROUGH = {"Flatten", "Reshape", "Identity", "Relu"}


def _check_chain(graph, specs, domain: str) -> tuple[str, str]:
    """The layers must form one chain (each reads the one before, through pass-through ops); returns the chain's
    input and output value names."""
    from qcompile.partition import reader_counts

    node_of = {n.name: n for n in graph.node if n.domain == domain}
    readers = reader_counts(graph)
    by_input: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            by_input.setdefault(i, []).append(n)

    def out_value(spec) -> str:
        return spec.extra.get("output") or node_of[spec.name].output[0]

    for a, b in zip(specs, specs[1:]):
        v, want = out_value(a), node_of[b.name].input[0]
        while v != want:
            nxt = by_input.get(v, [])
            if readers.get(v) != 1 or len(nxt) != 1 or nxt[0].op_type not in _PASS_THROUGH:
                raise QuantizationError(f"layers {a.name!r} and {b.name!r} are not one chain (the fpga target "
                                        "streams a single chain of quantized layers); keep the others in float")
            v = nxt[0].output[0]
    return node_of[specs[0].name].input[0], out_value(specs[-1])


def _readme(design: hls.HlsDesign, plan, rtl_line: str, in_name: str, out_name: str, frames: int) -> str:
    first, last = design.first, design.last
    stages = "\n".join(f"| {i} | {s.kind} | `{s.layer}` | {s.in_lanes} x {s.in_bits} | {s.out_lanes} x {s.out_bits} | "
                       f"{s.words_in} | {s.words_out} | {s.cycles} |" for i, s in enumerate(design.stages))
    in_what = "float32 (IEEE bit patterns; the first layer's input quantizer runs on the device)" if design.in_float \
        else f"{first.in_bits}-bit codes"
    out_what = {"codes": f"{last.out_bits}-bit codes", "int32": "int32 accumulators (the host applies the rest)",
                "float32": "float32 (the last layer's float epilogue, float(acc) * mult + bias, runs on the device "
                           "in the CPU kernel's order, bit-exact)"}[design.out_kind]
    return f"""{plan.markdown()}
## The accelerator

`hls/qc_top.cpp`: one dataflow stage per layer (`#pragma HLS DATAFLOW`, every loop `PIPELINE II=1`), weights and
thresholds as ROM arrays partitioned by PE (`qc_params.h`), building blocks in `qc_hls.h`.

| # | stage | layer | in (lanes x bits) | out (lanes x bits) | words in / frame | words out / frame | cycles / frame |
|---|---|---|---|---|---:|---:|---:|
{stages}

- AXI-stream in: `{first.in_lanes * first.in_bits}`-bit words of {first.in_lanes} lanes, {first.words_in} words per
  frame: the value `{in_name}` of `graph.onnx`, {in_what}, shape {design.in_shape} sent channels innermost (NHWC).
- AXI-stream out: `{last.out_lanes * last.out_bits}`-bit words of {last.out_lanes} lanes, {last.words_out} words per
  frame: the value `{out_name}`, {out_what}, shape {design.out_shape} channels innermost.
- The float layers before and after the chain run on the host (`graph.onnx` holds the whole fused graph).
- {rtl_line}

## Check and build

- C simulation without Vitis: `AP_TYPES=<folder with ap_int.h, hls_stream.h> hls/csim.sh` (the hls4ml wheel ships
  Xilinx's open-source ap_types: `pip install --no-deps hls4ml`, folder `hls4ml/templates/vivado/ap_types`). The
  testbench streams `hls/vectors/input.txt` ({frames} random frames at and around the input
  thresholds) and compares every value with `expected.txt` (qcompile.reference, layer by layer).
- Vitis HLS (csim, csynth, IP export for {plan.part.full} at {plan.clock_mhz:g} MHz):
  `cd hls && vitis_hls -f run_hls.tcl`.
"""


def build_fpga_artifact(result, target_name: str, part, work: Path, *, fps: float | None = None,
                        utilization: float | None = None, frames: int = 8) -> dict:
    """The fpga target's artifact folder: fpga/ (HLS project, RTL, report.md), graph.onnx, fakequant.onnx, manifest."""
    import onnx

    from qcompile import artifact as art
    from qcompile.fileio import sha256_file
    from qcompile.passes.fuse import DOMAIN

    from .folding import DEFAULT_UTILIZATION, choose_folding

    g = art.fuse_fixed_size_layers(result)
    specialized, symbolic, graph, specs = g.specialized, g.symbolic, g.graph, g.specs
    if not specs:
        raise QuantizationError(f"{result.source}: no quantized layer became a bit kernel, so there is nothing to "
                                "put on the FPGA (check the config's keep_float and the report's plan)")
    in_name, out_name = _check_chain(graph.graph, specs, DOMAIN)
    plan = choose_folding(specs, part, fps, utilization=utilization or DEFAULT_UTILIZATION)
    design = hls.build_design(specs, plan.foldings)
    root = work / "fpga"
    write_hls_project(design, root / "hls", part=part.full, clock_mhz=plan.clock_mhz, frames=frames)
    rtl_line = write_rtl(specs, plan.foldings, root / "rtl")
    report = _readme(design, plan, rtl_line, in_name, out_name, frames)
    (root / "report.md").write_text("# qcompile FPGA project\n\n" + report)
    onnx.save(graph, work / "graph.onnx")
    onnx.save(result.model, work / "fakequant.onnx")

    spec_of = {s.name: s for s in specs}
    fold_of = {lay.name: lay for lay in plan.layers}
    entries = []
    for name, p in result.ctx.plan.items():
        spec = spec_of.get(name)
        if spec is not None:
            lay = fold_of[name]
            label = f"fpga-mvau PE={lay.pe} SIMD={lay.simd}"
            why = (f"{lay.cycles:,} cycles/frame, ~{lay.res['lut']:,} LUT, {lay.res['bram18']} BRAM18 "
                   f"({'XNOR/AND popcount' if spec.bits_a == spec.bits_w == 1 else 'bit-plane popcount'}, "
                   f"{spec.epilogue} epilogue)")
            if spec.pool is not None:
                why += f"; its {spec.pool[0]}x{spec.pool[1]} MaxPool runs on the device after it"
            if spec.in_thresholds is not None:
                why += "; quantizes its float input on the device"
        else:
            label = "host onnxruntime-fp32"
            why = symbolic.get(name, p.reason)
        entries.append({"node": name, "op": p.op, "bits": f"W{p.bits_w}A{p.bits_a}" if p.quantize else "float",
                        "kernel": label, "why": why})
    return {
        **art.manifest_header(result, {"name": target_name,
                                       "caps": {"part": part.name, "full": part.full, "board": part.board},
                                       "plan_batch": None, "autotuned": False,
                                       "cost_model": "targets/fpga/estimate.py (MVAU)"}),
        "inputs": [], "outputs": [],
        "generic": {"model": "fakequant.onnx"} if specialized else None,
        "plan": entries, "schedule": [],
        "fpga": {"part": part.name, "clock_mhz": plan.clock_mhz, "target_fps": fps, "fps": plan.fps,
                 "cycles_per_frame": plan.cycles_per_frame, "latency_cycles": plan.latency_cycles,
                 "foldings": {k: list(v) for k, v in plan.foldings.items()}, "totals": plan.totals,
                 "stream_in": {"value": in_name, "lanes": design.first.in_lanes, "bits": design.first.in_bits,
                               "words": design.first.words_in, "float": design.in_float},
                 "stream_out": {"value": out_name, "lanes": design.last.out_lanes, "bits": design.last.out_bits,
                                "words": design.last.words_out, "kind": design.out_kind},
                 "project": "fpga/", "report": "fpga/report.md"},
        "report_markdown": report,
        "deploy": None,
        "files": {str(p.relative_to(work)): sha256_file(p) for p in sorted(work.rglob("*")) if p.is_file()},
    }
