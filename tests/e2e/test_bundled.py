"""The bundled Fashion-MNIST models through the whole pipeline."""

import numpy as np
import pytest

from qcompile import api, datasets, evaluate
from qcompile.runtime import InferenceSession


@pytest.fixture(scope="module")
def sample():
    return datasets.load_sample()


@pytest.fixture(scope="module")
def calib():
    return datasets.load_calib()


def test_w4a4_balanced_within_two_points_of_float(sample, calib):
    x, y = sample
    result = api.compile(datasets.bundled_model("cnn"), config="w4a4", quantizer="balanced", calib=calib)
    acc = evaluate.compare(result.float_model, result.model, x, y)
    assert acc["float_top1"] >= 0.90
    assert acc["quant_top1"] >= acc["float_top1"] - 0.02, acc


def test_balanced_uses_every_level_equally(calib):
    """Effective bitwidth: exact balanced bins fill all 2^k levels equally; uniform min-max leaves them skewed."""
    model = datasets.bundled_model("cnn")
    bal = api.compile(model, config="w2a2", quantizer="balanced", calib=calib).report["layers"]
    uni = api.compile(model, config="w2a2", quantizer="uniform", calib=calib).report["layers"]
    for b, u in zip(bal, uni):
        assert b["levels_used"] == 4 and b["entropy_bits"] > 1.99
        assert b["entropy_bits"] > u["entropy_bits"]


@pytest.mark.parametrize("name,config", [("cnn", "w1a2"), ("cnn", "w2a2"), ("mlp", "w2a2"), ("mlp", "w1a1")])
def test_bundled_artifact_equals_fakequant(tmp_path, sample, calib, name, config):
    x, _ = sample
    result = api.compile(datasets.bundled_model(name), config=config, calib=calib, target="cpu",
                         kernel="bitserial")
    result.save(tmp_path / "art")
    got = InferenceSession(tmp_path / "art").run(None, {"input": x[:64]})[0]
    want = evaluate.predict(result.model, x[:64])
    np.testing.assert_array_equal(got, want)  # integer parts exact, hence the float outputs too
    assert any(s["kind"] == "kernel" for s in result.manifest["schedule"])


def test_compression_ratio_reported(calib):
    report = api.compile(datasets.bundled_model("cnn"), config="w1a2", calib=calib).report
    assert report["totals"]["quantized_layers_compression"] > 20  # 1-bit weights: ~32x minus scales
    assert report["totals"]["compression"] > 5


@pytest.mark.parametrize("preset,agree", [("w8a8", 0.99), ("w4a8", 0.95)])
def test_8bit_presets_agree_with_float_and_the_artifact_is_exact(tmp_path, preset, agree):
    """8-bit weights need 9-bit integers 2q - zero2 (INT16 in the fake-quant model; onnxruntime's int8 ops take them
    split in two, passes/int8.py); whatever the planner picks, the artifact is exact."""
    from qcompile import api, datasets, evaluate
    from qcompile.runtime import InferenceSession

    x, y = datasets.load_sample()
    result = api.compile(datasets.bundled_model("cnn"), config=preset, calib=datasets.load_calib(), target="cpu")
    acc = evaluate.compare(result.float_model, result.model, x, y)
    assert acc["agreement"] >= agree
    result.save(tmp_path / "art")
    np.testing.assert_array_equal(InferenceSession(tmp_path / "art").run(None, {"input": x[:40]})[0],
                                  evaluate.predict(result.model, x[:40]))
    forced = api.compile(datasets.bundled_model("cnn"), config=preset, calib=datasets.load_calib(), target="cpu",
                         kernel="int8")
    assert all(p["kernel"] == "onnxruntime-int8" for p in forced.manifest["plan"] if p["bits"] != "float")
    forced.save(tmp_path / "art8")
    np.testing.assert_array_equal(InferenceSession(tmp_path / "art8").run(None, {"input": x[:40]})[0],
                                  evaluate.predict(forced.model, x[:40]))
