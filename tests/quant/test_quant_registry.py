"""Quantizers by name."""

import dataclasses

import numpy as np
import pytest

from qcompile.errors import ConfigError
from qcompile.quant import QuantizedTensor, QuantizerSpec, get, names

EXPECTED = ("balanced", "balanced-mean", "dorefa", "rnn-balanced", "uniform", "uniform-percentile", "xnor")


def test_names():
    assert names() == EXPECTED


@pytest.mark.parametrize("bad", ["balance", "", "BALANCED", None, 3])
def test_unknown_name_lists_valid_names(bad):
    with pytest.raises(ConfigError, match="valid: balanced, balanced-mean, dorefa, rnn-balanced, uniform, uniform-percentile, xnor"):
        get(bad)


@pytest.mark.parametrize("name", EXPECTED)
def test_spec_is_frozen_and_callable(name):
    spec = get(name)
    assert isinstance(spec, QuantizerSpec) and spec.name == name and spec.description
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.name = "other"
    qt = spec.weights(np.random.default_rng(0).standard_normal((3, 4)), 1, 0, "x")
    assert isinstance(qt, QuantizedTensor)
    assert spec.torch_weights.endswith("_weights_t")


def test_options_distinguish_variants():
    w = np.random.default_rng(1).standard_normal(5000).astype(np.float32)
    w[0] = 1e4
    assert get("uniform-percentile").weights(w, 4, None, "").scale < get("uniform").weights(w, 4, None, "").scale / 100
    assert dict(get("uniform-percentile").options) == {"percentile": 0.1}
    assert dict(get("balanced-mean").options) == {"method": "mean", "scale": "affine"}
    a, b = get("balanced").weights(w, 3, None, ""), get("balanced-mean").weights(w, 3, None, "")
    assert not np.array_equal(a.codes, b.codes)
    assert get("xnor").bits == (1,) and get("balanced").bits == tuple(range(1, 9))
