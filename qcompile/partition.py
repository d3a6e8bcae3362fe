"""Partition a fused graph into a schedule: runs of standard ops become onnxruntime sub-models, each
ai.qcompile node becomes a kernel call. The runtime only follows the schedule (no onnx package needed there)."""

from __future__ import annotations

from dataclasses import dataclass, field

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
            acc.update(i for i in n.input if i)
    later_uses.reverse()
    types = dict(types)
    steps = []
    for (kind, nodes), needed_later in zip(groups, later_uses):
        produced = [o for n in nodes for o in n.output if o]
        inputs = []
        for n in nodes:
            for i in n.input:
                if i and i not in produced and i not in inits and i not in inputs:
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


def _submodel(model, nodes, inputs, outputs, inits, types) -> onnx.ModelProto:
    used = {i for n in nodes for i in n.input}
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
