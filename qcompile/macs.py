"""Multiply-accumulates per weighted node of a model at given input shapes: how much of a model's arithmetic the
bit kernels run (`share_in_bit_kernels`). Shapes come from one onnxruntime run of the model on those inputs, so any
op onnxruntime runs counts right (shape inference leaves gaps in real exported models)."""

from __future__ import annotations

import numpy as np
import onnx

COUNTED = ("Conv", "ConvTranspose", "Gemm", "MatMul", "LSTM", "GRU", "RNN")


def node_macs(model: onnx.ModelProto, feeds: dict) -> dict[str, int]:
    """{node name: MACs per sample} for every top-level Conv/ConvTranspose/Gemm/MatMul/LSTM/GRU/RNN (activation by
    activation MatMuls included); `feeds` is one batch, its first axis the batch."""
    from qcompile.evaluate import session

    nodes = [n for n in model.graph.node if n.op_type in COUNTED and n.domain in ("", "ai.onnx")]
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    shown = {o.name for o in probe.graph.output}
    inits = {i.name: list(i.dims) for i in model.graph.initializer}
    graph_inputs = {i.name for i in model.graph.input}
    wanted = []
    for n in nodes:
        for name in (n.input[0], n.input[1], n.output[0]):
            if name and name not in inits and name not in wanted:
                wanted.append(name)
                if name not in shown and name not in graph_inputs:
                    probe.graph.output.add().name = name
    sess = session(probe)
    names = [o.name for o in sess.get_outputs()]
    given = {k: v for k, v in feeds.items() if k in {i.name for i in sess.get_inputs()}}
    shapes = dict(zip(names, (o.shape for o in sess.run(None, given))))
    shapes.update({k: np.shape(v) for k, v in given.items()})
    shapes.update(inits)
    batch = max(next((np.shape(v)[0] for v in given.values() if np.ndim(v) > 0), 1), 1)
    out = {}
    for n in nodes:
        x, w, y = (shapes.get(name) for name in (n.input[0], n.input[1], n.output[0]))
        if x is None or w is None or y is None:
            continue
        if n.op_type == "Conv":
            macs = int(np.prod(y)) * int(np.prod(w[1:]))
        elif n.op_type == "ConvTranspose":
            macs = int(np.prod(x)) * int(np.prod(w[1:]))
        elif n.op_type in ("Gemm", "MatMul"):
            k = x[-1] if not (n.op_type == "Gemm" and _attr(n, "transA")) else x[0]
            macs = int(np.prod(y)) * int(k)
        else:  # recurrent: per direction and step, gates x (input + hidden)
            dirs, gates, hidden = w[0], w[1], shapes.get(n.input[2], [0, 0, 0])[2]
            steps = x[0]
            macs = int(dirs * steps * gates * (w[2] + hidden) * x[1])
        out[n.name or n.output[0]] = macs // batch
    return out


def _attr(node, name, default=0):
    return next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


BIT_KERNELS = ("bitserial", "lut")
INTEGER_KERNELS = BIT_KERNELS + ("onnxruntime-int8",)


def share_in_bit_kernels(model: onnx.ModelProto, feeds: dict, plan: list[dict],
                         kernels: tuple[str, ...] = BIT_KERNELS) -> tuple[float, int]:
    """(fraction of the model's MACs in layers the plan runs on `kernels` (by name prefix: the bit kernels, or with
    INTEGER_KERNELS onnxruntime's int8 ops too), total MACs per sample)."""
    macs = node_macs(model, feeds)
    total = sum(macs.values())
    bit = sum(macs.get(p["node"], 0) for p in plan if p["kernel"].startswith(kernels))
    return (bit / total if total else 0.0), total
