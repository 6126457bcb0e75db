#!/usr/bin/env bash
# The test command: the CPU suite, then the Triton kernels on the CPU interpreter (a separate
# process, since TRITON_INTERPRET must be set before triton is imported).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pytest tests -q "$@"
TRITON_INTERPRET=1 python -m pytest tests -q -m triton "$@"
