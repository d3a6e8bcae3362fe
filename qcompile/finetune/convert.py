"""ONNX -> PyTorch (torch.fx) for quantization-aware fine-tuning.

`to_torch(model)` builds a torch.fx.Graph node by node (no tracing) and returns a GraphModule whose forward(*inputs)
takes the graph inputs in order. Each Conv, Gemm and MatMul whose weight is a stored float constant (an initializer
or a Constant) becomes a `WeightedLayer` submodule: its weight is an nn.Parameter in the ONNX layout and all of the
op's math sits in `functional(x, weight, bias)`, the seam a quantization wrapper uses to feed quantized weights and
inputs. BatchNormalization keeps its inference form (running statistics) with trainable scale and bias; LSTM and GRU
become `finetune.recurrent.RecurrentLayer` (W, R, B Parameters in the ONNX layout; passes/rnn.run's arithmetic), a
Gather from a stored float table by computed indices (an embedding) a `GatherTable` whose table is a Parameter;
every other constant is a buffer. Nodes whose inputs are all constant are evaluated once here (shape arithmetic,
Constant).
"""

from __future__ import annotations

import keyword
import math
import operator
import re
from typing import Any, Callable

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import TensorProto, numpy_helper
from torch import fx, nn
from torch.fx.node import map_aggregate

from qcompile.errors import QcompileError


class UnsupportedOpError(QcompileError):
    """An op, or an attribute of one, that the fine-tuning converter does not implement."""


# ---------------------------------------------------------------------------------------------------------------
# The op math, as plain functions of tensors: run at conversion time when all inputs are constant, else in forward.

def _pair_pads(begin, end) -> list[int]:
    """ONNX [b1..bn, e1..en] (first spatial axis first) -> F.pad's (last axis first) [bn, en, ..., b1, e1]."""
    out = []
    for b, e in zip(reversed(begin), reversed(end)):
        out += [b, e]
    return out


def _resolve_pads(x, kernel, strides, dilations, pads, auto_pad):
    """The explicit (begin, end) pads of a conv/pool window, from `pads` or from auto_pad and the input size."""
    n = len(kernel)
    if auto_pad in ("NOTSET", ""):
        pads = list(pads) if pads else [0] * (2 * n)
        return pads[:n], pads[n:]
    if auto_pad == "VALID":
        return [0] * n, [0] * n
    begin, end = [], []
    for size, k, s, d in zip(x.shape[2:], kernel, strides, dilations):
        total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
        small, big = total // 2, total - total // 2
        begin.append(small if auto_pad == "SAME_UPPER" else big)   # SAME_UPPER puts the odd pixel at the end
        end.append(big if auto_pad == "SAME_UPPER" else small)
    return begin, end


def _ceil_extra(x, kernel, strides, dilations, begin, end):
    """Extra end padding that makes a floor-mode pool give ONNX's ceil_mode output size (as onnxruntime does:
    a last window that would start inside the end padding is dropped)."""
    extra = []
    for size, k, s, d, b, e in zip(x.shape[2:], kernel, strides, dilations, begin, end):
        span, dk = size + b + e, (k - 1) * d + 1
        out = math.ceil((span - dk) / s) + 1
        if (out - 1) * s >= size + b:
            out -= 1
        extra.append(max((out - 1) * s + dk - span, 0))
    return extra


def conv(x, weight, bias, *, group=1, strides=None, pads=None, dilations=None, auto_pad="NOTSET"):
    n = weight.dim() - 2
    strides, dilations = strides or [1] * n, dilations or [1] * n
    begin, end = _resolve_pads(x, weight.shape[2:], strides, dilations, pads, auto_pad)
    if begin != end:  # torch convs pad symmetrically only
        x, begin = F.pad(x, _pair_pads(begin, end)), [0] * n
    return (F.conv1d, F.conv2d, F.conv3d)[n - 1](x, weight, bias, strides, begin, dilations, group)


def gemm(x, weight, bias, *, alpha=1.0, beta=1.0, trans_a=0, trans_b=0):
    a = x.t() if trans_a else x
    if alpha == 1.0 and beta == 1.0 and trans_b and bias is not None and bias.dim() == 1:
        return F.linear(a, weight, bias)  # the common case, one fused addmm
    y = a @ (weight.t() if trans_b else weight)
    if alpha != 1.0:
        y = alpha * y
    if bias is not None:
        y = y + (bias if beta == 1.0 else beta * bias)
    return y


def matmul(x, weight, bias=None):
    y = torch.matmul(x, weight)
    return y if bias is None else y + bias


def max_pool(x, *, kernel, strides, pads, dilations, ceil_mode, auto_pad):
    begin, end = _resolve_pads(x, kernel, strides, dilations, pads, auto_pad)
    if ceil_mode:
        end = [e + c for e, c in zip(end, _ceil_extra(x, kernel, strides, dilations, begin, end))]
    if any(begin) or any(end):  # explicit -inf padding: ONNX allows any pads, torch at most half a window
        x = F.pad(x, _pair_pads(begin, end), value=-math.inf)
    n = len(kernel)
    return (F.max_pool1d, F.max_pool2d, F.max_pool3d)[n - 1](x, kernel, strides, 0, dilations)


def avg_pool(x, *, kernel, strides, pads, ceil_mode, count_include_pad, auto_pad):
    n = len(kernel)
    pool = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[n - 1]
    begin, end = _resolve_pads(x, kernel, strides, [1] * n, pads, auto_pad)
    extra = _ceil_extra(x, kernel, strides, [1] * n, begin, end) if ceil_mode else [0] * n
    if not any(begin + end + extra):
        return pool(x, kernel, strides)
    # Pad explicitly and divide by the pooled count of the cells that count: covers any pads, ceil_mode and
    # count_include_pad, which torch's own padding argument cannot all express.
    full = _pair_pads(begin, [e + c for e, c in zip(end, extra)])
    ones = x.new_ones((1, 1, *x.shape[2:]))
    if count_include_pad:  # the pads count, the ceil-mode overhang does not
        count = F.pad(F.pad(ones, _pair_pads(begin, end), value=1.0), _pair_pads([0] * n, extra))
    else:
        count = F.pad(ones, full)
    return pool(F.pad(x, full), kernel, strides) / pool(count, kernel, strides)


def batch_norm(x, scale, bias, mean, var, *, epsilon=1e-5):
    return F.batch_norm(x, mean, var, scale, bias, False, 0.0, epsilon)


def reshape(x, shape, allowzero=0):
    shape = shape.tolist() if torch.is_tensor(shape) else list(shape)
    if not allowzero:  # 0 copies the input's dimension (this keeps the batch dynamic)
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return x.reshape(shape)


def flatten(x, axis=1):
    axis = axis % x.dim() if x.dim() else 0
    return x.reshape(math.prod(x.shape[:axis]), -1)


def softmax_2d(x, axis):
    """Softmax before opset 13: over the input flattened to 2-D at `axis`."""
    return torch.softmax(flatten(x, axis), dim=1).reshape(x.shape)


def log_softmax_2d(x, axis):
    return torch.log_softmax(flatten(x, axis), dim=1).reshape(x.shape)


def transpose(x, perm=None):
    return x.permute(perm if perm else list(range(x.dim() - 1, -1, -1)))


def cast(x, dtype):
    return x.to(dtype)


def clip(x, lo=None, hi=None):
    return x if lo is None and hi is None else torch.clamp(x, lo, hi)


def add_scaled(y, c, beta):
    return y + beta * c


def global_avg_pool(x):
    return torch.mean(x, dim=tuple(range(2, x.dim())), keepdim=True)


def global_max_pool(x):
    return torch.amax(x, dim=tuple(range(2, x.dim())), keepdim=True)


def unsqueeze(x, axes):
    rank = x.dim() + len(axes)
    for a in sorted(a % rank for a in axes):
        x = x.unsqueeze(a)
    return x


def squeeze(x, axes=None):
    return x.squeeze() if axes is None else x.squeeze(tuple(axes))


def gather(x, indices, axis=0):
    axis = axis % x.dim()
    idx = indices.long()
    idx = torch.where(idx < 0, idx + x.shape[axis], idx)  # ONNX allows negative indices
    out = torch.index_select(x, axis, idx.reshape(-1))
    return out.reshape((*x.shape[:axis], *indices.shape, *x.shape[axis + 1:]))


def shape_of(x, start=0, end=None):
    return torch.tensor(x.shape[start:end], dtype=torch.int64)


def _reduce(fn, x, axes, keepdims):
    return fn(x, dim=tuple(axes) if axes else tuple(range(x.dim())), keepdim=bool(keepdims))  # no axes: all


def reduce_mean(x, axes, keepdims):
    return _reduce(torch.mean, x, axes, keepdims)


def reduce_sum(x, axes, keepdims):
    return _reduce(torch.sum, x, axes, keepdims)


def reduce_max(x, axes, keepdims):
    return _reduce(torch.amax, x, axes, keepdims)


def reduce_min(x, axes, keepdims):
    return _reduce(torch.amin, x, axes, keepdims)


def div(a, b):
    if not a.is_floating_point() and not b.is_floating_point():
        return torch.div(a, b, rounding_mode="trunc")  # ONNX integer division truncates
    return a / b


def pad(x, pads, value=0.0, axes=None):
    pads = [int(p) for p in (pads.tolist() if torch.is_tensor(pads) else pads)]
    axes = list(range(x.dim())) if axes is None else [a % x.dim() for a in axes]
    begin, end = [0] * x.dim(), [0] * x.dim()
    for i, a in enumerate(axes):
        begin[a], end[a] = pads[i], pads[len(axes) + i]
    return F.pad(x, _pair_pads(begin, end), value=float(value))


def slice_(x, starts, ends, axes=None, steps=None):
    index = [slice(None)] * x.dim()
    axes = range(len(starts)) if axes is None else axes
    steps = [1] * len(starts) if steps is None else steps
    for s, e, a, st in zip(starts, ends, axes, steps):
        if st < 0:
            raise NotImplementedError("negative Slice steps")
        index[a % x.dim()] = slice(s, e, st)
    return x[tuple(index)]


def _axis_shape(t, x, axis):
    """Shape a per-axis (1-D) scale or zero point to broadcast along `axis` of x; scalars stay as they are."""
    if t.dim() != 1 or t.numel() == 1:
        return t
    shape = [1] * x.dim()
    shape[axis % x.dim()] = -1
    return t.reshape(shape)


# QuantizeLinear output range and the torch dtype that holds its codes (4-bit codes ride in 8-bit tensors)
_QRANGE = {TensorProto.UINT8: (0, 255, torch.uint8), TensorProto.INT8: (-128, 127, torch.int8),
           TensorProto.UINT4: (0, 15, torch.uint8), TensorProto.INT4: (-8, 7, torch.int8),
           TensorProto.INT16: (-32768, 32767, torch.int16), TensorProto.UINT16: (0, 65535, torch.int32)}


def quantize_linear(x, scale, zero=None, *, axis=1, qtype=TensorProto.UINT8):
    lo, hi, dtype = _QRANGE[qtype]
    q = torch.round(x / _axis_shape(scale, x, axis))  # round half to even, as ONNX
    if zero is not None:
        q = q + _axis_shape(zero, x, axis).to(q.dtype)
    return q.clamp(lo, hi).to(dtype)


def dequantize_linear(x, scale, zero=None, *, axis=1):
    x = x.to(torch.float32)
    if zero is not None:
        x = x - _axis_shape(zero, x, axis).to(torch.float32)
    return x * _axis_shape(scale, x, axis)


# ---------------------------------------------------------------------------------------------------------------
# Modules

class WeightedLayer(nn.Module):
    """A Conv/Gemm/MatMul with a constant weight. All of the op's math is in `functional`."""

    op_type = ""

    def __init__(self, onnx_name: str = "", weight: nn.Parameter | None = None, bias: nn.Parameter | None = None,
                 **attrs):
        super().__init__()
        self.onnx_name = onnx_name
        self.weight = weight
        self.bias = bias
        self.attrs = attrs  # the op's attributes, as functional() passes them to the math

    def functional(self, x, weight, bias):
        raise NotImplementedError

    def forward(self, x):
        return self.functional(x, self.weight, self.bias)

    def extra_repr(self):
        shape = None if self.weight is None else tuple(self.weight.shape)
        return f"{self.onnx_name!r}, weight={shape}, bias={self.bias is not None}, {self.attrs}"


class ConvLayer(WeightedLayer):
    op_type = "Conv"

    def functional(self, x, weight, bias):
        return conv(x, weight, bias, **self.attrs)


class GemmLayer(WeightedLayer):
    op_type = "Gemm"

    def functional(self, x, weight, bias):
        return gemm(x, weight, bias, **self.attrs)


class MatMulLayer(WeightedLayer):
    op_type = "MatMul"

    def functional(self, x, weight, bias):
        return matmul(x, weight, bias)


class GatherTable(nn.Module):
    """A Gather from a stored float table by indices computed in forward (an embedding). The table is an
    nn.Parameter so a language model's fine-tuning can train it; `finetune.api.build_student` leaves it frozen."""

    def __init__(self, onnx_name: str, weight: nn.Parameter, axis: int = 0):
        super().__init__()
        self.onnx_name, self.weight, self.axis = onnx_name, weight, axis

    def forward(self, indices):
        return gather(self.weight, indices, self.axis)


class BatchNorm(nn.Module):
    """Inference BatchNormalization: trainable scale and bias, frozen running statistics."""

    def __init__(self, scale, bias, mean, var, epsilon):
        super().__init__()
        self.weight, self.bias, self.epsilon = scale, bias, epsilon
        self.register_buffer("running_mean", mean)
        self.register_buffer("running_var", var)

    def forward(self, x):
        return batch_norm(x, self.weight, self.bias, self.running_mean, self.running_var, epsilon=self.epsilon)


# ---------------------------------------------------------------------------------------------------------------
# Graph building

Value = Any  # an fx.Node (computed in forward), a torch.Tensor (a constant), or None (an absent optional input)


def _label(node: onnx.NodeProto, index: int) -> str:
    return node.name or f"{node.op_type}_{index}"  # unnamed nodes get their op and position


def _tensor(arr: np.ndarray) -> torch.Tensor:
    if arr.dtype.name in ("int4", "uint4"):  # ml_dtypes' 4-bit types: hold the values in 8 bits
        arr = arr.astype(np.int8 if arr.dtype.name == "int4" else np.uint8)
    elif arr.dtype == np.uint16:
        arr = arr.astype(np.int32)
    elif arr.dtype == np.uint32:
        arr = arr.astype(np.int64)
    return torch.from_numpy(np.array(arr))  # a copy: writable, and not tied to the proto


class _Builder:
    def __init__(self, model: onnx.ModelProto):
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
        self.graph = fx.Graph()
        self.root = nn.Module()
        self.values: dict[str, Value] = {}
        self.elem_type: dict[str, int] = {}   # ONNX element type of each value, for QuantizeLinear's output type
        self.stored: set[str] = set()          # values stored in the model: initializers and Constant outputs
        self._attr_names: set[str] = set()
        self._lifted: dict[int, fx.Node] = {}  # id(constant tensor) -> its get_attr node
        self._const_name: dict[int, str] = {}  # id(constant tensor) -> the ONNX value it came from
        self._params: dict[str, nn.Parameter] = {}

    # -- names --------------------------------------------------------------------------------------------------
    def unique(self, name: str) -> str:
        """A torch attribute name for an ONNX name: identifier characters only, unique, clear of nn.Module's."""
        s = re.sub(r"_+", "_", re.sub(r"\W", "_", name, flags=re.ASCII)).strip("_") or "v"
        if s[0].isdigit() or keyword.iskeyword(s):
            s = "n_" + s
        base, i = s, 1
        while s in self._attr_names or hasattr(fx.GraphModule, s) or hasattr(self.root, s):
            i += 1
            s = f"{base}_{i}"
        self._attr_names.add(s)
        return s

    # -- constants ----------------------------------------------------------------------------------------------
    def set_const(self, name: str, t: torch.Tensor):
        self.values[name] = t
        self._const_name.setdefault(id(t), name)

    def param(self, onnx_value: str) -> nn.Parameter:
        """The trainable float32 Parameter of an ONNX constant; one per value, so tied weights stay tied."""
        if onnx_value not in self._params:
            self._params[onnx_value] = nn.Parameter(self.values[onnx_value].detach().to(torch.float32).clone())
        return self._params[onnx_value]

    def _lift(self, v):
        if not isinstance(v, torch.Tensor):
            return v
        if id(v) not in self._lifted:
            name = self.unique("c_" + self._const_name.get(id(v), "const"))
            self.root.register_buffer(name, v)
            self._lifted[id(v)] = self.graph.get_attr(name)
        return self._lifted[id(v)]

    # -- emitting -----------------------------------------------------------------------------------------------
    def call(self, fn: Callable, *args, **kwargs) -> Value:
        """fn(*args, **kwargs) in forward, or now when no argument is computed in forward (constant folding)."""
        dynamic = []
        map_aggregate((args, kwargs), lambda a: dynamic.append(a) if isinstance(a, fx.Node) else None)
        if not dynamic:
            with torch.no_grad():
                return fn(*args, **kwargs)
        args, kwargs = map_aggregate((args, kwargs), self._lift)
        return self.graph.call_function(fn, tuple(args), dict(kwargs))

    def module(self, mod: nn.Module, name: str, *args) -> fx.Node:
        target = self.unique(name)
        self.root.add_module(target, mod)
        return self.graph.call_module(target, tuple(self._lift(a) for a in args))

    def outputs(self, node: fx.Node | Any, count: int) -> list[Value]:
        if not isinstance(node, fx.Node):
            return list(node)
        return [self.graph.call_function(operator.getitem, (node, i)) for i in range(count)]


class _Node:
    """What a handler sees of one ONNX node: its label, attributes and input values."""

    def __init__(self, b: _Builder, node: onnx.NodeProto, label: str):
        self.b, self.proto, self.label, self.op = b, node, label, node.op_type
        self.attrs = {a.name: _attr_value(a) for a in node.attribute}
        self.inputs = [b.values[i] if i else None for i in node.input]
        self.input_names = list(node.input)

    def inp(self, i: int) -> Value:
        return self.inputs[i] if i < len(self.inputs) else None

    def is_const(self, i: int) -> bool:
        return isinstance(self.inp(i), torch.Tensor)

    def ints(self, i: int, what: str) -> list[int] | None:
        """A constant integer-list input (axes, shape, pads) as a Python list; None when absent."""
        v = self.inp(i)
        if v is None:
            return None
        if not isinstance(v, torch.Tensor):
            self.fail(f"{what} must be a constant")
        return [int(t) for t in v.reshape(-1).tolist()]

    def fail(self, why: str):
        raise UnsupportedOpError(f"node '{self.label}' (op {self.op}): {why}; not supported by the fine-tuning "
                                 "converter")

    def only(self, **allowed):
        """Refuse attribute values the converter does not implement (rather than answer wrongly)."""
        for name, ok in allowed.items():
            if name in self.attrs and not ok(self.attrs[name]):
                self.fail(f"attribute {name}={self.attrs[name]!r}")


def _attr_value(a: onnx.AttributeProto):
    v = onnx.helper.get_attribute_value(a)
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, onnx.TensorProto):
        return _tensor(numpy_helper.to_array(v))
    return v


# ---------------------------------------------------------------------------------------------------------------
# Handlers: one small function per op, (builder, node) -> output value or list of output values.

_PADS_OK = ("NOTSET", "VALID", "SAME_UPPER", "SAME_LOWER")


def _weighted(b, n, cls, fn, attrs, with_bias=True):
    """A WeightedLayer when the weight is a stored float constant, else the same math as a plain call. A weight
    computed from other constants (DequantizeLinear of codes in a fake-quant model) is already quantized: it stays
    a frozen constant rather than becoming a free Parameter."""
    x, w, bias = n.inp(0), n.inp(1), n.inp(2) if with_bias else None
    if not (n.input_names[1] in b.stored and w.is_floating_point()):
        return b.call(fn, x, w, bias, **attrs)
    layer = cls(n.label, b.param(n.input_names[1]), None if bias is None else b.param(n.input_names[2]), **attrs)
    return b.module(layer, n.label, x)


def _conv(b, n):
    n.only(auto_pad=lambda v: v in _PADS_OK)
    w = n.inp(1)
    if isinstance(w, torch.Tensor) and w.dim() not in (3, 4, 5):
        n.fail(f"{w.dim()}-D weight (1-D, 2-D and 3-D convolutions only)")
    if n.inp(2) is not None and not n.is_const(2):
        n.fail("a bias computed in forward")
    a = n.attrs
    return _weighted(b, n, ConvLayer, conv, dict(group=a.get("group", 1), strides=a.get("strides"),
                                                 pads=a.get("pads"), dilations=a.get("dilations"),
                                                 auto_pad=a.get("auto_pad", "NOTSET")))


def _gemm(b, n):
    a = n.attrs
    attrs = dict(alpha=a.get("alpha", 1.0), beta=a.get("beta", 1.0), trans_a=a.get("transA", 0),
                 trans_b=a.get("transB", 0))
    if n.inp(2) is None or n.is_const(2) or not n.is_const(1):
        return _weighted(b, n, GemmLayer, gemm, attrs)
    y = _weighted(b, n, GemmLayer, gemm, attrs, with_bias=False)  # C computed in forward: added after the layer
    return b.call(add_scaled, y, n.inp(2), attrs["beta"])


def _batchnorm(b, n):
    n.only(training_mode=lambda v: v == 0)
    if len([o for o in n.proto.output if o]) > 1:
        n.fail("the training outputs (running mean/var)")
    eps = n.attrs.get("epsilon", 1e-5)
    if all(n.is_const(i) for i in range(1, 5)):
        scale, bias = b.param(n.input_names[1]), b.param(n.input_names[2])
        return b.module(BatchNorm(scale, bias, n.inp(3).float(), n.inp(4).float(), eps), n.label, n.inp(0))
    return b.call(batch_norm, *n.inputs[:5], epsilon=eps)


def layer_norm(x, scale, bias, *, axis, epsilon):
    """ONNX LayerNormalization: normalize over axes [axis, rank), then scale and shift."""
    shape = x.shape[axis % x.dim():]
    return F.layer_norm(x, shape, scale.expand(shape), None if bias is None else bias.expand(shape), epsilon)


def _layernorm(b, n):
    if len([o for o in n.proto.output if o]) > 1:
        n.fail("the Mean / InvStdDev outputs")
    return b.call(layer_norm, n.inp(0), n.inp(1), n.inp(2), axis=n.attrs.get("axis", -1),
                  epsilon=n.attrs.get("epsilon", 1e-5))


def _gather(b, n):
    table, indices = n.inp(0), n.inp(1)
    if (n.input_names[0] in b.stored and isinstance(table, torch.Tensor) and table.is_floating_point()
            and not isinstance(indices, torch.Tensor)):
        return b.module(GatherTable(n.label, b.param(n.input_names[0]), n.attrs.get("axis", 0)), n.label, indices)
    return b.call(gather, table, indices, n.attrs.get("axis", 0))


def _recurrent(b, n):
    """ONNX LSTM/GRU -> finetune.recurrent.RecurrentLayer (W, R, B Parameters in the ONNX layout); what
    passes/rnn.recurrent_spec refuses (activations, clip, input_forget, peepholes) is an UnsupportedOpError."""
    from qcompile.finetune.recurrent import RecurrentLayer
    from qcompile.passes.rnn import UnsupportedRecurrent, recurrent_spec

    def constant(name):
        v = b.values.get(name) if name else None
        return v.detach().numpy() if isinstance(v, torch.Tensor) else None

    try:
        spec = recurrent_spec(n.proto, constant)
    except UnsupportedRecurrent as exc:
        n.fail(str(exc).split(": ", 1)[-1].replace("; kept in float", ""))
    names = n.input_names + [""] * 8
    bias = b.param(names[3]) if names[3] else nn.Parameter(
        torch.zeros(spec.num_directions, 2 * spec.W.shape[1], dtype=torch.float32))
    layer = RecurrentLayer(n.label, spec.cell, spec.direction, spec.hidden, b.param(names[1]), b.param(names[2]),
                           bias, linear_before_reset=spec.linear_before_reset, layout=spec.layout, x_name=names[0],
                           bias_name=names[3])
    node = b.module(layer, n.label, n.inp(0), n.inp(4), n.inp(5), n.inp(6) if spec.cell == "LSTM" else None)
    return b.outputs(node, len(n.proto.output))


def _pool_attrs(n):
    a = n.attrs
    if not 1 <= len(a["kernel_shape"]) <= 3:
        n.fail("kernel rank (1-D, 2-D and 3-D pools only)")
    return dict(kernel=a["kernel_shape"], strides=a.get("strides") or [1] * len(a["kernel_shape"]),
                pads=a.get("pads"), ceil_mode=a.get("ceil_mode", 0), auto_pad=a.get("auto_pad", "NOTSET"))


def _maxpool(b, n):
    n.only(storage_order=lambda v: v == 0, auto_pad=lambda v: v in _PADS_OK)
    if len(n.proto.output) > 1 and n.proto.output[1]:
        n.fail("the Indices output")
    attrs = _pool_attrs(n)
    return b.call(max_pool, n.inp(0), dilations=n.attrs.get("dilations") or [1] * len(attrs["kernel"]), **attrs)


def _avgpool(b, n):
    n.only(dilations=lambda v: all(d == 1 for d in v), auto_pad=lambda v: v in _PADS_OK)
    return b.call(avg_pool, n.inp(0), count_include_pad=n.attrs.get("count_include_pad", 0), **_pool_attrs(n))


def _clip(b, n):
    if b.opset < 11:  # bounds were attributes
        return b.call(clip, n.inp(0), n.attrs.get("min"), n.attrs.get("max"))
    return b.call(clip, n.inp(0), n.inp(1), n.inp(2))


def _softmax(fn, fn_2d):
    def handler(b, n):
        if b.opset >= 13:  # one axis
            return b.call(fn, n.inp(0), dim=n.attrs.get("axis", -1))
        return b.call(fn_2d, n.inp(0), n.attrs.get("axis", 1))
    return handler


def _reshape(b, n):
    shape = n.ints(1, "the shape") if n.is_const(1) else n.inp(1)  # a shape computed in forward is read there
    return b.call(reshape, n.inp(0), shape, n.attrs.get("allowzero", 0))


def _axes(b, n, since: int):
    """Axes: an attribute before opset `since`, an optional constant input from then on."""
    return n.attrs.get("axes") if b.opset < since else n.ints(1, "axes")


def _reduce_op(fn, since):
    def handler(b, n):
        axes = _axes(b, n, since)
        if not axes and n.attrs.get("noop_with_empty_axes", 0):
            return n.inp(0)
        return b.call(fn, n.inp(0), axes, n.attrs.get("keepdims", 1))
    return handler


def _pad(b, n):
    n.only(mode=lambda v: v == "constant")
    if b.opset < 11:
        return b.call(pad, n.inp(0), n.attrs["pads"], n.attrs.get("value", 0.0))
    value = n.inp(2)
    if value is not None and not n.is_const(2):
        n.fail("a constant_value computed in forward")
    return b.call(pad, n.inp(0), n.ints(1, "pads"), 0.0 if value is None else value.item(), n.ints(3, "axes"))


# ONNX element types Cast may target, as torch dtypes
_CAST = {TensorProto.FLOAT: torch.float32, TensorProto.DOUBLE: torch.float64, TensorProto.FLOAT16: torch.float16,
         TensorProto.INT64: torch.int64, TensorProto.INT32: torch.int32, TensorProto.INT8: torch.int8,
         TensorProto.UINT8: torch.uint8, TensorProto.BOOL: torch.bool}


def _cast(b, n):
    if n.attrs["to"] not in _CAST:
        n.fail(f"cast to {TensorProto.DataType.Name(n.attrs['to'])}")
    return b.call(cast, n.inp(0), _CAST[n.attrs["to"]])


def _constant(b, n):
    a = n.attrs
    if "value" in a:
        return a["value"]
    for key, dtype in (("value_float", torch.float32), ("value_floats", torch.float32),
                       ("value_int", torch.int64), ("value_ints", torch.int64)):
        if key in a:
            return torch.tensor(a[key], dtype=dtype)
    n.fail(f"attribute {next(iter(a), 'none')}")


def _constant_of_shape(b, n):
    value = n.attrs.get("value", torch.zeros(1))
    return b.call(full, n.inp(0), value.item(), value.dtype)


def full(shape, value, dtype):
    return torch.full(shape.tolist(), value, dtype=dtype)


def _slice(b, n):
    if b.opset < 10:  # starts/ends/axes were attributes
        return b.call(slice_, n.inp(0), n.attrs["starts"], n.attrs["ends"], n.attrs.get("axes"))
    steps = n.ints(4, "steps")
    if steps and any(s < 0 for s in steps):
        n.fail("negative steps")
    return b.call(slice_, n.inp(0), n.ints(1, "starts"), n.ints(2, "ends"), n.ints(3, "axes"), steps)


def _dropout(b, n):
    outs = [n.inp(0)]
    if len(n.proto.output) > 1 and n.proto.output[1]:  # the mask of an inference Dropout keeps everything
        outs.append(b.call(torch.ones_like, n.inp(0), dtype=torch.bool))
    return outs


def _quantize(b, n):
    n.only(block_size=lambda v: v == 0)
    zero = n.input_names[2] if len(n.input_names) > 2 else ""
    qtype = b.elem_type.get(zero) if zero else (n.attrs.get("output_dtype") or TensorProto.UINT8)
    if qtype not in _QRANGE:
        n.fail(f"output type {TensorProto.DataType.Name(qtype) if qtype else 'unknown'}")
    return b.call(quantize_linear, n.inp(0), n.inp(1), n.inp(2), axis=n.attrs.get("axis", 1), qtype=qtype)


def _dequantize(b, n):
    n.only(block_size=lambda v: v == 0)
    return b.call(dequantize_linear, n.inp(0), n.inp(1), n.inp(2), axis=n.attrs.get("axis", 1))


def _unary(fn):
    return lambda b, n: b.call(fn, n.inp(0))


def _binary(fn):
    return lambda b, n: b.call(fn, n.inp(0), n.inp(1))


OPS: dict[str, Callable[[_Builder, _Node], Value]] = {
    "Conv": _conv, "Gemm": _gemm, "MatMul": lambda b, n: _weighted(b, n, MatMulLayer, matmul, {}),
    "BatchNormalization": _batchnorm, "LayerNormalization": _layernorm,
    "Relu": _unary(torch.relu), "Sigmoid": _unary(torch.sigmoid), "Tanh": _unary(torch.tanh),
    "Exp": _unary(torch.exp), "Log": _unary(torch.log), "Sqrt": _unary(torch.sqrt), "Erf": _unary(torch.erf),
    "Neg": _unary(torch.neg), "Abs": _unary(torch.abs), "Reciprocal": _unary(torch.reciprocal),
    "LeakyRelu": lambda b, n: b.call(F.leaky_relu, n.inp(0), n.attrs.get("alpha", 0.01)),
    "Gelu": lambda b, n: b.call(F.gelu, n.inp(0), approximate=n.attrs.get("approximate", "none")),
    "Clip": _clip,
    "Add": _binary(operator.add), "Sub": _binary(operator.sub), "Mul": _binary(operator.mul), "Div": _binary(div),
    "Pow": _binary(torch.pow),
    "MaxPool": _maxpool, "AveragePool": _avgpool,
    "GlobalAveragePool": _unary(global_avg_pool), "GlobalMaxPool": _unary(global_max_pool),
    "Softmax": _softmax(torch.softmax, softmax_2d), "LogSoftmax": _softmax(torch.log_softmax, log_softmax_2d),
    "Flatten": lambda b, n: b.call(flatten, n.inp(0), n.attrs.get("axis", 1)),
    "Reshape": _reshape,
    "Transpose": lambda b, n: b.call(transpose, n.inp(0), n.attrs.get("perm")),
    "Concat": lambda b, n: b.call(torch.cat, list(n.inputs), dim=n.attrs["axis"]),
    "Squeeze": lambda b, n: b.call(squeeze, n.inp(0), _axes(b, n, 13)),
    "Unsqueeze": lambda b, n: b.call(unsqueeze, n.inp(0), _axes(b, n, 13)),
    "Identity": lambda b, n: n.inp(0), "Dropout": _dropout,
    "Shape": lambda b, n: b.call(shape_of, n.inp(0), n.attrs.get("start", 0), n.attrs.get("end")),
    "Gather": _gather, "LSTM": _recurrent, "GRU": _recurrent,
    "Constant": _constant, "ConstantOfShape": _constant_of_shape, "Slice": _slice,
    "ReduceMean": _reduce_op(reduce_mean, 18), "ReduceSum": _reduce_op(reduce_sum, 13),
    "ReduceMax": _reduce_op(reduce_max, 18), "ReduceMin": _reduce_op(reduce_min, 18),
    "Pad": _pad, "Cast": _cast,
    "QuantizeLinear": _quantize, "DequantizeLinear": _dequantize,
}


# ---------------------------------------------------------------------------------------------------------------

def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    try:  # types of intermediate values; a model shape inference cannot handle just loses them
        model = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001
        pass
    g = model.graph
    types = {i.name: i.data_type for i in g.initializer}
    for vi in [*g.input, *g.value_info, *g.output]:
        types.setdefault(vi.name, vi.type.tensor_type.elem_type)
    return types


def to_torch(model: onnx.ModelProto) -> fx.GraphModule:
    """An ONNX model as a torch.fx.GraphModule: forward(*inputs) in graph-input order, one output or a tuple."""
    b = _Builder(model)
    g = model.graph
    b.elem_type = _elem_types(model)
    for init in g.initializer:
        b.set_const(init.name, _tensor(numpy_helper.to_array(init)))
        b.stored.add(init.name)
    for inp in g.input:
        if inp.name not in b.values:  # old models also list initializers as inputs
            b.values[inp.name] = b.graph.placeholder(b.unique(inp.name))
    for index, proto in enumerate(g.node):
        label = _label(proto, index)
        if proto.domain not in ("", "ai.onnx") or proto.op_type not in OPS:
            op = proto.op_type if proto.domain in ("", "ai.onnx") else f"{proto.domain}.{proto.op_type}"
            raise UnsupportedOpError(f"node '{label}' (op {op}): not supported by the fine-tuning converter; "
                                     "keep it out of the trained region or file an issue")
        missing = [i for i in proto.input if i and i not in b.values]
        if missing:
            raise QcompileError(f"node '{label}' (op {proto.op_type}): input '{missing[0]}' is not produced before "
                                "it; is the graph topologically sorted?")
        out = OPS[proto.op_type](b, _Node(b, proto, label))
        names = list(proto.output)
        if not isinstance(out, list):  # handlers return a list for several outputs, or one value
            out = [out] if len(names) == 1 else b.outputs(out, len(names))
        for name, value in zip(names, out):
            if not name:
                continue
            if isinstance(value, torch.Tensor):
                b.set_const(name, value)
                if proto.op_type == "Constant":
                    b.stored.add(name)
            else:
                b.values[name] = value
    results = [b._lift(b.values[o.name]) for o in g.output]
    b.graph.output(results[0] if len(results) == 1 else tuple(results))
    gm = fx.GraphModule(b.root, b.graph, class_name="OnnxModule")
    return gm


def weighted_layers(gm: nn.Module) -> dict[str, WeightedLayer]:
    """ONNX node name -> its WeightedLayer, in graph order (modules are registered in graph order). Layers
    that a wrapper has replaced in the graph are still found inside it."""
    layers: dict[str, WeightedLayer] = {}
    for mod in gm.modules():
        if isinstance(mod, WeightedLayer):
            if mod.onnx_name in layers:
                raise QcompileError(f"node '{mod.onnx_name}': two weighted nodes share this name; rename one")
            layers[mod.onnx_name] = mod
    return layers
