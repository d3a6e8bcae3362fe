"""The integer reference (qcompile.reference) against float64 arithmetic on the real values, and the packing
layouts (qcompile.packing) against the reference."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qcompile import packing, reference

BITS = [1, 2, 3, 4]


def _codes(rng, shape, bits):
    return rng.integers(0, 1 << bits, size=shape, dtype=np.uint8)


def _wzero2(rng, n, bits, symmetric):
    if symmetric:
        return np.full(n, (1 << bits) - 1, dtype=np.int32)
    return 2 * rng.integers(0, 1 << bits, size=n).astype(np.int32)  # asymmetric grids: even wzero2


def _float_conv(x, w, strides, pads, dilations, group):
    """A naive float64 ONNX Conv: one output element at a time."""
    b, c, h, wd = x.shape
    n, cg, kh, kw = w.shape
    ho, wo = reference.conv_output_shape((h, wd), (kh, kw), strides, pads, dilations)
    out = np.zeros((b, n, ho, wo))
    ng = n // group
    for bi in range(b):
        for o in range(n):
            g = o // ng
            for oy in range(ho):
                for ox in range(wo):
                    s = 0.0
                    for ci in range(cg):
                        for ky in range(kh):
                            for kx in range(kw):
                                iy = oy * strides[0] - pads[0] + ky * dilations[0]
                                ix = ox * strides[1] - pads[1] + kx * dilations[1]
                                if 0 <= iy < h and 0 <= ix < wd:
                                    s += x[bi, g * cg + ci, iy, ix] * w[o, ci, ky, kx]
                    out[bi, o, oy, ox] = s
    return out


@settings(max_examples=40, deadline=None)
@given(m=st.integers(1, 5), n=st.integers(1, 6), k=st.integers(1, 130), ba=st.sampled_from(BITS),
       bw=st.sampled_from(BITS), sym=st.booleans(), seed=st.integers(0, 2**31))
def test_bit_gemm_matches_float_values(m, n, k, ba, bw, sym, seed):
    rng = np.random.default_rng(seed)
    x, w = _codes(rng, (m, k), ba), _codes(rng, (n, k), bw)
    z2 = _wzero2(rng, n, bw, sym)
    beta, alpha = 0.37, 0.11  # real values: activations beta*p, weights alpha/2*(2q - wzero2)
    real = (beta * x.astype(np.float64)) @ (alpha / 2 * (2.0 * w - z2[:, None])).T
    acc = reference.bit_gemm(x, w, z2)
    assert acc.dtype == np.int32 and acc.shape == (m, n)
    np.testing.assert_allclose(acc * beta * alpha / 2, real, rtol=1e-12, atol=1e-9)


@pytest.mark.parametrize(
    "shape,kernel,strides,pads,dilations,group",
    [
        ((1, 3, 5, 5), (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1),
        ((2, 4, 7, 6), (3, 3), (2, 2), (1, 0, 2, 1), (1, 1), 2),
        ((1, 6, 9, 8), (3, 2), (1, 2), (0, 1, 1, 0), (2, 1), 3),
        ((1, 5, 4, 4), (1, 1), (1, 1), (0, 0, 0, 0), (1, 1), 1),
        ((1, 4, 6, 5), (3, 3), (1, 1), (2, 2, 2, 2), (2, 2), 4),  # depthwise, dilated
    ],
)
@pytest.mark.parametrize("ba,bw", [(1, 1), (2, 1), (2, 2), (4, 4), (3, 2)])
def test_bit_conv_matches_float_conv(shape, kernel, strides, pads, dilations, group, ba, bw):
    rng = np.random.default_rng(sum(shape) + ba * 7 + bw)
    n = 2 * group
    x = _codes(rng, shape, ba)
    w = _codes(rng, (n, shape[1] // group) + kernel, bw)
    z2 = _wzero2(rng, n, bw, symmetric=bw != 3)
    expect = _float_conv(x.astype(np.float64), reference.weight_values(w, z2).astype(np.float64),
                         strides, pads, dilations, group)
    got = reference.bit_conv(x, w, z2, strides, pads, dilations, group)
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, expect)


def test_bit_conv_equals_gemm_on_1x1():
    rng = np.random.default_rng(0)
    x, w = _codes(rng, (2, 7, 3, 4), 2), _codes(rng, (5, 7, 1, 1), 2)
    z2 = np.full(5, 3, np.int32)
    conv = reference.bit_conv(x, w, z2)
    gemm = reference.bit_gemm(x.transpose(0, 2, 3, 1).reshape(-1, 7), w[:, :, 0, 0], z2)
    np.testing.assert_array_equal(conv, gemm.reshape(2, 3, 4, 5).transpose(0, 3, 1, 2))


@settings(max_examples=60, deadline=None)
@given(k=st.integers(1, 300), bp=st.sampled_from(BITS), bq=st.sampled_from(BITS), seed=st.integers(0, 2**31))
def test_bitplane_identity(k, bp, bq, seed):
    rng = np.random.default_rng(seed)
    p, q = _codes(rng, k, bp), _codes(rng, k, bq)
    assert reference.bitplane_dot(p, q, bp, bq) == int(p.astype(np.int64) @ q.astype(np.int64))


@settings(max_examples=60, deadline=None)
@given(k=st.integers(1, 300), seed=st.integers(0, 2**31))
def test_xor_identity(k, seed):
    rng = np.random.default_rng(seed)
    a, w = _codes(rng, k, 1), _codes(rng, k, 1)
    assert reference.xor_dot(a, w) == int((2 * a.astype(np.int64) - 1) @ (2 * w.astype(np.int64) - 1))


def test_xor_gemm_is_bipolar_values_and_and_form():
    rng = np.random.default_rng(3)
    x, w = _codes(rng, (4, 77), 1), _codes(rng, (3, 77), 1)
    expect = (2.0 * x - 1) @ (2.0 * w - 1).T
    np.testing.assert_array_equal(reference.bit_gemm_xor(x, w), expect)
    # W1 with wzero2 = 1 is the same bipolar weight; the AND form needs activations as {0,1} codes:
    # sum (2q-1)(2p-1) = bit_gemm(p, q, 1)*2 - sum_k (2q-1)
    and_form = 2 * reference.bit_gemm(x, w, np.ones(3, np.int32)) - (2 * w.astype(np.int64) - 1).sum(1)
    np.testing.assert_array_equal(and_form, expect)


def test_xor_conv_padding_contributes_zero():
    rng = np.random.default_rng(4)
    x, w = _codes(rng, (1, 3, 5, 4), 1), _codes(rng, (2, 3, 3, 3), 1)
    expect = _float_conv(2.0 * x - 1, 2.0 * w - 1, (1, 1), (1, 1, 1, 1), (1, 1), 1)
    np.testing.assert_array_equal(reference.bit_conv_xor(x, w, pads=(1, 1, 1, 1)), expect)


def test_xor_rejects_multibit():
    with pytest.raises(ValueError, match="1-bit"):
        reference.bit_gemm_xor(np.array([[2]], np.uint8), np.array([[1]], np.uint8))


def test_epilogue_float_is_mul_then_add_in_float32():
    rng = np.random.default_rng(5)
    acc = rng.integers(-(2**20), 2**20, size=(3, 4, 2, 2)).astype(np.int32)
    mult = rng.standard_normal(4).astype(np.float32)
    bias = rng.standard_normal(4).astype(np.float32)
    y = reference.epilogue_float(acc, mult, bias)
    assert y.dtype == np.float32
    expect = (acc.astype(np.float32) * mult[None, :, None, None]) + bias[None, :, None, None]
    np.testing.assert_array_equal(y, expect)


def test_epilogue_threshold_counts():
    acc = np.array([[-5, 0, 3, 10], [7, 8, 9, 100]], np.int32)
    t = np.array([[0, 3, 9], [8, 8, 50]], np.int32)
    got = reference.epilogue_threshold(acc.T.copy(), t)  # [4, 2]: channels on axis 1
    np.testing.assert_array_equal(got, np.array([[0, 0], [1, 2], [2, 2], [3, 3]], np.uint8))
    assert got.dtype == np.uint8


@settings(max_examples=30, deadline=None)
@given(shape=st.tuples(st.integers(1, 3), st.integers(1, 200)), bits=st.sampled_from(BITS), seed=st.integers(0, 99))
def test_pack_planes_roundtrip_and_layout(shape, bits, seed):
    rng = np.random.default_rng(seed)
    c = _codes(rng, shape, bits)
    planes = packing.pack_planes(c, bits)
    assert planes.shape == (bits, shape[0], packing.n_words(shape[1])) and planes.dtype == np.uint64
    np.testing.assert_array_equal(packing.unpack_planes(planes, shape[1]), c)
    # bit t of word w is element 64*w + t; the tail is zero
    m, k = 0, shape[1] - 1
    assert (int(planes[bits - 1, m, k // 64]) >> (k % 64)) & 1 == (int(c[m, k]) >> (bits - 1)) & 1
    if shape[1] % 64:
        assert int(planes[:, :, -1].max()) >> (shape[1] % 64) == 0


def test_pack_rejects_out_of_range_codes():
    with pytest.raises(ValueError, match="outside"):
        packing.pack_planes(np.array([4], np.uint8), 2)


@pytest.mark.parametrize("group,ba,bw", [(1, 1, 1), (2, 2, 1), (3, 2, 4)])
def test_im2col_bits_gemm_equals_conv(group, ba, bw):
    rng = np.random.default_rng(group)
    c, n = 6 * group, 2 * group
    x = _codes(rng, (2, c, 7, 5), ba)
    w = _codes(rng, (n, c // group, 3, 2), bw)
    z2 = np.full(n, (1 << bw) - 1, np.int32)
    geo = dict(strides=(2, 1), pads=(1, 0, 1, 1), dilations=(1, 2), group=group)
    expect = reference.bit_conv(x, w, z2, **geo)
    cols = packing.im2col_bits(x, ba, (3, 2), **geo)
    wp = packing.pack_conv_weights(w, bw)
    ng, k = n // group, 3 * 2 * (c // group)
    out = np.zeros(expect.transpose(0, 2, 3, 1).reshape(-1, n).shape, np.int64)
    for g in range(group):
        p = packing.unpack_planes(cols[g], k)
        q = packing.unpack_planes(wp[:, g * ng : (g + 1) * ng], k)
        out[:, g * ng : (g + 1) * ng] = reference.bit_gemm(p, q, z2[g * ng : (g + 1) * ng])
    b, _, ho, wo = expect.shape
    np.testing.assert_array_equal(out.reshape(b, ho, wo, n).transpose(0, 3, 1, 2), expect)


def test_pack_nhwc_and_kernel_layout():
    rng = np.random.default_rng(9)
    x = _codes(rng, (1, 70, 2, 3), 2)
    p = packing.pack_nhwc(x, 2)
    assert p.shape == (2, 1, 2, 3, 1, 2)
    np.testing.assert_array_equal(packing.unpack_planes(p, 70)[0, 1, 2, 0], x[0, :, 1, 2])
    lay = packing.kernel_weight_layout(packing.pack_gemm_weights(_codes(rng, (3, 100), 2), 2))
    assert lay.shape == (3, 2, 8) and not lay[:, :, 2:].any()


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 3), st.integers(1, 5), st.integers(2, 11), st.integers(2, 11), st.integers(1, 3),
       st.integers(1, 3), st.integers(1, 3), st.integers(1, 3), st.integers(1, 2), st.integers(1, 2),
       st.integers(0, 2**31 - 1))
def test_max_pool_codes_matches_a_naive_loop(b, c, h, w, kh, kw, sh, sw, dh, dw, seed):
    if (kh - 1) * dh + 1 > h or (kw - 1) * dw + 1 > w:
        return
    x = _codes(np.random.default_rng(seed), (b, c, h, w), 8)
    y = reference.max_pool_codes(x, (kh, kw), (sh, sw), (dh, dw))
    ho, wo = (h - (kh - 1) * dh - 1) // sh + 1, (w - (kw - 1) * dw - 1) // sw + 1  # floor mode, no pads
    assert y.dtype == np.uint8 and y.shape == (b, c, ho, wo)
    for oy in range(ho):
        for ox in range(wo):
            win = x[:, :, oy * sh : oy * sh + (kh - 1) * dh + 1 : dh, ox * sw : ox * sw + (kw - 1) * dw + 1 : dw]
            np.testing.assert_array_equal(y[:, :, oy, ox], win.max(axis=(2, 3)))


def test_max_pool_codes_commutes_with_the_quantizer():
    """Pooling codes == quantizing the pooled floats (why the fuse pass may move MaxPool after the epilogue)."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 3, 9, 7)).astype(np.float32) * 2
    quant = lambda v: np.clip(np.rint(np.clip(v, 0, 1.5) / np.float32(0.5)), 0, 3).astype(np.uint8)  # noqa: E731
    pooled = np.maximum.reduce([x[:, :, dy : dy + 8 : 2, dx : dx + 6 : 2] for dy in (0, 1) for dx in (0, 1)])
    np.testing.assert_array_equal(reference.max_pool_codes(quant(x), (2, 2), (2, 2)), quant(pooled))


def test_max_pool_codes_rejects_non_codes():
    with pytest.raises(ValueError, match="uint8 NCHW"):
        reference.max_pool_codes(np.zeros((1, 2, 4, 4), np.float32), (2, 2))
    with pytest.raises(ValueError, match="empty"):
        reference.max_pool_codes(np.zeros((1, 2, 3, 3), np.uint8), (4, 4))
