"""Data-parallel fine-tuning of the bundled CNN at W1A2: step time and scaling, HFReduce against DDP's allreduce.

    python bench/distributed_finetune.py            # print the table
    python bench/distributed_finetune.py --write    # ... and replace its section of bench/RESULTS.md

Runs `qcompile finetune models/fmnist_cnn.onnx --config w1a2 --quantizer dorefa --data fashion-mnist --steps S
--batch B --nproc P --allreduce A` (B is the global batch) for P = 1, 2, 4 and A = hfreduce | ddp, and with
P = 4 also as 2 simulated nodes of 2 ranks (HFReduce's tree between node leaders), each in its own run. The step
time is the training loop's own (report.json's epoch record: the loop's seconds, no evaluation), so process start,
post-training quantization and export are left out. Scaling efficiency = t(1 process) / (P x t(P processes)) at
the same global batch: 100 % means P processes finish a step P times faster. On a machine with fewer cores than
processes the ranks share cores, so efficiency there says what the communication costs, not what more cores give.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import cpu_name, load_average, publish  # noqa: E402  (bench/ is sys.path[0])

SECTION = "## Distributed fine-tuning (data parallel)"
ROOT = Path(__file__).resolve().parent.parent
CASES = [(1, "ddp", None), (2, "ddp", None), (2, "hfreduce", None), (4, "ddp", None), (4, "hfreduce", None),
         (4, "hfreduce", 2)]


def run_case(nproc: int, allreduce: str, sim_nodes: int | None, steps: int, batch: int, out: Path) -> dict:
    cmd = [sys.executable, "-m", "qcompile", "finetune", str(ROOT / "models" / "fmnist_cnn.onnx"), "--config", "w1a2",
           "--quantizer", "dorefa", "--data", "fashion-mnist", "--steps", str(steps), "--batch", str(batch),
           "--nproc", str(nproc), "--allreduce", allreduce, "-o", str(out), "--json"]
    if sim_nodes:
        cmd += ["--sim-nodes", str(sim_nodes)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, cwd=ROOT)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr[-2000:]}")
    report = json.loads((out / "report.json").read_text())
    epoch = report["history"]["epochs"][-1]
    return {"step_ms": epoch["seconds"] / steps * 1e3, "images_per_s": epoch["images_per_s"],
            "acc": report["finetuned_val_acc"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=256, help="global batch")
    args = ap.parse_args(argv)
    rows = []
    before = load_average()
    with tempfile.TemporaryDirectory() as tmp:
        for i, (nproc, allreduce, sim) in enumerate(CASES):
            res = run_case(nproc, allreduce, sim, args.steps, args.batch, Path(tmp) / f"case{i}")
            rows.append((nproc, allreduce, sim, res))
            print(f"{nproc} x {allreduce}{f' ({sim} nodes)' if sim else ''}: {res['step_ms']:.1f} ms/step, "
                  f"{res['images_per_s']:.0f} img/s", file=sys.stderr)
    after = load_average()
    t1 = next(r["step_ms"] for n, _, _, r in rows if n == 1)
    lines = [SECTION, "",
             f"`python bench/distributed_finetune.py --write` on {cpu_name()}, {len(os.sched_getaffinity(0))} cores "
             f"(load average {before} before, {after} after). Bundled CNN, W1A2 DoReFa, Fashion-MNIST, global batch "
             f"{args.batch}, {args.steps} steps per run; step time from the training loop (no evaluation, start-up "
             "or export). Efficiency = t(1) / (P x t(P)) at the same global batch.", "",
             "| processes | allreduce | topology | ms / step | images/s | scaling efficiency | val top-1 |",
             "|---:|---|---|---:|---:|---:|---:|"]
    for nproc, allreduce, sim, r in rows:
        topo = f"{sim} simulated nodes x {nproc // sim}" if sim else ("1 node" if nproc > 1 else "-")
        lines.append(f"| {nproc} | {allreduce if nproc > 1 else 'none'} | {topo} | {r['step_ms']:.1f} | "
                     f"{r['images_per_s']:.0f} | {100 * t1 / (nproc * r['step_ms']):.0f}% | {r['acc']:.1%} |")
    cores = len(os.sched_getaffinity(0))
    lines += ["", f"With {cores} cores, more than {cores} processes share cores: the ideal there is no faster than "
                  f"{cores} processes, so efficiency above {cores} processes is bounded by {cores}/P. The HFReduce rows "
                  "against the DDP rows at the same process count are the comparison of the two allreduces.", ""]
    publish(SECTION, "\n".join(lines), args.write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
