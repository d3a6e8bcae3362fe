"""Lower chosen quantized layers to onnxruntime's integer ops: ConvInteger / MatMulInteger on the uint8 codes and
the int8 weight integers, then Cast to float. The accumulator is the same exact integer the fake-quant Conv/Gemm
computes in float, so outputs stay bit-identical while onnxruntime's int8 GEMM (VNNI/AMX where present) runs it.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qcompile.passes.graph_utils import add_const, const_array, redirect_uses, remove_dead
from qcompile.passes.quantize import core_name


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
            if w_ints.size and (w_ints.min() < -128 or w_ints.max() > 127):  # the planner never asks this
                raise ValueError(f"{name}: weight integers need 9 bits; onnxruntime's int8 ops cannot take them")
            w_int = w_ints.astype(np.int8)
            if core.op_type == "Conv":
                w = add_const(graph, f"{name}_w_i8", w_int)
                keep = ("dilations", "group", "kernel_shape", "pads", "strides")
                attrs = {k: v for k, v in core.attributes.items() if k in keep}
                op = ir.node("ConvInteger", [codes, w], attributes=attrs, name=f"{name}_i8")
            else:
                transposed = core.op_type == "Gemm" and core.attributes.get_int("transB", 0)
                w = add_const(graph, f"{name}_w_i8", np.ascontiguousarray(w_int.T if transposed else w_int))
                op = ir.node("MatMulInteger", [codes, w], name=f"{name}_i8")
            cast = ir.node("Cast", [op.outputs[0]], attributes={"to": ir.DataType.FLOAT}, name=f"{name}_acc")
            graph.insert_before(core, [op, cast])
            redirect_uses(core.outputs[0], cast.outputs[0])
            graph.remove(core, safe=True)
            done += 1
            ctx.fuse_notes[name] = (
                f"int8: {op.op_type} on codes (onnxruntime), exact integer accumulator")
        remove_dead(model)
        return done > 0
