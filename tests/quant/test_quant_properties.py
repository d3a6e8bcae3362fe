"""Properties every registered weight quantizer must have, on random, heavy-tailed and degenerate inputs."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from quant_cases import AFFINE, SYMMETRIC, combos, is_constant, rows, weights

from qcompile.errors import ConstantTensorError, QuantizationError
from qcompile.quant import QuantizedTensor, get, names


def check_invariants(qt: QuantizedTensor, w: np.ndarray, name: str, bits: int, axis) -> None:
    n = 2**bits - 1
    assert isinstance(qt, QuantizedTensor) and qt.bits == bits and qt.axis == axis
    assert qt.codes.dtype == np.uint8 and qt.codes.shape == w.shape and qt.codes.max() <= n
    assert qt.scale.shape == (() if axis is None else (w.shape[0],) + (1,) * (w.ndim - 1))
    assert np.all(qt.scale >= 0) and np.all(np.isfinite(qt.scale))
    dq = qt.dequantize()
    assert dq.dtype == np.float32 and np.all(np.isfinite(dq))
    # monotone: w_i <= w_j => code_i <= code_j within each tensor / channel (ties share a code)
    for x, c in zip(rows(w, axis), rows(qt.codes, axis)):
        o = np.argsort(x, kind="stable")
        assert np.all(np.diff(c[o].astype(int)) >= 0)
    if name in SYMMETRIC:  # value = scale*(q - n/2) on {-1, -1+2/n, ..., 1} * scale*n/2
        assert np.all(qt.zero2 == n)
        iv = qt.int_values().astype(int)
        assert np.all(iv % 2 == 1) and np.abs(iv).max() <= n
        np.testing.assert_array_equal(dq, qt.scale * (iv / 2).astype(np.float32))
    elif name in AFFINE:  # value = scale*(q - zero), 2*zero an integer in [-n, 3n]: uniform levels
        z2 = qt.zero2
        assert np.all(qt.zero * 2 == z2) and z2.min() >= -n and z2.max() <= 3 * n
        iv = qt.int_values().astype(int)
        np.testing.assert_array_equal(dq, qt.scale * (iv / 2).astype(np.float32))
    else:  # integer zero point in range, so 0.0 is exactly representable
        assert np.all(qt.zero == np.rint(qt.zero)) and qt.zero.min() >= 0 and qt.zero.max() <= n
    if axis == 0:  # constant channels dequantize to the constant exactly
        for x, d in zip(rows(w, axis), rows(dq, axis)):
            if x.min() == x.max():
                np.testing.assert_array_equal(d, x)


@settings(max_examples=40, deadline=None)
@given(w=weights(), case=st.sampled_from(combos()), axis=st.sampled_from([None, 0]))
def test_invariants_on_drawn_tensors(w, case, axis):
    name, bits = case
    spec = get(name)
    if axis is None and is_constant(w):
        with pytest.raises(ConstantTensorError, match=rf"layer\.w: all {w.size} weights equal"):
            spec.weights(w, bits, axis, "layer.w")
        return
    check_invariants(spec.weights(w, bits, axis, "layer.w"), w, name, bits, axis)


@pytest.mark.parametrize("name,bits", combos())
@pytest.mark.parametrize("axis", [None, 0])
def test_invariants_on_families(family, name, bits, axis):
    _, w = family
    check_invariants(get(name).weights(w, bits, axis, "conv"), w, name, bits, axis)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("axis", [None, 0])
def test_uniform_min_max_error_is_half_a_step(bits, axis):
    w = np.random.default_rng(bits).laplace(size=(4, 50)).astype(np.float32)
    qt = get("uniform").weights(w, bits, axis, "")
    assert np.all(np.abs(qt.dequantize() - w) <= qt.scale * (0.5 + 1e-5))


@pytest.mark.parametrize("name", names())
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("axis", [None, 0])
def test_nonfinite_raise_naming_the_layer(name, bad, axis):
    w = np.ones((3, 4), np.float32)
    w[1, 2] = bad
    with pytest.raises(QuantizationError, match=r"^blocks\.3\.conv\.weight: contains NaN/Inf"):
        get(name).weights(w, 1, axis, "blocks.3.conv.weight")


@pytest.mark.parametrize("name", names())
@pytest.mark.parametrize("value", [0.0, 0.25, -3.0])
def test_constant_tensor_raises_but_constant_channels_are_exact(name, value):
    w = np.full((3, 5), value, np.float32)
    with pytest.raises(ConstantTensorError, match=r"fc: all 15 weights equal .*keep this layer in float"):
        get(name).weights(w, 1, None, "fc")
    qt = get(name).weights(w, 1, 0, "fc")  # every channel constant: still fine per channel
    np.testing.assert_array_equal(qt.dequantize(), w)
    assert qt.levels_used() == 1


@pytest.mark.parametrize("name,bits", combos())
def test_all_zero_channel_gets_scale_zero(name, bits):
    w = np.random.default_rng(1).standard_normal((3, 8)).astype(np.float32)
    w[1] = 0.0
    qt = get(name).weights(w, bits, 0, "")
    assert qt.scale[1, 0] == 0 and np.all(qt.dequantize()[1] == 0)


@pytest.mark.parametrize("name,bits", combos())
def test_tiny_tensors(name, bits):
    spec = get(name)
    with pytest.raises(ConstantTensorError):
        spec.weights(np.array([0.7], np.float32), bits, None, "one")
    w = np.array([0.7, -0.2, 3.0], np.float32)
    np.testing.assert_array_equal(spec.weights(w, bits, 0, "").dequantize(), w)  # one weight per channel
    for m in (2, 3):
        check_invariants(spec.weights(w[:m], bits, None, ""), w[:m], name, bits, None)


def test_huge_scale_overflow_is_an_error_not_inf():
    with pytest.raises(QuantizationError, match="float32 range"):
        get("balanced").weights(np.array([3e38, -3e38, 1.0]), 1, None, "big")
    with pytest.raises(QuantizationError, match="float32 range"):
        get("uniform").weights(np.array([1e300, 0.0]), 2, None, "big")


@pytest.mark.parametrize("name", names())
@pytest.mark.parametrize("axis", [1, -1, "0"])
def test_bad_axis_raises(name, axis):
    with pytest.raises(QuantizationError, match="axis"):
        get(name).weights(np.arange(6.0).reshape(2, 3), 1, axis, "")


@pytest.mark.parametrize("name", names())
def test_empty_and_non_numeric_raise(name):
    with pytest.raises(QuantizationError, match="empty"):
        get(name).weights(np.zeros((0, 3)), 1, None, "")
    with pytest.raises(QuantizationError, match="dtype"):
        get(name).weights(np.array(["a", "b"]), 1, None, "")
