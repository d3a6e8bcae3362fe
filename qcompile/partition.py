"""Partition a fused graph into a schedule: runs of standard ops become onnxruntime sub-models, each
ai.qcompile node becomes a kernel call. The runtime only follows the schedule (no onnx package needed there)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper

from qcompile.passes.fuse import DOMAIN


@dataclass
class Step:
    kind: str                       # "onnxruntime" or "kernel"
    inputs: list[str]
    outputs: list[str]
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    model: onnx.ModelProto | None = None   # for onnxruntime steps

    @property
    def layer(self) -> str:
        return self.nodes[0].name


def node_reads(node: onnx.NodeProto) -> list[str]:
    """Values a node reads: its inputs, then names its If/Loop/Scan bodies take from the enclosing scope."""
    reads = [i for i in node.input if i]
    for attr in node.attribute:
        for g in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
            for name in _outer_reads(g):
                if name not in reads:
                    reads.append(name)
    return reads


def _outer_reads(graph: onnx.GraphProto) -> list[str]:
    defined = {i.name for i in graph.input} | {i.name for i in graph.initializer}
    reads: list[str] = []
    for n in graph.node:
        for name in node_reads(n):
            if name not in defined and name not in reads:
                reads.append(name)
        defined.update(o for o in n.output if o)
    return reads


def _groups(nodes) -> list[tuple[str, list]]:
    groups: list[tuple[str, list]] = []
    for node in nodes:
        kind = "kernel" if node.domain == DOMAIN else "onnxruntime"
        if kind == "onnxruntime" and groups and groups[-1][0] == "onnxruntime":
            groups[-1][1].append(node)
        else:
            groups.append((kind, [node]))
    return groups


def partition(model: onnx.ModelProto, types: dict[str, onnx.TypeProto]) -> list[Step]:
    """`types` gives the type of every value that may cross a step boundary (graph inputs, kernel outputs);
    types of onnxruntime-step outputs are inferred here, step by step."""
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    graph_outputs = [o.name for o in graph.output]
    groups = _groups(graph.node)
    later_uses: list[set[str]] = []
    acc: set[str] = set(graph_outputs)
    for _, nodes in reversed(groups):           # values read by any later step (or returned)
        later_uses.append(set(acc))
        for n in nodes:
            acc.update(node_reads(n))
    later_uses.reverse()
    types = dict(types)
    steps = []
    for (kind, nodes), needed_later in zip(groups, later_uses):
        produced = [o for n in nodes for o in n.output if o]
        inputs = []
        for n in nodes:
            for i in node_reads(n):
                if i not in produced and i not in inits and i not in inputs:
                    inputs.append(i)
        outputs = [o for o in produced if o in needed_later]
        step = Step(kind, inputs, outputs, list(nodes))
        if kind == "onnxruntime":
            step.model = _submodel(model, nodes, inputs, outputs, inits, types)
            inferred = onnx.shape_inference.infer_shapes(step.model)
            for vi in inferred.graph.output:
                types.setdefault(vi.name, vi.type)
        steps.append(step)
    return steps


def reader_counts(graph: onnx.GraphProto) -> dict[str, int]:
    """How many node inputs read each value."""
    readers: dict[str, int] = {}
    for n in graph.node:
        for i in node_reads(n):
            readers[i] = readers.get(i, 0) + 1
    return readers


def _submodel(model, nodes, inputs, outputs, inits, types) -> onnx.ModelProto:
    used = {i for n in nodes for i in node_reads(n)}
    g = helper.make_graph(
        nodes, "segment",
        [helper.make_value_info(name, types[name]) for name in inputs],
        [helper.make_value_info(name, onnx.TypeProto()) for name in outputs],
        [inits[name] for name in inits if name in used])
    opsets = [o for o in model.opset_import if o.domain != DOMAIN]
    sub = helper.make_model(g, opset_imports=opsets, producer_name="qcompile")
    sub.ir_version = model.ir_version
    inferred = onnx.shape_inference.infer_shapes(sub)
    known = {vi.name: vi for vi in inferred.graph.output if vi.type.HasField("tensor_type")}
    del sub.graph.output[:]
    sub.graph.output.extend(known.get(name, helper.make_value_info(name, onnx.TypeProto())) for name in outputs)
    return sub


# onnxruntime's NCHWc layout rewrite blocks a Conv's channels by 8/16 and reorders its output back to NCHW. For the
# few-channel first convs that stay in float here, that reorder costs more than the conv: at batch 64 the bundled
# CNN's first partition takes 2.0-2.5 ms with it and 1.3-1.6 ms without, on the same float results.
NCHWC = "NchwcTransformer"


def _probe_feeds(sess, calib_batch: dict | None, rng) -> dict:
    from qcompile.passes.calibrate import ORT_TYPES

    feeds = {}
    for arg in sess.get_inputs():
        if calib_batch and arg.name in calib_batch:  # in the model's type (ids, masks, rates as they are)
            feeds[arg.name] = np.ascontiguousarray(calib_batch[arg.name], dtype=ORT_TYPES.get(arg.type, np.float32))
            continue
        shape = [d if isinstance(d, int) and d > 0 else 64 for d in arg.shape]
        feeds[arg.name] = (rng.integers(0, 4, shape).astype(np.uint8) if arg.type == "tensor(uint8)"
                           else rng.standard_normal(shape).astype(np.float32))
    return feeds


def _best_ms(sess, feeds, reps: int) -> float:
    import time
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        sess.run(None, feeds)
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def load_failure(model: onnx.ModelProto, exc: Exception, purpose: str) -> str:
    """One line for an onnxruntime session that would not load: the node it choked on when the message names an op
    (an op of a domain onnxruntime does not know, typically a custom op), else onnxruntime's first line."""
    text = str(exc)
    for node in model.graph.node:
        op = f"{node.domain}:{node.op_type}" if node.domain else node.op_type
        if node.domain and op in text:
            return (f"node '{node.name or node.op_type}' ({op}): onnxruntime cannot run it, and {purpose} runs in "
                    "onnxruntime; register its custom-op library or replace the node")
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return f"onnxruntime cannot load the {purpose}: {first[:200]}"


def _options(library=None, spinning: bool = False):
    """Session options as the runtime makes them, with the custom ops of the kernel `library` when given."""
    from qcompile.runtime.inference import session_options

    so = session_options(spinning=spinning)
    if library is not None:
        from qcompile.runtime.kernels import _content_alias

        so.register_custom_ops_library(str(_content_alias(library)))
    return so


def check_loads(model: onnx.ModelProto, purpose: str, library=None) -> None:
    """Raise ArtifactError (one line naming the node) unless onnxruntime can load `model` (with the custom ops of
    the kernel `library` registered, when given)."""
    import onnxruntime as ort

    from qcompile.errors import ArtifactError

    so = _options(library)
    try:
        ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise ArtifactError(load_failure(model, exc, purpose)) from None


def disabled_optimizers(model: onnx.ModelProto, calib_batch: dict | None = None, reps: int = 5,
                        library=None) -> list[str]:
    """The onnxruntime optimizers the deployable graph (its kernels' custom ops from `library`) runs better without:
    NCHWc, when the graph has a float Conv, gives bitwise the same outputs without it on the probe data (the
    calibration batch) and runs at least 10 % faster. Same outputs matter because the codes the float parts make
    must equal the fake-quant model's, which onnxruntime runs with every optimizer on."""
    if not any(n.op_type == "Conv" for n in model.graph.node):
        return []
    import onnxruntime as ort

    data = model.SerializeToString()
    so = _options(library, spinning=True)   # as the runtime runs it: kernels on onnxruntime's spinning pool
    so.log_severity_level = 4   # a probe that fails is answered below; onnxruntime must not print it as an error
    with_nchwc = ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])
    without = ort.InferenceSession(data, so, providers=["CPUExecutionProvider"], disabled_optimizers=[NCHWC])
    feeds = _probe_feeds(with_nchwc, calib_batch, np.random.default_rng(0))
    try:
        ref, alt = with_nchwc.run(None, feeds), without.run(None, feeds)
    except Exception:  # noqa: BLE001 - probe inputs whose symbolic sizes must agree (feature pyramids): keep defaults
        return []
    if not all(np.array_equal(a, b, equal_nan=True) for a, b in zip(ref, alt)):
        return []
    return nchwc_choice(True, _best_ms(with_nchwc, feeds, 2 * reps), _best_ms(without, feeds, 2 * reps))


def nchwc_choice(same_outputs: bool, ms_with: float, ms_without: float) -> list[str]:
    """Turn NCHWc off only for bitwise-same outputs and a clear (10 %) gain: timing noise must not flip it."""
    return [NCHWC] if same_outputs and ms_without < 0.9 * ms_with else []
