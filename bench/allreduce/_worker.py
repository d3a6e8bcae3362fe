"""One rank of bench_allreduce.py: times every method at every size; rank 0 writes the JSON.

    python _worker.py OUT.json ARGS_JSON     (RANK, WORLD_SIZE, MASTER_ADDR/PORT, LOCAL_* from the driver)
"""

from __future__ import annotations

import json
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from qcompile.runtime.distributed import HFReduce, Topology


def tx_bytes(iface: str | None) -> int:
    if not iface:
        return 0
    return int(Path(f"/sys/class/net/{iface}/statistics/tx_bytes").read_text())


def gbits_of(method: str) -> int | None:
    """hfreduce-tree-g4 -> 4; None without a -g<bits> suffix."""
    last = method.rsplit("-", 1)[-1]
    return int(last[1:]) if last.startswith("g") and last[1:].isdigit() else None


def make_op(method: str, args: dict, topo: Topology):
    """(op(tensor), engine or None) for a method name: gloo | hfreduce-<tree|gloo>[-g<bits>]."""
    if method == "gloo":
        return (lambda x: dist.all_reduce(x)), None
    _, algo, *rest = method.split("-")
    bits = gbits_of(method)
    eng = HFReduce(topo, algorithm=algo, chunk_bytes=args["chunk"], gbits=bits, timeout_s=120)
    return eng.allreduce, eng


def main() -> None:
    out, args = Path(sys.argv[1]), json.loads(sys.argv[2])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=300))
    rank, world = dist.get_rank(), dist.get_world_size()
    topo = Topology.from_env(args.get("sim_nodes"))
    iface = args["iface_by_host"][topo.node] if topo.is_leader and args.get("iface_by_host") else None
    rows = []
    for method in args["methods"]:
        op, eng = make_op(method, args, topo)
        for mib in args["sizes"]:
            x = torch.ones(int(mib * (1 << 20)) // 4)
            op(x)  # warm-up (first touch, connections), and a check: ones sum to the world size
            exact = gbits_of(method) is None
            ok = bool(x.max() <= world + 0.5 and x.min() >= world - 0.5) if exact else bool(x.isfinite().all())
            x.zero_()  # zeros stay zeros: no growth over the timed ops
            dist.barrier()
            t = time.perf_counter()
            op(x)
            dist.barrier()
            once = torch.tensor([time.perf_counter() - t])
            dist.broadcast(once, 0)
            iters = int(min(args["max_iters"], max(args["min_iters"], round(args["budget_s"] / float(once)))))
            dist.barrier()
            tx0, t0 = tx_bytes(iface), time.perf_counter()
            for _ in range(iters):
                op(x)
            dist.barrier()
            seconds, tx1 = time.perf_counter() - t0, tx_bytes(iface)
            per = [None] * world
            dist.all_gather_object(per, {"rank": rank, "leader": topo.is_leader, "tx": (tx1 - tx0) / iters})
            rows.append({"method": method, "mib": mib, "iters": iters, "seconds": seconds / iters, "ok": ok,
                         "tx_per_op": {p["rank"]: p["tx"] for p in per if p["leader"] and iface is not None}})
            if rank == 0:
                print(f"{method:>18} {mib:>5} MiB  {seconds / iters * 1e3:9.2f} ms  x{iters}", flush=True)
        if eng is not None:
            eng.close()
    if rank == 0:
        out.write_text(json.dumps({"rows": rows, "topology": topo.describe(), "world": world}))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
