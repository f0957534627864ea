#!/usr/bin/env bash
# The test command of the README: the whole suite, slow tests included, on the CPU.
set -uo pipefail
cd "$(dirname "$0")/.."
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
python3 -m pytest -q -p no:cacheprovider "$@"
rc=$?
# pytest's "no tests collected" (5) is a failure here, not a pass.
exit $rc
