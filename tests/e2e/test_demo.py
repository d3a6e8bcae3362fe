from qcompile import demo


def test_demo_compiles_both_quantizers_and_reports_accuracy(tmp_path):
    rows = demo.run(tmp_path / "demo", "w2a2")
    assert [r["quantizer"] for r in rows] == ["balanced", "uniform"]
    for r in rows:
        assert r["n"] == 1000 and r["float_top1"] > 0.9 and 0.5 < r["quant_top1"] <= 1.0
        assert r["compression"] > 5
        assert (tmp_path / "demo" / r["quantizer"] / "model.onnx").is_file()
