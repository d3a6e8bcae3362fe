import pytest

from qcompile import api
from qcompile.errors import ConfigError


def _status(rows):
    return {r["node"]: r["status"] for r in rows if r["op"] in ("Conv", "Gemm")}


def test_first_and_last_stay_float_by_default(tiny_model_path):
    rows = api.inspect(tiny_model_path, config="w1a2")
    st = _status(rows)
    assert st["conv1"] == "float" and st["fc2"] == "float"
    assert st["conv2"] == st["conv3"] == st["fc1"] == "W1A2 balanced"
    why = {r["node"]: r["why"] for r in rows}
    assert "first weighted layer" in why["conv1"] and "last weighted layer" in why["fc2"]
    assert all(r["why"] for r in rows)  # every op, quantized or not, says why


def test_overrides_by_pattern(tiny_model_path):
    st = _status(api.inspect(tiny_model_path, config="w2a2", keep_float=["conv*"], quantize=["fc2"]))
    assert st["conv2"] == st["conv3"] == "float"
    assert st["fc1"] == st["fc2"] == "W2A2 balanced"


def test_unknown_preset_and_quantizer():
    with pytest.raises(ConfigError, match="unknown config 'w9a9'"):
        api.inspect("x.onnx", config="w9a9")
    with pytest.raises(ConfigError, match="unknown quantizer"):
        api.inspect("x.onnx", config="w2a2", quantizer="magic")


def test_layers_inside_if_branches_are_listed_as_float_with_the_reason():
    import numpy as np
    import onnx_ir as ir
    from onnx import TensorProto, helper, numpy_helper

    from qcompile.config import resolve_config
    from qcompile.passes.pipeline import CompileContext
    from qcompile.passes.plan import PlanBits

    w = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")

    def branch(name):
        return helper.make_graph([helper.make_node("MatMul", ["x", "w"], [f"{name}_y"], name=f"{name}_mm")], name,
                                 [], [helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT, ["N", 4])])

    nodes = [helper.make_node("If", ["cond"], ["y"], name="choose", then_branch=branch("then"),
                              else_branch=branch("else"))]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4]),
                                           helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], [w])
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    ctx = CompileContext(config=resolve_config("w2a2"))
    PlanBits()(model, ctx)
    for name in ("then_mm", "else_mm"):
        assert not ctx.plan[name].quantize and "inside the If node 'choose'" in ctx.plan[name].reason
