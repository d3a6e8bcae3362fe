#!/usr/bin/env bash
# README command 2: set up (Python packages, and the Debian data packages when run as root), then run the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    # dataset-fashion-mnist: the data-loader tests; libsimde-dev: the AVX-512 kernel path is checked bit-exact
    # through SIMDe's portable emulation on CPUs without AVX-512; verilator, yosys: the FPGA target's RTL is
    # simulated cycle by cycle, linted and synthesised
    missing=""
    for pkg in dataset-fashion-mnist libsimde-dev verilator yosys; do
        dpkg -s "$pkg" >/dev/null 2>&1 || missing="$missing $pkg"
    done
    if [ -n "$missing" ]; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
    fi
fi
bash scripts/setup.sh
. .venv/bin/activate
exec python -m pytest "$@"
