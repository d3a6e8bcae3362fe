"""Structures found in pretrained models that Python packages ship (silero-vad, magika, rapidocr, ddddocr): a 1-D
conv net, an If selected by an input (a sample rate) that --fix-input folds, If branches that read values of the
enclosing graph kept in a float partition."""

import warnings

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from qcompile import api
from qcompile.errors import ConfigError
from qcompile.evaluate import predict
from qcompile.passes.load import parse_fixed_inputs
from qcompile.runtime import InferenceSession

torch = pytest.importorskip("torch")


def _conv1d_net():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Conv1d(4, 16, 5, padding=2)
            self.b = torch.nn.Conv1d(16, 16, 3, stride=2, dilation=2, padding=1)
            self.c = torch.nn.Conv1d(16, 16, 3, groups=4, padding=1)
            self.d = torch.nn.Conv1d(16, 8, 1)
            self.fc = torch.nn.Linear(8, 3)

        def forward(self, x):
            h = torch.relu(self.a(x))
            h = torch.nn.functional.silu(self.b(h))     # signed input for c
            h = torch.relu(self.c(h))
            return self.fc(torch.relu(self.d(h)).mean(2))

    torch.manual_seed(0)
    return Net().eval()


def test_1d_convs_run_on_the_2d_bit_kernels_exactly(tmp_path):
    path = tmp_path / "conv1d.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_conv1d_net(), (torch.randn(2, 4, 40),), str(path), input_names=["x"],
                          output_names=["y"], opset_version=17, dynamo=False, dynamic_axes={"x": {0: "N"}})
    x = np.random.default_rng(0).normal(size=(64, 4, 40)).astype(np.float32)
    result = api.compile(path, config="w4a4", calib=x, target="cpu", kernel="bitserial")
    plan = {p["node"]: p for p in result.manifest["plan"]}
    inner = [n for n in plan if n.startswith(("/b/", "/c/", "/d/"))]
    assert len(inner) == 3 and all(plan[n]["kernel"].startswith(("bitserial", "lut")) for n in inner), plan
    result.save(tmp_path / "art")
    xt = x[:5]
    np.testing.assert_array_equal(InferenceSession(tmp_path / "art").run(None, {"x": xt})[0], predict(result.model, xt))
    w8 = api.compile(path, config="w8a8", calib=x)
    np.testing.assert_allclose(predict(w8.model, xt), predict(w8.float_model, xt), atol=0.05)
    # the rewritten float model is the exported one
    import onnxruntime as ort
    np.testing.assert_allclose(predict(result.float_model, xt),
                               ort.InferenceSession(str(path)).run(None, {"x": xt})[0], atol=1e-5)


def _rate_switched_model(tmp_path):
    """y = If(sr == 16000, conv16(x), conv8(x)): each branch's weights live in the branch, and both read x from the
    enclosing graph (as silero-vad's do)."""
    rng = np.random.default_rng(0)

    def branch(name, cout):
        w = numpy_helper.from_array(rng.normal(0, 0.3, (cout, 8, 3, 3)).astype(np.float32), f"{name}.w")
        w2 = numpy_helper.from_array(rng.normal(0, 0.3, (4, cout, 3, 3)).astype(np.float32), f"{name}.w2")
        nodes = [helper.make_node("Conv", ["h", f"{name}.w"], [f"{name}.c"], name=f"{name}/conv", pads=[1] * 4),
                 helper.make_node("Relu", [f"{name}.c"], [f"{name}.r"], name=f"{name}/relu"),
                 helper.make_node("Conv", [f"{name}.r", f"{name}.w2"], [f"{name}.y"], name=f"{name}/conv2",
                                  pads=[1] * 4)]
        out = helper.make_tensor_value_info(f"{name}.y", TensorProto.FLOAT, None)
        return helper.make_graph(nodes, name, [], [out], [w, w2])

    w0 = numpy_helper.from_array(rng.normal(0, 0.3, (8, 1, 3, 3)).astype(np.float32), "stem.w")
    wf = numpy_helper.from_array(rng.normal(0, 0.3, (4, 2)).astype(np.float32), "head.w")
    nodes = [
        helper.make_node("Conv", ["x", "stem.w"], ["stem"], name="stem", pads=[1] * 4),
        helper.make_node("Relu", ["stem"], ["h"], name="stem/relu"),
        helper.make_node("Equal", ["sr", "k16"], ["is16"], name="is16"),
        helper.make_node("If", ["is16"], ["b"], name="rate_switch", then_branch=branch("at16k", 16),
                         else_branch=branch("at8k", 8)),
        helper.make_node("ReduceMean", ["b", "axes"], ["pooled"], name="pool", keepdims=0),
        helper.make_node("MatMul", ["pooled", "head.w"], ["y"], name="head"),
    ]
    graph = helper.make_graph(
        nodes, "switch",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 12, 12]),
         helper.make_tensor_value_info("sr", TensorProto.INT64, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])],
        [w0, wf, numpy_helper.from_array(np.array(16000, np.int64), "k16"),
         numpy_helper.from_array(np.array([2, 3], np.int64), "axes")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    path = tmp_path / "switch.onnx"
    onnx.save(model, path)
    return path


def test_if_branches_reading_the_outer_graph_stay_float_and_run(tmp_path):
    """Without --fix-input the If stays on onnxruntime: its float partition must take the outer values its branches
    read (x's relu), or onnxruntime refuses the partition."""
    path = _rate_switched_model(tmp_path)
    x = np.random.default_rng(1).uniform(0, 1, (16, 1, 12, 12)).astype(np.float32)
    result = api.compile(path, config="w2a2", calib={"x": x, "sr": np.array(16000, np.int64)}, target="cpu")
    kept = {r["node"]: r["why"] for r in result.report["kept_float_weighted"]}
    assert "subgraph" in kept["at16k/conv2"] and "subgraph" in kept["at8k/conv"], kept
    result.save(tmp_path / "art")
    sess = InferenceSession(tmp_path / "art")
    for rate in (16000, 8000):
        feeds = {"x": x[:3], "sr": np.array(rate, np.int64)}
        np.testing.assert_array_equal(sess.run(None, feeds)[0], predict(result.model, feeds))


def test_fix_input_folds_the_if_so_its_layers_are_quantized(tmp_path):
    path = _rate_switched_model(tmp_path)
    x = np.random.default_rng(1).uniform(0, 1, (32, 1, 12, 12)).astype(np.float32)
    calib = {"x": x, "sr": np.full(32, 16000, np.int64)}   # the fixed input may stay in the calibration data
    result = api.compile(path, config="w2a2", calib=calib, target="cpu", kernel="bitserial",
                         fix_inputs=parse_fixed_inputs(["sr=16000"]))
    plan = {p["node"]: p for p in result.manifest["plan"]}
    quantized = [n for n, p in plan.items() if p["bits"] != "float"]
    assert any("at16k/conv" in n for n in quantized), plan
    assert not any("at8k" in n for n in plan)                       # the other branch is gone
    assert [i["name"] for i in result.manifest["inputs"]] == ["x"]
    result.save(tmp_path / "art")
    xt = x[:4]
    np.testing.assert_array_equal(InferenceSession(tmp_path / "art").run(None, {"x": xt})[0],
                                  predict(result.model, {"x": xt}))
    # the folded float model computes what the original does at that rate
    import onnxruntime as ort
    ref = ort.InferenceSession(str(path)).run(None, {"x": xt, "sr": np.array(16000, np.int64)})[0]
    np.testing.assert_allclose(predict(result.float_model, {"x": xt}), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("items, needle", [
    (["sr"], "expected NAME=VALUE"), (["sr=fast"], "expected NAME=VALUE"), (["=3"], "expected NAME=VALUE")])
def test_fix_input_syntax_errors(items, needle):
    with pytest.raises(ConfigError, match=needle):
        parse_fixed_inputs(items)


@pytest.mark.parametrize("fix, needle", [
    ({"rate": [16000]}, r"no such model input; the inputs are \['sr', 'x'\]"),
    ({"sr": [16000.5]}, "give whole numbers"),
    ({"sr": [1, 2]}, r"2 value\(s\) given, the input has shape \[\]"),
])
def test_fix_input_bad_values_name_the_input(tmp_path, fix, needle):
    path = _rate_switched_model(tmp_path)
    with pytest.raises(ConfigError, match=needle):
        api.inspect(path, fix_inputs=fix)
