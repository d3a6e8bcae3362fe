"""HFReduce: 4 CPU ranks (gloo) as 1-4 simulated nodes against dist.all_reduce and plain DDP; failures; /dev/shm.

The multi-process checks run in few jobs (starting 4 torch processes on 2 cores costs ~8 s): one job runs every
layout x algorithm x size and the DDP comparison, and each killed-rank case is its own job."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
import torch

from qcompile.runtime.distributed import (
    Topology,
    TopologyError,
    btree,
    dorefa_decode,
    dorefa_encode,
    double_binary_tree,
    message_bytes,
)
from qcompile.runtime.distributed.shm import NodeSegment, segment_name, sweep_stale
from tests.distributed import _launch

NODE_COUNTS = (1, 2, 3, 4)
ALGORITHMS = ("tree", "gloo")
CHUNK = 256  # bytes: 64 float32 per chunk, so the sizes below cross, hit and miss chunk boundaries
SIZES = [1, 7, 63, 64, 65, 1000, 3333]
STAGED_NODES = (2, 4)  # the GPU data path (leader and lone ranks copy to the host first) run with CPU tensors
KILL_TIMEOUT = 8.0  # QCOMPILE_HFREDUCE_TIMEOUT of the killed-rank jobs


# ---- layout, trees and messages (in process) -------------------------------------------------------------------------
@pytest.mark.parametrize("world,k,sizes", [(4, 1, [4]), (4, 2, [2, 2]), (4, 3, [2, 1, 1]), (4, 4, [1, 1, 1, 1]),
                                           (7, 3, [3, 2, 2])])
def test_simulated_nodes_are_consecutive_ranks(world, k, sizes):
    topos = [Topology.from_env(env={"RANK": str(r), "WORLD_SIZE": str(world), "QCOMPILE_SIM_NODES": str(k)})
             for r in range(world)]
    assert [len(n) for n in topos[0].nodes] == sizes
    assert [r for n in topos[0].nodes for r in n] == list(range(world))
    for t in topos:
        assert t.simulated and t.n_nodes == k and t.node_ranks[t.local_rank] == t.rank
        assert t.is_leader == (t.rank in t.leaders)


def test_torchrun_environment():
    env = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4", "GROUP_RANK": "1"}
    t = Topology.from_env(env=env)
    assert (t.node, t.local_rank, t.local_world, t.n_nodes, t.leader, t.leaders) == (1, 1, 4, 2, 4, (0, 4))
    assert not t.simulated
    assert Topology.from_env(env={"RANK": "2", "WORLD_SIZE": "3"}).nodes == ((0, 1, 2),)  # no env: one machine
    assert Topology.from_env(2, env=env).nodes == ((0, 1, 2, 3), (4, 5, 6, 7))  # the override wins
    with pytest.raises(TopologyError, match="GROUP_RANK"):
        Topology.from_env(env={**env, "GROUP_RANK": "0"})
    with pytest.raises(TopologyError, match="QCOMPILE_SIM_NODES=9"):
        Topology.from_env(env={**env, "QCOMPILE_SIM_NODES": "9"})


@pytest.mark.parametrize("n", list(range(1, 34)))
def test_double_binary_tree_spans_every_node_count(n):
    trees = [{i: double_binary_tree(n, i)[t] for i in range(n)} for t in (0, 1)]
    assert trees[0] == {i: btree(n, i) for i in range(n)}
    for tree in trees:
        roots = [i for i, (p, _) in tree.items() if p is None]
        assert len(roots) == 1
        for i, (p, children) in tree.items():
            assert len(children) <= 2 and all(tree[c][0] == i for c in children)
            assert p is None or i in tree[p][1]
        seen, todo = set(), [roots[0]]
        while todo:
            seen.add(todo[-1])
            todo += tree[todo.pop()][1]
        assert seen == set(range(n))
    if n > 2:  # each node forwards in one tree only (odd n: node 0 roots the first tree with one child)
        both = [i for i in range(n) if trees[0][i][1] and trees[1][i][1]]
        assert both == ([] if n % 2 == 0 else [0]) and len(trees[0][0][1]) == 1


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_dorefa_messages(bits):
    n = (1 << bits) - 1
    x = torch.randn(1001, generator=torch.Generator().manual_seed(bits))
    g = torch.Generator().manual_seed(0)
    msg = dorefa_encode(x, bits, g)
    assert msg.dtype == torch.uint8 and msg.numel() == message_bytes(1001, bits) <= bits * ((1001 + 7) // 8) + 8
    y = dorefa_decode(msg, 1001, bits)
    s = x.abs().max()
    codes = (y / (2 * s) + 0.5) * n  # on the grid 2s(q/n - 1/2), q = 0..n
    assert torch.allclose(codes, codes.round(), atol=1e-4) and (y - x).abs().max() <= 2 * s / n + 1e-6
    mean = torch.stack([dorefa_decode(dorefa_encode(x, bits, g), 1001, bits) for _ in range(400)]).mean(0)
    assert (mean - x).abs().mean() < 0.05 * s  # unbiased: one-LSB dither makes the rounding stochastic
    assert torch.equal(dorefa_decode(dorefa_encode(torch.zeros(9), bits, g), 9, bits).abs(), torch.zeros(9))


# ---- /dev/shm on every exit path ------------------------------------------------------------------------------------
SHM_PY = Path(__file__).parents[2] / "runtime" / "distributed" / "shm.py"


def _shm_module():
    """shm.py on its own (it needs no torch), as a child process would load it."""
    spec = importlib.util.spec_from_file_location("hfr_shm", SHM_PY)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _holder(name: str) -> subprocess.Popen:
    # a job started in the background (CI) inherits SIGINT ignored; a user's rank gets Ctrl-C's default action
    code = textwrap.dedent(f"""
        import importlib.util, signal, sys, time
        signal.signal(signal.SIGINT, signal.default_int_handler)
        spec = importlib.util.spec_from_file_location("hfr_shm", {str(SHM_PY)!r})
        shm = importlib.util.module_from_spec(spec); spec.loader.exec_module(shm)
        seg = shm.NodeSegment.create({name!r}, 4096)
        print("ready", flush=True)
        time.sleep(30)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_segment_name_removed_on_signal(sig):
    name = segment_name(uuid.uuid4().hex[:12], 0, pid=1)
    proc = _holder(name)
    assert (Path("/dev/shm") / name).exists()
    proc.send_signal(sig)
    proc.wait(timeout=10)
    assert proc.returncode != 0 and not (Path("/dev/shm") / name).exists()


def test_segment_name_removed_on_exception_and_close():
    name = segment_name(uuid.uuid4().hex[:12], 0)
    with pytest.raises(RuntimeError), NodeSegment.create(name, 4096) as seg:
        assert seg.buf[:4] == b"\0\0\0\0"
        raise RuntimeError("boom")
    assert not (Path("/dev/shm") / name).exists()
    seg = NodeSegment.create(name, 4096)
    other = NodeSegment.open(name, 4096)
    other.buf[0] = 7
    seg.unlink()  # what HFReduce does once every local rank has it mapped
    assert not (Path("/dev/shm") / name).exists() and seg.buf[0] == 7
    seg.close()
    other.close()


def test_stale_segments_are_swept_after_sigkill():
    job = uuid.uuid4().hex[:12]
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    name = segment_name(job, 0, pid=victim.pid)
    NodeSegment.create(name, 4096).buf.close()  # stands in for the victim's segment (a second name)...
    holder = _holder(segment_name(job, 1, pid=victim.pid))
    holder.send_signal(signal.SIGKILL)  # ...and a real one: SIGKILL runs no handler, the name stays
    holder.wait()
    victim.kill()
    victim.wait()
    live = segment_name(job, 2)  # our own pid: alive, so the sweep must keep it
    NodeSegment.create(live, 4096).buf.close()
    removed = sweep_stale()
    assert {name, segment_name(job, 1, pid=victim.pid)} <= set(removed) and live not in removed
    assert sweep_stale(job) == [live]
    assert not [n for n in os.listdir("/dev/shm") if job in n]


# ---- 4 ranks -------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    before = _launch.shm_names()
    args = {
        "allreduce": {"nodes": list(NODE_COUNTS), "algorithms": list(ALGORITHMS), "chunk_bytes": CHUNK, "sizes": SIZES,
                      "staged_nodes": list(STAGED_NODES)},
        "gbits": {"nodes": [2, 3], "algorithms": list(ALGORITHMS), "chunk_bytes": 4096, "bits": 4, "size": 5000},
        "ddp": {"algorithms": list(ALGORITHMS), "chunk_bytes": CHUNK, "steps": 5},
    }
    results = _launch.run("suite", tmp_path_factory.mktemp("suite"), timeout=150, sim_nodes=2, args=args)
    return {"results": results, "leaked": _launch.shm_names() - before}


@pytest.mark.parametrize("algo", ALGORITHMS)
@pytest.mark.parametrize("n_nodes", NODE_COUNTS)
def test_matches_all_reduce(suite, n_nodes, algo):
    for rank, res in enumerate(suite["results"]):
        checks = [c for c in res["allreduce"] if c["nodes"] == n_nodes and c["algo"] == algo]
        assert len(checks) == 2 * len(SIZES) + 5
        bad = [c for c in checks if not c["ok"]]
        assert not bad, f"rank {rank}: {bad}"  # integer-valued: exact; random: allclose; bursts: exact


@pytest.mark.parametrize("algo", ALGORITHMS)
def test_gbits_quantizes_what_leaders_send(suite, algo):
    for rank, res in enumerate(suite["results"]):
        for g in (g for g in res["gbits"] if g["algo"] == algo):
            assert g["identical"], f"rank {rank}: ranks disagree after a quantized allreduce ({g})"
            assert 0 < g["maxdiff"] <= g["bound"]
            if g["leader"]:  # 4 bits plus one float32 scale per message, against 32 bits
                assert g["sent_fp32"] * 4 / 32 <= g["sent"] <= g["sent_fp32"] * 4 / 32 * 1.05, g
            else:
                assert g["sent"] == g["sent_fp32"] == 0


@pytest.mark.parametrize("n_nodes", STAGED_NODES)
def test_gpu_staging_path_with_cpu_tensors(suite, n_nodes):
    """No GPU here: staging=True makes CPU tensors take the copies a CUDA tensor takes (memcpy for D2H/H2D)."""
    for rank, res in enumerate(suite["results"]):
        checks = [c for c in res["allreduce"] if c["nodes"] == n_nodes and c["algo"] == "tree-staged"]
        assert len(checks) == 2 * len(SIZES) + 5 and all(c["ok"] for c in checks), f"rank {rank}: {checks}"


@pytest.mark.parametrize("algo", ALGORITHMS)
def test_ddp_with_hook_matches_plain_ddp(suite, algo):
    for res in suite["results"]:
        d = next(d for d in res["ddp"] if d["algo"] == algo)
        assert d["layout"].startswith("2 simulated node(s) (2+2 ranks)")  # QCOMPILE_SIM_NODES=2 from the env
        assert d["steps"] == 5 and d["ops"] > 5  # several buckets per step went through the hook
        assert d["moved"] > 1e-3 and d["maxdiff"] < 1e-6


def test_no_shared_memory_left_after_a_normal_run(suite):
    assert not suite["leaked"]


# a non-leader, a node leader, and a non-leader inside DDP's backward (DDP re-raises the hook's error)
@pytest.mark.parametrize("algo,victim,ddp", [("tree", 3, False), ("gloo", 2, False), ("tree", 1, True)])
def test_killed_rank_stops_the_others_naming_it(tmp_path, algo, victim, ddp):
    before = _launch.shm_names()
    job = _launch.Job("kill", tmp_path, sim_nodes=2, args={"algorithm": algo, "timeout_s": KILL_TIMEOUT,
                                                           "victim": victim, "size": 200_000, "ddp": ddp})
    codes = job.wait(timeout=60)
    assert codes[victim] == -signal.SIGKILL
    killed_at = float((tmp_path / "killed_at").read_text())
    for rank, res in enumerate(job.results()):
        if rank == victim:
            continue
        assert codes[rank] == 0 and res is not None, job.log(rank)
        assert f"rank {victim} " in res["error"] and "died" in res["error"], res["error"]
        assert res["at"] - killed_at < KILL_TIMEOUT, res  # well inside: death is seen from the pid, not the timeout
    assert not _launch.shm_names() - before
