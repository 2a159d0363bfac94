#!/usr/bin/env bash
# Laptop / CI launcher: finds Python 3.12, creates ./.venv with kanana-jax installed (once), then runs the
# given command inside it, e.g.
#   launch/local.sh kanana-jax run experiments/pretrain.py:size=tiny --workdir runs/tiny
#   launch/local.sh python -m pytest -n 2 tests
set -euo pipefail
cd "$(dirname "$0")/.."

find_python312() {
  if command -v pyenv >/dev/null 2>&1; then
    local v
    v=$(pyenv versions --bare 2>/dev/null | grep -E '^3\.12(\.[0-9]+)?$' | sort -V | tail -n 1 || true)
    if [ -n "$v" ] && [ -x "$(pyenv prefix "$v")/bin/python3.12" ]; then
      echo "$(pyenv prefix "$v")/bin/python3.12"; return
    fi
  fi
  for candidate in python3.12 python3; do
    if command -v "$candidate" >/dev/null 2>&1 && \
       "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; then
      command -v "$candidate"; return
    fi
  done
  echo "kanana-jax needs Python 3.12 (jax 0.11.x): none found via pyenv or on PATH" >&2
  return 1
}

VENV=.venv
STAMP="$VENV/.installed-$(cat setup.py | sha1sum | cut -c1-12)"
if [ ! -f "$STAMP" ]; then
  PY=$(find_python312)
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
  "$VENV/bin/python" -m pip install -q -e ".[dev,tpu]"
  touch "$STAMP"
fi
# libtpu is installed for ahead-of-time TPU compilation; on a machine with no TPU or GPU, run on the CPU.
if [ -z "${JAX_PLATFORMS:-}" ] && ! ls /dev/accel* /dev/vfio/* >/dev/null 2>&1 && ! command -v nvidia-smi >/dev/null 2>&1; then
  export JAX_PLATFORMS=cpu
fi
export PATH="$PWD/$VENV/bin:$PATH"
export VIRTUAL_ENV="$PWD/$VENV"
exec "$@"
