"""GPU runtime: load a gpu artifact's fatbin through the CUDA driver API (ctypes, libcuda.so.1) and run its layers.

No CUDA toolkit, CuPy, torch or onnxruntime-gpu is needed at run time: the driver that comes with the GPU loads
the fatbin (cuModuleLoadData) and launches the kernels (cuLaunchKernel). Without a driver or a device every entry
point raises :class:`GpuUnavailableError` with one line saying which.

The same launcher drives the host emulation of the kernels (``EmuDevice``, a qc_gpu_emu.so built by
qcompile.targets.gpu.build_emulation), so the argument marshalling, buffers and launch geometry that a GPU run
uses are tested on any machine.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qcompile.errors import ArtifactError, QcompileError, RuntimeInputError

__all__ = ["GpuUnavailableError", "CudaDevice", "EmuDevice", "GpuLibrary", "QcArgs", "Memset", "open_device"]


class GpuUnavailableError(QcompileError):
    """No CUDA driver, no device, or a device too old for the kernels."""


class QcArgs(ctypes.Structure):
    """The kernels' single by-value parameter (templates/bitkernels.cuh ``struct QcArgs``)."""

    _fields_ = [(name, ctypes.c_void_p) for name in
                ("x", "act", "rowsum", "w", "wz2", "mult", "bias", "thr", "wtap", "in_thr", "out")] + \
        [("batch", ctypes.c_int64), ("out_sum", ctypes.c_void_p)]


@dataclass(frozen=True)
class Memset:
    """A launch-list step that zeroes ``nbytes`` at device address ``ptr`` (before a kernel that accumulates)."""

    ptr: int
    nbytes: int


# ---------------------------------------------------------------------------------------------------- devices
class CudaDevice:
    """One GPU through libcuda (driver API): primary context of ``device``, one module (the fatbin)."""

    kind = "cuda"

    def __init__(self, fatbin: bytes, device: int = 0):
        try:
            self._cu = ctypes.CDLL("libcuda.so.1")
        except OSError:
            raise GpuUnavailableError("no CUDA driver (libcuda.so.1 not found): the gpu target needs an NVIDIA GPU "
                                      "and its driver; run a cpu artifact here instead") from None
        cu = self._cu
        cu.cuGetErrorName.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
        rc = cu.cuInit(0)
        count = ctypes.c_int(0)
        if rc == 0:
            rc = cu.cuDeviceGetCount(ctypes.byref(count))
        if rc != 0 or count.value == 0:
            why = "no CUDA device" if rc in (0, 100) else f"the CUDA driver failed to start ({self._name(rc)})"
            raise GpuUnavailableError(f"{why}: the gpu target needs an NVIDIA GPU (sm_75 or newer); run a cpu "
                                      "artifact here instead")
        if device >= count.value:
            raise GpuUnavailableError(f"CUDA device {device} does not exist ({count.value} found)")
        self._dev = ctypes.c_int(0)
        self._check(cu.cuDeviceGet(ctypes.byref(self._dev), device), "cuDeviceGet")
        major, minor = ctypes.c_int(0), ctypes.c_int(0)
        self._check(cu.cuDeviceGetAttribute(ctypes.byref(major), 75, self._dev), "cuDeviceGetAttribute")
        self._check(cu.cuDeviceGetAttribute(ctypes.byref(minor), 76, self._dev), "cuDeviceGetAttribute")
        self.cc = (major.value, minor.value)
        if self.cc < (7, 5):
            raise GpuUnavailableError(f"CUDA device {device} is sm_{major.value}{minor.value}; the gpu kernels need "
                                      "sm_75 or newer")
        self._ctx = ctypes.c_void_p()
        self._check(cu.cuDevicePrimaryCtxRetain(ctypes.byref(self._ctx), self._dev), "cuDevicePrimaryCtxRetain")
        self._check(cu.cuCtxSetCurrent(self._ctx), "cuCtxSetCurrent")
        self._module = ctypes.c_void_p()
        self._fatbin = ctypes.create_string_buffer(fatbin, len(fatbin))
        self._check(cu.cuModuleLoadData(ctypes.byref(self._module), self._fatbin), "cuModuleLoadData (the fatbin "
                    "has no code for this GPU: rebuild with --target gpu:sm_XY)")
        cu.cuMemAlloc_v2.argtypes = [ctypes.POINTER(ctypes.c_uint64), ctypes.c_size_t]
        cu.cuMemFree_v2.argtypes = [ctypes.c_uint64]
        cu.cuMemcpyHtoD_v2.argtypes = [ctypes.c_uint64, ctypes.c_void_p, ctypes.c_size_t]
        cu.cuMemcpyDtoH_v2.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_size_t]
        cu.cuMemsetD8_v2.argtypes = [ctypes.c_uint64, ctypes.c_ubyte, ctypes.c_size_t]
        cu.cuLaunchKernel.argtypes = [ctypes.c_void_p] + [ctypes.c_uint] * 7 + [ctypes.c_void_p,
                                                                                ctypes.c_void_p, ctypes.c_void_p]
        self._functions: dict[str, ctypes.c_void_p] = {}
        self.name = f"CUDA device {device} (sm_{major.value}{minor.value})"

    def _name(self, rc: int) -> str:
        s = ctypes.c_char_p()
        return s.value.decode() if self._cu.cuGetErrorName(rc, ctypes.byref(s)) == 0 and s.value else f"error {rc}"

    def _check(self, rc: int, what: str) -> None:
        if rc != 0:
            raise GpuUnavailableError(f"{what} failed: {self._name(rc)}")

    def alloc(self, nbytes: int) -> int:
        ptr = ctypes.c_uint64(0)
        self._check(self._cu.cuMemAlloc_v2(ctypes.byref(ptr), max(int(nbytes), 1)), f"cuMemAlloc({nbytes})")
        return ptr.value

    def free(self, ptr: int) -> None:
        self._cu.cuMemFree_v2(ptr)

    def htod(self, ptr: int, arr: np.ndarray) -> None:
        self._check(self._cu.cuMemcpyHtoD_v2(ptr, arr.ctypes.data, arr.nbytes), "cuMemcpyHtoD")

    def dtoh(self, arr: np.ndarray, ptr: int) -> None:
        self._check(self._cu.cuMemcpyDtoH_v2(arr.ctypes.data, ptr, arr.nbytes), "cuMemcpyDtoH")

    def memset(self, ptr: int, nbytes: int) -> None:
        self._check(self._cu.cuMemsetD8_v2(ptr, 0, nbytes), "cuMemsetD8")

    def launch(self, name: str, grid, block, args: QcArgs) -> None:
        f = self._functions.get(name)
        if f is None:
            f = ctypes.c_void_p()
            self._check(self._cu.cuModuleGetFunction(ctypes.byref(f), self._module, name.encode()),
                        f"cuModuleGetFunction({name})")
            self._functions[name] = f
        params = (ctypes.c_void_p * 1)(ctypes.addressof(args))
        self._check(self._cu.cuLaunchKernel(f, *grid, *block, 0, None, params, None), f"launch of {name}")

    def sync(self) -> None:
        self._check(self._cu.cuCtxSynchronize(), "kernel execution")


class EmuDevice:
    """The host emulation of the same kernels (qc_gpu_emu.so): "device memory" is host memory, launches run the
    grid's blocks one by one on this CPU. For tests; reports itself as an sm_90 device unless ``cc`` says."""

    kind = "emulation"

    def __init__(self, so_path: str | os.PathLike, cc: tuple[int, int] = (9, 0)):
        self._lib = ctypes.CDLL(str(so_path))
        self._lib.qc_emu_launch.argtypes = [ctypes.c_char_p] + [ctypes.c_uint] * 6 + [ctypes.c_void_p]
        self._buffers: dict[int, np.ndarray] = {}
        self.cc = cc
        self.name = f"host emulation of sm_{cc[0]}{cc[1]}"

    def alloc(self, nbytes: int) -> int:
        buf = np.full(int(nbytes) + 256, 0xA5, np.uint8)  # garbage, like cuMemAlloc: kernels must not rely on 0
        ptr = (buf.ctypes.data + 255) // 256 * 256
        self._buffers[ptr] = buf
        return ptr

    def free(self, ptr: int) -> None:
        self._buffers.pop(ptr, None)

    def htod(self, ptr: int, arr: np.ndarray) -> None:
        ctypes.memmove(ptr, arr.ctypes.data, arr.nbytes)

    def dtoh(self, arr: np.ndarray, ptr: int) -> None:
        ctypes.memmove(arr.ctypes.data, ptr, arr.nbytes)

    def memset(self, ptr: int, nbytes: int) -> None:
        ctypes.memset(ptr, 0, nbytes)

    def launch(self, name: str, grid, block, args: QcArgs) -> None:
        params = (ctypes.c_void_p * 1)(ctypes.addressof(args))
        if self._lib.qc_emu_launch(name.encode(), *grid, *block, params) != 0:
            raise RuntimeInputError(f"emulation: no kernel named {name}")

    def sync(self) -> None:
        pass


def open_device(fatbin: bytes, emulation: str | os.PathLike | None = None):
    """The CUDA device (or, with ``emulation`` / $QCOMPILE_GPU_EMULATION, the emulation library)."""
    emulation = emulation or os.environ.get("QCOMPILE_GPU_EMULATION")
    return EmuDevice(emulation) if emulation else CudaDevice(fatbin)


# ---------------------------------------------------------------------------------------------------- layers
def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class GpuLibrary:
    """The layers of one built GPU kernel library (qc_gpu.json), their constants uploaded once to the device.

    ``run(layer, x)``: numpy in, numpy out. ``run_device(layer, x_ptr, batch)``: device pointer in, device pointer
    out (the layer's own output buffer, valid until its next call): chains of layers never leave the device.
    ``run_device(producer, x_ptr, batch, into=consumer)`` then ``run_device(consumer, None, batch,
    packed_input=True)``: a chained threshold layer writes its consumer's packed input, whose pack kernel is skipped.
    ``launch_log`` keeps the names of the latest kernels launched (and "memset")."""

    def __init__(self, manifest: str | os.PathLike, device=None, *, emulation: str | os.PathLike | None = None):
        self.path = Path(manifest)
        try:
            self.manifest = json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ArtifactError(f"{self.path}: not a GPU kernel manifest ({exc})") from None
        folder = self.path.parent
        for rel, digest in self.manifest.get("sha256", {}).items():
            p = folder / rel
            if not p.is_file() or hashlib.sha256(p.read_bytes()).hexdigest() != digest:
                raise ArtifactError(f"{p}: missing or not the file the manifest lists; rebuild the kernels")
        if device is None:
            fatbin = self.manifest.get("fatbin")
            if fatbin is None and not (emulation or os.environ.get("QCOMPILE_GPU_EMULATION")):
                raise ArtifactError(f"{self.path}: built without nvcc (no fatbin); rebuild with the CUDA toolkit")
            device = open_device((folder / fatbin).read_bytes() if fatbin else b"", emulation)
        self.device = device
        self.layers = {entry["name"]: entry for entry in self.manifest["layers"]}
        constants = np.frombuffer((folder / self.manifest["constants"]).read_bytes(), np.uint8)
        self._const = device.alloc(constants.nbytes)
        if constants.nbytes:
            device.htod(self._const, constants)
        self._work: dict[tuple[str, int], dict[str, int]] = {}
        self._nbytes: dict[int, int] = {}
        self.launch_log: deque[str] = deque(maxlen=4096)

    # which GEMM kernel: tensor cores on sm_80+, CUDA cores below (QCOMPILE_GPU_PATH=mma|popc forces one)
    @property
    def gemm_path(self) -> str:
        forced = os.environ.get("QCOMPILE_GPU_PATH", "")
        if forced not in ("", "mma", "popc"):
            raise RuntimeInputError(f"QCOMPILE_GPU_PATH={forced!r}: use mma or popc")
        if forced == "mma" and self.device.cc < (8, 0):
            raise GpuUnavailableError(f"QCOMPILE_GPU_PATH=mma needs sm_80 or newer; this is {self.device.name}")
        return forced or ("mma" if self.device.cc >= (8, 0) else "popc")

    def _const_ptr(self, entry: dict, name: str) -> int | None:
        where = entry["blob"].get(name)
        return None if where is None else self._const + entry["blob_offset"] + where[0]

    def _buffers(self, entry: dict, batch: int) -> dict[str, int]:
        key = (entry["name"], batch)
        if key not in self._work:
            for old in [k for k in self._work if k[0] == entry["name"]]:  # one batch size cached per layer
                for ptr in self._work.pop(old).values():
                    self.device.free(ptr)
                    self._nbytes.pop(ptr, None)
            sizes = {}
            if entry["op"] == "gemm":
                rows = _cdiv(batch, 128) * 128
                sizes.update(act=4 * rows * entry["act_words_per_row"], rowsum=4 * rows)
            elif entry["op"] == "conv":
                sizes.update(act=4 * batch * entry["act_words_per_sample"],
                             rowsum=4 * batch * entry["rowsum_per_sample"])
                if "pool" in entry:
                    sizes["codes"] = batch * int(np.prod(entry["conv_out_shape"]))
            sizes["out"] = batch * int(np.prod(entry["out_shape"])) * np.dtype(entry["out_dtype"]).itemsize
            bufs = {name: self.device.alloc(nbytes) for name, nbytes in sizes.items()}
            self._nbytes.update({bufs[name]: nbytes for name, nbytes in sizes.items()})
            self._work[key] = bufs
        return self._work[key]

    def _entry(self, layer: str) -> dict:
        entry = self.layers.get(layer)
        if entry is None:
            raise RuntimeInputError(f"no layer {layer!r} in {self.path}; layers: {sorted(self.layers)}")
        return entry

    def launches(self, layer: str, x_ptr: int | None, batch: int, *, into: str | None = None,
                 packed_input: bool = False) -> tuple[list, int]:
        """The steps that run ``layer`` on ``batch`` samples at device address ``x_ptr``, in order (pack, GEMM,
        pool): kernel launches (name, grid, block, args) and :class:`Memset` s; and the output's device address.
        ``into``: the chained consumer whose packed input (its act buffer, returned) the GEMM writes.
        ``packed_input``: the producer already wrote this layer's packed input; no pack kernel, ``x_ptr`` unused."""
        entry = self._entry(layer)
        bufs = self._buffers(entry, batch)
        k = entry["kernels"]
        if entry["op"] == "maxpool":
            c, ho, wo = entry["out_shape"]
            args = QcArgs(x=x_ptr, out=bufs["out"], batch=batch)
            return [(k["pool"], (_cdiv(batch * c * ho * wo, 128), 1, 1), (128, 1, 1), args)], bufs["out"]
        args = QcArgs(x=x_ptr, act=bufs["act"], rowsum=bufs["rowsum"], batch=batch,
                      out=bufs.get("codes", bufs["out"]))
        for name in ("w", "wz2", "mult", "bias", "thr", "wtap", "in_thr"):
            setattr(args, name, self._const_ptr(entry, name))
        threads = entry["pack_threads"]
        if entry["op"] == "gemm":
            pack_grid = _cdiv(_cdiv(batch, 128) * 128, threads // 32)
        else:
            c, h, w = entry["in_shape"]
            pack_grid = _cdiv(batch * entry["groups"] * h * w, threads)
        path = self.gemm_path
        tile = entry[path]
        rows = batch * entry["rows_per_sample"]
        steps: list = [] if packed_input else [(k["pack"], (pack_grid, 1, 1), (threads, 1, 1), args)]
        gemm, out = k[path], bufs["out"]
        if into is not None:
            chained = entry.get("packed_out") or {}
            if chained.get("consumer") != into:
                raise RuntimeInputError(f"layer {layer} cannot write {into}'s packed input (built to chain into "
                                        f"{chained.get('consumer')}); rebuild the kernels with that chain")
            target = self._buffers(self._entry(into), batch)
            args.out, args.out_sum = target["act"], target["rowsum"]
            steps.append(Memset(target["rowsum"], self._nbytes[target["rowsum"]]))
            if chained["zero_act"]:
                steps.append(Memset(target["act"], self._nbytes[target["act"]]))
            gemm, out = k[path + "_packed"], target["act"]
        steps.append((gemm, (_cdiv(rows, tile["tm"]), _cdiv(entry["ng"], tile["tn"]), entry["groups"]),
                      (tile["threads"], 1, 1), args))
        if "pool" in entry:
            c, ho, wo = entry["pool"]["out_shape"]
            pool = QcArgs(x=bufs["codes"], out=bufs["out"], batch=batch)
            steps.append((k["pool"], (_cdiv(batch * c * ho * wo, 128), 1, 1), (128, 1, 1), pool))
        return steps, out

    def execute(self, steps: list) -> None:
        for step in steps:
            if isinstance(step, Memset):
                self.device.memset(step.ptr, step.nbytes)
                self.launch_log.append("memset")
            else:
                self.device.launch(*step)
                self.launch_log.append(step[0])

    def run_device(self, layer: str, x_ptr: int | None, batch: int, *, into: str | None = None,
                   packed_input: bool = False) -> int:
        """Launch ``layer`` on ``batch`` samples at device address ``x_ptr``; returns its output's address (with
        ``into``: the consumer's packed input). See :meth:`launches`."""
        steps, out = self.launches(layer, x_ptr, batch, into=into, packed_input=packed_input)
        self.execute(steps)
        return out

    def upload(self, x: np.ndarray) -> int:
        ptr = self.device.alloc(x.nbytes)
        self.device.htod(ptr, np.ascontiguousarray(x))
        return ptr

    def download(self, ptr: int, shape, dtype) -> np.ndarray:
        out = np.empty(shape, dtype)
        self.device.sync()
        self.device.dtoh(out, ptr)
        return out

    def run(self, layer: str, x: np.ndarray) -> np.ndarray:
        """``x``: [batch, K] for a gemm (uint8, or float32 for a layer that quantizes its input), NCHW for a conv
        or a pool. Returns [batch, *out_shape]."""
        entry = self._entry(layer)
        want = np.dtype(entry["in_dtype"])
        if not isinstance(x, np.ndarray) or x.dtype != want or tuple(x.shape[1:]) != tuple(entry["in_shape"]):
            got = f"{x.dtype} {list(x.shape)}" if isinstance(x, np.ndarray) else type(x).__name__
            raise RuntimeInputError(f"layer {layer}: input {got}, expected {want} [batch, "
                                    f"{', '.join(map(str, entry['in_shape']))}]")
        batch = x.shape[0]
        if batch == 0:
            return np.zeros((0, *entry["out_shape"]), entry["out_dtype"])
        xp = self.upload(x)
        try:
            out = self.run_device(layer, xp, batch)
            return self.download(out, (batch, *entry["out_shape"]), entry["out_dtype"])
        finally:
            self.device.free(xp)


# ---------------------------------------------------------------------------------------------------- artifacts
PACKED = "packed"  # a value that exists only as its reader's packed planes


class GpuSession:
    """Follow a gpu artifact's schedule: kernel steps on the GPU, onnxruntime partitions for the float remainder
    (onnxruntime's CUDA provider when this onnxruntime has it, else the CPU with explicit copies). A value a kernel
    writes stays on the device while only kernels read it; it is copied to the host once, when onnxruntime or the
    caller needs it. A kernel step with ``packed_into`` writes its (only) reader's packed input, and that reader's
    step (``packed_input``) launches no pack kernel. ``lib.launch_log`` holds what ``run`` launched."""

    def __init__(self, path: Path, manifest: dict, session_options=None, *, emulation=None):
        import onnxruntime as ort

        self.path = Path(path)
        self.manifest = manifest
        kernels = (manifest.get("gpu") or {}).get("kernels")
        self.lib = GpuLibrary(self.path / kernels, emulation=emulation) if kernels else None
        self.layers = self.lib.layers if self.lib else {}
        providers = [p for p in ("CUDAExecutionProvider",) if p in ort.get_available_providers()] + \
            ["CPUExecutionProvider"]
        self._ort = {}
        for step in manifest["schedule"]:
            if step["kind"] == "onnxruntime":
                try:
                    self._ort[step["model"]] = ort.InferenceSession(str(self.path / step["model"]), session_options,
                                                                    providers=providers)
                except Exception as exc:  # noqa: BLE001 - onnxruntime's own exception types
                    raise ArtifactError(f"{self.path / step['model']}: onnxruntime cannot load it: "
                                        f"{str(exc).strip().splitlines()[0][:200]}") from None

    def _download(self, name: str, device: dict) -> np.ndarray:
        ptr, shape, dtype = device[name]
        if dtype == PACKED:
            raise RuntimeInputError(f"{name} exists only as packed bit planes on the GPU (a chained layer's input); "
                                    "it cannot be read")
        return self.lib.download(ptr, shape, dtype)

    def run(self, output_names, feeds: dict, run_options=None) -> list[np.ndarray]:
        host = dict(feeds)
        device: dict[str, tuple[int, tuple, str]] = {}   # value -> (pointer, shape, dtype or PACKED) on the GPU
        uploads = []
        if self.lib is not None:
            self.lib.launch_log.clear()
        try:
            for step in self.manifest["schedule"]:
                if step["kind"] == "kernel":
                    name = step["inputs"][0]
                    entry = self.layers[step["layer"]]
                    if name in device:
                        ptr, shape, _ = device[name]
                    else:
                        x = np.ascontiguousarray(host[name])
                        ptr, shape = self.lib.upload(x), x.shape
                        uploads.append(ptr)
                    lead = tuple(step.get("rows", ()))
                    batch = int(np.prod(shape[:1 + len(lead)]))
                    packed_in = bool(step.get("packed_input"))
                    out = self.lib.run_device(step["layer"], None if packed_in else ptr, batch,
                                              into=step.get("packed_into"), packed_input=packed_in)
                    device[step["outputs"][0]] = (out, (*shape[:1 + len(lead)], *entry["out_shape"]),
                                                  PACKED if step.get("packed_into") else entry["out_dtype"])
                else:
                    for name in step["inputs"]:
                        if name not in host and name in device:
                            host[name] = self._download(name, device)
                    sess = self._ort[step["model"]]
                    wanted = [o.name for o in sess.get_outputs()]
                    host.update(zip(wanted, sess.run(wanted, {k: host[k] for k in step["inputs"]})))
            names = output_names or [o["name"] for o in self.manifest["outputs"]]
            for name in names:
                if name not in host and name in device:
                    host[name] = self._download(name, device)
            return [host[name] for name in names]
        finally:
            for ptr in uploads:
                self.lib.device.free(ptr)
