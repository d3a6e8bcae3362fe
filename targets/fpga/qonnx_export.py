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


def _activation_quant(gr: _Graph, ql, out: str, dropped: set) -> list:
    """[Clip(0, c) ->] QuantizeLinear(s, 0) writing codes ``out`` -> Div(x, s) -> Quant(1, 0, bits) (the new nodes)."""
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
                              [out], name=f"{base}_quant", domain=QONNX_DOMAIN,
                              signed=0, narrow=0, rounding_mode="ROUND")]
    dropped.add(id(ql))
    return nodes


def _weight_quant(gr: _Graph, v: np.ndarray, base: str, out: str):
    """Integer weight values ``v`` -> a float initializer behind BipolarQuant or Quant (scale 1) writing ``out``."""
    v = np.asarray(v).astype(np.int64)
    w = gr.add_init(f"{base}_qonnx_values", v.astype(np.float32))
    one = gr.add_init(f"{base}_qonnx_one", np.float32(1))
    if np.all(np.abs(v) == 1):
        return helper.make_node("BipolarQuant", [w, one], [out], name=f"{base}_bipolar", domain=QONNX_DOMAIN)
    else:
        bits = max(int(v.max()).bit_length(), int(-v.min() - 1).bit_length()) + 1 if v.size else 2
    return helper.make_node("Quant", [w, one, gr.add_init(f"{base}_qonnx_zero", np.float32(0)),
                                      gr.add_init(f"{base}_qonnx_bits", np.float32(bits))],
                            [out], name=f"{base}_quant", domain=QONNX_DOMAIN, signed=1, narrow=0, rounding_mode="ROUND")


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
            new_nodes[id(n)] = [_weight_quant(gr, gr.const(n.input[0]), n.name or n.output[0], n.output[0])]
            counts["BipolarQuant" if new_nodes[id(n)][0].op_type == "BipolarQuant" else "Quant (weights)"] += 1
        elif src is not None and src.op_type == "QuantizeLinear" and len(gr.readers[n.input[0]]) == 1:
            qs, qz = gr.const(src.input[1]), gr.const(src.input[2]) if len(src.input) > 2 else None
            if _is_scalar(qs) and qz is not None and qz.dtype == np.uint8 and np.all(qz == 0):
                new_nodes[id(n)] = _activation_quant(gr, src, n.output[0], dropped)
                counts["Quant (activations)"] += 1
    _replace_nodes(model, new_nodes, dropped)
    return model, counts


def _replace_nodes(model: onnx.ModelProto, new_nodes: dict, dropped: set) -> None:
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


def _attr(node, name, default=None):
    for a in node.attribute:
        if a.name == name:
            v = helper.get_attribute_value(a)
            return v.decode() if isinstance(v, bytes) else v
    return default


def _bit_layer(gr: _Graph, node) -> list:
    """BitGemm/BitConv (docs/ops.md) -> [Mul/Add to ±1 for xor,] Gemm/Conv with quantized integer weights, then the
    epilogue: MultiThreshold (threshold), Mul + Add (float, the same float32 ops as reference.epilogue_float)."""
    base = node.name or node.output[0]
    x, w_name, z_name = node.input[0], node.input[1], node.input[2]
    opt = list(node.input[3:]) + [""] * (6 - len(node.input))
    mult, bias, thr = opt[0], opt[1], opt[2]
    q, z = gr.const(w_name).astype(np.int64), gr.const(z_name).astype(np.int64)
    xor = bool(_attr(node, "xor", 0))
    v = 2 * q - (1 if xor else z.reshape((-1,) + (1,) * (q.ndim - 1)))
    nodes = []
    if xor:  # activation bits read as ±1; zero padding of a conv then adds 0, as reference.bit_conv_xor
        two = gr.add_init(f"{base}_qonnx_two", np.float32(2))
        m_one = gr.add_init(f"{base}_qonnx_minus_one", np.float32(-1))
        nodes += [helper.make_node("Mul", [x, two], [f"{base}_x2"], name=f"{base}_bipolar_mul"),
                  helper.make_node("Add", [f"{base}_x2", m_one], [f"{base}_pm1"], name=f"{base}_bipolar_add")]
        x = f"{base}_pm1"
    wq = f"{base}_wq"
    nodes.append(_weight_quant(gr, v, base, wq))
    acc = f"{base}_acc"
    if node.op_type == "BitGemm":
        nodes.append(helper.make_node("Gemm", [x, wq], [acc], name=f"{base}_gemm", transB=1))
    else:
        geometry = {k: _attr(node, k, d) for k, d in (("strides", [1, 1]), ("pads", [0, 0, 0, 0]),
                                                      ("dilations", [1, 1]), ("group", 1))}
        nodes.append(helper.make_node("Conv", [x, wq], [acc], name=f"{base}_conv", kernel_shape=list(q.shape[2:]),
                                      **geometry))
    epilogue, out = _attr(node, "epilogue", "none"), node.output[0]
    if epilogue == "threshold":
        t = gr.const(thr)  # as float32: exact below 2^24, and rounding beyond it changes no comparison of an acc
        bits = max(1, int(t.shape[1]).bit_length())
        nodes.append(helper.make_node("MultiThreshold", [acc, gr.add_init(f"{base}_qonnx_thresholds",
                                                                          t.astype(np.float32))],
                                      [out], name=f"{base}_threshold", domain=QONNX_DOMAIN, out_dtype=f"UINT{bits}"))
    elif epilogue == "float":
        shape = [1, -1] + [1] * (q.ndim - 2)
        m = gr.add_init(f"{base}_qonnx_mult", gr.const(mult).astype(np.float32).reshape(shape))
        b = gr.add_init(f"{base}_qonnx_bias", gr.const(bias).astype(np.float32).reshape(shape))
        nodes += [helper.make_node("Mul", [acc, m], [f"{base}_scaled"], name=f"{base}_mul"),
                  helper.make_node("Add", [f"{base}_scaled", b], [out], name=f"{base}_add")]
    else:
        nodes.append(helper.make_node("Identity", [acc], [out], name=f"{base}_out"))
    return nodes


def to_qonnx_thresholds(fused: onnx.ModelProto) -> tuple[onnx.ModelProto, dict]:
    """FINN's streamlined form of a fused graph (passes/fuse.py): codes travel as float integers, each fused layer
    is Gemm/Conv + MultiThreshold (or its float epilogue), MaxPoolCodes is MaxPool, the input quantizer Div + Quant."""
    model = onnx.ModelProto.FromString(fused.SerializeToString())
    gr = _Graph(model.graph)
    new_nodes: dict[int, list] = {}
    dropped: set[int] = set()
    counts = {"MultiThreshold": 0, "Quant (activations)": 0, "layers": 0}
    for n in list(model.graph.node):
        if n.domain == "ai.qcompile" and n.op_type in ("BitGemm", "BitConv"):
            new_nodes[id(n)] = _bit_layer(gr, n)
            counts["layers"] += 1
            counts["MultiThreshold"] += any(m.op_type == "MultiThreshold" for m in new_nodes[id(n)])
        elif n.domain == "ai.qcompile" and n.op_type == "MaxPoolCodes":
            new_nodes[id(n)] = [helper.make_node("MaxPool", list(n.input), list(n.output), name=n.name,
                                                 kernel_shape=_attr(n, "kernel_shape"),
                                                 strides=_attr(n, "strides", [1, 1]),
                                                 dilations=_attr(n, "dilations", [1, 1]))]
        elif n.domain == "ai.qcompile":
            raise ArtifactError(f"node {n.name!r}: {n.op_type} has no QONNX form")
        elif n.op_type == "QuantizeLinear" and all(r.domain == "ai.qcompile" for r in gr.readers.get(n.output[0], [])):
            qz = gr.const(n.input[2]) if len(n.input) > 2 else None
            if _is_scalar(gr.const(n.input[1])) and qz is not None and qz.dtype == np.uint8 and np.all(qz == 0):
                new_nodes[id(n)] = _activation_quant(gr, n, n.output[0], dropped)
                dropped.discard(id(n))
                counts["Quant (activations)"] += 1
    _replace_nodes(model, new_nodes, dropped)
    del model.graph.value_info[:]  # codes were uint8 there; they are float integers now
    keep = [o for o in model.opset_import if o.domain != "ai.qcompile"]
    del model.opset_import[:]
    model.opset_import.extend(keep)
    return model, counts


def _fused_model(result) -> onnx.ModelProto:
    import onnx_ir as ir

    from qcompile.passes.fuse import FuseBitKernels

    if not (hasattr(result, "ctx") and hasattr(result, "model")):
        raise ArtifactError("form='thresholds' needs a CompileResult (qcompile.api.compile's result): the fuse pass "
                            "reads its calibration context")
    fused = ir.from_proto(result.model)
    FuseBitKernels(set(result.ctx.layers))(fused, result.ctx)
    return ir.to_proto(fused)


def export_qonnx(obj, path, form: str = "quant") -> dict:
    """Write the QONNX form of ``obj`` to ``path``; returns what was converted (op -> count).

    ``form="quant"``: ``obj`` is a CompileResult, a fake-quant ModelProto, its .onnx path or a compile output folder;
    quantizers become Quant / BipolarQuant. ``form="thresholds"``: ``obj`` is a CompileResult; fused layers become
    Gemm/Conv + MultiThreshold (FINN's streamlined form)."""
    if form == "quant":
        model, counts = to_qonnx(_fakequant_model(obj))
    elif form == "thresholds":
        model, counts = to_qonnx_thresholds(_fused_model(obj))
    else:
        raise ArtifactError(f"unknown QONNX form {form!r}: use 'quant' or 'thresholds'")
    if not any(counts.values()):
        raise ArtifactError("no qcompile quantizer found in the model: pass the fake-quant model (compile output), "
                            "not the float one")
    onnx.checker.check_model(model)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path)
    return counts
