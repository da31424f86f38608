#!/usr/bin/env bash
# Create (once) the project's virtual environment in .venv and install ivtlr into it.
# torch is pinned in the same pip command so pip takes the CPU wheel instead of a multi-GB CUDA build.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${IVTLR_VENV:-$root/.venv}"
stamp="$venv/.ivtlr-installed"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
if [ ! -f "$stamp" ] || [ "$root/pyproject.toml" -nt "$stamp" ]; then
  "$venv/bin/python" -m pip install --quiet --upgrade pip
  "$venv/bin/python" -m pip install --quiet "torch==${IVTLR_TORCH_VERSION:-2.13.0}" -e "$root[test]"
  touch "$stamp"
fi
