#!/usr/bin/env bash
# The test command of the README: the layer contracts (import-linter), then the whole suite,
# slow tests included, on the CPU.
set -uo pipefail
cd "$(dirname "$0")/.."
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
# A broken layer contract (pyproject.toml, [tool.importlinter]) fails the run before any test.
lint-imports || exit $?
python3 -m pytest -q -p no:cacheprovider "$@"
rc=$?
# pytest's "no tests collected" (5) is a failure here, not a pass.
exit $rc
