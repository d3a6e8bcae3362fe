"""Quantization-aware fine-tuning: exactness against the fake-quant ONNX, STE gradients, resume, export, compile."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import qcompile
from qcompile import datasets
from qcompile.errors import QcompileError
from qcompile.finetune.api import build_student, export
from qcompile.finetune.qat import QuantLayer, quant_layers
from qcompile.passes.quantize import core_name

CNN = datasets.bundled_model("cnn")
MLP = datasets.bundled_model("mlp")
QUANTIZERS = ["balanced", "balanced-mean", "dorefa", "rnn-balanced", "uniform", "uniform-percentile", "xnor"]


@pytest.fixture(scope="module")
def sample():
    x, y = datasets.load_sample()
    return x, y


def _intermediates(model: onnx.ModelProto, layers, x: np.ndarray) -> dict:
    """Per quantized layer, from onnxruntime: its float input (before Clip), codes, accumulator and output."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    by_name = {n.name: n for n in m.graph.node}
    producers = {o: n for n in m.graph.node for o in n.output}
    want = {}
    for name in layers:
        core = by_name[core_name(name)]
        dq = producers[core.input[0]]
        ql = producers[dq.input[0]]
        if ql.op_type == "Pad":  # a signed padded conv pads its codes with the zero point
            ql = producers[ql.input[0]]
        clip = producers[ql.input[0]]
        mul = next(n for n in m.graph.node if core.output[0] in n.input)
        add = next(n for n in m.graph.node if mul.output[0] in n.input)
        want[name] = {"x": clip.input[0], "codes": ql.output[0], "acc": core.output[0], "y": add.output[0]}
    outs = sorted({v for w in want.values() for v in w.values()})
    existing = {o.name for o in m.graph.output}
    for o in outs:
        if o not in existing:
            m.graph.output.append(onnx.ValueInfoProto(name=o))
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {sess.get_inputs()[0].name: x})))
    return {name: {k: got[v] for k, v in w.items()} for name, w in want.items()}


def _assert_layers_exact(student, model, x):
    """Each QuantLayer, fed onnxruntime's own input to that layer, reproduces its codes, accumulator and output."""
    layers = quant_layers(student)
    ref = _intermediates(model, layers, x)
    student.eval()
    with torch.no_grad():
        for name, layer in layers.items():
            r = ref[name]
            xin = torch.from_numpy(r["x"])
            np.testing.assert_array_equal(layer.codes(xin).numpy(), r["codes"].astype(np.float32), err_msg=name)
            np.testing.assert_array_equal(layer.accumulator(xin).numpy(), r["acc"], err_msg=name)
            np.testing.assert_array_equal(layer(xin).numpy(), r["y"], err_msg=name)


def _perturb(student, seed=0):
    """Stand-in for training: move every latent weight, bias and clip a little."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in quant_layers(student).values():
            w = layer.weight
            w.add_(torch.randn(w.shape, generator=g) * w.std() * 0.3)
            layer.bias.add_(torch.randn(layer.bias.shape, generator=g) * 0.05)
            layer.clip.mul_(1.1)


@pytest.mark.parametrize("quantizer", QUANTIZERS)
def test_torch_forward_and_export_equal_the_fake_quant_onnx_exactly(quantizer, sample):
    x = sample[0][:32]
    config = "w1a2" if quantizer == "xnor" else "w2a2"
    ptq = qcompile.compile(CNN, config=config, quantizer=quantizer, calib=datasets.load_calib())
    student = build_student(ptq.float_model, ptq, ptq.config, learn_clip=True, gbits=None)
    _assert_layers_exact(student, ptq.model, x)           # step 0 is the post-training model
    _perturb(student)
    compiled, _ = export(ptq.float_model, student, ptq.config, str(CNN), "sha")
    _assert_layers_exact(student, compiled.model, x)      # the trained state, exported by the numpy quantizers
    for name, layer in quant_layers(student).items():
        q = compiled.ctx.layers[name]
        assert q.clip == float(layer.clip.detach())
        assert q.clip_source == "fine-tuned"


def _gemm_layer(bits_w=2, bits_a=2, clip=1.0, gbits=None):
    from qcompile.finetune.convert import WeightedLayer

    class Lin(WeightedLayer):
        def __init__(self, w):
            super().__init__()
            self.onnx_name, self.op_type = "fc", "Gemm"
            self.weight = torch.nn.Parameter(w)
            self.bias = None

        def functional(self, x, weight, bias):
            y = x @ weight.t()
            return y if bias is None else y + bias

    w = torch.tensor([[0.5, -0.25, 0.75], [-0.5, 0.25, 1.0]])
    return QuantLayer(Lin(w), name="fc", bits_w=bits_w, bits_a=bits_a, quantizer="dorefa", weight_axis=0,
                      per_channel=True, clip=clip, bias=np.zeros(2, np.float32), learn_clip=True, gbits=gbits)


def test_straight_through_gradients_by_hand():
    layer = _gemm_layer()
    x = torch.tensor([[0.2, 1.5, -0.3]], requires_grad=True)   # inside, above and below the clip [0, 1]
    y = layer(x)
    g = torch.tensor([[1.0, -2.0]])
    y.backward(g)
    s = float(layer.act_step().detach())
    p = torch.round(torch.clamp(x.detach(), 0, 1) / s)
    w_int, tq = layer.quantized_weight()
    wq = tq.values.detach()                                    # the dequantized weights
    # d y / d x: the quantized weights inside the clip range, zero where clipped (PACT/DoReFa STE)
    expect_dx = (g @ wq) * torch.tensor([[1.0, 0.0, 0.0]])
    np.testing.assert_allclose(x.grad.numpy(), expect_dx.numpy(), rtol=1e-6, atol=1e-7)
    # d y / d W through DoReFa's tanh twin: g^T (p s) times d wq / d W
    w = layer.weight.detach().clone().requires_grad_(True)
    wq_t = layer._twin(w, 2, axis=0, name="fc").values
    (wq_t * (g.t() @ (p * s))).sum().backward()
    np.testing.assert_allclose(layer.weight.grad.numpy(), w.grad.numpy(), rtol=1e-5, atol=1e-7)
    # d y / d clip: PACT's term, 1 for the input above the clip, plus the rounding residual (LSQ)
    assert layer.clip.grad is not None and torch.isfinite(layer.clip.grad)


def test_gradient_quantization_in_the_layer_is_exact_on_grid_values():
    """With gbits, the gradient entering the layer is DoReFa-quantized; a gradient on the grid passes unchanged."""
    plain, quant = _gemm_layer(), _gemm_layer(gbits=2)
    quant.grad_generator = torch.Generator().manual_seed(0)
    x = torch.tensor([[0.2, 0.5, 0.9]])
    g = torch.tensor([[3.0, -3.0]])   # max|g| = 3: +-s map to codes 3 and 0 of 2 bits exactly, noise < 1/2 LSB
    for layer in (plain, quant):
        layer(x).backward(g)
    np.testing.assert_array_equal(plain.weight.grad.numpy(), quant.weight.grad.numpy())
    g2 = torch.tensor([[3.0, 1.1]])   # 1.1 is off the grid {-3, -1, 1, 3}: quantized to 1 or 3
    quant.weight.grad = None
    quant(x).backward(g2)
    dy = quant.weight.grad.numpy()[1] / plain.weight.grad.numpy()[1] * -3.0
    assert np.allclose(dy, 1.0) or np.allclose(dy, 3.0)


def _small_data(n=256, seed=0):
    x, y = datasets.load_sample()
    return x[:n], y[:n]


def test_resume_continues_exactly(tmp_path):
    x, y = _small_data(320)
    kw = dict(config="w2a2", data=(x[:256], y[:256]), val=(x[256:], y[256:]), steps=30, batch=32, lr=1e-3, seed=3,
              log=lambda s: None)   # 30 steps: 4 epochs of 8, and one mid-epoch validation point (step 25)
    full = qcompile.finetune(MLP, out=tmp_path / "a", **kw)
    with pytest.raises(QcompileError, match="interrupted at step 5 .*--resume"):
        qcompile.finetune(MLP, out=tmp_path / "b", _stop_after_steps=5, **kw)
    assert (tmp_path / "b" / "checkpoint.pt").is_file()
    with pytest.raises(QcompileError, match="pass --resume"):
        qcompile.finetune(MLP, out=tmp_path / "b", **kw)
    resumed = qcompile.finetune(MLP, out=tmp_path / "b", resume=True, **kw)
    assert resumed.report["history"]["step_loss"] == full.report["history"]["step_loss"]
    assert resumed.report["history"]["val_points"] == full.report["history"]["val_points"]
    assert [25, full.report["history"]["val_points"][-2][1]] in full.report["history"]["val_points"]
    a = {t.name: onnx.numpy_helper.to_array(t) for t in full.model.graph.initializer}
    b = {t.name: onnx.numpy_helper.to_array(t) for t in resumed.model.graph.initializer}
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    with pytest.raises(QcompileError, match="quantizer='balanced'.*quantizer='uniform'"):
        qcompile.finetune(MLP, out=tmp_path / "b", resume=True, quantizer="uniform", **kw)


def test_without_labels_it_distills_and_saves_everything(tmp_path):
    x, _ = _small_data(256)
    result = qcompile.finetune(MLP, config="w2a2", data=x, steps=4, batch=32, log=lambda s: None)
    assert result.options.distill
    assert result.report["float_val_acc"] is None
    out = result.save(tmp_path / "ft")
    for f in ("model.onnx", "float.onnx", "checkpoint.pt", "report.json", "report.md", "curves.png"):
        assert (out / f).is_file(), f
    assert result.report["export_check"]["max_abs_diff"] < 1e-4


def test_bad_input_is_one_line_and_leaves_no_folder(tmp_path):
    x, y = _small_data(128)
    cases = [
        (dict(data=(x, y + 10)), "out of range"),
        (dict(data=(x, y[:-3])), "labels"),
        (dict(data=(x[:, :, :20], y)), "shape"),
        (dict(data=(x[:0], y[:0])), "empty"),
        (dict(data=(x, y), steps=2, epochs=2), "not both"),
        (dict(data=(x, y), resume=True), "no checkpoint"),
    ]
    for i, (kw, match) in enumerate(cases):
        out = tmp_path / f"o{i}"
        with pytest.raises(QcompileError, match=match) as info:
            qcompile.finetune(MLP, config="w2a2", out=out, log=lambda s: None, **{"steps": 2, **kw})
        assert "\n" not in str(info.value)
        assert not out.exists(), kw


def test_compiling_a_fine_tuned_model_keeps_its_parameters_and_is_bit_exact(tmp_path, sample):
    x, y = _small_data(320)
    ft = qcompile.finetune(MLP, config="w1a2", data=(x[:256], y[:256]), val=(x[256:], y[256:]), steps=6, batch=32,
                           learn_clip=True, log=lambda s: None)
    ft.save(tmp_path / "ft")
    art = qcompile.compile(tmp_path / "ft" / "model.onnx", target="cpu")
    for name, q in ft.compiled.ctx.layers.items():
        got = art.ctx.layers[name]
        np.testing.assert_array_equal(got.qweight.codes, q.qweight.codes)
        np.testing.assert_array_equal(got.mult, q.mult)
        np.testing.assert_array_equal(got.bias, q.bias)
        assert got.clip == pytest.approx(q.clip, rel=1e-7)
    art.save(tmp_path / "art")
    from qcompile.runtime import InferenceSession

    xs = sample[0][:100]
    deployed = InferenceSession(tmp_path / "art").run(None, {"input": xs})[0]
    fake = ort.InferenceSession(str(tmp_path / "ft" / "model.onnx")).run(None, {"input": xs})[0]
    np.testing.assert_array_equal(deployed, fake)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    from qcompile.finetune import loop

    x, y = _small_data(160)
    real, calls = loop.label_loss, {"n": 0}

    def poisoned(out, yb, probabilities):
        calls["n"] += 1
        loss = real(out, yb, probabilities)
        return loss * float("nan") if calls["n"] >= 6 else loss

    monkeypatch.setattr(loop, "label_loss", poisoned)
    with pytest.raises(QcompileError, match=r"step 6 \(epoch 2\): the loss is nan") as info:
        qcompile.finetune(MLP, config="w2a2", data=(x[:128], y[:128]), val=(x[128:], y[128:]), epochs=3, batch=32,
                          out=tmp_path / "ft", log=lambda s: None)
    assert "\n" not in str(info.value)
    saved = torch.load(tmp_path / "ft" / "checkpoint.pt", weights_only=False)
    assert saved["state"]["step"] == 4 and saved["state"]["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in saved["state"]["student"].values() if v.is_floating_point())


def test_cli_finetune_writes_the_folder_and_fails_in_one_line(tmp_path):
    from click.testing import CliRunner

    from qcompile.cli import main

    x, y = _small_data(200)
    np.savez(tmp_path / "d.npz", x=(x * 255).astype(np.uint8), y=y)
    np.savez(tmp_path / "bad.npz", x=(x * 255).astype(np.uint8), y=y + 20)
    runner = CliRunner()
    bad = runner.invoke(main, ["finetune", str(MLP), "--data", str(tmp_path / "bad.npz"), "--steps", "2",
                               "-o", str(tmp_path / "bad")])
    assert bad.exit_code == 1 and "out of range" in bad.output and bad.output.count("\n") == 1
    assert not (tmp_path / "bad").exists()
    ok = runner.invoke(main, ["finetune", str(MLP), "--config", "w2a2", "--data", str(tmp_path / "d.npz"),
                              "--steps", "3", "--batch", "32", "--gbits", "8", "-o", str(tmp_path / "ft")])
    assert ok.exit_code == 0, ok.output
    assert "fine-tuned" in ok.output and "epoch 1/1" in ok.output
    report = json.loads((tmp_path / "ft" / "report.json").read_text())
    assert report["options"]["gbits"] == 8 and report["steps"] == 3


def test_an_op_the_trainer_cannot_convert_is_named(tmp_path):
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(0, 0.3, s).astype(np.float32), n)
             for n, s in (("w1", (16, 32)), ("w2", (32, 32)), ("w3", (32, 4)))]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h1"], name="fc1"),
             helper.make_node("Relu", ["h1"], ["r1"], name="relu1"),
             helper.make_node("MatMul", ["r1", "w2"], ["h2"], name="fc2"),
             helper.make_node("Softsign", ["h2"], ["s2"], name="odd_activation"),
             helper.make_node("MatMul", ["s2", "w3"], ["y"], name="fc3")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], inits)
    path = tmp_path / "softsign.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    x = rng.random((64, 16), dtype=np.float32)
    y = rng.integers(0, 4, 64)
    with pytest.raises(QcompileError, match="odd_activation.*Softsign") as info:
        qcompile.finetune(path, config="w2a2", data=(x, y), steps=2, batch=16, out=tmp_path / "o", log=lambda s: None)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("quantizer,net", [("balanced", "mlp"), ("dorefa", "mlp"), ("uniform", "conv")])
def test_signed_inputs_train_and_export_exactly(tmp_path, quantizer, net):
    """Layers with signed inputs (codes with a zero point, the zero-point term folded into the bias; a padded conv
    pads its codes with the zero point)."""
    from graphs import signed_convnet, signed_mlp

    model = (signed_mlp if net == "mlp" else signed_convnet)(tmp_path / "signed.onnx")
    shape = (16,) if net == "mlp" else (3, 10, 10)
    x = np.random.default_rng(0).normal(0, 1, (64, *shape)).astype(np.float32)
    ptq = qcompile.compile(model, config="w4a4", quantizer=quantizer, calib=x)
    assert all(q.act_zero > 0 for q in ptq.ctx.layers.values())
    student = build_student(ptq.float_model, ptq, ptq.config, learn_clip=True, gbits=None)
    _perturb(student)
    compiled, _ = export(ptq.float_model, student, ptq.config, str(model), "sha")
    assert {n: q.act_zero for n, q in compiled.ctx.layers.items()} == {n: q.act_zero for n, q in ptq.ctx.layers.items()}
    _assert_layers_exact(student, compiled.model, x[:16])
