#!/usr/bin/env bash
# On a machine with a CUDA GPU and a CUDA build of torch already installed (no network
# needed): builds adamx in place for this GPU's architecture, runs the GPU tests
# (tests/test_cuda.py, verbose), then the whole suite, then a short CUDA step benchmark.
# Everything is logged under $OUT (default out/gpu-check); the last lines printed are a
# summary. Usage: bash scripts/gpu-check.sh [--no-gpu-tests] [--no-suite] [--no-bench]
# The rest of the suite runs under pytest-xdist when it is installed, so that a crashing
# test is reported as such and the others still run.
set -uo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
out="${OUT:-$repo/out/gpu-check}"
mkdir -p "$out"
py="${PYTHON:-python3}"
bench=1 suite=1 gpu_tests=1
for a in "$@"; do
  case "$a" in
    --no-bench) bench=0 ;;
    --no-suite) suite=0 ;;
    --no-gpu-tests) gpu_tests=0 ;;
    *) echo "unknown argument $a" >&2; exit 2 ;;
  esac
done
export PYTHONUNBUFFERED=1 PYTHONPATH="$repo"
# On some GPU machines setuptools links with /opt/gcc/bin/g++, which links libstdc++
# statically: such a module crashes on its first error message, and setup.py refuses it.
# Build with the system compiler there (override with ADAMX_CXX).
cxx="${ADAMX_CXX:-}"
if [ -z "$cxx" ] && [ -x /usr/bin/g++ ]; then cxx=/usr/bin/g++; fi
if [ -n "$cxx" ]; then export CC="$cxx" CXX="$cxx"; fi
summary=()
took() { echo "$(( $(date +%s) - t0 )) s"; }

nvidia-smi -L | tee "$out/gpu.txt"
"$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$out/gpu.txt"
arch="$("$py" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')"

t0=$(date +%s)
if ADAMX_CUDA=1 TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS="$(nproc)" \
   "$py" setup.py build_ext --inplace >"$out/build.log" 2>&1; then
  summary+=("build (sm_${arch/./}): ok, $(took)")
else
  tail -n 40 "$out/build.log"
  echo "gpu-check: build FAILED"; exit 1
fi

if [ "$gpu_tests" = 1 ]; then
  t0=$(date +%s)
  "$py" -m pytest tests/test_cuda.py -v -rs -p no:cacheprovider >"$out/test_cuda.log" 2>&1
  rc=$?
  grep -E "FAILED|ERROR|SKIPPED" "$out/test_cuda.log" | head -n 40
  summary+=("tests/test_cuda.py: rc=$rc, $(tail -n 1 "$out/test_cuda.log"), $(took)")
fi

if [ "$suite" = 1 ]; then
  t0=$(date +%s)
  xdist=()
  "$py" -c "import xdist" 2>/dev/null && xdist=(-n 8)
  "$py" -m pytest tests benchmarks/tests -q -rs -p no:cacheprovider --ignore=tests/test_cuda.py \
    "${xdist[@]}" \
    >"$out/tests.log" 2>&1
  rc=$?
  grep -E "^(FAILED|ERROR)|crashed" "$out/tests.log" | head -n 20
  summary+=("rest of the suite: rc=$rc, $(tail -n 1 "$out/tests.log"), $(took)")
fi

if [ "$bench" = 1 ]; then
  t0=$(date +%s)
  "$py" benchmarks/step_bench.py --device cuda --cases mnist,25m,gpt2 --dtype float32,bfloat16 \
    --no-progress --out /tmp/adamx-step-cuda >"$out/step_cuda.txt" 2>&1
  summary+=("step_bench cuda: rc=$?, $(took)")
  cp /tmp/adamx-step-cuda/*.json "$out/" 2>/dev/null
  tail -n 70 "$out/step_cuda.txt"
fi

echo "== gpu-check summary"
printf '%s\n' "${summary[@]}"
