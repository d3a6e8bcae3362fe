"""A gpu artifact end to end: compile --target gpu (nvcc), run it through InferenceSession on the host emulation
of its own kernels, equal to the fake-quant model in onnxruntime; without a GPU the session says so in one line."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from graphs import tiny_inputs
from qcompile import api
from qcompile.errors import ConfigError
from qcompile.evaluate import predict
from qcompile.runtime import InferenceSession
from qcompile.runtime.gpu import GpuUnavailableError
from qcompile.targets.gpu.build import build_emulation
from tests.targets.gpu.gpu_cases import have_nvcc


pytestmark = pytest.mark.skipif(not have_nvcc(), reason="nvcc (CUDA toolkit) not installed: gpu artifacts cannot "
                                                         "be built here")


@pytest.fixture(scope="module")
def gpu_artifact(tmp_path_factory):
    from graphs import tiny_cnn
    import onnx

    tmp = tmp_path_factory.mktemp("gpu_art")
    onnx.save(tiny_cnn(), tmp / "tiny.onnx")
    result = api.compile(tmp / "tiny.onnx", config="w1a2", calib=tiny_inputs(32, 3), target="gpu:sm_90")
    out = tmp / "art"
    result.save(out)
    emu_dir = tmp / "emu"                                      # the emulation is built beside, not in, the artifact
    shutil.copytree(out / "kernels", emu_dir)
    return result, out, build_emulation(emu_dir)


def test_gpu_artifact_equals_fakequant_on_the_emulation(gpu_artifact, monkeypatch):
    result, out, so = gpu_artifact
    m = result.manifest
    assert m["target"]["name"] == "gpu:sm_90" and m["gpu"]["kernels"] == "kernels/qc_gpu.json"
    assert {"kernels/qc_gpu.fatbin", "kernels/qc_gpu_constants.bin", "kernels/qc_gpu.json"} <= set(m["files"])
    kernels = [p["kernel"] for p in m["plan"] if p["bits"] != "float"]
    assert kernels and all(k == "bitserial-gpu" for k in kernels)
    assert any(s["kind"] == "kernel" for s in m["schedule"])
    lib_manifest = json.loads((out / "kernels" / "qc_gpu.json").read_text())
    assert lib_manifest["archs"] == ["90"] and len(lib_manifest["sha256"]["qc_gpu.fatbin"]) == 64
    monkeypatch.setenv("QCOMPILE_GPU_EMULATION", str(so))
    for path in ("mma", "popc"):
        monkeypatch.setenv("QCOMPILE_GPU_PATH", path)
        sess = InferenceSession(out)
        for batch in (1, 5):
            x = tiny_inputs(batch, seed=batch)
            np.testing.assert_array_equal(sess.run(None, {"input": x})[0], predict(result.model, x))


def test_gpu_artifact_without_gpu_is_one_line(gpu_artifact, monkeypatch):
    _, out, _ = gpu_artifact
    monkeypatch.delenv("QCOMPILE_GPU_EMULATION", raising=False)
    try:
        InferenceSession(out)
    except GpuUnavailableError as exc:
        assert "\n" not in str(exc) and ("no CUDA" in str(exc) or "CUDA driver" in str(exc) or "sm_" in str(exc))
    else:  # a machine with a GPU: the session loads
        pass


def test_cli_target_gpu_and_unknown_targets(tmp_path):
    from qcompile.artifact import get_target

    assert get_target("gpu").archs == ("80", "90") and get_target("gpu:sm_90").archs == ("90",)
    with pytest.raises(ConfigError, match="unknown gpu target 'gpu:sm_x'"):
        get_target("gpu:sm_x")
    proc = subprocess.run([sys.executable, "-m", "qcompile", "compile", "--help"], capture_output=True, text=True)
    assert "gpu:sm_90" in proc.stdout
