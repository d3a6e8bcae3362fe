"""Low-bit quantizers: numpy at compile time, torch twins (`qcompile.quant.torch_ops`) for training.

This package never imports torch: the compiler and the deployed runtime must import without it.
"""

from qcompile.quant.balanced import balanced_weights
from qcompile.quant.baselines import uniform_weights, xnor_weights
from qcompile.quant.core import (
    MAX_BITS,
    MIN_BITS,
    SCALE_RULES,
    QuantizedTensor,
    check_finite,
    quantize_k,
    quantize_k_codes,
)
from qcompile.quant.dorefa import dorefa_activation_codes, dorefa_activations, dorefa_weights
from qcompile.quant.registry import QuantizerSpec, get, names

__all__ = [
    "MAX_BITS",
    "MIN_BITS",
    "SCALE_RULES",
    "QuantizedTensor",
    "QuantizerSpec",
    "balanced_weights",
    "check_finite",
    "dorefa_activation_codes",
    "dorefa_activations",
    "dorefa_weights",
    "get",
    "names",
    "quantize_k",
    "quantize_k_codes",
    "uniform_weights",
    "xnor_weights",
]
