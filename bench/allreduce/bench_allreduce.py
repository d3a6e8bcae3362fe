"""HFReduce against gloo's allreduce: bus bandwidth (nccl-tests' convention) from 1 MiB to 256 MiB (run on demand).

    python bench/allreduce/bench_allreduce.py            # print the table
    python bench/allreduce/bench_allreduce.py --write    # ... and replace "## HFReduce allreduce" in bench/RESULTS.md

Two topologies, 4 CPU ranks each (float32, one torch thread per rank):
* one machine: the 4 ranks are one node; HFReduce sums in shared memory, gloo runs its ring over loopback;
* two emulated hosts x 2 ranks (needs root): two network namespaces made here, joined by a veth pair whose ends
  shape their egress to --rate (netem, or tbf where the kernel lacks netem), MTU 9000; ranks 0-1 run in one,
  2-3 in the other (``ip netns exec``), gloo bound to the veth (GLOO_SOCKET_IFNAME), the store on its address.
  Traffic stays between the namespaces; they are deleted on every exit path and every run has a deadline.

algbw = S / t; busbw = algbw * 2(n-1)/n with n = 4 ranks, for every method alike (so busbw ratios are time
ratios). Bytes on the inter-node link: the transmit counter of each veth end (/sys/class/net/<if>/statistics)
read by the node leader around the timed ops, per op and per direction, against the prediction:
* gloo's ring over ranks 0-1-2-3 sends 2(n-1)/n * S from every rank to its right neighbour; the edges 1->2 and
  3->0 cross the link, one each way: 1.5 S per direction;
* HFReduce, 2 nodes: the double binary tree sends half of each chunk up and the other half down each way (one
  node is the root of one tree and the leaf of the other): S per direction; gloo's 2-rank allreduce between the
  two leaders also moves S per direction (reduce-scatter S/2 + all-gather S/2);
* HFReduce with gbits=k: k/32 of that plus a 4-byte scale per half chunk.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # bench/_common.py
sys.path.insert(0, str(HERE))
from _common import cpu_name, load_average, publish  # noqa: E402
from _worker import gbits_of  # noqa: E402
from netns import TwoHosts  # noqa: E402

SECTION = "## HFReduce allreduce"
WORKER = HERE / "_worker.py"
WORLD = 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(ranks: list[tuple[list[str], dict]], out: Path, args: dict, timeout: float) -> dict:
    """Start one process per rank (prefix command, env), wait with a deadline, kill what is left; rank 0's JSON."""
    procs = []
    try:
        for prefix, env in ranks:
            cmd = [*prefix, sys.executable, str(WORKER), str(out), json.dumps(args)]
            procs.append(subprocess.Popen(cmd, env=env, start_new_session=True))
        deadline = time.monotonic() + timeout
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        raise SystemExit(f"bench_allreduce: a run passed its {timeout:.0f} s deadline; stopped it") from None
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    bad = [i for i, p in enumerate(procs) if p.returncode != 0]
    if bad or not out.exists():
        raise SystemExit(f"bench_allreduce: ranks {bad} failed (exit codes {[p.returncode for p in procs]})")
    return json.loads(out.read_text())


def _env(**kw) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("QCOMPILE_", "GLOO_", "MASTER_", "LOCAL_"))}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", WORLD_SIZE=str(WORLD), **{k: str(v) for k, v in kw.items()})
    return env


def run_local(args: dict, tmp: Path, timeout: float) -> dict:
    port = _free_port()
    ranks = [([], _env(RANK=r, LOCAL_RANK=r, LOCAL_WORLD_SIZE=WORLD, GROUP_RANK=0, MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=port, GLOO_SOCKET_IFNAME="lo")) for r in range(WORLD)]
    return _launch(ranks, tmp / "local.json", args, timeout)


def run_two_hosts(args: dict, tmp: Path, timeout: float, rate: str, delay: str) -> dict:
    with TwoHosts(rate=rate, delay=delay) as net:
        ranks = []
        for r in range(WORLD):
            host = r // 2
            ranks.append((net.exec_prefix(host), _env(RANK=r, LOCAL_RANK=r % 2, LOCAL_WORLD_SIZE=2, GROUP_RANK=host,
                                                      MASTER_ADDR=net.addr[0], MASTER_PORT=29731,
                                                      GLOO_SOCKET_IFNAME=net.dev[host])))
        result = _launch(ranks, tmp / "twohost.json", {**args, "iface_by_host": net.dev}, timeout)
        result["shaping"] = net.shaping
    return result


def predicted_link_bytes(method: str, size: int, chunk: int) -> float:
    """Payload bytes per op on each direction of the inter-node link (module docstring)."""
    if method == "gloo":
        return 2 * (WORLD - 1) / WORLD * size
    bits = gbits_of(method)
    if bits:
        n_chunks = -(-size // chunk)
        return size * bits / 32 + n_chunks * 2 * 8  # two halves per chunk, one each way; scale + padding <= 8 B
    return float(size)


def table(result: dict, chunk: int, two_hosts: bool) -> tuple[list[str], dict]:
    head = "| method | size | time/op | algbw | busbw | vs gloo |"
    sep = "|---|---:|---:|---:|---:|---:|"
    if two_hosts:
        head += " link bytes/op each way: measured / predicted |"
        sep += "---:|"
    lines = [head, sep]
    gloo = {r["mib"]: r["seconds"] for r in result["rows"] if r["method"] == "gloo"}
    ratios = {}
    for r in result["rows"]:
        size = int(r["mib"] * (1 << 20))
        alg = size / r["seconds"]
        bus = alg * 2 * (WORLD - 1) / WORLD
        ratio = gloo[r["mib"]] / r["seconds"]
        ratios[(r["method"], r["mib"])] = ratio
        name = r["method"] + ("" if r["ok"] else " (WRONG RESULT)")
        line = (f"| {name} | {r['mib']:g} MiB | {r['seconds'] * 1e3:.1f} ms | {alg / 1e9:.3f} GB/s "
                f"| {bus / 1e9:.3f} GB/s | {ratio:.2f}x |")
        if two_hosts:
            tx = list(r["tx_per_op"].values())
            pred = predicted_link_bytes(r["method"], size, chunk)
            measured = " / ".join(f"{t / (1 << 20):.2f}" for t in tx)
            line += f" {measured} MiB / {pred / (1 << 20):.2f} MiB ({max(tx) / pred:.3f}x) |"
        lines.append(line)
    return lines, ratios


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="1,4,16,64,256", help="MiB, comma separated")
    ap.add_argument("--modes", default="local,twohost", help="local, twohost or both")
    ap.add_argument("--rate", default="1gbit", help="inter-node link rate (tc syntax)")
    ap.add_argument("--delay", default="0.1ms", help="inter-node one-way delay (netem only)")
    ap.add_argument("--chunk", type=int, default=1 << 20, help="HFReduce chunk bytes")
    ap.add_argument("--gbits", type=int, default=4, help="bits of the quantized HFReduce variant")
    ap.add_argument("--methods", default=None, help="two-host methods (default: gloo, hfreduce-tree, hfreduce-gloo, "
                                                     "hfreduce-tree-g<gbits>)")
    ap.add_argument("--budget", type=float, default=2.0, help="seconds of timed ops per point (2..40 ops)")
    ap.add_argument("--timeout", type=float, default=900, help="deadline of each topology's run, seconds")
    ap.add_argument("--write", action="store_true", help="write the section into bench/RESULTS.md")
    opts = ap.parse_args()
    sizes = [float(s) for s in opts.sizes.split(",")]
    modes = opts.modes.split(",")
    base = {"sizes": sizes, "chunk": opts.chunk, "budget_s": opts.budget, "min_iters": 2, "max_iters": 40}
    out = [SECTION, ""]
    stamp = datetime.date.today().isoformat()
    out.append(f"`python bench/allreduce/bench_allreduce.py{' --write' if opts.write else ''}` on {cpu_name()}, "
               f"{len(os.sched_getaffinity(0))} cores (load average {load_average()}), {stamp}. 4 ranks, float32, "
               f"one torch thread each, HFReduce chunks of {opts.chunk // 1024} KiB. busbw = algbw * 2(n-1)/n, n = 4. "
               f"`vs gloo`: gloo's time / this method's time at the same size.")
    summary = []
    with tempfile.TemporaryDirectory(prefix="qcompile-allreduce-") as tmp:
        tmp = Path(tmp)
        if "local" in modes:
            res = run_local({**base, "methods": ["gloo", "hfreduce-tree"]}, tmp, opts.timeout)
            lines, _ = table(res, opts.chunk, two_hosts=False)
            out += ["", f"**One machine** ({res['topology']}): HFReduce sums in shared memory; gloo's ring runs over "
                        "loopback TCP.", "", *lines]
        if "twohost" in modes:
            methods = (opts.methods.split(",") if opts.methods else
                       ["gloo", "hfreduce-tree", "hfreduce-gloo", f"hfreduce-tree-g{opts.gbits}"])
            res = run_two_hosts({**base, "methods": methods, "iface": None}, tmp, opts.timeout, opts.rate, opts.delay)
            lines, ratios = table(res, opts.chunk, two_hosts=True)
            out += ["", f"**Two emulated hosts x 2 ranks** ({res['topology']}), inter-node link: veth, "
                        f"{res['shaping']}, MTU 9000. Link bytes: the two leaders' veth transmit counters (host 0 / "
                        "host 1) per op, TCP/IP headers and ACKs included, against the payload the algorithm "
                        "must move (module docstring of the script).", "", *lines]
            worst = {m: min(r for (mm, mib), r in ratios.items() if mm == m and mib >= 64)
                     for m in ("hfreduce-tree", "hfreduce-gloo") if any(mm == m and mib >= 64 for mm, mib in ratios)}
            if worst:
                said = ", ".join(f"{m} {r:.3f}x ({'met' if r >= 1.5 else 'not met'})" for m, r in worst.items())
                summary.append(f"Goal (HFReduce >= 1.5x gloo's busbw at 64 MiB and above, two hosts), smallest "
                               f"ratio at those sizes: {said}. Unquantized, 1.5x is also the bound: gloo's ring puts "
                               f"1.5 S on each direction of the link and HFReduce S, so the ratio exceeds 1.5x only "
                               f"where gloo drives the link less efficiently than HFReduce.")
            quantized = [m for m in methods if gbits_of(m)]
            for m in quantized:
                by = {(r["method"], r["mib"]): r for r in res["rows"]}
                big = max(mib for (mm, mib) in by if mm == m)
                base = by.get(("hfreduce-tree", big))
                if base:
                    share = max(by[(m, big)]["tx_per_op"].values()) / max(base["tx_per_op"].values())
                    summary.append(f"{m} puts {share:.3f} of hfreduce-tree's bytes on the link at {big:g} MiB "
                                   f"(predicted {gbits_of(m)}/32 = {gbits_of(m) / 32:.3f} plus scales); its time here "
                                   "is set by quantizing and decoding on the two shared cores, not by the link.")
    summary.append("GPU path (device-to-host into the registered segment, host-to-device back): not measured, no GPU "
                   "on this machine; the tests run its copies with CPU tensors (`staging=True`).")
    if summary:
        out += ["", *summary]
    publish(SECTION, "\n".join(out), opts.write)


if __name__ == "__main__":
    main()
