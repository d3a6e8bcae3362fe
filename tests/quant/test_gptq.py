"""GPTQ rounding: same grid, lower output error than nearest rounding on correlated inputs, exact artifacts."""

import numpy as np
import pytest

from qcompile.quant import registry
from qcompile.quant.gptq import gptq_round, second_moment


def _correlated(m, k, rng):
    mix = rng.normal(size=(k, k)) / np.sqrt(k) + np.eye(k)
    return np.abs(rng.normal(size=(m, k)) @ mix)          # nonnegative and correlated, like post-ReLU inputs


@pytest.mark.parametrize("quantizer,bits", [("uniform", 2), ("dorefa", 2), ("balanced", 2), ("uniform", 4)])
def test_gptq_keeps_the_grid_and_lowers_the_output_error(quantizer, bits):
    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.2, (24, 48)).astype(np.float32)
    x = _correlated(2000, 48, rng)
    nearest = registry.get(quantizer).weights(w, bits, 0, "w")
    tuned = gptq_round(w, nearest, second_moment(x))
    assert tuned.codes.dtype == np.uint8 and int(tuned.codes.max()) <= 2 ** bits - 1
    assert np.array_equal(tuned.scale, nearest.scale) and np.array_equal(tuned.zero, nearest.zero)
    err = lambda q: np.linalg.norm(x @ (w - q.dequantize()).T)  # noqa: E731
    assert err(tuned) < 0.9 * err(nearest)


def test_gptq_improves_the_bundled_cnn_and_stays_exact(tmp_path):
    from qcompile import api, datasets, evaluate
    from qcompile.runtime import InferenceSession

    x, y = datasets.load_sample()
    calib = datasets.load_calib()
    acc = {}
    for rounding in ("nearest", "gptq"):
        result = api.compile(datasets.bundled_model("cnn"), config="w2a2", quantizer="balanced", calib=calib,
                             weight_rounding=rounding, target="cpu" if rounding == "gptq" else None)
        acc[rounding] = evaluate.compare(result.float_model, result.model, x, y)["quant_top1"]
    assert acc["gptq"] > acc["nearest"] + 0.03
    result.save(tmp_path / "art")
    np.testing.assert_array_equal(InferenceSession(tmp_path / "art").run(None, {"input": x[:32]})[0],
                                  evaluate.predict(result.model, x[:32]))
