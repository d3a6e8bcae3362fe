"""bench/gpu.sh's Python side without a GPU: arguments, the case list and the results table."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]


def _bench():
    spec = importlib.util.spec_from_file_location("gpu_bench", REPO / "bench" / "gpu_bench.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_cases_cover_the_issue():
    b = _bench()
    cases = b.gemm_cases(quick=False)
    gemm = {(c["bits"], c["M"], c["N"], c["K"]) for c in cases if c["kind"] == "gemm"}
    for bits in ("W1A1", "W1A2", "W2A2"):
        assert (bits, 8192, 8192, 8192) in gemm
        assert {(bits, m, 4096, 4096) for m in (1, 2, 4, 8, 16, 32, 64)} <= gemm
    assert any(c["kind"] == "conv" for c in cases)
    assert b.parse_args(["--quick", "--out", "x"]).quick and b.parse_args([]).min_ms == 30.0


def test_table_with_numbers(tmp_path):
    b = _bench()
    results = {"device": "NVIDIA H200 (sm_90)", "when": "now", "note": "test",
               "check": {"passed": 99, "total": 100, "failed": ["mma:x:b1"]},
               "peak": {"b1_mma_tmacs": 5000.0, "popc_tmacs": 100.0},
               "cases": [{"kind": "gemm", "bits": "W2A2", "M": 8192, "N": 8192, "K": 8192, "gemm_ms": 1.0,
                          "pack_gemm_ms": 1.5, "fp16_ms": 2.0, "int8_ms": None}],
               "errors": ["cublasGemmEx int8 failed"]}
    md = b.write_table(results, tmp_path).read_text()
    row = next(line for line in md.splitlines() if line.startswith("| gemm W2A2"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[4:9] == ["1.0", "1.5", "549.8", "2,199.0", "44.0%"]   # 8192^3 / 1 ms; x4 planes; of 5000
    assert cells[-2:] == ["2.0", "-"] and "99/100" in md and "FAILED: mma:x:b1" in md
    assert (tmp_path / "gpu_results.json").is_file()


def test_dry_run_writes_the_table_without_a_gpu(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_bench.py"), "--dry-run", "--out",
                           str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    md = (tmp_path / "gpu_results.md").read_text()
    assert "not measured" in md and md.count("| gemm W1A1") == 8 and md.count("| conv") == 2
