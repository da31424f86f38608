#!/usr/bin/env bash
# Refresh requirements.lock: resolve pyproject.toml's ranges (with the test extra) to the newest versions the
# package index has today, with `uv pip compile`, for this interpreter's Python and platform. Review the diff, run
# ./scripts/test.sh, and commit the lock with the fixes it needs. `scripts/test-latest.sh` does the same into a
# scratch environment without touching the lock.
#   IVTLR_LOCK_OUT          where to write (default: requirements.lock)
#   IVTLR_TORCH_VERSION     the torch the lock is resolved against (default: 2.13.0; not listed in the lock)
#   IVTLR_TORCH_FIND_LINKS  a folder or index page holding that torch's CPU wheel (default: pip's find-links)
#   IVTLR_PYTHON            the interpreter whose version the lock is for (default: python3)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${IVTLR_LOCK_OUT:-$root/requirements.lock}"
torch_version="${IVTLR_TORCH_VERSION:-2.13.0}"
python="${IVTLR_PYTHON:-python3}"
uv_version="0.13.9"
tools="${IVTLR_LOCK_TOOLS:-${XDG_CACHE_HOME:-$HOME/.cache}/ivtlr/lock-tools-uv-$uv_version}"
find_links="${IVTLR_TORCH_FIND_LINKS:-$("$python" -m pip config get global.find-links 2>/dev/null || true)}"

if [ -z "$find_links" ]; then
  echo "scripts/lock.sh: set IVTLR_TORCH_FIND_LINKS to a folder or index page with torch $torch_version's CPU" \
       "wheel (its metadata keeps the CUDA packages out of the lock)" >&2
  exit 2
fi
if [ ! -x "$tools/bin/uv" ]; then
  "$python" -m venv "$tools"
  "$tools/bin/python" -m pip install --quiet "uv==$uv_version"
fi
python_version="$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
echo "torch==$torch_version+cpu" > "$scratch/torch.txt"
# torch is resolved against its CPU build (no CUDA packages) and left out: the scripts pin it themselves.
"$tools/bin/uv" pip compile --quiet "$root/pyproject.toml" --extra test \
  --python "$python" --python-version "$python_version" \
  --find-links "$find_links" --constraint "$scratch/torch.txt" --no-emit-package torch \
  --no-header --no-annotate --output-file "$scratch/lock.txt"
{
  echo "# The exact versions scripts/env.sh installs (beside torch==$torch_version, CPU build, which it pins itself)."
  echo "# Produced by scripts/lock.sh (uv $uv_version pip compile of pyproject.toml[test]) on $(date -u +%Y-%m-%d)."
  echo "# python: $python_version"
  cat "$scratch/lock.txt"
} > "$out.tmp"
mv "$out.tmp" "$out"
echo "scripts/lock.sh: wrote $out ($(grep -c '^[^#]*==' "$out") packages, Python $python_version)"
