"""The torch twins equal the numpy quantizers, and their straight-through gradients behave."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from quant_cases import combos, is_constant, weights

from qcompile.errors import ConstantTensorError, QuantizationError
from qcompile.quant import dorefa_activations, get, names

torch = pytest.importorskip("torch")
T = pytest.importorskip("qcompile.quant.torch_ops")

# Rules whose scale is a float64 sum (lsq, mean|W|): torch and numpy add in different orders, so the
# float32 scale may differ by one ulp in principle. Codes are always compared exactly.
SUMMED = {"balanced", "balanced-mean", "xnor", "rnn-balanced"}


def twin(name, w, bits, axis):
    """(numpy QuantizedTensor, torch result) for registry quantizer `name`."""
    spec = get(name)
    codes_fn = getattr(T, spec.torch_weights.replace("_weights_t", "_codes_t"))
    wt = torch.tensor(w, requires_grad=True)
    return spec.weights(w, bits, axis, "w"), codes_fn(wt, bits, axis=axis, **dict(spec.options)), wt


def assert_same(qt, tq, exact_scale=True):
    bq = T.as_quantized(tq, qt.bits, qt.axis)
    np.testing.assert_array_equal(bq.codes, qt.codes)
    np.testing.assert_array_equal(bq.zero, qt.zero)
    if exact_scale:
        np.testing.assert_array_equal(bq.scale, qt.scale)
        np.testing.assert_array_equal(tq.values.detach().numpy(), qt.dequantize())
    else:
        np.testing.assert_array_max_ulp(bq.scale, qt.scale, maxulp=1)
        np.testing.assert_array_max_ulp(tq.values.detach().numpy(), qt.dequantize(), maxulp=1)


@pytest.mark.parametrize("name,bits", combos())
@pytest.mark.parametrize("axis", [None, 0])
def test_twins_equal_on_families(family, name, bits, axis):
    _, w = family
    qt, tq, _ = twin(name, w, bits, axis)
    assert_same(qt, tq)  # fixed inputs: exact, scales included


@settings(max_examples=60, deadline=None)
@given(w=weights(), case=st.sampled_from(combos()), axis=st.sampled_from([None, 0]))
def test_twins_equal_on_drawn_tensors(w, case, axis):
    name, bits = case
    if axis is None and is_constant(w):
        with pytest.raises(ConstantTensorError):
            get(name).torch_fn()(torch.tensor(w), bits, axis=axis)
        return
    qt, tq, _ = twin(name, w, bits, axis)
    assert_same(qt, tq, exact_scale=name not in SUMMED and not (name == "dorefa" and bits == 1))


@pytest.mark.parametrize("fn,kw", [("balanced", {"scale": "max"}), ("balanced", {"method": "mean", "scale": "max"}),
                                   ("dorefa", {"scale": "lsq"}), ("dorefa", {"scale": "unit"})])
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("axis", [None, 0])
def test_twins_equal_for_non_default_scale_rules(family, fn, kw, bits, axis):
    from qcompile import quant

    _, w = family
    qt = getattr(quant, f"{fn}_weights")(w, bits, axis=axis, **kw)
    assert_same(qt, getattr(T, f"{fn}_codes_t")(torch.tensor(w), bits, axis=axis, **kw))


def test_weights_t_returns_the_values():
    w = np.random.default_rng(0).standard_normal((4, 9)).astype(np.float32)
    for name in names():
        out = get(name).torch_fn()(torch.tensor(w), 1, axis=0)
        np.testing.assert_array_equal(out.numpy(), get(name).weights(w, 1, 0, "").dequantize())


def test_round_ste_passes_the_upstream_gradient():
    x = torch.tensor([0.2, 1.5, 2.5, -0.7], requires_grad=True)
    y = T.round_ste(x)
    np.testing.assert_array_equal(y.detach().numpy(), [0.0, 2.0, 2.0, -1.0])  # half to even
    g = torch.tensor([1.0, -2.0, 3.5, 0.25])
    y.backward(g)
    assert torch.equal(x.grad, g)


@pytest.mark.parametrize("name,bits", combos())
@pytest.mark.parametrize("axis", [None, 0])
def test_every_twin_has_finite_nonzero_gradients(name, bits, axis):
    w = torch.randn(4, 3, 3, generator=torch.Generator().manual_seed(bits), requires_grad=True)
    up = torch.randn(4, 3, 3, generator=torch.Generator().manual_seed(9))
    (get(name).torch_fn()(w, bits, axis=axis) * up).sum().backward()
    assert torch.isfinite(w.grad).all() and (w.grad != 0).any()
    if name in ("balanced", "balanced-mean", "xnor") or (name in ("dorefa", "rnn-balanced") and bits == 1):
        assert torch.equal(w.grad, up)  # whole-quantizer straight-through, statistics detached


def test_dorefa_gradient_flows_through_tanh_and_the_max():
    w = torch.tensor([[0.3, -1.2, 0.8, 2.0]], dtype=torch.float64, requires_grad=True)
    T.dorefa_weights_t(w, 2, scale="unit").sum().backward()
    x = w.detach().clone().requires_grad_(True)
    t = torch.tanh(x)
    (2 * (t / (2 * t.abs().max()) + 0.5)).sum().backward()  # d/dW of 2u (STE through quantize_k)
    torch.testing.assert_close(w.grad, x.grad)
    assert w.grad[0, 3] != x.grad[0, 0]  # the arg-max element also gets the gradient of the max


def test_uniform_gradient_is_identity_inside_and_zero_where_clipped():
    w = torch.randn(1000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    w[0] = 40.0
    w.requires_grad_(True)
    T.uniform_weights_t(w, 4, percentile=0.1).sum().backward()
    assert w.grad[0] == 0
    torch.testing.assert_close(w.grad[1:500], torch.ones(499, dtype=torch.float64))


def test_twins_raise_the_same_errors():
    bad = torch.tensor([1.0, float("nan")])
    for name in names():
        with pytest.raises(QuantizationError, match=r"^head\.w: contains NaN/Inf"):
            get(name).torch_fn()(bad, 1, axis=None, name="head.w")
        with pytest.raises(ConstantTensorError, match="head.w: all 3 weights equal"):
            get(name).torch_fn()(torch.full((3,), 0.5), 1, axis=None, name="head.w")
    with pytest.raises(QuantizationError, match="bits"):
        T.dorefa_weights_t(torch.randn(4), 9)


# ---- activations and gradients ------------------------------------------------------------------------------


@pytest.mark.parametrize("bits,clip", [(1, 1.0), (2, 1.0), (4, 6.0)])
def test_activation_twin_equals_numpy_and_clips_the_gradient(bits, clip):
    x = torch.linspace(-1, clip + 1, 4001, requires_grad=True)
    y = T.dorefa_activations_t(x, bits, clip)
    np.testing.assert_array_equal(y.detach().numpy(), dorefa_activations(x.detach().numpy(), bits, clip))
    y.sum().backward()
    inside = (x > 0) & (x < clip)
    assert torch.all(x.grad[~inside & (x.detach().abs() > 1e-6) & ((x - clip).abs() > 1e-6)] == 0)
    torch.testing.assert_close(x.grad[inside], torch.ones(int(inside.sum())))


def _fg(dr, bits, seed):
    x = torch.zeros_like(dr, requires_grad=True)
    T.dorefa_gradients(x, bits, torch.Generator().manual_seed(seed)).backward(dr)
    return x.grad


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_gradient_quantizer_is_unbiased(bits):
    dr = torch.randn(1, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    reps = 20_000  # the same sample repeated: one scale each, independent dither
    g = _fg(dr.expand(reps, 64).contiguous(), bits, 0)
    s, n = dr.abs().max(), 2**bits - 1
    se = (2 * s / n) * 0.5 / reps**0.5  # std of one draw <= half a step
    assert ((g.mean(0) - dr[0]).abs() <= 5 * se).all()
    assert (g.var(0) > 0).any()  # and it is stochastic


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 6])
def test_gradient_quantizer_grid_has_2k_levels_per_sample(bits):
    dr = torch.randn(3, 8, 5, generator=torch.Generator().manual_seed(2))
    dr[1] *= 1000  # per-sample scales
    g = _fg(dr, bits, 3)
    n = 2**bits - 1
    s = dr.abs().amax(dim=(1, 2), keepdim=True)
    k = (g / (2 * s) + 0.5) * n
    torch.testing.assert_close(k, k.round(), atol=1e-4, rtol=0)
    assert k.round().min() >= 0 and k.round().max() <= n
    for i in range(3):
        assert len(torch.unique(k[i].round())) <= 2**bits
    big = torch.linspace(-3, 3, 4001)[None]  # dense: every one of the 2**k levels is hit
    assert len(torch.unique(_fg(big, bits, 5))) == 2**bits


def test_gradient_quantizer_forward_identity_zero_samples_and_seeding():
    x = torch.randn(2, 5, requires_grad=True)
    y = T.dorefa_gradients(x, 2)
    assert torch.equal(y, x)
    # a fixed input, wide enough that two seeds cannot round all 64 values alike (5 random values could)
    dr = torch.randn(2, 64, generator=torch.Generator().manual_seed(11))
    dr[0] = 0
    g1, g2 = _fg(dr, 2, 7), _fg(dr, 2, 7)
    assert torch.equal(g1, g2) and torch.all(g1[0] == 0) and torch.isfinite(g1).all()
    assert not torch.equal(g1, _fg(dr, 2, 8))
    with pytest.raises(QuantizationError):
        T.dorefa_gradients(x, 0)


def test_rnn_balanced_codes_are_balanced_and_pass_the_gradient_through_the_clip():
    """The RNN paper's 2-bit codes put about a quarter of Gaussian weights on each level (papers.md §3.2), and
    its clip has an identity gradient (the released code's override)."""
    w = np.random.default_rng(0).normal(0, 0.3, (64, 512)).astype(np.float32)
    qt = get("rnn-balanced").weights(w, 2, None, "w")
    share = np.bincount(qt.codes.ravel(), minlength=4) / w.size
    assert np.all(np.abs(share - 0.25) < 0.03), share
    wt = torch.tensor([[0.01, 0.02, 3.0, -3.0]], dtype=torch.float64, requires_grad=True)
    T.dorefa_weights_t(wt, 2, scale="unit", spread="mean2.5").sum().backward()
    assert torch.all(wt.grad[0, 2:] != 0)   # +-3 are clipped, yet get a gradient
