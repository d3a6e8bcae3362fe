"""DoReFa-Net weight and activation quantizers (Zhou et al., arXiv:1606.06160 §2.2-2.4; papers.md §1.1).

The gradient quantizer f_g only exists at training time: see `torch_ops.dorefa_gradients`.
"""

from __future__ import annotations

import numpy as np

from qcompile.errors import QuantizationError
from qcompile.quant.core import (
    DOREFA_SCALES,
    QuantizedTensor,
    as_rows,
    check_bits,
    check_choice,
    check_finite,
    constant_rows,
    finish,
    label,
    levels,
    quantize_k_codes,
    symmetric_constant,
    symmetric_scale,
)


def sign_mean(x2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """1-bit codes q = [W >= 0] (sign(0) := +1, so no weight maps to 0) and scale 2E, E = mean|W| per row.

    value = 2E * (q - 1/2) = sign(W) * E. E is also the least-squares scale of a sign grid.
    """
    return (x2 >= 0).astype(np.int64), 2.0 * np.abs(x2).mean(axis=1)


SPREADS = ("max", "mean2.5")


def tanh_codes(x2: np.ndarray, bits: int, spread: str) -> np.ndarray:
    """k-bit codes of tanh(W) rows. "max" (DoReFa): u = tanh W / (2 max|tanh W|) + 1/2, the grid spans the row.
    "mean2.5" (He et al., the RNN paper's released code, papers.md §3.2): u = clip(tanh W / (2.5 mean|tanh W|),
    -1/2, 1/2) + 1/2; at 2 bits its boundaries sit near the median of a Gaussian's |W|, so the four levels hold
    about a quarter of the weights each: a balanced code from one mean."""
    t = np.tanh(x2)
    if spread == "max":
        m = np.abs(t).max(axis=1, keepdims=True)
        u = t / (2 * np.where(m > 0, m, 1.0)) + 0.5  # m = 0 only on all-zero rows (constant rows are replaced)
    else:
        m = 2.5 * np.abs(t).mean(axis=1, keepdims=True)
        u = np.clip(t / np.where(m > 0, m, 1.0), -0.5, 0.5) + 0.5
    return quantize_k_codes(u, bits).astype(np.int64)


def dorefa_weights(w, bits: int, *, axis=None, scale: str = "max", spread: str = "max",
                   name: str = "") -> QuantizedTensor:
    r"""DoReFa k-bit weights.

    k >= 2: u = tanh(W) / (2 max|tanh W|) + 1/2, code q = rint(n u), value = S * (2 quantize_k(u) - 1)
    = S * (2q - n)/n, n = 2**k - 1, with max over the tensor (axis=None, the paper) or the channel.
    S is the scale rule: "max" S = max|W| so the [-1, 1] grid spans the weights (post-training use),
    "lsq" least squares as in balanced_weights, "unit" S = 1 (the paper's own training-time form).
    W = 0 gives u = 1/2, n u = n/2 a half-integer tie; round-half-even sends it up to 2**(k-1).
    k = 1: sign(W) * E(|W|), E = mean|W| per tensor (the paper; per channel with axis=0),
    sign(0) := +1; `scale` is ignored because E is the paper's rule and also the least-squares scale.
    ``spread`` "mean2.5": the RNN paper's codes instead (:func:`tanh_codes`; registered as "rnn-balanced").
    """
    bits = check_bits(bits, name)
    check_choice(scale, DOREFA_SCALES, "dorefa scale rule")
    x2, shape = as_rows(w, axis, name)
    const = constant_rows(x2, axis, name)
    n = levels(bits)
    if bits == 1:
        codes, s = sign_mean(x2)
    else:
        check_choice(spread, SPREADS, "tanh spread")
        codes = tanh_codes(x2, bits, spread)
        s = symmetric_scale(scale, x2, 2 * codes - n, n)
    cq, cs = symmetric_constant(x2[:, 0], bits)
    codes = np.where(const[:, None], cq[:, None], codes)
    return finish(codes, np.where(const, cs, s), np.full(s.shape, n / 2), bits, shape, axis, name)


def activation_scale(bits: int, clip: float = 1.0, name: str = "") -> np.float32:
    """The float32 step clip/n that the deployed QuantizeLinear/DequantizeLinear pair uses."""
    bits = check_bits(bits, name)
    if not (np.isfinite(clip) and clip > 0):
        raise QuantizationError(f"{label(name)}: activation clip must be a positive finite number, got {clip!r}")
    return np.float32(clip / levels(bits))


def dorefa_activation_codes(x, bits: int, clip: float = 1.0, *, name: str = "") -> np.ndarray:
    r"""uint8 codes of f_a^k(clip(x, 0, c)/c) = quantize_k(...) (DoReFa §2.4), computed as ONNX does.

    q = rint(clip(x, 0, c) / s) in float32 with s = float32(c/n): exactly onnxruntime's
    Clip -> QuantizeLinear (which divides by the float32 scale, round half to even), so compile time
    and the deployed graph agree bit for bit. The paper's rint(n * x/c) is the same map in exact
    arithmetic but differs on float32 near-ties.
    """
    name = name or "activations"
    s = activation_scale(bits, clip, name)
    check_finite(x, name)
    x32 = np.asarray(x, np.float32)
    return np.rint(np.clip(x32, np.float32(0), np.float32(clip)) / s).astype(np.uint8)


def dorefa_activations(x, bits: int, clip: float = 1.0, *, name: str = "") -> np.ndarray:
    """float32 fake-quant activations: codes * s, as DequantizeLinear computes them."""
    return dorefa_activation_codes(x, bits, clip, name=name).astype(np.float32) * activation_scale(bits, clip, name)
