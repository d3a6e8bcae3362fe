"""Peer benchmark: qcompile against Larq Compute Engine (LCE, the TFLite binary-network engine) on the bundled CNN at
W1A1, in one run (on demand; not a test, and TensorFlow is not a dependency of qcompile or its CI).

    bash bench/lce/setup.sh                  # once: bench/lce/.venv with tensorflow-cpu 2.16, tf-keras, larq, LCE
    python bench/lce/bench_lce.py            # print the table (from the main .venv)
    python bench/lce/bench_lce.py --write    # ... and replace the "## Peer: Larq Compute Engine (TFLite)" section
                                             #     of bench/RESULTS.md

qcompile: models/fmnist_cnn.onnx compiled at w1a1 for target "cpu" (the planner's kernels), run by
qcompile.runtime.InferenceSession; onnxruntime fp32 on the same float model. Both timed in a fresh process,
interleaved, best of the rounds (bench_model.py's method), once before and once after LCE (the best of both counts),
so a busy spell of the shared machine cannot favour one side.
LCE: the same topology built with larq QuantConv2D/QuantDense at W1A1 (bench/lce/lce_model.py, random weights),
converted by LCE's converter and timed by LCE's interpreter with every interpreter setting it has; the fastest
counts. All engines with 2 threads at most (this machine has 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # bench/: _common, bench_model
from _common import cpu_name, load_average, publish  # noqa: E402

SECTION = "## Peer: Larq Compute Engine (TFLite)"
BATCHES = (1, 64)
LCE_PYTHON = HERE / ".venv" / "bin" / "python"
THREADS = 2


def compile_cnn(out: Path) -> float:
    from qcompile import api, datasets

    start = time.perf_counter()
    api.compile(datasets.bundled_model("cnn"), config="w1a1", calib=datasets.load_calib(), target="cpu").save(out)
    return time.perf_counter() - start


def time_qcompile(art: Path, rounds: int) -> dict[int, dict[str, float]]:
    """Best ms of the artifact and of onnxruntime fp32 on its float model, per batch (interleaved rounds)."""
    from bench_model import _best

    from qcompile.evaluate import session
    from qcompile.runtime import InferenceSession

    sess = InferenceSession(art)
    name = sess.get_inputs()[0].name
    fp32 = session(art / "float.onnx")
    engines = {"qcompile": lambda x: sess.run(None, {name: x}), "ort fp32": lambda x: fp32.run(None, {name: x})}
    out = {}
    for batch in BATCHES:
        x = np.random.default_rng(batch).random((batch, 1, 28, 28), dtype=np.float32)
        times: dict[str, list[float]] = {k: [] for k in engines}
        for _ in range(rounds):
            for k, fn in engines.items():
                _best(lambda: fn(x), times[k], reps=20 if batch == 1 else 3)
        out[batch] = {k: min(v) for k, v in times.items()}
    return out


def run_lce(rounds: int) -> dict | None:
    """lce_model.py's JSON, or None (with the reason on stderr) when the LCE environment is missing or fails."""
    if not LCE_PYTHON.exists():
        print(f"LCE skipped: {LCE_PYTHON.parent.parent} is missing; run `bash bench/lce/setup.sh` first",
              file=sys.stderr)
        return None
    cmd = [str(LCE_PYTHON), str(HERE / "lce_model.py"), "--rounds", str(rounds), "--threads", str(THREADS),
           "--batches", *map(str, BATCHES)]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    for line in p.stderr.splitlines():
        if line.startswith("lce_model:"):
            print(line, file=sys.stderr)
    if p.returncode != 0 or not p.stdout.strip():
        tail = "\n".join(p.stderr.strip().splitlines()[-5:])
        print(f"LCE failed (exit {p.returncode}):\n{tail}", file=sys.stderr)
        return None
    return json.loads(p.stdout.strip().splitlines()[-1])


def run(rounds: int) -> str:
    from bench_model import _isolated, plan_summary

    with tempfile.TemporaryDirectory() as tmpdir:
        art = Path(tmpdir) / "cnn-w1a1"
        compile_s = compile_cnn(art)
        plan = plan_summary(art)
        load_before = load_average()
        q1 = _isolated(time_qcompile, art, rounds)
        print("qcompile (1st): " + ", ".join(f"b{b} {k} {v:.2f} ms" for b, r in q1.items() for k, v in r.items()),
              file=sys.stderr)
        lce = run_lce(rounds)
        q2 = _isolated(time_qcompile, art, rounds)
        print("qcompile (2nd): " + ", ".join(f"b{b} {k} {v:.2f} ms" for b, r in q2.items() for k, v in r.items()),
              file=sys.stderr)
        load_after = load_average()
    q = {b: {k: min(q1[b][k], q2[b][k]) for k in q1[b]} for b in BATCHES}
    cpu = cpu_name()

    lines = [SECTION, ""]
    versions = (f"LCE {lce['lce_version']} (larq {lce['larq_version']}, tensorflow-cpu {lce['tensorflow_version']}, "
                f"bench/lce/.venv)" if lce else "LCE not measured (bench/lce/.venv missing or failing)")
    lines.append(f"`python bench/lce/bench_lce.py --write` on {cpu}, {len(os.sched_getaffinity(0))} cores (load "
                 f"average {load_before} before, {load_after} after); {versions}. The bundled CNN "
                 f"(`models/fmnist_cnn.onnx`) at W1A1 in both: qcompile compiles it (`--config w1a1 --target cpu`, "
                 f"planner's kernels: {plan}; compile + save {compile_s:.1f} s) and runs the artifact with "
                 f"`InferenceSession`; LCE runs the same topology built in larq (`bench/lce/lce_model.py`: the same "
                 f"layers binary, the first conv and the last Gemm float, BatchNorm fused into the binary convs, "
                 f"random weights) through its own converter and interpreter. {THREADS} threads each; times in ms, "
                 f"best of {rounds} interleaved rounds (qcompile and onnxruntime timed before and after LCE, best of "
                 f"both); ratio = LCE's time over qcompile's (higher = qcompile faster).")
    lines.append("")
    lines.append("| batch | qcompile ms | LCE ms | ORT fp32 ms | qcompile vs LCE | CPU |")
    lines.append("|---:|---:|---:|---:|---:|---|")
    for b in BATCHES:
        qc, fp = q[b]["qcompile"], q[b]["ort fp32"]
        l_ms = lce.get(str(b)) if lce else None
        lines.append(f"| {b} | {qc:.2f} | {f'{l_ms:.2f}' if l_ms else 'n/a'} | {fp:.2f} | "
                     f"{f'{l_ms / qc:.1f}x' if l_ms else 'n/a'} | {cpu} |")
    lines.append("")
    if lce:
        settings = list(lce["all"])
        lines.append("LCE's interpreter settings (`Interpreter(..., num_threads=2, use_indirect_bgemm=, "
                     "use_reference_bconv=, use_xnnpack=)`), each on the model with the 1152->256 Gemm as a larq "
                     "`QuantDense` (LCE 0.16 has no binary fully-connected op: it runs float behind an "
                     "`LceDequantize`) and as the equivalent binary 3x3 `QuantConv2D` (an `LceBconv2d`); the "
                     "fastest is the LCE column above (" +
                     "; ".join(f"batch {b}: {lce['setting'][str(b)]}" for b in BATCHES) + "):")
        lines.append("")
        lines.append("| LCE setting | " + " | ".join(f"batch {b} ms" for b in BATCHES) + " |")
        lines.append("|---|" + "---:|" * len(BATCHES))
        for s in settings:
            lines.append(f"| {s} | " + " | ".join(f"{lce['all'][s].get(str(b), float('nan')):.2f}"
                                                   for b in BATCHES) + " |")
        lines.append("")
        for b in BATCHES:
            label = lce["setting"][str(b)].split("; ")[-1]
            ops = lce.get("ops", {}).get(f"{label}, batch {b}")
            if ops:
                lines.append(f"Ops of LCE's converted model (batch {b}, {label}): " +
                             ", ".join(f"`{k}` x{v}" for k, v in ops.items()) + ".")
        lines.append("")
    lines.append("LCE's optimized binary kernels are written for ARM (aarch64 NEON assembly for its bgemm and "
                 "bitpacking); on x86 it runs portable C++ (its default bgemm through ruy's standard C++ path, the "
                 "reference bconv, or the indirect bgemm kernels, which are the fastest here). An ARM machine "
                 "(a Raspberry Pi 4, a phone, Graviton) would narrow the gap between the two; it was not measured on "
                 "ARM here (qcompile's library would run its portable C path there: it has no hand-written NEON kernels).")
    lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--write", action="store_true", help=f"replace the '{SECTION}' section of bench/RESULTS.md")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)
    publish(SECTION, run(args.rounds), args.write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
