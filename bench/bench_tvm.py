"""Benchmark the TVM kernel generator against the C generator on the same layers (run on demand; not a test).

    python bench/bench_tvm.py             # print the table
    python bench/bench_tvm.py --write     # ... and add/replace the "## TVM generator vs C generator" section of
                                          #     bench/RESULTS.md (other sections are left alone)

W1A1, W1A2, W2A2 BitGemm (epilogue none) at M in {1, 16, 256}, K = N in {1024, 4096}: the C library
(qcompile.targets.cpu.build_library, auto path) and qcompile.targets.cpu.tvm_gen (TVM 0.27 -> LLVM, this CPU), both
with all cores. Both are timed end to end, as a caller sees them: uint8 codes in, int32 out (C: ctypes + packing in C;
TVM: packing in numpy + the TVM kernels). "TVM kernel" is the TVM-generated code alone (row sums + bit GEMM +
epilogue on already packed planes). Where the TVM generator picks its scalar POPCNT kernels (AMD Zen without
AVX-512), the vector-popcount kernels (AVX2 vpshufb) are timed too, end to end. Every output is checked equal to C's.

Timing: both generators run in this one process, interleaved (C block, TVM block, repeated), and each figure is the best
of the rounds of a median over a block of calls: the machine may be shared, and interleaving exposes both to the same
load. Needs apache-tvm (pip install 'qcompile[tvm]').
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import RESULTS, cpu_name, publish  # noqa: E402  (bench/ is sys.path[0])
from qcompile.runtime.kernels import Library
from qcompile.targets.cpu import LayerSpec, build_library, tvm_gen

SECTION = "## TVM generator vs C generator"
BIT_PAIRS = [(1, 1), (2, 1), (2, 2)]  # (bits_a, bits_w): W1A1, W1A2, W2A2
MS = (1, 16, 256)




def _git_rev() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=10, check=False)
        return out.stdout.strip() or "?"
    except OSError:
        return "?"


def _simd() -> str:
    flags = tvm_gen._cpu_flags()
    if {"avx512f", "avx512_vpopcntdq"} <= flags:
        return "AVX-512 VPOPCNTDQ"
    return "AVX2, no AVX-512" if "avx2" in flags else "no AVX2"


def _block(fn, n: int) -> float:
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def _loadavg() -> str:
    try:
        return Path("/proc/loadavg").read_text().split()[0]
    except OSError:
        return "?"


def _kernel_only(layer: tvm_gen.TvmLayer, x: np.ndarray):
    """A closure running just the TVM-generated functions on pre-packed planes (bench-only use of internals)."""
    m = x.shape[0] * layer.P
    k, rowsum, gemm = layer._kernel_for(m)
    A, _, _, tA, tR, tY = layer._workspace(k, m)
    layer._pack_activations(x, x.shape[0], A)
    consts = layer._constants(k.nr)

    def run():
        rowsum(tA, tR)
        gemm(tA, tR, *consts, tY)

    return run


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--write", action="store_true", help=f"add/replace the '{SECTION}' section of {RESULTS}")
    ap.add_argument("--quick", action="store_true", help="K=N=1024 only, fewer rounds")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds per shape (default 5)")
    args = ap.parse_args(argv)
    if not tvm_gen.tvm_available():
        raise SystemExit("apache-tvm is not installed: pip install 'qcompile[tvm]'")
    sizes = [1024] if args.quick else [1024, 4096]
    rounds = 2 if args.quick else args.rounds
    block_time = 0.15 if args.quick else 0.3
    rng = np.random.default_rng(0)
    load_before = _loadavg()

    specs = {}
    for ba, bw in BIT_PAIRS:
        for k in sizes:
            specs[(ba, bw, k)] = LayerSpec(f"w{bw}a{ba}_k{k}", "gemm", ba, bw,
                                           rng.integers(0, 1 << bw, (k, k), dtype=np.uint8),
                                           np.full(k, (1 << bw) - 1, np.int32))
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        lib = Library(build_library(list(specs.values()), tmp))
        c_build = time.perf_counter() - t
        t = time.perf_counter()
        layers = {key: tvm_gen.build_tvm_layer(s) for key, s in specs.items()}
        for layer in layers.values():  # the tiled kernel too (built on first use otherwise)
            layer._kernel_for(max(MS))
        tvm_build = time.perf_counter() - t
        target = tvm_gen.system_target()
        style = next(iter(layers.values())).style.name
        vector = {}
        if style == "scalar":
            vector = {key: tvm_gen.build_tvm_layer(s, popcount="vector") for key, s in specs.items()}
        import tvm

        threads = os.environ.get("TVM_NUM_THREADS", "?")
        print(f"machine: {cpu_name()}, {os.cpu_count()} cores; C path {lib.selected_path()} with "
              f"{lib.num_threads()} threads; TVM {tvm.__version__} mcpu={target['mcpu']}, {style} popcount, "
              f"{threads} threads; "
              f"build: C {c_build:.1f} s, TVM {tvm_build:.1f} s ({2 * len(layers)} kernels)", flush=True)

        rows = []
        for (ba, bw, k), spec in specs.items():
            layer = layers[(ba, bw, k)]
            for m in MS:
                x = rng.integers(0, 1 << ba, (m, k), dtype=np.uint8)
                def fc(name=spec.name, x=x):
                    return lib.run(name, x, check=False)

                def ft(layer=layer, x=x):
                    return layer.run(x, check=False)

                fk = _kernel_only(layer, x)
                fns = [fc, ft, fk]
                if vector:
                    fns.append(lambda fv=vector[(ba, bw, k)], x=x: fv.run(x, check=False))
                want = fc()
                for f in fns[1:]:
                    if f is not fk and not np.array_equal(f(), want):
                        raise SystemExit(f"{spec.name} M={m}: TVM and C outputs differ")
                fk()
                once = min(_block(fc, 3), _block(ft, 3))
                n = int(min(200, max(3, block_time / max(once, 1e-6))))
                times = [[] for _ in fns]
                for _ in range(rounds):
                    for f, ts in zip(fns, times):
                        ts.append(_block(f, n))
                        time.sleep(0.02)
                best = [min(ts) for ts in times]
                row = (f"W{bw}A{ba} GEMM M={m} K=N={k}", *best[:3], best[3] if vector else None, m * k * k * ba * bw)
                rows.append(row)
                print(_fmt(row), flush=True)
    load_after = _loadavg()

    table = _table(rows)
    text = (f"{SECTION}\n\nMeasured {datetime.date.today().isoformat()} by `python bench/bench_tvm.py` (repo at "
            f"{_git_rev()}) on "
            f"{cpu_name()} ({_simd()}), {os.cpu_count()} cores ({platform.machine()}); C library path "
            f"`{lib.selected_path()}` with {lib.num_threads()} threads; TVM {tvm.__version__} (LLVM, "
            f"mcpu={target['mcpu']}, `{style}` popcount kernels) with {threads} threads; numpy {np.__version__}. "
            f"All timed end to end (uint8 codes in, int32 out) in one process, interleaved, best of {rounds} rounds "
            f"of a block median; 'TVM kernel' = the TVM-generated functions alone on packed planes"
            + ("; 'TVM vector' = the same generator forced to its AVX2 vector-popcount kernels" if vector else "")
            + f". Outputs checked equal to C's. The machine was shared with other jobs (1-min load average "
            f"{load_before} before, {load_after} after): expect +-20-30% noise.\n\n"
            f"Build time for the {len(specs)} layers: C {c_build:.1f} s (one library), TVM {tvm_build:.1f} s "
            f"({2 * len(specs)} kernels: a 1-row and a tiled one per layer).\n\n{table}\n")
    publish(SECTION, text, args.write)
    return 0


def _fmt(row) -> str:
    label, tc, tt, tk, tv, macs = row
    vec = "" if tv is None else f"   TVM vector {tv * 1e3:9.3f} ms"
    return (f"{label:28s} C {tc * 1e3:9.3f} ms   TVM {tt * 1e3:9.3f} ms   TVM/C {tt / tc:5.2f}   "
            f"TVM kernel {tk * 1e3:9.3f} ms ({macs / tk / 1e9:6.1f} G binary MAC/s){vec}")


def _table(rows) -> str:
    vec = rows[0][4] is not None
    head = "| shape | C ms | TVM ms | TVM / C | TVM kernel ms | TVM kernel / C | TVM kernel G binary MAC/s |"
    lines = [head + (" TVM vector ms | TVM vector / C |" if vec else ""), "|---" * (7 + 2 * vec) + "|"]
    for label, tc, tt, tk, tv, macs in rows:
        line = (f"| {label} | {tc * 1e3:.3f} | {tt * 1e3:.3f} | {tt / tc:.2f}x | {tk * 1e3:.3f} | {tk / tc:.2f}x | "
                f"{macs / tk / 1e9:.0f} |")
        lines.append(line + (f" {tv * 1e3:.3f} | {tv / tc:.2f}x |" if vec else ""))
    return "\n".join(lines)




if __name__ == "__main__":
    sys.exit(main())
