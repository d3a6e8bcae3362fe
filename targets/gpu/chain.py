"""Chains of bit layers on the GPU: a threshold layer that writes its reader's packed input.

A producer's threshold codes are usually packed into bit planes by its consumer's pack kernel (one more launch and
a round trip of uint8 codes through device memory). When the producer's only reader is a BitGemm / BitConv kernel
that reads the codes as they are, the producer's epilogue writes the consumer's packed planes and code sums
itself (``bitkernels.cuh::pack_output``) and the consumer's pack kernel is skipped:

- gemm -> gemm: the producer's N outputs are the consumer's K (rows match one to one);
- conv -> conv: the producer's [N, HO, WO] output is the consumer's (C, H, W) input (output pixel = input pixel).

Not chained (the uint8 codes stay): a producer with a folded max-pool (the pool kernel reads uint8 codes: a max
over bit planes is an OR only for 1-bit codes, and the usual reader after a pool is a Flatten -> BitGemm whose K is
channel-major, which per-pixel planes do not give), a MaxPoolCodes or float reader, a reader that quantizes its
float input, and any value a float partition or the caller also reads (decided in lower.py).
"""

from __future__ import annotations

from qcompile.targets.cpu.spec import LayerSpec

__all__ = ["chain_refusal", "packed_form", "shares_words"]


def chain_refusal(producer: LayerSpec, consumer: LayerSpec) -> str | None:
    """None when ``producer``'s epilogue can write ``consumer``'s packed input, else why not (one phrase)."""
    if producer.op not in ("gemm", "conv") or consumer.op not in ("gemm", "conv"):
        return "only BitGemm / BitConv layers chain"
    if producer.epilogue != "threshold":
        return f"{producer.name} writes {producer.epilogue} values, not codes"
    if producer.pool is not None:
        return f"{producer.name}'s folded max-pool reads uint8 codes"
    if consumer.in_thresholds is not None:
        return f"{consumer.name} quantizes a float input"
    if producer.op != consumer.op:
        return f"{producer.op} -> {consumer.op} reorders the codes"
    if tuple(producer.out_shape) != tuple(consumer.in_shape):
        return f"{producer.name} writes {list(producer.out_shape)}, {consumer.name} reads {list(consumer.in_shape)}"
    if producer.L > (1 << consumer.bits_a) - 1:
        return f"{producer.name}'s codes (0..{producer.L}) do not fit {consumer.name}'s {consumer.bits_a} bits"
    return None


def packed_form(consumer_consts: dict) -> dict:
    """The consumer's packed layout as the producer's output constants (bitkernels.cuh ``struct Codes``): groups,
    channels per group, planes and words per plane of one row / pixel and group."""
    c = consumer_consts
    return {"PACKED": 1, "G": c["G"], "CG": c["CG"], "BA": c["BA"], "CW": c["KWP"] if c["OP"] == 0 else c["CGW"]}


def shares_words(producer_consts: dict, form: dict, tile_widths) -> bool:
    """Whether some consumer word holds channels of two producer blocks (channel tiles of ``tile_widths`` within
    each producer group): such words are OR-ed together, into planes zeroed before the launch."""
    c = producer_consts
    starts = {g * c["NG"] + n0 for tn in tile_widths for g in range(c["G"]) for n0 in range(0, c["NG"], tn)}
    for g in range(form["G"]):
        for lo in range(0, form["CG"], 32):
            hi = min(lo + 32, form["CG"])
            if any(g * form["CG"] + lo < s < g * form["CG"] + hi for s in starts):
                return True
    return False
