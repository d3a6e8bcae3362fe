"""Small onnx_ir helpers shared by the passes: constants, unique names, output rewiring."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass


def unique_name(graph: ir.Graph, base: str) -> str:
    taken = set(graph.initializers) | {v.name for n in graph for v in n.outputs} | {v.name for v in graph.inputs}
    name, i = base, 1
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    return name


def add_const(graph: ir.Graph, base: str, array, dtype: ir.DataType | None = None) -> ir.Value:
    """Register an initializer under a fresh name and return its value."""
    name = unique_name(graph, base)
    tensor = ir.tensor(np.asarray(array), dtype=dtype, name=name)
    value = ir.Value(name=name, shape=ir.Shape(tensor.shape), type=ir.TensorType(tensor.dtype), const_value=tensor)
    graph.register_initializer(value)
    return value


def const_array(value: ir.Value | None) -> np.ndarray | None:
    """The numpy array behind an initializer or Constant, or None when the value is computed at run time."""
    if value is None:
        return None
    tensor = ir.convenience.get_const_tensor(value)
    return None if tensor is None else tensor.numpy()


def redirect_uses(old: ir.Value, new: ir.Value) -> None:
    """Make every reader of `old` (graph outputs included, keeping the output's name) read `new` instead."""
    if old.is_graph_output():
        name = old.name
        if new.type is None:  # a graph output keeps its declared type and shape
            new.type, new.shape = old.type, old.shape
        old.replace_all_uses_with(new, replace_graph_outputs=True)
        old.name = f"{name}__pre"
        new.name = name
    else:
        old.replace_all_uses_with(new)


def node_label(node: ir.Node) -> str:
    return node.name or f"{node.op_type}@{id(node):x}"


def remove_dead(model: ir.Model) -> None:
    """Drop nodes whose outputs nothing reads, then initializers nothing reads (graph outputs are kept)."""
    RemoveUnusedNodesPass()(model)
    graph = model.graph
    for name in [n for n, v in graph.initializers.items() if not v.uses() and not v.is_graph_output()]:
        del graph.initializers[name]
