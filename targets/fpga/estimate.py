"""Cycle and resource estimates of one matrix-vector-activation unit (MVAU) with PE x SIMD folding.

The unit is the RTL one of ``rtl.py`` (and FINN's): each of ``rows`` input vectors of ``K`` codes is multiplied by an
``N x K`` binary weight matrix, ``PE`` neurons at a time over ``SIMD`` synapses per cycle, so one vector takes
``ceil(N/PE) * ceil(K/SIMD)`` cycles (the first neuron fold reads the stream, later folds re-read the vector buffer).
Resources are Xilinx 7-series/UltraScale primitives (LUT6, FF, BRAM18, DSP48), calibrated against yosys
``synth_xilinx`` of the generated RTL (see docs/fpga.md for the measured points).
"""

from __future__ import annotations

import math

__all__ = ["mvau_cycles", "mvau_resources", "PIPELINE_LATENCY", "BRAM_MIN_DEPTH", "acc_bits"]

# Cycles a frame takes beyond rows * NF * SF, from its first input handshake to its last output handshake with the
# streams never stalling: issue register (weight ROM read), popcount + accumulate, threshold compare into the
# output register (Verilator counts exactly this).
PIPELINE_LATENCY = 3
# The weight ROM (synchronous read) goes to BRAM from this depth on, as yosys synth_xilinx maps it; below, LUTs.
BRAM_MIN_DEPTH = 512
_BRAM18_BITS, _BRAM18_MAX_WIDTH = 18 * 1024, 36
# LUT model, fitted (least relative error) to yosys 0.23 synth_xilinx of qc_mvau.sv on 9 foldings from
# K=64..784, N=12..256, PE=1..16, SIMD=8..64, 1-2 bit activations (docs/fpga.md): per LUT-ROM bit and 64 words,
# per lane-bit of the adder trees, per accumulator bit and wzero2 bit (the shift-add), per comparator bit, fixed.
_LUT_PER_ROM_BIT, _LUT_PER_LANE_BIT, _LUT_PER_ACC_BIT, _LUT_PER_CMP_BIT, _LUT_FIXED = 0.85, 2.87, 1.32, 0.77, 61
_FF_FIXED = 27


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


def _weight_rom(width: int, depth: int) -> tuple[int, int]:
    """(LUT-ROM bits x 64-word columns, BRAM18) of the weight ROM: ``depth`` words of ``width`` bits."""
    if depth < BRAM_MIN_DEPTH:
        return width * math.ceil(depth / 64), 0
    per_bram_width = max(1, min(_BRAM18_MAX_WIDTH, _BRAM18_BITS // depth))
    return 0, math.ceil(width / per_bram_width) * math.ceil(depth / (_BRAM18_BITS // per_bram_width))


def mvau_resources(K: int, N: int, pe: int, simd: int, bits_a: int, bits_w: int, n_thresholds: int, *,
                   xor: bool = False) -> dict:
    """LUT / FF / BRAM18 / DSP estimate of one MVAU (1-bit weights: no DSPs) as yosys ``synth_xilinx`` maps it.

    Weights: a ROM ``PE*SIMD*bits_w`` bits wide and ``NF*SF`` deep (LUTs, or BRAM18 when deep). Per PE: ``SIMD``
    lanes of AND/XNOR (or a ``bits_a``-bit mux) into an adder tree, an accumulator, the ``2*acc - wzero2*sum(p)``
    shift-add (AND form; ``xor``: ``2*acc - K``), ``n_thresholds`` comparators and their LUT ROM. FFs: the issue
    registers, accumulators, output register (the vector buffer is LUTRAM).
    """
    nf, sf = _folds(K, N, pe, simd)
    acc = acc_bits(K, bits_a)
    z_bits = 1 if xor else 3
    bits_out = max(1, n_thresholds.bit_length()) if n_thresholds else acc
    rom_cols, bram = _weight_rom(pe * simd * bits_w, nf * sf)
    lut = (_LUT_PER_ROM_BIT * rom_cols + _LUT_PER_LANE_BIT * pe * simd * bits_a * bits_w
           + _LUT_PER_ACC_BIT * pe * acc * z_bits
           + _LUT_PER_CMP_BIT * pe * n_thresholds * acc * math.ceil(nf / 64) + _LUT_FIXED)
    ff = (simd * bits_a + (pe * simd * bits_w if not bram else 0)  # issue registers (a BRAM has its own)
          + (pe + 1) * acc + pe * bits_out + _FF_FIXED)
    return {"lut": round(lut), "ff": int(ff), "bram": int(bram), "dsp": 0}
