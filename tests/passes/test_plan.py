import pytest

from qcompile import api
from qcompile.errors import ConfigError


def _status(rows):
    return {r["node"]: r["status"] for r in rows if r["op"] in ("Conv", "Gemm")}


def test_first_and_last_stay_float_by_default(tiny_model_path):
    rows = api.inspect(tiny_model_path, config="w1a2")
    st = _status(rows)
    assert st["conv1"] == "float" and st["fc2"] == "float"
    assert st["conv2"] == st["conv3"] == st["fc1"] == "W1A2 balanced"
    why = {r["node"]: r["why"] for r in rows}
    assert "first weighted layer" in why["conv1"] and "last weighted layer" in why["fc2"]
    assert all(r["why"] for r in rows)  # every op, quantized or not, says why


def test_overrides_by_pattern(tiny_model_path):
    st = _status(api.inspect(tiny_model_path, config="w2a2", keep_float=["conv*"], quantize=["fc2"]))
    assert st["conv2"] == st["conv3"] == "float"
    assert st["fc1"] == st["fc2"] == "W2A2 balanced"


def test_unknown_preset_and_quantizer():
    with pytest.raises(ConfigError, match="unknown config 'w9a9'"):
        api.inspect("x.onnx", config="w9a9")
    with pytest.raises(ConfigError, match="unknown quantizer"):
        api.inspect("x.onnx", config="w2a2", quantizer="magic")
