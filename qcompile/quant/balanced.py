"""Balanced Quantization of weights (Zhou et al., arXiv:1706.07145; papers.md §2.2, Alg. 1-2).

Alg. 2 recursively splits the weights at the median (exact) or the mean (cheap) into 2**k leaves and
maps leaf j affinely onto [j/2**k, (j+1)/2**k]; Alg. 1 then takes W_f = rtz(2**k W_e - 1/2)/n - 1/2.

Why the code is just the leaf index j, so the within-leaf affine map is never materialised: for W in
leaf j, 2**k W_e lies in [j, j+1], so 2**k W_e - 1/2 lies in [j - 1/2, j + 1/2] and rtz (round half
toward zero) gives j on the whole leaf except its lower endpoint, the leaf minimum, where the tie
j - 1/2 rounds to j - 1. That endpoint case is a boundary artefact of the transcription (it moves one
weight per leaf down a level and breaks the equal-count design); we give the whole leaf code j. Skipping
the map also avoids its 0/0 on leaves whose values are all equal.
"""

from __future__ import annotations

import numpy as np

from qcompile.quant.core import (
    affine_fit,
    BALANCED_METHODS,
    BALANCED_SCALES,
    QuantizedTensor,
    as_rows,
    check_bits,
    check_choice,
    constant_rows,
    finish,
    levels,
    symmetric_constant,
    symmetric_scale,
)


def exact_bins(x2: np.ndarray, bits: int) -> np.ndarray:
    """Leaf index by percentile rank per row: j = floor(rank * 2**k / M) (one sort, O(M log M)).

    rank is the mid rank (lo + hi)/2 of a run of equal values, so ties share a bin and the map is
    monotone. With distinct values every bin holds floor or ceil of M / 2**k values, as recursive
    median halving does (they differ only in which half gets an odd middle element).
    """
    rows, m = x2.shape
    order = np.argsort(x2, axis=1, kind="stable")
    s = np.take_along_axis(x2, order, axis=1)
    idx = np.broadcast_to(np.arange(m), (rows, m))
    start = np.ones((rows, m), bool)
    start[:, 1:] = s[:, 1:] != s[:, :-1]
    end = np.ones((rows, m), bool)
    end[:, :-1] = start[:, 1:]
    lo = np.maximum.accumulate(np.where(start, idx, 0), axis=1)
    hi = np.minimum.accumulate(np.where(end, idx, m)[:, ::-1], axis=1)[:, ::-1]
    j_sorted = ((lo + hi) << bits) // (2 * m)  # integer arithmetic: (lo+hi)/2 * 2**k / M, floored
    codes = np.empty_like(j_sorted)
    np.put_along_axis(codes, order, j_sorted, axis=1)
    return codes


def mean_bins(x2: np.ndarray, bits: int) -> np.ndarray:
    """Recursive mean split (Alg. 2 with T = mean): a group id gains one bit per level.

    Each level is one segmented sum/count over keys row*2**level + gid, not 2**level masked passes.
    The float64 sum of float32 values is exact unless a group spans a huge magnitude range, so both
    twins get the same T bit for bit, and an all-equal group gets T = its value and goes up whole.
    """
    rows, m = x2.shape
    flat = x2.ravel()
    row = np.repeat(np.arange(rows), m)
    gid = np.zeros(flat.size, np.int64)
    for level in range(bits):
        groups = rows << level
        key = (row << level) + gid
        count = np.bincount(key, minlength=groups)
        t = np.bincount(key, weights=flat, minlength=groups) / np.maximum(count, 1)  # empty groups: unused
        gid = 2 * gid + (flat >= t[key])
    return gid.reshape(rows, m)


def balanced_weights(w, bits: int, *, method: str = "exact", axis=None, scale: str = "lsq",
                     name: str = "") -> QuantizedTensor:
    r"""k-bit balanced weights: code j = equal-population bin, value = s * (2j - n)/n, n = 2**k - 1.

    method: "exact" (percentile bins) or "mean" (recursive mean split, approximately balanced).
    scale: "lsq" (default, for post-training quantization) s = <W,g>/<g,g>, g = (2j - n)/n, the
    least-squares fit of the grid to the weights; "max" s = max|W|, the paper's default (Alg. 1).
    axis=None: one set of bins and one scale per tensor; axis=0: bins and scale per output channel.
    A constant channel (axis=0) is encoded exactly; a constant tensor raises ConstantTensorError.
    """
    bits = check_bits(bits, name)
    check_choice(method, BALANCED_METHODS, "balanced method")
    check_choice(scale, BALANCED_SCALES, "balanced scale rule")
    x2, shape = as_rows(w, axis, name)
    const = constant_rows(x2, axis, name)
    n = levels(bits)
    codes = exact_bins(x2, bits) if method == "exact" else mean_bins(x2, bits)
    if scale == "affine":
        s, z = affine_fit(x2, codes, n)
    else:
        s, z = symmetric_scale(scale, x2, 2 * codes - n, n), np.full(x2.shape[0], n / 2)
    cq, cs = symmetric_constant(x2[:, 0], bits)
    codes = np.where(const[:, None], cq[:, None], codes)
    return finish(codes, np.where(const, cs, s), np.where(const, n / 2, z), bits, shape, axis, name)
