# Creates (first run) or reuses the project's virtual environment; sourced by the other scripts.
# Usage: source scripts/env.sh; ensure_venv [EXTRAS]   (e.g. "test")
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"

ensure_venv() {
  local extras="${1:-}"
  local stamp="$VENV/.installed${extras:+-$extras}"
  if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
  fi
  if [ ! -f "$stamp" ] || [ "$ROOT/pyproject.toml" -nt "$stamp" ]; then
    "$VENV/bin/pip" install -q --upgrade pip
    if [ "$extras" = "test" ]; then
      # The CPU build, installed first: an unpinned torch requirement would pull the CUDA one.
      "$VENV/bin/pip" install -q "torch==2.13.0"
    fi
    "$VENV/bin/pip" install -q -e "$ROOT${extras:+[$extras]}"
    touch "$stamp"
  fi
}
