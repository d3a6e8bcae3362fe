"""The compiled recurrent layer (targets/cpu/recurrent.py, templates/layer_rnn.c, the Recurrent custom op).

Its integer parts are exact: every gate product is a BitGemm layer of the library, checked here against the numpy
integer reference (qcompile.reference.bit_gemm, then acc * m + b in float32); the codes come from the exact
boundaries of the fake-quant model's QuantizeLinear nodes. The whole layer is then held to the fake-quant Scan form in
onnxruntime: hidden states (codes on the [-1, 1] grid) equal, an LSTM's float cell state within float rounding.
One model holds an LSTM (bidirectional, lengths, states), a GRU (reverse, lengths) and a GRU with
linear_before_reset, so one library build covers them.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from qcompile import api, reference
from qcompile.errors import RuntimeInputError
from qcompile.runtime import InferenceSession
from qcompile.runtime.kernels import Library
from qcompile.targets.cpu.recurrent import grid_boundaries, grid_values, recurrent_layers

I, H, SEQ, BATCH = 70, 33, 9, 3        # K = 70 and 33: not multiples of 64


def _rnn_model():
    """x -> LSTM (bidirectional, sequence_lens, initial h and c), GRU (reverse, sequence_lens), GRU
    (linear_before_reset); every output is a graph output."""
    rng = np.random.default_rng(7)
    inits, nodes, outs = [], [], []

    def weights(name, d, g, bias=True):
        inits.append(numpy_helper.from_array(rng.normal(0, 0.4, (d, g * H, I)).astype(np.float32), f"{name}_W"))
        inits.append(numpy_helper.from_array(rng.normal(0, 0.4, (d, g * H, H)).astype(np.float32), f"{name}_R"))
        inits.append(numpy_helper.from_array(rng.normal(0, 0.3, (d, 2 * g * H)).astype(np.float32), f"{name}_B"))
        return [f"{name}_W", f"{name}_R", f"{name}_B"]

    nodes.append(helper.make_node("LSTM", ["x", *weights("lstm", 2, 4), "lens", "h0", "c0"],
                                  ["lstm_y", "lstm_h", "lstm_c"], name="lstm", hidden_size=H,
                                  direction="bidirectional"))
    nodes.append(helper.make_node("GRU", ["x", *weights("gru", 1, 3), "lens"], ["gru_y", "gru_h"], name="gru",
                                  hidden_size=H, direction="reverse"))
    nodes.append(helper.make_node("GRU", ["x", *weights("lbr", 1, 3)], ["lbr_y", "lbr_h"], name="lbr", hidden_size=H,
                                  linear_before_reset=1))
    outs = [("lstm_y", [None, 2, None, H]), ("lstm_h", [2, None, H]), ("lstm_c", [2, None, H]),
            ("gru_y", [None, 1, None, H]), ("gru_h", [1, None, H]), ("lbr_y", [None, 1, None, H]),
            ("lbr_h", [1, None, H])]
    graph = helper.make_graph(
        nodes, "rnns",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["seq", "batch", I]),
         helper.make_tensor_value_info("lens", TensorProto.INT32, ["batch"]),
         helper.make_tensor_value_info("h0", TensorProto.FLOAT, [2, "batch", H]),
         helper.make_tensor_value_info("c0", TensorProto.FLOAT, [2, "batch", H])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [d if d is not None else "s" for d in shape])
         for n, shape in outs], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _feeds(seq, batch, rng, lens=None):
    return {"x": rng.normal(size=(seq, batch, I)).astype(np.float32),
            "lens": np.asarray(lens if lens is not None else [seq] * batch, np.int32),
            "h0": rng.normal(0, 0.5, (2, batch, H)).astype(np.float32),
            "c0": rng.normal(0, 0.5, (2, batch, H)).astype(np.float32)}


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    out = tmp_path_factory.mktemp("rnn")
    onnx.save(_rnn_model(), out / "rnns.onnx")
    r = api.compile(out / "rnns.onnx", config="w2a2", target="cpu")
    r.save(out / "art")
    return r, out / "art"


def test_every_recurrent_layer_runs_as_one_custom_op(compiled):
    r, art = compiled
    plan = {p["node"]: p for p in r.manifest["plan"]}
    for name in ("lstm", "gru", "lbr"):
        assert "time loop" in plan[name]["kernel"], plan[name]
    deploy = onnx.load(art / "deploy.onnx")
    assert sorted(n.name for n in deploy.graph.node if n.op_type == "Recurrent") == ["gru", "lbr", "lstm"]
    assert not [n for n in deploy.graph.node if n.op_type in ("Scan", "LSTM", "GRU")]


@pytest.mark.parametrize("seq,batch,lens", [(SEQ, BATCH, [SEQ, 1, 5]), (1, 1, None), (4, 5, [0, 4, 2, 3, 1])])
def test_the_compiled_layers_equal_the_fake_quant_scan_form(compiled, seq, batch, lens):
    r, art = compiled
    feeds = _feeds(seq, batch, np.random.default_rng(seq * 10 + batch), lens)
    got = InferenceSession(art).run(None, feeds)
    sess = ort.InferenceSession(r.model.SerializeToString(), providers=["CPUExecutionProvider"])
    want = sess.run(None, feeds)
    for out, g, w in zip(sess.get_outputs(), got, want):
        assert g.shape == w.shape, out.name
        if out.name == "lstm_c":   # the float cell state: onnxruntime's sigmoid/tanh against the library's
            np.testing.assert_allclose(g, w, rtol=0, atol=2e-6, err_msg=out.name)
        else:                      # codes on the grid: the same values
            np.testing.assert_array_equal(g, w, err_msg=out.name)


def test_the_gate_products_are_exact_integer_gemms(compiled):
    """Each BitGemm of a recurrent layer on random codes: acc = reference.bit_gemm exactly, then acc * m + b in
    float32, bit for bit (awkward K = 70 and 33, batch 1 and the seq * batch rows of the input products)."""
    r, art = compiled
    lib = Library(next((art / "kernels").glob("*.so")))
    rng = np.random.default_rng(3)
    checked = 0
    for layer in recurrent_layers(r.model):
        for spec in layer.specs():
            for rows in (1, 7, SEQ * BATCH):
                codes = rng.integers(0, 4, (rows, spec.K)).astype(np.uint8)
                acc = reference.bit_gemm(codes, spec.w, spec.wzero2)
                want = acc.astype(np.float32) * spec.mult + spec.bias
                np.testing.assert_array_equal(lib.run(spec.name, codes), want, err_msg=spec.name)
                checked += 1
    assert checked == 3 * (2 * 2 + 3 + 2)   # LSTM: W, R per direction; GRU: W, R, Rh; GRU lbr: W, R


def test_code_boundaries_agree_with_onnxruntime():
    """The [-1, 1] grid's boundaries and values are what the Scan form's Mul/Add/QuantizeLinear/Min and
    DequantizeLinear/Mul/Sub compute (input_quant.code_thresholds checks every boundary's neighbours)."""
    for bits in (1, 2, 4):
        thr = grid_boundaries(bits)
        n = (1 << bits) - 1
        assert thr.shape == (n,) and np.all(np.diff(thr) > 0) and -1 <= thr[0] and thr[-1] <= 1
        v = grid_values(bits)
        assert v[0] == -1 and v[-1] == 1 and v.dtype == np.float32


def test_bad_inputs_get_one_line_errors(compiled):
    _, art = compiled
    sess = InferenceSession(art)
    feeds = _feeds(4, 2, np.random.default_rng(1), [4, 9])
    with pytest.raises(RuntimeInputError, match="'gru': a sequence_lens entry is negative or longer than the padded "
                                                "length 4"):
        sess.run(None, feeds)
    feeds = _feeds(4, 2, np.random.default_rng(1))
    feeds["x"] = feeds["x"][..., :5].copy()
    with pytest.raises(RuntimeInputError, match=r"input 'x': shape \[4, 2, 5\], expected \['seq', 'batch', 70\]"):
        sess.run(None, feeds)


@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
def test_an_exporter_decomposed_cell_compiles_to_the_same_time_loop(cell, tmp_path):
    """A Loop whose body is one cell step (TorchScript's form; passes/rnn_import.py reads it as an LSTM/GRU node)
    becomes one Recurrent custom op in the artifact, equal to its own fake-quant model."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[2] / "passes"))
    from _rnn_models import loop_model

    model = loop_model(cell, 12, 10)
    onnx.save(model, tmp_path / "loop.onnx")
    x = np.random.default_rng(0).normal(size=(6, 3, 12)).astype(np.float32)
    r = api.compile(tmp_path / "loop.onnx", config="w2a2", calib=x, target="cpu")
    assert len(r.report["recurrent"]) == 1
    r.save(tmp_path / "art")
    deploy = onnx.load(tmp_path / "art" / "deploy.onnx")
    assert [n.op_type for n in deploy.graph.node if n.op_type in ("Recurrent", "Loop", "Scan")] == ["Recurrent"]
    sess = ort.InferenceSession(r.model.SerializeToString(), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    for seq in (1, 6):
        feeds = {name: x[:seq]}
        for out, g, w in zip(sess.get_outputs(), InferenceSession(tmp_path / "art").run(None, feeds),
                             sess.run(None, feeds)):
            if out.name.startswith("c"):
                np.testing.assert_allclose(g, w, rtol=0, atol=2e-6)
            else:
                np.testing.assert_array_equal(g, w, err_msg=out.name)
