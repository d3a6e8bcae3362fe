#!/usr/bin/env bash
# Separate environment for the Larq Compute Engine peer benchmark (bench/lce/bench_lce.py).
#
#     bash bench/lce/setup.sh
#
# LCE needs TensorFlow 2.16 + tf-keras (Keras 2); they stay out of qcompile's own .venv (and out of CI), in
# bench/lce/.venv. Idempotent: an environment that already has the pinned versions is left as it is.
# Python 3.11: $PYTHON if set, else the base interpreter of the main .venv, else python3.11 on PATH, else uv's.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
VENV="$HERE/.venv"

# Pinned: the versions that resolve together (LCE 0.16.0 is built against TensorFlow 2.16).
PINS=(
  "tensorflow-cpu==2.16.2"
  "tf-keras==2.16.0"
  "larq==0.14.0"
  "larq-compute-engine==0.16.0"
)

fail() { echo "bench/lce/setup.sh: cannot set up the LCE environment: $*" >&2; exit 1; }

check() {  # the venv exists and holds exactly the pinned versions
  [ -x "$VENV/bin/python" ] || return 1
  "$VENV/bin/python" - "${PINS[@]}" <<'EOF' >/dev/null 2>&1
import sys
from importlib.metadata import version
for pin in sys.argv[1:]:
    name, want = pin.split("==")
    if version(name) != want:
        sys.exit(1)
EOF
}

if check; then
  echo "bench/lce/.venv is ready ($(IFS=' '; echo "${PINS[*]}"))"
  exit 0
fi

find_python() {
  if [ -n "${PYTHON:-}" ]; then echo "$PYTHON"; return; fi
  local cfg="$ROOT/.venv/pyvenv.cfg"
  if [ -f "$cfg" ]; then
    local home; home="$(sed -n 's/^home *= *//p' "$cfg")"
    if [ -x "$home/python3.11" ]; then echo "$home/python3.11"; return; fi
  fi
  if command -v python3.11 >/dev/null 2>&1; then command -v python3.11; return; fi
  if command -v uv >/dev/null 2>&1; then uv python find 3.11 2>/dev/null && return; fi
  return 1
}

PY="$(find_python)" || fail "no Python 3.11 found (set PYTHON=/path/to/python3.11)"
"$PY" -c 'import sys; assert sys.version_info[:2] == (3, 11)' 2>/dev/null \
  || fail "$PY is not Python 3.11 (TensorFlow 2.16 / LCE 0.16 wheels need 3.9-3.11; set PYTHON=...)"

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV" || fail "python -m venv $VENV failed"
fi
"$VENV/bin/python" -m pip install --quiet --upgrade pip >/dev/null 2>&1 || true
if ! "$VENV/bin/python" -m pip install --quiet "${PINS[@]}" 2> "$VENV/pip-error.log"; then
  fail "pip install ${PINS[*]} failed (see $VENV/pip-error.log)"
fi
check || fail "installed, but the versions differ from the pins (${PINS[*]})"
echo "bench/lce/.venv is ready ($(IFS=' '; echo "${PINS[*]}"))"
