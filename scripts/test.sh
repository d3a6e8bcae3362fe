#!/usr/bin/env bash
# README command 2: set up (Python packages, and the Debian data packages when run as root), then run the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    if ! dpkg -s dataset-fashion-mnist >/dev/null 2>&1; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null
    fi
fi
bash scripts/setup.sh
. .venv/bin/activate
exec python -m pytest "$@"
