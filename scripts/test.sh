#!/usr/bin/env bash
# The test command: create the environment on first use (scripts/env.sh), then run the whole suite.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/env.sh"
cd "$root"
exec "${IVTLR_VENV:-$root/.venv}/bin/python" -m pytest -q "$@"
