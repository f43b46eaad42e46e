#!/usr/bin/env bash
# Creates (or reuses) a virtual environment with torch and builds adamx into it.
#   ADAMX_VENV   where the environment lives      (default: .venv in the repo)
#   ADAMX_TORCH  the torch requirement to install (default: torch==2.13.0, CPU build)
# Prints the environment's python on its last line. Sourced by test.sh and bench.sh.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${ADAMX_VENV:-$repo/.venv}"
torch_req="${ADAMX_TORCH:-torch==2.13.0}"

if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
py="$venv/bin/python"
# torch first, so the build compiles against it; ninja parallelizes the compile.
"$py" -m pip install -q --disable-pip-version-check "$torch_req" numpy pytest hypothesis ninja setuptools wheel matplotlib \
  expecttest  # torch.testing._internal (tests/test_torch_optim_db.py) imports it
# Plain `pip install .`, as README's Install says: adamx's build backend compiles against
# the torch installed here even though pip builds in an isolated environment (no second
# torch is downloaded). .ci/cuda-check builds with --no-build-isolation, so CI runs both.
start=$(date +%s)
"$py" -m pip install -q --disable-pip-version-check --no-deps "$repo"
echo "adamx built and installed in $(( $(date +%s) - start )) s into $venv" >&2
# (from / so that the installed package is imported, not the source tree)
(cd / && "$py" -c "import adamx, sys; i = adamx.build_info(); print('adamx', i, file=sys.stderr); assert i['compiled'], 'adamx._C did not build'")
echo "$py"
