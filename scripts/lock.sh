#!/usr/bin/env bash
# Re-resolve requirements.lock from pyproject.toml (run after changing a dependency). The lock
# holds the dev and asr extras: every package the tests need belongs in the dev extra.
# torch stays the CPU build in the lock; scripts/setup.sh swaps in the CUDA build on GPU machines.
set -euo pipefail
cd "$(dirname "$0")/.."
c=$(mktemp); trap 'rm -f "$c"' EXIT
echo "torch==$(grep -oP '^torch==\K[0-9.]+' requirements.lock)+cpu" > "$c"
FIND_LINKS=${PIP_FIND_LINKS:-$(python3 -m pip config get global.find-links 2>/dev/null || true)}
# The +cpu torch wheel: from local find-links where configured, else from PyTorch's CPU index.
if [ -n "$FIND_LINKS" ]; then args=(--find-links "$FIND_LINKS")
else args=(--extra-index-url https://download.pytorch.org/whl/cpu --index-strategy unsafe-best-match); fi
uv pip compile -q pyproject.toml --extra dev --extra asr --python-version 3.11 \
  --python-platform x86_64-manylinux_2_28 -c "$c" "${args[@]}" --no-header -o requirements.lock
sed -i "s|-c $c|-c torch pin (scripts/lock.sh)|" requirements.lock
echo "[lock] requirements.lock: $(grep -c '==' requirements.lock) pins" >&2
