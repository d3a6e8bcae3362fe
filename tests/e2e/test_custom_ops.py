"""The artifact as onnxruntime custom ops: deploy.onnx runs in plain onnxruntime with the kernel library registered,
in a fresh process that never imports qcompile, bit for bit as the fake-quant model; RegisterCustomOps refuses an
onnxruntime whose C API is too old with a message naming the versions."""

import ctypes
import json
import subprocess
import sys

import numpy as np
import pytest

from graphs import tiny_inputs
from qcompile import api
from qcompile.evaluate import predict


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    import onnx

    from graphs import tiny_cnn

    folder = tmp_path_factory.mktemp("custom")
    onnx.save(tiny_cnn(), folder / "tiny.onnx")
    out = folder / "art"
    result = api.compile(folder / "tiny.onnx", config="w1a2", calib=tiny_inputs(32, 3), target="cpu",
                         kernel="bitserial")
    result.save(out)
    return result, out


def test_plain_onnxruntime_runs_the_artifact_without_qcompile(artifact, tmp_path):
    result, out = artifact
    x = tiny_inputs(5, seed=7)
    np.save(tmp_path / "x.npy", x)
    manifest = json.loads((out / "manifest.json").read_text())
    script = f"""
import sys, numpy as np, onnxruntime as ort
so = ort.SessionOptions()
so.register_custom_ops_library({str(out / manifest["deploy"]["library"])!r})
sess = ort.InferenceSession({str(out / manifest["deploy"]["model"])!r}, so, providers=["CPUExecutionProvider"])
y = sess.run(None, {{"input": np.load({str(tmp_path / "x.npy")!r})}})[0]
np.save({str(tmp_path / "y.npy")!r}, y)
assert not any(m == "qcompile" or m.startswith("qcompile.") for m in sys.modules), "qcompile was imported"
"""
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path, capture_output=True, timeout=120)
    np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), predict(result.model, x))


def test_a_kernel_error_is_one_line_from_onnxruntime(artifact, monkeypatch):
    """A status from a kernel (here: a code path the CPU does not have, or an emulated one) reaches the caller."""
    from qcompile.errors import RuntimeInputError
    from qcompile.runtime import InferenceSession
    from qcompile.runtime.kernels import Library

    _, out = artifact
    missing = [p for p in ("avx512", "avx2") if not Library(out / "kernels" / "qcompile_kernels.so").path_available(p)]
    if not missing:
        pytest.skip("this CPU has every code path: no way to provoke a kernel error here")
    monkeypatch.setenv("QCOMPILE_CPU_PATH", missing[0])
    with pytest.raises(RuntimeInputError, match="QCOMPILE_CPU_PATH names a code path this CPU lacks"):
        InferenceSession(out).run(None, {"input": tiny_inputs(2)})


def test_register_custom_ops_names_a_too_old_onnxruntime(artifact):
    """GetApi(16) returning NULL (an onnxruntime older than 1.16) gives an error status through the version-1 table."""
    _, out = artifact
    lib = ctypes.CDLL(str(out / "kernels" / "qcompile_kernels.so"))
    messages = []
    # pointers travel as size_t (ctypes warns about pointer-typed callback results)
    create_status = ctypes.CFUNCTYPE(ctypes.c_size_t, ctypes.c_int, ctypes.c_char_p)(
        lambda code, msg: messages.append((code, msg.decode())) or 1234)
    table_v1 = (ctypes.c_void_p * 1)(ctypes.cast(create_status, ctypes.c_void_p))
    get_api = ctypes.CFUNCTYPE(ctypes.c_size_t, ctypes.c_uint32)(lambda v: ctypes.addressof(table_v1) if v == 1 else 0)
    text = ctypes.create_string_buffer(b"1.15.1")
    version = ctypes.CFUNCTYPE(ctypes.c_size_t)(lambda: ctypes.addressof(text))

    class ApiBase(ctypes.Structure):
        _fields_ = [("GetApi", ctypes.c_void_p), ("GetVersionString", ctypes.c_void_p)]

    base = ApiBase(ctypes.cast(get_api, ctypes.c_void_p), ctypes.cast(version, ctypes.c_void_p))
    register = lib.RegisterCustomOps
    register.restype, register.argtypes = ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_void_p]
    assert register(None, ctypes.addressof(base)) == 1234
    assert messages and messages[0][0] == 1 and "1.15.1" in messages[0][1] and ">= 1.16" in messages[0][1]


def test_pack_keeps_only_what_runs_and_it_still_runs(artifact, tmp_path):
    from click.testing import CliRunner

    from qcompile.cli import main
    from qcompile.runtime import InferenceSession

    result, out = artifact
    dev = tmp_path / "device"
    res = CliRunner().invoke(main, ["pack", str(out), "-o", str(dev)])
    assert res.exit_code == 0, res.output
    files = sorted(str(p.relative_to(dev)) for p in dev.rglob("*") if p.is_file())
    assert files == ["deploy.onnx", "kernels/qcompile_kernels.so", "manifest.json"]
    assert sum((dev / f).stat().st_size for f in files) < sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    x = tiny_inputs(4, seed=11)
    np.testing.assert_array_equal(InferenceSession(dev).run(None, {"input": x})[0], predict(result.model, x))
    (dev / "deploy.onnx").write_bytes((dev / "deploy.onnx").read_bytes() + b"\0")   # tampered: refused
    from qcompile.errors import ArtifactError
    with pytest.raises(ArtifactError, match="sha256"):
        InferenceSession(dev)
    res = CliRunner().invoke(main, ["pack", str(out), "-o", str(out)])             # never over the artifact itself
    assert res.exit_code == 1 and "overwrite the input" in res.output


def test_onnxruntimes_pool_and_the_kernels_own_pool_give_the_same_outputs(artifact, monkeypatch):
    """By default the kernels' parallel loops run on onnxruntime's intra-op pool (KernelContext_ParallelFor);
    QCOMPILE_THREADS=own keeps their own pool. Batch 64 is large enough for every layer to go parallel."""
    from qcompile.runtime import InferenceSession

    result, out = artifact
    x = tiny_inputs(64, seed=12)
    on_ort = InferenceSession(out).run(None, {"input": x})[0]
    monkeypatch.setenv("QCOMPILE_THREADS", "own")
    own = InferenceSession(out).run(None, {"input": x})[0]
    np.testing.assert_array_equal(on_ort, own)
    np.testing.assert_array_equal(own, predict(result.model, x))
