"""Shared representation, rules and checks of the quantizer library (numpy only, no torch).

Every rule the numpy quantizers and their torch twins (`torch_ops`) must agree on lives here once:
bit range, scale rules, tie handling, the exact constant-channel encoding and every error message.

Rounding: all rounding is round-half-to-even (`np.rint`, `torch.round`, onnxruntime QuantizeLinear),
so compile-time codes, training-time fake quantization and the deployed kernels agree bit-exactly.
TF's `tf.round` (used by the DoReFa and bit-rnn code, papers.md §0) rounds half away from zero; on the
nonnegative inputs quantize_k sees the two differ only on exact ties n*r = m + 1/2.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qcompile.errors import ConfigError, ConstantTensorError, QuantizationError

MIN_BITS, MAX_BITS = 1, 8

#: Scale rules for symmetric grids, value = s * g with g = (2q - n)/n in [-1, 1].
SCALE_RULES = {
    "lsq": "least squares s = <W,g>/<g,g> over the tensor or channel (post-training default)",
    "max": "s = max|W|: the grid [-s, s] spans the weights (the papers' default)",
    "unit": "s = 1: DoReFa's own training-time grid [-1, 1]",
}

BALANCED_SCALES = ("lsq", "max", "affine")
DOREFA_SCALES = tuple(SCALE_RULES)

#: Ties in balanced bins: all copies of a value share the bin of their mid percentile rank
#: (lo + hi)/2, so the map is monotone, deterministic and independent of the sort order.
BALANCED_METHODS = {
    "exact": "recursive median split = leaf index by percentile rank (one sort)",
    "mean": "recursive mean split (k streaming passes; the cheap approximation)",
}


def levels(bits: int) -> int:
    """n = 2**bits - 1: the number of steps of a k-bit grid (its top code)."""
    return (1 << bits) - 1


def label(name: str) -> str:
    return name or "weights"


def nonfinite_message(name: str) -> str:
    return f"{label(name)}: contains NaN/Inf values; clean the weights or keep this layer in float"


def constant_message(name: str, count: int, value: float) -> str:
    return f"{label(name)}: all {count} weights equal {value:.9g}; nothing to scale, keep this layer in float"


def overflow_message(name: str) -> str:
    return f"{label(name)}: values or scale exceed the float32 range; keep this layer in float"


def check_bits(bits: int, name: str = "") -> int:
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not MIN_BITS <= bits <= MAX_BITS:
        raise QuantizationError(f"{label(name)}: bits must be an integer in {MIN_BITS}..{MAX_BITS}, got {bits!r}")
    return int(bits)


def check_choice(value: str, choices, what: str) -> str:
    """Return value if it is one of choices, else ConfigError listing them."""
    if value not in choices:
        raise ConfigError(f"unknown {what} {value!r}; valid: {', '.join(choices)}")
    return value


def check_axis(axis, ndim: int, size: int, name: str) -> None:
    """Validate axis (None = per tensor, 0 = per output channel) against the tensor's rank and size."""
    if axis is not None and (isinstance(axis, bool) or axis != 0):
        raise QuantizationError(f"{label(name)}: axis must be None (per tensor) or 0 (per channel), got {axis!r}")
    if size == 0:
        raise QuantizationError(f"{label(name)}: empty tensor; nothing to quantize")
    if axis == 0 and ndim == 0:
        raise QuantizationError(f"{label(name)}: axis=0 needs at least one dimension")


def check_finite(w, name: str = "") -> None:
    """Raise QuantizationError naming the tensor if it holds NaN or Inf."""
    a = np.asarray(w)
    if a.dtype.kind in "fc" and not np.isfinite(a).all():
        raise QuantizationError(nonfinite_message(name))


def as_rows(w, axis, name: str) -> tuple[np.ndarray, tuple[int, ...]]:
    """Validate `w`; return its float32 values as float64 rows, (1, N) per tensor or (C, N/C) per channel.

    Weights are deployed as float32, so both twins start from the float32 values; the statistics are
    then computed in float64 so that rounding noise never decides a code.
    """
    a = np.asarray(w)
    if a.dtype.kind not in "fiu":
        raise QuantizationError(f"{label(name)}: dtype {a.dtype} is not a real number type")
    check_axis(axis, a.ndim, a.size, name)
    check_finite(a, name)
    with np.errstate(over="ignore"):
        x = a.astype(np.float32)
    if not np.isfinite(x).all():
        raise QuantizationError(overflow_message(name))
    rows = 1 if axis is None else a.shape[0]
    return x.astype(np.float64).reshape(rows, -1), a.shape


def constant_rows(x2: np.ndarray, axis, name: str) -> np.ndarray:
    """Mask of rows whose values are all equal; per tensor that is an error (nothing to scale)."""
    const = x2.min(axis=1) == x2.max(axis=1)
    if axis is None and const[0]:
        raise ConstantTensorError(constant_message(name, x2.size, x2[0, 0]))
    return const


def symmetric_constant(c: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Codes and scale that dequantize a constant channel c exactly on a symmetric grid.

    q - n/2 = +-1/2 (q = 2**(bits-1) or one below) and scale = 2|c|: a power-of-two multiple, so
    scale * (q - n/2) == c with no rounding (the top code would need scale = 2c/n, which rounds).
    c = 0 gives scale 0. Used when one channel of a per-channel tensor is constant.
    """
    half = 1 << (bits - 1)
    return np.where(c >= 0, half, half - 1), 2.0 * np.abs(c)


def symmetric_scale(rule: str, x2: np.ndarray, g2: np.ndarray, n: int) -> np.ndarray:
    """Row scales of a symmetric grid, value = scale * (q - n/2) = scale * g2 / 2 with g2 = 2q - n.

    max: s = max|W| -> scale = 2s/n. unit: s = 1. lsq: minimise ||W - scale*g2/2||^2 per row, giving
    scale = 2<W,g2>/<g2,g2> (g2 is odd, so <g2,g2> >= 1). A row whose <W,g2> <= 0 (possible only when
    the weights sit far from zero, e.g. all positive) falls back to max: a scale must be positive.
    """
    if rule == "unit":
        return np.full(x2.shape[0], 2.0 / n)
    smax = 2.0 * np.abs(x2).max(axis=1) / n
    if rule == "max":
        return smax
    num = (x2 * g2).sum(axis=1)
    den = (g2 * g2).sum(axis=1)
    return np.where(num > 0, 2.0 * num / den, smax)


def affine_fit(x2: np.ndarray, codes2: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, least squares W ~ scale * (q - zero) with 2*zero an integer (the kernels need wzero2 in Z).

    Why: balanced bins are equally populated around the row's *median*, so for post-training quantization the
    grid centre belongs there, not at 0: fit the slope and offset of the uniform grid to the bin indices, round
    the offset to a half step, refit the slope. The levels stay uniformly spaced (bit kernels apply unchanged);
    2*zero is clamped to [-n, 3n] so the stored integers 2q - 2*zero fit in int8 up to 5 bits. A row whose
    fit is degenerate (one code, or a non-positive slope) falls back to the symmetric lsq scale with zero n/2.
    """
    q = codes2.astype(np.float64)
    qm, wm = q.mean(axis=1, keepdims=True), x2.mean(axis=1, keepdims=True)
    var = ((q - qm) ** 2).sum(axis=1)
    slope = ((q - qm) * (x2 - wm)).sum(axis=1) / np.where(var > 0, var, 1.0)
    ok = (var > 0) & (slope > 0)
    safe = np.where(ok, slope, 1.0)
    zero2 = np.clip(np.rint(2 * (qm[:, 0] - wm[:, 0] / safe)), -n, 3 * n)
    d = q - zero2[:, None] / 2
    dd = (d * d).sum(axis=1)
    scale = (d * x2).sum(axis=1) / np.where(dd > 0, dd, 1.0)
    ok &= scale > 0
    sym = symmetric_scale("lsq", x2, 2 * codes2 - n, n)
    return np.where(ok, scale, sym), np.where(ok, zero2 / 2, n / 2)


def finish(codes2, scale_rows, zero_rows, bits: int, shape, axis, name: str) -> QuantizedTensor:
    """Assemble the QuantizedTensor: codes in the input shape, scale/zero (C,1,...) or ()."""
    sshape = () if axis is None else (shape[0],) + (1,) * (len(shape) - 1)
    with np.errstate(over="ignore"):
        scale = np.asarray(scale_rows, np.float64).astype(np.float32)
    if not np.isfinite(scale).all():
        raise QuantizationError(overflow_message(name))
    zero = np.asarray(zero_rows, np.float64).reshape(sshape)
    return QuantizedTensor(np.asarray(codes2).reshape(shape).astype(np.uint8), bits, scale.reshape(sshape), zero, axis)


def quantize_k_codes(r, k: int) -> np.ndarray:
    """Integer codes of the uniform k-bit quantizer on [0, 1]: rint(n*r), n = 2**k - 1 (papers.md §0).

    Round half to even (see the module docstring); r outside [0, 1] saturates to code 0 or n.
    """
    n = levels(check_bits(k))
    return np.rint(n * np.clip(np.asarray(r, np.float64), 0.0, 1.0)).astype(np.uint8)


def quantize_k(r, k: int) -> np.ndarray:
    """quantize_k(r) = round(n*r)/n on [0, 1], n = 2**k - 1 (DoReFa §2.2; papers.md §0). Error <= 1/(2n)."""
    return quantize_k_codes(r, k) / levels(k)


@dataclass(frozen=True, eq=False)
class QuantizedTensor:
    """Integer codes plus the affine map back to float: value = scale * (codes - zero).

    Symmetric grids (balanced, dorefa, xnor) have zero = n/2, n = 2**bits - 1, so values are
    scale/2 * (2q - n) on {-1, -1+2/n, ..., 1} * (scale*n/2); uniform min-max has an integer zero.
    """

    codes: np.ndarray  # uint8, the input's shape, in [0, 2**bits - 1]
    bits: int
    scale: np.ndarray  # float32, () per tensor or (C, 1, ...) per channel
    zero: np.ndarray  # float64, scale's shape; 2*zero is an integer
    axis: int | None  # None = per tensor, 0 = per output channel

    def __post_init__(self):
        if self.codes.dtype != np.uint8 or self.scale.dtype != np.float32 or self.zero.shape != self.scale.shape:
            raise TypeError("QuantizedTensor needs uint8 codes, float32 scale and zero of scale's shape")
        if self.codes.size and int(self.codes.max()) > levels(self.bits):
            raise ValueError(f"codes exceed the {self.bits}-bit range")

    def dequantize(self) -> np.ndarray:
        """float32 scale * (codes - zero); (codes - zero) is a half-integer, exact in float32."""
        return self.scale * (self.codes - self.zero).astype(np.float32)

    @property
    def zero2(self) -> np.ndarray:
        """2*zero exactly, as int32."""
        return np.rint(2.0 * self.zero).astype(np.int32)

    def int_values(self) -> np.ndarray:
        """2*codes - zero2: the small integers a compiler stores (value = scale/2 * int_values).

        int8 when the grid fits (symmetric up to 7 bits, uniform up to 6), else int16; the dtype
        follows from bits and zero, never from the data.
        """
        z2 = self.zero2
        bound = max(int(z2.max()), 2 * levels(self.bits) - int(z2.min()))
        return (2 * self.codes.astype(np.int32) - z2).astype(np.int8 if bound <= 127 else np.int16)

    def levels_used(self) -> int:
        """Number of distinct codes actually used in the whole tensor."""
        return int(np.unique(self.codes).size)
