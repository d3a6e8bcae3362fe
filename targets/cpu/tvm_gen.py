"""A second generator for the CPU bit kernels, through Apache TVM (optional: ``pip install 'qcompile[tvm]'``).

    from qcompile.targets.cpu.tvm_gen import build_tvm_layer, tvm_available
    layer = build_tvm_layer(spec)          # spec: a LayerSpec, as for build_library
    y = layer.run(x_codes_uint8, batch)    # the same array the C library's layer returns for that spec

It computes exactly what :func:`qcompile.targets.cpu.build.build_library` builds for the spec (docs/ops.md; the
numpy model is :mod:`qcompile.reference`): BitGemm and BitConv (strides, pads, dilations, group), any
``bits_a``/``bits_w`` the spec allows, per-channel ``wzero2``, epilogue none/float/threshold, and the xor mode.

What runs where:

- **numpy** (glue, O(input) work): the activation codes are split into bit planes and packed along K into uint64
  words (little-endian bit order, zero tail; the same convention as :mod:`qcompile.packing`). For BitConv the
  im2col runs on the codes first (tap-major rows, padded taps = code 0), then the rows are packed, so the
  im2col of packed bits is a numpy step here. Weights are packed once, at build time. The output is sliced out of
  the padded [group, M, N] kernel result (and transposed to NCHW for BitConv).
- **TVM-generated code** (TE -> TIR -> LLVM, all the popcount work): per kernel shape, one module of two
  PrimFuncs: the row sums of the activation planes ``R[m] = sum_i 2^i popcount(A_i[m])``, then the bit GEMM
  ``S[m, n] = sum_{i,j} 2^(i+j) popcount(A_i[m] AND W_j[n])`` with the fused epilogue of
  ``acc = int32(2*S - wzero2[n]*R[m])`` (xor mode: ``acc = int32(R - 2*popcount((A_0 XOR W_0) AND valid))`` with
  ``R = popcount(valid)``, ``valid`` the plane of in-bounds taps). S and R are int64 and acc is truncated to int32,
  as in the C kernels.

Schedule: K is split into ``Kwo`` chunks of ``V`` words and the lane axis is vectorised (the "vector" popcount
style: V = 8 with AVX-512 VPOPCNTDQ, 4 on AVX2), or V = 1 with LLVM's vectorizer kept off the kernel (the "scalar"
style: one POPCNT per word, the faster one on AMD Zen, which runs 4 POPCNT per cycle; see :func:`_style`). A
register tile of ``mr`` rows x ``nr`` channels keeps ``mr*nr`` int64 lane sums in registers while the chunk and
plane loops run outside it (planes unrolled); the tiles run in parallel (TVM thread pool) over (group, channel
block, row tile, channel tile). Rows (M) are a run-time size: the kernel takes ``Mo`` tiles of ``mr`` rows and numpy
pads M with zero rows. Two kernels per layer: a 1-row one for M < 4 and a tiled one, each compiled on first use
(about 0.3 s) and cached per shape, so layers of one shape share code.

Float epilogue: TVM 0.27 fuses ``float(acc)*mult + bias`` into ``llvm.fmuladd`` (a vfmadd on FMA CPUs), which
differs from the reference in the last bit; even a separate TE stage for the product is fused back. The product
goes through ``llvm.arithmetic.fence``, which forbids contraction across it, so the kernel does a float32 multiply
then a float32 add, bit-for-bit the numpy ``(acc.astype(f32)*mult)+bias`` (the tests check the result and that
the assembly has no vfmadd).

TVM sharp edges handled here (apache-tvm 0.27.0.post1):

- ``mcpu=native`` silently becomes ``generic`` (no POPCNT/AVX): :func:`system_target` names the CPU LLVM
  detects, and masks off the x86 features /proc/cpuinfo does not list (a VM may hide AVX-512 on a CPU model that
  has it).
- TVM's thread pool uses hardware_concurrency/2 threads on x86 (it assumes hyper-threading): 1 thread on a 2-vCPU
  machine. Unless ``TVM_NUM_THREADS`` is set, importing TVM through this module sets it to
  ``QCOMPILE_NUM_THREADS`` or the CPUs this process may run on, as the C library does.
- TVM pins each pool worker to one core; with the static split of a parallel loop, one worker pinned to a core that
  another process is using makes the whole call wait (2x slower under load here). Unless ``TVM_BIND_THREADS`` is
  set, it is set to 0 (no pinning, like the C library's pool). Both variables are read once, when TVM creates its
  pool: set them before the first TVM kernel runs in the process.
- Generated code assumes 64-byte aligned tensors and does not check: a numpy array at a 16-byte boundary
  segfaults. Every tensor passed to a kernel here is allocated 64-byte aligned.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import threading
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from qcompile import packing
from qcompile.errors import RuntimeInputError, ToolchainError

from .spec import LayerSpec

__all__ = ["TVM_REQUIREMENTS", "TvmLayer", "build_tvm_layer", "system_target", "tvm_available"]

log = logging.getLogger(__name__)

TVM_REQUIREMENTS = ("apache-tvm==0.27.0.post1", "apache-tvm-ffi==0.1.15.post2")
_MISSING = "apache-tvm not installed; pip install 'qcompile[tvm]'"
ALIGN = 64  # bytes; TVM's kernels assume it (see the module docstring)
ROW_KERNEL_MAX_M = 4  # below this many GEMM rows the 1-row kernel runs, else the tiled one
_NB_CHANNELS = 64  # channels per block of the outer loop (their weight rows stay in L1/L2 while all rows pass)

# /proc/cpuinfo flag -> LLVM feature; a flag the kernel does not list is passed as "-feature" (x86 only; masking
# avx512f masks every AVX-512 extension too)
_X86_FEATURES = {"popcnt": "popcnt", "avx": "avx", "avx2": "avx2", "fma": "fma", "bmi2": "bmi2",
                 "avx512f": "avx512f", "avx512_vpopcntdq": "avx512vpopcntdq", "amx_tile": "amx-tile"}


# ---------------------------------------------------------------------------------------------------------------
# TVM import, target, threads


def _threads() -> int:
    env = os.environ.get("QCOMPILE_NUM_THREADS", "")
    if env.strip().isdigit() and int(env) > 0:
        return int(env)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


@lru_cache(maxsize=1)
def _import_tvm():
    # before the TVM thread pool exists (it is created lazily, at the first parallel call): see the docstring
    os.environ.setdefault("TVM_NUM_THREADS", str(_threads()))
    os.environ.setdefault("TVM_BIND_THREADS", "0")
    try:
        import tvm
        import tvm_ffi  # noqa: F401
        from tvm import te, tirx  # noqa: F401
        from tvm.s_tir import Schedule  # noqa: F401
    except Exception as e:  # ImportError, or a broken install raising anything while loading libtvm
        raise ToolchainError(_MISSING) from e
    return tvm


def _tvm():
    try:
        return _import_tvm()
    except ToolchainError:
        raise
    except Exception as e:  # pragma: no cover
        raise ToolchainError(_MISSING) from e


@lru_cache(maxsize=1)
def tvm_available() -> bool:
    """True when apache-tvm imports (and has the LLVM backend this generator needs)."""
    try:
        tvm = _tvm()
        return bool(tvm.runtime.enabled("llvm"))
    except Exception:
        return False


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, val = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return set(val.split())
    except OSError:
        pass
    return set()


def _host_triple(tvm) -> str:
    m = platform.machine().lower()
    if platform.system() == "Linux" and m in ("x86_64", "amd64", "aarch64", "arm64"):
        # not llvm_get_system_triple(): the wheel's LLVM reports its build triple (x86_64-conda-linux-gnu)
        return {"amd64": "x86_64", "arm64": "aarch64"}.get(m, m) + "-linux-gnu"
    return str(tvm.get_global_func("target.llvm_get_system_triple")())


@lru_cache(maxsize=1)
def system_target() -> dict:
    """The LLVM target of this machine as TVM's dict form, the CPU named explicitly (never ``mcpu=native``).

    ``{"kind": "llvm", "mtriple": ..., "mcpu": <what LLVM detects, e.g. znver1>, "num-cores": n[, "mattr": [...]]}``.
    Falls back to ``mcpu=generic`` (correct but slow: no POPCNT/AVX) with a logged warning when LLVM cannot
    name the CPU. On x86 Linux, features of that CPU model that /proc/cpuinfo does not list are masked off.
    """
    tvm = _tvm()
    try:
        cpu = str(tvm.get_global_func("target.llvm_get_system_cpu")())
    except Exception as e:  # pragma: no cover - every wheel we pin has it
        log.warning("TVM cannot query the host CPU (%s); generating code for mcpu=generic (slower)", e)
        cpu = ""
    if not cpu or cpu in ("generic", "native"):
        if cpu != "generic":
            log.warning("LLVM did not name the host CPU; generating code for mcpu=generic (no POPCNT/AVX: slower)")
        cpu = "generic"
    target = {"kind": "llvm", "mtriple": _host_triple(tvm), "mcpu": cpu, "num-cores": _threads()}
    flags = _cpu_flags()
    if cpu != "generic" and flags and platform.machine().lower() in ("x86_64", "amd64"):
        masked = [f"-{feat}" for flag, feat in _X86_FEATURES.items() if flag not in flags]
        if masked:
            target["mattr"] = masked
    try:
        tvm.target.Target(target)
    except Exception as e:
        log.warning("TVM rejects target %s (%s); using mcpu=generic", json.dumps(target), e)
        target = {"kind": "llvm", "mtriple": target["mtriple"], "mcpu": "generic", "num-cores": _threads()}
    return target


POPCOUNT_STYLES = ("auto", "vector", "scalar")
# (rows, channels) of the register tile of the 1-row kernel and of the tiled kernel, per style
_TILES = {"vector": ((1, 8), (4, 2)), "vector512": ((1, 8), (4, 4)), "scalar": ((1, 8), (4, 4))}
_VECTOR_FEATURES = ["-avx", "-ssse3"]  # masking these masks AVX2/AVX-512/SSE4 too: LLVM keeps scalar POPCNT


@dataclass(frozen=True)
class _Style:
    name: str          # "vector", "vector512" or "scalar"
    lanes: int         # uint64 words per K chunk (the vectorised lane axis; 1 = scalar)
    target: dict       # the target the kernels are compiled for


def _style(target: dict, popcount: str = "auto") -> _Style:
    """How the popcount GEMM is vectorised on this target.

    - ``vector``: K chunks of V words on a vectorised lane axis, LLVM's vector popcount (AVX-512 VPOPCNTQ with
      V = 8; on AVX2 V = 4 and a vpshufb nibble table, ~9 ops per 256 bits);
    - ``scalar``: one word at a time, the POPCNT instruction, with the vector features masked off for the kernel
      (else LLVM's loop vectorizer turns the K loop back into the vpshufb popcount). AMD Zen runs 4 POPCNT per
      cycle, so ``auto`` picks it on a Zen CPU without AVX-512 VPOPCNTDQ: 1.1-1.6x the AVX2 kernel on the EPYC
      (Zen 1) this was written on, single thread, W1A1..W2A2, K = 1024..4096.
    """
    if popcount not in POPCOUNT_STYLES:
        raise ValueError(f"popcount must be one of {POPCOUNT_STYLES}, got {popcount!r}")
    cpu = str(target.get("mcpu", "generic"))
    masked = set(target.get("mattr", []))
    x86 = platform.machine().lower() in ("x86_64", "amd64") and "x86_64" in str(target.get("mtriple", "x86_64"))
    flags = _cpu_flags() if x86 else set()
    has512 = {"avx512f", "avx512_vpopcntdq"} <= flags and not masked & {"-avx512f", "-avx512vpopcntdq"}
    has2 = "avx2" in flags and "-avx2" not in masked
    if popcount == "auto":
        popcount = "scalar" if cpu == "generic" or (x86 and cpu.startswith("znver") and not has512) else "vector"
    if popcount == "scalar":
        kt = dict(target)
        if x86 and cpu != "generic":
            kt["mattr"] = list(target.get("mattr", [])) + _VECTOR_FEATURES
        return _Style("scalar", 1, kt)
    if not x86:
        return _Style("vector", 2, dict(target))  # 128-bit SIMD (NEON cnt)
    if has512:
        return _Style("vector512", 8, dict(target))
    return _Style("vector", 4 if has2 else 2, dict(target))


# ---------------------------------------------------------------------------------------------------------------
# the kernel: TE definition + schedule


@dataclass(frozen=True)
class _KernelShape:
    G: int          # groups (1 for gemm)
    a_planes: int   # activation planes (xor mode: 2 = the code bit and the valid-tap mask)
    b_planes: int   # weight planes
    Kwo: int        # K chunks of V words
    V: int          # words per chunk (vector lanes)
    No: int         # channel tiles per group (channels padded to No*nr)
    nr: int         # channels per tile
    mr: int         # rows per tile
    nb: int         # channel tiles per block (divides No)
    xor: bool
    epilogue: str   # none / float / threshold
    L: int          # threshold levels (0 unless threshold)


_KERNELS: dict[tuple[str, _KernelShape], object] = {}
_KERNEL_LOCK = threading.Lock()


def _define(k: _KernelShape):
    """The TE tensors of one kernel: (tvm, [A, R] of the row-sum function, [A, R, W, WZ2, ..., Y] of the GEMM)."""
    tvm = _tvm()
    from tvm import te, tirx

    i64 = "int64"
    Mo = te.var("Mo")
    A = te.placeholder((k.G, Mo, k.mr, k.a_planes, k.Kwo, k.V), "uint64", name="A")
    W = te.placeholder((k.G, k.No, k.nr, k.b_planes, k.Kwo, k.V), "uint64", name="W")
    ko = te.reduce_axis((0, k.Kwo), "ko")
    if k.xor:
        P = te.compute((k.G, Mo, k.mr, k.No, k.nr, k.V), lambda g, mo, mi, no, ni, l: te.sum(
            tirx.popcount((A[g, mo, mi, 0, ko, l] ^ W[g, no, ni, 0, ko, l]) & A[g, mo, mi, 1, ko, l]).astype(i64),
            axis=[ko]), name="P")
        kr, lr = te.reduce_axis((0, k.Kwo), "kr"), te.reduce_axis((0, k.V), "lr")
        R = te.compute((k.G, Mo, k.mr), lambda g, mo, mi: te.sum(
            tirx.popcount(A[g, mo, mi, 1, kr, lr]).astype(i64), axis=[kr, lr]), name="R")
    else:
        i = te.reduce_axis((0, k.a_planes), "i")
        j = te.reduce_axis((0, k.b_planes), "j")
        P = te.compute((k.G, Mo, k.mr, k.No, k.nr, k.V), lambda g, mo, mi, no, ni, l: te.sum(
            tirx.popcount(A[g, mo, mi, i, ko, l] & W[g, no, ni, j, ko, l]).astype(i64) << (i + j).astype(i64),
            axis=[ko, i, j]), name="P")
        ir, kr, lr = (te.reduce_axis((0, k.a_planes), "ir"), te.reduce_axis((0, k.Kwo), "kr"),
                      te.reduce_axis((0, k.V), "lr"))
        R = te.compute((k.G, Mo, k.mr), lambda g, mo, mi: te.sum(
            tirx.popcount(A[g, mo, mi, ir, kr, lr]).astype(i64) << ir.astype(i64), axis=[ir, kr, lr]), name="R")
    rowsum = [A, R]
    R = te.placeholder((k.G, Mo, k.mr), i64, name="R")
    l2 = te.reduce_axis((0, k.V), "l2")
    out = (k.G, Mo, k.mr, k.No, k.nr)
    S = te.compute(out, lambda g, mo, mi, no, ni: te.sum(P[g, mo, mi, no, ni, l2], axis=l2), name="S")
    WZ2 = te.placeholder((k.G, k.No, k.nr), "int32", name="WZ2")

    def acc(g, mo, mi, no, ni):
        if k.xor:
            return (R[g, mo, mi] - 2 * S[g, mo, mi, no, ni]).astype("int32")
        return (2 * S[g, mo, mi, no, ni] - WZ2[g, no, ni].astype(i64) * R[g, mo, mi]).astype("int32")

    args = [A, R, W, WZ2]
    if k.epilogue == "none":
        Y = te.compute(out, acc, name="Y")
    elif k.epilogue == "float":
        MULT = te.placeholder((k.G, k.No, k.nr), "float32", name="MULT")
        BIAS = te.placeholder((k.G, k.No, k.nr), "float32", name="BIAS")
        args += [MULT, BIAS]

        def fl(g, mo, mi, no, ni):
            prod = acc(g, mo, mi, no, ni).astype("float32") * MULT[g, no, ni]
            # a contraction barrier: without it LLVM fuses the multiply and the add into one FMA
            return tirx.call_llvm_pure_intrin("float32", "llvm.arithmetic.fence", prod) + BIAS[g, no, ni]

        Y = te.compute(out, fl, name="Y")
    else:
        THR = te.placeholder((k.G, k.No, k.nr, k.L), "int32", name="THR")
        args.append(THR)
        t = te.reduce_axis((0, k.L), "t")
        Y = te.compute(out, lambda g, mo, mi, no, ni: te.sum(
            (acc(g, mo, mi, no, ni) >= THR[g, no, ni, t]).astype("uint8"), axis=t), name="Y")
    return tvm, rowsum, args + [Y]


def _compile(k: _KernelShape, target: dict):
    """One module with two functions: ``qc_tvm_rowsum(A, R)`` then ``qc_tvm_gemm(A, R, W, WZ2, ..., Y)``."""
    tvm, rowsum, args = _define(k)
    from tvm import te
    from tvm.s_tir import Schedule

    rs = Schedule(te.create_prim_func(rowsum))
    bR = rs.get_sblock("R")
    rg, rmo = rs.get_loops(bR)[:2]
    rs.parallel(rs.fuse(rg, rmo))
    sch = Schedule(te.create_prim_func(args))
    bP = sch.get_sblock("P")
    loops = sch.get_loops(bP)
    g, mo, mi, no, ni, l = loops[:6]
    red = loops[6:]  # ko[, i, j]
    nob, noi = sch.split(no, [None, k.nb])
    sch.reorder(g, nob, mo, noi, *red, mi, ni, l)
    tile = sch.fuse(g, nob, mo, noi)
    sch.parallel(tile)
    for r in red[1:]:
        sch.unroll(r)
    sch.unroll(mi)
    sch.unroll(ni)
    sch.vectorize(l)  # before decompose_reduction (else "not a local complete/reduction block")
    sch.decompose_reduction(bP, red[0])
    sch.set_scope(bP, 0, "local")
    bS = sch.get_sblock("S")
    sch.reverse_compute_at(bS, tile)
    sch.set_scope(bS, 0, "local")
    sch.reverse_compute_at(sch.get_sblock("Y"), tile)
    mod = tvm.IRModule({"qc_tvm_rowsum": rs.mod["main"].with_attr("global_symbol", "qc_tvm_rowsum"),
                        "qc_tvm_gemm": sch.mod["main"].with_attr("global_symbol", "qc_tvm_gemm")})
    return tvm.compile(mod, target=tvm.target.Target(target))


def _kernel(k: _KernelShape, target: dict):
    key = (json.dumps(target, sort_keys=True), k)
    with _KERNEL_LOCK:
        ex = _KERNELS.get(key)
        if ex is None:
            try:
                ex = _compile(k, target)
            except ToolchainError:
                raise
            except Exception as e:
                raise ToolchainError(f"TVM failed to compile a bit kernel for {k}: {str(e).splitlines()[-1]}") from e
            _KERNELS[key] = ex
    return ex


# ---------------------------------------------------------------------------------------------------------------
# numpy glue


def _aligned_zeros(shape, dtype) -> np.ndarray:
    """A zeroed C-contiguous array whose data starts on a 64-byte boundary."""
    dtype = np.dtype(dtype)
    n = math.prod(shape) * dtype.itemsize
    raw = np.zeros(n + ALIGN, np.uint8)
    off = (-raw.__array_interface__["data"][0]) % ALIGN
    return raw[off:off + n].view(dtype).reshape(shape)


def _aligned(a: np.ndarray) -> np.ndarray:
    out = _aligned_zeros(a.shape, a.dtype)
    out[...] = a
    return out


def _as_tvm(arrays: list[np.ndarray]) -> list:
    """Zero-copy TVM tensors over 64-byte aligned numpy arrays (each keeps its array alive)."""
    import tvm_ffi

    return [tvm_ffi.from_dlpack(a) for a in arrays]


_PLANE_BITS = (1 << np.arange(8)).astype(np.uint8)


def _pack_rows_into(codes: np.ndarray, planes: int, dst: np.ndarray) -> None:
    """codes uint8 [..., R, K] -> bit planes into dst uint64 [..., R', planes, Kwp] (R' >= R, dst zeroed)."""
    k = codes.shape[-1]
    nbytes = (k + 7) // 8
    db = dst.view(np.uint8)  # [..., R', planes, Kwp*8]
    r = codes.shape[-2]
    # packbits sets a bit for any nonzero byte, so plane i is packbits(codes & 2^i); all planes in one call
    bits = codes[..., None, :] & _PLANE_BITS[:planes, None]  # [..., R, planes, K]
    db[..., :r, :planes, :nbytes] = np.packbits(bits, axis=-1, bitorder="little")


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def _pow2_at_least(n: int) -> int:
    p = 1
    while p < n:
        p *= 2
    return p


class TvmLayer:
    """One BitGemm/BitConv layer compiled through TVM; :meth:`run` returns what the C library's layer returns."""

    def __init__(self, spec: LayerSpec, target: dict | None = None, popcount: str = "auto"):
        if spec.op not in ("gemm", "conv"):
            raise ValueError(f"layer {spec.name!r}: the TVM generator builds BitGemm/BitConv layers, not {spec.op!r}")
        if spec.pool is not None:
            raise ValueError(f"layer {spec.name!r}: the TVM generator has no folded pool; build the conv alone")
        self.spec = spec
        self.target = dict(target) if target is not None else system_target()
        self.style = _style(self.target, popcount)
        s = spec
        self.G = s.group if s.op == "conv" else 1
        self.NG = s.N // self.G
        self.K = s.K
        kw = packing.n_words(self.K)
        self.V = max(1, min(self.style.lanes, kw))
        self.Kwo = -(-kw // self.V)
        self.Kwp = self.Kwo * self.V
        self.a_planes = 2 if s.xor_mode else s.bits_a
        self.b_planes = 1 if s.xor_mode else s.bits_w
        self._consts: dict[int, tuple] = {}  # nr -> (W, WZ2[, MULT, BIAS | THR]): TVM tensors, 64-byte aligned
        self._fns: dict[str, tuple] = {}
        self._work: dict[tuple[int, int], tuple] = {}  # (mr, rows) -> workspace (see _workspace)
        nr_max = _pow2_at_least(self.NG)  # few channels per group (depthwise): a narrower tile, less padding
        self._tiles = {which: (mr, min(nr, nr_max)) for which, (mr, nr) in zip(("row", "tile"), _TILES[self.style.name])}
        if s.op == "conv":
            self.P = s.out_hw[0] * s.out_hw[1]
            self._valid = self._valid_taps() if s.xor_mode else None
        else:
            self.P = 1
            self._valid = None
        # compile what a batch of one runs now: a missing/broken TVM or LLVM fails here, not at the first run
        self._kernel_for(self.P)

    # ---- constants ----
    def _weight_rows(self) -> np.ndarray:
        s = self.spec
        return s.w if s.op == "gemm" else packing.conv_weight_rows(s.w)  # [N, K], tap-major for conv

    def _constants(self, nr: int) -> tuple:
        got = self._consts.get(nr)
        if got is not None:
            return got
        s, G, NG = self.spec, self.G, self.NG
        No = -(-NG // nr)
        Np = No * nr
        rows = self._weight_rows().reshape(G, NG, self.K)
        W = _aligned_zeros((G, Np, self.b_planes, self.Kwp), np.uint64)
        _pack_rows_into(rows, self.b_planes, W)

        def per_channel(v, dtype):
            out = np.zeros((G, Np), dtype)
            out[:, :NG] = np.asarray(v, dtype).reshape(G, NG)
            return _aligned(out.reshape(G, No, nr))

        consts = [W.reshape(G, No, nr, self.b_planes, self.Kwo, self.V), per_channel(s.wzero2, np.int32)]
        if s.epilogue == "float":
            consts += [per_channel(s.mult, np.float32), per_channel(s.bias, np.float32)]
        elif s.epilogue == "threshold":
            t = np.zeros((G, Np, s.L), np.int32)
            t[:, :NG] = s.thresholds.reshape(G, NG, s.L)
            consts.append(_aligned(t.reshape(G, No, nr, s.L)))
        got = tuple(_as_tvm(consts))
        self._consts[nr] = got
        return got

    def _valid_taps(self) -> np.ndarray:
        """xor-mode conv: [P, K] 0/1, 1 where the tap of output pixel p reads inside the image."""
        _, h, w = self.spec.in_shape
        ones = np.ones((1, self.G, h, w), np.uint8)
        return self._im2col(ones, 1)[0, 0]  # [P, kh*kw*1] per (group) channel -> expand over Cg below

    # ---- kernel choice ----
    def _shape(self, which: str) -> _KernelShape:
        mr, nr = self._tiles[which]
        No = -(-self.NG // nr)
        nb = 1
        for d in range(1, No + 1):  # the largest divisor of No with nb*nr <= _NB_CHANNELS
            if No % d == 0 and d * nr <= max(_NB_CHANNELS, nr):
                nb = d
        s = self.spec
        return _KernelShape(G=self.G, a_planes=self.a_planes, b_planes=self.b_planes, Kwo=self.Kwo, V=self.V,
                            No=No, nr=nr, mr=mr, nb=nb, xor=s.xor_mode, epilogue=s.epilogue,
                            L=s.L if s.epilogue == "threshold" else 0)

    def _kernel_for(self, m_rows: int):
        """(shape, rowsum function, gemm function) of the kernel that runs ``m_rows`` GEMM rows."""
        which = "row" if m_rows < ROW_KERNEL_MAX_M else "tile"
        got = self._fns.get(which)
        if got is None:
            k = self._shape(which)
            ex = _kernel(k, self.style.target)
            got = self._fns[which] = (k, ex["qc_tvm_rowsum"], ex["qc_tvm_gemm"])  # a lookup costs ~0.1 ms
        return got

    # ---- activations ----
    def _im2col(self, x: np.ndarray, cg: int) -> np.ndarray:
        """NCHW codes [B, G*cg, H, W] -> rows [G, B, P, kh*kw*cg] (tap-major; padded taps are code 0)."""
        s = self.spec
        b, c, h, w = x.shape
        (kh, kw), (sh, sw), (dh, dw), pads = s.kernel, s.strides, s.dilations, s.pads
        ho, wo = s.out_hw
        xp = np.zeros((b, c, h + pads[0] + pads[2], w + pads[1] + pads[3]), np.uint8)
        xp[:, :, pads[0]:pads[0] + h, pads[1]:pads[1] + w] = x
        taps = [xp[:, :, ky * dh: ky * dh + sh * (ho - 1) + 1: sh, kx * dw: kx * dw + sw * (wo - 1) + 1: sw]
                for ky in range(kh) for kx in range(kw)]
        cols = np.stack(taps, axis=1).reshape(b, kh * kw, self.G, cg, ho * wo)  # [B, T, G, Cg, P]
        return np.ascontiguousarray(cols.transpose(2, 0, 4, 1, 3)).reshape(self.G, b, ho * wo, kh * kw * cg)

    def _workspace(self, k: _KernelShape, m: int) -> tuple:
        """For ``m`` rows: zeroed planes A [G, Mo, mr, planes, Kwo, V], row sums R [G, Mo, mr], the kernel output
        Y [G, Mo, mr, No, nr], then the same three as TVM tensors (zero-copy views; a call converts faster)."""
        mo = -(-m // k.mr)
        A = _aligned_zeros((self.G, mo, k.mr, self.a_planes, self.Kwo, self.V), np.uint64)
        R = _aligned_zeros((self.G, mo, k.mr), np.int64)
        Y = _aligned_zeros((self.G, mo, k.mr, k.No, k.nr), self.spec.out_dtype)
        return (A, R, Y, *_as_tvm([A, R, Y]))

    def _pack_activations(self, x: np.ndarray, batch: int, A: np.ndarray) -> None:
        """Codes -> bit planes in A (the bytes written are the same for every call of one batch size, so a reused
        workspace keeps its zero padding)."""
        s = self.spec
        if s.op == "gemm":
            rows = x.reshape(1, batch, self.K)
        else:
            rows = self._im2col(x.reshape(batch, *s.in_shape), s.in_shape[0] // self.G).reshape(self.G, -1, self.K)
        planes = A.reshape(self.G, -1, self.a_planes, self.Kwp)
        if s.xor_mode:
            _pack_rows_into(rows, 1, planes[:, :, :1])
            valid = self._xor_valid(batch)  # [G or 1, M, K]
            _pack_rows_into(np.broadcast_to(valid, rows.shape), 1, planes[:, :, 1:])
        else:
            _pack_rows_into(rows, self.a_planes, planes)

    def _xor_valid(self, batch: int) -> np.ndarray:
        if self._valid is None:  # gemm: every one of the K bits
            return np.ones((1, 1, self.K), np.uint8)
        cg = self.spec.in_shape[0] // self.G
        per_pixel = np.repeat(self._valid, cg, axis=1)  # [P, T] -> [P, T*Cg], tap-major
        return np.broadcast_to(per_pixel[None], (batch, self.P, self.K)).reshape(1, batch * self.P, self.K)

    # ---- public ----
    @property
    def out_shape(self) -> tuple[int, ...]:
        return self.spec.out_shape

    @property
    def out_dtype(self) -> np.dtype:
        return self.spec.out_dtype

    def run(self, x: np.ndarray, batch: int | None = None, *, check: bool = True) -> np.ndarray:
        """Run on activation codes (uint8; [batch, K] or NCHW [batch, C, H, W], or flat with ``batch``).

        Returns int32 acc, float32 or uint8 codes by the epilogue, shaped [batch, *out_shape], like
        ``qcompile.runtime.kernels.Library.run``. ``check=False`` skips the code range check; codes of more than
        bits_a bits then give unspecified results (as in the C library, which reads the low planes only but sums
        the whole codes).
        """
        s = self.spec
        x = np.asarray(x)
        if batch is None:
            batch = x.shape[0] if x.ndim == len(s.in_shape) + 1 else 1
        batch = int(batch)
        expect = (batch, *s.in_shape)
        if batch < 0 or x.size != math.prod(expect) or (x.ndim == len(expect) and x.shape != expect):
            raise RuntimeInputError(f"layer {s.name!r}: input shape {x.shape}, expected {expect}")
        if x.dtype != np.uint8:
            if x.dtype.kind not in "ui" or (x.size and (x.min() < 0 or x.max() > 255)):
                raise RuntimeInputError(f"layer {s.name!r}: input must be uint8 codes, got {x.dtype}")
            x = x.astype(np.uint8)
        if check and x.size and int(x.max()) >= 1 << s.bits_a:
            raise RuntimeInputError(f"layer {s.name!r}: input codes exceed {s.bits_a} bits (max {int(x.max())})")
        if batch == 0:
            return np.empty((0, *s.out_shape), s.out_dtype)
        m = batch * self.P
        k, rowsum, gemm = self._kernel_for(m)
        consts = self._constants(k.nr)
        # the workspaces of the last few batch sizes are kept (a call takes its one out while it runs)
        ws = self._work.pop((k.mr, m), None) or self._workspace(k, m)
        A, _, Y, tA, tR, tY = ws
        self._pack_activations(x, batch, A)
        rowsum(tA, tR)
        gemm(tA, tR, *consts, tY)
        y = Y.reshape(self.G, -1, k.No * k.nr)[:, :m, :self.NG]  # [G, M, NG]
        if s.op == "gemm":
            out = y[0].copy()
        else:
            ho, wo = s.out_hw
            y = y.reshape(self.G, batch, self.P, self.NG).transpose(1, 0, 3, 2)  # [B, G, NG, P]
            out = np.ascontiguousarray(y).reshape(batch, s.N, ho, wo)
        if len(self._work) < 4:
            self._work[(k.mr, m)] = ws
        return out

    __call__ = run

    def source(self, fmt: str = "asm", batch: int = 1) -> str:
        """The generated code (``asm``, ``ll``) of the kernel a run with ``batch`` samples takes."""
        k = self._kernel_for(batch * self.P)[0]
        return _kernel(k, self.style.target).mod.inspect_source(fmt)


def build_tvm_layer(spec: LayerSpec, *, target: dict | None = None, popcount: str = "auto") -> TvmLayer:
    """Compile ``spec`` with TVM for this CPU (:func:`system_target`, or ``target``); ToolchainError without TVM.

    ``popcount``: "auto" (the faster style for this CPU), "vector" or "scalar" (see :func:`_style`).
    """
    _tvm()
    return TvmLayer(spec, target, popcount)
