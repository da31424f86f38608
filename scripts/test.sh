#!/usr/bin/env bash
# The test command: create the environment on first use (scripts/env.sh, the versions of requirements.lock), check
# the layering (import-linter contracts in pyproject.toml) and the lint (ruff), then run the whole suite.
# `./scripts/test.sh --latest` runs it instead against the newest releases pyproject.toml allows
# (scripts/test-latest.sh). Other arguments pass through to pytest.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ "${1:-}" = "--latest" ]; then
  shift
  exec bash "$root/scripts/test-latest.sh" "$@"
fi
bash "$root/scripts/env.sh"
cd "$root"
venv="${IVTLR_VENV:-$root/.venv}"
"$venv/bin/lint-imports"
"$venv/bin/ruff" check src tests benchmarks scripts
exec "$venv/bin/python" -m pytest -q "$@"
