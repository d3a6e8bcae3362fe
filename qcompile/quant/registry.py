"""Weight quantizers by name: one frozen spec per name, the numpy function and its torch twin."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from qcompile.errors import ConfigError
from qcompile.quant.balanced import balanced_weights
from qcompile.quant.baselines import uniform_weights, xnor_weights
from qcompile.quant.core import MAX_BITS, MIN_BITS, QuantizedTensor
from qcompile.quant.dorefa import dorefa_weights


@dataclass(frozen=True)
class QuantizerSpec:
    """A named weight quantizer.

    weights(w, bits, axis, name) -> QuantizedTensor is the numpy (compile-time) function; torch_weights
    names its twin in qcompile.quant.torch_ops, called with the same `options`, so the two never drift.
    """

    name: str
    description: str
    weights: Callable[..., QuantizedTensor]
    torch_weights: str
    options: tuple[tuple[str, object], ...] = ()
    bits: tuple[int, ...] = tuple(range(MIN_BITS, MAX_BITS + 1))

    def torch_fn(self) -> Callable:
        """The torch twin as f(w, bits, axis=None, name="") -> fake-quant tensor (imports torch lazily)."""
        torch_ops = importlib.import_module("qcompile.quant.torch_ops")
        return partial(getattr(torch_ops, self.torch_weights), **dict(self.options))


def _spec(key, description, fn, twin, supported=None, **options) -> QuantizerSpec:
    def weights(w, bits, axis=None, name=""):
        return fn(w, bits, axis=axis, name=name, **options)

    extra = {} if supported is None else {"bits": supported}
    return QuantizerSpec(key, description, weights, twin, tuple(options.items()), **extra)


_SPECS = {
    s.name: s
    for s in (
        # post-training use: the grid is fitted with an offset (scale="affine"), see core.affine_fit
        _spec("balanced", "balanced quantization, exact percentile bins (BQ Alg. 1-2)",
              balanced_weights, "balanced_weights_t", method="exact", scale="affine"),
        _spec("balanced-mean", "balanced quantization, recursive mean split (cheap approximation)",
              balanced_weights, "balanced_weights_t", method="mean", scale="affine"),
        _spec("dorefa", "DoReFa tanh weights (k >= 2), sign * mean|W| (k = 1)",
              dorefa_weights, "dorefa_weights_t"),
        # the RNN paper's weights (He et al. 2016): balanced codes of tanh W from 2.5 mean|tanh W|, the grid's
        # scale then fitted to W by least squares (post-training use)
        _spec("rnn-balanced", "tanh codes balanced by 2.5 mean|tanh W| (the RNN paper), least-squares scale",
              dorefa_weights, "dorefa_weights_t", scale="lsq", spread="mean2.5"),
        _spec("uniform", "asymmetric min-max uniform with an integer zero point",
              uniform_weights, "uniform_weights_t"),
        _spec("uniform-percentile", "uniform on the [0.1, 99.9] percentile range",
              uniform_weights, "uniform_weights_t", percentile=0.1),
        _spec("xnor", "XNOR-Net sign with per-channel mean|W| scale (1-bit)",
              xnor_weights, "xnor_weights_t", supported=(1,)),
    )
}


def names() -> tuple[str, ...]:
    """Registered quantizer names."""
    return tuple(_SPECS)


def get(name: str) -> QuantizerSpec:
    """The spec registered as `name`; ConfigError listing the valid names otherwise."""
    try:
        return _SPECS[name]
    except (KeyError, TypeError):
        raise ConfigError(f"unknown quantizer {name!r}; valid: {', '.join(_SPECS)}") from None
