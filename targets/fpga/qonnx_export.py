"""QONNX export of qcompile's fake-quant model, so a FINN user can take it (``qonnx.custom_op.general`` ops).

The fake-quant form (docs/ops.md, "Where these nodes come from") holds two quantizer patterns; each becomes QONNX:

- activation codes ``[Clip(0, c) ->] QuantizeLinear(s, 0) -> DequantizeLinear(1, 0)`` become
  ``Div(x, s) -> Quant(scale 1, zeropt 0, bitwidth bits_a, unsigned)``: the same float32 division and
  half-to-even rounding as QuantizeLinear, and Quant's clamp to ``[0, 2^bits_a - 1]`` replaces the Clip when
  ``round(c / s)`` is that top code (else the Clip stays), so the codes are exactly onnxruntime's;
- integer weights ``DequantizeLinear(v = 2q - wzero2, 1)`` become a float initializer behind ``BipolarQuant`` (scale 1)
  when every value is ±1, else ``Quant`` (scale 1, signed, the fewest bits that hold them).

The layers then multiply exact small integers exactly as the fake-quant model does, and the per-channel ``Mul``
(mult) / ``Add`` (bias) are kept as they are: every code of the exported graph equals the fake-quant model's, and its
float outputs equal them up to float32 summation order (qonnx runs standard ops through onnxruntime too).

``form="thresholds"`` (from a CompileResult) writes FINN's streamlined form instead: each threshold-epilogue
BitGemm/BitConv becomes ``Gemm``/``Conv`` on the codes with the quantized integer weights and a ``MultiThreshold``
holding qcompile's integer thresholds (``code = #{j : acc >= T[n, j]}``, reference.epilogue_threshold).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from qcompile.errors import ArtifactError

__all__ = ["export_qonnx", "QONNX_DOMAIN"]

QONNX_DOMAIN = "qonnx.custom_op.general"
_INT_TYPES = {onnx.TensorProto.INT4, onnx.TensorProto.INT8, onnx.TensorProto.UINT4, onnx.TensorProto.UINT8,
              onnx.TensorProto.INT16, onnx.TensorProto.INT32}


def _fakequant_model(obj) -> onnx.ModelProto:
    if isinstance(obj, onnx.ModelProto):
        return obj
    if hasattr(obj, "model") and isinstance(obj.model, onnx.ModelProto):  # a CompileResult
        return obj.model
    p = Path(obj)
    if p.is_dir():
        for name in ("model.onnx", "fakequant.onnx"):
            if (p / name).is_file():
                return onnx.load(p / name)
        raise ArtifactError(f"{p}: no model.onnx in this folder; pass a fake-quant .onnx or a compile output folder")
    if not p.is_file():
        raise ArtifactError(f"{p}: no such file; pass a fake-quant .onnx, a compile output folder or a CompileResult")
    return onnx.load(p)


class _Graph:
    """Initializer lookup and node edits on one GraphProto."""

    def __init__(self, graph: onnx.GraphProto):
        self.g = graph
        self.inits = {i.name: i for i in graph.initializer}
        self.readers: dict[str, list] = {}
        for n in graph.node:
            for x in n.input:
                self.readers.setdefault(x, []).append(n)
        self.producer = {o: n for n in graph.node for o in n.output}

    def const(self, name: str):
        return numpy_helper.to_array(self.inits[name]) if name in self.inits else None

    def add_init(self, name: str, value: np.ndarray) -> str:
        t = numpy_helper.from_array(np.asarray(value), name)
        self.g.initializer.append(t)
        self.inits[name] = t
        return name


def _is_scalar(v, value=None) -> bool:
    return v is not None and v.size == 1 and (value is None or float(v.reshape(-1)[0]) == value)


def _activation_quant(gr: _Graph, ql, dq, new_nodes: dict, dropped: set) -> None:
    """QuantizeLinear(s, 0) -> DequantizeLinear(1, 0) on codes -> [Div(x, s)] -> Quant(1, 0, bits)."""
    scale = gr.const(ql.input[1])
    clip = gr.producer.get(ql.input[0])
    x, bits = ql.input[0], 8  # without a Clip, QuantizeLinear saturates to uint8
    if clip is not None and clip.op_type == "Clip" and len(gr.readers.get(clip.output[0], [])) == 1:
        lo, hi = gr.const(clip.input[1]), gr.const(clip.input[2])
        if _is_scalar(lo, 0.0) and _is_scalar(hi):
            q = np.float32(hi.reshape(-1)[0]) / np.float32(scale.reshape(-1)[0])
            top = int(np.round(q))  # the top code
            bits = max(1, top.bit_length())
            if top == (1 << bits) - 1 and np.round(q) == top:  # Quant's clamp is the Clip: drop it
                dropped.add(id(clip))
                x = clip.input[0]
    base = ql.name or ql.output[0]
    div_out = f"{base}_qonnx_div"
    nodes = [helper.make_node("Div", [x, ql.input[1]], [div_out], name=f"{base}_div"),
             helper.make_node("Quant", [div_out, gr.add_init(f"{base}_qonnx_one", np.float32(1)),
                                        gr.add_init(f"{base}_qonnx_zero", np.float32(0)),
                                        gr.add_init(f"{base}_qonnx_bits", np.float32(bits))],
                              [dq.output[0]], name=f"{base}_quant", domain=QONNX_DOMAIN,
                              signed=0, narrow=0, rounding_mode="ROUND")]
    new_nodes[id(dq)] = nodes
    dropped.add(id(ql))


def _weight_quant(gr: _Graph, dq, new_nodes: dict) -> None:
    """DequantizeLinear(integer weights, 1) -> float weights -> BipolarQuant or Quant (scale 1)."""
    v = gr.const(dq.input[0]).astype(np.int64)
    base = dq.name or dq.output[0]
    w = gr.add_init(f"{base}_qonnx_values", v.astype(np.float32))
    one = gr.add_init(f"{base}_qonnx_one", np.float32(1))
    if np.all(np.abs(v) == 1):
        node = helper.make_node("BipolarQuant", [w, one], [dq.output[0]], name=f"{base}_bipolar", domain=QONNX_DOMAIN)
    else:
        bits = max(int(v.max()).bit_length(), int(-v.min() - 1).bit_length()) + 1 if v.size else 2
        node = helper.make_node("Quant", [w, one, gr.add_init(f"{base}_qonnx_zero", np.float32(0)),
                                          gr.add_init(f"{base}_qonnx_bits", np.float32(bits))],
                                [dq.output[0]], name=f"{base}_quant", domain=QONNX_DOMAIN,
                                signed=1, narrow=0, rounding_mode="ROUND")
    new_nodes[id(dq)] = [node]


def to_qonnx(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict]:
    """The QONNX form of a fake-quant model and counts of what was converted."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    gr = _Graph(model.graph)
    new_nodes: dict[int, list] = {}
    dropped: set[int] = set()
    counts = {"Quant (activations)": 0, "Quant (weights)": 0, "BipolarQuant": 0}
    for n in list(model.graph.node):
        if n.op_type != "DequantizeLinear" or n.domain not in ("", "ai.onnx"):
            continue
        scale = gr.const(n.input[1])
        zero = gr.const(n.input[2]) if len(n.input) > 2 and n.input[2] else None
        if not _is_scalar(scale, 1.0) or (zero is not None and np.any(zero != 0)):
            continue
        src = gr.producer.get(n.input[0])
        if n.input[0] in gr.inits and gr.inits[n.input[0]].data_type in _INT_TYPES:
            _weight_quant(gr, n, new_nodes)
            counts["BipolarQuant" if new_nodes[id(n)][0].op_type == "BipolarQuant" else "Quant (weights)"] += 1
        elif src is not None and src.op_type == "QuantizeLinear" and len(gr.readers[n.input[0]]) == 1:
            qs, qz = gr.const(src.input[1]), gr.const(src.input[2]) if len(src.input) > 2 else None
            if _is_scalar(qs) and qz is not None and qz.dtype == np.uint8 and np.all(qz == 0):
                _activation_quant(gr, src, n, new_nodes, dropped)
                counts["Quant (activations)"] += 1
    nodes = []
    for n in model.graph.node:
        if id(n) in new_nodes:
            nodes.extend(new_nodes[id(n)])
        elif id(n) not in dropped:
            nodes.append(n)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    used = {x for n in nodes for x in n.input}
    keep = [i for i in model.graph.initializer if i.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    if not any(o.domain == QONNX_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(QONNX_DOMAIN, 1))
    return model, counts


def export_qonnx(obj, path) -> dict:
    """Write the QONNX form of ``obj`` (a CompileResult, a fake-quant ModelProto, its .onnx path, or a compile
    output folder) to ``path``; returns what was converted (op -> count)."""
    model, counts = to_qonnx(_fakequant_model(obj))
    if not any(counts.values()):
        raise ArtifactError("no qcompile quantizer found in the model: pass the fake-quant model (compile output), "
                            "not the float one")
    onnx.checker.check_model(model)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path)
    return counts
