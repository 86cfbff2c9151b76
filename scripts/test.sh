#!/usr/bin/env bash
# Sets up .venv with the test extra (first run only) and runs the whole test suite.
# Tests run in TEST_WORKERS processes (default 2; each file stays in one process, so the
# compiled functions its tests share are compiled once): XLA compiles are single-threaded.
source "$(dirname "$0")/env.sh"
ensure_venv test
cd "$ROOT"
exec "$VENV/bin/python" -m pytest -n "${TEST_WORKERS:-2}" --dist loadfile "$@"
