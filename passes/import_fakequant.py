"""Import: a fake-quant model that qcompile wrote (compile's or finetune's model.onnx) compiles as it is.

A fine-tuned model carries trained quantizer parameters (weight codes, scales, activation clips, biases). Compiling
it must keep them: no re-calibration, no re-quantization. This pass reads the integer-exact form that
passes/quantize.py writes back into the compile context (ctx.plan and ctx.layers), so the fuse pass and the targets
run on it exactly as on a fresh compile:

    x --Clip(0,c)--QuantizeLinear(s)--DequantizeLinear(1)--> p --Conv/Gemm/MatMul(p, DQL(W_int, 1))--Mul--Add--> y

The weight codes come from W_int = 2q - zero2 with zero2 from the model's `qcompile.layers` metadata (written with the
model); without metadata the smallest zero2 that puts the codes in [0, 2^k - 1] is used (any valid split of W_int
gives the same accumulator, so the outputs are identical).
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir

from qcompile.errors import ModelLoadError
from qcompile.passes.fuse import match_activation_quant
from qcompile.passes.graph_utils import const_array, node_label
from qcompile.passes.plan import WEIGHTED_OPS, LayerPlan, weight_layout
from qcompile.passes.quantize import QuantizedLayer, core_name
from qcompile.quant.core import QuantizedTensor, levels

LAYERS_KEY = "qcompile.layers"   # metadata_props: JSON {layer: {bits_w, bits_a, quantizer, zero2, scale, ...}}
CONFIG_KEY = "qcompile.config"   # metadata_props: JSON of the Config the model was quantized with


def layer_metadata(layers: dict) -> dict[str, str]:
    """metadata_props entries that let `import` recover each layer's exact codes and provenance."""
    out = {}
    for name, q in layers.items():
        out[name] = {"bits_w": q.bits_w, "bits_a": q.bits_a, "quantizer": q.quantizer,
                     "zero2": np.broadcast_to(q.qweight.zero2.reshape(-1), (q.qweight.codes.shape[0],)).tolist(),
                     "scale": np.broadcast_to(q.qweight.scale.reshape(-1), (q.qweight.codes.shape[0],)).tolist(),
                     "per_channel": q.qweight.axis == 0, "clip_source": q.clip_source, "clip": q.clip,
                     "act_zero": q.act_zero}
    return {LAYERS_KEY: json.dumps(out)}


def set_metadata(model: onnx.ModelProto, entries: dict[str, str]) -> None:
    keep = [p for p in model.metadata_props if p.key not in entries]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    for key, value in entries.items():
        model.metadata_props.add(key=key, value=value)


def metadata(model: onnx.ModelProto, key: str):
    for p in model.metadata_props:
        if p.key == key:
            try:
                return json.loads(p.value)
            except ValueError:
                raise ModelLoadError(f"model metadata '{key}' is not valid JSON; re-export the model") from None
    return None


def _weight_dq(value: ir.Value):
    """W_int behind DequantizeLinear(scale 1, no zero point) -> (int array, initializer value) or None."""
    dq = value.producer()
    if dq is None or dq.op_type != "DequantizeLinear":
        return None
    scale = const_array(dq.inputs[1])
    if scale is None or scale.size != 1 or float(scale.reshape(())) != 1.0:
        return None
    if len(dq.inputs) > 2 and dq.inputs[2] is not None:
        zp = const_array(dq.inputs[2])
        if zp is None or np.any(zp != 0):
            return None
    ints = const_array(dq.inputs[0])
    if ints is None:
        return None
    if ints.dtype.kind not in "iu":  # INT4/INT2 come back as ml_dtypes types
        if "int" not in ints.dtype.name:
            return None
        ints = ints.astype(np.int32)
    return ints.astype(np.int32), dq.inputs[0]


def _scale_bias(core: ir.Node):
    """core -> Mul(const [N]) -> Add(const [N]): (mult, bias) as float32 [N], or None."""
    uses = core.outputs[0].uses()
    if len(uses) != 1 or uses[0].node.op_type != "Mul":
        return None
    mul = uses[0].node
    add_uses = mul.outputs[0].uses()
    if len(add_uses) != 1 or add_uses[0].node.op_type != "Add":
        return None
    mult, bias = const_array(mul.inputs[1]), const_array(add_uses[0].node.inputs[1])
    if mult is None or bias is None:
        return None
    return mult.astype(np.float32).reshape(-1), bias.astype(np.float32).reshape(-1)


def is_fake_quant(model: onnx.ModelProto) -> bool:
    """True when the model holds at least one layer in qcompile's integer-exact fake-quant form."""
    if metadata(model, LAYERS_KEY):
        return True
    irm = ir.from_proto(model)
    return any(n.op_type in WEIGHTED_OPS and len(n.inputs) > 1 and _weight_dq(n.inputs[1]) is not None
               and match_activation_quant(n.inputs[0]) is not None for n in irm.graph)


def _codes(ints_nk: np.ndarray, zero2_meta, bits_meta, name: str) -> tuple[np.ndarray, np.ndarray, int]:
    """Codes q and zero2 per output channel from W_int = 2q - zero2 ([N, ...] layout), and the weight bits."""
    rows = ints_nk.reshape(ints_nk.shape[0], -1)
    if zero2_meta is not None:
        zero2 = np.asarray(zero2_meta, np.int32).reshape(-1)
        if zero2.size != rows.shape[0]:
            raise ModelLoadError(f"{name}: metadata has {zero2.size} zero points for {rows.shape[0]} channels")
    else:  # the smallest split with codes >= 0; parity of W_int is that of zero2
        zero2 = -rows.min(axis=1)
    two_q = rows + zero2[:, None]
    if np.any(two_q % 2) or np.any(two_q < 0):
        raise ModelLoadError(f"{name}: weight integers do not fit the 2q - zero2 form; re-export the model")
    q = two_q // 2
    bits = int(bits_meta) if bits_meta else max(1, int(np.ceil(np.log2(int(q.max()) + 1))))
    if q.max() > levels(bits):
        raise ModelLoadError(f"{name}: weight codes exceed {bits} bits; re-export the model")
    return q.reshape(ints_nk.shape).astype(np.uint8), zero2, bits


class ImportFakeQuant:
    """Fill ctx.plan and ctx.layers from the fake-quant graph (see module docstring); the graph is unchanged except
    that a core node gets the `<layer>_int` name the fuse pass looks for."""

    name = "import-fakequant"

    def __init__(self, model_proto: onnx.ModelProto, float_weights: dict[str, np.ndarray] | None = None):
        self.meta = metadata(model_proto, LAYERS_KEY) or {}
        self.float_weights = float_weights or {}

    def __call__(self, model: ir.Model, ctx) -> bool:
        ctx.plan.clear()
        ctx.layers.clear()
        renamed = False
        for node in list(model.graph):
            if node.op_type not in WEIGHTED_OPS or node.domain not in ("", "ai.onnx"):
                continue
            label = node_label(node)
            layer = label[:-4] if label.endswith("_int") else label
            imported = self._import(node, layer)
            if imported is None:
                w, axis, problem = weight_layout(node)
                ctx.plan[label] = LayerPlan(label, node.op_type, False,
                                            problem or "float in the fake-quant model (kept as it is)",
                                            weight=w.name if w is not None else "", weight_axis=axis,
                                            activation=node.inputs[0].name)
                continue
            plan, qlayer = imported
            if node.name != core_name(layer):
                node.name, renamed = core_name(layer), True
            ctx.plan[layer], ctx.layers[layer] = plan, qlayer
        return renamed

    def _import(self, node: ir.Node, layer: str):
        if len(node.inputs) < 2:
            return None
        weight = _weight_dq(node.inputs[1])
        act = match_activation_quant(node.inputs[0])
        sb = _scale_bias(node)
        if weight is None or act is None or sb is None:
            return None
        ints, w_value = weight
        if node.op_type == "Gemm":
            if node.attributes.get_int("transA", 0) or len(node.inputs) > 2:
                return None
            axis = 0 if node.attributes.get_int("transB", 0) else 1
        else:
            axis = 1 if node.op_type == "MatMul" else 0
        if node.op_type == "MatMul" and ints.ndim != 2:
            return None
        ints_nk = ints if axis == 0 else ints.T
        meta = self.meta.get(layer, {})
        codes, zero2, bits_w = _codes(ints_nk, meta.get("zero2"), meta.get("bits_w"), layer)
        _, _, hi, act_scale, lo, zero = act
        n_a = round((hi - lo) / act_scale)
        bits_a = int(round(np.log2(n_a + 1)))
        if n_a < 1 or levels(bits_a) != n_a:
            raise ModelLoadError(f"{layer}: activation quantizer range [{lo}, {hi}] / scale {act_scale} is not "
                                 "2^k - 1 levels; re-export the model")
        clip = hi if zero == 0 else float(np.float32(meta.get("clip", n_a * act_scale)))
        mult, bias = sb
        n_out = codes.shape[0]
        if mult.size != n_out or bias.size != n_out:
            return None
        sshape = (n_out,) + (1,) * (codes.ndim - 1)
        if "scale" in meta:
            scale = np.asarray(meta["scale"], np.float32).reshape(sshape)
        else:  # mult = (scale / 2) * beta
            scale = (2.0 * mult.astype(np.float64) / act_scale).astype(np.float32).reshape(sshape)
        qweight = QuantizedTensor(codes, bits_w, scale, (zero2 / 2).astype(np.float64).reshape(sshape), 0)
        source_weight = w_value.name.rsplit("_q", 1)[0] if "_q" in w_value.name else w_value.name
        float_w = self.float_weights.get(source_weight)
        if float_w is not None:
            float_w = float_w if axis == 0 else float_w.T
        if float_w is None or float_w.shape != codes.shape:
            float_w = qweight.dequantize()
        quantizer = meta.get("quantizer", "imported")
        plan = LayerPlan(layer, node.op_type, True, "imported from the fake-quant model (trained parameters kept)",
                         bits_w=bits_w, bits_a=bits_a, quantizer=quantizer, weight=source_weight, weight_axis=axis,
                         activation=node.inputs[0].name)
        qlayer = QuantizedLayer(layer, node.op_type, bits_w, bits_a, quantizer, qweight, float_w.astype(np.float32),
                                float(clip), mult, bias, meta.get("clip_source", "from the fake-quant model"), zero)
        return plan, qlayer
