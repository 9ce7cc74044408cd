#!/usr/bin/env bash
# Create .venv with cosytune and its locked dependencies. Idempotent: a second run only
# re-checks. torch is the CPU build unless an NVIDIA GPU is visible (see README "Installing").
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export UV_PYTHON_DOWNLOADS=never
# Installed packages come with their bytecode (.pyc): uv does not write it by default, and where
# PYTHONDONTWRITEBYTECODE is set Python never caches it either, so every process (each test's subprocess,
# each torchrun worker) would recompile torch and transformers from source: ~6 s more per process.
export UV_COMPILE_BYTECODE=1
# Local wheel folders configured for pip (this is where a CPU torch wheel may live).
FIND_LINKS=${PIP_FIND_LINKS:-$($PY -m pip config get global.find-links 2>/dev/null || true)}
[ -n "$FIND_LINKS" ] && export UV_FIND_LINKS="$FIND_LINKS"

if ! command -v uv >/dev/null 2>&1; then
  echo "[setup] installing uv (fast, pinned installer) with pip" >&2
  $PY -m pip install -q --disable-pip-version-check "uv>=0.5,<1" >&2
fi
UV="$(command -v uv || echo "$PY -m uv")"

[ -x .venv/bin/python ] || $UV venv -q --python "$PY" .venv

LOCK=requirements.lock
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && [ "${COSYTUNE_TORCH:-auto}" != cpu ]; then
  # A GPU machine: the same pins, but torch from PyPI (a CUDA build).
  sed 's/^torch==\([0-9.]*\)+cpu/torch==\1/' requirements.lock > .venv/requirements.gpu.lock
  LOCK=.venv/requirements.gpu.lock
  EXTRA=()
else
  # CPU: the +cpu wheel comes from local find-links if present, else from PyTorch's CPU index.
  EXTRA=(--extra-index-url https://download.pytorch.org/whl/cpu --index-strategy unsafe-best-match)
  if [ -n "$FIND_LINKS" ] && ls "$FIND_LINKS"/torch-*+cpu-*.whl >/dev/null 2>&1; then EXTRA=(); fi
fi
stamp=.venv/.cosytune-lock.sha
want=$(cat "$LOCK" pyproject.toml | sha256sum | cut -d' ' -f1)
if [ "$(cat $stamp 2>/dev/null)" != "$want" ]; then
  echo "[setup] installing locked dependencies into .venv" >&2
  $UV pip install -q --python .venv/bin/python "${EXTRA[@]}" -r "$LOCK" >&2
  $UV pip install -q --python .venv/bin/python --no-deps -e . >&2
  echo "$want" > $stamp
  touch .venv/.cosytune-bytecode
fi
if [ ! -f .venv/.cosytune-bytecode ]; then
  # A .venv installed before setup compiled bytecode: compile it once (about a minute).
  echo "[setup] compiling the installed packages' bytecode (once)" >&2
  .venv/bin/python -m compileall -q -j 0 .venv/lib/python*/site-packages >/dev/null 2>&1 || true
  touch .venv/.cosytune-bytecode
fi
# The lab's browser tests (tests/integration/test_serve.py) drive Debian's chromium through chromium-driver,
# never a downloaded browser. Installed here when missing and we are root; otherwise we say what to run.
if [ "${COSYTUNE_SKIP_BROWSER:-0}" != 1 ] && { [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; }; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "[setup] installing chromium + chromium-driver (Debian packages) for the browser tests" >&2
    apt_install() { DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium chromium-driver >&2; }
    apt_install || { apt-get update -q >&2 && apt_install; } \
      || echo "[setup] warning: could not install chromium/chromium-driver; the browser tests will fail (set COSYTUNE_SKIP_BROWSER=1 to skip them)" >&2
  else
    echo "[setup] note: the browser tests need Debian's chromium and chromium-driver:" \
         "sudo apt-get install chromium chromium-driver (or set COSYTUNE_SKIP_BROWSER=1 to skip them)" >&2
  fi
fi
.venv/bin/python -c "import torch, cosytune; print(f'[setup] ok: cosytune {cosytune.__version__}, torch {torch.__version__}')" >&2
