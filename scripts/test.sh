#!/usr/bin/env bash
# Sets up .venv with the test extra (first run only) and runs the whole test suite.
source "$(dirname "$0")/env.sh"
ensure_venv test
cd "$ROOT"
exec "$VENV/bin/python" -m pytest "$@"
