"""Torch twins of the numpy quantizers, for training: same formulas, straight-through gradients.

The only module of qcompile.quant that imports torch. Each twin reuses the rules and messages of
`core` and mirrors its numpy function operation for operation (float32 inputs, float64 statistics,
round half to even), so tests can assert equal codes and values. `*_codes_t` returns the codes,
scale and zero with the values; `*_weights_t` returns only the fake-quant values.
Gradients: statistics (bins, medians, means, scales) are detached, as the BQ reproduction does;
DoReFa's max|tanh W| keeps its gradient (as in tensorpack); its k = 1 mean E is detached.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from qcompile.errors import ConstantTensorError, QuantizationError
from qcompile.quant import core
from qcompile.quant.baselines import check_percentile, percentile_position
from qcompile.quant.dorefa import activation_scale

F32, F64 = torch.float32, torch.float64


class RoundSTE(torch.autograd.Function):
    """torch.round (half to even) forward; identity backward."""

    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, g):
        return g  # straight-through: d round(x)/dx := 1


def round_ste(x: torch.Tensor) -> torch.Tensor:
    return RoundSTE.apply(x)


def ste(value: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Forward `value` exactly, backward identity to w (value + 0, so no rounding is added)."""
    return value.detach() + (w - w.detach())


class TorchQuantized(NamedTuple):
    values: torch.Tensor  # fake-quant float32 values (in w's dtype), differentiable
    codes: torch.Tensor  # uint8, w's shape
    scale: torch.Tensor  # float32, () or (C, 1, ...)
    zero: torch.Tensor  # float64, scale's shape


def as_quantized(tq: TorchQuantized, bits: int, axis) -> core.QuantizedTensor:
    """The numpy QuantizedTensor of a twin's result (for comparison with the numpy quantizer)."""
    return core.QuantizedTensor(tq.codes.cpu().numpy(), bits, tq.scale.detach().cpu().numpy(),
                                tq.zero.cpu().numpy(), axis)


def _rows(w: torch.Tensor, axis, name: str) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Mirror of core.as_rows: float32 values as float64 rows, differentiable."""
    core.check_axis(axis, w.dim(), w.numel(), name)
    if not torch.isfinite(w).all():
        raise QuantizationError(core.nonfinite_message(name))
    x = w.to(F32)
    if not torch.isfinite(x).all():
        raise QuantizationError(core.overflow_message(name))
    rows = 1 if axis is None else w.shape[0]
    return x.to(F64).reshape(rows, -1), tuple(w.shape)


def _constant_rows(x2: torch.Tensor, axis, name: str) -> torch.Tensor:
    const = x2.amin(dim=1) == x2.amax(dim=1)
    if axis is None and bool(const[0]):
        raise ConstantTensorError(core.constant_message(name, x2.numel(), x2[0, 0].item()))
    return const


def _symmetric_constant(c: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    half = 1 << (bits - 1)
    return torch.where(c >= 0, half, half - 1), 2.0 * c.abs()


def _symmetric_scale(rule: str, x2: torch.Tensor, g2: torch.Tensor, n: int) -> torch.Tensor:
    if rule == "unit":
        return torch.full((x2.shape[0],), 2.0 / n, dtype=F64, device=x2.device)
    smax = 2.0 * x2.abs().amax(dim=1) / n
    if rule == "max":
        return smax
    g2 = g2.to(F64)
    num, den = (x2 * g2).sum(dim=1), (g2 * g2).sum(dim=1)
    return torch.where(num > 0, 2.0 * num / den, smax)


def _scale_shape(shape, axis) -> tuple[int, ...]:
    return () if axis is None else (shape[0],) + (1,) * (len(shape) - 1)


def _scale32(s_rows: torch.Tensor, shape, axis, name: str) -> torch.Tensor:
    s = s_rows.detach().to(F32)
    if not torch.isfinite(s).all():
        raise QuantizationError(core.overflow_message(name))
    return s.reshape(_scale_shape(shape, axis))


def _symmetric(w, x2, codes, s, const, bits, shape, axis, name, codes_ste=None, zero_rows=None) -> TorchQuantized:
    """Apply the constant-channel override, then values = scale * (q - n/2) in float32 like numpy.

    codes_ste, when given, carries the gradient through the codes (DoReFa); otherwise the whole
    quantizer is straight-through (identity gradient).
    """
    n = core.levels(bits)
    cq, cs = _symmetric_constant(x2[:, 0], bits)
    codes = torch.where(const[:, None], cq[:, None], codes)
    scale = _scale32(torch.where(const, cs, s), shape, axis, name)
    zero = torch.full(scale.shape, n / 2, dtype=F64, device=w.device)
    if zero_rows is not None:  # affine grid: a per-row zero point, n/2 again on constant rows
        zero = torch.where(const, torch.full_like(zero_rows, n / 2), zero_rows).to(F64).reshape(scale.shape)
    codes = codes.reshape(shape)
    values = scale * (codes.to(F64) - zero).to(F32)
    if codes_ste is None:
        out = ste(values, w)
    else:
        live = scale * (codes_ste.reshape(shape) - zero).to(F32)
        out = torch.where(const.reshape(scale.shape), ste(values, w), live)
    return TorchQuantized(out.to(w.dtype), codes.to(torch.uint8), scale, zero)


def _exact_bins(x2: torch.Tensor, bits: int) -> torch.Tensor:
    """Twin of balanced.exact_bins: mid percentile rank of each run of equal values."""
    rows, m = x2.shape
    s, order = torch.sort(x2, dim=1, stable=True)
    idx = torch.arange(m, device=x2.device).expand(rows, m)
    start = torch.ones(rows, m, dtype=torch.bool, device=x2.device)
    start[:, 1:] = s[:, 1:] != s[:, :-1]
    end = torch.ones_like(start)
    end[:, :-1] = start[:, 1:]
    lo = torch.cummax(torch.where(start, idx, 0), dim=1).values
    hi = torch.cummin(torch.where(end, idx, m).flip(1), dim=1).values.flip(1)
    j_sorted = ((lo + hi) << bits) // (2 * m)
    return torch.empty_like(j_sorted).scatter_(1, order, j_sorted)


def _mean_bins(x2: torch.Tensor, bits: int) -> torch.Tensor:
    """Twin of balanced.mean_bins: recursive mean split with a growing group id."""
    rows, m = x2.shape
    flat = x2.reshape(-1)
    row = torch.arange(rows, device=x2.device).repeat_interleave(m)
    gid = torch.zeros_like(row)
    for level in range(bits):
        groups = rows << level
        key = (row << level) + gid
        count = torch.bincount(key, minlength=groups)
        t = torch.zeros(groups, dtype=F64, device=x2.device).index_add_(0, key, flat) / count.clamp_min(1)
        gid = 2 * gid + (flat >= t[key]).long()
    return gid.reshape(rows, m)


def balanced_codes_t(w, bits, method="exact", axis=None, scale="lsq", *, name="") -> TorchQuantized:
    """Twin of balanced.balanced_weights; bins and scale detached, identity gradient.

    The paper's gradient rule is unconfirmed (papers.md §2.2); chaining through the leaf affine maps, as
    the BQ reproduction does, scales the gradient by 1/(leaf width), which blows up on narrow or
    single-valued leaves, so the whole bin map is treated as one rounding: d q/d W := 1.
    """
    bits = core.check_bits(bits, name)
    core.check_choice(method, core.BALANCED_METHODS, "balanced method")
    core.check_choice(scale, core.BALANCED_SCALES, "balanced scale rule")
    x2, shape = _rows(w, axis, name)
    x2 = x2.detach()
    const = _constant_rows(x2, axis, name)
    n = core.levels(bits)
    codes = _exact_bins(x2, bits) if method == "exact" else _mean_bins(x2, bits)
    if scale == "affine":
        s, z = _affine_fit(x2, codes, n)
        return _symmetric(w, x2, codes, s, const, bits, shape, axis, name, zero_rows=z)
    s = _symmetric_scale(scale, x2, 2 * codes - n, n)
    return _symmetric(w, x2, codes, s, const, bits, shape, axis, name)


def _affine_fit(x2: torch.Tensor, codes: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Twin of core.affine_fit (same float64 arithmetic)."""
    q = codes.to(F64)
    qm, wm = q.mean(dim=1, keepdim=True), x2.mean(dim=1, keepdim=True)
    var = ((q - qm) ** 2).sum(dim=1)
    slope = ((q - qm) * (x2 - wm)).sum(dim=1) / torch.where(var > 0, var, torch.ones_like(var))
    ok = (var > 0) & (slope > 0)
    safe = torch.where(ok, slope, torch.ones_like(slope))
    zero2 = torch.clamp(torch.round(2 * (qm[:, 0] - wm[:, 0] / safe)), -n, 3 * n)
    d = q - zero2[:, None] / 2
    dd = (d * d).sum(dim=1)
    scale = (d * x2).sum(dim=1) / torch.where(dd > 0, dd, torch.ones_like(dd))
    ok &= scale > 0
    sym = _symmetric_scale("lsq", x2, 2 * codes - n, n)
    return torch.where(ok, scale, sym), torch.where(ok, zero2 / 2, torch.full_like(zero2, n / 2))


def _sign_mean(x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return (x2 >= 0).long(), 2.0 * x2.abs().mean(dim=1)  # sign(0) := +1; E detached by the caller


def dorefa_codes_t(w, bits, axis=None, scale="max", spread="max", *, name="") -> TorchQuantized:
    """Twin of dorefa.dorefa_weights: k >= 2 round_ste through tanh and max|tanh W| (not detached,
    as tensorpack), scale S detached; k = 1 straight-through with E detached."""
    bits = core.check_bits(bits, name)
    core.check_choice(scale, core.DOREFA_SCALES, "dorefa scale rule")
    x2, shape = _rows(w, axis, name)
    const = _constant_rows(x2.detach(), axis, name)
    n = core.levels(bits)
    if bits == 1:
        codes, s = _sign_mean(x2.detach())
        return _symmetric(w, x2.detach(), codes, s, const, bits, shape, axis, name)
    t = torch.tanh(x2)
    if spread == "max":
        m = t.abs().amax(dim=1, keepdim=True)
        u = t / (2 * torch.where(m > 0, m, torch.ones_like(m))) + 0.5
        q = round_ste(n * u.clamp(0.0, 1.0))
    else:  # the RNN paper's codes: the mean is a constant for the gradient and the clip passes it through
        m = (2.5 * t.detach().abs().mean(dim=1, keepdim=True))
        v = n * (t / torch.where(m > 0, m, torch.ones_like(m)) + 0.5)
        q = round_ste(v + (v.clamp(0.0, float(n)) - v).detach())
    codes = q.detach().long()
    s = _symmetric_scale(scale, x2.detach(), 2 * codes - n, n)
    return _symmetric(w, x2.detach(), codes, s, const, bits, shape, axis, name, codes_ste=q)


def _row_percentile(x2: torch.Tensor, p: float) -> torch.Tensor:
    s = torch.sort(x2, dim=1).values
    i, i1, f = percentile_position(s.shape[1], p)
    return s[:, i] + f * (s[:, i1] - s[:, i])


def uniform_codes_t(w, bits, axis=None, percentile=None, *, name="") -> TorchQuantized:
    """Twin of baselines.uniform_weights: round_ste inside [lo, hi] (identity), zero gradient where
    clipped; scale and zero point detached."""
    bits = core.check_bits(bits, name)
    check_percentile(percentile, name)
    x2, shape = _rows(w, axis, name)
    x = x2.detach()
    const = _constant_rows(x, axis, name)
    n = core.levels(bits)
    lo, hi = x.amin(dim=1), x.amax(dim=1)
    if percentile is not None:
        plo, phi = _row_percentile(x, percentile), _row_percentile(x, 100 - percentile)
        keep = plo.clamp_max(0) < phi.clamp_min(0)
        lo, hi = torch.where(keep, plo, lo), torch.where(keep, phi, hi)
    lo, hi = lo.clamp_max(0.0), hi.clamp_min(0.0)
    s = ((hi - lo) / n).to(F32).to(F64)
    if not torch.isfinite(s).all():
        raise QuantizationError(core.overflow_message(name))
    if bool(((s == 0) & ~const).any()):
        raise QuantizationError(f"{core.label(name)}: value range too small for a float32 scale; "
                                "keep this layer in float")
    safe = torch.where(s > 0, s, torch.ones_like(s))
    z = torch.round(-lo / safe).clamp(0, n)
    q = (round_ste(x2 / safe[:, None]) + z[:, None]).clamp(0, n)
    c = x[:, 0]
    codes = torch.where(const[:, None], (c > 0)[:, None].to(F64), q.detach())
    z = torch.where(const, (c < 0).to(F64), z)
    scale = _scale32(torch.where(const, c.abs(), s), shape, axis, name)
    zero = z.reshape(scale.shape)
    codes = codes.reshape(shape)
    live = scale * (q.reshape(shape) - zero).to(F32)
    values = ste(scale * (codes - zero).to(F32), w)
    out = torch.where(const.reshape(scale.shape), values, live)
    return TorchQuantized(out.to(w.dtype), codes.to(torch.uint8), scale, zero)


def xnor_codes_t(w, bits=1, axis=0, *, name="") -> TorchQuantized:
    """Twin of baselines.xnor_weights: straight-through sign, per-channel mean|W| detached."""
    if core.check_bits(bits, name) != 1:
        raise QuantizationError(f"{core.label(name)}: xnor is a 1-bit quantizer, got bits={bits}")
    x2, shape = _rows(w, axis, name)
    x = x2.detach()
    const = _constant_rows(x, axis, name)
    codes, s = _sign_mean(x)
    return _symmetric(w, x, codes, s, const, 1, shape, axis, name)


def balanced_weights_t(w, bits, method="exact", axis=None, scale="lsq", *, name=""):
    return balanced_codes_t(w, bits, method, axis, scale, name=name).values


def dorefa_weights_t(w, bits, axis=None, scale="max", spread="max", *, name=""):
    return dorefa_codes_t(w, bits, axis, scale, spread, name=name).values


def uniform_weights_t(w, bits, axis=None, percentile=None, *, name=""):
    return uniform_codes_t(w, bits, axis, percentile, name=name).values


def xnor_weights_t(w, bits=1, axis=0, *, name=""):
    return xnor_codes_t(w, bits, axis, name=name).values


def dorefa_activations_t(x: torch.Tensor, bits: int, clip: float = 1.0) -> torch.Tensor:
    """Twin of dorefa.dorefa_activations: clamp to [0, clip] (zero gradient outside), then
    round_ste(x / s) * s with the same float32 step s = float32(clip/n) as QuantizeLinear."""
    s = torch.tensor(activation_scale(bits, clip, "activations"), dtype=x.dtype, device=x.device)
    return round_ste(x.clamp(0.0, clip) / s) * s


def quantize_gradient(dr: torch.Tensor, bits: int, generator: torch.Generator | None = None) -> torch.Tensor:
    r"""f_g^k(dr) = 2s [quantize_k(dr/(2s) + 1/2 + N(k)) - 1/2] (DoReFa §2.5; papers.md §1.1).

    s = max|dr| over every axis but the batch axis 0 (one scale per sample); N(k) = U(-1/2, 1/2)/n is
    one-LSB dither, fresh per element, which makes the rounding stochastic and E[f_g(dr)] = dr.
    A sample with s = 0 stays 0. Clipping to [0, 1] as tensorpack does; it never changes the code.
    """
    n = core.levels(core.check_bits(bits))
    a = dr.abs()
    s = a.amax(dim=tuple(range(1, dr.dim())), keepdim=True) if dr.dim() > 1 else a
    safe = torch.where(s > 0, s, torch.ones_like(s))
    noise = (torch.rand(dr.shape, generator=generator, dtype=dr.dtype, device=dr.device) - 0.5) / n
    u = (dr / (2 * safe) + 0.5 + noise).clamp(0.0, 1.0)
    return 2 * s * (torch.round(n * u) / n - 0.5)


class DoReFaGradQuant(torch.autograd.Function):
    """Identity forward; the backward pass quantizes the incoming gradient with f_g^k."""

    @staticmethod
    def forward(ctx, x, bits, generator=None):
        ctx.bits, ctx.generator = bits, generator
        return x.view_as(x)

    @staticmethod
    def backward(ctx, dr):
        return quantize_gradient(dr, ctx.bits, ctx.generator), None, None


def dorefa_gradients(x: torch.Tensor, bits: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Place after a conv/FC output: forward identity, gradient quantized to `bits` (tensorpack's fg)."""
    core.check_bits(bits)
    return DoReFaGradQuant.apply(x, bits, generator)


__all__ = [
    "DoReFaGradQuant", "RoundSTE", "TorchQuantized", "as_quantized", "balanced_codes_t", "balanced_weights_t",
    "dorefa_activations_t", "dorefa_codes_t", "dorefa_gradients", "dorefa_weights_t", "quantize_gradient",
    "round_ste", "ste", "uniform_codes_t", "uniform_weights_t", "xnor_codes_t", "xnor_weights_t",
]
