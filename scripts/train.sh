#!/usr/bin/env bash
# Sets up .venv (first run only) and trains: `scripts/train.sh [train.py flags]`.
source "$(dirname "$0")/env.sh"
ensure_venv train
cd "$ROOT"
exec "$VENV/bin/python" train.py "$@"
