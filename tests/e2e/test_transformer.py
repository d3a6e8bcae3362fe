"""A transformer encoder block exported from torch: its projections and MLP (3-D MatMuls with signed inputs after
LayerNorm) become BitGemms; attention's activation-by-activation MatMuls, LayerNorm, Softmax and GELU stay float."""

import numpy as np
import pytest

from qcompile import api
from qcompile.evaluate import predict
from qcompile.runtime import InferenceSession

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def block(tmp_path_factory):
    import warnings

    torch.manual_seed(0)

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Linear(16, 32)
            self.enc = torch.nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True, activation="gelu")
            self.head = torch.nn.Linear(32, 5)

        def forward(self, x):
            return self.head(self.enc(self.emb(x)).mean(1))

    path = tmp_path_factory.mktemp("tr") / "block.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Block().eval(), (torch.randn(2, 6, 16),), str(path), input_names=["x"],
                          output_names=["y"], opset_version=17, dynamo=False,
                          dynamic_axes={"x": {0: "N"}, "y": {0: "N"}})
    return path


def test_transformer_block_runs_its_projections_on_bit_kernels(block, tmp_path):
    x = np.random.default_rng(0).normal(0, 1, (96, 6, 16)).astype(np.float32)
    result = api.compile(block, config="w4a4", calib=x[:64], target="cpu", kernel="bitserial")
    plan = {p["node"]: p for p in result.manifest["plan"]}
    for name in ("/enc/linear1/MatMul", "/enc/linear2/MatMul"):
        assert plan[name]["kernel"].startswith(("bitserial", "lut")), plan[name]
    assert any(step.get("rows") == [6] for step in result.manifest["schedule"])   # [batch, seq, K] BitGemms
    assert result.ctx.layers["/enc/linear1/MatMul"].act_zero > 0                  # LayerNorm output is signed
    assert "not a constant weight" in plan["/enc/self_attn/MatMul_1"]["why"]     # Q.K^T stays float
    result.save(tmp_path / "art")
    # the integer layers are exact; onnxruntime fuses the float parts (attention, LayerNorm) differently once the
    # graph is cut into partitions, which can move the last float bit
    deployed = InferenceSession(tmp_path / "art").run(None, {"x": x[64:]})[0]
    np.testing.assert_allclose(deployed, predict(result.model, x[64:]), rtol=1e-5, atol=1e-5)


def test_transformer_block_w8a8_agrees_with_float(block):
    x = np.random.default_rng(1).normal(0, 1, (128, 6, 16)).astype(np.float32)
    result = api.compile(block, config="w8a8", calib=x[:64])
    pf, pq = predict(result.float_model, x[64:]), predict(result.model, x[64:])
    assert float((pf * pq).sum() / np.linalg.norm(pf) / np.linalg.norm(pq)) >= 0.999


def test_transformer_block_fine_tunes_and_compiles(block, tmp_path):
    """Fine-tuning goes through LayerNorm and attention (unlabeled data: distillation); the result compiles."""
    import qcompile

    x = np.random.default_rng(2).normal(0, 1, (256, 6, 16)).astype(np.float32)
    tuned = qcompile.finetune(block, config="w4a4", data=x, steps=8, batch=32, log=lambda s: None)
    assert tuned.options.distill and len(tuned.compiled.ctx.layers) >= 3
    tuned.save(tmp_path / "ft")
    art = api.compile(tmp_path / "ft" / "model.onnx", target="cpu")
    art.save(tmp_path / "art")
    deployed = InferenceSession(tmp_path / "art").run(None, {"x": x[:16]})[0]
    np.testing.assert_allclose(deployed, predict(tuned.model, x[:16]), rtol=1e-5, atol=1e-5)
