"""Recurrent cells decomposed the way exporters write them, built by hand with onnx.helper (tests of rnn_import).

Weights follow PyTorch's layout (gates i, f, g, o for LSTM; r, z, n for GRU; W_ih [G*H, I], W_hh [G*H, H], two
biases), so the pass has to recover ONNX's order from the arithmetic, as it must for real exports.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper

F = TensorProto.FLOAT


class Body:
    """A graph under construction: `op` adds a node with fresh output names, `const` an initializer (of this graph
    or of the outer one)."""

    def __init__(self, prefix: str, outer: "Body | None" = None):
        self.prefix, self.nodes, self.inits, self.n, self.outer = prefix, [], [], 0, outer

    def fresh(self, tag: str) -> str:
        self.n += 1
        return f"{self.prefix}{tag}{self.n}"

    def op(self, op_type: str, inputs: list, n_out: int = 1, **attrs):
        outs = [self.fresh(op_type.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=self.fresh(op_type), **attrs))
        return outs[0] if n_out == 1 else outs

    def const(self, array, tag: str = "c", outer: bool = False) -> str:
        target = self.outer if outer and self.outer is not None else self
        name = target.fresh(tag)
        target.inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name


def weights(cell: str, I: int, H: int, seed: int, bias: bool = True) -> dict:
    """PyTorch's initialisation, U(-1/sqrt(H), 1/sqrt(H)), widened to 2/sqrt(H) so small cells are not near-linear."""
    g = 4 if cell == "LSTM" else 3
    rng = np.random.default_rng(seed)
    k = 2 / np.sqrt(H)
    w = {"w_ih": rng.uniform(-k, k, (g * H, I)), "w_hh": rng.uniform(-k, k, (g * H, H))}
    if bias:
        w.update(b_ih=rng.uniform(-k, k, g * H), b_hh=rng.uniform(-k, k, g * H))
    return {k: v.astype(np.float32) for k, v in w.items()}


def _linear(b: Body, v: str, w: np.ndarray, bias, style: str, outer: bool) -> str:
    """v @ w.T (+ bias) as an exporter writes it: Gemm(transB) with C, or MatMul by the transposed weight + Add."""
    if style == "gemm":
        ins = [v, b.const(w, "W", outer)] + ([b.const(bias, "b", outer)] if bias is not None else [])
        return b.op("Gemm", ins, transB=1)
    y = b.op("MatMul", [v, b.const(np.ascontiguousarray(w.T), "Wt", outer)])
    return b.op("Add", [y, b.const(bias, "b", outer)]) if bias is not None else y


def _chunks(b: Body, v: str, n: int, H: int, style: str) -> list[str]:
    """Split the gate columns into n chunks: Split (opset 18 num_outputs), constant Slices, or TorchScript's
    Slices whose bounds come from Shape arithmetic."""
    if style == "split":
        return b.op("Split", [v], n_out=n, axis=1, num_outputs=n)
    if style == "slice":
        return [b.op("Slice", [v, b.const(np.array([k * H], np.int64)), b.const(np.array([(k + 1) * H], np.int64)),
                               b.const(np.array([1], np.int64))]) for k in range(n)]
    width = b.op("Gather", [b.op("Shape", [v]), b.const(np.array([1], np.int64))], axis=0)
    size = b.op("Div", [b.op("Add", [width, b.const(np.array([n - 1], np.int64))]), b.const(np.array([n], np.int64))])
    bounds = [b.const(np.array([0], np.int64))] + [b.op("Mul", [size, b.const(np.array([k + 1], np.int64))])
                                                    for k in range(n)]
    axis = b.const(np.array([1], np.int64))
    return [b.op("Slice", [v, bounds[k], bounds[k + 1], axis]) for k in range(n)]


def lstm_step(b: Body, x: str, h: str, c: str, w: dict, *, style="gemm", chunks="split", outer=True, cat=False,
              peephole=False):
    """PyTorch's LSTMCell: gates = x W_ih^T + b_ih + h W_hh^T + b_hh; i, f, g, o = chunk(4). peephole: the forget
    gate also reads c (not an ONNX-recipe cell: refused)."""
    H = w["w_hh"].shape[1]
    if cat:  # one MatMul of [x, h] by the stacked weights
        xh = b.op("Concat", [x, h], axis=1)
        gates = b.op("Add", [b.op("MatMul", [xh, b.const(np.concatenate([w["w_ih"], w["w_hh"]], 1).T.copy(), "Wxh",
                                                          outer)]), b.const(w["b_ih"] + w["b_hh"], "b", outer)])
    else:
        gates = b.op("Add", [_linear(b, x, w["w_ih"], w.get("b_ih"), style, outer),
                             _linear(b, h, w["w_hh"], w.get("b_hh"), style, outer)])
    i, f, g, o = _chunks(b, gates, 4, H, chunks)
    if peephole:
        f = b.op("Add", [f, b.op("Mul", [c, b.const(np.full(H, 0.5, np.float32))])])
    i, f, o = (b.op("Sigmoid", [v]) for v in (i, f, o))
    g = b.op("Tanh", [g])
    c_new = b.op("Add", [b.op("Mul", [f, c]), b.op("Mul", [i, g])])
    h_new = b.op("Mul", [o, b.op("Tanh", [c_new])])
    return h_new, c_new


def gru_step(b: Body, x: str, h: str, w: dict, *, lbr=1, form="torch", style="gemm", chunks="split", outer=True,
             act="Tanh"):
    """PyTorch's GRUCell (r, z, n); lbr=1 is PyTorch's n = tanh(W_in x + b_in + r (W_hn h + b_hn)), lbr=0 the other
    candidate tanh(W_in x + b + W_hn (r h)). form: 'torch' h' = n + z (h - n); 'onnx' (1 - z) n + z h written with
    Sub(1, z); 'swapped' h' = (1 - z) h + z n with Neg + Add (z is the gate on the candidate)."""
    H = w["w_hh"].shape[1]
    gi = _linear(b, x, w["w_ih"], w.get("b_ih"), style, outer)
    ir_, iz, in_ = _chunks(b, gi, 3, H, chunks)
    if lbr:
        gh = _linear(b, h, w["w_hh"], w.get("b_hh"), style, outer)
        hr, hz, hn = _chunks(b, gh, 3, H, chunks)
    else:
        w_hr, w_hz, w_hn = np.split(w["w_hh"], 3)
        b_hr, b_hz, b_hn = np.split(w.get("b_hh", np.zeros(3 * H, np.float32)), 3)
        hr = _linear(b, h, w_hr, b_hr, style, outer)
        hz = _linear(b, h, w_hz, b_hz, style, outer)
    r = b.op("Sigmoid", [b.op("Add", [ir_, hr])])
    z = b.op("Sigmoid", [b.op("Add", [iz, hz])])
    if lbr:
        n = b.op(act, [b.op("Add", [in_, b.op("Mul", [r, hn])])])
    else:
        n = b.op(act, [b.op("Add", [in_, _linear(b, b.op("Mul", [r, h]), w_hn, b_hn, style, outer)])])
    if form == "torch":
        return b.op("Add", [n, b.op("Mul", [z, b.op("Sub", [h, n])])])
    if form == "onnx":
        omz = b.op("Sub", [b.const(np.float32(1)), z])
        return b.op("Add", [b.op("Mul", [omz, n]), b.op("Mul", [z, h])])
    omz = b.op("Add", [b.op("Neg", [z]), b.const(np.float32(1))])
    return b.op("Add", [b.op("Mul", [omz, h]), b.op("Mul", [z, n])])


def _vi(name, shape):
    return helper.make_tensor_value_info(name, F, shape)


def scan_model(cell: str, I: int, H: int, *, seed=0, init="zeros", reverse=False, out_dir=None, x_axis=0,
               outputs=("y", "h", "c"), opset=18, weights_in="outer", prefix="", per_step="h", **step):
    """A Scan over x [seq, batch, I] (x_axis=1: [batch, seq, I]) whose body is one cell step; outputs y (per-step h),
    h_n and c_n (LSTM); every name but x's starts with prefix. per_step='c' emits the cell state per step instead
    of h (refused: an LSTM node gives only h per step)."""
    g = Body(prefix)
    b = Body(prefix + "b_", outer=g)
    w = weights(cell, I, H, seed, bias=step.pop("bias", True))
    states = [prefix + "h_in", prefix + "c_in"] if cell == "LSTM" else [prefix + "h_in"]
    x_t = prefix + "x_t"
    if cell == "LSTM":
        h_new, c_new = lstm_step(b, x_t, states[0], states[1], w, outer=weights_in == "outer", **step)
        news = [h_new, c_new]
    else:
        news = [gru_step(b, x_t, states[0], w, outer=weights_in == "outer", **step)]
    y_t = b.op("Identity", [news[0] if per_step == "h" else news[1]])
    body = helper.make_graph(b.nodes, prefix + "body", [_vi(s, ["B", H]) for s in states] + [_vi(x_t, ["B", I])],
                             [_vi(v, ["B", H]) for v in news] + [_vi(y_t, ["B", H])], b.inits)
    xshape = ["S", "B", I] if x_axis == 0 else ["B", "S", I]
    inputs = [_vi("x", xshape)]
    if init == "zeros":
        batch = g.op("Slice", [g.op("Shape", ["x"]), g.const(np.array([1 - x_axis], np.int64)),
                               g.const(np.array([2 - x_axis], np.int64))])
        shape = g.op("Concat", [batch, g.const(np.array([H], np.int64))], axis=0)
        init_states = [g.op("ConstantOfShape", [shape], value=helper.make_tensor("v", F, [1], [0.0]))] * len(states)
    else:
        init_states = [f"{prefix}{s}0" for s in ("h", "c")[:len(states)]]
        inputs += [_vi(s, ["B", H]) for s in init_states]
    d = int(reverse)
    outs = [f"{prefix}{s}_n" for s in ("h", "c")[:len(states)]]
    g.nodes.append(helper.make_node("Scan", init_states + ["x"], outs + [prefix + "y"], name=prefix + "cell_scan",
                                    body=body,
                                    num_scan_inputs=1, scan_input_axes=[x_axis], scan_input_directions=[d],
                                    scan_output_directions=[d if out_dir is None else out_dir],
                                    scan_output_axes=[x_axis]))
    yshape = ["S", "B", H] if x_axis == 0 else ["B", "S", H]
    graph_outs = [_vi(o, yshape if o == prefix + "y" else ["B", H]) for o in [prefix + "y"] + outs
                  if o[len(prefix)] in [s[0] for s in outputs]]
    graph = helper.make_graph(g.nodes, "scan_cell", inputs, graph_outs, g.inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def loop_model(cell: str, I: int, H: int, *, seed=0, collect="sequence", trip="shape", opset=18, **step):
    """TorchScript's form: Loop(Gather(Shape(x), 0), true, h0, [c0,] [SequenceEmpty]) whose body reads
    x_t = Gather(x, t) from the outer graph and appends h to a carried sequence (collect='sequence', then
    ConcatFromSequence(axis=0, new_axis=1)) or emits it as a Loop scan output (collect='scan'). trip='const' uses a
    constant trip count (refused: it is not provably the length of x)."""
    g = Body("")
    b = Body("b_", outer=g)
    w = weights(cell, I, H, seed)
    states = ["h_in", "c_in"] if cell == "LSTM" else ["h_in"]
    x_t = b.op("Gather", ["x", "t"], axis=0)
    if cell == "LSTM":
        news = list(lstm_step(b, x_t, "h_in", "c_in", w, **step))
    else:
        news = [gru_step(b, x_t, "h_in", w, **step)]
    body_in = [helper.make_tensor_value_info("t", TensorProto.INT64, []),
               helper.make_tensor_value_info("cond", TensorProto.BOOL, [])] + [_vi(s, ["B", H]) for s in states]
    cond_out = b.op("Identity", ["cond"])
    body_out = [helper.make_tensor_value_info(cond_out, TensorProto.BOOL, [])] + [_vi(v, ["B", H]) for v in news]
    loop_in = []
    if collect == "sequence":
        body_in.append(helper.make_tensor_sequence_value_info("seq_in", F, None))
        appended = b.op("SequenceInsert", ["seq_in", news[0]])
        body_out.append(helper.make_tensor_sequence_value_info(appended, F, None))
        loop_in = [g.op("SequenceEmpty", [], dtype=F)]
    else:
        body_out.append(_vi(b.op("Identity", [news[0]]), ["B", H]))
    body = helper.make_graph(b.nodes, "loop_body", body_in, body_out, b.inits)
    seq_len = g.op("Gather", [g.op("Shape", ["x"]), g.const(np.array(0, np.int64))], axis=0) if trip == "shape" \
        else g.const(np.array(5, np.int64))
    shape = g.op("Concat", [g.op("Shape", ["x"], start=1, end=2), g.const(np.array([H], np.int64))], axis=0)
    zeros = g.op("ConstantOfShape", [shape], value=helper.make_tensor("v", F, [1], [0.0]))
    outs = [f"{s}_n" for s in ("h", "c")[:len(states)]]
    true = g.const(np.array(True))
    g.nodes.append(helper.make_node("Loop", [seq_len, true] + [zeros] * len(states) + loop_in,
                                    outs + ["steps"], name="cell_loop", body=body))
    if collect == "sequence":
        g.nodes.append(helper.make_node("ConcatFromSequence", ["steps"], ["y"], axis=0, new_axis=1))
    else:
        g.nodes.append(helper.make_node("Identity", ["steps"], ["y"]))
    graph = helper.make_graph(g.nodes, "loop_cell", [_vi("x", ["S", "B", I])],
                              [_vi("y", ["S", "B", H])] + [_vi(o, ["B", H]) for o in outs], g.inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def if_model(cell_then: str, cell_else: str, I: int, H: int, **kw):
    """`if flag: a Scan cell else: another Scan cell`, each branch with outputs (y, h_n) and no inputs of its own:
    the Scans sit inside If branches, read the main graph's x, and their weights live in the main graph."""
    branches, inits = {}, []
    for name, cell, seed in (("then", cell_then, 1), ("else", cell_else, 2)):
        m = scan_model(cell, I, H, seed=seed, outputs=("y", "h"), prefix=f"{name}_", **kw)
        inits += list(m.graph.initializer)
        branches[name] = helper.make_graph(list(m.graph.node), name, [], list(m.graph.output))
    node = helper.make_node("If", ["flag"], ["y", "h_n"], name="choose", then_branch=branches["then"],
                            else_branch=branches["else"])
    graph = helper.make_graph([node], "if_cell", [_vi("x", ["S", "B", I]),
                                                  helper.make_tensor_value_info("flag", TensorProto.BOOL, [])],
                              [_vi("y", ["S", "B", H]), _vi("h_n", ["B", H])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def native_model(cell: str, I: int, H: int, *, seed=0, lbr=1, direction="forward", h0=False):
    """The same cell as scan_model's (same seed) written as one ONNX LSTM/GRU node: PyTorch's gate blocks reordered
    to ONNX's (LSTM i, f, g, o -> i, o, f, c; GRU r, z, n -> z, r, h). Outputs y [seq, batch, H] and h_n (forward
    and reverse); bidirectional: the node's own outputs. h0: initial states as inputs h0 [, c0] [D, batch, H]."""
    D = 2 if direction == "bidirectional" else 1
    ws = [weights(cell, I, H, seed + d) for d in range(D)]
    order = [0, 3, 1, 2] if cell == "LSTM" else [1, 0, 2]

    def onnx_order(a):
        return np.concatenate([np.split(a, len(order))[k] for k in order])

    W = np.stack([onnx_order(w["w_ih"]) for w in ws])
    R = np.stack([onnx_order(w["w_hh"]) for w in ws])
    B = np.stack([np.concatenate([onnx_order(w["b_ih"]), onnx_order(w["b_hh"])]) for w in ws])
    attrs = {"hidden_size": H, "direction": direction} | ({"linear_before_reset": lbr} if cell == "GRU" else {})
    states = (["h0", "c0"] if cell == "LSTM" else ["h0"]) if h0 else []
    inputs = [_vi("x", ["S", "B", I])] + [_vi(s, [D, "B", H]) for s in states]
    outs = ["y4", "h3"] + (["c3"] if cell == "LSTM" else [])
    nodes = [helper.make_node(cell, ["x", "W", "R", "B", ""] + states, outs, name="native", **attrs)]
    inits = [numpy_helper.from_array(a, n) for a, n in ((W, "W"), (R, "R"), (B, "B"))]
    if D == 1:
        nodes += [helper.make_node("Squeeze", ["y4", "ax1"], ["y"]), helper.make_node("Squeeze", ["h3", "ax0"],
                                                                                      ["h_n"])]
        inits += [numpy_helper.from_array(np.array([1]), "ax1"), numpy_helper.from_array(np.array([0]), "ax0")]
        graph_outs = [_vi("y", ["S", "B", H]), _vi("h_n", ["B", H])]
    else:
        graph_outs = [_vi("y4", ["S", D, "B", H]), _vi("h3", [D, "B", H])] + (
            [_vi("c3", [D, "B", H])] if cell == "LSTM" else [])
    graph = helper.make_graph(nodes, "native", inputs, graph_outs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def stacked_scan_model(I: int, H: int):
    """Two LSTM layers stepped in one Scan body (layer 2 reads layer 1's new h): refused, one node per body."""
    g, b = Body(""), Body("b_")
    b.outer = g
    states = ["h1", "c1", "h2", "c2"]
    h1, c1 = lstm_step(b, "x_t", "h1", "c1", weights("LSTM", I, H, 1))
    h2, c2 = lstm_step(b, h1, "h2", "c2", weights("LSTM", H, H, 2))
    body = helper.make_graph(b.nodes, "body", [_vi(s, ["B", H]) for s in states] + [_vi("x_t", ["B", I])],
                             [_vi(v, ["B", H]) for v in (h1, c1, h2, c2)] + [_vi(b.op("Identity", [h2]), ["B", H])],
                             b.inits)
    g.nodes.append(helper.make_node("Scan", [f"{s}_0" for s in states] + ["x"], [f"{s}_n" for s in states] + ["y"],
                                    name="cell_scan", body=body, num_scan_inputs=1))
    graph = helper.make_graph(g.nodes, "stacked", [_vi("x", ["S", "B", I])] + [_vi(f"{s}_0", ["B", H])
                                                                                for s in states],
                              [_vi("y", ["S", "B", H])], g.inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
