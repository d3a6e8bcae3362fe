"""Calibrate: activation statistics of every quantized layer's input, over a calibration reader, in bounded memory.

Per tensor we keep a streaming min/max and a fixed-size histogram on [0, R]; when a value exceeds R, R doubles and
adjacent bins merge pairwise, so memory stays at BINS counts however much data streams through. The clip value c of
DoReFa's activation quantizer (clip to [0, c], then k-bit uniform) comes from that histogram: the value minimising
the expected quantization MSE ("mse", default), a percentile, or the max.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from qcompile.calibration import ArrayReader
from qcompile.errors import CalibrationError
from qcompile.runtime.inference import ort_threads

BINS = 2048


@dataclass
class ActivationStats:
    """Streaming min/max + a doubling histogram of the nonnegative values."""

    min: float = np.inf
    max: float = -np.inf
    count: int = 0
    upper: float = 0.0                        # histogram covers [0, upper)
    hist: np.ndarray = field(default_factory=lambda: np.zeros(BINS, np.int64))
    channel_sum: np.ndarray | None = None     # per channel (axis 1) sums, for the bias correction
    channel_count: int = 0
    negative: "ActivationStats | None" = None  # the same statistics of -x over the negative values, when any

    @property
    def channel_mean(self) -> np.ndarray | None:
        return None if self.channel_sum is None else self.channel_sum / max(self.channel_count, 1)

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x, np.float32)
        if x.size == 0:
            return
        if x.ndim >= 2 and self.channel_count >= 0:
            per_channel = x.swapaxes(0, 1).reshape(x.shape[1], -1)
            sums = per_channel.sum(1, dtype=np.float64)
            if self.channel_sum is not None and self.channel_sum.shape != sums.shape:
                # axis 1 is not a channel axis here (it varies with the batch, e.g. inside attention): no per-channel
                # means, so no bias correction for the layers reading this value
                self.channel_sum, self.channel_count = None, -1
            else:
                self.channel_sum = sums if self.channel_sum is None else self.channel_sum + sums
                self.channel_count += per_channel.shape[1]
        x = x.ravel()
        if x.min() < 0:  # signed activations: the negative side gets its own histogram (of -x)
            self.negative = self.negative or ActivationStats()
            self.negative.update(-x[x < 0])
        self.min, self.max = min(self.min, float(x.min())), max(self.max, float(x.max()))
        self.count += x.size
        pos = x[x > 0]
        if pos.size == 0:
            self.hist[0] += x.size
            return
        if self.upper == 0.0:
            self.upper = float(pos.max()) * (1 + 1e-6)
        while pos.max() >= self.upper:       # double the range, merging bin pairs: memory stays BINS
            self.hist = np.concatenate([self.hist.reshape(-1, 2).sum(1), np.zeros(BINS // 2, np.int64)])
            self.upper *= 2
        self.hist += np.bincount((x.clip(0, None) * (BINS / self.upper)).astype(np.int64), minlength=BINS)[:BINS]

    def percentile(self, p: float) -> float:
        cdf = np.cumsum(self.hist)
        idx = int(np.searchsorted(cdf, cdf[-1] * p / 100.0))
        return (idx + 1) * self.upper / BINS

    def mse_clip(self, bits: int, candidates: int = 256) -> float:
        """argmin_c E[(x - Q_c(x))^2] with x at the bin centres, Q_c = clip to [0,c] then round to c/n steps."""
        n = 2 ** bits - 1
        centres = (np.arange(BINS) + 0.5) * (self.upper / BINS)
        weights = self.hist.astype(np.float64)
        best, best_err = self.max, np.inf
        for c in np.geomspace(max(self.max, 1e-30) / candidates, max(self.max, 1e-30), candidates):
            step = c / n
            q = np.clip(np.rint(centres / step), 0, n) * step
            err = float(np.dot(weights, (centres - q) ** 2))
            if err < best_err:
                best, best_err = float(c), err
        return best

    def signed_range(self, rule: str, bits: int) -> tuple[float, float]:
        """(lo, hi) of a signed activation's clip: each side chosen by `rule` on its own histogram."""
        hi = self.clip(rule, bits) if self.max > 0 else 0.0
        lo = -self.negative.clip(rule, bits) if self.negative is not None else 0.0
        return lo, hi

    def clip(self, rule: str, bits: int) -> float:
        if rule == "max":
            return self.max
        if rule.startswith("percentile"):
            return min(self.max, self.percentile(float(rule.split(":")[1])))
        return self.mse_clip(bits)


#: onnxruntime's input type strings -> numpy dtypes a calibration batch is fed as
ORT_TYPES = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
             "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int16)": np.int16, "tensor(int8)": np.int8,
             "tensor(uint8)": np.uint8, "tensor(uint16)": np.uint16, "tensor(uint32)": np.uint32,
             "tensor(uint64)": np.uint64, "tensor(bool)": np.bool_}


def _check_batch(batch: dict, inputs: list[ort.NodeArg], source: str) -> dict:
    names = {i.name for i in inputs}
    if not isinstance(batch, dict) or set(batch) != names:
        got = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise CalibrationError(f"{source}: calibration batch has inputs {got}, the model expects {sorted(names)}")
    out = {}
    for arg in inputs:
        arr = np.asarray(batch[arg.name])
        want = ORT_TYPES.get(arg.type)
        if want is None:
            raise CalibrationError(f"{source}: input '{arg.name}' has type {arg.type}, which calibration cannot feed")
        if np.issubdtype(want, np.floating) != np.issubdtype(arr.dtype, np.floating) or arr.dtype == np.bool_ and \
                want != np.bool_:
            raise CalibrationError(f"{source}: input '{arg.name}' is {arr.dtype}; the model expects "
                                   f"{np.dtype(want).name}")
        if np.issubdtype(want, np.integer) and arr.size and (arr.min() < np.iinfo(want).min
                                                             or arr.max() > np.iinfo(want).max):
            raise CalibrationError(f"{source}: input '{arg.name}' has values outside {np.dtype(want).name}")
        arr = arr.astype(want, copy=False)  # ids, masks and rates are fed as they are, in the model's type
        shape = arg.shape
        ok = arr.ndim == len(shape) and all(not isinstance(d, int) or d == s for d, s in zip(shape, arr.shape))
        if not ok:
            want = "x".join(str(d) if isinstance(d, int) else "?" for d in shape)
            raise CalibrationError(f"{source}: input '{arg.name}' has shape {list(arr.shape)}, "
                                   f"the model expects [{want}]")
        if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
            raise CalibrationError(f"{source}: input '{arg.name}' contains NaN/Inf")
        out[arg.name] = arr
    return out


def session_options() -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.log_severity_level = 3   # onnxruntime warns about harmless things (unused initializers) on stderr
    so.intra_op_num_threads = ort_threads()
    return so


def float_session(proto) -> ort.InferenceSession:
    """onnxruntime session of the float model; one CalibrationError naming the node when it cannot load."""
    from qcompile.partition import load_failure

    try:
        return ort.InferenceSession(proto.SerializeToString(), session_options(), providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise CalibrationError(load_failure(proto, exc, "float model for calibration")) from None


def collect_stats(model: ir.Model, value_names: list[str], reader, max_batches: int, progress=None,
                  on_batch=None) -> dict[str, ActivationStats]:
    """Run the float model once over the reader, exposing `value_names` as extra outputs; `on_batch({name: array})`
    sees every batch too (GPTQ's second moments come from the same pass)."""
    proto = ir.to_proto(model)
    existing = {o.name for o in proto.graph.output}
    for name in value_names:
        if name not in existing:
            proto.graph.output.add().name = name
    sess = float_session(proto)
    inputs = sess.get_inputs()
    if hasattr(reader, "bind"):
        reader.bind([i.name for i in inputs] if isinstance(reader, ArrayReader) or len(inputs) != 1
                    else inputs[0].name)
    source = getattr(reader, "source", "calibration reader")
    if hasattr(reader, "rewind"):
        reader.rewind()   # a reader passed to an earlier compile starts from its first batch again
    stats = {name: ActivationStats() for name in value_names}
    batches = 0
    while batches < max_batches:
        batch = reader.get_next()
        if batch is None:
            break
        outs = sess.run(value_names, _check_batch(batch, inputs, source))
        for name, arr in zip(value_names, outs):
            stats[name].update(arr)
        if on_batch is not None:
            on_batch(dict(zip(value_names, outs)))
        batches += 1
        if progress:
            progress(batches)
    if batches == 0:
        raise CalibrationError(f"{source}: the calibration reader gave no data")
    return stats


def layer_rows(node: ir.Node, x: np.ndarray, max_rows: int, rng) -> np.ndarray | None:
    """The input rows a Conv/Gemm/MatMul multiplies by its weight ([M, K], K in the weight's [N, K] order), at most
    max_rows of them (sampled); None for a layout GPTQ is not set up for (grouped convs, transA)."""
    if node.op_type == "Conv":
        a = node.attributes
        if a.get_int("group", 1) != 1 or x.ndim != 4:
            return None
        w = ir.convenience.get_const_tensor(node.inputs[1]).shape
        kh, kw = int(w[2]), int(w[3])
        sh, sw = a.get_ints("strides", [1, 1])
        dh, dw = a.get_ints("dilations", [1, 1])
        pt, pl, pb, pr = a.get_ints("pads", [0, 0, 0, 0])
        xp = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)))
        win = np.lib.stride_tricks.sliding_window_view(xp, ((kh - 1) * dh + 1, (kw - 1) * dw + 1), axis=(2, 3))
        win = win[:, :, ::sh, ::sw, ::dh, ::dw]                       # [B, C, Ho, Wo, kh, kw]
        rows = win.transpose(0, 2, 3, 1, 4, 5).reshape(-1, x.shape[1] * kh * kw)
    elif node.op_type == "Gemm" and node.attributes.get_int("transA", 0):
        return None
    else:
        rows = x.reshape(-1, x.shape[-1])
    if len(rows) > max_rows:
        rows = rows[rng.choice(len(rows), max_rows, replace=False)]
    return np.asarray(rows, np.float64)


class SecondMoments:
    """E[x x^T] of each layer's input rows, accumulated batch by batch (GPTQ's statistic)."""

    def __init__(self, model: ir.Model, plans, rows_per_batch: int = 2048):
        self.nodes = {n.name: n for n in model.graph}
        self.plans, self.rows_per_batch = list(plans), rows_per_batch
        self.rng = np.random.default_rng(0)
        self.sums: dict[str, np.ndarray] = {}
        self.batches = 0

    def __call__(self, outs: dict) -> None:
        from qcompile.quant.gptq import second_moment

        for p in self.plans:
            rows = layer_rows(self.nodes[p.node], outs[p.activation], self.rows_per_batch, self.rng)
            if rows is not None:
                self.sums[p.node] = self.sums.get(p.node, 0) + second_moment(rows)
        self.batches += 1

    def result(self, layers) -> dict[str, np.ndarray]:
        """The moments of the layers still quantized after calibration decided which are."""
        return {k: v / max(self.batches, 1) for k, v in self.sums.items() if k in layers}


class Calibrate:
    """Collect input-activation statistics for each planned layer and fix its clip value c."""

    name = "calibrate"

    def __call__(self, model: ir.Model, ctx) -> bool:
        planned = [p for p in ctx.plan.values() if p.quantize]
        names = sorted({p.activation for p in planned})
        if not names:
            return False
        if ctx.calib is None:
            ctx.act_ranges = {}      # quantize falls back to DoReFa's [0, 1] and the report warns
            return False
        moments = SecondMoments(model, planned) if ctx.config.weight_rounding == "gptq" else None
        ctx.act_ranges = collect_stats(model, names, ctx.calib, ctx.config.calib_batches, on_batch=moments)
        for p in planned:
            s = ctx.act_ranges[p.activation]
            if s.min < 0:
                p.act_signed = True   # affine codes with a zero point (passes/quantize.py)
            elif s.max <= 0:
                p.mark_float("input activation is 0 on all calibration data: nothing to quantize")
        if moments is not None:
            ctx.second_moments = moments.result({p.node for p in planned if p.quantize})
        return False
