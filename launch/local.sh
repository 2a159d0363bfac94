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
# kanana-jax with the dev extras (sweeps, notebooks, pytest). libtpu (the [tpu] extra) is added only where it is
# used: the tests (AOT TPU compiles of kernels and steps), the ahead-of-time compile launchers, and TPU machines;
# a CPU laptop's first `kanana-jax run` goes without it.
EXTRAS=dev
if [[ " $* " == *pytest* || " $* " == *compile_aot* || " $* " == *compile_kernels_aot* ]] || \
   ls /dev/accel* /dev/vfio/[0-9]* >/dev/null 2>&1; then
  EXTRAS=dev,tpu
fi
SETUP_HASH=$(cat setup.py | sha1sum | cut -c1-12)
STAMP="$VENV/.installed-$SETUP_HASH-$EXTRAS"
if [ ! -f "$STAMP" ] && [ ! -f "$VENV/.installed-$SETUP_HASH-dev,tpu" ]; then
  PY=$(find_python312)
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
  "$VENV/bin/python" -m pip install -q -e ".[$EXTRAS]"
  touch "$STAMP"
fi
# --- HF reference venv (owner: kanana_jax/convert) -------------------------------------------------------------
# The HuggingFace parity tests (tests/test_convert_*.py) run transformers' DeepseekV3 in a separate Python 3.11
# venv, .venv-hf, with the CPU build of torch 2.13.0 (found on local disk; never a CUDA build). Built only when
# the command is pytest, so `kanana-jax run` stays light. If it cannot be built, those tests fail with a message
# saying how to provide it (KANANA_HF_PYTHON).
HF_VENV=.venv-hf
HF_REQS="torch==2.13.0+cpu transformers==5.24.0 safetensors"
if [[ " $* " == *pytest* ]] && [ -z "${KANANA_HF_PYTHON:-}" ] && \
   [ ! -f "$HF_VENV/.installed-$(echo "$HF_REQS" | sha1sum | cut -c1-12)" ]; then
  HF_PY=""
  if command -v pyenv >/dev/null 2>&1 && [ -x "$(pyenv prefix 3.11.7 2>/dev/null)/bin/python3.11" ]; then
    HF_PY="$(pyenv prefix 3.11.7)/bin/python3.11"
  elif command -v python3.11 >/dev/null 2>&1 && python3.11 -c 'import sys' 2>/dev/null; then
    HF_PY="$(command -v python3.11)"
  fi
  if [ -n "$HF_PY" ] && { [ -x "$HF_VENV/bin/python" ] || "$HF_PY" -m venv "$HF_VENV"; } && \
     "$HF_VENV/bin/python" -m pip install -q --disable-pip-version-check $HF_REQS >"$HF_VENV/pip.log" 2>&1; then
    touch "$HF_VENV/.installed-$(echo "$HF_REQS" | sha1sum | cut -c1-12)"
  else
    [ -f "$HF_VENV/pip.log" ] && tail -n 20 "$HF_VENV/pip.log" >&2
    echo "launch/local.sh: could not build $HF_VENV (Python 3.11 + $HF_REQS); the HF parity tests will fail" >&2
  fi
fi
# --- end HF reference venv -------------------------------------------------------------------------------------
# On a machine with no TPU or GPU, run on the CPU (libtpu, if installed, would otherwise probe for a TPU).
if [ -z "${JAX_PLATFORMS:-}" ] && ! ls /dev/accel* /dev/vfio/* >/dev/null 2>&1 && ! command -v nvidia-smi >/dev/null 2>&1; then
  export JAX_PLATFORMS=cpu
fi
export PATH="$PWD/$VENV/bin:$PATH"
export VIRTUAL_ENV="$PWD/$VENV"
export KANANA_LAUNCHER=launch/local.sh   # the commands kanana-jax prints (resume, eval) start with it
exec "$@"
