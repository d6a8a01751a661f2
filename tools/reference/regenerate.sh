#!/usr/bin/env bash
# Regenerates every committed reference fixture under tests/fixtures/.
# Usage: tools/reference/regenerate.sh [VENV]   (default VENV: ~/venvs/relprop-ref, created if missing;
# PyPI's torch is ~3 GB, keep the venv outside the repository).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
venv=${1:-$HOME/venvs/relprop-ref}
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q -r "$here/requirements.txt"
fi
"$venv/bin/python" "$here/make_fixtures.py"
