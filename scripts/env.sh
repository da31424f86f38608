#!/usr/bin/env bash
# Create (once) the project's virtual environment in .venv and install ivtlr into it with the exact versions of
# requirements.lock (refreshed by scripts/lock.sh), so the README's two commands give the same result on any day.
# torch is pinned in the same pip command so pip takes the CPU wheel instead of a multi-GB CUDA build; the lock
# does not list torch itself, only what it needs.
#   IVTLR_VENV           where the environment lives (default: .venv)
#   IVTLR_PYTHON         the interpreter that creates it (default: python3)
#   IVTLR_TORCH_VERSION  the torch to install (default: 2.13.0)
#   IVTLR_LOCK           the lock to install (default: requirements.lock; "none": pyproject.toml's ranges, unlocked)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${IVTLR_VENV:-$root/.venv}"
lock="${IVTLR_LOCK:-$root/requirements.lock}"
stamp="$venv/.ivtlr-installed"
python="${IVTLR_PYTHON:-python3}"

if [ "$lock" != none ]; then
  [ -f "$lock" ] || { echo "scripts/env.sh: no lock at $lock (run scripts/lock.sh, or set IVTLR_LOCK=none)" >&2; exit 2; }
  locked_python="$(sed -n 's/^# python: //p' "$lock")"
  have_python="$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
  if [ "$locked_python" != "$have_python" ]; then
    echo "scripts/env.sh: $lock is for Python $locked_python but $python is $have_python;" \
         "set IVTLR_PYTHON=python$locked_python, or IVTLR_LOCK=none to install pyproject.toml's ranges unlocked" >&2
    exit 2
  fi
fi
if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
fi
harness="$root/integrations/lmms_eval/requirements.txt"
if [ ! -f "$stamp" ] || [ "$root/pyproject.toml" -nt "$stamp" ] || { [ "$lock" != none ] && [ "$lock" -nt "$stamp" ]; } \
   || [ "$harness" -nt "$stamp" ] || [ "$(cat "$stamp")" != "$lock" ]; then
  "$venv/bin/python" -m pip install --quiet --upgrade "pip>=24"
  locked=()
  [ "$lock" = none ] || locked=(-r "$lock")
  "$venv/bin/python" -m pip install --quiet "${locked[@]}" "torch==${IVTLR_TORCH_VERSION:-2.13.0}" -e "$root[test]"
  # lmms-eval, for the harness test: its own pins, without the dependencies it declares (see that file for why).
  "$venv/bin/python" -m pip install --quiet --no-deps -r "$harness"
  echo "$lock" > "$stamp"
fi
