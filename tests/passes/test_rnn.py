"""ONNX LSTM/GRU read into one recurrent representation; its numpy reference equals onnxruntime's own ops."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from qcompile.passes.rnn import UnsupportedRecurrent, recurrent_spec, run

I, H, SEQ, BATCH = 5, 7, 6, 3


def _model(op, direction="forward", *, lens=False, states=False, lbr=0, bias=True, extra=None):
    rng = np.random.default_rng(hash((op, direction, lens, states, lbr)) % 2**32)
    g = 4 if op == "LSTM" else 3
    d = 2 if direction == "bidirectional" else 1
    inits = [numpy_helper.from_array(rng.normal(0, 0.5, (d, g * H, I)).astype(np.float32), "W"),
             numpy_helper.from_array(rng.normal(0, 0.5, (d, g * H, H)).astype(np.float32), "R")]
    ins = ["x", "W", "R"]
    if bias:
        inits.append(numpy_helper.from_array(rng.normal(0, 0.3, (d, 2 * g * H)).astype(np.float32), "B"))
    ins.append("B" if bias else "")
    graph_in = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [SEQ, BATCH, I])]
    ins.append("lens" if lens else "")
    if lens:
        graph_in.append(helper.make_tensor_value_info("lens", TensorProto.INT32, [BATCH]))
    if states:
        ins.append("h0")
        graph_in.append(helper.make_tensor_value_info("h0", TensorProto.FLOAT, [d, BATCH, H]))
        if op == "LSTM":
            ins.append("c0")
            graph_in.append(helper.make_tensor_value_info("c0", TensorProto.FLOAT, [d, BATCH, H]))
    while ins and ins[-1] == "":
        ins.pop()
    outs = ["y", "y_h"] + (["y_c"] if op == "LSTM" else [])
    attrs = dict(hidden_size=H, direction=direction, **(extra or {}))
    if op == "GRU":
        attrs["linear_before_reset"] = lbr
    node = helper.make_node(op, ins, outs, name="rnn", **attrs)
    graph = helper.make_graph([node], "g", graph_in,
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, [SEQ, d, BATCH, H] if o == "y"
                                                             else [d, BATCH, H]) for o in outs], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _const(model):
    arrays = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return lambda name: arrays.get(name)


@pytest.mark.parametrize("op,lbr", [("LSTM", 0), ("GRU", 0), ("GRU", 1)])
@pytest.mark.parametrize("direction", ["forward", "reverse", "bidirectional"])
@pytest.mark.parametrize("lens,states", [(False, False), (True, True), (True, False)])
def test_reference_equals_onnxruntime(op, lbr, direction, lens, states):
    model = _model(op, direction, lens=lens, states=states, lbr=lbr)
    spec = recurrent_spec(model.graph.node[0], _const(model))
    assert spec.cell == op and spec.hidden == H and spec.num_directions == (2 if direction == "bidirectional" else 1)
    rng = np.random.default_rng(0)
    d = spec.num_directions
    feeds = {"x": rng.normal(size=(SEQ, BATCH, I)).astype(np.float32)}
    seq_lens = h0 = c0 = None
    if lens:
        seq_lens = np.array([SEQ, 1, 4], np.int32)[:BATCH]
        feeds["lens"] = seq_lens
    if states:
        h0 = rng.normal(0, 0.5, (d, BATCH, H)).astype(np.float32)
        feeds["h0"] = h0
        if op == "LSTM":
            c0 = rng.normal(0, 0.5, (d, BATCH, H)).astype(np.float32)
            feeds["c0"] = c0
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    got = run(spec, feeds["x"], seq_lens, h0, c0)
    for w, g_ in zip(want, got):
        np.testing.assert_allclose(g_, w, rtol=1e-5, atol=1e-5)


def test_no_bias_and_length_one_sequences():
    model = _model("GRU", bias=False)
    spec = recurrent_spec(model.graph.node[0], _const(model))
    assert not spec.Wb.any() and not spec.Rb.any()
    x = np.random.default_rng(1).normal(size=(1, BATCH, I)).astype(np.float32)
    y, yh, _ = run(spec, x)
    np.testing.assert_array_equal(y[0, 0], yh[0])


@pytest.mark.parametrize("extra,why", [
    ({"activations": ["Tanh", "Tanh", "Tanh"]}, "activations"),
    ({"clip": 3.0}, "clip"),
    ({"input_forget": 1}, "input_forget"),
])
def test_what_the_recipe_does_not_cover_is_named(extra, why):
    model = _model("LSTM", extra=extra)
    with pytest.raises(UnsupportedRecurrent, match=f"LSTM node 'rnn'.*{why}"):
        recurrent_spec(model.graph.node[0], _const(model))


def test_lengths_past_the_padded_length_are_refused():
    model = _model("LSTM")
    spec = recurrent_spec(model.graph.node[0], _const(model))
    with pytest.raises(ValueError, match="outside 0..6"):
        run(spec, np.zeros((SEQ, BATCH, I), np.float32), np.array([7, 1, 1]))


def _decomposed(model, spec, quant=None):
    from onnx import helper

    from qcompile.passes.rnn import decompose

    nodes, inits = decompose(spec, quant)
    g = model.graph
    graph = helper.make_graph(nodes, "q", list(g.input), list(g.output), list(g.initializer) + inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])


def _feeds(spec, lens, states, seed=0):
    rng = np.random.default_rng(seed)
    d = spec.num_directions
    feeds = {"x": rng.normal(size=(SEQ, BATCH, I)).astype(np.float32)}
    if lens:
        feeds["lens"] = np.array([SEQ, 1, 4], np.int32)
    if states:
        feeds["h0"] = np.tanh(rng.normal(0, 0.5, (d, BATCH, H))).astype(np.float32)
        if spec.cell == "LSTM":
            feeds["c0"] = rng.normal(0, 0.5, (d, BATCH, H)).astype(np.float32)
    return feeds


@pytest.mark.parametrize("op,lbr", [("LSTM", 0), ("GRU", 0), ("GRU", 1)])
@pytest.mark.parametrize("direction", ["forward", "reverse", "bidirectional"])
@pytest.mark.parametrize("lens,states", [(False, False), (True, True)])
def test_the_scan_form_equals_the_onnx_op_in_float(op, lbr, direction, lens, states):
    model = _model(op, direction, lens=lens, states=states, lbr=lbr)
    spec = recurrent_spec(model.graph.node[0], _const(model))
    feeds = _feeds(spec, lens, states)
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    got = _decomposed(model, spec).run(None, feeds)
    for w, g_ in zip(want, got):
        np.testing.assert_allclose(g_, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("op,lbr", [("LSTM", 0), ("GRU", 0), ("GRU", 1)])
@pytest.mark.parametrize("direction", ["forward", "bidirectional"])
@pytest.mark.parametrize("bits", [2, 4])
def test_the_fake_quant_scan_equals_the_quantized_reference(op, lbr, direction, bits):
    from qcompile.passes.rnn import RecurrentQuant, x_grid

    model = _model(op, direction, lens=True, states=True, lbr=lbr)
    spec = recurrent_spec(model.graph.node[0], _const(model))
    feeds = _feeds(spec, True, True, seed=1)
    xs, xz = x_grid(feeds["x"].min(), feeds["x"].max(), bits)
    quant, _ = RecurrentQuant.of(spec, bits, bits, "rnn-balanced", xs, xz)   # the form compile writes
    got = _decomposed(model, spec, quant).run(None, feeds)
    want = run(quant.quantized(spec), feeds["x"], feeds["lens"], feeds["h0"], feeds.get("c0"), quant=quant)
    # the hidden states sit on the grid; a matmul summed in another order may move one across a rounding boundary,
    # so compare the states' grid codes: nearly all equal
    n = (1 << bits) - 1
    codes = [np.rint((v + 1) / 2 * n) for v in (got[1], want[1])]
    assert np.mean(codes[0] == codes[1]) > 0.97
    np.testing.assert_allclose(got[0], want[0], atol=2.0 / n + 1e-6)
    on_grid = np.rint((got[1] + 1) / 2 * n) / n * 2 - 1
    np.testing.assert_allclose(got[1], on_grid, atol=1e-6)       # the new h is on the grid
    assert "A%d" % bits in quant.describe(spec)


def _lm_reader(calib, cell, seq=35, batch=8, n=4):
    from qcompile import lm

    cols = lm.batchify(calib, batch)

    class Reader:
        def __init__(self):
            self.i = 0

        def get_next(self):
            if self.i >= n:
                return None
            f = {"tokens": cols[self.i * seq:(self.i + 1) * seq], "h0": np.zeros((1, batch, 200), np.float32)}
            if cell == "lstm":
                f["c0"] = np.zeros((1, batch, 200), np.float32)
            self.i += 1
            return f

        def rewind(self):
            self.i = 0

    return Reader()


@pytest.mark.parametrize("cell,limit", [("lstm", 1.2), ("gru", 1.1)])
def test_compile_quantizes_the_bundled_language_models(cell, limit, tmp_path):
    from qcompile import api, datasets, lm

    tokens, calib = datasets.load_lm_sample()
    tokens = tokens[:3000]
    path = datasets.bundled_lm(cell)
    r = api.compile(path, config="w4a4", calib=_lm_reader(calib, cell))
    op = cell.upper()
    assert not any(n.op_type == op for n in r.model.graph.node) and any(n.op_type == "Scan" for n in r.model.graph.node)
    row = r.report["recurrent"][0]
    assert row["op"] == op and row["bits_w"] == 4 and "A4 on x_t" in row["quantized"] and "new h" in row["quantized"]
    status = {o["node"]: o["status"] for o in r.report["ops"]}
    assert status[row["node"]].startswith("W4A4")
    ppl_float, ppl_q = lm.perplexity(str(path), tokens), lm.perplexity(r.model, tokens)
    assert ppl_float < ppl_q < limit * ppl_float          # post-training W4A4: close to float
    r.save(tmp_path / "out")
    assert "## Recurrent layers" in (tmp_path / "out" / "report.md").read_text()


def test_a_recurrent_layer_outside_the_recipe_stays_float_with_its_reason(tmp_path):
    import onnx

    from qcompile import api

    model = _model("LSTM", extra={"clip": 3.0})
    onnx.save(model, tmp_path / "m.onnx")
    x = np.random.default_rng(0).normal(size=(SEQ, BATCH, I)).astype(np.float32)
    r = api.compile(tmp_path / "m.onnx", config="w4a4", calib=x)
    row = next(o for o in r.report["ops"] if o["op"] == "LSTM")
    assert row["status"] == "float" and "clip" in row["why"]
    assert any(n.op_type == "LSTM" for n in r.model.graph.node)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_a_cpu_artifact_runs_the_quantized_lm_as_one_compiled_time_loop(cell, tmp_path):
    """The artifact's recurrent layer is one Recurrent custom-op node (its time loop in the kernel library); its
    hidden states and the logits equal the fake-quant Scan form's in onnxruntime: the codes are the same, and only
    an LSTM's float cell state may differ by an ulp (libm's sigmoid/tanh against onnxruntime's)."""
    import onnx

    from qcompile import api, datasets, lm
    from qcompile.runtime import InferenceSession

    tokens, calib = datasets.load_lm_sample()
    r = api.compile(datasets.bundled_lm(cell), config="w2a2", calib=_lm_reader(calib, cell), target="cpu")
    node = f"/rnn/{cell.upper()}"
    plan = {p["node"]: p for p in r.manifest["plan"]}
    assert plan[node]["kernel"].startswith("bitserial-") and "time loop" in plan[node]["kernel"]
    r.save(tmp_path / "art")
    deploy = onnx.load(tmp_path / "art" / "deploy.onnx")
    assert [n.op_type for n in deploy.graph.node if n.op_type in ("Recurrent", "Scan", "LSTM", "GRU")] == ["Recurrent"]
    sess = InferenceSession(tmp_path / "art")
    want_sess = ort.InferenceSession(r.model.SerializeToString(), providers=["CPUExecutionProvider"])
    for seq, batch in ((20, 4), (1, 1), (7, 16)):
        feeds = {"tokens": lm.batchify(tokens[:2000], batch)[:seq], "h0": np.zeros((1, batch, 200), np.float32)}
        if cell == "lstm":
            feeds["c0"] = np.zeros((1, batch, 200), np.float32)
        got = sess.run(None, feeds)
        want = want_sess.run(None, feeds)
        names = [o.name for o in want_sess.get_outputs()]
        for name, g_, w in zip(names, got, want):
            if name == "cn":  # the float cell state
                np.testing.assert_allclose(g_, w, rtol=0, atol=1e-5)
            else:
                np.testing.assert_array_equal(g_, w, err_msg=f"{cell} output {name} at seq {seq}, batch {batch}")


@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
def test_a_torch_exported_two_layer_bidirectional_rnn_quantizes_every_layer(cell, tmp_path):
    import warnings

    torch = pytest.importorskip("torch")

    from qcompile import api

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = getattr(torch.nn, cell)(12, 16, num_layers=2, bidirectional=True, batch_first=True)
            self.fc = torch.nn.Linear(32, 5)

        def forward(self, x):
            return self.fc(self.rnn(x)[0][:, -1])

    torch.manual_seed(0)
    path = tmp_path / "rnn.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Net().eval(), (torch.randn(2, 9, 12),), str(path), input_names=["x"], output_names=["y"],
                          opset_version=17, dynamo=False, dynamic_axes={"x": {0: "N"}})
    x = np.random.default_rng(0).normal(size=(64, 9, 12)).astype(np.float32)
    r = api.compile(path, config="w8a8", calib=x)
    assert len(r.report["recurrent"]) == 2                    # both stacked layers, both directions each
    f = ort.InferenceSession(r.float_model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    q = ort.InferenceSession(r.model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    assert np.linalg.norm(q[0] - f[0]) / np.linalg.norm(f[0]) < 0.05
