"""LayerSpec: one fused BitGemm/BitConv layer as the CPU code generator consumes it (docs/ops.md).

A spec holds what an ``ai.qcompile`` BitGemm/BitConv node holds: attributes (bits, geometry, epilogue kind, xor
mode) and its constant inputs (weight codes, wzero2, epilogue arrays). Input H/W are fixed at compile time; the
batch is a run-time argument of the generated function.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from qcompile.errors import QuantizationError
from qcompile.reference import conv_output_shape

__all__ = ["LayerSpec", "EPILOGUES", "OPS"]

OPS = ("gemm", "conv", "maxpool")
EPILOGUES = ("none", "float", "threshold")
_OUT_DTYPE = {"none": np.int32, "float": np.float32, "threshold": np.uint8}


def _tuple(v, n: int, what: str) -> tuple[int, ...]:
    t = tuple(int(x) for x in v)
    if len(t) != n:
        raise ValueError(f"{what}: expected {n} values, got {t}")
    return t


@dataclass
class LayerSpec:
    """One BitGemm/BitConv layer.

    gemm: ``w`` codes [N, K], input x [batch, K]. conv: ``w`` codes [N, C/group, kh, kw], ``in_shape`` = (C, H, W),
    input x NCHW [batch, C, H, W]. ``wzero2`` int32 [N]: the weight value is ``2*q - wzero2[n]``.
    maxpool (MaxPoolCodes, docs/ops.md): uint8 codes NCHW -> uint8 codes, 2-D max over the window of ``w``'s shape
    [C, 1, kh, kw] (only the shape is read; :meth:`maxpool` builds it), no pads, ``bits_a`` = the codes' bits.
    epilogue "none" -> int32 acc; "float" -> float32 ``acc*mult[n] + bias[n]``; "threshold" -> uint8 code
    ``#{j: acc >= thresholds[n, j]}``. ``xor_mode``: 1-bit activations and weights both read as ±1
    (acc = K - 2*popcount(a XOR w); padded conv taps contribute 0).
    ``pool`` (conv with the threshold epilogue): (ph, pw), a MaxPoolCodes with window = strides = (ph, pw) folded
    into the layer; its output is the pooled codes [N, Ho // ph, Wo // pw] (``out_hw`` stays the conv's).
    ``in_thresholds`` (conv, gemm): float32 [2^bits_a - 1], non-decreasing; the input is then float32 and its codes
    are ``#{k : x >= in_thresholds[k]}`` (a folded Clip -> QuantizeLinear, qcompile.input_quant; NaN = never).
    """

    name: str
    op: str
    bits_a: int
    bits_w: int
    w: np.ndarray
    wzero2: np.ndarray
    in_shape: tuple[int, ...] = ()
    strides: tuple[int, int] = (1, 1)
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)
    dilations: tuple[int, int] = (1, 1)
    group: int = 1
    epilogue: str = "none"
    mult: np.ndarray | None = None
    bias: np.ndarray | None = None
    thresholds: np.ndarray | None = None
    xor_mode: bool = False
    pool: tuple[int, int] | None = None
    in_thresholds: np.ndarray | None = None
    extra: dict = field(default_factory=dict)  # free-form notes carried into the manifest (e.g. the ONNX node name)

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise ValueError(f"layer {self.name!r}: op must be one of {OPS}, got {self.op!r}")
        if not self.name or "\0" in self.name:  # any ONNX node name: C code uses codegen.c_name / comment_text
            raise ValueError(f"layer name {self.name!r}: must be a non-empty string without NUL")
        for what, b in (("bits_a", self.bits_a), ("bits_w", self.bits_w)):
            if not isinstance(b, (int, np.integer)) or not 1 <= int(b) <= 8:
                raise QuantizationError(f"layer {self.name!r}: {what}={b} must be an integer in 1..8")
        self.bits_a, self.bits_w = int(self.bits_a), int(self.bits_w)
        w = np.asarray(self.w)
        if w.dtype.kind not in "ui" or (w.size and (w.min() < 0 or w.max() >= 1 << self.bits_w)):
            raise QuantizationError(f"layer {self.name!r}: weight codes must be integers in [0, {(1 << self.bits_w) - 1}]")
        self.w = np.ascontiguousarray(w, dtype=np.uint8)
        self.wzero2 = np.ascontiguousarray(np.asarray(self.wzero2).reshape(-1), dtype=np.int32)
        self.strides = _tuple(self.strides, 2, "strides")
        self.pads = _tuple(self.pads, 4, "pads")
        self.dilations = _tuple(self.dilations, 2, "dilations")
        self.group = int(self.group)
        if self.op == "gemm":
            if self.w.ndim != 2:
                raise ValueError(f"layer {self.name!r}: gemm weights must be [N, K], got {self.w.shape}")
            if not self.in_shape:
                self.in_shape = (self.w.shape[1],)
            self.in_shape = _tuple(self.in_shape, 1, "in_shape")
            if self.in_shape[0] != self.w.shape[1]:
                raise ValueError(f"layer {self.name!r}: in_shape {self.in_shape} vs weights {self.w.shape}")
            if self.group != 1 or any(self.pads) or self.strides != (1, 1) or self.dilations != (1, 1):
                raise ValueError(f"layer {self.name!r}: gemm takes no conv geometry")
        elif self.op == "maxpool":
            self.in_shape = _tuple(self.in_shape, 3, "in_shape (C, H, W)")
            if self.w.ndim != 4 or self.w.shape[:2] != (self.in_shape[0], 1) or min(self.w.shape[2:]) < 1:
                raise ValueError(f"layer {self.name!r}: maxpool window must be [C, 1, kh, kw], got {self.w.shape}")
            if any(self.pads) or self.group != 1 or min(self.strides) < 1 or min(self.dilations) < 1:
                raise ValueError(f"layer {self.name!r}: maxpool takes strides/dilations >= 1, no pads, group 1")
            if self.epilogue != "none" or self.xor_mode:
                raise ValueError(f"layer {self.name!r}: maxpool has no epilogue")
            conv_output_shape(self.in_shape[1:], self.kernel, self.strides, self.pads, self.dilations)
        else:
            if self.w.ndim != 4:
                raise ValueError(f"layer {self.name!r}: conv weights must be [N, C/group, kh, kw], got {self.w.shape}")
            self.in_shape = _tuple(self.in_shape, 3, "in_shape (C, H, W)")
            c = self.in_shape[0]
            if self.group < 1 or c % self.group or self.w.shape[0] % self.group or self.w.shape[1] * self.group != c:
                raise ValueError(f"layer {self.name!r}: {c} input channels, weights {self.w.shape}, group {self.group}")
            if min(self.strides) < 1 or min(self.dilations) < 1 or min(self.pads) < 0:
                raise ValueError(f"layer {self.name!r}: strides/dilations must be >= 1 and pads >= 0")
            conv_output_shape(self.in_shape[1:], self.kernel, self.strides, self.pads, self.dilations)
        n = self.N
        if self.wzero2.shape != (n,):
            raise ValueError(f"layer {self.name!r}: wzero2 has {self.wzero2.size} entries for {n} channels")
        if self.xor_mode:
            if self.bits_a != 1 or self.bits_w != 1 or not np.all(self.wzero2 == 1):
                raise QuantizationError(f"layer {self.name!r}: xor mode needs bits_a = bits_w = 1 and wzero2 = 1")
        if self.epilogue not in EPILOGUES:
            raise ValueError(f"layer {self.name!r}: epilogue must be one of {EPILOGUES}, got {self.epilogue!r}")
        if self.epilogue == "float":
            if self.mult is None or self.bias is None:
                raise ValueError(f"layer {self.name!r}: float epilogue needs mult and bias")
            self.mult = np.ascontiguousarray(np.asarray(self.mult).reshape(-1), dtype=np.float32)
            self.bias = np.ascontiguousarray(np.asarray(self.bias).reshape(-1), dtype=np.float32)
            if self.mult.shape != (n,) or self.bias.shape != (n,):
                raise ValueError(f"layer {self.name!r}: mult/bias must have {n} entries")
        if self.epilogue == "threshold":
            if self.thresholds is None:
                raise ValueError(f"layer {self.name!r}: threshold epilogue needs thresholds [N, L]")
            t = np.asarray(self.thresholds)
            if t.ndim != 2 or t.shape[0] != n or not 1 <= t.shape[1] <= 255:
                raise ValueError(f"layer {self.name!r}: thresholds must be [{n}, L] with 1 <= L <= 255, got {t.shape}")
            if t.dtype.kind not in "ui" or (t.size and (t.min() < -(2**31) or t.max() > 2**31 - 1)):
                raise ValueError(f"layer {self.name!r}: thresholds must be int32")
            self.thresholds = np.ascontiguousarray(t, dtype=np.int32)
        if self.in_thresholds is not None:
            t = np.ascontiguousarray(np.asarray(self.in_thresholds, np.float32).reshape(-1))
            reached = t[~np.isnan(t)]
            if self.op == "maxpool" or t.size != 2**self.bits_a - 1 or np.any(np.diff(reached) < 0) or \
                    np.any(np.isnan(t[:reached.size])):
                raise ValueError(f"layer {self.name!r}: in_thresholds must be {2**self.bits_a - 1} non-decreasing "
                                 "float32 values (NaN only at the end) of a conv or gemm")
            self.in_thresholds = t
        if self.pool is not None:
            self.pool = _tuple(self.pool, 2, "pool")
            if self.op != "conv" or self.epilogue != "threshold":
                raise ValueError(f"layer {self.name!r}: only a conv with the threshold epilogue takes a pool")
            if min(self.pool) < 1 or any(p > o for p, o in zip(self.pool, self.out_hw)):
                raise ValueError(f"layer {self.name!r}: pool window {self.pool} for a {self.out_hw} output")

    # ---- derived shapes ----
    @property
    def N(self) -> int:
        return int(self.w.shape[0])

    @property
    def kernel(self) -> tuple[int, int]:  # conv/maxpool window
        return (1, 1) if self.op == "gemm" else (int(self.w.shape[2]), int(self.w.shape[3]))

    @property
    def K(self) -> int:
        """Length of the reduction: K for gemm, kh*kw*C/group for conv (kh*kw for maxpool)."""
        if self.op == "gemm":
            return int(self.w.shape[1])
        return int(self.w.shape[1] * self.w.shape[2] * self.w.shape[3])

    @property
    def out_hw(self) -> tuple[int, int]:
        if self.op == "gemm":
            return (1, 1)
        return conv_output_shape(self.in_shape[1:], self.kernel, self.strides, self.pads, self.dilations)

    @property
    def pooled_hw(self) -> tuple[int, int]:
        """The layer's output H, W: the conv's, or after the folded pool."""
        ho, wo = self.out_hw
        return (ho, wo) if self.pool is None else (ho // self.pool[0], wo // self.pool[1])

    @property
    def out_shape(self) -> tuple[int, ...]:
        """Per-sample output shape: (N,) for gemm, (N, Ho, Wo) for conv (pooled when ``pool``) and maxpool."""
        return (self.N,) if self.op == "gemm" else (self.N, *self.pooled_hw)

    @property
    def in_dtype(self) -> np.dtype:
        return np.dtype(np.float32 if self.in_thresholds is not None else np.uint8)

    @property
    def out_dtype(self) -> np.dtype:
        return np.dtype(np.uint8) if self.op == "maxpool" else np.dtype(_OUT_DTYPE[self.epilogue])

    @property
    def L(self) -> int:
        return 0 if self.thresholds is None or self.epilogue != "threshold" else int(self.thresholds.shape[1])

    @classmethod
    def maxpool(cls, name: str, in_shape: Sequence[int], kernel: Sequence[int], strides: Sequence[int] = (1, 1),
                dilations: Sequence[int] = (1, 1), bits: int = 8) -> LayerSpec:
        """A MaxPoolCodes layer: uint8 codes [batch, C, H, W] -> [batch, C, Ho, Wo]."""
        c = int(in_shape[0])
        kh, kw = (int(k) for k in kernel)
        return cls(name=name, op="maxpool", bits_a=bits, bits_w=1, w=np.zeros((c, 1, kh, kw), np.uint8),
                   wzero2=np.zeros(c, np.int32), in_shape=tuple(in_shape), strides=tuple(strides),
                   dilations=tuple(dilations))

    def replace(self, **changes) -> LayerSpec:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_node(
        cls,
        name: str,
        op_type: str,
        attributes: Mapping,
        w: np.ndarray,
        wzero2: np.ndarray,
        *,
        in_shape: Sequence[int] = (),
        mult: np.ndarray | None = None,
        bias: np.ndarray | None = None,
        thresholds: np.ndarray | None = None,
    ) -> LayerSpec:
        """Build from an ``ai.qcompile`` BitGemm/BitConv node: its attributes (already decoded to Python values)
        and constant inputs. ``in_shape`` is (C, H, W) of one sample for BitConv."""
        ops = {"BitGemm": "gemm", "BitConv": "conv"}
        if op_type not in ops:
            raise ValueError(f"{name}: op_type must be BitGemm or BitConv, got {op_type!r}")
        a = dict(attributes)
        epi = a.get("epilogue", "none")
        epi = epi.decode() if isinstance(epi, bytes) else epi
        kw = {}
        if op_type == "BitConv":
            kw = dict(strides=a.get("strides", (1, 1)), pads=a.get("pads", (0, 0, 0, 0)),
                      dilations=a.get("dilations", (1, 1)), group=a.get("group", 1))
            ks = a.get("kernel_shape")
            if ks is not None and tuple(ks) != tuple(np.shape(w)[2:]):
                raise ValueError(f"{name}: kernel_shape {tuple(ks)} vs weights {np.shape(w)}")
        return cls(name=name, op=ops[op_type], bits_a=int(a["bits_a"]), bits_w=int(a["bits_w"]), w=w,
                   wzero2=wzero2, in_shape=tuple(in_shape), epilogue=epi, mult=mult, bias=bias,
                   thresholds=thresholds, xor_mode=bool(a.get("xor", 0)), **kw)
