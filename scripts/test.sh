#!/usr/bin/env bash
# Sets up .venv with the test extra (first run only) and runs the whole test suite.
# Tests run in TEST_WORKERS processes (default 2; each file stays in one process, so the
# compiled functions its tests share are compiled once; the slowest files start first, as
# tests/conftest.py orders them): XLA compiles are single-threaded.
# With the test extra installed nothing may skip: a skip (a broken reference install) fails the
# run. The 25 slowest tests are listed at the end, so slow files stay visible.
source "$(dirname "$0")/env.sh"
ensure_venv test
cd "$ROOT"
exec "$VENV/bin/python" -m pytest -n "${TEST_WORKERS:-2}" --dist loadfile --no-loadscope-reorder \
    --fail-on-skip --durations=25 "$@"
