#!/usr/bin/env bash
# The test command: create the environment on first use (scripts/env.sh), check the layering (import-linter
# contracts in pyproject.toml) and the lint (ruff), then run the whole suite.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/env.sh"
cd "$root"
venv="${IVTLR_VENV:-$root/.venv}"
"$venv/bin/lint-imports" --config pyproject.toml
"$venv/bin/ruff" check src tests benchmarks
exec "$venv/bin/python" -m pytest -q "$@"
