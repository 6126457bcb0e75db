#!/usr/bin/env bash
# The documentation site (docs/): build it strictly into docs/site, or serve it with live reload.
#
#   pip install -e '.[docs]'
#   bash scripts/docs.sh                 # strict build: a broken reference or a failing tutorial fails
#   bash scripts/docs.sh serve           # http://127.0.0.1:8000, tutorials cached between reloads
#   FASTFLOW_DOCS_QUICK=1 bash scripts/docs.sh   # tutorials with tiny settings (what CI runs)
set -euo pipefail
cd "$(dirname "$0")/.."
export NO_MKDOCS_2_WARNING=1
if [ "${1:-build}" = serve ]; then
  shift
  FASTFLOW_DOCS_CACHE=${FASTFLOW_DOCS_CACHE:-1} exec python -m mkdocs serve -f docs/mkdocs.yml "$@"
fi
[ "${1:-}" = build ] && shift
exec python -m mkdocs build --strict --clean -f docs/mkdocs.yml "$@"
