import numpy as np
import onnx_ir as ir
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from graphs import tiny_inputs
from qcompile import api
from qcompile.passes.fuse import DOMAIN, FuseBitKernels, next_codes, thresholds


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 4), st.floats(1e-4, 1.0), st.floats(-3.0, 3.0), st.floats(0.05, 8.0), st.booleans(),
       st.integers(0, 2**31 - 1))
def test_thresholds_reproduce_the_float_chain_for_every_accumulator(bits, mult, bias, clip, relu, seed):
    """#{j: acc >= T_j} equals the fake-quant graph's code for every acc in range, ties included."""
    rng = np.random.default_rng(seed)
    n = 4
    m = (mult * rng.uniform(0.5, 2.0, n)).astype(np.float32)
    b = (bias * rng.uniform(-1, 1, n)).astype(np.float32)
    scale = float(np.float32(clip / (2**bits - 1)))
    bound = 400
    t = thresholds(m, b, relu, clip, scale, bits, bound)
    acc = np.arange(-bound, bound + 1)
    want = next_codes(acc[None, :], m[:, None], b[:, None], relu, clip, scale, 2**bits - 1)
    got = (acc[None, :, None] >= t[:, None, :]).sum(-1)
    np.testing.assert_array_equal(got, want)


def test_negative_scale_is_refused():
    with pytest.raises(ValueError, match="monotone"):
        thresholds(np.array([-1.0], np.float32), np.zeros(1, np.float32), True, 1.0, 1 / 3, 2, 10)


def test_fuse_builds_bit_nodes_and_is_idempotent(tiny_model_path):
    result = api.compile(tiny_model_path, config="w2a2", calib=tiny_inputs(32, 3))
    model = ir.from_proto(result.model)
    assert FuseBitKernels()(model, result.ctx)
    nodes = [n for n in model.graph if n.domain == DOMAIN]
    assert sorted(n.op_type for n in nodes) == ["BitConv", "BitConv", "BitGemm", "MaxPoolCodes"]
    bit = [n for n in nodes if n.op_type != "MaxPoolCodes"]
    epilogues = {n.name: n.attributes.get_string("epilogue") for n in bit}
    # conv2's MaxPool now runs on its codes as an ai.qcompile kernel step
    pool = next(n for n in nodes if n.op_type == "MaxPoolCodes")
    assert pool.name == "pool2_codes" and pool.inputs[0].producer().name == "conv2"
    assert list(pool.attributes.get_ints("kernel_shape")) == [2, 2] and list(pool.attributes.get_ints("strides")) == [2, 2]
    assert "MaxPool" not in [n.op_type for n in model.graph]
    assert epilogues == {"conv2": "threshold", "conv3": "threshold", "fc1": "float"}
    ops = [n.op_type for n in model.graph]
    assert "QuantizeLinear" in ops  # the first quantized layer's input still comes from float conv1
    assert ops.count("QuantizeLinear") == 1 and "Mul" not in ops  # the rest run on codes, no float between
    assert "fused: BitConv W2A2, threshold epilogue" in result.ctx.fuse_notes["conv2"]
    assert not FuseBitKernels()(model, result.ctx)


def test_fuse_only_selected_layers(tiny_model_path):
    result = api.compile(tiny_model_path, config="w1a2", calib=tiny_inputs(32, 3))
    model = ir.from_proto(result.model)
    FuseBitKernels({"conv3"})(model, result.ctx)
    bit = [n.name for n in model.graph if n.domain == DOMAIN]
    assert bit == ["conv3"]
    assert any(n.name == "conv2_int" for n in model.graph)  # left as fake-quant for onnxruntime
