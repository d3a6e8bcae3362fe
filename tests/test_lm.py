"""The bundled KJV language models (models/kjv_*_lm.onnx) and qcompile.lm (streaming perplexity, detector).

Only shipped files are used: no `bible` reader, no training.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from qcompile import datasets, lm  # noqa: E402
from qcompile.errors import CalibrationError, QcompileError  # noqa: E402

CELLS = ["lstm", "gru"]


@pytest.fixture(scope="module")
def meta():
    return json.loads((datasets.models_dir() / datasets.LM_META_FILE).read_text())


@pytest.fixture(scope="module")
def sample():
    return datasets.load_lm_sample()


@pytest.fixture(scope="module")
def sessions():
    return {c: ort.InferenceSession(str(datasets.bundled_lm(c)), providers=["CPUExecutionProvider"]) for c in CELLS}


@pytest.mark.parametrize("cell", CELLS)
def test_bundled_lm_is_self_contained_onnx_with_recurrent_op(cell, meta):
    path = datasets.bundled_lm(cell)
    assert path.name == f"kjv_{cell}_lm.onnx"
    assert path.stat().st_size < 8 * 1024 * 1024
    model = onnx.load(str(path), load_external_data=False)
    onnx.checker.check_model(model, full_check=True)
    assert all(t.data_location != onnx.TensorProto.EXTERNAL and not t.external_data for t in model.graph.initializer)
    opset = {o.domain: o.version for o in model.opset_import}
    assert opset.get("", opset.get("ai.onnx")) == 17
    ops = [n.op_type for n in model.graph.node]
    assert ops.count(cell.upper()) == 1 and "Gather" in ops and "MatMul" in ops
    hidden, vocab = meta["models"][cell]["dims"]["hidden"], meta["vocab"]["size"]
    states = ["h0", "c0"] if cell == "lstm" else ["h0"]

    def sig(vis):
        return [(v.name, v.type.tensor_type.elem_type,
                 [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]) for v in vis]

    F, I64 = onnx.TensorProto.FLOAT, onnx.TensorProto.INT64
    assert sig(model.graph.input) == [("tokens", I64, ["seq", "batch"])] + [
        (s, F, [1, "batch", hidden]) for s in states]
    assert sig(model.graph.output) == [("logits", F, ["seq", "batch", vocab])] + [
        (s.replace("0", "n"), F, [1, "batch", hidden]) for s in states]
    assert lm.is_language_model(str(path)) and lm.is_language_model(model)
    s = lm.lm_signature(model)
    assert (s.tokens, s.states, s.logits, s.batch_first, s.vocab) == ("tokens", tuple(states), "logits", False, vocab)
    assert s.final_states == tuple(x.replace("0", "n") for x in states)


def test_fmnist_models_are_not_language_models():
    for name in ("cnn", "mlp"):
        assert not lm.is_language_model(str(datasets.bundled_model(name)))
        with pytest.raises(QcompileError):
            lm.lm_signature(str(datasets.bundled_model(name)))
    assert not lm.is_language_model(b"not an onnx model")


def test_lm_sample_and_vocab(meta, sample):
    tokens, calib = sample
    vocab = datasets.load_lm_vocab()
    assert len(vocab) == meta["vocab"]["size"] and vocab[:2] == ["<unk>", "<eos>"] and len(set(vocab)) == len(vocab)
    assert tokens.dtype == np.int64 and tokens.shape == (meta["sample"]["tokens"]["n"],)
    assert calib.dtype == np.int64 and calib.shape == (meta["sample"]["calib"]["n"],)
    for t in (tokens, calib):
        assert 0 <= t.min() and t.max() < len(vocab)
        assert (t == 1).mean() > 0.01  # verse ends are there
    assert " ".join(vocab[i] for i in tokens[:6]) == "now it came to pass after"  # 2 Samuel 1:1
    with pytest.raises(QcompileError):
        datasets.bundled_lm("transformer")


def test_load_lm_sample_errors(tmp_path):
    with pytest.raises(CalibrationError):
        datasets.load_lm_sample(tmp_path / "missing.npz")
    np.savez(tmp_path / "bad.npz", tokens=np.zeros((2, 3), np.int64), calib=np.zeros(4, np.int64))
    with pytest.raises(CalibrationError):
        datasets.load_lm_sample(tmp_path / "bad.npz")


@pytest.mark.parametrize("cell", CELLS)
def test_bundled_lm_runs_in_onnxruntime(cell, meta, sample, sessions):
    sess = sessions[cell]
    hidden, vocab = meta["models"][cell]["dims"]["hidden"], meta["vocab"]["size"]
    x = sample[0][:21].reshape(7, 3)
    feed = {"tokens": x, **{i.name: np.zeros((1, 3, hidden), np.float32) for i in sess.get_inputs()[1:]}}
    out = sess.run(None, feed)
    assert out[0].shape == (7, 3, vocab) and out[0].dtype == np.float32
    assert all(o.shape == (1, 3, hidden) for o in out[1:]) and len(out) == (3 if cell == "lstm" else 2)
    assert np.isfinite(out[0]).all()


@pytest.mark.parametrize("cell", CELLS)
def test_sample_perplexity_equals_recorded(cell, meta, sample, sessions):
    rec = meta["models"][cell]["perplexity"]
    ev = meta["eval"]
    ppl = lm.perplexity(datasets.bundled_lm(cell), sample[0], seq_len=ev["seq_len"], batch=ev["batch"],
                        carry_state=ev["carry_state"], session=sessions[cell])
    assert ppl == pytest.approx(rec["sample_onnxruntime"], rel=1e-4)
    assert ppl == pytest.approx(rec["sample_torch"], rel=1e-3)
    assert ppl < 150  # a trained model (a uniform guess over the vocab would be ~5000)


@pytest.mark.parametrize("cell", CELLS)
def test_carrying_state_lowers_perplexity(cell, sample, sessions):
    tokens = sample[0][:6000]
    path = datasets.bundled_lm(cell)
    carry = lm.perplexity(path, tokens, session=sessions[cell])
    fresh = lm.perplexity(path, tokens, carry_state=False, session=sessions[cell])
    assert carry < fresh * 0.97, (carry, fresh)


# ------------------------------------------------------------------ qcompile.lm against torch, synthetic models

def _export_tiny(tmp_path, cell: str, vocab=31, emb=8, hidden=12):
    torch = pytest.importorskip("torch")
    nn = torch.nn

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(vocab, emb)
            self.rnn = (nn.LSTM if cell == "lstm" else nn.GRU)(emb, hidden)
            self.out = nn.Linear(hidden, vocab)

        def forward(self, tokens, h0, c0=None):
            if cell == "lstm":
                y, (h, c) = self.rnn(self.emb(tokens), (h0, c0))
                return self.out(y), h, c
            y, h = self.rnn(self.emb(tokens), h0)
            return self.out(y), h

    torch.manual_seed(0)
    m = Tiny().eval()
    names = ["tokens", "h0", "c0"] if cell == "lstm" else ["tokens", "h0"]
    outs = ["logits", "hn", "cn"] if cell == "lstm" else ["logits", "hn"]
    dyn = {"tokens": {0: "seq", 1: "batch"}, "logits": {0: "seq", 1: "batch"},
           **{n: {1: "batch"} for n in names[1:] + outs[1:]}}
    h = torch.zeros(1, 2, hidden)
    args = (torch.zeros(3, 2, dtype=torch.int64), h, h)[:len(names)]
    path = tmp_path / f"tiny_{cell}.onnx"
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(m, args, str(path), dynamo=False, opset_version=17, input_names=names,
                          output_names=outs, dynamic_axes=dyn)
    return torch, m, path, hidden


@pytest.mark.parametrize("cell", CELLS)
def test_perplexity_equals_direct_torch_computation(tmp_path, cell):
    torch, m, path, hidden = _export_tiny(tmp_path, cell)
    tokens = np.random.default_rng(1).integers(0, 31, size=1003)
    batch, seq_len = 4, 7
    n = len(tokens) // batch  # 250 rows; windows 7,7,...,4 predicting rows 1..249
    cols = torch.from_numpy(tokens[:n * batch].reshape(batch, n).T.copy())

    def nll(x, y, state):
        with torch.no_grad():
            logits = m(x, *state)[0]
        return torch.nn.functional.cross_entropy(logits.double().reshape(-1, 31), y.reshape(-1), reduction="sum")

    zero = [torch.zeros(1, batch, hidden)] * (2 if cell == "lstm" else 1)
    # Carried state == the whole column sequence in one run.
    want = math.exp(nll(cols[:-1], cols[1:], zero).item() / ((n - 1) * batch))
    got = lm.perplexity(str(path), tokens, seq_len=seq_len, batch=batch)
    assert got == pytest.approx(want, rel=1e-5)
    # No carried state == every window from zero states.
    total = sum(nll(cols[i:min(i + seq_len, n - 1)], cols[i + 1:min(i + seq_len, n - 1) + 1], zero).item()
                for i in range(0, n - 1, seq_len))
    want_fresh = math.exp(total / ((n - 1) * batch))
    got_fresh = lm.perplexity(onnx.load(str(path)), tokens, seq_len=seq_len, batch=batch, carry_state=False)
    assert got_fresh == pytest.approx(want_fresh, rel=1e-5)
    assert got != pytest.approx(got_fresh, rel=1e-6)
    assert lm.is_language_model(str(path))


def test_perplexity_input_errors(tmp_path):
    _, _, path, _ = _export_tiny(tmp_path, "gru")
    with pytest.raises(QcompileError, match="too few"):
        lm.perplexity(str(path), np.arange(5), batch=4)
    with pytest.raises(QcompileError, match=r"\[0, 31\)"):
        lm.perplexity(str(path), np.full(100, 31), batch=4)
    with pytest.raises(QcompileError, match="1-D"):
        lm.perplexity(str(path), np.zeros((10, 10), np.int64), batch=4)
