#!/usr/bin/env bash
# Run the whole test suite (sets up first, so it works from a fresh clone). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=${VIRTUAL_ENV:+$VIRTUAL_ENV/bin/python}
PY=${PY:-.venv/bin/python}
HF_HUB_OFFLINE=1 "$PY" -m pytest -q "$@"
