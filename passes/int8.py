"""Lower chosen quantized layers to onnxruntime's integer ops: ConvInteger / MatMulInteger on the uint8 codes and
int8 weights, then Cast to float. The accumulator is the same exact integer the fake-quant Conv/Gemm computes in
float, so outputs stay bit-identical while onnxruntime's int8 GEMM (VNNI/AMX where present) runs it.

8-bit weights give integers w = 2q - zero2 in [-255, 255] (9 bits). Within an output channel they all share
zero2's parity, so w = 2 * w8 + c with w8 = (w - c) / 2 in int8 and c = max(w) - 254 per channel; the accumulator is
then 2 * sum(x * w8) + c * sum(x): one int8 op, plus the window sums of the codes (a ones-kernel ConvInteger with
one output channel, or a ReduceSum), in exact int32.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qcompile.passes.graph_utils import add_const, const_array, redirect_uses, remove_dead
from qcompile.passes.quantize import core_name

CONV_ATTRS = ("dilations", "group", "kernel_shape", "pads", "strides")


def split_9bit(w_ints: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(w8 int8, c int32 per channel along `axis`) with w_ints == 2 * w8 + c, or None when w_ints fit int8."""
    w = w_ints.astype(np.int32)
    if not w.size or (w.min() >= -128 and w.max() <= 127):
        return None
    other = tuple(i for i in range(w.ndim) if i != axis)
    c = w.max(axis=other, keepdims=True) - 254
    if np.any((w - c) % 2) or np.any(w.min(axis=other, keepdims=True) - c < -256):
        raise ValueError("weight integers span more than 9 bits or mix parities within a channel")
    return ((w - c) // 2).astype(np.int8), c.reshape(-1).astype(np.int32)


def integer_accumulator(graph: ir.Graph, codes: ir.Value, w_ints: np.ndarray, name: str,
                        conv_attrs: dict | None = None) -> tuple[list[ir.Node], ir.Value]:
    """Nodes computing the float accumulator sum(codes * w_ints) on onnxruntime's integer ops, and its value.

    w_ints is in onnxruntime's layout: [N, C/g, kh, kw] for a conv (conv_attrs given), [K, N] for a MatMul."""
    conv = conv_attrs is not None
    split = split_9bit(w_ints, 0 if conv else 1)
    w8 = w_ints.astype(np.int8) if split is None else split[0]
    w = add_const(graph, f"{name}_w_i8", np.ascontiguousarray(w8))
    if conv:
        op = ir.node("ConvInteger", [codes, w], attributes=conv_attrs, name=f"{name}_i8")
    else:
        op = ir.node("MatMulInteger", [codes, w], name=f"{name}_i8")
    nodes, acc = [op], op.outputs[0]
    if split is not None:
        c = split[1]
        if conv:
            g = conv_attrs.get("group", 1)
            group = g.as_int() if isinstance(g, ir.Attr) else int(g)
            # each output channel sums its own group's window; one shared sum when there is one group
            ones = np.ones((1 if group == 1 else w8.shape[0], *w8.shape[1:]), np.uint8)
            wsum = ir.node("ConvInteger", [codes, add_const(graph, f"{name}_ones", ones)], attributes=conv_attrs,
                           name=f"{name}_window_sum")
            c_shape = (1, -1) + (1,) * (w8.ndim - 2)
        else:
            wide = ir.node("Cast", [codes], attributes={"to": ir.DataType.INT32}, name=f"{name}_codes_i32")
            axes = add_const(graph, f"{name}_k_axis", np.array([-1], np.int64))
            wsum = ir.node("ReduceSum", [wide.outputs[0], axes], attributes={"keepdims": 1}, name=f"{name}_row_sum")
            nodes.append(wide)
            c_shape = (-1,)
        two = add_const(graph, f"{name}_two", np.array(2, np.int32))
        cvec = add_const(graph, f"{name}_c", c.reshape(c_shape))
        doubled = ir.node("Mul", [acc, two], name=f"{name}_x2")
        offset = ir.node("Mul", [wsum.outputs[0], cvec], name=f"{name}_offset")
        total = ir.node("Add", [doubled.outputs[0], offset.outputs[0]], name=f"{name}_acc_i32")
        nodes += [wsum, doubled, offset, total]
        acc = total.outputs[0]
    cast = ir.node("Cast", [acc], attributes={"to": ir.DataType.FLOAT}, name=f"{name}_acc")
    return nodes + [cast], cast.outputs[0]


def probe_model(w_ints: np.ndarray, x_shape, conv_attrs: dict | None = None):
    """A one-layer onnxruntime model (uint8 input "x" -> float accumulator "y") for timing the int8 kernel."""
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.UINT8), shape=ir.Shape(list(x_shape)))
    graph = ir.Graph([x], [], nodes=[], opset_imports={"": 21}, name="probe")
    nodes, y = integer_accumulator(graph, x, w_ints, "layer", conv_attrs)
    graph.extend(nodes)
    y.name = "y"
    graph.outputs.append(y)
    return ir.to_proto(ir.Model(graph, ir_version=10))


class LowerToInt8:
    name = "lower_int8"

    def __init__(self, layers: set[str]):
        self.layers = set(layers)

    def __call__(self, model: ir.Model, ctx) -> bool:
        graph = model.graph
        done = 0
        for name in self.layers:
            core = next((n for n in graph if n.name == core_name(name)), None)
            if core is None:
                continue
            codes_dq, w_dq = core.inputs[0].producer(), core.inputs[1].producer()
            codes = codes_dq.inputs[0]                       # uint8 activation codes
            w_ints = const_array(w_dq.inputs[0]).astype(np.int16)
            if core.op_type == "Conv":
                attrs = {k: v for k, v in core.attributes.items() if k in CONV_ATTRS}
                nodes, acc = integer_accumulator(graph, codes, w_ints, name, attrs)
            else:
                transposed = core.op_type == "Gemm" and core.attributes.get_int("transB", 0)
                nodes, acc = integer_accumulator(graph, codes, w_ints.T if transposed else w_ints, name)
            graph.insert_before(core, nodes)
            redirect_uses(core.outputs[0], acc)
            graph.remove(core, safe=True)
            done += 1
            nine = len(nodes) > 2
            ctx.fuse_notes[name] = (f"int8: {nodes[0].op_type} on codes (onnxruntime), exact integer accumulator"
                                    + ("; 9-bit weights as 2 x int8 + a per-channel offset times the window sum"
                                       if nine else ""))
        remove_dead(model)
        return done > 0
