#!/usr/bin/env bash
# Wheels the device machine lacks (it has no network): nflows and zuko, the suite's peers.
# Downloads them into .whl/ (gitignored) for the device's Python 3.12 / x86-64, without their
# dependencies (the device image has torch, numpy, matplotlib, tensorboard and tqdm). nflows
# publishes no wheel on some indexes: then one is built here from its source (pure Python).
#
#   bash scripts/gpu_wheels.sh            # then carry .whl in the device run (README: GPU suite)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
mkdir -p .whl
grep -qxF '/.whl/' .gitignore 2>/dev/null || echo '/.whl/' >> .git/info/exclude
for spec in "nflows==0.14" "zuko==1.6.0"; do
  name=${spec%%==*}
  if ls .whl/"${name}"-*.whl >/dev/null 2>&1; then
    echo "have $(ls .whl/${name}-*.whl)"
    continue
  fi
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform any -d .whl "$spec" \
    || "$PY" -m pip wheel -q --no-deps --no-build-isolation -w .whl "$spec"
done
ls -la .whl
