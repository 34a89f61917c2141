# Sourced by demo.sh and test.sh: create or reuse .venv at the repo root and install distrib_face into it.
# Reinstalls only when pyproject.toml changed (a hash stamp inside .venv).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY_BOOT="${PYTHON:-}"
if [ -z "$PY_BOOT" ]; then
  for c in python3.11 python3.12 python3.10 python3; do
    if command -v "$c" >/dev/null 2>&1; then PY_BOOT="$c"; break; fi
  done
fi
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV with $PY_BOOT"
  "$PY_BOOT" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
fi
STAMP="$VENV/.distrib_face_stamp"
WANT="$(cat "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
  echo "[setup] installing distrib_face and its pinned dependencies into .venv (first time: ~2 min)"
  # torch first and exactly pinned: a bare requirement would pull a multi-GB CUDA build on a CPU machine.
  "$VENV/bin/python" -m pip install -q "torch==2.13.0"
  "$VENV/bin/python" -m pip install -q -e "$ROOT[dev]"
  echo "$WANT" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
export RAY_USAGE_STATS_ENABLED=0
export PYTHONUNBUFFERED=1
