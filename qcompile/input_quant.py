"""Fold the onnxruntime Clip -> QuantizeLinear that writes a BitConv's (or BitGemm's) input codes into its kernel.

A float layer (the first conv, kept in float by convention) ends in ``Clip(lo, hi) -> QuantizeLinear(scale, zp)``;
onnxruntime's QuantizeLinear is slow (0.6 ms of the bundled CNN's 12 at batch 64). Both ops are monotone in x, so
the codes are ``#{k : x >= T[k]}`` for the 2^bits - 1 boundaries T[k] = the smallest float32 whose code is >= k.
The boundaries are found by bisection over the ordered float32 values, asking onnxruntime itself (the very nodes
being replaced), then checked on every neighbour of every boundary at many array positions (a vector body and a
scalar tail could round differently) and on random values; any disagreement keeps the ops in onnxruntime. The
kernel then reads the float tensor and compares. NaN inputs (no code is defined for them) become code 0.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from qcompile.partition import reader_counts

_ORDER_MASK = np.int64(0x7FFFFFFF)


def _key(x: np.ndarray) -> np.ndarray:
    """float32 -> int64 with the same order (for non-NaN values)."""
    i = np.asarray(x, np.float32).view(np.int32).astype(np.int64)
    return np.where(i < 0, -(i & _ORDER_MASK) - 1, i)


def _from_key(k: np.ndarray) -> np.ndarray:
    k = np.asarray(k, np.int64)
    i = np.where(k < 0, (-(k + 1)) | np.int64(-(2**31)), k)
    return i.astype(np.int32).view(np.float32)


def _quantizer_session(nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto], x_name: str, y_name: str,
                       opsets):
    import onnxruntime as ort

    from qcompile.runtime.inference import session_options

    graph = helper.make_graph(nodes, "input_quant", [helper.make_tensor_value_info(x_name, onnx.TensorProto.FLOAT,
                                                                                    ["n"])],
                              [helper.make_tensor_value_info(y_name, onnx.TensorProto.UINT8, ["n"])], inits)
    model = helper.make_model(graph, opset_imports=opsets)
    sess = ort.InferenceSession(model.SerializeToString(), session_options(), providers=["CPUExecutionProvider"])
    return lambda v: sess.run(None, {x_name: np.ascontiguousarray(v, np.float32)})[0].astype(np.int64)


def code_thresholds(code, bits: int, seed: int = 0) -> np.ndarray | None:
    """The 2^bits - 1 float32 boundaries of the monotone map ``code`` (float32 array -> int codes), or None when
    the map is not a step function of x alone with codes in [0, 2^bits). A level no float reaches gets NaN."""
    levels = np.arange(1, 2**bits, dtype=np.int64)
    ends = code(np.array([-np.inf, np.inf], np.float32))
    lo = np.full(levels.size, _key(np.float32(-np.inf)), np.int64)
    hi = np.full(levels.size, _key(np.float32(np.inf)), np.int64)
    while np.any(hi - lo > 1):  # code(lo) < k <= code(hi) (where k is reachable at all)
        mid = lo + (hi - lo) // 2
        ge = code(_from_key(mid)) >= levels
        hi, lo = np.where(ge, mid, hi), np.where(ge, lo, mid)
    thr = _from_key(hi).copy()
    thr[ends[0] >= levels] = -np.inf
    thr[ends[1] < levels] = np.nan
    # check: every boundary's neighbours at several positions of a long array, and random values of all scales
    rng = np.random.default_rng(seed)
    finite = thr[np.isfinite(thr)]
    near = np.concatenate([_from_key(_key(finite)[:, None] + np.arange(-2, 3)).ravel(),
                           np.array([0.0, -0.0, np.inf, -np.inf], np.float32)])
    probe = np.concatenate([near, (rng.standard_normal(4096) * 10.0 ** rng.uniform(-4, 4, 4096)).astype(np.float32)])
    for shift in (0, 1, 7, 13, 31):
        x = np.roll(np.resize(probe, probe.size + 37), shift)
        want = (x[:, None] >= thr[None, :]).sum(axis=1)
        if not np.array_equal(code(x), want):
            return None
    return thr.astype(np.float32)


def clip_quantize_thresholds(clip: onnx.NodeProto | None, quant: onnx.NodeProto, inits: dict, bits: int,
                             opsets) -> np.ndarray | None:
    """Boundaries of ``[clip ->] quant`` (per-tensor scale, uint8 zero point, constant inputs), or None."""
    names = [i for n in ([clip] if clip is not None else []) + [quant] for i in list(n.input)[1:] if i]
    if any(name not in inits for name in names):
        return None
    scale = numpy_helper.to_array(inits[quant.input[1]])
    zero = numpy_helper.to_array(inits[quant.input[2]]) if len(quant.input) > 2 and quant.input[2] else None
    if scale.size != 1 or (zero is not None and (zero.size != 1 or zero.dtype != np.uint8)):
        return None
    x_name = (clip if clip is not None else quant).input[0]
    nodes = ([clip] if clip is not None else []) + [quant]
    code = _quantizer_session(nodes, [inits[n] for n in dict.fromkeys(names)], x_name, quant.output[0], opsets)
    return code_thresholds(code, bits)


def fold_input_quantizers(fused: onnx.ModelProto, specs: list, domain: str):
    """For each BitConv or BitGemm spec whose input codes come from ``[Clip ->] QuantizeLinear`` read by nothing else: a copy
    of ``fused`` without those nodes (the conv reads their float input) and the spec with ``in_thresholds``.
    Returns (model to partition, specs); a quantizer whose boundaries do not check out stays as it was."""
    producer = {o: n for n in fused.graph.node for o in n.output}
    readers = reader_counts(fused.graph)
    outputs = {o.name for o in fused.graph.output}
    inits = {i.name: i for i in fused.graph.initializer}
    nodes = {n.name: n for n in fused.graph.node if n.domain == domain}

    def alone(value: str) -> bool:
        return readers.get(value) == 1 and value not in outputs

    removed: set[str] = set()
    rewired: dict[str, str] = {}
    out_specs = []
    for spec in specs:
        node = nodes.get(spec.name)
        quant = producer.get(node.input[0]) if node is not None and spec.op in ("conv", "gemm") else None
        if (quant is None or quant.op_type != "QuantizeLinear" or quant.domain not in ("", "ai.onnx")
                or not alone(node.input[0]) or spec.in_thresholds is not None):
            out_specs.append(spec)
            continue
        clip = producer.get(quant.input[0])
        if clip is None or clip.op_type != "Clip" or clip.domain not in ("", "ai.onnx") or not alone(quant.input[0]):
            clip = None
        thr = clip_quantize_thresholds(clip, quant, inits, spec.bits_a, list(fused.opset_import))
        if thr is None:
            out_specs.append(spec)
            continue
        folded = [n.name for n in (clip, quant) if n is not None]
        removed.update(folded)
        rewired[spec.name] = (clip if clip is not None else quant).input[0]
        out_specs.append(spec.replace(in_thresholds=thr, extra={**spec.extra, "input_quantizer": folded}))
    if not rewired:
        return fused, out_specs
    model = onnx.ModelProto()
    model.CopyFrom(fused)
    keep = [n for n in model.graph.node if n.name not in removed]
    for n in keep:
        if n.name in rewired and n.domain == domain:
            n.input[0] = rewired[n.name]
    del model.graph.node[:]
    model.graph.node.extend(keep)
    return model, out_specs
