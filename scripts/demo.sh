#!/usr/bin/env bash
# The main job: create the environment on first use (scripts/env.sh), then run `ivtlr demo` (arguments pass through).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/env.sh"
cd "$root"
exec "${IVTLR_VENV:-$root/.venv}/bin/ivtlr" demo "$@"
