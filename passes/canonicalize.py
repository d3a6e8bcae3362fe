"""Canonicalize: fold BatchNormalization into Conv/Gemm, fold constants, drop Identity/Dropout and dead code.

After this the graph holds only what runs at inference, with each Conv/Gemm carrying its own bias, so the planner
sees the weights the deployed kernel will use.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxscript.optimizer
from onnxscript.rewriter import RewriteRuleSet
from onnxscript.rewriter.rules.common import fuse_batchnorm_into_conv_rule, fuse_batchnorm_into_gemm_rule

from qcompile.passes.graph_utils import add_const, const_array, redirect_uses, remove_dead, unique_name
from qcompile.passes.rnn_import import RecogniseRecurrentCells

fold_bn_rules = RewriteRuleSet([
    fuse_batchnorm_into_conv_rule,   # Conv(x, W, b) -> BN  ==  Conv(x, W*g/s, (b-mean)*g/s + beta)
    fuse_batchnorm_into_gemm_rule,   # the same for Gemm (Linear -> BatchNorm1d)
])


class FoldBatchNorm:
    """Fold inference BatchNormalization into the preceding Conv/Gemm weight and bias."""

    name = "fold_batchnorm"

    def __call__(self, model: ir.Model, ctx) -> bool:
        # The rewrite builds new Conv/Gemm nodes that write the BatchNormalization's output value; give each the
        # name of the layer it replaces, so plans, reports and --keep-float patterns keep working.
        layer_of = {n.outputs[0].name: n.inputs[0].producer().name for n in model.graph
                    if n.op_type == "BatchNormalization" and n.inputs[0].producer() is not None}
        count = fold_bn_rules.apply_to_model(model)
        for node in model.graph:
            if node.op_type in ("Conv", "Gemm") and node.outputs[0].name in layer_of:
                node.name = layer_of[node.outputs[0].name] or node.name
        return count > 0


class FoldConstants:
    """Evaluate subgraphs whose inputs are all constant (shape arithmetic, exported Constant chains)."""

    name = "fold_constants"

    def __call__(self, model: ir.Model, ctx) -> bool:
        before = model.graph.num_nodes()
        onnxscript.optimizer.fold_constants(model)
        return model.graph.num_nodes() != before


class RemoveNoOps:
    """Drop Identity, and Dropout (inference mode: an identity); graph outputs keep their names."""

    name = "remove_noops"

    def __call__(self, model: ir.Model, ctx) -> bool:
        modified = False
        for node in list(model.graph):
            if node.op_type not in ("Identity", "Dropout") or node.domain not in ("", "ai.onnx"):
                continue
            if node.op_type == "Dropout" and (len(node.outputs) > 1 and node.outputs[1].uses()):
                continue  # someone reads the mask: not a no-op
            src, out = node.inputs[0], node.outputs[0]
            if out.is_graph_output():
                continue  # removing it would rename a model output; an Identity there costs nothing
            out.replace_all_uses_with(src)
            model.graph.remove(node, safe=True)
            modified = True
        return modified


class RemoveDeadCode:
    """Remove nodes and initializers nothing reads."""

    name = "remove_dead_code"

    def __call__(self, model: ir.Model, ctx) -> bool:
        before = (model.graph.num_nodes(), len(model.graph.initializers))
        remove_dead(model)
        return (model.graph.num_nodes(), len(model.graph.initializers)) != before


class Conv1dAs2d:
    """Rewrite a 1-D Conv (audio, sequence models) as Unsqueeze -> 2-D Conv over a 1 x L image -> Squeeze, so the
    2-D bit kernels run it: the same sums in the same order, with kernel, strides, pads and dilations on the W axis.
    The new Conv keeps the old name, so plans, reports and --keep-float patterns see the layer they know."""

    name = "conv1d_as_2d"

    def __call__(self, model: ir.Model, ctx) -> bool:
        graph = model.graph
        modified = False
        for node in list(graph):
            if node.op_type != "Conv" or node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
                continue
            w = const_array(node.inputs[1])
            if w is None or w.ndim != 3 or node.attributes.get_string("auto_pad", "NOTSET") not in ("NOTSET",
                                                                                                     "VALID"):
                continue
            a = node.attributes
            pads = a.get_ints("pads", [0, 0])
            attrs = {"kernel_shape": [1, w.shape[2]], "strides": [1, *a.get_ints("strides", [1])],
                     "dilations": [1, *a.get_ints("dilations", [1])], "pads": [0, pads[0], 0, pads[1]],
                     "group": a.get_int("group", 1)}
            axis = add_const(graph, f"{node.name or 'conv'}.h_axis", np.array([2], np.int64))
            w2 = add_const(graph, f"{node.inputs[1].name}.as2d", w[:, :, None, :])
            x2 = ir.node("Unsqueeze", [node.inputs[0], axis], name=unique_name(graph, f"{node.name}.to2d"))
            inputs = [x2.outputs[0], w2, *node.inputs[2:]]
            conv = ir.node("Conv", inputs, attributes=attrs, name=node.name)
            y = ir.node("Squeeze", [conv.outputs[0], axis], name=unique_name(graph, f"{node.name}.to1d"))
            x2.outputs[0].name = unique_name(graph, f"{node.outputs[0].name}.in2d")
            conv.outputs[0].name = unique_name(graph, f"{node.outputs[0].name}.out2d")
            graph.insert_before(node, [x2, conv, y])
            out = node.outputs[0]
            y.outputs[0].type, y.outputs[0].shape = out.type, out.shape
            redirect_uses(out, y.outputs[0])
            graph.remove(node, safe=True)
            modified = True
        return modified


def canonicalize_passes() -> list:
    # cells decomposed into Loop/Scan bodies become LSTM/GRU nodes after folding (their weights are constants then)
    return [RemoveNoOps(), FoldBatchNorm(), FoldConstants(), RecogniseRecurrentCells(), Conv1dAs2d(), RemoveDeadCode()]
