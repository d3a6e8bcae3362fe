"""Cells decomposed into Loop/Scan bodies become the ONNX LSTM/GRU node they equal (passes/rnn_import), checked in
onnxruntime on random inputs at several sequence lengths; what is not one cell step stays as it is, with its reason."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

from qcompile.passes.canonicalize import canonicalize_passes
from qcompile.passes.pipeline import CompileContext, run_pipeline, verify
from qcompile.passes.rnn import recurrent_spec
from qcompile.passes.rnn_import import NOTE_KEY, RecogniseRecurrentCells

sys.path.insert(0, str(Path(__file__).parent))
import _rnn_models as M  # noqa: E402

try:
    import torch
except ImportError:  # the torch-export tests skip, visibly
    torch = None

I, H, BATCH = 5, 7, 3
SEQS = (1, 4, 9)


def _session(model: onnx.ModelProto):
    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # the replaced loops' weights are dead initializers until dead-code removal
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _feeds(sess, seq, rng, flag=True):
    feeds = {}
    for i in sess.get_inputs():
        if i.type == "tensor(bool)":
            feeds[i.name] = np.array(flag)
            continue
        dims = {"S": seq, "seq": seq, "B": BATCH, "batch": BATCH}
        shape = [dims[d] if isinstance(d, str) else d for d in i.shape]
        feeds[i.name] = rng.normal(0, 1, shape).astype(np.float32)
    return feeds


def _recognise(model: onnx.ModelProto):
    irm = ir.from_proto(model)
    p = RecogniseRecurrentCells()
    modified = p(irm, None)
    return modified, irm, p.notes


def assert_same_function(before: onnx.ModelProto, after: onnx.ModelProto, flags=(True,), seqs=SEQS):
    """Both models give the same outputs (names, shapes, values to float rounding) at every length in seqs."""
    s0, s1 = _session(before), _session(after)
    assert [o.name for o in s0.get_outputs()] == [o.name for o in s1.get_outputs()]
    rng = np.random.default_rng(0)
    for flag in flags:
        for seq in seqs:
            feeds = _feeds(s0, seq, rng, flag)
            for name, want, got in zip([o.name for o in s0.get_outputs()], s0.run(None, feeds), s1.run(None, feeds)):
                assert want.shape == got.shape, (name, seq)
                np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-6, err_msg=f"{name} at seq {seq}")


def _rnn_nodes(graph: onnx.GraphProto) -> list:
    found = [n for n in graph.node if n.op_type in ("LSTM", "GRU")]
    for n in graph.node:
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                found += _rnn_nodes(a.g)
    return found


def _no_loops(graph: onnx.GraphProto) -> bool:
    return all(n.op_type not in ("Loop", "Scan") for n in graph.node) and all(
        _no_loops(a.g) for n in graph.node for a in n.attribute if a.type == onnx.AttributeProto.GRAPH)


def _spec(model: onnx.ModelProto, node):
    arrays = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    return recurrent_spec(node, arrays.get)


# ---------------------------------------------------------------------------------------------- hand-built forms
SCAN_LSTM = {
    "gemm+split": {},
    "matmul+add, constant slices": {"style": "matmul", "chunks": "slice"},
    "slices from shape arithmetic, weights in the body": {"chunks": "shape", "weights_in": "body"},
    "[x, h] concatenated, initial states, reverse": {"cat": True, "init": "input", "reverse": True},
    "batch-first, reverse scan with forward output order": {"x_axis": 1, "reverse": True, "out_dir": 0},
    "no biases, opset 11": {"bias": False, "opset": 11, "chunks": "slice"},
}


@pytest.mark.parametrize("form", list(SCAN_LSTM))
def test_scan_lstm_cells_become_one_lstm_node(form):
    kw = SCAN_LSTM[form]
    model = M.scan_model("LSTM", I, H, **kw)
    modified, irm, notes = _recognise(model)
    assert modified, notes
    verify(irm, "recognise_recurrent_cells")   # checker + strict shape inference
    out = ir.to_proto(irm)
    assert _no_loops(out.graph)
    (node,) = _rnn_nodes(out.graph)
    spec = _spec(out, node)
    assert (spec.cell, spec.hidden, spec.input_size) == ("LSTM", H, I)
    assert spec.direction == ("reverse" if kw.get("reverse") else "forward")
    assert bool(spec.inputs["h0"]) == (kw.get("init") == "input")  # zero initial states are dropped
    assert node.name == "cell_scan" and "LSTM" in notes["cell_scan"]
    assert_same_function(model, out)


@pytest.mark.parametrize("lbr", [0, 1])
@pytest.mark.parametrize("form", ["torch", "onnx", "swapped"])
def test_scan_gru_cells_become_one_gru_node(lbr, form):
    """h' = n + z (h - n), (1 - z) n + z h with Sub(1, z), and (1 - z) h + z n (the update gate reversed) with
    Neg + Add; both candidates."""
    model = M.scan_model("GRU", I, H, lbr=lbr, form=form, init="input", chunks="slice" if lbr else "split")
    modified, irm, notes = _recognise(model)
    assert modified, notes
    verify(irm, "recognise_recurrent_cells")
    out = ir.to_proto(irm)
    (node,) = _rnn_nodes(out.graph)
    spec = _spec(out, node)
    assert (spec.cell, spec.linear_before_reset, spec.hidden) == ("GRU", bool(lbr), H)
    assert_same_function(model, out)


@pytest.mark.parametrize("cell,collect", [("LSTM", "sequence"), ("GRU", "scan")])
def test_loop_cells_reading_x_by_gather_become_one_node(cell, collect):
    """TorchScript's form: Loop(Gather(Shape(x), 0), true, ...) with x_t = Gather(x, t), the steps collected by
    SequenceInsert + ConcatFromSequence(new_axis=1) or as Loop scan outputs."""
    model = M.loop_model(cell, I, H, collect=collect, **({"lbr": 0} if cell == "GRU" else {"style": "matmul"}))
    modified, irm, notes = _recognise(model)
    assert modified, notes
    verify(irm, "recognise_recurrent_cells")
    out = ir.to_proto(irm)
    assert _no_loops(out.graph) and not any(n.op_type.startswith("Sequence") or n.op_type == "ConcatFromSequence"
                                            for n in out.graph.node)
    (node,) = _rnn_nodes(out.graph)
    assert node.op_type == cell and node.name == "cell_loop"
    assert_same_function(model, out)


def test_cells_inside_if_branches_are_rewritten_in_place():
    """A Scan in each branch of an If (an LSTM and a GRU) becomes an LSTM/GRU node inside that branch; the weights
    move to the main graph, which the branches see."""
    model = M.if_model("LSTM", "GRU", I, H)
    modified, irm, notes = _recognise(model)
    assert modified and len(notes) == 2, notes
    verify(irm, "recognise_recurrent_cells")
    out = ir.to_proto(irm)
    assert _no_loops(out.graph)
    assert sorted(n.op_type for n in _rnn_nodes(out.graph)) == ["GRU", "LSTM"]
    assert_same_function(model, out, flags=(True, False))


def test_a_cell_in_the_if_branch_that_fix_input_selects_is_quantized(tmp_path):
    """--fix-input folds the If; the branch's Scan, now in the main graph, compiles as a quantized LSTM/GRU."""
    from qcompile import api

    onnx.save(M.if_model("LSTM", "GRU", I, H), tmp_path / "if.onnx")
    calib = np.random.default_rng(0).normal(size=(6, 4, I)).astype(np.float32)
    for flag, op in ((True, "LSTM"), (False, "GRU")):
        r = api.compile(tmp_path / "if.onnx", config="w4a4", calib=calib, fix_inputs={"flag": [flag]})
        assert [row["op"] for row in r.report["recurrent"]] == [op]
        assert not any(n.op_type in ("If", "LSTM", "GRU") for n in r.model.graph.node)  # the quantized Scan form


def test_canonicalize_runs_the_pass_and_drops_the_old_weights():
    model = M.scan_model("LSTM", I, H)
    irm = ir.from_proto(model)
    ctx = CompileContext(config=None)
    run_pipeline(irm, canonicalize_passes(), ctx, verify_each=True)
    rec = next(r for r in ctx.records if r.name == "recognise_recurrent_cells")
    assert rec.modified
    out = ir.to_proto(irm)
    assert [n.op_type for n in out.graph.node if n.op_type in ("LSTM", "Scan")] == ["LSTM"]
    used = {i for n in out.graph.node for i in n.input}
    assert all(t.name in used for t in out.graph.initializer)  # the decomposed weights are gone
    assert_same_function(model, out)


@pytest.mark.parametrize("cell,lbr", [("LSTM", 0), ("GRU", 0), ("GRU", 1)])
@pytest.mark.parametrize("direction", ["forward", "reverse", "bidirectional"])
def test_the_float_scan_form_of_passes_rnn_reads_back_as_the_node(cell, lbr, direction):
    """passes/rnn.decompose's float Scan form (one Scan per direction, Slice'd gates, initial states sliced per
    direction) is a decomposed cell too: it reads back as one node per direction computing the same."""
    from onnx import helper

    from qcompile.passes.rnn import decompose

    native = M.native_model(cell, I, H, lbr=lbr, direction=direction, h0=True)
    spec = recurrent_spec(native.graph.node[0], {t.name: onnx.numpy_helper.to_array(t)
                                                 for t in native.graph.initializer}.get)
    nodes, inits = decompose(spec)
    graph = helper.make_graph(nodes + list(native.graph.node[1:]), "scan_form", list(native.graph.input),
                              list(native.graph.output), inits + list(native.graph.initializer)[3:])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    modified, irm, notes = _recognise(model)
    assert modified, notes
    verify(irm, "recognise_recurrent_cells")
    out = ir.to_proto(irm)
    specs = [_spec(out, n) for n in _rnn_nodes(out.graph)]
    want = ["forward", "reverse"] if direction == "bidirectional" else [direction]
    assert sorted(s.direction for s in specs) == want and {s.cell for s in specs} == {cell}
    assert_same_function(model, out)
    assert_same_function(native, out)


# ---------------------------------------------------------------------------------------------- refusals
REFUSED = {
    "peephole forget gate": (lambda: M.scan_model("LSTM", I, H, peephole=True), "not an affine map of x and h"),
    "ReLU candidate": (lambda: M.scan_model("GRU", I, H, act="Relu"), "Relu in the body"),
    "cell state emitted per step": (lambda: M.scan_model("LSTM", I, H, per_step="c"), "only h per step"),
    # the loop runs 5 steps whatever the length of x (shorter x: the model fails; longer: it reads a prefix)
    "constant trip count": (lambda: M.loop_model("LSTM", I, H, trip="const"), "trip count is not provably"),
    "two stacked layers in one body": (lambda: M.stacked_scan_model(I, H), "4 carried float states"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_what_is_not_one_cell_step_stays_with_its_reason(case):
    build, reason = REFUSED[case]
    model = build()
    modified, irm, notes = _recognise(model)
    assert not modified
    (note,) = notes.values()
    assert reason in note and "kept as it is" in note
    out = ir.to_proto(irm)
    loop = next(n for n in out.graph.node if n.op_type in ("Loop", "Scan"))
    assert any(p.key == NOTE_KEY and reason in p.value for p in loop.metadata_props)
    assert [n.op_type for n in out.graph.node] == [n.op_type for n in model.graph.node]
    assert_same_function(model, out, seqs=(9,))


def test_a_loop_that_is_no_cell_is_left_alone_without_a_note():
    from onnx import TensorProto, helper

    body = helper.make_graph([helper.make_node("Add", ["acc", "one"], ["acc2"]),
                              helper.make_node("Identity", ["c"], ["c2"])], "b",
                             [helper.make_tensor_value_info("t", TensorProto.INT64, []),
                              helper.make_tensor_value_info("c", TensorProto.BOOL, []),
                              helper.make_tensor_value_info("acc", TensorProto.FLOAT, [2])],
                             [helper.make_tensor_value_info("c2", TensorProto.BOOL, []),
                              helper.make_tensor_value_info("acc2", TensorProto.FLOAT, [2])],
                             [onnx.numpy_helper.from_array(np.ones(2, np.float32), "one")])
    graph = helper.make_graph([helper.make_node("Loop", ["n", "", "a0"], ["a"], body=body)], "g",
                              [helper.make_tensor_value_info("n", TensorProto.INT64, []),
                               helper.make_tensor_value_info("a0", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("a", TensorProto.FLOAT, [2])])
    modified, _, notes = _recognise(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))
    assert not modified and notes == {}


# ---------------------------------------------------------------------------------------------- real exports
def _torch_cells():
    from torch import nn

    class ScanCell(nn.Module):
        """nn.LSTMCell/GRUCell stepped by torch's scan: the dynamo exporter writes an ONNX Scan."""

        def __init__(self, cell):
            super().__init__()
            self.cell = cell

        def forward(self, x, h0, c0):
            from torch._higher_order_ops.scan import scan

            lstm = isinstance(self.cell, nn.LSTMCell)

            def step(carry, xt):
                new = self.cell(xt, carry) if lstm else self.cell(xt, carry[0])
                new = new if lstm else (new,)
                return new, new[0].clone()

            carry, ys = scan(step, (h0, c0) if lstm else (h0,), x)
            return (ys, *carry)

    class LoopLSTM(nn.Module):
        """A hand-written LSTM in a python loop (chunk, sigmoid, tanh), scripted: TorchScript writes a Loop."""

        def __init__(self):
            super().__init__()
            self.hidden = H  # TorchScript reads module attributes, not globals
            self.w_ih, self.w_hh = nn.Parameter(torch.randn(4 * H, I) / 3), nn.Parameter(torch.randn(4 * H, H) / 3)
            self.b_ih, self.b_hh = nn.Parameter(torch.randn(4 * H) / 3), nn.Parameter(torch.randn(4 * H) / 3)

        def forward(self, x):
            h = torch.zeros(x.shape[1], self.hidden)
            c = torch.zeros(x.shape[1], self.hidden)
            ys: list[torch.Tensor] = []
            for t in range(x.shape[0]):
                gates = torch.mm(x[t], self.w_ih.t()) + self.b_ih + torch.mm(h, self.w_hh.t()) + self.b_hh
                i, f, g, o = gates.chunk(4, 1)
                c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                h = torch.sigmoid(o) * torch.tanh(c)
                ys.append(h)
            return torch.stack(ys), h, c

    class LoopGRU(nn.Module):
        """PyTorch's GRU cell arithmetic written out with F.linear, scripted."""

        def __init__(self):
            super().__init__()
            self.hidden = H
            self.ih, self.hh = nn.Linear(I, 3 * H), nn.Linear(H, 3 * H)

        def forward(self, x):
            h = torch.zeros(x.shape[1], self.hidden)
            ys: list[torch.Tensor] = []
            for t in range(x.shape[0]):
                i_r, i_z, i_n = self.ih(x[t]).chunk(3, 1)
                h_r, h_z, h_n = self.hh(h).chunk(3, 1)
                r, z = torch.sigmoid(i_r + h_r), torch.sigmoid(i_z + h_z)
                n = torch.tanh(i_n + r * h_n)
                h = (1 - z) * n + z * h
                ys.append(h)
            return torch.stack(ys), h

    class LoopLSTMCell(nn.Module):
        """nn.LSTMCell in a scripted loop: TorchScript writes a one-step ONNX LSTM node inside the Loop body."""

        def __init__(self):
            super().__init__()
            self.hidden = H
            self.cell = nn.LSTMCell(I, H)

        def forward(self, x):
            h = torch.zeros(x.shape[1], self.hidden)
            c = torch.zeros(x.shape[1], self.hidden)
            ys: list[torch.Tensor] = []
            for t in range(x.shape[0]):
                h, c = self.cell(x[t], (h, c))
                ys.append(h)
            return torch.stack(ys), h, c

    class LoopLSTMCellBatchFirst(LoopLSTMCell):
        """The same over x [batch, seq, I]: x[:, t] exports as a whole-axis Slice + Gather(axis=1), the steps
        as ConcatFromSequence(axis=1)."""

        def forward(self, x):
            h = torch.zeros(x.shape[0], self.hidden)
            c = torch.zeros(x.shape[0], self.hidden)
            ys: list[torch.Tensor] = []
            for t in range(x.size(1)):
                h, c = self.cell(x[:, t], (h, c))
                ys.append(h)
            return torch.stack(ys, 1), h, c

    return ScanCell, LoopLSTM, LoopGRU, LoopLSTMCell, LoopLSTMCellBatchFirst


def _export(kind: str, path) -> onnx.ModelProto:
    import warnings

    from torch import nn

    ScanCell, LoopLSTM, LoopGRU, LoopLSTMCell, BatchFirst = _torch_cells()
    torch.manual_seed(0)
    x, h0 = torch.randn(6, BATCH, I), torch.randn(BATCH, H)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kind.startswith("dynamo"):
            cell = nn.LSTMCell(I, H) if "lstm" in kind else nn.GRUCell(I, H)
            seq, batch = torch.export.Dim("seq"), torch.export.Dim("batch")
            torch.onnx.export(ScanCell(cell), (x, h0, torch.randn(BATCH, H)), str(path), dynamo=True, verbose=False,
                              input_names=["x", "h0", "c0"],
                              dynamic_shapes={"x": {0: seq, 1: batch}, "h0": {0: batch}, "c0": {0: batch}})
        else:
            module = {"script-lstm": LoopLSTM, "script-gru": LoopGRU, "script-lstmcell": LoopLSTMCell,
                      "script-lstmcell-batch-first": BatchFirst}[kind]()
            axes = {0: "batch", 1: "seq"} if "batch-first" in kind else {0: "seq", 1: "batch"}
            torch.onnx.export(torch.jit.script(module), (x,), str(path), dynamo=False, input_names=["x"],
                              dynamic_axes={"x": axes})
    return onnx.load(str(path))


@pytest.mark.parametrize("kind,op,loop", [
    ("dynamo-lstmcell", "LSTM", "Scan"), ("dynamo-grucell", "GRU", "Scan"),
    ("script-lstm", "LSTM", "Loop"), ("script-gru", "GRU", "Loop"), ("script-lstmcell", "LSTM", "Loop"),
    ("script-lstmcell-batch-first", "LSTM", "Loop")])
def test_torch_exports_become_one_recurrent_node(kind, op, loop, tmp_path):
    """What torch's two exporters write for a cell stepped over time (torch 2.13: the dynamo exporter turns
    torch's scan into an ONNX Scan; the TorchScript exporter turns a scripted for-loop into a Loop) reads as the
    ONNX node, through the whole canonicalize pipeline."""
    if torch is None:
        pytest.skip("torch is not installed: the exporters' forms are not produced")
    model = _export(kind, tmp_path / "m.onnx")
    assert any(n.op_type == loop for n in model.graph.node)
    irm = ir.from_proto(model)
    ctx = CompileContext(config=None)
    run_pipeline(irm, canonicalize_passes(), ctx, verify_each=True)
    out = ir.to_proto(irm)
    assert _no_loops(out.graph)
    (node,) = _rnn_nodes(out.graph)
    assert node.op_type == op
    spec = _spec(out, node)
    assert spec.hidden == H and spec.input_size == I and spec.linear_before_reset == (op == "GRU")
    assert_same_function(model, out)


# ---------------------------------------------------------------------------------------------- end to end
@pytest.mark.parametrize("cell,lbr", [("LSTM", 0), ("GRU", 1)])
def test_compile_quantizes_a_decomposed_cell_like_the_onnx_node(cell, lbr, tmp_path):
    """compile(w4a4) of the Scan form quantizes the recurrent layer (report row, plan) and its fake-quant model
    equals the compile of the same cell written as one ONNX node; it stays near the float model."""
    from qcompile import api

    In, Hn = 16, 32
    step = {"lbr": lbr} if cell == "GRU" else {}
    onnx.save(M.scan_model(cell, In, Hn, outputs=("y", "h"), **step), tmp_path / "scan.onnx")
    onnx.save(M.native_model(cell, In, Hn, lbr=lbr), tmp_path / "native.onnx")
    rng = np.random.default_rng(0)
    calib = rng.normal(size=(10, 8, In)).astype(np.float32)
    got = api.compile(tmp_path / "scan.onnx", config="w4a4", calib=calib)
    want = api.compile(tmp_path / "native.onnx", config="w4a4", calib=calib)
    (row,) = got.report["recurrent"]
    assert row["node"] == "cell_scan" and row["op"] == cell and row["bits_w"] == 4 and "A4 on x_t" in row["quantized"]
    status = {o["node"]: o["status"] for o in got.report["ops"]}
    assert status["cell_scan"] == "W4A4 balanced"
    x = rng.normal(size=(9, 4, In)).astype(np.float32)
    q = _session(got.model).run(None, {"x": x})
    q_native = _session(want.model).run(None, {"x": x})
    f = _session(onnx.load(tmp_path / "scan.onnx")).run(None, {"x": x})
    for a, b, c in zip(q, q_native, f):
        np.testing.assert_allclose(a, b, atol=2 / 15)      # at most one A4 grid step where a sum rounds otherwise
        assert np.mean(a == b) > 0.99
        assert np.linalg.norm(a - c) / np.linalg.norm(c) < 0.5     # post-training W4A4 of a random cell


def test_inspect_lists_cells_inside_if_branches_and_says_why_a_loop_was_not_read(tmp_path):
    """A cell left inside an If branch gets a plan row (stays float, the If named); a Loop the pass refused shows
    its reason in `inspect` instead of "no weights"."""
    import onnx

    from qcompile import api
    from _rnn_models import if_model, loop_model

    onnx.save(if_model("LSTM", "GRU", 5, 4), tmp_path / "if.onnx")
    rows = {r["node"]: r for r in api.inspect(tmp_path / "if.onnx")}
    inner = [r for r in rows.values() if r["op"] in ("LSTM", "GRU")]
    assert inner and all(r["status"] == "float" and "inside the If node" in r["why"] for r in inner)
    onnx.save(loop_model("LSTM", 5, 4, trip="const"), tmp_path / "loop.onnx")
    loop = next(r for r in api.inspect(tmp_path / "loop.onnx") if r["op"] == "Loop")
    assert "is not read as an LSTM/GRU step" in loop["why"] and "trip" in loop["why"]
