"""Plan: decide per Conv/Gemm/MatMul whether it is quantized (bits, quantizer) or stays float, and say why.

DoReFa's convention keeps the first and the last weighted layer in float (quantizing them costs the most accuracy
for the least compute); `keep_float` / `quantize` node-name globs override it. Every op that is not quantized is
listed with a reason: nothing is silently dropped.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import onnx_ir as ir
from onnx_ir.passes.common import NameFixPass

from qcompile.config import Config
from qcompile.passes.graph_utils import const_array, node_label

WEIGHTED_OPS = ("Conv", "Gemm", "MatMul")
RECURRENT_OPS = ("LSTM", "GRU")   # passes/rnn.py: quantized as a whole (its own pass), not as a Gemm


@dataclass
class LayerPlan:
    node: str
    op: str
    quantize: bool
    reason: str
    bits_w: int = 0
    bits_a: int = 0
    quantizer: str = ""
    weight: str = ""            # initializer name of the weight
    weight_axis: int = 0        # axis of the output channels in the stored weight
    activation: str = ""        # value name of the activation input
    act_signed: bool = False    # calibration saw negative inputs: affine codes with a zero point

    def mark_float(self, reason: str) -> None:
        self.quantize, self.reason = False, reason


def _matches(name: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def recurrent_problem(node: ir.Node) -> str | None:
    """Why an LSTM/GRU node cannot be quantized (passes/rnn.recurrent_spec refuses it), or None."""
    from types import SimpleNamespace

    from qcompile.passes.rnn import UnsupportedRecurrent, recurrent_spec

    shim = SimpleNamespace(op_type=node.op_type, name=node.name, attributes=node.attributes,
                           input=[v.name if v is not None else "" for v in node.inputs],
                           output=[v.name if v is not None else "" for v in node.outputs])
    values = {v.name: v for v in node.inputs if v is not None}
    try:
        spec = recurrent_spec(shim, lambda n: const_array(values.get(n)))
    except UnsupportedRecurrent as exc:
        return str(exc).split(": ", 1)[-1].replace("; kept in float", "")
    if spec.layout != 0:
        return "layout=1 (batch first) is not covered yet"
    return None


def weight_layout(node: ir.Node) -> tuple[ir.Value | None, int, str | None]:
    """(weight value, output-channel axis, reason it cannot be a bit kernel or None)."""
    if node.op_type in RECURRENT_OPS:
        return node.inputs[1], 0, recurrent_problem(node)
    if node.op_type == "Conv":
        w = node.inputs[1]
        if const_array(w) is None:
            return w, 0, "weight is computed at run time, not a constant"
        if const_array(w).ndim != 4:
            return w, 0, f"{const_array(w).ndim - 2}-D convolution; bit kernels cover 2-D"
        if node.attributes.get_string("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
            return w, 0, "auto_pad SAME_* is not supported; export with explicit pads"
        return w, 0, None
    if node.op_type == "Gemm":
        w = node.inputs[1]
        if node.attributes.get_int("transA", 0):
            return w, 0, "Gemm with transA=1"
        if node.attributes.get_float("alpha", 1.0) != 1.0 or node.attributes.get_float("beta", 1.0) != 1.0:
            return w, 0, "Gemm with alpha/beta != 1"
        if const_array(w) is None:
            return w, 0, "weight is computed at run time, not a constant"
        return w, 0 if node.attributes.get_int("transB", 0) else 1, None
    if node.op_type == "MatMul":
        w = node.inputs[1]
        arr = const_array(w)
        if arr is None:
            return w, 1, "second input is not a constant weight"
        if arr.ndim != 2:
            return w, 1, f"{arr.ndim}-D weight; bit kernels take a 2-D matrix"
        return w, 1, None
    return None, 0, "not a Conv/Gemm/MatMul"


def subgraph_nodes(graph: ir.Graph, owner: ir.Node | None = None):
    """(top-level If/Loop/Scan node, node) for every node inside a subgraph, at any depth."""
    for node in graph:
        if owner is not None:
            yield owner, node
        for attr in node.attributes.values():
            graphs = attr.value if attr.type == ir.AttributeType.GRAPHS else \
                [attr.value] if attr.type == ir.AttributeType.GRAPH else []
            for sub in graphs:
                yield from subgraph_nodes(sub, owner or node)


class PlanBits:
    """Choose bits and quantizer for each weighted layer (see module docstring)."""

    name = "plan"

    def __call__(self, model: ir.Model, ctx) -> bool:
        NameFixPass()(model)  # every node needs a stable name: plans, reports and overrides key on it
        cfg: Config = ctx.config
        weighted = [n for n in model.graph
                    if n.op_type in WEIGHTED_OPS + RECURRENT_OPS and n.domain in ("", "ai.onnx")]
        # DoReFa's first/last rule is about Conv/Gemm stacks; the RNN paper quantizes every cell
        ends = [n for n in weighted if n.op_type in WEIGHTED_OPS]
        first_last = {node_label(ends[0]), node_label(ends[-1])} if ends else set()
        ctx.plan.clear()
        for node in weighted:
            name = node_label(node)
            w, axis, problem = weight_layout(node)
            plan = LayerPlan(name, node.op_type, False, "", weight=w.name if w is not None else "",
                             weight_axis=axis, activation=node.inputs[0].name)
            if problem:
                plan.mark_float(problem)
            elif _matches(name, cfg.quantize):
                plan.quantize, plan.reason = True, "forced by --quantize pattern"
            elif _matches(name, cfg.keep_float):
                plan.mark_float("kept float by --keep-float pattern")
            elif cfg.keep_first_last_float and name in first_last:
                which = "first" if name == node_label(ends[0]) else "last"
                plan.mark_float(f"{which} weighted layer stays float (DoReFa convention; override with --quantize)")
            else:
                plan.quantize, plan.reason = True, "low-bit candidate"
            if plan.quantize:
                plan.bits_w, plan.bits_a, plan.quantizer = cfg.bits_w, cfg.bits_a, cfg.quantizer
                for glob, bits_w, bits_a in cfg.layer_bits:  # per-layer bits from the .toml's [layers]
                    if fnmatch.fnmatchcase(name, glob):
                        plan.bits_w, plan.bits_a = bits_w, bits_a
                        plan.reason += f" (bits from [layers] '{glob}')"
                        break
            ctx.plan[name] = plan
        for owner, node in subgraph_nodes(model.graph):
            if node.op_type not in WEIGHTED_OPS + RECURRENT_OPS or node.domain not in ("", "ai.onnx"):
                continue
            name = node_label(node)
            w, axis, _ = weight_layout(node) if node.op_type in WEIGHTED_OPS else (None, 0, None)
            ctx.plan.setdefault(name, LayerPlan(
                name, node.op_type, False,
                f"inside the {owner.op_type} node '{node_label(owner)}' (a subgraph): subgraphs are not quantized "
                "yet, it stays float", weight=w.name if w is not None else "", weight_axis=axis,
                activation=node.inputs[0].name if node.inputs and node.inputs[0] is not None else ""))
        return False  # planning annotates; the graph is unchanged


def op_table(model: ir.Model, plan: dict[str, LayerPlan]) -> list[dict]:
    """One row per node: what happens to it and why (the `inspect` command and the report print this)."""
    rows = []
    for node in model.graph:
        name = node_label(node)
        p = plan.get(name)
        if p is not None:
            status = f"W{p.bits_w}A{p.bits_a} {p.quantizer}" if p.quantize else "float"
            rows.append({"node": name, "op": node.op_type, "status": status, "why": p.reason})
        else:
            # a Loop/Scan that passes/rnn_import.py looked at and left as it is says why
            why = node.metadata_props.get("qcompile.rnn_import") if node.op_type in ("Loop", "Scan") else None
            rows.append({"node": name, "op": node.op_type, "status": "float",
                         "why": why or "no weights: runs as is in onnxruntime"})
    for owner, node in subgraph_nodes(model.graph):  # layers in If/Loop/Scan bodies are listed, never skipped
        p = plan.get(node_label(node))
        rows.append({"node": node_label(node), "op": node.op_type, "status": "float",
                     "why": p.reason if p is not None else f"inside the {owner.op_type} node '{node_label(owner)}'"})
    return rows
