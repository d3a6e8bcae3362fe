"""Signed activations (Tanh, LeakyReLU, normalized inputs): affine codes with a zero point, bit-exact kernels."""

import numpy as np
import pytest

from graphs import signed_convnet, signed_mlp
from qcompile import api
from qcompile.evaluate import predict
from qcompile.runtime import InferenceSession


def _inputs(shape, n, seed):
    return np.random.default_rng(seed).normal(0, 1, (n, *shape)).astype(np.float32)


@pytest.mark.parametrize("config", ["w8a8", "w4a4", "w2a2"])
@pytest.mark.parametrize("kernel", ["bitserial", "int8", "float"])
def test_signed_inputs_are_quantized_and_the_artifact_is_exact(tmp_path, config, kernel):
    model = signed_mlp(tmp_path / "mlp.onnx")
    result = api.compile(model, config=config, calib=_inputs((16,), 256, 0), target="cpu", kernel=kernel)
    assert set(result.ctx.layers) == {"fc1", "fc2"}
    assert result.ctx.layers["fc1"].act_zero > 0            # Tanh output: codes with a zero point
    result.save(tmp_path / f"art-{config}-{kernel}")
    x = _inputs((16,), 33, 5)
    np.testing.assert_array_equal(InferenceSession(tmp_path / f"art-{config}-{kernel}").run(None, {"x": x})[0],
                                  predict(result.model, x))


def test_signed_w8a8_agrees_with_float():
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        model = signed_mlp(Path(d) / "mlp.onnx")
        result = api.compile(model, config="w8a8", calib=_inputs((16,), 256, 0))
        x = _inputs((16,), 1000, 7)
        pf, pq = predict(result.float_model, x), predict(result.model, x)
    assert (pf.argmax(1) == pq.argmax(1)).mean() >= 0.99


@pytest.mark.parametrize("config", ["w4a4", "w8a8"])
@pytest.mark.parametrize("kernel", ["bitserial", "int8", "float"])
def test_signed_convs_padded_with_the_zero_point_are_exact(tmp_path, kernel, config):
    """A padded conv's border is value 0 = code z: the codes are padded with z (Pad), the BitConv runs unpadded.
    At w8a8 the int8 kernel takes 9-bit weight integers as 2 x int8 + offset x window sum."""
    model = signed_convnet(tmp_path / "conv.onnx")
    result = api.compile(model, config=config, calib=_inputs((3, 10, 10), 64, 0), target="cpu",
                         quantize=["fc"], kernel=kernel)
    assert result.ctx.layers["conv1"].act_zero > 0 and result.ctx.layers["conv2"].act_zero > 0
    assert any(n.op_type == "Pad" for n in result.model.graph.node)
    result.save(tmp_path / "art")
    x = _inputs((3, 10, 10), 9, 3)
    np.testing.assert_array_equal(InferenceSession(tmp_path / "art").run(None, {"x": x})[0], predict(result.model, x))


def test_zero_point_padding_matches_the_float_model(tmp_path):
    """At 8 bits the padded signed conv stays close to float (padding with code 0 would shift every border pixel)."""
    model = signed_convnet(tmp_path / "conv.onnx")
    result = api.compile(model, config="w8a8", calib=_inputs((3, 10, 10), 64, 0), quantize=["fc"])
    x = _inputs((3, 10, 10), 64, 4)
    pf, pq = predict(result.float_model, x), predict(result.model, x)
    assert np.abs(pf - pq).max() < 0.05 * np.abs(pf).max()
