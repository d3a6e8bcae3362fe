"""Data-parallel fine-tuning: one process per rank (torchrun's environment), DDP, and HFReduce as its allreduce.

Every rank builds the same student from the same post-training quantization and reads the same global batch order
(a function of the seed and the epoch, qcompile.finetune.data), then trains on its contiguous slice of each
global batch. DDP averages the gradients, so a step equals one process's step on the whole global batch up to the
order of float summation. Rank 0 alone logs, writes checkpoints and the results; every rank can resume from them.

    qcompile finetune MODEL --nproc 4 ...                      # the processes on this machine (torchrun inside)
    torchrun --nnodes 2 --nproc-per-node 4 ... -m qcompile finetune MODEL ...   # across machines

The allreduce (``--allreduce``): ``hfreduce`` (the default; runtime/distributed: host shared memory within a
node, a double binary tree between node leaders) or ``ddp`` (torch's own bucketed allreduce over gloo/NCCL).
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from qcompile.errors import QcompileError

ALLREDUCE = ("hfreduce", "ddp")


class PeerFailure(QcompileError):
    """Another rank died or hung: this one stops too. Exit with os._exit after reporting it (teardown can hang)."""

TIMEOUT_ENV = "QCOMPILE_DIST_TIMEOUT"   # seconds a collective may wait for a rank that does not come (default 120)


@dataclass
class DistContext:
    """Where this process stands in the job; ``world == 1`` is a plain single-process run."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    allreduce: str = "hfreduce"
    engine: object = None          # the HFReduce engine when in use (closed by close())
    peers: tuple = ()              # (host, pid) of every rank: a failure names the rank that is gone
    failed: bool = False           # another rank failed: no orderly teardown (PeerFailure's handler exits)

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, xb: np.ndarray, yb: np.ndarray | None):
        """This rank's contiguous slice of a global batch."""
        if not self.enabled:
            return xb, yb
        per = len(xb) // self.world
        lo, hi = self.rank * per, (self.rank + 1) * per
        return xb[lo:hi], (None if yb is None else yb[lo:hi])

    def wrap(self, student: torch.nn.Module) -> torch.nn.Module:
        """The module the training step calls: DDP over the student (its parameters are the student's)."""
        if not self.enabled:
            return student
        from torch.nn.parallel import DistributedDataParallel as DDP

        ddp = DDP(student)
        if self.allreduce == "hfreduce":
            from qcompile.runtime.distributed import HFReduce, register

            self.engine = HFReduce()
            register(ddp, self.engine)
        return ddp

    def sum(self, values: list[float]) -> list[float]:
        """Per-step statistics (loss, correct answers) summed over the ranks, so rank 0 logs the global batch's."""
        if not self.enabled:
            return values
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t)
        return t.tolist()

    def failure(self, exc: BaseException) -> str | None:
        """One line for an exception that means another rank failed (HFReduce names it; gloo says its socket
        closed), or None for anything else."""
        if not self.enabled:
            return None
        import torch.distributed as dist

        from qcompile.runtime.distributed.hfreduce import HFReduceError, failure_reason

        # DDP re-raises a failed comm hook as a plain RuntimeError holding HFReduce's reason
        text = failure_reason(exc) or (str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
        if not (isinstance(exc, HFReduceError) or failure_reason(exc) or
                isinstance(exc, getattr(dist, "DistError", ())) or
                "Connection closed by peer" in text or "Connection reset" in text):
            return None
        self.failed = True
        gone = self.gone()
        who = (f"rank {', '.join(map(str, gone))} {'is' if len(gone) == 1 else 'are'} gone" if gone else
               "a rank on another machine stopped or hung")
        return f"rank {self.rank} of {self.world}: distributed training stopped, {who} ({text[:200]})"

    def gone(self) -> list[int]:
        """Ranks on this machine whose process no longer exists."""
        host = socket.gethostname()
        dead = []
        for r, (h, pid) in enumerate(self.peers):
            if h == host and r != self.rank:
                if not _alive(pid):
                    dead.append(r)
        return dead

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        if self.failed:  # with a peer gone, gloo's and HFReduce's teardown can hang: the process exits instead
            return
        if self.engine is not None:
            self.engine.close()
            self.engine = None
        if self.enabled:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def _alive(pid: int) -> bool:
    """The process exists and is not a zombie (a killed rank stays one until its launcher reaps it)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def from_env(allreduce: str = "hfreduce", batch: int | None = None) -> DistContext:
    """The job this process belongs to: torchrun's RANK/WORLD_SIZE/LOCAL_RANK (and MASTER_ADDR/PORT) when set,
    else a single process. Initializes torch.distributed (gloo on CPUs, NCCL on GPUs)."""
    if allreduce not in ALLREDUCE:
        raise QcompileError(f"--allreduce {allreduce}: choose one of {', '.join(ALLREDUCE)}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext(allreduce=allreduce)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if batch is not None and batch % world:
        raise QcompileError(f"--batch {batch} does not split evenly over {world} processes; give a multiple of "
                            f"{world} (the global batch)")
    import torch.distributed as dist

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    timeout = datetime.timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, 120)))
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timeout)
    peers: list = [None] * world
    dist.all_gather_object(peers, (socket.gethostname(), os.getpid()))
    return DistContext(rank=rank, world=world, local_rank=local, allreduce=allreduce, peers=tuple(peers))


def launch(argv: list[str], nproc: int) -> int:
    """Run ``qcompile <argv>`` as ``nproc`` processes on this machine through torchrun's launcher; a rank that fails
    stops the others, and the error names it. Returns the exit status."""
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    import sys

    cfg = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"qcompile-{os.getpid()}",
                       rdzv_backend="c10d", rdzv_endpoint="127.0.0.1:0", max_restarts=0, monitor_interval=0.5,
                       start_method="spawn")
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    try:
        elastic_launch(cfg, entrypoint=sys.executable)("-m", "qcompile", *argv)
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        how = (f"was killed by signal {failure.signal_name()}" if failure.signal_name() != "<N/A>"
               else f"exited with status {failure.exitcode}")
        raise QcompileError(f"rank {rank} of {nproc} {how}; the other ranks were stopped (its log is above)") from None
    return 0
