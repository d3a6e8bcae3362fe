#!/usr/bin/env bash
# One-shot GPU run for issue 15 (a few minutes on an H100/H200): set up the venv if needed, then
# bench/gpu_bench.py: the GPU target's bit-exact cases on the device (both kernel paths) and compiled artifacts
# against the fake-quant model, the b1 MMA peak (register-only loop), W1A1/W1A2/W2A2 GEMMs (8192^3 and
# M = 1..64 at K = N = 4096) and a 3x3 conv against cuBLAS fp16 and int8 (ctypes, no torch needed).
# Writes gpu_results.md and gpu_results.json to $OUT (or bench/). Extra arguments go to gpu_bench.py
# (--quick, --skip-check, --min-ms MS); --dry-run runs without a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -f .venv/.qcompile-installed ]; then
    bash scripts/setup.sh || {
        echo "gpu.sh: scripts/setup.sh failed; installing qcompile with its core dependencies only" >&2
        [ -x .venv/bin/python ] || python3 -m venv .venv
        .venv/bin/python -m pip install -q -e . || true
    }
fi
. .venv/bin/activate
command -v nvcc >/dev/null || export PATH="/usr/local/cuda/bin:$PATH"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,memory.total \
    --format=csv || true
nvcc --version | tail -1 || echo "gpu.sh: nvcc not found (install the CUDA toolkit)" >&2
exec timeout 280 python bench/gpu_bench.py --out "${OUT:-bench}" "$@"
