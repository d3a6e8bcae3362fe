"""Quantization-aware training modules: a converted Conv/Gemm/MatMul with its quantizers in the forward pass.

The forward pass computes exactly what the fake-quant ONNX model (passes/quantize.py) and the deployed integer kernels
compute, in the same float32 steps, so a trained model needs no re-quantization:

    p     = round(min(relu(x), c) / s)          activation codes, s = float32(c / n_a)      (QuantizeLinear)
    W_int = 2q - zero2                          the weight quantizer's codes, as small integers
    acc   = Conv/Gemm/MatMul(p, W_int)          integer-valued float32, exact
    y     = acc * mult + bias                   mult = float32(scale/2 * s): one Mul, one Add

Gradients are straight-through: p behaves as clip(x)/s, W_int as W*2/scale (through the quantizer twin's own
gradient, e.g. DoReFa's tanh), so d y/d W equals the textbook fake-quant STE. The clip c is learned when asked
(the s in p and in mult both depend on it: an LSQ-style gradient, with PACT's 1[x > c] term).
"""

from __future__ import annotations

import functools
import importlib

import torch
from torch import nn

from qcompile.quant import registry
from qcompile.quant.core import levels
from qcompile.quant.torch_ops import dorefa_gradients, round_ste

F64 = torch.float64


def codes_twin(quantizer: str):
    """The registry's torch twin that returns codes, scale and zero (TorchQuantized), with the spec's options."""
    spec = registry.get(quantizer)
    torch_ops = importlib.import_module("qcompile.quant.torch_ops")
    fn = getattr(torch_ops, spec.torch_weights.replace("_weights_t", "_codes_t"))
    return functools.partial(fn, **dict(spec.options))


def straight_through(value: torch.Tensor, proxy: torch.Tensor) -> torch.Tensor:
    """Forward `value` exactly; backward as if it were `proxy`."""
    return value.detach() + (proxy - proxy.detach())


class QuantLayer(nn.Module):
    """Wraps a converter WeightedLayer (`functional(x, w, b)`) with its activation and weight quantizers."""

    def __init__(self, inner: nn.Module, *, name: str, bits_w: int, bits_a: int, quantizer: str, weight_axis: int,
                 per_channel: bool, clip: float, bias, learn_clip: bool = False, gbits: int | None = None,
                 zero: int = 0):
        super().__init__()
        self.inner = inner
        self.name, self.bits_w, self.bits_a, self.quantizer = name, bits_w, bits_a, quantizer
        self.weight_axis, self.per_channel, self.gbits = weight_axis, per_channel, gbits
        self.zero = int(zero)  # signed inputs: codes p = round(x/s) + z, z fixed after calibration
        self._twin = codes_twin(quantizer)
        clip_t = torch.tensor(float(clip), dtype=torch.float32)
        if learn_clip:
            self.clip = nn.Parameter(clip_t)
        else:
            self.register_buffer("clip", clip_t)
        # the layer owns its bias: quantization adds one (bias correction) even where the float layer had none
        self.inner.bias = None
        self.bias = nn.Parameter(torch.as_tensor(bias, dtype=torch.float32).reshape(-1).clone())
        self.grad_generator: torch.Generator | None = None

    @property
    def weight(self) -> nn.Parameter:
        return self.inner.weight

    def weight_nk(self) -> torch.Tensor:
        """The latent weight with output channels first, as the quantizers and the kernels see it."""
        w = self.inner.weight
        return w if self.weight_axis == 0 else w.t()

    def quantized_weight(self):
        """(W_int in the stored layout with its STE gradient, TorchQuantized of the [N, ...] weight)."""
        tq = self._twin(self.weight_nk(), self.bits_w, axis=0 if self.per_channel else None, name=self.name)
        zero2 = torch.round(2 * tq.zero).to(torch.float32)
        ints = 2 * tq.codes.to(torch.float32) - zero2
        scale = tq.scale
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        w_int = straight_through(ints, tq.values * (2.0 / safe))
        return (w_int if self.weight_axis == 0 else w_int.t()), tq

    def act_step(self) -> torch.Tensor:
        """s = float32(c / n_a), computed like numpy's activation_scale (float64 quotient, one rounding)."""
        return (self.clip.to(F64) / levels(self.bits_a)).to(torch.float32)

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """Activation codes p (integer-valued float32), exactly onnxruntime's Clip -> QuantizeLinear."""
        s = self.act_step()
        if not self.zero:
            return round_ste(torch.minimum(torch.relu(x), self.clip.to(x.dtype)) / s)
        # signed grid: Clip(-z s, (n - z) s) -> QuantizeLinear(s, z), bounds rounded once as quantize.signed_bounds
        n = levels(self.bits_a)
        lo, hi = (-self.zero * s.to(F64)).to(x.dtype), ((n - self.zero) * s.to(F64)).to(x.dtype)
        return round_ste(torch.clamp(x, lo, hi) / s) + self.zero

    def multiplier(self, tq) -> torch.Tensor:
        """mult = float32(scale/2 * s) per output channel, as passes/quantize.py computes it."""
        n = self.bias.shape[0]
        scale = tq.scale.reshape(-1).to(F64).expand(n) if tq.scale.dim() else tq.scale.to(F64).expand(n)
        return ((scale / 2) * self.act_step().to(F64)).to(torch.float32)

    def _channel_shape(self, y: torch.Tensor) -> tuple[int, ...]:
        return (1, -1) + (1,) * (y.dim() - 2) if self.inner.op_type == "Conv" else (-1,)

    def weight_sums(self, w_int: torch.Tensor) -> torch.Tensor:
        """sum_k W_int[n, k] per output channel (exact integers): the zero-point term of a signed input."""
        w_nk = w_int if self.weight_axis == 0 else w_int.t()
        return w_nk.reshape(w_nk.shape[0], -1).sum(dim=1)

    def effective_bias(self, sums: torch.Tensor | None, mult: torch.Tensor) -> torch.Tensor:
        """bias, or for a signed input bias - mult * z * sum_k W_int (quantize.signed_bias: float64, one rounding)."""
        if not self.zero:
            return self.bias
        return (self.bias.to(F64) - mult.to(F64) * self.zero * sums.to(F64)).to(torch.float32)

    def _accumulate(self, p: torch.Tensor, w_int: torch.Tensor, sums: torch.Tensor | None) -> torch.Tensor:
        """The integer accumulator over codes p. A signed input's zero point z is value 0, so the float layer's own
        zero padding is code z: sum (p - z) W (zero-padded) + z sum W, which is what the fake-quant graph's
        Pad(codes, z) -> Conv computes, exactly (all integers)."""
        if not self.zero:
            return self.inner.functional(p, w_int, None)
        acc = self.inner.functional(p - self.zero, w_int, None)
        return acc + self.zero * sums.reshape(self._channel_shape(acc))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.codes(x)
        w_int, tq = self.quantized_weight()
        sums = self.weight_sums(w_int) if self.zero else None
        acc = self._accumulate(p, w_int, sums)
        shape = self._channel_shape(acc)
        mult = self.multiplier(tq)
        y = acc * mult.reshape(shape) + self.effective_bias(sums, mult).reshape(shape)
        if self.gbits:
            y = dorefa_gradients(y, self.gbits, self.grad_generator)
        return y

    def accumulator(self, x: torch.Tensor) -> torch.Tensor:
        """The integer accumulator (for exactness tests against the fake-quant model)."""
        w_int, _ = self.quantized_weight()
        return self._accumulate(self.codes(x), w_int, self.weight_sums(w_int) if self.zero else None)


def quant_layers(model: nn.Module) -> dict[str, QuantLayer]:
    return {m.name: m for m in model.modules() if isinstance(m, QuantLayer)}


def replace_module(root: nn.Module, target: nn.Module, new: nn.Module) -> None:
    """Swap `target` (a submodule of root, found by identity) for `new` under the same path."""
    for path, module in root.named_modules():
        if module is target:
            parent_path, _, attr = path.rpartition(".")
            parent = root.get_submodule(parent_path) if parent_path else root
            setattr(parent, attr, new)
            return
    raise KeyError("module not found in the model")
