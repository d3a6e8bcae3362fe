"""Each quantizer against its paper formula: balanced bins and scales, DoReFa, uniform, XNOR."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from qcompile.errors import ConfigError, QuantizationError
from qcompile.quant import balanced_weights, dorefa_weights, quantize_k, uniform_weights, xnor_weights

# ---- balanced (papers.md §2.2) ---------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(hnp.arrays(np.float32, st.integers(1, 200), elements=st.floats(-1e3, 1e3, width=32), unique=True),
       st.integers(1, 4))
def test_exact_bins_hold_equal_counts_for_distinct_values(w, bits):
    counts = np.bincount(balanced_weights(w, bits).codes, minlength=2**bits) if w.size > 1 else [0, 1]
    assert max(counts) - min(counts) <= 1


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_exact_bins_per_channel_and_ties_share_a_bin(bits):
    rng = np.random.default_rng(bits)
    w = rng.standard_normal((3, 64)).astype(np.float32)
    codes = balanced_weights(w, bits, axis=0).codes
    for c in codes:
        assert np.all(np.bincount(c, minlength=2**bits) == 64 // 2**bits)
    ties = np.repeat(np.arange(5.0), [3, 10, 1, 1, 1])  # the 10 copies of 1.0 straddle two quartiles
    codes = balanced_weights(ties, 2).codes
    assert len(set(codes[3:13])) == 1
    assert codes[3] == (3 + 12) * 4 // (2 * 16)  # the bin of the run's mid rank


def _reference_bq(w, bits):
    """Literal Alg. 2 (T = np.median, W < T left) then Alg. 1 with rtz; also returns the leaf index."""
    leaf, w_e = np.zeros(w.size, int), np.zeros(w.size)

    def he(idx, level, j):
        if level == 0:
            s = w[idx]
            leaf[idx] = j
            w_e[idx] = (j + (s - s.min()) / (s.max() - s.min())) / 2**bits
            return
        t = np.median(w[idx])
        he(idx[w[idx] < t], level - 1, 2 * j)
        he(idx[w[idx] >= t], level - 1, 2 * j + 1)

    he(np.arange(w.size), bits, 0)
    x = 2**bits * w_e - 0.5
    rtz = np.sign(x) * np.ceil(np.abs(x) - 0.5)
    return leaf, rtz.astype(int)


@pytest.mark.parametrize("bits", [1, 2, 3])
def test_exact_bins_equal_recursive_median_split(bits):
    w = np.random.default_rng(7).standard_normal(16 * 2**bits).astype(np.float32)
    leaf, alg1 = _reference_bq(w.astype(np.float64), bits)
    codes = balanced_weights(w, bits).codes
    np.testing.assert_array_equal(codes, leaf)
    # Alg. 1's rtz gives the leaf index everywhere but at each leaf's minimum, where the tie j - 1/2 -> j - 1
    order = np.argsort(w)
    leaf_min = np.zeros(w.size, bool)
    leaf_min[order[:: 16]] = True
    np.testing.assert_array_equal(alg1[~leaf_min], leaf[~leaf_min])
    np.testing.assert_array_equal(alg1[leaf_min], np.maximum(leaf[leaf_min] - 1, 0))


# Recursive-mean occupancy (bin count / (N / 2**k)) measured on N = 2**18 Gaussian draws:
#   k=2: 0.849..1.153   k=3: 0.684..1.185   k=4: 0.538..1.189    (Laplace k=4: 0.394..1.413)
# k=2 matches theory: P(0 < X < E|X| = 0.798) = 0.2873 -> 1.149, P(X > 0.798) = 0.2125 -> 0.850.
@pytest.mark.parametrize("bits,lo,hi", [(1, 0.98, 1.02), (2, 0.82, 1.18), (3, 0.65, 1.22), (4, 0.50, 1.23)])
def test_mean_split_occupancy_on_gaussian(bits, lo, hi):
    n = 1 << 16
    w = np.random.default_rng(11).standard_normal(n).astype(np.float32)
    occ = np.bincount(balanced_weights(w, bits, method="mean").codes, minlength=2**bits) * 2**bits / n
    assert lo <= occ.min() and occ.max() <= hi
    if bits >= 2:  # the approximation is measurably unbalanced; the exact method is not
        assert occ.min() < 0.9
        exact = np.bincount(balanced_weights(w, bits).codes, minlength=2**bits) * 2**bits / n
        assert np.all(exact == 1)


def test_mean_split_one_bit_is_the_mean_threshold():
    w = np.random.default_rng(3).laplace(size=101).astype(np.float32)
    np.testing.assert_array_equal(balanced_weights(w, 1, method="mean").codes, w >= w.astype(np.float64).mean())


@pytest.mark.parametrize("method", ["exact", "mean"])
@pytest.mark.parametrize("axis", [None, 0])
def test_balanced_scale_rules(method, axis):
    w = np.random.default_rng(5).standard_t(3, size=(4, 40)).astype(np.float32)
    n = 7
    qm = balanced_weights(w, 3, method=method, axis=axis, scale="max")
    s = np.abs(w).max() if axis is None else np.abs(w).max(1, keepdims=True)
    np.testing.assert_allclose(qm.scale * n / 2, s, rtol=1e-7)  # value grid spans [-max|W|, max|W|]
    ql = balanced_weights(w, 3, method=method, axis=axis)  # lsq default
    np.testing.assert_array_equal(ql.codes, qm.codes)  # the scale rule never moves a bin
    g = (2 * ql.codes.astype(np.float64) - n) / n
    for x, gg, sc in zip(w.reshape(ql.scale.size, -1), g.reshape(ql.scale.size, -1), ql.scale.reshape(-1)):
        s_ls = np.linalg.lstsq(gg[:, None], x.astype(np.float64), rcond=None)[0][0]
        np.testing.assert_allclose(sc * n / 2, s_ls, rtol=1e-6)
    assert np.linalg.norm(ql.dequantize() - w) <= np.linalg.norm(qm.dequantize() - w)


def test_lsq_falls_back_to_max_when_the_fit_is_not_positive():
    w = np.array([10.0, 11.0, 12.0], np.float32)  # bins (0, 0, 1): <W, g> = -9
    qt = balanced_weights(w, 1)
    assert qt.scale == np.float32(2 * 12.0)


def test_balanced_rejects_unknown_options():
    with pytest.raises(ConfigError, match="valid: exact, mean"):
        balanced_weights(np.arange(4.0), 2, method="median")
    with pytest.raises(ConfigError, match="valid: lsq, max"):
        balanced_weights(np.arange(4.0), 2, scale="unit")


# ---- DoReFa (papers.md §1.1) ---------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("scale", ["max", "unit", "lsq"])
def test_dorefa_matches_the_tanh_formula(bits, scale):
    w = np.random.default_rng(bits).standard_normal((4, 30)).astype(np.float32)
    t = np.tanh(w.astype(np.float64))
    paper = 2 * quantize_k(t / (2 * np.abs(t).max()) + 0.5, bits) - 1  # f_w^k on {-1, ..., 1}
    qt = dorefa_weights(w, bits, scale=scale)
    s = {"max": np.abs(w).max(), "unit": 1.0, "lsq": qt.scale * (2**bits - 1) / 2}[scale]
    np.testing.assert_allclose(qt.dequantize(), s * paper, rtol=1e-6, atol=1e-7)
    if scale == "lsq":
        np.testing.assert_allclose(s, (paper * w).sum() / (paper * paper).sum(), rtol=1e-6)


def test_dorefa_zero_weight_rounds_up_and_max_is_per_channel():
    w = np.array([[0.0, 1.0, -2.0], [0.5, -0.1, 0.2]], np.float32)
    assert dorefa_weights(w, 2).codes[0, 0] == 2  # n*u = 1.5 -> 2 (half to even)
    per_ch = dorefa_weights(w, 2, axis=0).codes
    np.testing.assert_array_equal(per_ch.max(1), [3, 3])  # each channel's max|tanh| reaches the top code


@pytest.mark.parametrize("axis", [None, 0])
def test_dorefa_one_bit_is_sign_times_mean_abs(axis):
    w = np.random.default_rng(0).standard_normal((3, 10)).astype(np.float32)
    w[0, 0] = 0.0
    e = np.abs(w).mean() if axis is None else np.abs(w).mean(1, keepdims=True)
    expected = np.where(w >= 0, 1.0, -1.0) * e  # sign(0) := +1
    np.testing.assert_allclose(dorefa_weights(w, 1, axis=axis).dequantize(), expected, rtol=1e-6)
    np.testing.assert_array_equal(dorefa_weights(w, 1, axis=axis, scale="unit").codes, w >= 0)


# ---- baselines ---------------------------------------------------------------------------------------------


def test_uniform_zero_point_is_nudged_so_zero_is_exact():
    w = np.array([-0.3, 0.0, 0.1, 1.0], np.float32)
    qt = uniform_weights(w, 3)
    assert qt.zero == np.rint(qt.zero) and qt.dequantize()[1] == 0.0
    np.testing.assert_allclose(qt.scale, 1.3 / 7, rtol=1e-6)


def test_uniform_percentile_clips_outliers():
    w = np.random.default_rng(2).standard_normal(10_000).astype(np.float32)
    w[:3] = [50.0, -80.0, 1e6]
    full, clipped = uniform_weights(w, 4), uniform_weights(w, 4, percentile=0.1)
    assert clipped.scale < full.scale / 100
    assert clipped.codes[0] == 15 and clipped.codes[1] == 0  # outliers saturate
    lo, hi = np.percentile(w, [0.1, 99.9])
    np.testing.assert_allclose(clipped.scale, (hi - lo) / 15, rtol=1e-6)
    with pytest.raises(QuantizationError, match="percentile"):
        uniform_weights(w, 4, percentile=50)


def test_uniform_percentile_keeps_full_range_when_clipped_range_collapses():
    w = np.zeros(2000, np.float32)
    w[0] = 3.0  # the [0.1, 99.9] percentiles are both 0
    np.testing.assert_array_equal(uniform_weights(w, 2, percentile=0.1).dequantize(), w)


def test_uniform_tiny_range_is_an_error_not_a_division_by_zero():
    with pytest.raises(QuantizationError, match="too small"):
        uniform_weights(np.array([0.0, 1e-45], np.float32), 8)


def test_xnor_is_sign_times_per_channel_mean_abs():
    w = np.random.default_rng(4).standard_normal((5, 2, 3)).astype(np.float32)
    expected = np.where(w >= 0, 1.0, -1.0) * np.abs(w).mean(axis=(1, 2), keepdims=True)
    np.testing.assert_allclose(xnor_weights(w).dequantize(), expected, rtol=1e-6)
    assert xnor_weights(w).scale.shape == (5, 1, 1)
    with pytest.raises(QuantizationError, match="1-bit"):
        xnor_weights(w, 2)
