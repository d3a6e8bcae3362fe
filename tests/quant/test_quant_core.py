"""quantize_k, QuantizedTensor, shared checks, and activation codes against onnxruntime."""

import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qcompile.errors import QuantizationError
from qcompile.quant import (
    QuantizedTensor,
    check_finite,
    dorefa_activation_codes,
    dorefa_activations,
    get,
    names,
    quantize_k,
    quantize_k_codes,
)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(0, 1), min_size=1, max_size=20), st.integers(1, 8))
def test_quantize_k_error_grid_and_monotone(r, k):
    r = np.sort(np.asarray(r))
    n = 2**k - 1
    q = quantize_k(r, k)
    assert np.abs(q - r).max() <= 1 / (2 * n) + 1e-12
    np.testing.assert_array_equal(q * n, quantize_k_codes(r, k))  # on the grid {0, 1/n, ..., 1}
    assert np.all(np.diff(q) >= 0)


def test_quantize_k_ties_round_half_to_even():
    # exact ties n*r = m + 1/2: half-even picks the even code; TF's half-away would pick m + 1 every time
    for k in (1, 2, 3, 4):
        n = 2**k - 1
        r = (np.arange(n) + 0.5) / n
        exact = n * r == np.arange(n) + 0.5
        codes = quantize_k_codes(r[exact], k).astype(int)
        m = np.arange(n)[exact]
        np.testing.assert_array_equal(codes, np.where(m % 2 == 0, m, m + 1))
    assert quantize_k_codes(0.5, 1) == 0 and quantize_k_codes(0.5, 2) == 2


def test_quantize_k_codes_saturate_outside_unit_interval():
    np.testing.assert_array_equal(quantize_k_codes([-0.3, 1.7], 2), [0, 3])


def test_quantized_tensor_accessors():
    qt = QuantizedTensor(np.array([[0, 3], [1, 2]], np.uint8), 2, np.array([[0.5], [2.0]], np.float32),
                         np.full((2, 1), 1.5), 0)
    np.testing.assert_array_equal(qt.dequantize(), [[-0.75, 0.75], [-1.0, 1.0]])
    np.testing.assert_array_equal(qt.zero2, [[3], [3]])
    iv = qt.int_values()
    assert iv.dtype == np.int8
    np.testing.assert_array_equal(iv, [[-3, 3], [-1, 1]])
    np.testing.assert_array_equal(qt.scale / 2 * iv, qt.dequantize())
    assert qt.levels_used() == 4


def test_int_values_widen_only_when_the_grid_needs_it():
    w = np.linspace(-1, 1, 300).astype(np.float32)
    assert get("balanced").weights(w, 7, None, "").int_values().dtype == np.int8
    assert get("balanced").weights(w, 8, None, "").int_values().dtype == np.int16
    assert get("uniform").weights(w, 7, None, "").int_values().dtype == np.int16


def test_quantized_tensor_rejects_wrong_dtypes_and_range():
    with pytest.raises(TypeError):
        QuantizedTensor(np.zeros(3, np.int32), 2, np.float32(1.0).reshape(()), np.zeros(()), None)
    with pytest.raises(ValueError):
        QuantizedTensor(np.full(3, 4, np.uint8), 2, np.ones((), np.float32), np.zeros(()), None)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_check_finite_names_the_tensor(bad):
    with pytest.raises(QuantizationError, match=r"conv7\.weight: contains NaN/Inf"):
        check_finite(np.array([1.0, bad]), "conv7.weight")
    check_finite(np.array([1.0, 2.0]), "ok")


@pytest.mark.parametrize("name", names())
@pytest.mark.parametrize("bad_bits", [0, 9, -1, 2.0, True])
def test_bits_outside_range_raise(name, bad_bits):
    with pytest.raises(QuantizationError, match="fc1"):
        get(name).weights(np.array([1.0, -2.0, 3.0]), bad_bits, None, "fc1")


def test_package_imports_without_torch():
    code = "import sys, qcompile.quant; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def _ort_qdq(x, scale, clip):
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Clip", ["x", "lo", "hi"], ["c"]),
             helper.make_node("QuantizeLinear", ["c", "s", "z"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])]
    inits = [helper.make_tensor("lo", TensorProto.FLOAT, [], [0.0]),
             helper.make_tensor("hi", TensorProto.FLOAT, [], [clip]),
             helper.make_tensor("s", TensorProto.FLOAT, [], [scale]),
             helper.make_tensor("z", TensorProto.UINT8, [], [0])]
    graph = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None])],
                              [helper.make_tensor_value_info("q", TensorProto.UINT8, [None]),
                               helper.make_tensor_value_info("y", TensorProto.FLOAT, [None])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})


@pytest.mark.parametrize("bits,clip", [(1, 1.0), (2, 1.0), (3, 6.0), (4, 1.0), (8, 2.5)])
def test_activation_codes_match_onnxruntime_bit_exactly(bits, clip):
    n = 2**bits - 1
    s = np.float32(clip / n)
    ties = ((np.arange(n) + 0.5) * np.float64(s)).astype(np.float32)
    near = [(ties.view(np.int32) + d).view(np.float32) for d in range(-64, 65)]  # ulps around every tie
    rng = np.random.default_rng(bits)
    x = np.concatenate([*near, rng.uniform(-0.5, clip * 1.5, 5000).astype(np.float32), [0, clip, -1, 9e9]])
    x = x.astype(np.float32)
    q_ort, y_ort = _ort_qdq(x, s, clip)
    np.testing.assert_array_equal(dorefa_activation_codes(x, bits, clip), q_ort)
    np.testing.assert_array_equal(dorefa_activations(x, bits, clip), y_ort)
    # the paper's rint(n*x/c) is the same map except on float32 near-ties
    paper = quantize_k_codes(np.clip(x.astype(np.float64), 0, clip) / clip, bits)
    assert np.abs(paper.astype(int) - q_ort).max() <= 1


def test_activation_rejects_bad_clip_and_nan():
    with pytest.raises(QuantizationError, match="clip"):
        dorefa_activation_codes(np.zeros(3), 2, clip=0.0)
    with pytest.raises(QuantizationError, match="relu3"):
        dorefa_activations(np.array([np.nan]), 2, name="relu3")
