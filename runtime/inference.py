"""The deployed runtime: InferenceSession(artifact_dir) with onnxruntime's shape (run, get_inputs, get_outputs).

Needs only numpy, onnxruntime and the artifact's built kernels: no onnx, torch, click or compiler. Every file the
manifest lists is checked against its sha256 before anything is loaded, so a tampered kernel never runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from qcompile.errors import ArtifactError, RuntimeInputError

SCHEMA = "qcompile.artifact"
SCHEMA_VERSION = 1


@dataclass(frozen=True)
class NodeArg:
    """Like onnxruntime.NodeArg: name, shape (None/str for dynamic dims), type ('tensor(float)')."""

    name: str
    shape: list
    type: str


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def ort_threads(requested: int = 0) -> int:
    """onnxruntime's intra-op thread count: ``requested`` if set, else the CPUs this process may use when it is
    pinned to fewer than the machine has (onnxruntime's default counts the whole machine's cores, which
    oversubscribes a ``taskset``), else 0 (onnxruntime's default)."""
    if requested or not hasattr(os, "sched_getaffinity"):
        return requested
    allowed = len(os.sched_getaffinity(0))
    return allowed if allowed < (os.cpu_count() or allowed) else 0


def session_options(intra_op_num_threads: int = 0, spinning: bool = False) -> ort.SessionOptions:
    """The options every partition session gets (the compiler times partitions with them too)."""
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = ort_threads(intra_op_num_threads)
    # idle onnxruntime workers must not spin when bit kernels run outside onnxruntime next (they would take the
    # cores); the deployed session runs its kernels on onnxruntime's own pool, where spinning helps
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    return so


def _ort_type(dtype: str) -> str:
    return {"float32": "tensor(float)", "uint8": "tensor(uint8)", "int64": "tensor(int64)"}.get(dtype,
                                                                                            f"tensor({dtype})")


class InferenceSession:
    """Run a compiled qcompile artifact: fused layers on its kernels, the rest on onnxruntime."""

    def __init__(self, artifact_dir: str | Path, *, intra_op_num_threads: int = 0):
        self.path = Path(artifact_dir)
        manifest_path = self.path / "manifest.json"
        if not manifest_path.is_file():
            raise ArtifactError(f"{self.path}: no manifest.json; is this a qcompile artifact folder?")
        try:
            self.manifest = json.loads(manifest_path.read_text())
        except json.JSONDecodeError as exc:
            raise ArtifactError(f"{manifest_path}: corrupt manifest ({exc})") from None
        if self.manifest.get("schema") != SCHEMA or self.manifest.get("schema_version") != SCHEMA_VERSION:
            raise ArtifactError(f"{manifest_path}: schema {self.manifest.get('schema')} "
                                f"v{self.manifest.get('schema_version')}, this runtime reads {SCHEMA} "
                                f"v{SCHEMA_VERSION}; recompile the model")
        self._verify_files()
        # the kernels run on onnxruntime's intra-op pool (ort_ops.c) unless QCOMPILE_THREADS=own: then its
        # workers may spin between them
        so = session_options(intra_op_num_threads, spinning=os.environ.get("QCOMPILE_THREADS", "") != "own")
        self._gpu = None
        target = str((self.manifest.get("target") or {}).get("name", ""))
        if target.startswith("fpga"):
            raise ArtifactError(f"{self.path}: an FPGA project ({target}), not a host artifact: simulate it with "
                                f"{self.path / 'fpga' / 'hls' / 'csim.sh'} or build it with Vitis (run_hls.tcl); "
                                "compile with --target cpu to run on this machine")
        if target.startswith("gpu"):
            # a gpu artifact: kernels through the CUDA driver, float partitions on onnxruntime (runtime/gpu.py)
            from qcompile.runtime.gpu import GpuSession

            self._gpu = GpuSession(self.path, self.manifest, so)
            deploy = {"model": None}
        else:
            deploy = self.manifest.get("deploy")
        if not deploy:
            raise ArtifactError(f"{manifest_path}: no deployable graph in the manifest (an artifact from an older "
                                "qcompile); recompile the model")
        if self._gpu is None and deploy.get("library"):
            # dlopen by a name made of the verified sha256 (runtime.kernels._content_alias): a recompiled library
            # in the same folder is never mistaken for the one already loaded
            from qcompile.runtime.kernels import _content_alias

            lib = self.path / deploy["library"]
            so.register_custom_ops_library(str(_content_alias(lib, self.manifest["files"].get(deploy["library"]))))
        try:
            self._session = self._gpu or ort.InferenceSession(str(self.path / deploy["model"]), so,
                                                 providers=["CPUExecutionProvider"],
                                                 disabled_optimizers=deploy.get("disabled_optimizers") or None)
        except Exception as exc:  # noqa: BLE001 - onnxruntime's own exception types
            raise ArtifactError(f"{self.path / deploy['model']}: onnxruntime cannot load it: "
                                f"{str(exc).strip().splitlines()[0][:200]}") from None
        self._inputs = [NodeArg(i["name"], i["shape"], _ort_type(i["dtype"])) for i in self.manifest["inputs"]]
        self._outputs = [NodeArg(o["name"], o["shape"], _ort_type(o["dtype"])) for o in self.manifest["outputs"]]
        self._input_dtypes = {i["name"]: np.dtype(i["dtype"]) for i in self.manifest["inputs"]}
        # kernels built for the calibration's sizes of symbolic inputs; other sizes run the fake-quant model
        generic = self.manifest.get("generic")
        self._generic_inputs = [NodeArg(i["name"], i["shape"], _ort_type(i["dtype"])) for i in generic["inputs"]] \
            if generic else None
        self._generic_session = None
        self._so = so

    def _verify_files(self) -> None:
        for rel, digest in self.manifest.get("files", {}).items():
            path = self.path / rel
            if not path.is_file():
                raise ArtifactError(f"{path}: listed in the manifest but missing; copy the whole artifact folder")
            if _sha256(path) != digest:
                raise ArtifactError(f"{path}: sha256 differs from the manifest (modified or corrupt); "
                                    "refusing to load it, recompile the model")

    def get_inputs(self) -> list[NodeArg]:
        return list(self._inputs)

    def get_outputs(self) -> list[NodeArg]:
        return list(self._outputs)

    @staticmethod
    def _shape_fits(shape: list, x: np.ndarray) -> bool:
        return x.ndim == len(shape) and all(not (isinstance(d, int) and d > 0) or d == s for d, s in zip(shape, x.shape))

    def _check_feeds(self, feeds: dict) -> tuple[dict, bool]:
        """Checked, contiguous feeds, and whether they need the generic (fake-quant) model: an input of another
        size than the kernels were built for, where the model's input allows that size."""
        names = [i.name for i in self._inputs]
        unknown = [k for k in feeds if k not in names]
        if unknown:
            raise RuntimeInputError(f"unknown input '{unknown[0]}'; this model's inputs are {names}")
        checked = {}
        for arg in self._inputs:
            if arg.name not in feeds:
                raise RuntimeInputError(f"missing input '{arg.name}' (expected {arg.type}, shape {arg.shape})")
            x = feeds[arg.name]
            want = self._input_dtypes[arg.name]
            if not isinstance(x, np.ndarray) or x.dtype != want:
                got = x.dtype if isinstance(x, np.ndarray) else type(x).__name__
                raise RuntimeInputError(f"input '{arg.name}': dtype {got}, expected {want}")
            checked[arg.name] = x if x.flags.c_contiguous else np.ascontiguousarray(x)  # (keeps 0-d scalars)
        if all(self._shape_fits(arg.shape, checked[arg.name]) for arg in self._inputs):
            return checked, False
        for arg in self._generic_inputs or self._inputs:
            if not self._shape_fits(arg.shape, checked[arg.name]):
                raise RuntimeInputError(f"input '{arg.name}': shape {list(checked[arg.name].shape)}, "
                                        f"expected {arg.shape}")
        return checked, True

    def _run_generic(self, output_names, values: dict) -> list[np.ndarray]:
        if self._generic_session is None:
            model = self.path / self.manifest["generic"]["model"]
            self._generic_session = ort.InferenceSession(str(model), self._so, providers=["CPUExecutionProvider"])
            warnings.warn(f"{self.path}: input sizes {', '.join(f'{k}{list(v.shape)}' for k, v in values.items())} "
                          f"differ from the sizes the kernels were built for "
                          f"({', '.join(f'{a.name}{a.shape}' for a in self._inputs)}): running the fake-quant "
                          "model on onnxruntime (same results, slower); calibrate with inputs of this size to get "
                          "kernels for it", RuntimeWarning, stacklevel=3)
        return self._generic_session.run(output_names, values)

    def run(self, output_names, input_feed: dict, run_options=None) -> list[np.ndarray]:
        values, generic = self._check_feeds(input_feed)
        if generic:
            return self._run_generic(output_names or [o.name for o in self._outputs], values)
        try:
            return self._session.run(output_names, values, run_options)
        except Exception as exc:  # noqa: BLE001 - onnxruntime's errors (a kernel's status among them), as one line
            raise RuntimeInputError(f"{self.path}: {str(exc).strip().splitlines()[0][:300]}") from None

