"""Quantize: weights become integer codes behind DequantizeLinear; activations get Clip/QuantizeLinear/Dequantize.

The fake-quant graph is written in an *integer-exact* form, so that onnxruntime's float execution of it equals the
deployed integer kernels bit for bit:

    x --Clip(0,c)--QuantizeLinear(c/n_a)--> p (uint8 codes) --DequantizeLinear(scale 1)--> p as float
    W_int (INT4/INT8 = 2q - zero2) --DequantizeLinear(scale 1)--> W_int as float
    Conv/Gemm/MatMul(p, W_int)           -> acc: integer-valued float, exact (|acc| << 2^24)
    Mul(acc, mult[n]) -> Add(bias[n])    -> y   with mult[n] = (alpha[n]/2) * (c/n_a)

A plain QDQ graph (scales inside the DequantizeLinear) rounds every product in float32 and so cannot be matched
exactly by an integer kernel; moving the scales behind the accumulation loses nothing and keeps the graph standard
ONNX that onnxruntime runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from qcompile.errors import ConstantTensorError, QuantizationError
from qcompile.passes.graph_utils import add_const, const_array, node_label, redirect_uses, remove_dead
from qcompile.passes.plan import RECURRENT_OPS
from qcompile.quant import registry
from qcompile.quant.core import QuantizedTensor
from qcompile.quant.gptq import gptq_round

DOREFA_DEFAULT_CLIP = 1.0   # without calibration data, DoReFa's own activation range [0, 1]


@dataclass
class QuantizedLayer:
    """Everything the report, the fuse pass and the code generators need about one quantized layer."""

    node: str
    op: str
    bits_w: int
    bits_a: int
    quantizer: str
    qweight: QuantizedTensor      # codes laid out [N, ...] (output channels first)
    float_weight: np.ndarray      # the float weight, [N, ...], for errors and plots
    clip: float                   # activation clip c; activation scale beta = c / (2^bits_a - 1)
    mult: np.ndarray              # float32 [N]: (alpha/2) * beta
    bias: np.ndarray              # float32 [N]
    clip_source: str              # "calibration (mse)" or "DoReFa default [0,1]"
    act_zero: int = 0             # signed inputs: the codes' zero point z (value = beta * (p - z)); 0 = unsigned

    @property
    def rel_error(self) -> float:
        ref = np.linalg.norm(self.float_weight)
        return float(np.linalg.norm(self.qweight.dequantize() - self.float_weight) / max(ref, 1e-30))

    @property
    def levels_used(self) -> int:
        return int(np.unique(self.qweight.codes).size)

    @property
    def code_entropy(self) -> float:
        """Effective bitwidth: entropy (bits) of the code histogram; k when every level is equally used."""
        counts = np.bincount(self.qweight.codes.ravel(), minlength=2 ** self.bits_w).astype(np.float64)
        p = counts[counts > 0] / counts.sum()
        return float(-(p * np.log2(p)).sum())

    @property
    def bytes_float(self) -> int:
        return 4 * (self.float_weight.size + self.bias.size)

    @property
    def bytes_packed(self) -> int:
        n = self.float_weight.shape[0]
        return -(-self.float_weight.size * self.bits_w // 8) + 4 * n + 4 * self.bias.size  # codes + mult + bias


def core_name(layer: str) -> str:
    """Name of the integer Conv/Gemm/MatMul node that quantize writes for `layer`; fuse and int8 lowering find it by
    this name."""
    return f"{layer}_int"


def weight_bias_correction(w: np.ndarray, wq: np.ndarray, x_mean: np.ndarray) -> np.ndarray:
    """E[W x] - E[Wq x] per output channel, from the calibration mean of each input channel.

    Inputs after a ReLU have a large positive mean, so a quantizer whose errors do not sum to zero over a row
    (balanced bins are centred on the median, not on 0) shifts every output; adding this to the bias cancels the
    shift (the empirical bias correction of Nagel et al., arXiv:1906.04721). Conv: x_mean is per input channel."""
    err = (w.astype(np.float64) - wq.astype(np.float64))
    if err.ndim == 4:  # [N, C, kh, kw]: sum the taps; the activation mean is taken per channel
        err = err.sum(axis=(2, 3))
    if err.shape[1] != x_mean.size:
        return np.zeros(err.shape[0], np.float32)  # grouped conv or a reshape in between: no correction
    return (err @ x_mean).astype(np.float32)


def signed_bounds(bits: int, beta, zero: int) -> tuple[np.float32, np.float32]:
    """Clip bounds of a signed activation grid: lo = -z beta, hi = (n - z) beta (float64 products, one rounding)."""
    n = 2 ** bits - 1
    return np.float32(-zero * float(np.float32(beta))), np.float32((n - zero) * float(np.float32(beta)))


def signed_bias(bias: np.ndarray, mult: np.ndarray, zero: int, int_values: np.ndarray) -> np.ndarray:
    """bias - mult * z * sum_k W_int[n, k], in float64 then rounded once: the Add after the integer accumulator
    over codes p (which include the zero point z) then gives mult * sum (p - z) W + bias."""
    sums = int_values.reshape(int_values.shape[0], -1).astype(np.int64).sum(axis=1)
    return (bias.astype(np.float64) - mult.astype(np.float64) * zero * sums).astype(np.float32)


def _weights_nk(arr: np.ndarray, axis: int) -> np.ndarray:
    """Weights with output channels first (Conv [N,C,kh,kw]; Gemm/MatMul [N,K])."""
    return arr if axis == 0 else arr.T


def _int_tensor(values: np.ndarray) -> tuple[np.ndarray, ir.DataType]:
    """The exact small integers 2q - zero2, in INT4 when they fit (true 4-bit storage), INT8, or INT16 for 8-bit
    weights (2q - zero2 spans [-255, 255] there; DequantizeLinear takes int16 from opset 21)."""
    if values.min() >= -8 and values.max() <= 7:
        return values.astype(np.int8), ir.DataType.INT4
    if values.min() >= -128 and values.max() <= 127:
        return values.astype(np.int8), ir.DataType.INT8
    return values.astype(np.int16), ir.DataType.INT16


class QuantizeLayers:
    """Rewrite every planned layer into the integer-exact fake-quant form above."""

    name = "quantize"

    def __call__(self, model: ir.Model, ctx) -> bool:
        graph = model.graph
        cfg = ctx.config
        act_cache: dict[tuple[str, int, float], ir.Value] = {}
        nodes = {node_label(n): n for n in graph}
        modified = False
        for name, plan in ctx.plan.items():
            if not plan.quantize or plan.op in RECURRENT_OPS:  # recurrent layers: passes/rnn.QuantizeRecurrent
                continue
            node = nodes[name]
            w_arr = const_array(node.inputs[1]).astype(np.float32)
            w_nk = _weights_nk(w_arr, plan.weight_axis)
            spec = registry.get(plan.quantizer)
            try:
                qw = spec.weights(w_nk, plan.bits_w, 0 if cfg.per_channel else None, name)
            except ConstantTensorError as exc:
                plan.mark_float(str(exc).split(": ", 1)[-1])
                continue
            if cfg.weight_rounding == "gptq" and name in ctx.second_moments:  # levels chosen for the output error
                qw = gptq_round(w_nk, qw, ctx.second_moments[name])
            n_out = w_nk.shape[0]
            bias_in = node.inputs[2] if len(node.inputs) > 2 else None
            bias = const_array(bias_in)
            if bias_in is not None and bias is None:
                plan.mark_float("bias is computed at run time")
                continue
            bias = np.zeros(n_out, np.float32) if bias is None else bias.astype(np.float32).reshape(n_out)

            stats = ctx.act_ranges.get(plan.activation)
            trained = ctx.trained_clips.get(name)
            if cfg.bias_correction and stats is not None and stats.channel_mean is not None and trained is None:
                bias = bias + weight_bias_correction(w_nk, qw.dequantize(), stats.channel_mean)
            if name in ctx.trained_biases:
                bias = np.asarray(ctx.trained_biases[name], np.float32).reshape(n_out)
            n_a = 2 ** plan.bits_a - 1
            zero = 0
            if isinstance(trained, tuple):  # fine-tuned signed input: (c, z)
                clip, zero = trained
                clip, zero, clip_source = np.float32(clip), int(zero), "fine-tuned (signed)"
            elif plan.act_signed and trained is None:  # c = hi - lo, the zero point puts lo on the grid
                lo, hi = stats.signed_range(cfg.act_clip, plan.bits_a)
                clip, clip_source = hi - lo, f"calibration ({cfg.act_clip}, signed)"
                zero = int(np.clip(np.rint(-lo / float(np.float32(clip / n_a))), 0, n_a)) if clip > 0 else 0
            elif trained is not None:  # fine-tuned: the clip and bias were trained with the quantizer in the loop
                clip, clip_source = np.float32(trained), "fine-tuned"
            elif stats is not None:
                clip, clip_source = stats.clip(cfg.act_clip, plan.bits_a), f"calibration ({cfg.act_clip})"
            else:
                clip, clip_source = DOREFA_DEFAULT_CLIP, "DoReFa default [0,1] (no calibration data)"
            if not clip > 0:
                plan.mark_float("input activation range is empty on the calibration data")
                continue
            beta = np.float32(clip / n_a)
            alpha_half = (np.broadcast_to(np.asarray(qw.scale, np.float64).reshape(-1), (n_out,)) / 2)
            mult = (alpha_half * float(beta)).astype(np.float32)
            if not np.all(np.isfinite(mult)):
                raise QuantizationError(f"{name}: non-finite scale; check the weights for extreme values")

            x_q = self._activation(graph, node, plan.activation, plan.bits_a, float(clip), float(beta), act_cache,
                                   zero)
            if zero:  # acc over codes p counts z too: sum (p - z) W = acc - z * sum W, folded into the bias
                bias = signed_bias(bias, mult, zero, qw.int_values())
            ints, dtype = _int_tensor(qw.int_values())
            w_int = add_const(graph, f"{plan.weight}_q{plan.bits_w}", _weights_nk(ints, plan.weight_axis), dtype)
            one = add_const(graph, f"{name}_one", np.float32(1.0))
            w_dq = ir.node("DequantizeLinear", [w_int, one], name=f"{name}_wdq")
            attrs = {k: v for k, v in node.attributes.items()}
            pads = list(node.attributes.get_ints("pads", [0, 0, 0, 0])) if node.op_type == "Conv" else []
            if zero and any(pads):  # a signed input pads with its zero point: Pad the codes with z, conv unpadded
                x_q = self._pad_codes(graph, node, x_q, pads, zero, name)
                attrs["pads"] = ir.AttrInt64s("pads", [0] * len(pads))
            core = ir.node(node.op_type, [x_q, w_dq.outputs[0]], attributes=attrs, name=core_name(name))
            shape = (1, n_out, 1, 1) if node.op_type == "Conv" else (n_out,)
            mul = ir.node("Mul", [core.outputs[0], add_const(graph, f"{name}_mult", mult.reshape(shape))],
                          name=f"{name}_scale")
            add = ir.node("Add", [mul.outputs[0], add_const(graph, f"{name}_bias", bias.reshape(shape))],
                          name=f"{name}_bias")
            graph.insert_before(node, [w_dq, core, mul, add])
            redirect_uses(node.outputs[0], add.outputs[0])
            graph.remove(node, safe=True)
            ctx.layers[name] = QuantizedLayer(name, node.op_type, plan.bits_w, plan.bits_a, plan.quantizer, qw,
                                              w_nk, float(clip), mult, bias, clip_source, zero)
            modified = True
        remove_dead(model)
        return modified

    @staticmethod
    def _pad_codes(graph, consumer, codes_float: ir.Value, pads, zero: int, name: str) -> ir.Value:
        """QuantizeLinear -> Pad(codes, value z) -> DequantizeLinear(1): value 0 at the border is code z, as in the
        float conv; the BitConv then reads the padded codes with pads 0, so its kernels stay unchanged."""
        dq = codes_float.producer()
        codes = dq.inputs[0]
        half = len(pads) // 2
        onnx_pads = [0, 0, *pads[:half], 0, 0, *pads[half:]]
        pad = ir.node("Pad", [codes, add_const(graph, f"{name}_pads", np.asarray(onnx_pads, np.int64)),
                              add_const(graph, f"{name}_padz", np.uint8(zero))], name=f"{name}_padcodes")
        pad.outputs[0].dtype = ir.DataType.UINT8
        new_dq = ir.node("DequantizeLinear", [pad.outputs[0], *dq.inputs[1:]], name=f"{name}_padded_codes")
        graph.insert_before(consumer, [pad, new_dq])
        return new_dq.outputs[0]

    @staticmethod
    def _activation(graph, consumer, value_name, bits, clip, beta, cache, zero_point: int = 0) -> ir.Value:
        """Clip(lo, hi) -> QuantizeLinear(beta, z) -> DequantizeLinear(scale 1, 0): the codes p as exact floats,
        shared. Unsigned: lo = 0, hi = c, z = 0. Signed: lo = -z beta, hi = (n - z) beta, so p = round(x/beta) + z
        stays in [0, n]."""
        key = (value_name, bits, clip, zero_point)
        if key in cache:
            return cache[key]
        x = consumer.inputs[0]
        base = value_name.replace("/", "_")
        lo_v, hi_v = signed_bounds(bits, beta, zero_point) if zero_point else (np.float32(0.0), np.float32(clip))
        lo = add_const(graph, f"{base}_lo", lo_v)
        hi = add_const(graph, f"{base}_hi", hi_v)
        scale = add_const(graph, f"{base}_a{bits}_scale", np.float32(beta))
        zero = add_const(graph, f"{base}_a{bits}_zero", np.uint8(0))
        qzero = add_const(graph, f"{base}_a{bits}_z", np.uint8(zero_point)) if zero_point else zero
        one = add_const(graph, f"{base}_a{bits}_one", np.float32(1.0))
        clip_n = ir.node("Clip", [x, lo, hi], name=f"{base}_clip")
        q = ir.node("QuantizeLinear", [clip_n.outputs[0], scale, qzero], name=f"{base}_quant{bits}")
        dq = ir.node("DequantizeLinear", [q.outputs[0], one, zero], name=f"{base}_codes{bits}")
        graph.insert_before(consumer, [clip_n, q, dq])
        cache[key] = dq.outputs[0]
        return dq.outputs[0]
