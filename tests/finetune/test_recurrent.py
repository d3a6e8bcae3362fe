"""Quantized LSTM/GRU in torch (finetune/recurrent.py) and language-model fine-tuning (issue 13).

The torch layer equals passes/rnn.run (float and quantized) and onnxruntime on the ONNX op and on the compiled
fake-quant Scan form; a short truncated-BPTT fine-tune of a bundled LM at W2A2 lowers held-out perplexity below
post-training; the exported model holds the trained parameters; resume is exact; the CLI reports perplexities.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner

import qcompile.targets.cpu.caps as caps
from qcompile import api, datasets, lm
from qcompile.finetune.convert import UnsupportedOpError, to_torch
from qcompile.finetune.data import DataError, TokenStream, open_tokens
from qcompile.finetune.recurrent import build_lm_student, recurrent_layers, recurrent_quant
from qcompile.passes.rnn import RecurrentQuant, quantize_weights, recurrent_spec, run, x_grid
from tests.passes.test_rnn import BATCH, SEQ, _const, _feeds, _model


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """The LM loop is small ops per step: on a shared 2-core machine a second thread only waits for the busy core
    (measured 0.08 s a step on one thread, 0.6-0.9 s on two)."""
    monkeypatch.setattr(caps, "usable_cpus", lambda: 1)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class _Once:
    """A calibration reader of one seq-first feed (a dict's arrays would be split along their first axis)."""

    def __init__(self, *feeds):
        self.feeds, self.i = feeds, 0

    def get_next(self):
        self.i += 1
        return self.feeds[self.i - 1] if self.i <= len(self.feeds) else None

    def rewind(self):
        self.i = 0


def _torch_out(model, feeds, gm=None):
    gm = gm or to_torch(model)
    with torch.no_grad():
        out = gm(*[torch.from_numpy(feeds[i.name]) for i in model.graph.input])
    return [o.numpy() for o in out]


# ------------------------------------------------------------------------------------------- the torch layer
@pytest.mark.parametrize("op,lbr", [("LSTM", 0), ("GRU", 0), ("GRU", 1)])
@pytest.mark.parametrize("direction,lens,states", [("forward", False, False), ("reverse", True, True),
                                                   ("bidirectional", True, True), ("bidirectional", False, True)])
def test_float_layer_equals_onnxruntime_and_the_reference(op, lbr, direction, lens, states):
    model = _model(op, direction, lens=lens, states=states, lbr=lbr)
    spec = recurrent_spec(model.graph.node[0], _const(model))
    feeds = _feeds(spec, lens, states)
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    got = _torch_out(model, feeds)
    ref = run(spec, feeds["x"], feeds.get("lens"), feeds.get("h0"), feeds.get("c0"))
    for w, g, r in zip(want, got, ref):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6)


def test_layout_1_and_a_missing_bias():
    """Batch-first (onnxruntime refuses layout=1 itself: compared with the layout-0 op on transposed data)."""
    flat = _model("LSTM", "bidirectional", states=True, bias=False)
    model = onnx.ModelProto()
    model.CopyFrom(flat)
    model.graph.node[0].attribute.append(onnx.helper.make_attribute("layout", 1))
    g = model.graph
    for vi, shape in zip(list(g.input) + list(g.output),
                         [(BATCH, SEQ, 5), (BATCH, 2, 7), (BATCH, 2, 7), (BATCH, SEQ, 2, 7), (BATCH, 2, 7),
                          (BATCH, 2, 7)]):
        vi.CopyFrom(onnx.helper.make_tensor_value_info(vi.name, onnx.TensorProto.FLOAT, shape))
    rng = np.random.default_rng(3)
    feeds = {"x": rng.normal(size=(SEQ, BATCH, 5)).astype(np.float32),
             "h0": rng.normal(0, 0.5, (2, BATCH, 7)).astype(np.float32),
             "c0": rng.normal(0, 0.5, (2, BATCH, 7)).astype(np.float32)}
    want = ort.InferenceSession(flat.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    gm = to_torch(model)
    assert not recurrent_layers(gm)["rnn"].B.any()
    got = _torch_out(model, {"x": feeds["x"].transpose(1, 0, 2).copy(), "h0": feeds["h0"].transpose(1, 0, 2).copy(),
                             "c0": feeds["c0"].transpose(1, 0, 2).copy()}, gm)
    np.testing.assert_allclose(got[0].transpose(1, 2, 0, 3), want[0], rtol=1e-5, atol=1e-5)
    for w, g_ in zip(want[1:], got[1:]):
        np.testing.assert_allclose(g_.transpose(1, 0, 2), w, rtol=1e-5, atol=1e-5)


def test_what_the_recipe_does_not_cover_is_one_converter_error():
    model = _model("LSTM", extra={"clip": 3.0})
    with pytest.raises(UnsupportedOpError, match="node 'rnn' \\(op LSTM\\): cell clip"):
        to_torch(model)


@pytest.mark.parametrize("quantizer", ["balanced", "uniform", "rnn-balanced"])
@pytest.mark.parametrize("op,lbr", [("LSTM", 0), ("GRU", 0), ("GRU", 1)])
@pytest.mark.parametrize("bits", [2, 4])
def test_quantized_layer_equals_the_quantized_reference(quantizer, op, lbr, bits):
    model = _model(op, "bidirectional", lens=True, states=True, lbr=lbr)
    spec = recurrent_spec(model.graph.node[0], _const(model))
    feeds = _feeds(spec, True, True, seed=1)
    Wq, Rq, _ = quantize_weights(spec, bits, quantizer)
    xs, xz = x_grid(feeds["x"].min(), feeds["x"].max(), bits)
    quant = RecurrentQuant(bits, xs, xz, Wq, Rq)
    want = run(quant.quantized(spec), feeds["x"], feeds["lens"], feeds["h0"], feeds.get("c0"), quant=quant)
    gm = to_torch(model)
    layer = recurrent_layers(gm)["rnn"].enable_quant(bits, bits, quantizer, xs, xz)
    with torch.no_grad():
        tw, tr = layer.quantized_weights()
    np.testing.assert_array_equal(tw.numpy(), Wq)       # the registry twin: the numpy quantizer's values
    np.testing.assert_array_equal(tr.numpy(), Rq)
    got = _torch_out(model, feeds, gm)
    # the same arithmetic in the same order; a product summed in another order may still move one state across
    # a rounding boundary, so compare grid codes (nearly all equal) and values within one grid step
    n = (1 << bits) - 1
    codes = [np.rint((v + 1) / 2 * n) for v in (got[1], want[1])]
    assert np.mean(codes[0] == codes[1]) > 0.97
    np.testing.assert_allclose(got[0], want[0], atol=2.0 / n + 1e-6)
    if op == "LSTM":
        np.testing.assert_allclose(got[2], want[2], atol=0.5)


@pytest.mark.parametrize("op,lbr", [("LSTM", 0), ("GRU", 0), ("GRU", 1)])
def test_student_equals_the_compiled_fake_quant_model(op, lbr, tmp_path):
    model = _model(op, "bidirectional", lens=True, states=True, lbr=lbr)
    onnx.save(model, tmp_path / "m.onnx")
    spec = recurrent_spec(model.graph.node[0], _const(model))
    r = api.compile(tmp_path / "m.onnx", config="w2a2", calib=_Once(_feeds(spec, True, True, seed=2)))
    assert r.report["recurrent"] and not any(n.op_type == op for n in r.model.graph.node)
    student = build_lm_student(r, r.config, learn_clip=False, gbits=None)
    layer = recurrent_layers(student)["rnn"]
    assert (layer.bits_w, layer.bits_a, layer.quantizer) == (2, 2, "balanced")
    assert layer.x_grid_values() == recurrent_quant(r, "rnn", "x")[3:]
    for seed in (2, 5):
        feeds = _feeds(spec, True, True, seed=seed)
        want = ort.InferenceSession(r.model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
        got = _torch_out(model, feeds, student)
        codes = [np.rint((v + 1) / 2 * 3) for v in (got[1], want[1])]
        assert np.mean(codes[0] == codes[1]) > 0.97
        np.testing.assert_allclose(got[0], want[0], atol=2 / 3 + 1e-6)
        assert np.mean(np.abs(got[0] - want[0]) < 1e-5) > 0.97


def test_straight_through_gradients_reach_every_trained_parameter(tmp_path):
    model = _model("GRU", lens=False, states=True, lbr=0)
    onnx.save(model, tmp_path / "m.onnx")
    spec = recurrent_spec(model.graph.node[0], _const(model))
    feeds = _feeds(spec, False, True)
    r = api.compile(tmp_path / "m.onnx", config="w2a2", calib=_Once(feeds))
    student = build_lm_student(r, r.config, learn_clip=True, gbits=None)
    layer = recurrent_layers(student)["rnn"]
    out = student(*[torch.from_numpy(feeds[i.name]) for i in model.graph.input])
    (out[0].square().sum() + out[1].sum()).backward()
    for name, p in (("W", layer.W), ("R", layer.R), ("B", layer.B), ("x_scale", layer.x_scale)):
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_export_holds_trained_weights_and_x_grid(tmp_path):
    """Stand-in for training: move W, R, B and the learned x_t step; export's Scan form computes the moved student."""
    from qcompile.finetune.api import export

    model = _model("LSTM", "bidirectional", lens=True, states=True)
    onnx.save(model, tmp_path / "m.onnx")
    spec = recurrent_spec(model.graph.node[0], _const(model))
    r = api.compile(tmp_path / "m.onnx", config="w2a2", calib=_Once(_feeds(spec, True, True, seed=2)))
    student = build_lm_student(r, r.config, learn_clip=True, gbits=None)
    layer = recurrent_layers(student)["rnn"]
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in (layer.W, layer.R, layer.B):
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
        layer.x_scale.mul_(1.37)
    compiled, trained = export(r.float_model, student, r.config, str(tmp_path / "m.onnx"), "0" * 64)
    w = {t.name: onnx.numpy_helper.to_array(t) for t in trained.graph.initializer}
    np.testing.assert_array_equal(w[model.graph.node[0].input[1]], layer.W.detach().numpy())
    assert f"x_t grid [{-layer.x_zero * layer.x_grid_values()[0]:.3g}" in compiled.report["recurrent"][0]["quantized"]
    feeds = _feeds(spec, True, True, seed=4)
    want = ort.InferenceSession(compiled.model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    got = _torch_out(model, feeds, student)
    codes = [np.rint((v + 1) / 2 * 3) for v in (got[1], want[1])]
    assert np.mean(codes[0] == codes[1]) > 0.97
    assert np.mean(np.abs(got[0] - want[0]) < 1e-5) > 0.97


# ------------------------------------------------------------------------------------------- token streams
def test_token_stream_windows_carry_on_and_resume_exactly():
    s = TokenStream(np.arange(5000) % 97, seq_len=20)
    n = s.num_batches(16)
    for epoch in (0, 1, 2):
        wins = list(s.batches(16, seed=0, epoch=epoch))
        assert len(wins) == n
        for (x0, y0), (x1, _) in zip(wins, wins[1:]):
            assert x0.shape == y0.shape == (20, 16)
            np.testing.assert_array_equal(y0[:-1], x0[1:])       # y is the next token
            np.testing.assert_array_equal(x1[0], y0[-1])         # the next window continues the stream
        tail = list(s.batches(16, seed=0, epoch=epoch, start=5))
        assert all((a[0] == b[0]).all() for a, b in zip(wins[5:], tail))
    offsets = {s.offset(seed=0, epoch=e) for e in range(10)}
    assert len(offsets) > 1 and all(0 <= o < 20 for o in offsets)
    train, val = s.split(0.1)
    assert len(val) == 500 and (np.concatenate([train.tokens, val.tokens]) == s.tokens).all()
    with pytest.raises(DataError, match="out of range; the model's vocabulary has 50 ids"):
        s.check_vocab(50)
    with pytest.raises(DataError, match="1-D stream of integer ids"):
        TokenStream(np.zeros((3, 4), np.int64))
    assert len(open_tokens("kjv")) == 16384 and open_tokens("kjv:test").source == "kjv:test"


# ------------------------------------------------------------------------------------------- fine-tuning
@pytest.fixture(scope="module")
def lm_tokens():
    tokens, _ = datasets.load_lm_sample()
    return tokens[:3000]


def test_a_short_finetune_lowers_w2a2_perplexity_below_post_training(lm_tokens, tmp_path):
    import qcompile

    r = qcompile.finetune(datasets.bundled_lm("gru"), config="w2a2", data="kjv", val=lm_tokens, steps=40,
                          batch=16, seq_len=20, lr=1e-3, log=lambda *a: None)
    rep = r.report
    assert rep["task"] == "language-model" and rep["steps"] == 40
    # held-out test tokens, onnxruntime on the ONNX models
    assert rep["float_val_ppl"] < rep["finetuned_val_ppl"] < 0.7 * rep["ptq_val_ppl"], rep
    assert rep["ptq_val_ppl"] == pytest.approx(lm.perplexity(
        api.compile(datasets.bundled_lm("gru"), config="w2a2", calib=_reader_for("gru")).model, lm_tokens), rel=0.05)
    # the exported fake-quant model holds the trained parameters: onnxruntime equals the trained torch student
    assert rep["export_check"]["rel_diff"] < 5e-3
    assert lm.perplexity(r.model, lm_tokens) == pytest.approx(rep["finetuned_val_ppl"], rel=1e-9)
    assert any(n.op_type == "Scan" for n in r.model.graph.node) and not any(n.op_type == "GRU"
                                                                           for n in r.model.graph.node)
    out = r.save(tmp_path / "ft")
    assert "| fine-tuned quantized |" in (out / "report.md").read_text()
    # float.onnx holds the trained float weights: it differs from the source, and is a working LM
    trained = onnx.load(out / "float.onnx")
    src = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(datasets.bundled_lm("gru")).graph.initializer}
    changed = {t.name for t in trained.graph.initializer
               if t.name in src and not np.array_equal(onnx.numpy_helper.to_array(t), src[t.name])}
    assert {"gru.W", "gru.R", "gru.B", "emb.weight", "out.weight_T"} <= changed
    assert lm.is_language_model(out / "float.onnx")


def _reader_for(cell):
    from qcompile.finetune.recurrent import StreamReader

    return StreamReader(open_tokens("kjv"), lm.lm_signature(datasets.bundled_lm(cell)))


def test_resume_continues_the_loss_curve_exactly(lm_tokens, tmp_path):
    import qcompile
    from qcompile.finetune.loop import Interrupted

    kw = dict(config="w2a2", data="kjv", val=lm_tokens[:800], steps=8, batch=8, seq_len=10, lr=1e-3,
              log=lambda *a: None)
    whole = qcompile.finetune(datasets.bundled_lm("lstm"), out=tmp_path / "a", **kw)
    with pytest.raises(Interrupted):
        qcompile.finetune(datasets.bundled_lm("lstm"), out=tmp_path / "b", _stop_after_steps=5, **kw)
    resumed = qcompile.finetune(datasets.bundled_lm("lstm"), out=tmp_path / "b", resume=True, **kw)
    np.testing.assert_array_equal(resumed.report["history"]["step_loss"], whole.report["history"]["step_loss"])
    assert resumed.report["finetuned_val_ppl"] == whole.report["finetuned_val_ppl"]
    with pytest.raises(Exception, match="seq_len=10, this run asks seq_len=12"):
        qcompile.finetune(datasets.bundled_lm("lstm"), out=tmp_path / "b", resume=True, **{**kw, "seq_len": 12})


def test_cli_finetune_and_eval_report_perplexity(lm_tokens, tmp_path):
    from qcompile.cli import main

    np.savez(tmp_path / "train.npz", tokens=open_tokens("kjv").tokens[:6000])
    np.savez(tmp_path / "val.npz", tokens=lm_tokens[:1000])
    out = tmp_path / "ft"
    res = CliRunner().invoke(main, ["finetune", str(datasets.bundled_lm("lstm")), "--config", "w2a2", "--data",
                                    str(tmp_path / "train.npz"), "--val", str(tmp_path / "val.npz"), "--steps", "4",
                                    "--batch", "8", "--seq-len", "10", "-o", str(out)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "validation perplexity: float" in res.output and "fine-tuned" in res.output
    rep = json.loads((out / "report.json").read_text())
    res = CliRunner().invoke(main, ["eval", str(datasets.bundled_lm("lstm")), str(out / "model.onnx"), "--data",
                                    str(tmp_path / "val.npz"), "--json"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    ev = json.loads(res.output)
    assert ev["quant_ppl"] == pytest.approx(rep["finetuned_val_ppl"], rel=1e-9)
    assert ev["float_ppl"] == pytest.approx(rep["float_val_ppl"], rel=1e-9)
    res = CliRunner().invoke(main, ["eval", str(datasets.bundled_lm("lstm")), str(out / "model.onnx"), "--data",
                                    str(tmp_path / "nope.npz")])
    assert res.exit_code == 1 and "no such file" in res.output
