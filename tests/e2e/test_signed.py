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


def test_signed_unpadded_conv_is_quantized_and_a_padded_one_says_why(tmp_path):
    model = signed_convnet(tmp_path / "conv.onnx")
    result = api.compile(model, config="w4a4", calib=_inputs((3, 10, 10), 64, 0), target="cpu",
                         keep_float=["fc"], quantize=["fc"])
    assert "conv1" in result.ctx.layers and result.ctx.layers["conv1"].act_zero > 0
    assert "conv2" not in result.ctx.layers
    assert "padded conv" in result.ctx.plan["conv2"].reason
    result.save(tmp_path / "art")
    x = _inputs((3, 10, 10), 9, 3)
    np.testing.assert_array_equal(InferenceSession(tmp_path / "art").run(None, {"x": x})[0], predict(result.model, x))
