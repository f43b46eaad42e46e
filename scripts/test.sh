#!/usr/bin/env bash
# The test command: sets up the environment (scripts/setup-env.sh), then runs the suite
# against the installed adamx. Extra arguments go to pytest.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="$(bash "$repo/scripts/setup-env.sh" | tail -n 1)"
cd "$repo"
# Run pytest's entry script, not `python -m pytest`, which would put the source tree (and
# its uncompiled adamx/) first on sys.path instead of the installed package.
exec "$(dirname "$py")/pytest" -q "$@" tests benchmarks/tests
