#!/usr/bin/env bash
# Creates .venv with Python >= 3.12 and installs awm-jax into it (editable).
#   ./setup.sh        runtime only:            then .venv/bin/awm-jax demo
#   ./setup.sh dev    runtime + test tools:    then .venv/bin/python -m pytest -q -m "not slow" -n 2
#   ./setup.sh dev,tfds,torch   also TensorFlow (TFDS builders) and PyTorch (state_dict import),
#                     so that their tests run instead of skipping; this is what CI installs.
# Set PYTHON=/path/to/python3.12 to choose the interpreter.
set -euo pipefail
cd "$(dirname "$0")"

usable() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 12))' >/dev/null 2>&1; }

find_python() {
  if [ -n "${PYTHON:-}" ]; then usable "$PYTHON" && { echo "$PYTHON"; return; }; fi
  for candidate in python3.14 python3.13 python3.12 python3 python; do
    if command -v "$candidate" >/dev/null && usable "$candidate"; then echo "$candidate"; return; fi
  done
  # pyenv installs versions that its shims hide unless selected.
  for candidate in "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.1[2-9]*/bin/python3; do
    if [ -x "$candidate" ] && usable "$candidate"; then echo "$candidate"; return; fi
  done
  echo "awm-jax needs Python >= 3.12 (jax >= 0.12); none found. Set PYTHON=..." >&2
  exit 1
}

if [ ! -x .venv/bin/python ] || ! usable .venv/bin/python; then
  rm -rf .venv
  "$(find_python)" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
extras="${1:-}"
if [ -n "$extras" ] && ! [[ "$extras" =~ ^[a-z]+(,[a-z]+)*$ ]]; then
  echo "usage: ./setup.sh [EXTRA[,EXTRA...]] with extras from: dev, tfds, torch" >&2
  exit 2
fi
if [ -n "$extras" ]; then
  .venv/bin/python -m pip install --quiet -e ".[$extras]"
else
  .venv/bin/python -m pip install --quiet -e .
fi
echo "awm-jax installed in $(pwd)/.venv ($(.venv/bin/python --version))"
