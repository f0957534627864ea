#!/usr/bin/env bash
# The test command of the README: the layer contracts (import-linter), then the whole suite,
# slow tests included, on the CPU.
set -uo pipefail
cd "$(dirname "$0")/.."
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
# A broken layer contract (pyproject.toml, [tool.importlinter]) fails the run before any test.
lint-imports || exit $?
# Two worker processes (pytest-xdist), each test file in one of them: most tests are bound by
# single-threaded compilation, so two share a 2-core machine well. PYTEST_WORKERS=0: one process.
python3 -m pytest -q -p no:cacheprovider -n "${PYTEST_WORKERS:-2}" --dist loadfile "$@"
rc=$?
# pytest's "no tests collected" (5) is a failure here, not a pass.
exit $rc
