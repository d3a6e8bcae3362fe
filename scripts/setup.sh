#!/usr/bin/env bash
# One-time set-up on a fresh machine: a virtualenv in .venv with qcompile (editable) and its test dependencies.
# Idempotent: re-running only installs what changed. Used by scripts/demo.sh and scripts/test.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
. .venv/bin/activate
stamp=.venv/.qcompile-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    python -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
    # torch is pinned to the local CPU wheel (see pyproject.toml); an unpinned torch pulls a multi-GB CUDA build
    python -m pip install -q -e ".[dev]" 2>&1 | grep -v "^WARNING: Location" || true
    # the FPGA target's C simulation compiles against Xilinx's open-source ap_types headers, which the hls4ml wheel
    # ships: its headers only, not its dependencies (h5py, pydigitalwavetools, ...)
    python -m pip install -q --no-deps "hls4ml==1.3.0" 2>&1 | grep -v "^WARNING: Location" || true
    python -c "import qcompile, onnxruntime, torch" && touch "$stamp"
fi
