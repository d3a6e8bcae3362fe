"""The numpy integer reference of every fused op in domain ``ai.qcompile`` (docs/ops.md).

Every target is tested bit-exact against these functions, so they are written to be obviously correct rather
than fast: int64 arithmetic inside, int32 out, no bit tricks except in :func:`bitplane_dot`, which exists to
demonstrate the identity the kernels rely on.

The integer contract:

- activations are unsigned codes ``p`` in ``[0, 2^bits_a - 1]`` (value ``beta * p``; convolution padding is code 0);
- weights are codes ``q`` in ``[0, 2^bits_w - 1]`` with a per-output-channel ``wzero2`` (twice the zero point);
  the weight's integer value is ``v = 2*q - wzero2`` (the real weight is ``alpha/2 * v``);
- ``acc[m, n] = sum_k (2*q[n, k] - wzero2[n]) * p[m, k] = 2*sum_k q*p - wzero2[n]*sum_k p`` (int32).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = [
    "weight_values",
    "bit_gemm",
    "bit_conv",
    "bit_gemm_xor",
    "bit_conv_xor",
    "bitplane_dot",
    "xor_dot",
    "epilogue_float",
    "epilogue_threshold",
    "conv_output_shape",
    "max_pool_codes",
]


def _as_codes(x: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(x)
    if x.dtype.kind not in "ui" or (x.size and x.min() < 0):
        raise ValueError(f"{name}: expected non-negative integer codes, got dtype {x.dtype}")
    return x.astype(np.int64)


def weight_values(w: np.ndarray, wzero2: np.ndarray) -> np.ndarray:
    """Integer weight values ``v = 2*q - wzero2[n]`` (int64), ``n`` along axis 0 of ``w``."""
    q = _as_codes(w, "w")
    z = np.asarray(wzero2, dtype=np.int64).reshape((-1,) + (1,) * (q.ndim - 1))
    if z.shape[0] != q.shape[0]:
        raise ValueError(f"wzero2 has {z.shape[0]} entries for {q.shape[0]} output channels")
    return 2 * q - z


def _to_int32(acc: np.ndarray) -> np.ndarray:
    if acc.size and (acc.max() > np.iinfo(np.int32).max or acc.min() < np.iinfo(np.int32).min):
        raise OverflowError("accumulator exceeds int32")
    return acc.astype(np.int32)


def bit_gemm(x: np.ndarray, w: np.ndarray, wzero2: np.ndarray) -> np.ndarray:
    """BitGemm: ``acc[m, n] = sum_k (2*w[n, k] - wzero2[n]) * x[m, k]``.

    x: activation codes [M, K]; w: weight codes [N, K]; wzero2: int [N]. Returns int32 [M, N].
    """
    p = _as_codes(x, "x")
    v = weight_values(w, wzero2)
    if p.ndim != 2 or v.ndim != 2 or p.shape[1] != v.shape[1]:
        raise ValueError(f"bit_gemm: shapes {p.shape} x {v.shape}^T do not match")
    return _to_int32(p @ v.T)


def conv_output_shape(
    hw: tuple[int, int],
    kernel: tuple[int, int],
    strides: Sequence[int] = (1, 1),
    pads: Sequence[int] = (0, 0, 0, 0),
    dilations: Sequence[int] = (1, 1),
) -> tuple[int, int]:
    """(Ho, Wo) of an ONNX Conv; pads are (top, left, bottom, right)."""
    (h, w), (kh, kw) = hw, kernel
    ho = (h + pads[0] + pads[2] - dilations[0] * (kh - 1) - 1) // strides[0] + 1
    wo = (w + pads[1] + pads[3] - dilations[1] * (kw - 1) - 1) // strides[1] + 1
    if ho < 1 or wo < 1:
        raise ValueError(f"conv output would be empty: input {hw}, kernel {kernel}, pads {tuple(pads)}")
    return ho, wo


def _conv(
    p: np.ndarray,
    v: np.ndarray,
    strides: Sequence[int],
    pads: Sequence[int],
    dilations: Sequence[int],
    group: int,
) -> np.ndarray:
    """Plain ONNX Conv on int64 arrays: a loop over kernel taps, each a small matrix product."""
    b, c, h, w = p.shape
    n, cg, kh, kw = v.shape
    if c != cg * group or n % group:
        raise ValueError(f"conv: {c} input channels, weight {v.shape}, group {group} do not match")
    ho, wo = conv_output_shape((h, w), (kh, kw), strides, pads, dilations)
    sh, sw = strides
    dh, dw = dilations
    xp = np.zeros((b, c, h + pads[0] + pads[2], w + pads[1] + pads[3]), dtype=np.int64)
    xp[:, :, pads[0] : pads[0] + h, pads[1] : pads[1] + w] = p  # zero padding = code 0
    out = np.zeros((b, n, ho, wo), dtype=np.int64)
    ng = n // group
    for g in range(group):
        xs = xp[:, g * cg : (g + 1) * cg]
        vs = v[g * ng : (g + 1) * ng]
        for ky in range(kh):
            for kx in range(kw):
                y0, x0 = ky * dh, kx * dw
                patch = xs[:, :, y0 : y0 + sh * (ho - 1) + 1 : sh, x0 : x0 + sw * (wo - 1) + 1 : sw]  # [B,Cg,Ho,Wo]
                out[:, g * ng : (g + 1) * ng] += np.einsum("bchw,nc->bnhw", patch, vs[:, :, ky, kx])
    return out


def bit_conv(
    x: np.ndarray,
    w: np.ndarray,
    wzero2: np.ndarray,
    strides: Sequence[int] = (1, 1),
    pads: Sequence[int] = (0, 0, 0, 0),
    dilations: Sequence[int] = (1, 1),
    group: int = 1,
) -> np.ndarray:
    """BitConv: ONNX Conv semantics over integer values, zero (code 0) padding.

    x: activation codes NCHW [B, C, H, W]; w: weight codes [N, C/group, kh, kw]; wzero2: int [N];
    pads: (top, left, bottom, right). Returns int32 [B, N, Ho, Wo].
    """
    p = _as_codes(x, "x")
    if p.ndim != 4:
        raise ValueError(f"bit_conv: x must be NCHW, got shape {p.shape}")
    return _to_int32(_conv(p, weight_values(w, wzero2), strides, pads, dilations, group))


def _bipolar(a: np.ndarray, name: str) -> np.ndarray:
    b = _as_codes(a, name)
    if b.size and b.max() > 1:
        raise ValueError(f"{name}: xor mode needs 1-bit codes (0 -> -1, 1 -> +1)")
    return 2 * b - 1


def bit_gemm_xor(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Bipolar BitGemm: both sides 1-bit with bit 0 -> -1, bit 1 -> +1. ``acc = sum_k a*w`` (int32 [M, N]).

    Kernels compute it as ``K - 2*popcount(a XOR w)``; this reference uses the values directly.
    """
    return _to_int32(_bipolar(x, "x") @ _bipolar(w, "w").T)


def bit_conv_xor(
    x: np.ndarray,
    w: np.ndarray,
    strides: Sequence[int] = (1, 1),
    pads: Sequence[int] = (0, 0, 0, 0),
    dilations: Sequence[int] = (1, 1),
    group: int = 1,
) -> np.ndarray:
    """Bipolar BitConv. Padding contributes 0 (a padded tap is neither +1 nor -1), as in a float conv of ±1 maps.

    A kernel computes each window as ``valid_taps*C/group - 2*popcount(a XOR w)`` over the in-bounds taps.
    """
    p = _bipolar(x, "x")
    return _to_int32(_conv(p, _bipolar(w, "w"), strides, pads, dilations, group))


def _planes(codes: np.ndarray, bits: int) -> list[np.ndarray]:
    return [(codes >> i) & 1 for i in range(bits)]


def bitplane_dot(p: np.ndarray, q: np.ndarray, bits_p: int, bits_q: int) -> int:
    """``sum_k p[k]*q[k]`` through the bit-plane identity (papers.md §0):

    ``p.q = sum_{i<bits_p, j<bits_q} 2^(i+j) * popcount(AND(plane_i(p), plane_j(q)))``.
    """
    pc, qc = _as_codes(p, "p").ravel(), _as_codes(q, "q").ravel()
    if pc.size and (pc.max() >= 1 << bits_p or qc.max() >= 1 << bits_q):
        raise ValueError("codes exceed their bit width")
    total = 0
    for i, pi in enumerate(_planes(pc, bits_p)):
        for j, qj in enumerate(_planes(qc, bits_q)):
            total += (1 << (i + j)) * int(np.count_nonzero(pi & qj))
    return total


def xor_dot(a: np.ndarray, w: np.ndarray) -> int:
    """``sum_k (2a-1)(2w-1)`` for bits a, w via ``K - 2*popcount(a XOR w)``."""
    ab, wb = _as_codes(a, "a").ravel(), _as_codes(w, "w").ravel()
    return int(ab.size - 2 * np.count_nonzero(ab ^ wb))


def _channel_axis(arr: np.ndarray, n: int) -> tuple[int, ...]:
    if arr.ndim < 2 or arr.shape[1] != n:
        raise ValueError(f"epilogue: expected channels on axis 1 with {n} entries, got shape {arr.shape}")
    return (1, n) + (1,) * (arr.ndim - 2)


def epilogue_float(acc: np.ndarray, mult: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """``y = float32(acc) * mult[n] + bias[n]`` as a float32 multiply then a separate float32 add (no FMA)."""
    m = np.asarray(mult, dtype=np.float32)
    b = np.asarray(bias, dtype=np.float32)
    shape = _channel_axis(acc, m.shape[0])
    return (np.asarray(acc).astype(np.float32) * m.reshape(shape)) + b.reshape(shape)


def epilogue_threshold(acc: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Output code = number of j with ``acc >= T[n, j]`` (uint8); T is int32 [N, L], ascending in j."""
    t = np.asarray(thresholds, dtype=np.int64)
    if t.ndim != 2:
        raise ValueError(f"thresholds must be [N, L], got shape {t.shape}")
    a = np.asarray(acc, dtype=np.int64)
    shape = _channel_axis(a, t.shape[0])
    count = np.zeros(a.shape, dtype=np.int64)
    for j in range(t.shape[1]):
        count += a >= t[:, j].reshape(shape)
    return count.astype(np.uint8)


def max_pool_codes(
    x: np.ndarray,
    kernel: Sequence[int],
    strides: Sequence[int] | None = None,
    dilations: Sequence[int] = (1, 1),
) -> np.ndarray:
    """MaxPoolCodes: ONNX MaxPool (2-D, no padding, floor mode) on uint8 codes NCHW [B, C, H, W] -> uint8.

    Max-pooling commutes with a monotone quantizer, so pooling the codes equals quantizing the pooled floats.
    """
    p = np.asarray(x)
    if p.dtype != np.uint8 or p.ndim != 4:
        raise ValueError(f"max_pool_codes: x must be uint8 NCHW, got {p.dtype} {p.shape}")
    kh, kw = (int(k) for k in kernel)
    sh, sw = (int(s) for s in (strides if strides is not None else (1, 1)))
    dh, dw = (int(d) for d in dilations)
    ho, wo = conv_output_shape(p.shape[2:], (kh, kw), (sh, sw), (0, 0, 0, 0), (dh, dw))
    out = np.zeros(p.shape[:2] + (ho, wo), dtype=np.uint8)
    for ky in range(kh):
        for kx in range(kw):
            y0, x0 = ky * dh, kx * dw
            out = np.maximum(out, p[:, :, y0 : y0 + sh * (ho - 1) + 1 : sh, x0 : x0 + sw * (wo - 1) + 1 : sw])
    return out
