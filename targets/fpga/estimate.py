"""Cycle and resource estimates of one matrix-vector-activation unit (MVAU) with PE x SIMD folding.

The unit is the RTL one of ``rtl.py`` (and FINN's): each of ``rows`` input vectors of ``K`` codes is multiplied by an
``N x K`` binary weight matrix, ``PE`` neurons at a time over ``SIMD`` synapses per cycle, so one vector takes
``ceil(N/PE) * ceil(K/SIMD)`` cycles (the first neuron fold reads the stream, later folds re-read the vector buffer).
Resources are Xilinx 7-series/UltraScale primitives (LUT6, FF, BRAM18, DSP48), calibrated against yosys
``synth_xilinx`` of the generated RTL (see docs/fpga.md for the measured points).
"""

from __future__ import annotations

import math

__all__ = ["mvau_cycles", "mvau_resources", "PIPELINE_LATENCY", "acc_bits"]

# Cycles from the last input beat of a frame to its last output beat with the stream always ready:
# issue register (weight ROM read), popcount + accumulate, threshold compare into the output register.
PIPELINE_LATENCY = 3
# A weight memory below this many bits stays in LUTs (distributed ROM); above it, BRAM18 (18 Kib, 36 bits wide).
_LUTROM_MAX_BITS = 16 * 1024
_BRAM18_BITS, _BRAM18_MAX_WIDTH = 18 * 1024, 36


def _folds(K: int, N: int, pe: int, simd: int) -> tuple[int, int]:
    if min(K, N, pe, simd) < 1:
        raise ValueError(f"MVAU needs K, N, PE, SIMD >= 1, got K={K} N={N} PE={pe} SIMD={simd}")
    return math.ceil(N / pe), math.ceil(K / simd)


def acc_bits(K: int, bits_a: int) -> int:
    """Signed accumulator width that holds any ``sum_k v*p`` with ``|v| <= 2`` (1-bit weights, any wzero2 in 0..2)."""
    return max(2, (2 * K * ((1 << bits_a) - 1)).bit_length() + 1)


def mvau_cycles(rows: int, K: int, N: int, pe: int, simd: int) -> int:
    """Cycles for one frame of ``rows`` input vectors (conv output pixels, or 1 for a dense layer).

    ``rows * ceil(N/PE) * ceil(K/SIMD)`` compute cycles plus the pipeline fill, with the stream never stalling.
    """
    nf, sf = _folds(K, N, pe, simd)
    return rows * nf * sf + PIPELINE_LATENCY


def _rom_cost(width: int, depth: int) -> tuple[int, int]:
    """(LUTs, BRAM18) of a ROM of ``depth`` words of ``width`` bits: LUT6 = 64 x 1 bit in LUTs, else BRAM18s."""
    bits = width * depth
    if bits <= _LUTROM_MAX_BITS:
        return width * math.ceil(depth / 64), 0
    per_bram_width = max(1, min(_BRAM18_MAX_WIDTH, _BRAM18_BITS // max(depth, 512)))
    return 0, math.ceil(width / per_bram_width) * math.ceil(depth / max(512, _BRAM18_BITS // per_bram_width))


def mvau_resources(K: int, N: int, pe: int, simd: int, bits_a: int, bits_w: int, n_thresholds: int) -> dict:
    """LUT / FF / BRAM18 / DSP estimate of one MVAU (1-bit weights: no DSPs).

    Weights: a ROM ``PE*SIMD*bits_w`` bits wide and ``NF*SF`` deep. Per PE: ``SIMD`` lanes of XNOR/AND (or a
    ``bits_a``-bit mux) feeding a popcount / adder tree, an accumulator, ``n_thresholds`` comparators against the
    threshold ROM. FFs: the vector buffer (when ``NF > 1``), pipeline registers, accumulators, counters.
    """
    nf, sf = _folds(K, N, pe, simd)
    acc = acc_bits(K, bits_a)
    bits_out = max(1, n_thresholds.bit_length())
    w_lut, w_bram = _rom_cost(pe * simd * bits_w, nf * sf)
    t_lut, t_bram = _rom_cost(pe * n_thresholds * acc, nf)
    # a LUT6 compresses ~3 lane products into a 2-bit partial sum; the adder tree then costs ~1 LUT per lane-bit
    tree = pe * simd * bits_a * bits_w
    accumulate = pe * acc
    compare = pe * n_thresholds * math.ceil(acc / 2)
    buffer_lut = math.ceil(K / simd) * simd * bits_a // 64 if nf > 1 else 0  # vector buffer read mux (LUTRAM)
    control = 2 * (nf.bit_length() + sf.bit_length()) + 10
    lut = w_lut + t_lut + tree + accumulate + compare + buffer_lut + control
    ff = (simd * bits_a + pe * simd * bits_w  # issue registers
          + (sf * simd * bits_a if nf > 1 else 0)  # vector buffer
          + pe * acc + pe * bits_out  # accumulators, output register
          + nf.bit_length() + sf.bit_length() + 8)  # counters and valid bits
    return {"lut": int(lut), "ff": int(ff), "bram": int(w_bram + t_bram), "dsp": 0}
