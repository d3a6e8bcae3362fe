"""Bit-plane packing of activation and weight codes into 64-bit words (numpy; layouts in docs/ops.md).

Conventions shared by every layout here and by the generated C:

- a *plane* ``i`` of an array of codes is ``(codes >> i) & 1``;
- planes are packed along the reduction axis K into little-endian uint64 words: bit ``t`` of word ``w`` is element
  ``64*w + t``; the tail bits of the last word are zero;
- a packed array puts the plane axis first: ``[bits, ..., Kwords]``.

For convolutions the reduction axis is the receptive field in tap-major order: element ``(ky, kx, c)`` of group
``g`` sits at bit ``(ky*kw + kx)*Cg + c`` (``Cg = C/group``), so an "im2col of packed bits" row is a plain
bit-GEMM row and :func:`im2col_bits` + :func:`pack_conv_weights` turn a BitConv into a BitGemm per group.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = [
    "WORD_BITS",
    "n_words",
    "round_up",
    "pack_bits",
    "unpack_bits",
    "pack_planes",
    "unpack_planes",
    "pack_gemm_weights",
    "pack_conv_weights",
    "conv_weight_rows",
    "pack_nhwc",
    "im2col_bits",
    "kernel_weight_layout",
]

WORD_BITS = 64


def n_words(k: int) -> int:
    """Number of 64-bit words holding ``k`` bits."""
    return (k + WORD_BITS - 1) // WORD_BITS


def round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def pack_bits(bits: np.ndarray) -> np.ndarray:
    """Pack 0/1 values along the last axis into little-endian uint64 words: [..., K] -> [..., ceil(K/64)]."""
    b = np.asarray(bits)
    if b.size and (b.min() < 0 or b.max() > 1):
        raise ValueError("pack_bits: values must be 0 or 1")
    k = b.shape[-1]
    padded = np.zeros(b.shape[:-1] + (n_words(k) * WORD_BITS,), dtype=np.uint8)
    padded[..., :k] = b
    packed = np.packbits(padded, axis=-1, bitorder="little")  # byte j holds bits 8j..8j+7, bit 0 first
    return np.ascontiguousarray(packed).view("<u8").astype(np.uint64)


def unpack_bits(words: np.ndarray, k: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: [..., Kwords] uint64 -> [..., k] uint8 of 0/1."""
    w = np.ascontiguousarray(np.asarray(words, dtype=np.uint64)).astype("<u8")
    if w.shape[-1] * WORD_BITS < k:
        raise ValueError(f"unpack_bits: {w.shape[-1]} words hold fewer than {k} bits")
    bits = np.unpackbits(w.view(np.uint8), axis=-1, bitorder="little")
    return bits[..., :k]


def _check_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    c = np.asarray(codes)
    if not 1 <= bits <= 8:
        raise ValueError(f"bit width {bits} outside 1..8")
    if c.dtype.kind not in "ui":
        raise ValueError(f"codes must be integers, got {c.dtype}")
    if c.size and (c.min() < 0 or c.max() >= 1 << bits):
        raise ValueError(f"codes outside [0, {(1 << bits) - 1}] for {bits} bits")
    return c.astype(np.uint8)


def pack_planes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Codes [..., K] -> bit planes [bits, ..., ceil(K/64)] uint64 (plane i = bit i of each code)."""
    c = _check_codes(codes, bits)
    return np.stack([pack_bits((c >> i) & 1) for i in range(bits)])


def unpack_planes(planes: np.ndarray, k: int) -> np.ndarray:
    """Inverse of :func:`pack_planes`: [bits, ..., Kwords] -> codes [..., k] uint8."""
    p = np.asarray(planes)
    out = np.zeros(p.shape[1:-1] + (k,), dtype=np.uint8)
    for i in range(p.shape[0]):
        out |= unpack_bits(p[i], k) << i
    return out


def pack_gemm_weights(w: np.ndarray, bits: int) -> np.ndarray:
    """BitGemm weights: codes [N, K] -> [bits, N, Kwords] uint64."""
    if np.ndim(w) != 2:
        raise ValueError(f"gemm weights must be [N, K], got shape {np.shape(w)}")
    return pack_planes(w, bits)


def conv_weight_rows(w: np.ndarray) -> np.ndarray:
    """Conv weight codes [N, Cg, kh, kw] -> rows [N, kh*kw*Cg] in tap-major order (ky, kx, c)."""
    w = np.asarray(w)
    if w.ndim != 4:
        raise ValueError(f"conv weights must be [N, C/group, kh, kw], got shape {w.shape}")
    return np.ascontiguousarray(w.transpose(0, 2, 3, 1)).reshape(w.shape[0], -1)


def pack_conv_weights(w: np.ndarray, bits: int) -> np.ndarray:
    """BitConv weights: codes [N, Cg, kh, kw] -> [bits, N, ceil(kh*kw*Cg/64)] uint64, bit (ky*kw+kx)*Cg + c."""
    return pack_planes(conv_weight_rows(w), bits)


def pack_nhwc(x: np.ndarray, bits: int, group: int = 1) -> np.ndarray:
    """Activations NCHW codes [B, C, H, W] -> per-pixel channel planes [bits, B, H, W, group, ceil(Cg/64)].

    The layout the C kernels build first (one 64-bit word holds 64 channels of one pixel)."""
    x = _check_codes(x, bits)
    b, c, h, w = x.shape
    if c % group:
        raise ValueError(f"{c} channels do not split into {group} groups")
    nhwc = x.transpose(0, 2, 3, 1).reshape(b, h, w, group, c // group)
    return pack_planes(nhwc, bits)


def im2col_bits(
    x: np.ndarray,
    bits: int,
    kernel: tuple[int, int],
    strides: Sequence[int] = (1, 1),
    pads: Sequence[int] = (0, 0, 0, 0),
    dilations: Sequence[int] = (1, 1),
    group: int = 1,
) -> np.ndarray:
    """An im2col of packed bits: NCHW codes -> [group, bits, B*Ho*Wo, ceil(kh*kw*Cg/64)] uint64.

    Row ``r = (b*Ho + oy)*Wo + ox`` holds the receptive field of output pixel (oy, ox) in tap-major order;
    padded taps are code 0. ``bit_gemm`` of these rows with :func:`pack_conv_weights` rows equals the conv.
    """
    from qcompile.reference import conv_output_shape

    x = _check_codes(x, bits)
    b, c, h, w = x.shape
    kh, kw = kernel
    cg = c // group
    ho, wo = conv_output_shape((h, w), kernel, strides, pads, dilations)
    xp = np.zeros((b, c, h + pads[0] + pads[2], w + pads[1] + pads[3]), dtype=np.uint8)
    xp[:, :, pads[0] : pads[0] + h, pads[1] : pads[1] + w] = x
    taps = []
    for ky in range(kh):
        for kx in range(kw):
            y0, x0 = ky * dilations[0], kx * dilations[1]
            taps.append(xp[:, :, y0 : y0 + strides[0] * (ho - 1) + 1 : strides[0],
                           x0 : x0 + strides[1] * (wo - 1) + 1 : strides[1]])
    cols = np.stack(taps, axis=1)  # [B, T, C, Ho, Wo]
    out = []
    for g in range(group):
        cg_cols = cols[:, :, g * cg : (g + 1) * cg]  # [B, T, Cg, Ho, Wo]
        rows = cg_cols.transpose(0, 3, 4, 1, 2).reshape(b * ho * wo, kh * kw * cg)
        out.append(pack_planes(rows, bits))
    return np.stack(out)


def kernel_weight_layout(planes: np.ndarray, word_multiple: int = 8) -> np.ndarray:
    """The generated C's weight layout: [bits, N, Kw] -> [N, bits, Kwp] with Kwp = Kw rounded up to
    ``word_multiple`` (8 words = one 512-bit vector) and zero padding, so every channel's planes are contiguous."""
    p = np.asarray(planes, dtype=np.uint64)
    bits, n, kw = p.shape
    out = np.zeros((n, bits, round_up(kw, word_multiple)), dtype=np.uint64)
    out[:, :, :kw] = p.transpose(1, 0, 2)
    return out
