#!/usr/bin/env bash
# The test command of the README: the layer contracts (import-linter), then the whole suite,
# slow tests included, on the CPU.
set -uo pipefail
cd "$(dirname "$0")/.."
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
# One persistent compilation cache for the run, shared by the workers and the experiments they
# start: many tests compile the same small models, and on CPU compiling is most of their time.
# A fresh directory per run unless JAX_COMPILATION_CACHE_DIR names one.
if [ -z "${JAX_COMPILATION_CACHE_DIR:-}" ]; then
  JAX_COMPILATION_CACHE_DIR=$(mktemp -d "${TMPDIR:-/tmp}/ultrametric-jax-cache.XXXXXX")
  trap 'rm -rf "$JAX_COMPILATION_CACHE_DIR"' EXIT
fi
export JAX_COMPILATION_CACHE_DIR
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=${JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS:-0.2}
# A broken layer contract (pyproject.toml, [tool.importlinter]) fails the run before any test.
lint-imports || exit $?
# Two worker processes (pytest-xdist), each test file in one of them (tests/conftest.py groups
# them, the files of the real model together, longest first): most tests are bound by
# single-threaded compilation, so two share a 2-core machine well. PYTEST_WORKERS=0: one process.
python3 -m pytest -q -p no:cacheprovider -n "${PYTEST_WORKERS:-2}" --dist loadgroup \
  --no-loadscope-reorder --durations=25 "$@"
rc=$?
# pytest's "no tests collected" (5) is a failure here, not a pass.
exit $rc
