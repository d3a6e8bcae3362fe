"""Load a library built by qcompile.targets.cpu and run its layers on numpy arrays (ctypes; numpy only).

    lib = Library("artifact/kernels/qcompile_kernels.so")
    y = lib.run("conv3", x)          # x: uint8 codes, [batch, K] (BitGemm) or NCHW [batch, C, H, W] (BitConv)

Each layer is a plain C function ``int qc_layer_<cname>(const uint8_t* x, void* y, int64_t batch)``; its shapes
and output dtype come from the manifest the library carries (``qc_manifest()``). The code path is chosen inside
the library at every call: the best the CPU has, or ``QCOMPILE_CPU_PATH=avx512|avx2|generic``; threads from
``QCOMPILE_NUM_THREADS`` (default: all cores).
"""

from __future__ import annotations

import ctypes
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qcompile.errors import ArtifactError, QcompileError, RuntimeInputError

__all__ = ["ABI_VERSION", "PATH_NAMES", "KernelPathError", "LayerInfo", "Library"]

ABI_VERSION = 1
PATH_NAMES = ("generic", "avx2", "avx512")
_ERRORS = {-1: "path", -2: "out of memory", -3: "bad argument"}


_from_buffer = ctypes.c_char.from_buffer
_addressof = ctypes.addressof


def _address(a: np.ndarray) -> int:
    """The data pointer of a C-contiguous array. ``a.ctypes.data`` builds a ctypes helper object (several us, a
    noticeable share of a small layer's call); a writable array's buffer gives the address directly."""
    try:
        return _addressof(_from_buffer(a))
    except (TypeError, ValueError):  # read-only or empty
        return a.ctypes.data


class KernelPathError(QcompileError):
    """QCOMPILE_CPU_PATH names a code path this CPU (or this library) cannot run."""


@dataclass(frozen=True)
class LayerInfo:
    name: str
    symbol: str
    op: str
    in_shape: tuple[int, ...]   # per sample: (K,) or (C, H, W)
    out_shape: tuple[int, ...]  # per sample: (N,) or (N, Ho, Wo)
    out_dtype: np.dtype
    bits_a: int
    bits_w: int
    epilogue: str
    in_dtype: np.dtype = np.dtype(np.uint8)  # float32 when the layer quantizes its input itself


def _content_alias(path: Path, sha256: str | None = None) -> Path:
    """A path for dlopen that names the library's content: dlopen returns an already loaded library by *name*, so a
    process that loads art/kernels/x.so, recompiles into art/ and loads it again would keep running the old kernels.
    A symlink named by the file's sha256 (in the temp folder) gives new content a new name, same content the same.
    `sha256`: the digest when the caller already has it (the runtime verified it against the manifest)."""
    import hashlib
    import tempfile

    digest = (sha256 or hashlib.sha256(path.read_bytes()).hexdigest())[:20]
    alias = Path(tempfile.gettempdir()) / f"qcompile-lib-{digest}-{path.name}"
    try:
        if not (alias.is_symlink() and alias.resolve() == path):
            tmp = alias.with_name(f"{alias.name}.{os.getpid()}")
            tmp.unlink(missing_ok=True)
            tmp.symlink_to(path)
            os.replace(tmp, alias)
        return alias
    except OSError:  # a read-only temp folder: load by the real path (the stale-name case is then possible)
        return path


class Library:
    """A loaded kernel library; :meth:`run` calls one layer."""

    def __init__(self, path: str | os.PathLike, sha256: str | None = None):
        self.path = Path(path).resolve()
        if not self.path.is_file():
            raise ArtifactError(f"{self.path}: kernel library not found")
        try:
            self._dll = ctypes.CDLL(str(_content_alias(self.path, sha256)))
        except OSError as e:
            raise ArtifactError(f"{self.path}: cannot load kernel library: {e}") from e
        try:
            abi = self._fn("qc_abi_version", ctypes.c_int, [])()
            raw = self._fn("qc_manifest", ctypes.c_char_p, [])()
        except AttributeError as e:
            raise ArtifactError(f"{self.path}: not a qcompile kernel library ({e})") from e
        if abi != ABI_VERSION:
            raise ArtifactError(f"{self.path}: kernel ABI {abi}, this runtime speaks {ABI_VERSION}; rebuild it")
        self.manifest = json.loads(raw.decode())
        self.layers: dict[str, LayerInfo] = {}
        self._fast = {}
        for name, m in self.manifest["layers"].items():
            info = LayerInfo(name=name, symbol=m["symbol"], op=m["op"], in_shape=tuple(m["in_shape"]),
                             out_shape=tuple(m["out_shape"]), out_dtype=np.dtype(m["out_dtype"]),
                             bits_a=m["bits_a"], bits_w=m["bits_w"], epilogue=m["epilogue"],
                             in_dtype=np.dtype(m.get("in_dtype", "uint8")))
            try:
                fn = self._fn(info.symbol, ctypes.c_int, [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64])
            except AttributeError as e:
                raise ArtifactError(f"{self.path}: layer {name!r} has no function {info.symbol}") from e
            self.layers[name] = info
            # what run()'s fast path needs, in one lookup: (info, fn, input ndim, per-sample input/output shape)
            self._fast[name] = (info, fn, len(info.in_shape) + 1, info.in_shape, info.out_shape, info.out_dtype,
                                info.in_dtype)
        self._selected = self._fn("qc_selected_path", ctypes.c_int, [])
        self._available = self._fn("qc_path_available", ctypes.c_int, [ctypes.c_int])
        self._threads = self._fn("qc_threads", ctypes.c_int, [])

    def _fn(self, symbol: str, restype, argtypes):
        f = getattr(self._dll, symbol)
        f.restype, f.argtypes = restype, argtypes
        return f

    # ---- queries ----
    def selected_path(self) -> str | None:
        """The path a call takes now (QCOMPILE_CPU_PATH honoured); None if the requested one is unavailable."""
        p = self._selected()
        return PATH_NAMES[p] if p >= 0 else None

    def path_available(self, path: str) -> bool:
        return bool(self._available(PATH_NAMES.index(path)))

    def available_paths(self) -> list[str]:
        return [p for p in PATH_NAMES if self.path_available(p)]

    def num_threads(self) -> int:
        return int(self._threads())

    def time_in_library(self, layer: str, x: np.ndarray, reps: int = 100) -> float:
        """Best of ``reps`` calls of ``layer`` on ``x``, in seconds, timed inside the library (what a call costs in
        a deployed onnxruntime session, without this Python call around it). For benchmarks."""
        info = self.layers[layer]
        x, batch = self._coerce(info, x, None)
        out = np.empty((batch, *info.out_shape), dtype=info.out_dtype)
        try:
            fn = self._fn("qc_time_layer", ctypes.c_int64,
                          [ctypes.c_char_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int])
        except AttributeError as e:
            raise ArtifactError(f"{self.path}: built before qc_time_layer existed; rebuild it") from e
        ns = fn(layer.encode(), _address(x), _address(out), batch, reps)
        if ns < 0:
            raise RuntimeError(f"layer {layer!r}: timing failed ({ns})")
        return ns * 1e-9

    # ---- running ----
    @staticmethod
    def _coerce(info: LayerInfo, x, batch) -> tuple[np.ndarray, int]:
        x = np.asarray(x)
        if batch is None:
            batch = x.shape[0] if x.ndim == len(info.in_shape) + 1 else 1
        expect = (int(batch), *info.in_shape)
        if x.size != int(np.prod(expect)) or (x.ndim == len(expect) and x.shape != expect):
            raise RuntimeInputError(f"layer {info.name!r}: input shape {x.shape}, expected {expect}")
        if info.in_dtype != np.uint8:
            if x.dtype.kind != "f":
                raise RuntimeInputError(f"layer {info.name!r}: input must be {info.in_dtype} values, got {x.dtype}")
            x = x.astype(info.in_dtype)
        elif x.dtype != np.uint8:
            if x.dtype.kind not in "ui" or (x.size and (x.min() < 0 or x.max() > 255)):
                raise RuntimeInputError(f"layer {info.name!r}: input must be uint8 codes, got {x.dtype}")
            x = x.astype(np.uint8)
        return np.ascontiguousarray(x).reshape(expect), int(batch)

    def run(self, layer: str, x: np.ndarray, batch: int | None = None, *, check: bool = True,
            out: np.ndarray | None = None) -> np.ndarray:
        """Run ``layer`` on activation codes ``x`` (uint8; [batch, K] or NCHW [batch, C, H, W]), or on float32 values
        for a layer that quantizes its input itself (``LayerInfo.in_dtype``).

        Returns int32 acc, float32 or uint8 codes by the layer's epilogue, shaped [batch, *out_shape].
        ``check`` verifies every code is below 2^bits_a (the kernels would silently drop higher bits).
        """
        fast = self._fast.get(layer)
        if fast is None:
            raise RuntimeInputError(f"no layer {layer!r} in {self.path.name}; it has {', '.join(self.layers)}")
        info, fn, ndim, in_shape, out_shape, out_dtype, in_dtype = fast
        # the fast path (a few us matter for a one-row call): uint8 (or the layer's float), C-contiguous,
        # [batch, *in_shape]
        if not (type(x) is np.ndarray and x.dtype == in_dtype and x.ndim == ndim and x.shape[1:] == in_shape
                and x.flags.c_contiguous and (batch is None or batch == x.shape[0])):
            x, batch = self._coerce(info, x, batch)  # the slow path: reshape, cast, complain
        batch = x.shape[0]
        if check and x.size and in_dtype == np.uint8 and int(x.max()) >= 1 << info.bits_a:
            raise RuntimeInputError(f"layer {layer!r}: input codes exceed {info.bits_a} bits (max {int(x.max())})")
        if out is None:
            out = np.empty((batch, *out_shape), dtype=out_dtype)
        elif out.shape != (batch, *out_shape) or out.dtype != out_dtype or not out.flags.c_contiguous:
            raise RuntimeInputError(f"layer {layer!r}: out must be C-contiguous {out_dtype} {(batch, *out_shape)}")
        rc = fn(_address(x), _address(out), batch)
        if rc == -1:
            raise KernelPathError(
                f"QCOMPILE_CPU_PATH={os.environ.get('QCOMPILE_CPU_PATH')!r} is not available on this CPU "
                f"(available: {', '.join(self.available_paths())})")
        if rc != 0:
            raise RuntimeError(f"layer {layer!r} failed: {_ERRORS.get(rc, rc)}")
        return out
