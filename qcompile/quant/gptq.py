"""GPTQ-style weight rounding on a fixed grid (Frantar et al. 2022), numpy only.

Rounding each weight to its nearest level minimises the weight error, not the layer's output error. GPTQ quantizes
the input columns one at a time and pushes each column's rounding error onto the columns not yet quantized, weighted
by the inverse of the input second moment H = E[x x^T] from calibration, which minimises ||W X - W_q X||^2 greedily.
Why GPTQ rather than AdaRound: it is closed-form (one Cholesky factor, one pass over the columns), seconds per layer on
a CPU, where AdaRound runs thousands of optimisation steps per layer.

The grid stays the quantizer's own (per-channel scale and zero point), so the codes, the integer-exact fake-quant
form and the bit kernels are unchanged; only which level each weight takes changes.
"""

from __future__ import annotations

import numpy as np

from qcompile.quant.core import QuantizedTensor, levels


def second_moment(x_rows: np.ndarray) -> np.ndarray:
    """H = X^T X / M from the layer's input rows [M, K] (float64)."""
    x = np.asarray(x_rows, np.float64)
    return x.T @ x / max(len(x), 1)


def gptq_round(w_nk: np.ndarray, qt: QuantizedTensor, h: np.ndarray, damp: float = 0.01) -> QuantizedTensor:
    """Codes for w_nk [N, K] on qt's grid (value = scale * (q - zero) per output row) chosen by GPTQ with input
    second moment h [K, K]. Columns the data never excites (zero diagonal) keep their nearest rounding."""
    w = np.asarray(w_nk, np.float64).reshape(w_nk.shape[0], -1).copy()
    n_out, k = w.shape
    if h.shape != (k, k):
        raise ValueError(f"second moment is {h.shape}, the weights have {k} inputs")
    n = levels(qt.bits)
    scale = np.broadcast_to(np.asarray(qt.scale, np.float64).reshape(-1), (n_out,)).copy()
    zero = np.broadcast_to(np.asarray(qt.zero, np.float64).reshape(-1), (n_out,))
    live = scale > 0
    safe = np.where(live, scale, 1.0)
    h = np.array(h, np.float64)
    dead = np.diag(h) <= 0
    h[dead, dead] = 1.0
    h += damp * np.mean(np.diag(h)) * np.eye(k)
    # upper Cholesky factor of H^-1: row j holds the error propagation weights of column j onto columns > j
    hinv = np.linalg.cholesky(np.linalg.inv(h)).T
    codes = np.empty((n_out, k), np.int64)
    for j in range(k):
        q = np.clip(np.rint(w[:, j] / safe + zero), 0, n)
        codes[:, j] = q
        err = np.where(live, (w[:, j] - scale * (q - zero)) / hinv[j, j], 0.0)
        w[:, j + 1:] -= np.outer(err, hinv[j, j + 1:])
    const = ~live  # a constant channel keeps the quantizer's own exact encoding
    codes[const] = qt.codes.reshape(n_out, -1)[const]
    return QuantizedTensor(codes.reshape(qt.codes.shape).astype(np.uint8), qt.bits, qt.scale, qt.zero, qt.axis)
