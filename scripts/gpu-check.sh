#!/usr/bin/env bash
# On a machine with a CUDA GPU and a CUDA build of torch already installed (no network
# needed): builds adamx in place for this GPU's architecture, runs the GPU tests
# (tests/test_cuda.py, verbose), then the whole suite, then a short CUDA step benchmark.
# Everything is logged under $OUT (default out/gpu-check); the last lines printed are a
# summary. Usage: bash scripts/gpu-check.sh [--no-bench] [--no-suite]
set -uo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
out="${OUT:-$repo/out/gpu-check}"
mkdir -p "$out"
py="${PYTHON:-python3}"
bench=1 suite=1
for a in "$@"; do
  case "$a" in
    --no-bench) bench=0 ;;
    --no-suite) suite=0 ;;
    *) echo "unknown argument $a" >&2; exit 2 ;;
  esac
done
export PYTHONUNBUFFERED=1 PYTHONPATH="$repo"
summary=()
t0=$(date +%s)
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

t0=$(date +%s)
"$py" -m pytest tests/test_cuda.py -v -rs -p no:cacheprovider >"$out/test_cuda.log" 2>&1
rc=$?
grep -E "FAILED|ERROR|SKIPPED" "$out/test_cuda.log" | head -n 40
summary+=("tests/test_cuda.py: rc=$rc, $(tail -n 1 "$out/test_cuda.log"), $(took)")

if [ "$suite" = 1 ]; then
  t0=$(date +%s)
  "$py" -m pytest tests -q -rs -p no:cacheprovider --ignore=tests/test_cuda.py \
    >"$out/tests.log" 2>&1
  rc=$?
  grep -E "^(FAILED|ERROR)" "$out/tests.log" | head -n 20
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
