#!/usr/bin/env bash
# README command 1: set up, then the whole job on the bundled Fashion-MNIST CNN: post-training quantization, a short
# quantization-aware fine-tune, the CPU artifact, its accuracy against float and its speed against onnxruntime.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null && ! dpkg -s dataset-fashion-mnist >/dev/null 2>&1; then
    # the fine-tune trains on Fashion-MNIST's 60,000 training images (without it: the bundled images, distilled)
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null || true
fi
bash scripts/setup.sh
. .venv/bin/activate
exec qcompile demo "$@"
