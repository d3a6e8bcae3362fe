"""One rank of a test job (started by _launch.py): python _worker.py SCENARIO RANK WORLD PORT OUTDIR ARGS_JSON."""

from __future__ import annotations

import copy
import json
import os
import signal
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from qcompile.runtime.distributed import (HFReduce, HFReduceError, HFReduceState, Topology, failure_reason,
                                          hfreduce_hook, register)


def gen(*key) -> torch.Generator:
    return torch.Generator().manual_seed(hash(key) % (1 << 31))


def allreduce(rank: int, world: int, args: dict) -> list[dict]:
    """Every node count x algorithm: HFReduce against dist.all_reduce on the same inputs."""
    checks = []
    configs = [(n, a, None) for n in args["nodes"] for a in args["algorithms"]]
    configs += [(n, "tree", True) for n in args["staged_nodes"]]  # the GPU data path, with CPU tensors
    for n_nodes, algo, staging in configs:
        topo = Topology.simulate(rank, world, n_nodes)
        eng = HFReduce(topo, algorithm=algo, chunk_bytes=args["chunk_bytes"], timeout_s=20, staging=staging)
        tag = {"nodes": n_nodes, "algo": algo if staging is None else f"{algo}-staged"}
        for size in args["sizes"]:
            for kind in ("int", "randn"):
                g = gen(rank, size, kind)
                x = (torch.randint(-50, 50, (size,), generator=g).float() if kind == "int"
                     else torch.randn(size, generator=g))
                ref = x.clone()
                dist.all_reduce(ref)
                got = eng.allreduce(x.clone())
                ok = torch.equal(got, ref) if kind == "int" else torch.allclose(got, ref, rtol=1e-5, atol=1e-5)
                checks.append({**tag, "size": size, "kind": kind, "ok": bool(ok),
                               "maxdiff": (got - ref).abs().max().item()})
        # several requests in flight at once (DDP's buckets), other dtypes, a non-contiguous tensor
        xs = [torch.randint(-9, 9, (n,), generator=gen(rank, n, "burst")).to(dt)
              for n, dt in ((3000, torch.float32), (17, torch.float64), (5000, torch.float32), (1, torch.int64))]
        xs.append(torch.randint(-9, 9, (40, 30), generator=gen(rank, "t")).float().t())
        refs = [x.clone() for x in xs]
        for r in refs:
            dist.all_reduce(r)
        futs = [eng.allreduce_async(x) for x in xs]
        for i, (f, r) in enumerate(zip(futs, refs)):
            checks.append({**tag, "size": r.numel(), "kind": f"burst{i}-{r.dtype}", "ok": torch.equal(f.wait(), r)})
        eng.close()
    return checks


def gbits(rank: int, world: int, args: dict) -> list[dict]:
    """Quantized inter-node messages: every rank ends with the same values, close to the exact sum; bytes sent."""
    out = []
    bits = args["bits"]
    levels = (1 << bits) - 1
    for n_nodes in args["nodes"]:
        topo = Topology.simulate(rank, world, n_nodes)
        for algo in args["algorithms"]:
            eng = HFReduce(topo, algorithm=algo, chunk_bytes=args["chunk_bytes"], gbits=bits, timeout_s=20)
            x = torch.randn(args["size"], generator=gen(rank, "g"))
            ref = x.clone()
            dist.all_reduce(ref)
            got = eng.allreduce(x.clone())
            everyone = [torch.empty_like(got) for _ in range(world)]
            dist.all_gather(everyone, got)
            # each message is off by at most one step 2s/n per element, with s <= world * max|x|; a value is
            # quantized at most once per tree level on the way up and once on the way down
            bound = float(x.abs().max())
            maxes = [torch.zeros(()) + bound for _ in range(world)]
            dist.all_gather(maxes, torch.zeros(()) + bound)
            step = 2 * world * float(max(maxes)) / levels
            sent = eng.stats["internode_sent_bytes"]
            eng.close()
            eng = HFReduce(topo, algorithm=algo, chunk_bytes=args["chunk_bytes"], timeout_s=20)  # the same, unquantized
            eng.allreduce(x.clone())
            out.append({"nodes": n_nodes, "algo": algo, "identical": all(torch.equal(e, everyone[0]) for e in everyone),
                        "maxdiff": (got - ref).abs().max().item(), "bound": (n_nodes + 1) * step,
                        "leader": topo.is_leader, "sent": sent, "sent_fp32": eng.stats["internode_sent_bytes"]})
            eng.close()
    return out


def suite(rank: int, world: int, args: dict) -> dict:
    return {"allreduce": allreduce(rank, world, args["allreduce"]), "gbits": gbits(rank, world, args["gbits"]),
            "ddp": [ddp(rank, world, {**args["ddp"], "algorithm": a}) for a in args["ddp"]["algorithms"]]}


def ddp(rank: int, world: int, args: dict) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(13, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64), torch.nn.ReLU(),
                                torch.nn.Linear(64, 7))
    plain, hooked = DDP(copy.deepcopy(model)), DDP(copy.deepcopy(model), bucket_cap_mb=0.01)
    engine = HFReduce(algorithm=args["algorithm"], chunk_bytes=args["chunk_bytes"], timeout_s=20)  # env layout
    state = HFReduceState(engine)
    hooked.register_comm_hook(state, hfreduce_hook)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (plain, hooked)]
    for step in range(args["steps"]):
        g = gen(rank, step)
        x, y = torch.randn(16, 13, generator=g), torch.randn(16, 7, generator=g)
        for m, opt in zip((plain, hooked), opts):
            opt.zero_grad()
            torch.nn.functional.mse_loss(m(x), y).backward()
            opt.step()
    diff = max((a - b).abs().max().item() for a, b in zip(plain.parameters(), hooked.parameters()))
    moved = max((a - b).abs().max().item() for a, b in zip(model.parameters(), hooked.parameters()))
    engine.close()
    return {"algo": args["algorithm"], "maxdiff": diff, "moved": moved, "steps": state.step,
            "ops": engine.stats["ops"], "layout": engine.topo.describe()}


def kill_ddp(rank: int, world: int, args: dict, out: Path) -> dict:
    """DDP with the hook; the victim dies between its forward and its backward, the others are in the hook."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(0)
    model = DDP(torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 8)),
                bucket_cap_mb=0.05)
    register(model, HFReduce(algorithm=args["algorithm"], chunk_bytes=4096, timeout_s=args["timeout_s"]))
    x = torch.randn(8, 64, generator=gen(rank))
    try:
        for step in range(1000):
            loss = model(x).square().mean()
            if rank == args["victim"] and step == 3:  # after DDP rebuilt its buckets (step 1 syncs in forward)
                (out / "killed_at").write_text(repr(time.time()))
                os.kill(os.getpid(), signal.SIGKILL)
            loss.backward()
    except RuntimeError as exc:  # DDP re-raises the hook's HFReduceError as a RuntimeError
        return {"error": failure_reason(exc) or str(exc), "at": time.time(), "type": type(exc).__name__}
    return {"error": "", "at": time.time()}


def kill(rank: int, world: int, args: dict, out: Path) -> dict:
    if args.get("ddp"):
        return kill_ddp(rank, world, args, out)
    eng = HFReduce(algorithm=args["algorithm"], chunk_bytes=4096, timeout_s=args["timeout_s"])
    x = torch.ones(args["size"])
    eng.allreduce(x)  # one good op first
    dist.barrier()
    if rank == args["victim"]:
        eng.allreduce_async(torch.ones(args["size"]))
        time.sleep(0.02)  # mid-allreduce
        (out / "killed_at").write_text(repr(time.time()))
        os.kill(os.getpid(), signal.SIGKILL)
    try:
        while True:
            eng.allreduce(x.fill_(1.0))
    except HFReduceError as exc:
        return {"error": str(exc), "at": time.time()}


def main() -> None:
    scenario, rank, world, port, out, args = sys.argv[1:7]
    rank, world, out, args = int(rank), int(world), Path(out), json.loads(args)
    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", int(port), world, is_master=False, timeout=timedelta(seconds=60))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    Topology.from_env()  # the override or the plain environment must give a layout
    if scenario == "kill":
        result = kill(rank, world, args, out)
    else:
        result = suite(rank, world, args)
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    if scenario == "kill":
        os._exit(0)  # a peer is gone: gloo's teardown may abort or wait for it
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
