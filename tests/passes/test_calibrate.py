import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qcompile import api
from qcompile.calibration import ArrayReader
from qcompile.errors import CalibrationError
from qcompile.passes.calibrate import BINS, ActivationStats


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(0.01, 100.0), min_size=2, max_size=6), st.integers(0, 2**31 - 1))
def test_streaming_histogram_matches_one_shot(maxima, seed):
    """Doubling-and-merging as data grows gives the same counts as binning everything on the final range."""
    rng = np.random.default_rng(seed)
    chunks = [rng.uniform(0, m, 500).astype(np.float32) for m in maxima]
    stats = ActivationStats()
    for c in chunks:
        stats.update(c)
    allx = np.concatenate(chunks)
    assert stats.count == allx.size and stats.max == allx.max() and stats.min == allx.min()
    assert stats.hist.sum() == allx.size and stats.hist.size == BINS
    assert stats.upper > allx.max()
    # every value falls in the bin its value says, on the final range, up to the float edge of a merge
    one_shot = np.bincount((allx * (BINS / stats.upper)).astype(np.int64), minlength=BINS)
    assert np.abs(np.cumsum(one_shot) - np.cumsum(stats.hist)).max() <= allx.size * 0.002


def test_clip_rules_are_ordered():
    rng = np.random.default_rng(0)
    stats = ActivationStats()
    x = np.abs(rng.normal(0, 1, 100_000))
    x[:100] *= 20                                   # a few outliers, as post-ReLU activations have
    stats.update(x.astype(np.float32))
    mse2, p9999, mx = stats.clip("mse", 2), stats.clip("percentile:99.99", 2), stats.clip("max", 2)
    assert 0 < mse2 < p9999 <= mx
    assert stats.clip("mse", 2) < stats.clip("mse", 4)  # more bits afford a wider range


def test_wrong_shape_calibration_names_input(tiny_model_path):
    with pytest.raises(CalibrationError, match=r"input 'input' has shape \[4, 1, 10, 10\].*\[\?x1x12x12\]"):
        api.compile(tiny_model_path, calib=np.zeros((4, 1, 10, 10), np.float32))


def test_wrong_dtype_and_nan_calibration(tiny_model_path):
    with pytest.raises(CalibrationError, match="is int32"):
        api.compile(tiny_model_path, calib=np.zeros((4, 1, 12, 12), np.int32))
    bad = np.zeros((4, 1, 12, 12), np.float32)
    bad[0, 0, 0, 0] = np.inf
    with pytest.raises(CalibrationError, match="NaN/Inf"):
        api.compile(tiny_model_path, calib=bad)


def test_empty_reader(tiny_model_path):
    with pytest.raises(CalibrationError, match="gave no data"):
        api.compile(tiny_model_path, calib=ArrayReader(np.zeros((0, 1, 12, 12), np.float32)))
