"""Compiled artifacts equal the fake-quant model in onnxruntime, and bad artifacts/inputs are refused."""

import os
import subprocess
import sys

import numpy as np
import onnx
import pytest

from graphs import tiny_inputs
from qcompile import api
from qcompile.errors import ArtifactError, RuntimeInputError
from qcompile.evaluate import predict
from qcompile.runtime import InferenceSession


def _artifact(path, tmp_path, config, **kw):
    result = api.compile(path, config=config, calib=tiny_inputs(64, 3), target="cpu", **kw)
    out = tmp_path / f"art-{config}-{kw.get('kernel')}"
    result.save(out)
    return result, out


@pytest.mark.parametrize("config", ["w1a1", "w1a2", "w2a2", "w4a4"])
@pytest.mark.parametrize("kernel", ["bitserial", "int8", "float"])
def test_artifact_equals_fakequant_exactly(tiny_model_path, tmp_path, config, kernel):
    result, out = _artifact(tiny_model_path, tmp_path, config, kernel=kernel)
    kernels = {p["node"]: p["kernel"] for p in result.manifest["plan"] if p["bits"] != "float"}
    assert kernels and all(k.startswith({"bitserial": ("bitserial", "lut"), "int8": "onnxruntime-int8",
                                         "float": "onnxruntime-fp32"}[kernel]) for k in kernels.values())
    sess = InferenceSession(out)
    for batch in (1, 5):
        x = tiny_inputs(batch, seed=batch)
        np.testing.assert_array_equal(sess.run(None, {"input": x})[0], predict(result.model, x))


@pytest.mark.parametrize("path", ["avx2", "generic"])
def test_each_cpu_path_end_to_end(tiny_model_path, tmp_path, monkeypatch, path):
    result, out = _artifact(tiny_model_path, tmp_path, "w2a2", kernel="bitserial")
    monkeypatch.setenv("QCOMPILE_CPU_PATH", path)
    sess = InferenceSession(out)
    from qcompile.runtime.kernels import Library

    lib = Library(out / sess.manifest["deploy"]["library"])
    if not lib.path_available(path):
        pytest.skip(f"{path} not available on this CPU")
    assert lib.selected_path() == path
    x = tiny_inputs(3)
    np.testing.assert_array_equal(sess.run(None, {"input": x})[0], predict(result.model, x))


def test_manifest_describes_the_artifact(tiny_model_path, tmp_path):
    result, out = _artifact(tiny_model_path, tmp_path, "w1a2", kernel="bitserial")
    m = result.manifest
    assert m["schema"] == "qcompile.artifact" and m["schema_version"] == 1
    assert len(m["source"]["sha256"]) == 64 and m["target"]["name"] == "cpu"
    assert m["inputs"] == [{"name": "input", "dtype": "float32", "shape": ["N", 1, 12, 12]}]
    assert any(f.endswith(".so") for f in m["files"]) and "graph.onnx" in m["files"]
    kinds = [s["kind"] for s in m["schedule"]]
    kernels = [s["layer"] for s in m["schedule"] if s["kind"] == "kernel"]
    # three fused layers; the 2x2/2 MaxPool after conv2 (a MaxPoolCodes node of graph.onnx) is folded into conv2's
    # kernel step, which writes the pool's output
    assert kernels == ["conv2", "conv3", "fc1"] and "onnxruntime" in kinds
    pool = next(n for n in onnx.load(out / "graph.onnx").graph.node if n.op_type == "MaxPoolCodes")
    assert next(s for s in m["schedule"] if s.get("layer") == "conv2")["outputs"] == list(pool.output)
    for name in ("manifest.json", "graph.onnx", "fakequant.onnx", "report.json", "report.md", "weights.png"):
        assert (out / name).is_file()
    # the library carries the AVX-512 BitGemm kernels whatever this machine has (the path is picked at run time)
    from qcompile.runtime.kernels import Library

    lib = Library(out / m["deploy"]["library"])
    assert lib.manifest["layer_avx512"] is True
    assert lib.manifest["layers"]["conv2"]["pool"] == [2, 2] and "pool2_codes" not in lib.manifest["layers"]
    # conv1 stays float; its Clip -> QuantizeLinear is folded into conv2, which reads conv1's floats
    assert lib.manifest["layers"]["conv2"]["in_dtype"] == "float32"
    why = next(p["why"] for p in m["plan"] if p["node"] == "conv2")
    assert "MaxPool runs inside this kernel" in why and "quantizes its float input itself" in why
    first = m["schedule"][0]
    assert first["kind"] == "onnxruntime" and next(s for s in m["schedule"] if s.get("layer") == "conv2")["inputs"] \
        == first["outputs"]
    assert not any(n.op_type == "QuantizeLinear" for n in onnx.load(out / first["model"]).graph.node)


def test_tampered_kernel_is_refused_before_loading(tiny_model_path, tmp_path):
    _, out = _artifact(tiny_model_path, tmp_path, "w1a2", kernel="bitserial")
    so = next((out / "kernels").glob("*.so"))
    data = bytearray(so.read_bytes())
    data[len(data) // 2] ^= 0xFF
    so.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"\.so: sha256 differs from the manifest"):
        InferenceSession(out)


def test_missing_file_and_not_an_artifact(tiny_model_path, tmp_path):
    _, out = _artifact(tiny_model_path, tmp_path, "w2a2", kernel="bitserial")
    (out / "graph.onnx").unlink()
    with pytest.raises(ArtifactError, match="graph.onnx: listed in the manifest but missing"):
        InferenceSession(out)
    with pytest.raises(ArtifactError, match="no manifest.json"):
        InferenceSession(tmp_path)


def test_wrong_feeds_name_the_input(tiny_model_path, tmp_path):
    _, out = _artifact(tiny_model_path, tmp_path, "w2a2", kernel="bitserial")
    sess = InferenceSession(out)
    x = tiny_inputs(2)
    with pytest.raises(RuntimeInputError, match="unknown input 'image'; this model's inputs are \\['input'\\]"):
        sess.run(None, {"image": x})
    with pytest.raises(RuntimeInputError, match="input 'input': shape \\[2, 1, 10, 12\\], expected"):
        sess.run(None, {"input": x[:, :, :10]})
    with pytest.raises(RuntimeInputError, match="input 'input': dtype float64, expected float32"):
        sess.run(None, {"input": x.astype(np.float64)})
    with pytest.raises(RuntimeInputError, match="missing input 'input'"):
        sess.run(None, {})
    assert [i.name for i in sess.get_inputs()] == ["input"] and sess.get_outputs()[0].type == "tensor(float)"


def test_runtime_imports_without_compiler_packages(tiny_model_path, tmp_path):
    """The deployed runtime must work with only numpy + onnxruntime: block onnx, onnx_ir, torch, click, rich."""
    _, out = _artifact(tiny_model_path, tmp_path, "w1a2", kernel="bitserial")
    code = f"""
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('onnx', 'onnx_ir', 'onnxscript', 'torch', 'click', 'rich', 'matplotlib'):
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
import numpy as np
from qcompile.runtime import InferenceSession
s = InferenceSession({str(out)!r})
print(s.run(None, {{'input': np.zeros((2, 1, 12, 12), np.float32)}})[0].shape)
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ.copy())
    assert res.returncode == 0, res.stderr
    assert "(2, 10)" in res.stdout


def test_autotuned_artifact_equals_fakequant(tiny_model_path, tmp_path):
    """--autotune: every quantized layer gets some kernel by timing, and the artifact stays exact whatever it got."""
    result, out = _artifact(tiny_model_path, tmp_path, "w2a2", autotune=True)
    plan = [p for p in result.manifest["plan"] if p["bits"] != "float"]
    assert plan and all("measured at batch" in p["why"] for p in plan)
    x = tiny_inputs(4, seed=9)
    np.testing.assert_array_equal(InferenceSession(out).run(None, {"input": x})[0], predict(result.model, x))


def test_nchwc_is_turned_off_only_for_same_outputs_and_a_clear_gain():
    from qcompile.partition import NCHWC, nchwc_choice
    assert nchwc_choice(True, 2.0, 1.3) == [NCHWC]
    assert nchwc_choice(False, 2.0, 1.3) == []          # different float bits could flip a code
    assert nchwc_choice(True, 2.0, 1.85) == []          # within timing noise


def test_deployed_session_without_nchwc_runs_and_equals_fakequant(tiny_model_path, tmp_path, monkeypatch):
    import json

    from qcompile import partition
    monkeypatch.setattr(partition, "nchwc_choice", lambda same, *_: [partition.NCHWC] if same else [])
    result, out = _artifact(tiny_model_path, tmp_path, "w1a2", kernel="bitserial")
    deploy = json.loads((out / "manifest.json").read_text())["deploy"]
    assert deploy["disabled_optimizers"] == [partition.NCHWC]   # the float conv1 is there: the probe ran
    sess = InferenceSession(out)
    for batch in (1, 7):
        x = tiny_inputs(batch, seed=10 + batch)
        np.testing.assert_array_equal(sess.run(None, {"input": x})[0], predict(result.model, x))


def test_any_node_name_compiles_and_runs(tmp_path):
    """ONNX allows any node name; generated C must not care (identifiers from codegen.c_name, comments escaped)."""
    from graphs import tiny_cnn

    model = tiny_cnn()
    odd = {"conv2": "Conv@2", "conv3": "conv3 */ #include <evil.h>", "fc1": "блок/fc:1\nnext"}
    for node in model.graph.node:
        node.name = odd.get(node.name, node.name)
    path = tmp_path / "odd.onnx"
    onnx.save(model, path)
    result = api.compile(path, config="w2a2", calib=tiny_inputs(32), target="cpu")
    assert {"Conv@2", "conv3 */ #include <evil.h>", "блок/fc:1\nnext"} <= set(result.ctx.layers)
    result.save(tmp_path / "art")
    x = tiny_inputs(5, seed=9)
    np.testing.assert_array_equal(InferenceSession(tmp_path / "art").run(None, {"input": x})[0],
                                  predict(result.model, x))


def test_symbolic_spatial_sizes_stay_on_onnxruntime_with_the_reason(tmp_path):
    """A conv whose height and width are symbolic, with no calibration batch to take sizes from (a reader that cannot
    rewind), cannot get a fixed-shape kernel: it stays fake-quant, says why, and the artifact equals the fake-quant
    model."""
    from graphs import tiny_cnn

    model = tiny_cnn()
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_param, dims[3].dim_param = "H", "W"
    path = tmp_path / "dyn.onnx"
    onnx.save(model, path)

    class OneShot:  # get_next only: the artifact cannot read a batch back for its sizes
        batches = iter([{"input": tiny_inputs(32)}])

        def get_next(self):
            return next(self.batches, None)

    result = api.compile(path, config="w2a2", calib=OneShot(), target="cpu")
    plan = {p["node"]: p for p in result.manifest["plan"]}
    assert plan["conv2"]["kernel"] == "onnxruntime-fp32" and "symbolic" in plan["conv2"]["why"]
    assert "[batch, 8, ?, ?]" in plan["conv2"]["why"]
    result.save(tmp_path / "art")
    x = tiny_inputs(3, seed=4)
    np.testing.assert_array_equal(InferenceSession(tmp_path / "art").run(None, {"input": x})[0],
                                  predict(result.model, x))


def test_recompiling_into_the_same_folder_loads_the_new_kernels(tiny_model_path, tmp_path):
    """dlopen returns an already loaded library by name: the runtime must not keep the old kernels."""
    x = tiny_inputs(4, seed=2)
    for config in ("w1a2", "w2a2"):
        result = api.compile(tiny_model_path, config=config, calib=tiny_inputs(32, 3), target="cpu",
                             kernel="bitserial")
        result.save(tmp_path / "art")
        np.testing.assert_array_equal(InferenceSession(tmp_path / "art").run(None, {"input": x})[0],
                                      predict(result.model, x))


def test_weights_in_constant_nodes_are_quantized(tmp_path):
    """Exporters sometimes put weights in Constant nodes instead of initializers: they quantize all the same."""
    from onnx import helper

    from graphs import tiny_cnn

    model = tiny_cnn()
    inits = {t.name: t for t in model.graph.initializer}
    for name in ("conv2.w", "fc1.w"):
        model.graph.node.insert(0, helper.make_node("Constant", [], [name], value=inits[name], name=f"const_{name}"))
        model.graph.initializer.remove(inits[name])
    path = tmp_path / "constw.onnx"
    onnx.save(model, path)
    result = api.compile(path, config="w2a2", calib=tiny_inputs(32), target="cpu")
    assert {"conv2", "fc1"} <= set(result.ctx.layers)
    result.save(tmp_path / "art")
    x = tiny_inputs(3, seed=8)
    np.testing.assert_array_equal(InferenceSession(tmp_path / "art").run(None, {"input": x})[0],
                                  predict(result.model, x))
