"""The int8 lowering's integer identity: 9-bit weight integers as 2 x int8 + a per-channel offset, exact in
onnxruntime for convs (grouped, padded, strided) and MatMuls against numpy's integer sums."""

import numpy as np
import onnxruntime as ort
import pytest

from qcompile.passes.int8 import probe_model, split_9bit


def _weights(rng, shape, axis, bits=8):
    """2q - zero2 per channel along `axis`, as the quantizers make them (zero2 in [0, 2n], any parity)."""
    n = 2 ** bits - 1
    q = rng.integers(0, n + 1, shape)
    zshape = [1] * len(shape)
    zshape[axis] = shape[axis]
    zero2 = rng.integers(0, 2 * n + 1, zshape)
    zero2[(0,) * len(shape)] = n                     # the symmetric case: odd integers in [-255, 255]
    return (2 * q - zero2).astype(np.int16)


def test_split_is_exact_and_in_int8_range():
    rng = np.random.default_rng(0)
    for axis, shape in ((0, (7, 3, 3, 3)), (1, (37, 11))):
        w = _weights(rng, shape, axis)
        w8, c = split_9bit(w, axis)
        cshape = [1] * w.ndim
        cshape[axis] = -1
        np.testing.assert_array_equal(2 * w8.astype(np.int32) + c.reshape(cshape), w)
    assert split_9bit(np.array([[-128, 127]], np.int16), 1) is None     # fits int8 already


def _run(model, x):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


@pytest.mark.parametrize("group, stride, pad", [(1, 1, 1), (1, 2, 0), (3, 1, 1), (6, 2, 1)])
def test_conv_accumulator_equals_the_integer_sum(group, stride, pad):
    import torch

    rng = np.random.default_rng(group * 10 + stride)
    n, c = 12, 6
    w = _weights(rng, (n, c // group, 3, 3), 0)
    x = rng.integers(0, 256, (2, c, 7, 9)).astype(np.uint8)
    attrs = dict(strides=[stride, stride], pads=[pad] * 4, dilations=[1, 1], group=group, kernel_shape=[3, 3])
    got = _run(probe_model(w, x.shape, attrs), x)
    ref = torch.nn.functional.conv2d(torch.from_numpy(x.astype(np.float64)), torch.from_numpy(w.astype(np.float64)),
                                     stride=stride, padding=pad, groups=group).numpy()
    np.testing.assert_array_equal(got, ref.astype(np.float32))


@pytest.mark.parametrize("k", [1, 63, 200])
def test_matmul_accumulator_equals_the_integer_sum(k):
    rng = np.random.default_rng(k)
    w = _weights(rng, (k, 10), 1)
    x = rng.integers(0, 256, (3, 5, k)).astype(np.uint8)
    got = _run(probe_model(w, x.shape), x)
    np.testing.assert_array_equal(got, (x.astype(np.int64) @ w.astype(np.int64)).astype(np.float32))
