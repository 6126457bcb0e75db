#!/usr/bin/env bash
# Create (or update) a virtualenv with fastflow and its test extra. Usage: bash scripts/setup.sh [VENV]
# torch is pinned to the CPU build first: a bare "torch" requirement would pull a multi-GB CUDA
# build. On a GPU machine, install the torch build you want before running this script.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-${VENV:-.venv}}
PY=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  "$VENV/bin/python" -m pip install -q torch==2.13.0
fi
"$VENV/bin/python" -m pip install -q -e ".[test]"
echo "fastflow installed in $VENV"
