"""Baseline weight quantizers: uniform min-max (optionally percentile-clipped) and XNOR-Net sign."""

from __future__ import annotations

import numpy as np

from qcompile.errors import QuantizationError
from qcompile.quant.core import (
    QuantizedTensor,
    as_rows,
    check_bits,
    constant_rows,
    finish,
    label,
    levels,
    overflow_message,
    symmetric_constant,
)
from qcompile.quant.dorefa import sign_mean


def percentile_position(m: int, p: float) -> tuple[int, int, float]:
    """(i, i+1, frac) of numpy's default 'linear' percentile p of m sorted values."""
    h = (m - 1) * (p / 100.0)
    i = int(np.floor(h))
    return i, min(i + 1, m - 1), h - i


def row_percentile(x2: np.ndarray, p: float) -> np.ndarray:
    """Linear-interpolated percentile per row, written out so the torch twin matches it exactly."""
    s = np.sort(x2, axis=1)
    i, i1, f = percentile_position(s.shape[1], p)
    return s[:, i] + f * (s[:, i1] - s[:, i])


def check_percentile(percentile, name: str) -> None:
    if percentile is not None and not 0 <= percentile < 50:
        raise QuantizationError(f"{label(name)}: percentile must be in [0, 50), got {percentile!r}")


def uniform_weights(w, bits: int, *, axis=None, percentile: float | None = None, name: str = "") -> QuantizedTensor:
    r"""Asymmetric uniform k-bit weights with an integer zero point (the ONNX/TFLite scheme).

    [lo, hi] = [min W, max W] or, with `percentile` p, the [p, 100-p] percentiles (outliers saturate),
    widened to contain 0; scale = (hi - lo)/n (float32), zero z = rint(-lo/scale) clipped to [0, n]
    (the "nudge": code z is exactly 0.0), code = clip(rint(W/scale) + z, 0, n), value = scale*(q - z).
    A row whose clipped range collapses to {0} keeps its full range. A constant channel c is encoded
    exactly as (q, z, scale) = (1, 0, c) for c > 0, (0, 1, |c|) for c < 0, (0, 0, 0) for c = 0.
    """
    bits = check_bits(bits, name)
    check_percentile(percentile, name)
    x2, shape = as_rows(w, axis, name)
    const = constant_rows(x2, axis, name)
    n = levels(bits)
    lo, hi = x2.min(axis=1), x2.max(axis=1)
    if percentile is not None:
        plo, phi = row_percentile(x2, percentile), row_percentile(x2, 100 - percentile)
        keep = np.minimum(plo, 0) < np.maximum(phi, 0)
        lo, hi = np.where(keep, plo, lo), np.where(keep, phi, hi)
    lo, hi = np.minimum(lo, 0.0), np.maximum(hi, 0.0)
    with np.errstate(over="ignore"):
        s = ((hi - lo) / n).astype(np.float32).astype(np.float64)  # codes are computed against the stored scale
    if not np.isfinite(s).all():
        raise QuantizationError(overflow_message(name))
    if np.any((s == 0) & ~const):
        raise QuantizationError(f"{label(name)}: value range too small for a float32 scale; keep this layer in float")
    safe = np.where(s > 0, s, 1.0)
    z = np.clip(np.rint(-lo / safe), 0, n)
    codes = np.clip(np.rint(x2 / safe[:, None]) + z[:, None], 0, n)
    c = x2[:, 0]
    codes = np.where(const[:, None], (c > 0)[:, None], codes)
    z = np.where(const, c < 0, z)
    return finish(codes, np.where(const, np.abs(c), s), z, bits, shape, axis, name)


def xnor_weights(w, bits: int = 1, *, axis=0, name: str = "") -> QuantizedTensor:
    r"""XNOR-Net binary weights (Rastegari et al., arXiv:1603.05279): sign(W) * mean|W| per output channel.

    Codes q = [W >= 0] (sign(0) := +1), zero 1/2, scale 2E; axis=None gives one E per tensor
    (= 1-bit DoReFa). 1-bit only: any other `bits` raises QuantizationError.
    """
    if check_bits(bits, name) != 1:
        raise QuantizationError(f"{label(name)}: xnor is a 1-bit quantizer, got bits={bits}")
    x2, shape = as_rows(w, axis, name)
    const = constant_rows(x2, axis, name)
    codes, s = sign_mean(x2)
    cq, cs = symmetric_constant(x2[:, 0], 1)
    codes = np.where(const[:, None], cq[:, None], codes)
    return finish(codes, np.where(const, cs, s), np.full(s.shape, 0.5), 1, shape, axis, name)
