"""Fuse: quantized Conv/Gemm/MatMul + its activation quantizer + scale/bias (+ ReLU and the next quantizer) become
one `ai.qcompile` BitConv / BitGemm node (docs/ops.md).

Matched shape (written by passes/quantize.py):

    x --Clip(0,c)--QuantizeLinear--> p --DequantizeLinear(1)--> . --Conv/Gemm/MatMul(., DQ(W_int))--> acc
      --Mul(mult)--Add(bias)--> y  [--Relu] [--MaxPool]* --Clip(0,c')--QuantizeLinear(s')--> p'

BitConv reads the codes p (uint8). Its epilogue is
  * threshold: when y only feeds the next layer's quantizer (through ReLU and pad-free MaxPools, which commute
    with a monotone quantizer), the node writes p' directly: p' = #{j : acc >= T[n, j]}. T is found by binary
    search on the very float32 arithmetic the fake-quant graph does (mult, bias, relu, clip, divide, round half
    to even), so codes agree exactly. Consecutive low-bit layers never pass through float.
  * float: y = float32(acc) * mult[n] + bias[n], otherwise.
Every layer that is not fused says why (ctx.fuse_notes).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qcompile.passes.graph_utils import add_const, const_array, node_label, redirect_uses, remove_dead
from qcompile.passes.quantize import core_name

DOMAIN = "ai.qcompile"


# ----------------------------------------------------------------------------------------------- thresholds
def next_codes(acc: np.ndarray, mult: np.ndarray, bias: np.ndarray, relu: bool, clip: float, scale: float,
               n_levels: int, lo: float = 0.0, zero: int = 0) -> np.ndarray:
    """The codes the fake-quant graph computes from integer accumulators, in its float32 arithmetic."""
    y = acc.astype(np.float32) * mult.astype(np.float32)   # Mul: one float32 rounding
    y = y + bias.astype(np.float32)                       # Add: another (never fused into an FMA)
    if relu:
        y = np.maximum(y, np.float32(0))
    y = np.clip(y, np.float32(lo), np.float32(clip))      # Clip(lo, c'): lo = 0, or -z s for a signed grid
    q = np.rint(y / np.float32(scale)) + zero             # QuantizeLinear: x / scale, round half to even, + z
    return np.clip(q, 0, n_levels).astype(np.int64)


def thresholds(mult: np.ndarray, bias: np.ndarray, relu: bool, clip: float, scale: float, bits: int,
               acc_bound: int, clip_lo: float = 0.0, zero: int = 0) -> np.ndarray:
    """T[n, j-1] = smallest acc in [-B, B] with code >= j (B+1 when none): int32 [N, 2^bits - 1].

    Valid because code(acc) is non-decreasing in acc (mult > 0 and every step is monotone)."""
    n_levels = 2 ** bits - 1
    mult = np.asarray(mult, np.float32).reshape(-1, 1)
    bias = np.asarray(bias, np.float32).reshape(-1, 1)
    if np.any(mult < 0):
        raise ValueError("negative scale: the epilogue is not monotone")
    j = np.arange(1, n_levels + 1).reshape(1, -1)
    lo = np.full((mult.shape[0], n_levels), -acc_bound, np.int64)
    hi = np.full_like(lo, acc_bound + 1)                  # invariant: code(lo-1) < j <= code(hi) (hi may be "never")
    below = next_codes(lo, mult, bias, relu, clip, scale, n_levels, clip_lo, zero) >= j
    while np.any(hi - lo > 0):
        mid = (lo + hi) // 2
        ok = next_codes(mid, mult, bias, relu, clip, scale, n_levels, clip_lo, zero) >= j
        hi = np.where(ok, mid, hi)
        lo = np.where(ok, lo, mid + 1)
    t = np.where(below, -acc_bound, hi)
    return np.clip(t, -(2 ** 31), 2 ** 31 - 1).astype(np.int32)


# ----------------------------------------------------------------------------------------------- matching
def _single_consumer(value: ir.Value) -> ir.Node | None:
    uses = value.uses()
    if len(uses) != 1 or value.is_graph_output():
        return None
    return uses[0].node


def _scalar(value) -> float | None:
    arr = const_array(value)
    return None if arr is None or arr.size != 1 else float(arr.reshape(()))


def match_activation_quant(codes_float: ir.Value):
    """p_float = DQL([Pad(] QL(Clip(x, lo, c), s, z) [, z)], 1, 0) -> (codes value p, x, c, s, lo, z) or None.

    Unsigned codes: lo = 0, z = 0. Signed ones: lo = -z s, and a padded conv reads its codes padded with z
    (quantize._pad_codes), so p is then the Pad's output."""
    dq = codes_float.producer()
    if dq is None or dq.op_type != "DequantizeLinear" or _scalar(dq.inputs[1]) != 1.0:
        return None
    q = dq.inputs[0].producer()
    codes = dq.inputs[0]
    if q is not None and q.op_type == "Pad":
        q = q.inputs[0].producer()
    if q is None or q.op_type != "QuantizeLinear":
        return None
    clip = q.inputs[0].producer()
    lo = _scalar(clip.inputs[1]) if clip is not None and clip.op_type == "Clip" else None
    if lo is None or lo > 0.0:
        return None
    return codes, clip.inputs[0], _scalar(clip.inputs[2]), _scalar(q.inputs[1]), lo, _zero_point(q)


def _zero_point(quant: ir.Node) -> int:
    """A QuantizeLinear's (scalar) zero point; 0 when absent."""
    return int(_scalar(quant.inputs[2]) or 0) if len(quant.inputs) > 2 and quant.inputs[2] is not None else 0


# Ops that commute with a monotone elementwise quantizer, so they can run on codes instead of floats:
# max(Q(a), Q(b)) == Q(max(a, b)) for pad-free MaxPool; Flatten/Reshape only move elements.
CODE_TRANSPARENT = ("MaxPool", "Flatten", "Reshape")


def match_output_quant(y: ir.Value):
    """y [-> Relu] [-> MaxPool|Flatten|Reshape]* -> Clip(0,c') -> QuantizeLinear(s') : (relu, maxpools, clip node, QL node)."""
    node, relu, pools = _single_consumer(y), False, []
    if node is not None and node.op_type == "Relu":
        relu, node = True, _single_consumer(node.outputs[0])
    while node is not None and node.op_type in CODE_TRANSPARENT:
        if node.op_type == "MaxPool" and (any(node.attributes.get_ints("pads", [0])) or len(node.outputs) > 1
                                          or node.attributes.get_string("auto_pad", "NOTSET") != "NOTSET"):
            return None
        pools.append(node)
        node = _single_consumer(node.outputs[0])
    if node is None or node.op_type != "Clip" or _scalar(node.inputs[1]) is None or _scalar(node.inputs[1]) > 0.0:
        return None
    ql = _single_consumer(node.outputs[0])
    if ql is None or ql.op_type != "QuantizeLinear" or (len(ql.inputs) > 2 and ql.inputs[2] is not None
                                                        and _scalar(ql.inputs[2]) is None):
        return None
    if _scalar(node.inputs[1]) < 0.0 and pools:  # max-pooling codes is exact for any monotone grid, but keep
        return None                              # the signed case to what the tests cover: no pools between
    return relu, pools, node, ql


class FuseBitKernels:
    """Replace each quantized layer of the fake-quant graph by a BitConv/BitGemm node."""

    name = "fuse"

    def __init__(self, layers: set[str] | None = None):
        self.layers = layers  # None: every quantized layer; otherwise only these (the planner's bitserial picks)

    def __call__(self, model: ir.Model, ctx) -> bool:
        graph = model.graph
        notes = ctx.fuse_notes
        fused = 0
        # last layer first: fusing layer i rewires the codes that layer i+1 reads, so i+1 must already be matched
        for name, layer in reversed(list(ctx.layers.items())):
            if self.layers is not None and name not in self.layers:
                continue
            core = next((n for n in graph if n.name == core_name(name)), None)
            if core is None:
                notes[name] = "quantized layer not found in the graph"
                continue
            act = match_activation_quant(core.inputs[0])
            scale_mul = _single_consumer(core.outputs[0])
            bias_add = _single_consumer(scale_mul.outputs[0]) if scale_mul is not None else None
            if act is None or scale_mul is None or scale_mul.op_type != "Mul" or bias_add is None \
                    or bias_add.op_type != "Add":
                notes[name] = "graph around the layer is not the quantizer's pattern; left as fake-quant"
                continue
            codes_in = act[0]
            y = bias_add.outputs[0]
            out_q = match_output_quant(y)
            attrs = self._attributes(core, layer)
            qw = layer.qweight
            inputs = [codes_in,
                      add_const(graph, f"{name}_wcodes", qw.codes.astype(np.uint8)),
                      add_const(graph, f"{name}_wzero2", np.broadcast_to(qw.zero2.reshape(-1),
                                                                         (qw.codes.shape[0],)).astype(np.int32))]
            if out_q is not None:
                relu, pools, clip_node, ql = out_q
                lo_next, hi_next, s_next = (_scalar(clip_node.inputs[1]), _scalar(clip_node.inputs[2]),
                                            _scalar(ql.inputs[1]))
                z_next = _zero_point(ql)
                bits_next = int(round(np.log2(round((hi_next - lo_next) / s_next) + 1)))
                bound = layer_acc_bound(layer)
                t = thresholds(layer.mult, layer.bias, relu, hi_next, s_next, bits_next, bound, lo_next, z_next)
                inputs += [None, None, add_const(graph, f"{name}_thresholds", t)]
                attrs["epilogue"] = ir.AttrString("epilogue", "threshold")
                attrs["bits_out"] = ir.AttrInt64("bits_out", bits_next)
                node = ir.node("BitConv" if core.op_type == "Conv" else "BitGemm", inputs, attributes=attrs,
                               domain=DOMAIN, name=name)
                node.outputs[0].dtype = ir.DataType.UINT8
                graph.insert_before(core, node)
                # the MaxPool/Flatten/Reshape chain now runs on codes: re-create it after the fused node
                last, kernel_chain = node.outputs[0], True
                for k, pool in enumerate(pools):
                    # a 2-D MaxPool straight after the kernel (or another such pool) becomes a MaxPoolCodes kernel
                    # step (docs/ops.md); the rest is re-created as the standard op on codes
                    kernel_chain = kernel_chain and _codes_pool_attributes(pool) is not None
                    if kernel_chain:
                        new_pool = ir.node("MaxPoolCodes", [last], attributes=_codes_pool_attributes(pool),
                                           domain=DOMAIN, name=f"{pool.name or f'{name}_pool{k}'}_codes")
                        new_pool.outputs[0].dtype = ir.DataType.UINT8
                    else:
                        new_pool = ir.node(pool.op_type, [last, *pool.inputs[1:]],
                                           attributes=dict(pool.attributes.items()), name=f"{pool.name}_codes")
                    graph.insert_before(core, new_pool)
                    last = new_pool.outputs[0]
                redirect_uses(ql.outputs[0], last)
                notes[name] = (f"fused: {node.op_type} W{layer.bits_w}A{layer.bits_a}, threshold epilogue -> "
                               f"{bits_next}-bit codes" + (f" (then {', '.join(p.op_type for p in pools)} on codes)"
                                                            if pools else ""))
            else:
                inputs += [add_const(graph, f"{name}_mult", layer.mult),
                           add_const(graph, f"{name}_fbias", layer.bias)]
                attrs["epilogue"] = ir.AttrString("epilogue", "float")
                node = ir.node("BitConv" if core.op_type == "Conv" else "BitGemm", inputs, attributes=attrs,
                               domain=DOMAIN, name=name)
                node.outputs[0].dtype = ir.DataType.FLOAT
                graph.insert_before(core, node)
                redirect_uses(y, node.outputs[0])
                notes[name] = f"fused: {node.op_type} W{layer.bits_w}A{layer.bits_a}, float epilogue"
            fused += 1
        if fused:
            remove_dead(model)
            if all(imp != DOMAIN for imp in graph.opset_imports):
                graph.opset_imports[DOMAIN] = 1
                model.opset_imports[DOMAIN] = 1
        return fused > 0

    @staticmethod
    def _attributes(core: ir.Node, layer) -> dict:
        attrs = {"bits_a": ir.AttrInt64("bits_a", layer.bits_a), "bits_w": ir.AttrInt64("bits_w", layer.bits_w)}
        if core.op_type == "Conv":
            kh, kw = layer.qweight.codes.shape[2:]
            a = core.attributes
            attrs.update({
                "kernel_shape": ir.AttrInt64s("kernel_shape", [kh, kw]),
                "strides": ir.AttrInt64s("strides", a.get_ints("strides", [1, 1])),
                "pads": ir.AttrInt64s("pads", a.get_ints("pads", [0, 0, 0, 0])),
                "dilations": ir.AttrInt64s("dilations", a.get_ints("dilations", [1, 1])),
                "group": ir.AttrInt64("group", a.get_int("group", 1)),
            })
        return attrs


def _codes_pool_attributes(pool: ir.Node) -> dict | None:
    """MaxPoolCodes attributes for a pad-free, floor-mode 2-D MaxPool (None for anything else)."""
    a = pool.attributes
    kernel = a.get_ints("kernel_shape", [])
    if pool.op_type != "MaxPool" or len(kernel) != 2 or a.get_int("ceil_mode", 0) or len(pool.outputs) > 1:
        return None
    return {"kernel_shape": ir.AttrInt64s("kernel_shape", list(kernel)),
            "strides": ir.AttrInt64s("strides", list(a.get_ints("strides", [1, 1]))),
            "dilations": ir.AttrInt64s("dilations", list(a.get_ints("dilations", [1, 1])))}


def layer_acc_bound(layer) -> int:
    """|acc| <= K * max|2q - zero2| * (2^bits_a - 1): the range the threshold search covers."""
    k = int(np.prod(layer.qweight.codes.shape[1:]))
    vmax = int(np.abs(layer.qweight.int_values()).max()) if layer.qweight.codes.size else 0
    return k * max(vmax, 1) * (2 ** layer.bits_a - 1)


__all__ = ["FuseBitKernels", "thresholds", "next_codes", "node_label", "DOMAIN"]
