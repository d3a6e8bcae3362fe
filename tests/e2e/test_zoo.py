"""Modern CNN structures exported from torch with both exporters: SiLU/GELU (signed activations), a residual add,
a depthwise conv and a strided 1x1 conv. Each compiles, every quantized layer runs on the bit kernels exactly, and
w8a8 agrees with float."""

import warnings

import numpy as np
import pytest

from qcompile import api
from qcompile.evaluate import predict
from qcompile.runtime import InferenceSession

torch = pytest.importorskip("torch")


def _residual_net(act: str):
    torch.manual_seed(0)
    a = {"silu": torch.nn.SiLU, "gelu": torch.nn.GELU}[act]

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.BatchNorm2d(16), a())
            self.block = torch.nn.Sequential(torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.BatchNorm2d(16), a(),
                                             torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.BatchNorm2d(16))
            self.down = torch.nn.Sequential(torch.nn.Conv2d(16, 16, 3, padding=1, groups=16), a(),
                                            torch.nn.Conv2d(16, 32, 1, stride=2), a())
            self.head = torch.nn.Linear(32, 10)

        def forward(self, x):
            h = self.stem(x)
            h = self.down(h + self.block(h))
            return self.head(h.mean((2, 3)))

    net = Net().eval()
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return net


@pytest.fixture(scope="module", params=[("silu", "legacy"), ("silu", "dynamo"), ("gelu", "legacy")],
                ids=lambda p: "-".join(p))
def exported(request, tmp_path_factory):
    act, exporter = request.param
    path = tmp_path_factory.mktemp("zoo") / f"{act}_{exporter}.onnx"
    x = torch.randn(2, 3, 16, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "legacy":
            torch.onnx.export(_residual_net(act), (x,), str(path), input_names=["x"], output_names=["y"],
                              opset_version=17, dynamo=False, dynamic_axes={"x": {0: "N"}})
        else:
            torch.onnx.export(_residual_net(act), (x,), str(path), input_names=["x"], output_names=["y"],
                              dynamo=True, external_data=False, verbose=False,
                              dynamic_shapes={"x": {0: torch.export.Dim("N", min=1, max=1024)}})
    return path


def _x(n, seed):
    return np.random.default_rng(seed).normal(0, 1, (n, 3, 16, 16)).astype(np.float32)


def test_every_quantized_layer_runs_exactly_on_the_bit_kernels(exported, tmp_path):
    result = api.compile(exported, config="w4a4", calib=_x(64, 0), target="cpu", kernel="bitserial")
    quantized = [p for p in result.manifest["plan"] if p["bits"] != "float"]
    assert len(quantized) >= 4                                   # signed, padded, depthwise and strided 1x1 convs
    assert all(p["kernel"].startswith(("bitserial", "lut")) for p in quantized), quantized
    result.save(tmp_path / "art")
    x = _x(7, 1)
    np.testing.assert_array_equal(InferenceSession(tmp_path / "art").run(None, {"x": x})[0], predict(result.model, x))


def test_w8a8_agrees_with_float(exported):
    result = api.compile(exported, config="w8a8", calib=_x(64, 0))
    x = _x(200, 2)
    assert (predict(result.float_model, x).argmax(1) == predict(result.model, x).argmax(1)).mean() >= 0.99


@pytest.fixture(scope="module")
def dynamic_hw(tmp_path_factory):
    path = tmp_path_factory.mktemp("zoo") / "silu_dynamic_hw.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_residual_net("silu"), (torch.randn(2, 3, 16, 16),), str(path), input_names=["x"],
                          output_names=["y"], opset_version=17, dynamo=False,
                          dynamic_axes={"x": {0: "N", 2: "H", 3: "W"}})
    return path


def test_dynamic_height_and_width_get_kernels_for_the_calibration_size(dynamic_hw, tmp_path):
    """Symbolic H and W: the kernels are built for the calibration's 16x16; that size runs on them, any other size
    runs the fake-quant model with a warning, and both equal the fake-quant model exactly."""
    from qcompile.errors import RuntimeInputError

    result = api.compile(dynamic_hw, config="w4a4", calib=_x(64, 0), target="cpu", kernel="bitserial")
    quantized = [p for p in result.manifest["plan"] if p["bits"] != "float"]
    assert quantized and all(p["kernel"].startswith(("bitserial", "lut")) for p in quantized), quantized
    assert result.manifest["inputs"][0]["shape"][1:] == [3, 16, 16]
    assert result.manifest["generic"]["inputs"][0]["shape"][2:] == ["H", "W"]
    result.save(tmp_path / "art")
    sess = InferenceSession(tmp_path / "art")
    x = _x(3, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # the calibration size must not take the fallback
        np.testing.assert_array_equal(sess.run(None, {"x": x})[0], predict(result.model, x))
    other = np.random.default_rng(2).normal(0, 1, (2, 3, 20, 12)).astype(np.float32)
    with pytest.warns(RuntimeWarning, match=r"x\[2, 3, 20, 12\].*fake-quant"):
        y = sess.run(None, {"x": other})[0]
    np.testing.assert_array_equal(y, predict(result.model, other))
    with pytest.raises(RuntimeInputError, match=r"input 'x': shape \[2, 4, 16, 16\]"):
        sess.run(None, {"x": np.zeros((2, 4, 16, 16), np.float32)})
