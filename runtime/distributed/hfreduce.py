"""HFReduce: allreduce through each node's host memory, then a double binary tree between nodes (Fire-Flyer §IV).

Data path of one allreduce of a tensor of S bytes, cut into chunks of ``chunk_bytes`` (papers.md §4.2):

1. **stage in**: every non-leader local rank copies chunk i into its slot of the node's shared-memory segment
   (a memcpy for CPU tensors, a device-to-host copy into host-registered memory for CUDA tensors). Each rank has
   ``nbuf`` slot buffers, so it copies chunk i+1.. while the leader still sums chunk i;
2. **node sum**: the leader adds its own chunk and the slots with torch ops on views of the segment (vectorised,
   one pass for two ranks) into one of ``nres`` result buffers, and frees the slot buffer;
3. **between nodes** (a second leader thread, so chunk i crosses the network while chunk i+1 is summed, with up
   to ``QCOMPILE_HFREDUCE_DEPTH`` = 4 chunks in flight): the leaders allreduce the node sum, with gloo's
   ``all_reduce`` on a leaders-only group (``algorithm="gloo"``) or with a double binary tree over
   ``isend/irecv`` (``algorithm="tree"``, the default): each half of the chunk is reduced up one tree and
   broadcast down it; a node forwards in one tree only, so it sends and receives about 2 S in all, and with
   2 nodes exactly S each way;
4. **broadcast back**: the leader marks the result ready; every local rank copies it out of the shared result
   buffer into its tensor (host-to-device for CUDA) and marks it taken, which frees the result buffer.

Synchronisation inside a node goes through the segment itself: each local rank owns a 64-byte line of int64
counters (chunks posted, results taken, pid, the current op's size), the leader one more (chunks consumed, results
ready). Counters count chunks since the engine started, so consecutive ops need no reset. A waiting rank polls its
counter (yield, then sleeps growing to 0.5 ms); it gives up with :class:`HFReduceError` naming the rank it waits
for when that rank's pid is gone (checked every 50 ms) or after ``timeout_s``, and raises the abort flag in the
segment so every local rank stops with the same message. Plain int64 stores order correctly on x86 (TSO); a
weakly ordered CPU would need a fence between the data copy and the counter store.

Failures between nodes: the first rank to see a failure writes its reason under an abort key in
torch.distributed's store (torchrun's agent hosts it, so it outlives any worker). Leaders poll gloo collectives
while watching the segment's abort flag and that key; point-to-point work can only block in gloo's wait(), which
the leaders' group timeout (``timeout_s``) bounds. A peer process that exits closes its sockets, which gloo
reports at once; the leader then reads the store's reason, so every rank's error names the rank that died.

``gbits=k`` quantizes what leaders send between nodes with DoReFa's gradient quantizer (papers.md §1.1), one
scale per message: ``s = max|x|``, ``q = round(n * clip(x / 2s + 1/2 + U(-1/2, 1/2) / n, 0, 1))`` with
``n = 2^k - 1``, sent packed in fields of 1, 2, 4 or 8 bits (the smallest that holds k) plus the float32 s, and
decoded as ``2 s (q / n - 1/2)``: unbiased (one-LSB dither), so it changes results; off by default. Tree: a node
decodes its children's messages, adds them to its own exact node sum and re-quantizes what it sends up; the root
quantizes the final sum once and every node (the root too) decodes those same codes, so all ranks end
bit-identical. Gloo: leaders all-gather their quantized node sums and each adds the decoded messages in node order.
"""

from __future__ import annotations

import collections
import itertools
import os
import queue
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist

from qcompile.runtime.distributed.shm import NodeSegment, pid_alive, segment_name, sweep_stale
from qcompile.runtime.distributed.topology import Topology

TIMEOUT_ENV = "QCOMPILE_HFREDUCE_TIMEOUT"  # seconds a rank waits for another before it gives up (default 60)
CHUNK_ENV = "QCOMPILE_HFREDUCE_CHUNK"  # chunk size in bytes (default 1 MiB)
ALGO_ENV = "QCOMPILE_HFREDUCE_ALGO"  # tree | gloo
GBITS_ENV = "QCOMPILE_HFREDUCE_GBITS"  # DoReFa bits for the inter-node messages; unset: full precision
ALGORITHMS = ("tree", "gloo")
DEFAULT_CHUNK = 1 << 20
DEPTH_ENV = "QCOMPILE_HFREDUCE_DEPTH"  # chunks between nodes at once (default 4)
_NET_DEPTH = max(1, int(os.environ.get(DEPTH_ENV, 4)))

_DTYPES = {torch.float32: 1, torch.float64: 2, torch.float16: 3, torch.bfloat16: 4, torch.int32: 5, torch.int64: 6}
_MAGIC = 0x48465244  # "HFRD"
# line 0 of the control block
_H_MAGIC, _H_ABORT, _H_CULPRIT, _H_REASON_LEN = 0, 1, 2, 3
_REASON_LINES = 8  # lines 1..8: the abort reason, UTF-8, 512 bytes at most
# one line per local rank (line 9 + local rank)
_POSTED, _TAKEN, _PID, _OP_SEQ, _OP_NUMEL, _OP_DTYPE = range(6)
# the leader's extra line (after the ranks' lines)
_CONSUMED, _READY = 0, 1
_LINE = 8  # int64 words per 64-byte line


class HFReduceError(RuntimeError):
    """An allreduce could not finish: a rank died, timed out, or disagreed about the op. Names the rank."""


def failure_reason(exc: BaseException) -> str | None:
    """HFReduce's one-line reason inside `exc`, or None when `exc` is not an HFReduce failure.

    DDP re-raises a failed hook as a RuntimeError whose text holds the HFReduceError's ("Got the following error
    when running the callback: HFReduceError: HFReduce aborted: rank 3 ... died ..."); this finds it there too."""
    text = str(exc)
    at = text.find("HFReduce aborted:")
    if at < 0:
        return None
    return text[at:].splitlines()[0].strip()


# ---- double binary tree ---------------------------------------------------------------------------------------------
def btree(n: int, i: int) -> tuple[int | None, tuple[int, ...]]:
    """(parent, children) of position i in NCCL's in-order binary tree over 0..n-1, rooted at 0.

    Node 0 has one child, the highest power of two below n; node i's lowest set bit b decides the rest: its
    parent is (i ^ b) | 2b (or i ^ b when that is out of range), its children i - b/2 and i + b/2 (pulled in when
    past the end). Odd i are leaves."""
    if n <= 1:
        return None, ()
    if i == 0:
        top = 1
        while top * 2 < n:
            top *= 2
        return None, (top,)
    bit = i & -i
    parent = (i ^ bit) | (bit << 1)
    if parent >= n:
        parent = i ^ bit
    children = []
    low = bit >> 1
    if low:
        children.append(i - low)
        right, step = i + low, low
        while right >= n and step:
            step >>= 1
            right = i + step
        if step and right < n:
            children.append(right)
    return parent, tuple(children)


def double_binary_tree(n: int, i: int) -> tuple[tuple[int | None, tuple[int, ...]], tuple[int | None, tuple[int, ...]]]:
    """The two trees of NCCL's double binary tree at position i: the btree, and its mirror (n even) or its shift by
    one (n odd). The leaves of one tree are the interior nodes of the other, so each node forwards (receives from
    children, sends on) in one tree only; with n odd, node 0 is also the first tree's root, which has one child."""
    first = btree(n, i)
    if n % 2 == 0:
        p, c = btree(n, n - 1 - i)
        second = (None if p is None else n - 1 - p, tuple(n - 1 - x for x in c))
    else:
        p, c = btree(n, (i - 1) % n)
        second = (None if p is None else (p + 1) % n, tuple((x + 1) % n for x in c))
    return first, second


# ---- DoReFa gradient messages ---------------------------------------------------------------------------------------
def container_bits(bits: int) -> int:
    """Codes of k bits travel in fields of 1, 2, 4 or 8 bits (the next that divides a byte)."""
    return next(c for c in (1, 2, 4, 8) if c >= bits)


def message_bytes(numel: int, bits: int) -> int:
    """Bytes of one quantized message: the packed codes, padded to 4, then the float32 scale."""
    per = 8 // container_bits(bits)
    return ((numel + per - 1) // per + 3) // 4 * 4 + 4


def _dither_bytes(m: int, generator: torch.Generator | None) -> torch.Tensor:
    """m uniformly random bytes, 7 from each random 56-bit integer (4x cheaper than m random floats)."""
    k = (m + 6) // 7
    words = torch.empty(k, dtype=torch.int64).random_(0, 1 << 56, generator=generator).view(torch.uint8).view(k, 8)
    return (words[:, :7] if sys.byteorder == "little" else words[:, 1:]).reshape(-1)[:m]


def dorefa_encode(x: torch.Tensor, bits: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Quantize a 1-D float tensor with DoReFa's f_g (one scale s = max|x|) into a uint8 message.

    q = round(n * clip(x/2s + 1/2 + U(-1/2, 1/2)/n, 0, 1)) is computed as floor(n x / 2s + n/2 + u) with the
    dither u = (d + 1/2)/256 from a random byte d: stochastic rounding at 1/256 of a step (E[q] is off the exact
    n x / 2s + n/2 by at most 1/512 of a step)."""
    n = (1 << bits) - 1
    c = container_bits(bits)
    per = 8 // c
    m = x.numel()
    xf = x.detach().reshape(-1)
    s = float(xf.abs().max()) if m else 0.0
    u = torch.empty(m, dtype=torch.float32)
    if s > 0:
        torch.mul(xf, n / (2 * s), out=u)
    else:
        u.zero_()
    u.add_(_dither_bytes(m, generator), alpha=1 / 256).add_(n / 2 + 1 / 512)
    q = u.floor_().clamp_(0, n).to(torch.uint8)
    padded = (m + per - 1) // per * per
    if padded != m:
        q = torch.cat([q, q.new_zeros(padded - m)])
    q = q.view(-1, per)
    msg = torch.empty(message_bytes(m, bits), dtype=torch.uint8)
    packed = msg[: padded // per]
    packed.copy_(q[:, 0])
    for j in range(1, per):
        packed.bitwise_or_(q[:, j] << (c * j))
    msg[padded // per: -4].zero_()
    msg[-4:].view(torch.float32)[0] = s
    return msg


def dorefa_decode(msg: torch.Tensor, numel: int, bits: int, out: torch.Tensor | None = None,
                  add: bool = False) -> torch.Tensor:
    """Decode a message of :func:`dorefa_encode` to 2 s (q/n - 1/2); into `out` (or added to it with add=True)."""
    n = (1 << bits) - 1
    c = container_bits(bits)
    per = 8 // c
    s = float(msg[-4:].view(torch.float32)[0])
    rows = (numel + per - 1) // per
    packed = msg[:rows]
    q = torch.empty(rows, per, dtype=torch.uint8)
    for j in range(per):
        torch.bitwise_and(packed >> (c * j), (1 << c) - 1, out=q[:, j])
    values = q.view(-1)[:numel].to(torch.float32).mul_(2 * s / n).sub_(s)
    if out is None:
        return values
    if add:
        out.add_(values.to(out.dtype))
    else:
        out.copy_(values)
    return out


# ---- shared-memory layout -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Layout:
    local_world: int
    chunk_bytes: int
    nbuf: int
    nres: int

    @property
    def lines(self) -> int:
        return 1 + _REASON_LINES + self.local_world + 1

    @property
    def leader_line(self) -> int:
        return 1 + _REASON_LINES + self.local_world

    @property
    def slots_offset(self) -> int:
        return (self.lines * 64 + 4095) // 4096 * 4096

    @property
    def results_offset(self) -> int:
        return self.slots_offset + self.nbuf * self.local_world * self.chunk_bytes

    @property
    def size(self) -> int:
        return self.results_offset + self.nres * self.chunk_bytes


@dataclass
class _Job:
    """One allreduce request: the tensor, its future, and the chunk sequence numbers [base, base + n)."""

    tensor: torch.Tensor
    flat: torch.Tensor
    future: torch.futures.Future
    base: int = 0
    n: int = 0
    chunk: int = 0  # elements per chunk
    done: bool = False
    t0: float = field(default_factory=time.perf_counter)


# ---- the engine -----------------------------------------------------------------------------------------------------
class HFReduce:
    """An allreduce (sum) engine over every rank of the default process group; see the module docstring.

    Construct it on every rank after ``dist.init_process_group`` (collective: it agrees on a job id, creates the
    leaders' group, and maps the node segment). Requests run in the order they are made, which must be the same
    on every rank (DDP's buckets are). ``allreduce_async(t)`` returns a ``torch.futures.Future`` that resolves to
    ``t`` summed in place; ``allreduce(t)`` waits for it."""

    def __init__(self, topology: Topology | None = None, *, algorithm: str | None = None,
                 chunk_bytes: int | None = None, gbits: int | None = None, timeout_s: float | None = None,
                 nbuf: int = 4, nres: int | None = None, seed: int = 0, staging: bool | None = None):
        if not (dist.is_available() and dist.is_initialized()):
            raise HFReduceError("HFReduce needs torch.distributed initialized (dist.init_process_group) first")
        self.topo = topology or Topology.from_env(rank=dist.get_rank(), world=dist.get_world_size())
        if (self.topo.rank, self.topo.world) != (dist.get_rank(), dist.get_world_size()):
            raise HFReduceError(f"topology says rank {self.topo.rank} of {self.topo.world}, torch.distributed "
                                f"says {dist.get_rank()} of {dist.get_world_size()}")
        self.algorithm = algorithm or os.environ.get(ALGO_ENV, "tree")
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm {self.algorithm!r}: one of {ALGORITHMS}")
        self.chunk_bytes = int(chunk_bytes or os.environ.get(CHUNK_ENV) or DEFAULT_CHUNK)
        if self.chunk_bytes < 64 or self.chunk_bytes % 64:
            raise ValueError(f"chunk_bytes {self.chunk_bytes}: a positive multiple of 64")
        env_bits = os.environ.get(GBITS_ENV)
        self.gbits = gbits if gbits is not None else (int(env_bits) if env_bits else None)
        if self.gbits is not None and not 1 <= self.gbits <= 8:
            raise ValueError(f"gbits {self.gbits}: 1..8 (None for full precision)")
        self.timeout_s = float(timeout_s if timeout_s is not None else os.environ.get(TIMEOUT_ENV, 60))
        # the GPU data path copies every chunk of the leader (and of a lone rank) to the host before the sum and the
        # result back; staging=True runs that path for CPU tensors too (memcpy for the D2H/H2D copies): tests
        self.staging = staging
        nres = nres or _NET_DEPTH + 2
        if nres < _NET_DEPTH + 1 or nbuf < 1:
            raise ValueError(f"nres {nres} must exceed the chunks in flight between nodes ({_NET_DEPTH}); nbuf >= 1")
        self.rank, self.lr, self.L = self.topo.rank, self.topo.local_rank, self.topo.local_world
        # internode_sent_bytes: payload this leader handed to the network (tree: its messages; gloo: the chunk)
        self.stats = {"ops": 0, "bytes": 0, "internode_sent_bytes": 0, "seconds": 0.0}
        self._failed: HFReduceError | None = None
        self._seq = 0  # chunks issued so far (same on every rank of a node)
        self._closed = False
        self._seg: NodeSegment | None = None
        self._ctl = None
        self._views: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]] = {}
        self._cuda_registered = False
        self._gen = torch.Generator().manual_seed(seed * 1_000_003 + self.rank)
        self._tmp: dict[tuple, torch.Tensor] = {}
        self._finish_lock = threading.Lock()

        # 1. agree on a job id and learn every rank's pid (one collective)
        infos: list = [None] * self.topo.world
        dist.all_gather_object(infos, (os.getpid(), uuid.uuid4().hex[:12]))
        self.pids = [p for p, _ in infos]
        self.job = infos[0][1]
        self._store_key = f"qcompile_hfr/{self.job}/abort"
        try:
            from torch.distributed.distributed_c10d import _get_default_store

            self._store = _get_default_store()
        except Exception:  # noqa: BLE001 - the store only speeds up failure reports
            self._store = None
        # 2. the leaders' group (collective over all ranks)
        self._lgroup = self.topo.leader_group(timeout_s=self.timeout_s)
        self._leaders = self.topo.leaders
        self._trees = double_binary_tree(self.topo.n_nodes, self.topo.node)
        # 3. the node segment: the leader creates it, the others map it, then the name goes
        self.layout = _Layout(self.L, self.chunk_bytes, nbuf, nres)
        name = segment_name(self.job, self.topo.node, pid=self.pids[self.topo.leader])
        try:
            if self.L > 1 and self.topo.is_leader:
                sweep_stale()
                self._map(NodeSegment.create(name, self.layout.size))
                self._ctl[0, _H_MAGIC] = _MAGIC
                self._ctl[0, _H_CULPRIT] = -1
            dist.barrier()
            if self.L > 1 and not self.topo.is_leader:
                self._map(NodeSegment.open(name, self.layout.size, timeout_s=self.timeout_s))
            if self._ctl is not None:
                self._ctl[self._line(self.lr), _PID] = os.getpid()
            dist.barrier()
            if self._seg is not None:
                self._seg.unlink()  # everyone has it mapped: from here a crash cannot leak it
        except BaseException:
            if self._seg is not None:
                self._seg.close()
            raise
        # 4. threads: requests run on one worker; a leader of several nodes adds a network thread
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._worker = threading.Thread(target=self._work, name=f"hfreduce-{self.rank}", daemon=True)
        self._netq: queue.SimpleQueue | None = None
        self._net = None
        if self.topo.is_leader and self.topo.n_nodes > 1:
            self._netq = queue.SimpleQueue()
            self._net = threading.Thread(target=self._network, name=f"hfreduce-net-{self.rank}", daemon=True)
            self._net.start()
        self._worker.start()

    # ---- public ---------------------------------------------------------------------------------------------------
    def allreduce_async(self, tensor: torch.Tensor) -> torch.futures.Future:
        """Sum `tensor` over all ranks, in place; the future resolves to `tensor`."""
        fut: torch.futures.Future = torch.futures.Future()
        if self._closed:
            fut.set_exception(HFReduceError(f"rank {self.rank}: HFReduce is closed"))
            return fut
        if tensor.dtype not in _DTYPES:
            fut.set_exception(TypeError(f"HFReduce: dtype {tensor.dtype} not supported ({list(_DTYPES)})"))
            return fut
        flat = tensor.view(-1) if tensor.is_contiguous() else tensor.contiguous().view(-1)
        self._jobs.put(_Job(tensor, flat, fut))
        return fut

    def allreduce(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.allreduce_async(tensor).wait()

    def close(self) -> None:
        """Stop the threads and unmap the segment (idempotent). Collective only in that ranks should stop together."""
        if self._closed:
            return
        self._closed = True
        self._jobs.put(None)
        self._worker.join(timeout=5)
        if self._net is not None:
            self._netq.put(None)
            self._net.join(timeout=5)
        if self._cuda_registered:
            try:
                torch.cuda.cudart().cudaHostUnregister(self._base_ptr)
            except Exception:  # noqa: BLE001
                pass
        self._views.clear()
        self._ctl = None
        if self._seg is not None:
            self._seg.close()
        if self._lgroup is not None and self._failed is None:  # a group with a dead peer may block in teardown
            try:
                dist.destroy_process_group(self._lgroup)
            except Exception:  # noqa: BLE001
                pass
            self._lgroup = None

    def __enter__(self) -> "HFReduce":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        gb = f", gbits={self.gbits}" if self.gbits else ""
        return f"HFReduce({self.topo.describe()}, algorithm={self.algorithm}, chunk={self.chunk_bytes}{gb})"

    # ---- segment views --------------------------------------------------------------------------------------------
    def _map(self, seg: NodeSegment) -> None:
        self._seg = seg
        self._base = torch.frombuffer(seg.buf, dtype=torch.uint8)
        self._ctl = np.frombuffer(seg.buf, dtype=np.int64, count=self.layout.lines * _LINE).reshape(-1, _LINE)

    def _line(self, local_rank: int) -> int:
        return 1 + _REASON_LINES + local_rank

    def _slab(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(slots (nbuf, L, chunk elements), results (nres, chunk elements)) as `dtype` views of the segment."""
        views = self._views.get(dtype)
        if views is None:
            lay = self.layout
            slots = self._base[lay.slots_offset: lay.results_offset].view(dtype).view(lay.nbuf, lay.local_world, -1)
            results = self._base[lay.results_offset: lay.size].view(dtype).view(lay.nres, -1)
            self._views[dtype] = views = (slots, results)
        return views

    def _staged(self, x: torch.Tensor) -> bool:
        return x.is_cuda if self.staging is None else self.staging

    def _register_cuda(self) -> None:
        """Pin the segment for the GPU copy engines (cudaHostRegister), once."""
        if self._cuda_registered or self._seg is None:
            return
        self._base_ptr = self._base.data_ptr()
        err = torch.cuda.cudart().cudaHostRegister(self._base_ptr, self.layout.size, 0)
        self._cuda_registered = int(err) == 0

    # ---- failure --------------------------------------------------------------------------------------------------
    def _who(self, local_rank: int) -> str:
        g = self.topo.global_rank(local_rank)
        return f"rank {g} (local rank {local_rank} of node {self.topo.node}, pid {self.pids[g]})"

    def _abort(self, reason: str, culprit: int | None = None) -> HFReduceError:
        """Record the first failure (segment flag + store key) and return the error to raise."""
        if self._failed is not None:
            return self._failed
        ctl = self._ctl
        if ctl is not None and ctl[0, _H_ABORT]:
            reason = self._shm_reason() or reason
        else:
            if ctl is not None:
                data = reason.encode()[: _REASON_LINES * 64]
                self._base[64: 64 + len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
                ctl[0, _H_REASON_LEN] = len(data)
                ctl[0, _H_CULPRIT] = -1 if culprit is None else culprit
                ctl[0, _H_ABORT] = 1
            self._store_set(reason)
        self._failed = HFReduceError(reason)
        return self._failed

    def _shm_reason(self) -> str:
        n = int(self._ctl[0, _H_REASON_LEN])
        return bytes(self._base[64: 64 + n].numpy()).decode(errors="replace")

    def _store_set(self, reason: str) -> None:
        if self._store is None:
            return
        try:
            if not self._store.check([self._store_key]):
                self._store.set(self._store_key, reason)
        except Exception:  # noqa: BLE001 - the store's host may be the rank that died
            pass

    def _store_reason(self, wait_s: float = 0.0) -> str | None:
        if self._store is None:
            return None
        deadline = time.monotonic() + wait_s
        while True:
            try:
                if self._store.check([self._store_key]):
                    return self._store.get(self._store_key).decode(errors="replace")
            except Exception:  # noqa: BLE001
                return None
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.05)

    def _check_abort(self) -> None:
        if self._failed is not None:
            raise self._failed
        if self._ctl is not None and self._ctl[0, _H_ABORT]:
            raise self._abort(self._shm_reason())

    def _wait(self, ready: Callable[[], bool], laggard: Callable[[], int], what: str) -> None:
        """Poll `ready` until true; `laggard()` names the local rank waited for (death and timeout checks)."""
        if ready():
            return
        start = time.monotonic()
        next_check = start + 0.05
        for spin in itertools.count():
            if ready():
                return
            self._check_abort()
            if spin < 32:
                os.sched_yield()
            else:
                time.sleep(min(20e-6 * (1 << min((spin - 32) // 8, 5)), 5e-4))
            now = time.monotonic()
            if now >= next_check:
                next_check = now + 0.05
                lr = laggard()
                if lr == self.lr:  # the leader waits for its own network thread, which keeps its own deadline
                    start = now
                    continue
                pid = int(self._ctl[self._line(lr), _PID])
                if pid and not pid_alive(pid):
                    raise self._abort(f"HFReduce aborted: {self._who(lr)} died while rank {self.rank} waited for "
                                      f"it to {what}", self.topo.global_rank(lr))
                if now - start > self.timeout_s:
                    raise self._abort(f"HFReduce aborted: {self._who(lr)} did not {what} within {self.timeout_s:g} s "
                                      f"(rank {self.rank} waited; {TIMEOUT_ENV})", self.topo.global_rank(lr))

    # ---- the worker -----------------------------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            if self._failed is not None:
                job.future.set_exception(self._failed)
                continue
            try:
                self._run(job)
            except BaseException as exc:  # noqa: BLE001 - becomes the future's exception
                err = exc if isinstance(exc, HFReduceError) else self._abort(
                    f"HFReduce aborted: rank {self.rank} failed: {type(exc).__name__}: {exc}", self.rank)
                self._finish(job, err)

    def _finish(self, job: _Job, error: BaseException | None = None) -> None:
        with self._finish_lock:  # the worker and the network thread may both end a failed job
            if job.done:
                return
            job.done = True
        if error is not None:
            job.future.set_exception(error)
            return
        if job.flat.data_ptr() != job.tensor.data_ptr():  # a non-contiguous input was reduced in a copy
            job.tensor.copy_(job.flat.view_as(job.tensor))
        self.stats["ops"] += 1
        self.stats["bytes"] += job.flat.numel() * job.flat.element_size()
        self.stats["seconds"] += time.perf_counter() - job.t0
        job.future.set_result(job.tensor)

    def _run(self, job: _Job) -> None:
        x = job.flat
        if x.is_cuda:
            self._register_cuda()
        job.chunk = max(1, self.chunk_bytes // x.element_size())
        job.n = (x.numel() + job.chunk - 1) // job.chunk
        job.base = self._seq
        self._seq += job.n
        if job.n == 0 or self.topo.world == 1:
            self._finish(job)
        elif self.L == 1:  # alone on the node: the tensor is the node sum
            for k in range(job.n):
                lo, hi = k * job.chunk, min(x.numel(), (k + 1) * job.chunk)
                staged = x[lo:hi].to("cpu", copy=True) if self._staged(x) else x[lo:hi]  # D2H on a GPU
                self._netq.put((job, job.base + k, staged, k == job.n - 1))
        elif self.topo.is_leader:
            self._run_leader(job)
        else:
            self._run_member(job)

    def _run_member(self, job: _Job) -> None:
        """A non-leader: post chunks into its slots, take results back, whichever can move."""
        x, C, base, n = job.flat, job.chunk, job.base, job.n
        slots, results = self._slab(x.dtype)
        lay, ctl = self.layout, self._ctl
        mine, lead = ctl[self._line(self.lr)], ctl[lay.leader_line]
        mine[_OP_SEQ], mine[_OP_NUMEL], mine[_OP_DTYPE] = base, x.numel(), _DTYPES[x.dtype]
        p = t = 0
        can_take = lambda: t < p and lead[_READY] > base + t  # noqa: E731
        can_post = lambda: p < n and lead[_CONSUMED] >= base + p + 1 - lay.nbuf  # noqa: E731
        while t < n:
            if can_take():
                lo, hi = t * C, min(x.numel(), (t + 1) * C)
                x[lo:hi].copy_(results[(base + t) % lay.nres, : hi - lo])
                mine[_TAKEN] = base + t + 1
                t += 1
            elif can_post():
                lo, hi = p * C, min(x.numel(), (p + 1) * C)
                slots[(base + p) % lay.nbuf, self.lr, : hi - lo].copy_(x[lo:hi])
                mine[_POSTED] = base + p + 1
                p += 1
            else:
                self._wait(lambda: can_take() or can_post(), lambda: 0,
                           f"sum chunk {min(t, p)} of {n}" if p < n else f"return chunk {t} of {n}")
        self._finish(job)

    def _run_leader(self, job: _Job) -> None:
        """The node leader: sum each chunk of every local rank into a result buffer, then hand it on."""
        x, C, base, n = job.flat, job.chunk, job.base, job.n
        slots, results = self._slab(x.dtype)
        lay, ctl, L = self.layout, self._ctl, self.L
        lines = slice(self._line(0), self._line(L))
        posted, taken = ctl[self._line(1): self._line(L), _POSTED], ctl[lines, _TAKEN]
        lead = ctl[lay.leader_line]
        for k in range(n):
            s = base + k
            lo, hi = k * C, min(x.numel(), (k + 1) * C)
            self._wait(lambda: posted.min() > s, lambda: 1 + int(posted.argmin()), f"post chunk {k} of {n}")
            if k == 0:
                self._check_op(job)
            self._wait(lambda: taken.min() >= s + 1 - lay.nres, lambda: int(taken.argmin()),
                       f"take result chunk {k - lay.nres} of {n}")
            res = results[s % lay.nres, : hi - lo]
            slab = slots[s % lay.nbuf, :, : hi - lo]
            if self._staged(x):  # a GPU tensor: its chunk comes to the host first, like the other ranks'
                slab[0].copy_(x[lo:hi])
                own = slab[0]
            else:
                own = x[lo:hi]
            if L == 2:
                torch.add(own, slab[1], out=res)
            else:
                torch.sum(slab[1:], dim=0, out=res)
                res.add_(own)
            lead[_CONSUMED] = s + 1
            if self._netq is not None:
                self._netq.put((job, s, res, k == n - 1))
            else:
                self._publish(job, s, res, k == n - 1)

    def _check_op(self, job: _Job) -> None:
        for lr in range(1, self.L):
            line = self._ctl[self._line(lr)]
            theirs = (int(line[_OP_SEQ]), int(line[_OP_NUMEL]), int(line[_OP_DTYPE]))
            ours = (job.base, job.flat.numel(), _DTYPES[job.flat.dtype])
            if theirs != ours:
                names = {v: k for k, v in _DTYPES.items()}
                raise self._abort(
                    f"HFReduce aborted: {self._who(lr)} reduces {theirs[1]} elements of {names.get(theirs[2])} as "
                    f"chunk {theirs[0]} while rank {self.rank} reduces {ours[1]} of {job.flat.dtype} as chunk "
                    f"{ours[0]}: ranks must make the same allreduce calls in the same order", self.topo.global_rank(lr))

    def _publish(self, job: _Job, s: int, res: torch.Tensor, last: bool) -> None:
        """The node's result for chunk s is final: let the local ranks take it, take the leader's own copy."""
        k = s - job.base
        lo = k * job.chunk
        if self._ctl is not None:
            self._ctl[self.layout.leader_line, _READY] = s + 1
        own = job.flat[lo: lo + res.numel()]
        if own.data_ptr() != res.data_ptr():
            own.copy_(res)
        if self._ctl is not None:
            self._ctl[self._line(0), _TAKEN] = s + 1
        if last:
            self._finish(job)

    # ---- between nodes --------------------------------------------------------------------------------------------
    def _network(self) -> None:
        """Chunks in order, up to QCOMPILE_HFREDUCE_DEPTH (4) in flight: chunk i+1's receives are posted and its
        first sends go out before chunk i's waits, so the link does not idle between chunks."""
        inflight: collections.deque = collections.deque()
        stopping = False
        while True:
            if not stopping and len(inflight) < _NET_DEPTH:
                # wait for the next chunk while nothing is in flight or the newest chunk's op has more to come
                # (it is being summed now); at an op's end go on finishing: the next op may come much later
                wait = not inflight or not inflight[-1][3]
                try:
                    item = self._netq.get(timeout=0.05) if wait else self._netq.get_nowait()
                except queue.Empty:
                    if wait and (not inflight or self._failed is None):
                        continue
                else:
                    if item is None:
                        stopping = True
                    elif not item[0].done:
                        try:
                            if self._failed is not None:
                                raise self._failed
                            inflight.append((*item, self._net_start(item[2], item[1])))
                        except BaseException as exc:  # noqa: BLE001
                            self._net_failed([item, *inflight], exc)
                            inflight.clear()
                    continue
            if not inflight:
                if stopping:
                    return
                continue
            job, s, res, last, state = inflight.popleft()
            try:
                self._net_finish(state)
                self._publish(job, s, res, last)
            except BaseException as exc:  # noqa: BLE001
                self._net_failed([(job,), *inflight], exc)
                inflight.clear()

    def _net_failed(self, items: list, exc: BaseException) -> None:
        err = exc if isinstance(exc, HFReduceError) else self._abort(
            f"HFReduce aborted: rank {self.rank} failed between nodes: {type(exc).__name__}: {exc}", self.rank)
        for item in items:
            self._finish(item[0], err)

    def _net_start(self, res: torch.Tensor, s: int):
        return self._tree_start(res, s) if self.algorithm == "tree" else self._gloo_start(res)

    def _net_finish(self, state) -> None:
        (self._tree_finish if self.algorithm == "tree" else self._gloo_finish)(state)

    def _wait_work(self, work, peer: str, poll: bool = False) -> None:
        """Wait for gloo work; a collective (poll=True) is polled while watching the abort flag, the store's abort
        key and the deadline. Gloo marks point-to-point work complete only inside wait(), so those block in wait(),
        bounded by the leaders' group timeout (timeout_s) and ended at once when the peer's sockets close."""
        start = time.monotonic()
        next_check = start + 0.1
        for spin in itertools.count():
            if not poll or work.is_completed():
                break
            self._check_abort()
            if spin < 64:
                os.sched_yield()
            else:
                time.sleep(min(20e-6 * (1 << min((spin - 64) // 8, 5)), 5e-4))
            now = time.monotonic()
            if now >= next_check:
                next_check = now + 0.1
                reason = self._store_reason()
                if reason:
                    raise self._abort(f"{reason} [rank {self.rank} stopped waiting for {peer}]")
                if now - start > self.timeout_s:
                    raise self._abort(f"HFReduce aborted: {peer} did not answer rank {self.rank} within "
                                      f"{self.timeout_s:g} s ({TIMEOUT_ENV})")
        try:
            work.wait()
        except RuntimeError as exc:
            reason = self._store_reason(wait_s=2.0)  # the rank that saw the cause may still be writing it
            if reason:
                raise self._abort(f"{reason} [rank {self.rank}: exchange with {peer} then failed]") from exc
            raise self._abort(f"HFReduce aborted: rank {self.rank} lost {peer}: {exc}") from exc

    def _leader_name(self, node: int) -> str:
        return f"node {node} (leader rank {self._leaders[node]})"

    def _gloo_start(self, res: torch.Tensor):
        if self.gbits is None:
            self.stats["internode_sent_bytes"] += res.numel() * res.element_size()
            return dist.all_reduce(res, group=self._lgroup, async_op=True), res, None
        msg = dorefa_encode(res, self.gbits, self._gen)
        gathered = [torch.empty_like(msg) for _ in self._leaders]
        self.stats["internode_sent_bytes"] += msg.numel()
        return dist.all_gather(gathered, msg, group=self._lgroup, async_op=True), res, gathered

    def _gloo_finish(self, state) -> None:
        work, res, gathered = state
        peers = "the leaders " + ", ".join(str(r) for r in self._leaders if r != self.rank)
        self._wait_work(work, peers, poll=True)
        if gathered is not None:  # every leader adds the same decoded messages in the same order
            res.zero_()
            for g in gathered:
                dorefa_decode(g, res.numel(), self.gbits, out=res, add=True)

    def _buffer(self, key: tuple, numel: int, dtype: torch.dtype) -> torch.Tensor:
        buf = self._tmp.get(key)
        if buf is None or buf.numel() < numel or buf.dtype != dtype:
            buf = self._tmp[key] = torch.empty(max(numel, self.chunk_bytes // 2), dtype=dtype)
        return buf[:numel]

    def _tree_start(self, res: torch.Tensor, s: int):
        """Reduce each half of `res` up one of the two trees and broadcast it down the same tree, in place.

        Start (steps 1-2): every receive is posted, so data flows while this thread blocks elsewhere, and the sends
        that need nothing (a leaf's message up) go out at once, so both directions of a link carry data together.
        Finish (steps 3-5, :meth:`_tree_finish`): the blocking waits, tree 0 before tree 1 on every node, which
        keeps them free of cycles."""
        m = res.numel()
        h = (m + 1) // 2
        parts = (res[:h], res[h:])
        live = [t for t in (0, 1) if parts[t].numel()]
        tag0 = (s % (1 << 24)) * 4  # tags: tree t up = tag0 + 2t, down = tag0 + 2t + 1
        g, leaders, bits, trees = self._lgroup, self._leaders, self.gbits, self._trees

        slot = s % _NET_DEPTH  # receive buffers of the chunks in flight must differ

        def wire(t: int, peer: int) -> torch.Tensor:  # receive buffer for a message from `peer` in tree t
            k = parts[t].numel()
            if bits:
                return self._buffer(("q", slot, t, peer), message_bytes(k, bits), torch.uint8)
            return self._buffer(("f", slot, t, peer), k, res.dtype)

        send, encode = self._tree_send, self._tree_encode

        # 1. post every receive: the children's messages up, the parent's message down
        ups_in = {t: [(dist.irecv(buf := wire(t, c), src=leaders[c], group=g, tag=tag0 + 2 * t), buf, c)
                      for c in trees[t][1]] for t in live}
        # (unquantized, the result lands in place: the parent sends it only after it has all of our message up)
        down_in = {t: (dist.irecv(buf := wire(t, trees[t][0]) if bits else parts[t], src=leaders[trees[t][0]],
                                  group=g, tag=tag0 + 2 * t + 1), buf) for t in live if trees[t][0] is not None}
        sends: list = []
        # 2. leaves send up at once
        for t in live:
            parent, children = trees[t]
            if parent is not None and not children:
                send(encode(parts[t]), parent, tag0 + 2 * t, sends)
        return parts, live, tag0, ups_in, down_in, sends

    def _tree_send(self, msg: torch.Tensor, peer: int, tag: int, sends: list) -> None:
        sends.append((dist.isend(msg, dst=self._leaders[peer], group=self._lgroup, tag=tag), msg, peer))
        self.stats["internode_sent_bytes"] += msg.numel() * msg.element_size()

    def _tree_encode(self, part: torch.Tensor) -> torch.Tensor:
        return dorefa_encode(part, self.gbits, self._gen) if self.gbits else part

    def _tree_finish(self, state) -> None:
        parts, live, tag0, ups_in, down_in, sends = state
        trees, bits, send, encode = self._trees, self.gbits, self._tree_send, self._tree_encode
        # 3. interior nodes: add the children's messages, send up; a root sends the result down
        for t in live:
            parent, children = trees[t]
            if not children:
                continue
            part = parts[t]
            for work, buf, c in ups_in[t]:
                self._wait_work(work, self._leader_name(c))
                if bits:
                    dorefa_decode(buf, part.numel(), bits, out=part, add=True)
                else:
                    part.add_(buf)
            if parent is not None:
                send(encode(part), parent, tag0 + 2 * t, sends)
            else:
                msg = encode(part)
                if bits:  # the root keeps the decoded codes like everyone else: all ranks end identical
                    dorefa_decode(msg, part.numel(), bits, out=part)
                for c in children:
                    send(msg, c, tag0 + 2 * t + 1, sends)
        # 4. everyone else: take the result from the parent, pass it to the children
        for t in live:
            if t not in down_in:
                continue
            work, msg = down_in[t]
            self._wait_work(work, self._leader_name(trees[t][0]))
            if bits:
                dorefa_decode(msg, parts[t].numel(), bits, out=parts[t])
            for c in trees[t][1]:
                send(msg, c, tag0 + 2 * t + 1, sends)
        for work, _, peer in sends:
            self._wait_work(work, self._leader_name(peer))


# ---- the DDP communication hook -------------------------------------------------------------------------------------
class HFReduceState:
    """State of :func:`hfreduce_hook`: the engine and the divisor (the world size, as DDP averages)."""

    __slots__ = ("engine", "world_size", "step")

    def __init__(self, engine: HFReduce):
        self.engine = engine  # the allreduce engine (holds the process groups and the segment)
        self.world_size = engine.topo.world  # DDP averages: divide by this before the sum
        self.step = 0  # optimizer steps seen (counted on the last bucket)

    def __getstate__(self):  # checkpoints keep the counters, never the engine's groups or memory
        return {"world_size": self.world_size, "step": self.step}

    def __setstate__(self, state):
        self.engine = None
        self.world_size, self.step = state["world_size"], state["step"]


def hfreduce_hook(state: HFReduceState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """1 stage in  2 node sum on the CPU  3 leaders allreduce  4 broadcast back. Equals allreduce_hook's mean."""
    grad = bucket.buffer().div_(state.world_size)  # divide first: no low-precision overflow, as DDP does
    if bucket.is_last():
        state.step += 1
    # in place: the value is the bucket's own buffer. The .then() turns a failed request into an error of the future
    # DDP waits on (a Python future set with an exception would reach DDP as a value it cannot cast to a Tensor)
    return state.engine.allreduce_async(grad).then(_value)


def _value(fut: torch.futures.Future) -> torch.Tensor:
    return fut.value()


# DDP checks the hook's annotations as objects; this module's are strings (from __future__ import annotations)
hfreduce_hook.__annotations__ = {"state": HFReduceState, "bucket": dist.GradBucket,
                                 "return": torch.futures.Future[torch.Tensor]}


def register(ddp_model, engine: HFReduce | None = None, **engine_kw) -> HFReduceState:
    """Make `ddp_model` reduce its gradient buckets with HFReduce; returns the hook's state (close its engine)."""
    state = HFReduceState(engine or HFReduce(**engine_kw))
    ddp_model.register_comm_hook(state, hfreduce_hook)
    return state


__all__ = [
    "ALGORITHMS", "HFReduce", "HFReduceError", "HFReduceState", "btree", "container_bits", "dorefa_decode",
    "dorefa_encode", "failure_reason",
    "double_binary_tree", "hfreduce_hook", "message_bytes", "register",
]
