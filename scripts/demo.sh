#!/usr/bin/env bash
# README command 1: set up, then compile the bundled Fashion-MNIST CNN at w2a2 (balanced vs uniform) and compare.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
exec qcompile demo "$@"
