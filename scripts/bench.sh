#!/usr/bin/env bash
# The main job: sets up the environment (scripts/setup-env.sh), then runs the tutorial's
# MNIST experiment with every optimizer. MNIST is read from $ADAMX_MNIST_DIR or --data-dir
# DIR (else downloaded; offline, a synthetic stand-in labelled SYNTHETIC in every table);
# results go to ${ADAMX_OUT:-out}/mnist. Extra arguments go to the script.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="$(bash "$repo/scripts/setup-env.sh" | tail -n 1)"
cd "$repo"
exec "$py" benchmarks/mnist_mlp.py --out "${ADAMX_OUT:-out}/mnist" "$@"
