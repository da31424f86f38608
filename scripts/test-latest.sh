#!/usr/bin/env bash
# The suite against the newest releases pyproject.toml allows (`./scripts/test.sh --latest` runs this): resolve a
# scratch lock with scripts/lock.sh, say in one line how it differs from requirements.lock, install it into a
# fresh scratch environment and run the whole test command there. requirements.lock and .venv are not touched;
# when it passes, `./scripts/lock.sh` makes the newest set the locked one. Arguments pass through to pytest.
#   IVTLR_LATEST_DIR  where the scratch lock and environment go (default: a new temporary folder, removed after)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${IVTLR_PYTHON:-python3}"
if [ -n "${IVTLR_LATEST_DIR:-}" ]; then
  scratch="$IVTLR_LATEST_DIR"
  mkdir -p "$scratch"
else
  scratch="$(mktemp -d)"
  trap 'rm -rf "$scratch"' EXIT
fi
IVTLR_LOCK_OUT="$scratch/latest.lock" bash "$root/scripts/lock.sh"
summary="$("$python" "$root/scripts/lock_diff.py" "$root/requirements.lock" "$scratch/latest.lock")"
echo "$summary"
status=0
IVTLR_VENV="$scratch/venv" IVTLR_LOCK="$scratch/latest.lock" bash "$root/scripts/test.sh" "$@" || status=$?
if [ "$status" -eq 0 ]; then verdict="passed"; else verdict="FAILED (exit $status)"; fi
echo "latest: the suite $verdict; $summary"
exit "$status"
