"""Start a small job of CPU ranks (one subprocess each, gloo over 127.0.0.1) running a scenario of _worker.py.

Like torchrun's agent, this process hosts the job's TCPStore, so the store outlives any rank that dies (HFReduce
leaves the first failure's reason there for the other nodes)."""

from __future__ import annotations

import json
import os
import signal
from datetime import timedelta
import subprocess
import sys
import time
from pathlib import Path

WORKER = Path(__file__).with_name("_worker.py")
SHM = Path("/dev/shm")


def shm_names() -> set[str]:
    return {n for n in os.listdir(SHM) if n.startswith("qcompile_hfr_")}


class Job:
    """`world` ranks of `scenario`; each writes <out>/rank<r>.json."""

    def __init__(self, scenario: str, out: Path, world: int = 4, sim_nodes: int | None = 2, args: dict | None = None,
                 env: dict | None = None):
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        import torch.distributed as dist

        self.store = dist.TCPStore("127.0.0.1", 0, world, is_master=True, wait_for_workers=False,
                                   timeout=timedelta(seconds=60))
        port = self.store.port
        base = {k: v for k, v in os.environ.items() if not k.startswith(("QCOMPILE_", "RANK", "LOCAL_", "GROUP_"))}
        base.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **(env or {}))
        if sim_nodes is not None:
            base["QCOMPILE_SIM_NODES"] = str(sim_nodes)
        self.procs = []
        for rank in range(world):
            cmd = [sys.executable, str(WORKER), scenario, str(rank), str(world), str(port), str(self.out),
                   json.dumps(args or {})]
            log = open(self.out / f"rank{rank}.log", "w")
            self.procs.append(subprocess.Popen(cmd, env=base, stdout=log, stderr=subprocess.STDOUT))

    def wait(self, timeout: float) -> list[int | None]:
        deadline = time.monotonic() + timeout
        for p in self.procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        codes = [p.poll() for p in self.procs]
        for p in self.procs:  # never leave a rank behind
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
                p.wait()
        return codes

    def results(self) -> list[dict | None]:
        out = []
        for rank in range(len(self.procs)):
            f = self.out / f"rank{rank}.json"
            out.append(json.loads(f.read_text()) if f.exists() else None)
        return out

    def log(self, rank: int) -> str:
        return (self.out / f"rank{rank}.log").read_text()[-3000:]


def run(scenario: str, out: Path, timeout: float = 60, **kw) -> list[dict]:
    """Run a scenario to the end; fail with the ranks' logs unless every rank wrote its result and exited 0."""
    job = Job(scenario, out, **kw)
    codes = job.wait(timeout)
    results = job.results()
    bad = [r for r, (c, res) in enumerate(zip(codes, results)) if c != 0 or res is None]
    if bad:
        logs = "\n".join(f"--- rank {r} (exit {codes[r]}):\n{job.log(r)}" for r in bad)
        raise AssertionError(f"{scenario}: ranks {bad} failed\n{logs}")
    return results
