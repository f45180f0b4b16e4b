#!/usr/bin/env bash
# Runs the whole test suite in the project's venv, under a virtual X server when there
# is no display (napari's GUI tests need one; QT_QPA_PLATFORM=offscreen lacks OpenGL).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
if [ -z "${DISPLAY:-}" ] && command -v xvfb-run >/dev/null; then
  exec xvfb-run -a "$PY" -m pytest "$@"
fi
exec "$PY" -m pytest "$@"
