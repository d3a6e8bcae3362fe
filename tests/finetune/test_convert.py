"""The ONNX -> torch.fx converter equals onnxruntime, exposes each weighted layer, and refuses what it cannot do."""

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import graphs
from qcompile.config import resolve_config
from qcompile.finetune.convert import UnsupportedOpError, WeightedLayer, to_torch, weighted_layers
from qcompile.passes.canonicalize import canonicalize_passes
from qcompile.passes.load import load_model
from qcompile.passes.pipeline import CompileContext, run_pipeline

MODELS = Path(__file__).resolve().parents[2] / "models"
RNG = np.random.default_rng(0)


# --------------------------------------------------------------------------------------------- helpers
def _w(*shape, scale=0.5):
    return RNG.normal(0, scale, shape).astype(np.float32)


def make(nodes, inputs, inits=(), outputs=("y",), opset=17):
    """A model from nodes; inputs: {name: shape with "N" for the batch}; inits: {name: array}."""
    graph = helper.make_graph(
        nodes, "t", [helper.make_tensor_value_info(k, TensorProto.FLOAT, v) for k, v in inputs.items()],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in dict(inits).items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    return checked(model)


def checked(model):
    model.ir_version = 10
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)  # fills in the outputs' shapes
    onnx.checker.check_model(model)
    return model


def _feeds(model, batch, seed=0):
    rng = np.random.default_rng(seed + batch)
    feeds = {}
    for vi in model.graph.input:
        shape = [d.dim_value if d.HasField("dim_value") else batch for d in vi.type.tensor_type.shape.dim]
        feeds[vi.name] = rng.normal(0, 1, shape).astype(np.float32)
    return feeds


def assert_matches_ort(model, batches=(1, 3), feeds=None):
    gm = to_torch(model)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for batch in batches:
        f = feeds(batch) if feeds else _feeds(model, batch)
        expect = sess.run(None, f)
        with torch.no_grad():
            got = gm(*[torch.from_numpy(f[i.name]) for i in model.graph.input])
        got = got if isinstance(got, tuple) else (got,)
        assert len(got) == len(expect)
        for g, e in zip(got, expect):
            assert tuple(g.shape) == e.shape
            np.testing.assert_allclose(g.numpy(), e, rtol=1e-5, atol=1e-5)
    return gm


def canonical(proto):
    model = ir.from_proto(proto)
    run_pipeline(model, canonicalize_passes(), CompileContext(resolve_config("w2a2")))
    return ir.to_proto(model)


def _fmnist_feeds(batch):
    return {"input": np.random.default_rng(batch).uniform(0, 1, (batch, 1, 28, 28)).astype(np.float32)}


# --------------------------------------------------------------------------------------------- the models
@pytest.mark.parametrize("name", ["fmnist_cnn", "fmnist_mlp"])
@pytest.mark.parametrize("form", ["raw", "canonical"])
def test_bundled_models_match_onnxruntime(name, form):
    path = MODELS / f"{name}.onnx"
    proto = onnx.load(path) if form == "raw" else canonical(load_model(path))
    ops = {n.op_type for n in proto.graph.node}
    assert ("BatchNormalization" in ops) == (form == "raw")  # raw keeps its BN nodes, canonical folded them
    assert_matches_ort(proto, batches=(1, 7), feeds=_fmnist_feeds)


@pytest.mark.parametrize("builder", [graphs.tiny_cnn])
@pytest.mark.parametrize("opset", [11, 13, 17])
def test_hand_built_graphs_match_onnxruntime(builder, opset):
    proto = builder(opset=opset)
    feeds = lambda batch: {"input": graphs.tiny_inputs(batch, seed=batch)}  # noqa: E731
    assert_matches_ort(proto, feeds=feeds)
    assert_matches_ort(canonical(load_model_proto(proto)), feeds=feeds)


def load_model_proto(proto):
    """load_model's opset conversion and shape inference, for an in-memory model."""
    proto = onnx.version_converter.convert_version(proto, 21)
    return onnx.shape_inference.infer_shapes(proto)


# --------------------------------------------------------------------------------------------- single ops
def conv_case(**attrs):
    group = attrs.get("group", 1)
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", **attrs)]
    return make(nodes, {"x": ["N", 4, 9, 8]}, {"w": _w(6, 4 // group, 3, 3), "b": _w(6)})


CASES = {
    "layernorm_last_axis": lambda: make([helper.make_node("LayerNormalization", ["x", "g", "b"], ["y"],
                                                          epsilon=1e-5)],
                                        {"x": ["N", 5, 8]}, {"g": _w(8), "b": _w(8)}),
    "layernorm_two_axes_no_bias": lambda: make([helper.make_node("LayerNormalization", ["x", "g"], ["y"], axis=-2)],
                                               {"x": ["N", 5, 8]}, {"g": _w(5, 8)}),
    "conv_plain": lambda: conv_case(),
    "conv_grouped_strided": lambda: conv_case(group=2, strides=[2, 2], pads=[1, 1, 1, 1]),
    "conv_depthwise": lambda: make([helper.make_node("Conv", ["x", "w"], ["y"], group=4, pads=[1, 1, 1, 1])],
                                   {"x": ["N", 4, 7, 7]}, {"w": _w(4, 1, 3, 3)}),
    "conv_dilated": lambda: conv_case(dilations=[2, 1], pads=[2, 1, 2, 1]),
    "conv_asymmetric_pads": lambda: conv_case(pads=[0, 1, 2, 0], strides=[2, 1]),
    "conv_same_upper": lambda: conv_case(auto_pad="SAME_UPPER", strides=[2, 2]),
    "conv_same_lower": lambda: conv_case(auto_pad="SAME_LOWER", strides=[2, 2]),
    "conv_valid": lambda: conv_case(auto_pad="VALID", strides=[2, 3]),
    "conv_1d": lambda: make([helper.make_node("Conv", ["x", "w"], ["y"], pads=[2, 0])],
                            {"x": ["N", 3, 10]}, {"w": _w(5, 3, 3)}),
    "gemm_transB": lambda: make([helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1)],
                                {"x": ["N", 6]}, {"w": _w(5, 6), "b": _w(5)}),
    "gemm_alpha_beta_2d_bias": lambda: make(
        [helper.make_node("Gemm", ["x", "w", "b"], ["y"], alpha=0.5, beta=2.0)],
        {"x": ["N", 6]}, {"w": _w(6, 5), "b": _w(1, 5)}),
    "gemm_transA_transB_scalar_bias": lambda: make(
        [helper.make_node("Gemm", ["x", "w", "b"], ["y"], transA=1, transB=1, alpha=1.5, beta=-1.0)],
        {"x": [6, "N"]}, {"w": _w(5, 6), "b": _w()}),
    "gemm_no_bias": lambda: make([helper.make_node("Gemm", ["x", "w"], ["y"], transB=1)],
                                 {"x": ["N", 6]}, {"w": _w(5, 6)}),
    "gemm_dynamic_c": lambda: make([helper.make_node("Gemm", ["x", "w", "c"], ["y"], beta=0.5)],
                                   {"x": ["N", 6], "c": ["N", 5]}, {"w": _w(6, 5)}),
    "matmul_3d_input": lambda: make(
        [helper.make_node("MatMul", ["x", "w"], ["m"], name="proj"),
         helper.make_node("Add", ["m", "b"], ["y"])],
        {"x": ["N", 5, 8]}, {"w": _w(8, 4), "b": _w(4)}),
    "attention_softmax13": lambda: attention(13),
    "attention_softmax11": lambda: attention(11),
    "log_softmax11_axis1": lambda: make([helper.make_node("LogSoftmax", ["x"], ["y"], axis=1)],
                                        {"x": ["N", 3, 4]}, opset=11),
    "maxpool_ceil": lambda: make([helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[3, 3], strides=[2, 2],
                                                   ceil_mode=1)], {"x": ["N", 2, 8, 7]}),
    "maxpool_ceil_pads": lambda: make([helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[3, 2],
                                                        strides=[2, 2], pads=[1, 0, 1, 1], ceil_mode=1)],
                                      {"x": ["N", 2, 8, 7]}),
    "maxpool_ceil_drops_window_in_pad": lambda: make(
        [helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[2, 2], strides=[2, 2], pads=[0, 0, 1, 1],
                          ceil_mode=1)], {"x": ["N", 2, 6, 6]}),
    "maxpool_dilated": lambda: make([helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[2, 2],
                                                      dilations=[2, 2], pads=[1, 1, 1, 1])], {"x": ["N", 2, 7, 7]}),
    "avgpool_include_pad": lambda: avgpool(count_include_pad=1),
    "avgpool_exclude_pad": lambda: avgpool(count_include_pad=0),
    "avgpool_include_pad_ceil": lambda: avgpool(count_include_pad=1, ceil_mode=1),
    "avgpool_exclude_pad_ceil": lambda: avgpool(count_include_pad=0, ceil_mode=1),
    "avgpool_asymmetric": lambda: make([helper.make_node("AveragePool", ["x"], ["y"], kernel_shape=[2, 2],
                                                         pads=[0, 1, 1, 0], count_include_pad=1)],
                                       {"x": ["N", 2, 5, 5]}),
    "global_pools": lambda: make([helper.make_node("GlobalAveragePool", ["x"], ["a"]),
                                  helper.make_node("GlobalMaxPool", ["x"], ["b"]),
                                  helper.make_node("Concat", ["a", "b"], ["y"], axis=1)], {"x": ["N", 3, 5, 4]}),
    "concat_transpose": lambda: concat_transpose(),
    "reshape_zero_minus_one": lambda: make(
        [helper.make_node("Reshape", ["x", "s1"], ["r"]),
         helper.make_node("Relu", ["r"], ["q"]),
         helper.make_node("Reshape", ["q", "s2"], ["y"])],
        {"x": ["N", 4, 3, 2]}, {"s1": np.array([0, 2, -1], np.int64), "s2": np.array([-1, 6], np.int64)}),
    "flatten_axis2": lambda: make([helper.make_node("Flatten", ["x"], ["y"], axis=2)], {"x": ["N", 3, 4, 2]}),
    "clip_missing_min": lambda: make([helper.make_node("Clip", ["x", "", "hi"], ["y"])], {"x": ["N", 5]},
                                     {"hi": np.array(0.3, np.float32)}),
    "clip_both": lambda: make([helper.make_node("Clip", ["x", "lo", "hi"], ["y"])], {"x": ["N", 5]},
                              {"lo": np.array(-0.2, np.float32), "hi": np.array(0.3, np.float32)}),
    "clip_opset6_attrs": lambda: make([helper.make_node("Clip", ["x"], ["y"], min=-0.5, max=0.25)],
                                      {"x": ["N", 5]}, opset=10),
    "elementwise": lambda: elementwise(),
    "gelu_erf": lambda: gelu_erf(),
    "batchnorm_4d": lambda: make(
        [helper.make_node("BatchNormalization", ["x", "g", "b", "m", "v"], ["y"], epsilon=1e-3)],
        {"x": ["N", 3, 4, 4]}, {"g": _w(3), "b": _w(3), "m": _w(3), "v": np.abs(_w(3)) + 0.5}),
    "squeeze_unsqueeze_13": lambda: make(
        [helper.make_node("Unsqueeze", ["x", "a"], ["u"]), helper.make_node("Squeeze", ["u", "a"], ["y"])],
        {"x": ["N", 3, 4]}, {"a": np.array([1, -1], np.int64)}),
    "squeeze_unsqueeze_11": lambda: make(
        [helper.make_node("Unsqueeze", ["x"], ["u"], axes=[0, 3]), helper.make_node("Squeeze", ["u"], ["y"],
                                                                                      axes=[3])],
        {"x": ["N", 3, 4]}, opset=11),
    "reduce_mean_13": lambda: make([helper.make_node("ReduceMean", ["x"], ["y"], axes=[1, -1], keepdims=1)],
                                   {"x": ["N", 3, 4, 5]}, opset=13),
    "reduce_mean_18": lambda: make([helper.make_node("ReduceMean", ["x", "a"], ["y"], keepdims=0)],
                                   {"x": ["N", 3, 4, 5]}, {"a": np.array([2], np.int64)}, opset=18),
    "pad_constant": lambda: make([helper.make_node("Pad", ["x", "p", "v"], ["y"], mode="constant")],
                                 {"x": ["N", 2, 3, 3]},
                                 {"p": np.array([0, 0, 1, 0, 0, 1, 0, 2], np.int64), "v": np.array(0.5, np.float32)}),
    "cast_roundtrip": lambda: make([helper.make_node("Cast", ["x"], ["i"], to=TensorProto.INT64),
                                    helper.make_node("Cast", ["i"], ["y"], to=TensorProto.FLOAT)],
                                   {"x": ["N", 6]}),
    "shape_gather_reshape": lambda: shape_gather_reshape(),
    "dropout_identity_constant": lambda: make(
        [helper.make_node("Constant", [], ["k"], value=numpy_helper.from_array(_w(4))),
         helper.make_node("Dropout", ["x"], ["d"]), helper.make_node("Identity", ["d"], ["i"]),
         helper.make_node("Mul", ["i", "k"], ["y"])], {"x": ["N", 4]}),
    "two_outputs": lambda: make([helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Neg", ["x"], ["b"])],
                                {"x": ["N", 3]}, outputs=("a", "b")),
    "qdq_per_tensor": lambda: make(
        [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
         helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])],
        {"x": ["N", 8]}, {"s": np.array(0.02, np.float32), "z": np.array(128, np.uint8)}, opset=21),
    "qdq_int4_weight_per_axis": lambda: qdq_int4_conv(),
    "qdq_int8_per_channel": lambda: make(
        [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], axis=1),
         helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], axis=1)],
        {"x": ["N", 3, 4]}, {"s": np.array([0.01, 0.02, 0.05], np.float32), "z": np.array([0, -3, 5], np.int8)},
        opset=21),
    "gather_negative_indices": lambda: make(
        [helper.make_node("Gather", ["x", "i"], ["y"], axis=1)], {"x": ["N", 4, 3]},
        {"i": np.array([[-1, 0], [2, -3]], np.int64)}),
}


def attention(opset):
    """Activation-by-activation MatMul (no weight) and Softmax, whose axis semantics changed at opset 13."""
    nodes = [helper.make_node("MatMul", ["x", "wq"], ["q"], name="q_proj"),
             helper.make_node("Transpose", ["x"], ["xt"], perm=[0, 2, 1]),
             helper.make_node("MatMul", ["q", "xt"], ["s"], name="scores"),
             helper.make_node("Softmax", ["s"], ["p"], axis=1),
             helper.make_node("MatMul", ["p", "x"], ["y"], name="mix")]
    return make(nodes, {"x": ["N", 4, 6]}, {"wq": _w(6, 6)}, opset=opset)


def avgpool(**attrs):
    return make([helper.make_node("AveragePool", ["x"], ["y"], kernel_shape=[3, 3], strides=[2, 2],
                                  pads=[1, 1, 1, 1], **attrs)], {"x": ["N", 2, 8, 7]})


def concat_transpose():
    return make([helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Sigmoid", ["x"], ["s"]),
                 helper.make_node("Concat", ["x", "r", "s"], ["cat"], axis=1),
                 helper.make_node("Transpose", ["cat"], ["y"], perm=[0, 2, 3, 1])], {"x": ["N", 2, 3, 4]})


def elementwise():
    nodes = [helper.make_node("Sigmoid", ["x"], ["a"]), helper.make_node("Tanh", ["x"], ["b"]),
             helper.make_node("LeakyRelu", ["x"], ["c"], alpha=0.2), helper.make_node("Add", ["a", "b"], ["d"]),
             helper.make_node("Sub", ["d", "c"], ["e"]), helper.make_node("Mul", ["e", "k"], ["f"]),
             helper.make_node("Abs", ["f"], ["g"]), helper.make_node("Sqrt", ["g"], ["h"]),
             helper.make_node("Add", ["h", "one"], ["h1"]), helper.make_node("Div", ["f", "h1"], ["i"]),
             helper.make_node("Neg", ["i"], ["j"]), helper.make_node("Exp", ["j"], ["l"]),
             helper.make_node("Pow", ["l", "two"], ["y"])]
    return make(nodes, {"x": ["N", 3, 4]}, {"k": _w(4), "one": np.array(1.0, np.float32),
                                            "two": np.array(2.0, np.float32)})


def gelu_erf():
    """Gelu as exported before opset 20: x * 0.5 * (1 + erf(x / sqrt(2)))."""
    nodes = [helper.make_node("Div", ["x", "r2"], ["a"]), helper.make_node("Erf", ["a"], ["b"]),
             helper.make_node("Add", ["b", "one"], ["c"]), helper.make_node("Mul", ["x", "c"], ["d"]),
             helper.make_node("Mul", ["d", "half"], ["y"])]
    return make(nodes, {"x": ["N", 7]}, {"r2": np.array(2 ** 0.5, np.float32), "one": np.array(1.0, np.float32),
                                         "half": np.array(0.5, np.float32)})


def shape_gather_reshape():
    """The old PyTorch exporter's dynamic flatten: Shape -> Gather -> Unsqueeze -> Concat -> Reshape."""
    nodes = [helper.make_node("Shape", ["x"], ["s"]),
             helper.make_node("Gather", ["s", "zero"], ["n"], axis=0),
             helper.make_node("Unsqueeze", ["n", "ax"], ["n1"]),
             helper.make_node("Concat", ["n1", "minus1"], ["shape"], axis=0),
             helper.make_node("Reshape", ["x", "shape"], ["y"])]
    return make(nodes, {"x": ["N", 2, 3]}, {"zero": np.array(0, np.int64), "ax": np.array([0], np.int64),
                                            "minus1": np.array([-1], np.int64)})


def qdq_int4_conv():
    """Per-axis INT4 weights behind DequantizeLinear, and uint8 activation codes (a fake-quant layer)."""
    w = RNG.integers(-8, 8, (4, 3, 3, 3))
    nodes = [helper.make_node("Relu", ["x"], ["r"]),
             helper.make_node("QuantizeLinear", ["r", "s", "z"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["a"]),
             helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["w"], axis=0),
             helper.make_node("Conv", ["a", "w"], ["y"], pads=[1, 1, 1, 1])]
    inits = [helper.make_tensor("wq", TensorProto.INT4, w.shape, w.reshape(-1).tolist()),
             helper.make_tensor("wz", TensorProto.INT4, [4], [0, 1, -1, 2]),
             numpy_helper.from_array(np.array([0.1, 0.05, 0.2, 0.01], np.float32), "ws"),
             numpy_helper.from_array(np.array(0.01, np.float32), "s"),
             numpy_helper.from_array(np.array(3, np.uint8), "z")]
    graph = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 5, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return checked(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]))


@pytest.mark.parametrize("case", sorted(CASES))
def test_op_matches_onnxruntime(case):
    assert_matches_ort(CASES[case]())


@pytest.mark.parametrize("config", ["w2a2", "w4a4"])
def test_fake_quant_model_runs_and_its_quantized_weights_stay_frozen(tiny_model_path, config):
    from qcompile import api

    result = api.compile(tiny_model_path, config=config, calib=graphs.tiny_inputs(64, 3))
    feeds = lambda batch: {"input": graphs.tiny_inputs(batch, seed=batch)}  # noqa: E731
    gm = assert_matches_ort(result.model, feeds=feeds)
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in result.model.graph.node}
    # the first and last layers stay float (plan); the quantized ones' weights are DequantizeLinear(codes)
    assert list(weighted_layers(gm)) == ["conv1", "fc2"]


def test_softmax_semantics_differ_by_opset():
    """The two attention graphs differ only in opset; the outputs must differ too (else the test proves nothing)."""
    x = torch.from_numpy(_feeds(attention(11), 2)["x"])
    with torch.no_grad():
        assert not torch.allclose(to_torch(attention(11))(x), to_torch(attention(13))(x), atol=1e-3)


# --------------------------------------------------------------------------------------------- weighted layers
def _weighted_nodes(proto):
    inits = {i.name for i in proto.graph.initializer}
    return [n.name for n in proto.graph.node if n.op_type in ("Conv", "Gemm", "MatMul") and n.input[1] in inits]


@pytest.mark.parametrize("proto", [onnx.load(MODELS / "fmnist_cnn.onnx"), onnx.load(MODELS / "fmnist_mlp.onnx"),
                                   graphs.tiny_cnn(), attention(13), CASES["matmul_3d_input"]()],
                         ids=["cnn", "mlp", "tiny", "attention", "matmul3d"])
def test_weighted_layers_are_the_constant_weight_nodes_and_get_gradients(proto):
    gm = to_torch(proto)
    layers = weighted_layers(gm)
    assert list(layers) == _weighted_nodes(proto) and layers
    types = {n.name: n.op_type for n in proto.graph.node}
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    nodes = {n.name: n for n in proto.graph.node}
    for name, layer in layers.items():
        assert isinstance(layer, WeightedLayer) and layer.onnx_name == name and layer.op_type == types[name]
        assert isinstance(layer.weight, torch.nn.Parameter) and layer.weight.dtype == torch.float32
        np.testing.assert_array_equal(layer.weight.detach().numpy(), inits[nodes[name].input[1]])  # ONNX layout
        if len(nodes[name].input) > 2:
            np.testing.assert_array_equal(layer.bias.detach().numpy(), inits[nodes[name].input[2]])
        else:
            assert layer.bias is None
    gm(*[torch.from_numpy(v) for v in _feeds(proto, 3).values()]).square().sum().backward()
    for layer in layers.values():
        assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0


def test_batchnorm_scale_and_bias_are_parameters_other_constants_buffers():
    gm = to_torch(onnx.load(MODELS / "fmnist_cnn.onnx"))
    params = dict(gm.named_parameters())
    bn = [k for k in params if "BatchNormalization" in k]
    assert len(bn) == 2 * 5 and all(k.endswith((".weight", ".bias")) for k in bn)
    assert len(params) == len(bn) + 4 + 2 * 2    # 4 convs (no bias) and 2 gemms (weight and bias)
    buffers = dict(gm.named_buffers())
    assert sum(k.endswith(("running_mean", "running_var")) for k in buffers) == 10
    gm.train()                                   # inference BN even in train mode: a deterministic function
    x = torch.from_numpy(_fmnist_feeds(4)["input"])
    assert torch.equal(gm(x), gm(x))             # no running-stat updates
    np.testing.assert_allclose(gm(x[:1]).detach().numpy(), gm(x).detach().numpy()[:1], rtol=1e-5, atol=1e-6)


def test_functional_uses_the_given_weight():
    gm = to_torch(onnx.load(MODELS / "fmnist_cnn.onnx"))
    layers = weighted_layers(gm)
    x = torch.rand(2, 1, 28, 28)
    conv = layers["/0/Conv"]
    y = conv.functional(x, torch.zeros_like(conv.weight), torch.arange(32.0))
    assert torch.equal(y, torch.arange(32.0).reshape(1, 32, 1, 1).expand(2, 32, 28, 28))
    torch.testing.assert_close(conv.functional(x, 2 * conv.weight, None), 2 * conv.functional(x, conv.weight, None))
    assert torch.equal(conv(x), conv.functional(x, conv.weight, conv.bias))
    fc = layers["/19/Gemm"]
    h = torch.rand(3, fc.weight.shape[1])
    assert torch.equal(fc.functional(h, torch.zeros_like(fc.weight), fc.bias), fc.bias.expand(3, -1))

    class ZeroWeight(torch.nn.Module):  # what the quantization wrapper does: substitute the weight
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner.functional(x, torch.zeros_like(self.inner.weight), self.inner.bias)

    setattr(gm, next(k for k, m in gm.named_children() if m is fc), ZeroWeight(fc))
    with torch.no_grad():
        out = gm(x)
    assert torch.equal(out, fc.bias.detach().expand(2, -1))
    assert weighted_layers(gm)["/19/Gemm"] is fc  # still found inside the wrapper


def test_gemm_functional_honours_alpha_beta_trans():
    gm = to_torch(CASES["gemm_transA_transB_scalar_bias"]())
    (layer,) = weighted_layers(gm).values()
    x, w, b = torch.rand(6, 2), torch.rand(5, 6), torch.rand(())
    torch.testing.assert_close(layer.functional(x, w, b), 1.5 * (x.t() @ w.t()) - b)


# --------------------------------------------------------------------------------------------- names and errors
def test_module_names_are_sanitized_unique_and_keep_the_onnx_name():
    names = ["a/b.c:0@1", "a_b_c_0_1", "3x", "class", "forward", "", "/w/MatMul"]
    nodes, x = [], "x"
    for i, name in enumerate(names):
        nodes.append(helper.make_node("MatMul", [x, "w"], [f"h{i}"], name=name))
        x = f"h{i}"
    nodes.append(helper.make_node("Identity", [x], ["y"]))
    gm = to_torch(make(nodes, {"x": ["N", 3]}, {"w": _w(3, 3)}))
    layers = weighted_layers(gm)
    assert [m.onnx_name for m in layers.values()] == [n or "MatMul_5" for n in names]  # unnamed: op and index
    children = [k for k, m in gm.named_children() if isinstance(m, WeightedLayer)]
    assert len(set(children)) == len(names) and all(k.isidentifier() for k in children)
    assert len({id(m.weight) for m in layers.values()}) == 1  # one initializer: one tied Parameter
    assert len(list(gm.parameters())) == 1
    gm(torch.rand(2, 3)).sum().backward()


def test_unsupported_op_names_node_and_op_on_one_line():
    model = make([helper.make_node("Relu", ["x"], ["r"], name="ok"),
                  helper.make_node("Einsum", ["r", "r"], ["y"], name="Foo_3", equation="ij,ij->ij")],
                 {"x": ["N", 3]})
    with pytest.raises(UnsupportedOpError) as err:
        to_torch(model)
    msg = str(err.value)
    assert "'Foo_3'" in msg and "Einsum" in msg and "\n" not in msg


@pytest.mark.parametrize("node,inits,what", [
    (helper.make_node("MaxPool", ["x"], ["y"], name="mp", kernel_shape=[2, 2], storage_order=1), {},
     "storage_order"),
    (helper.make_node("Pad", ["x", "p"], ["y"], name="pd", mode="reflect"),
     {"p": np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64)}, "mode"),
    (helper.make_node("AveragePool", ["x"], ["y"], name="ap", kernel_shape=[2, 2], dilations=[2, 2]), {},
     "dilations"),
])
def test_unimplemented_attribute_is_refused_by_name(node, inits, what):
    with pytest.raises(UnsupportedOpError) as err:
        to_torch(make([node], {"x": ["N", 2, 6, 6]}, inits, opset=19))
    msg = str(err.value)
    assert f"'{node.name}'" in msg and node.op_type in msg and what in msg and "\n" not in msg


def test_conv_with_unsupported_rank_is_refused():
    model = make([helper.make_node("Conv", ["x", "w"], ["y"], name="c4d")], {"x": ["N", 1, 3, 3, 3, 3]},
                 {"w": _w(2, 1, 1, 1, 1, 1)})
    with pytest.raises(UnsupportedOpError, match="node 'c4d' \\(op Conv\\)"):
        to_torch(model)
