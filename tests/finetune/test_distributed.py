"""Data-parallel fine-tuning: 2 ranks equal 1 process on the same global batch, resume, a killed rank, --nproc."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import qcompile
from qcompile import datasets

RANK_SCRIPT = Path(__file__).with_name("_ft_rank.py")
KW = dict(config="w2a2", steps=6, batch=32, lr=1e-3, seed=3)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(tmp: Path, name: str, world: int, env: dict | None = None, **kw) -> list[subprocess.Popen]:
    """`world` ranks with torchrun's environment, each running _ft_rank.py."""
    (tmp / f"{name}.json").write_text(json.dumps({**KW, **kw}))
    port = _port()
    procs = []
    for rank in range(world):
        e = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_", "LOCAL_", "QCOMPILE_SIM"))}
        e.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                 GROUP_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
                 **(env or {}))
        log = open(tmp / f"{name}-rank{rank}.log", "w")
        procs.append(subprocess.Popen([sys.executable, str(RANK_SCRIPT), str(tmp / f"{name}.json"),
                                       str(tmp / f"{name}.npz")], env=e, stdout=log, stderr=subprocess.STDOUT))
    return procs


def _wait(procs, timeout=240) -> list[int]:
    deadline = time.monotonic() + timeout
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(max(0.1, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            p.kill()
            codes.append(p.wait())
    return codes


def _single(tmp: Path, **kw):
    x, y = datasets.load_sample()
    res = qcompile.finetune(datasets.bundled_model("mlp"), data=(x[:256], y[:256]), val=(x[256:320], y[256:320]),
                            log=lambda s: None, **{**KW, **kw})
    return res.report["history"]["step_loss"], {k: v.detach().numpy()
                                                for k, v in res.checkpoint["state"]["student"].items()}


def _shm() -> set[str]:
    return {n for n in os.listdir("/dev/shm") if n.startswith("qcompile_")}


@pytest.mark.parametrize("allreduce", ["hfreduce", "ddp"])
def test_two_ranks_equal_one_process_with_the_same_global_batch(tmp_path, allreduce):
    losses, params = _single(tmp_path)
    assert _wait(_start(tmp_path, "two", 2, allreduce=allreduce)) == [0, 0], (tmp_path / "two-rank0.log").read_text()
    got = np.load(tmp_path / "two.npz")
    np.testing.assert_allclose(got["step_loss"], losses, rtol=1e-5)
    for k, v in params.items():
        np.testing.assert_allclose(got[k.replace(".", "/")], v, rtol=1e-4, atol=1e-6, err_msg=k)


def test_two_ranks_resume_exactly(tmp_path):
    before = _shm()
    assert _wait(_start(tmp_path, "full", 2, out=str(tmp_path / "a"))) == [0, 0]
    codes = _wait(_start(tmp_path, "cut", 2, out=str(tmp_path / "b"), _stop_after_steps=3))
    assert codes == [3, 3] and (tmp_path / "b" / "checkpoint.pt").is_file()
    assert "interrupted at step 3" in (tmp_path / "cut-rank0.log").read_text()
    assert _wait(_start(tmp_path, "resumed", 2, out=str(tmp_path / "b"), resume=True)) == [0, 0]
    a, b = np.load(tmp_path / "full.npz"), np.load(tmp_path / "resumed.npz")
    assert a.files == b.files and all(np.array_equal(a[k], b[k]) for k in a.files)
    assert _shm() <= before                                  # no segment left behind


def test_a_killed_rank_stops_the_others_with_its_name(tmp_path):
    before = _shm()
    out = tmp_path / "k"
    procs = _start(tmp_path, "kill", 2, env={"QCOMPILE_HFREDUCE_TIMEOUT": "20", "QCOMPILE_DIST_TIMEOUT": "20"},
                   steps=100000, out=str(out), checkpoint_every=2)
    deadline = time.monotonic() + 120
    while not (out / "checkpoint.pt").is_file():           # training is under way
        assert time.monotonic() < deadline and procs[0].poll() is None, (tmp_path / "kill-rank0.log").read_text()
        time.sleep(0.2)
    procs[1].send_signal(signal.SIGKILL)
    start = time.monotonic()
    code = _wait(procs[:1], timeout=60)[0]
    procs[1].wait()
    log = (tmp_path / "kill-rank0.log").read_text()
    assert time.monotonic() - start < 40, log
    assert code == 3 and "rank 1" in log and "distributed training stopped" in log, log
    assert "Traceback" not in log, log
    assert _shm() <= before, _shm() - before


def test_nproc_starts_the_ranks_itself(tmp_path):
    from click.testing import CliRunner  # noqa: F401  (the launcher runs real processes: use a subprocess)

    x, y = datasets.load_sample()
    np.savez(tmp_path / "d.npz", x=x[:256], y=y[:256])
    cmd = [sys.executable, "-m", "qcompile", "finetune", str(datasets.bundled_model("mlp")), "--config", "w2a2",
           "--data", str(tmp_path / "d.npz"), "--steps", "4", "--batch", "32", "--nproc", "2", "--sim-nodes", "2",
           "-o", str(tmp_path / "ft")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "ft" / "model.onnx").is_file() and (tmp_path / "ft" / "checkpoint.pt").is_file()
    bad = subprocess.run(cmd[:-2] + ["--batch", "33", "-o", str(tmp_path / "ft2")], capture_output=True, text=True,
                         timeout=240)
    assert bad.returncode != 0 and "does not split evenly over 2 processes" in bad.stderr
