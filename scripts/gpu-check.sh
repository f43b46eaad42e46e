#!/usr/bin/env bash
# The GPU check: on a machine with a CUDA GPU and a CUDA build of torch already installed
# (no network needed), in this order, each stage bounded in time:
#   1. adamx built in place for this GPU's architecture on all cores (skipped when a
#      module built for this torch with CUDA kernels is already there and imports);
#   2. tests/test_cuda.py (verbose), then FSDP2's CPUOffloadPolicy test;
#   3. the CUDA step benchmarks: benchmarks/step_bench.py (float32 and bfloat16 params, a
#      1e8-element tensor and GPT-2 small's shapes; torch foreach and fused, adamx, master
#      weights, stochastic rounding, bf16 and 8-bit moments; graph-replayed steps; the
#      GradScaler'd step) and benchmarks/cuda_scaled_step.py (the GradScaler'd step eager
#      and captured in a CUDA graph);
#   4. the rest of the suite, under pytest-xdist when it is installed.
# Expected time on one H200 with 16 cores: build 2-3 min (0 when carried), tests 1-2 min,
# benchmarks 2-3 min, suite 2-3 min: under 10 min.
# Results go to $OUT (default out/gpu-check): summary.txt (a line per stage, then the
# benchmark tables) and logs.tgz (every log and JSON), rewritten after each stage so a run
# cut short still returns what it did.
# Without a GPU it is a dry run of the same stages: the build, the GPU tests (which skip,
# saying why) and the suite; no benchmarks.
# Usage: bash scripts/gpu-check.sh [--no-gpu-tests] [--no-bench] [--no-suite]
set -uo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
out="${OUT:-$repo/out/gpu-check}"
work="$(mktemp -d "${TMPDIR:-/tmp}/adamx-gpu-check.XXXXXX")"
mkdir -p "$out"
py="${PYTHON:-python3}"
bench=1 suite=1 gpu_tests=1 suite_limit=300
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
t_all=$(date +%s)
took() { echo "$(( $(date +%s) - t0 )) s"; }
note() { echo "$*" | tee -a "$out/summary.txt"; }
pack() { tar czf "$out/logs.tgz" -C "$work" . 2>/dev/null; }
: >"$out/summary.txt"

{ nvidia-smi -L && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm \
    --format=csv; "$py" -c "import sys, torch; print('python', sys.version.split()[0], \
'torch', torch.__version__, 'cuda', torch.version.cuda)"; nproc; } >"$work/machine.txt" 2>&1
cat "$work/machine.txt" | tee -a "$out/summary.txt"
if "$py" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
  arch="$("$py" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')"
else
  # A dry run: the build (for the H200's sm_90 unless TORCH_CUDA_ARCH_LIST says otherwise)
  # and the suite still run; the GPU tests skip, saying why, and the benchmarks are left out.
  arch="${TORCH_CUDA_ARCH_LIST:-9.0}" bench=0 suite_limit=3600
  note "no CUDA device: a dry run (GPU tests skip, benchmarks left out)"
fi

# 1. Build ------------------------------------------------------------------------------
t0=$(date +%s)
if (cd / && "$py" -c "import sys; sys.path.insert(0, '$repo'); import adamx; \
i = adamx.build_info(); assert i['compiled'] and i['cuda'], i; print(i['built_for_torch'])" \
      >"$work/carried.txt" 2>&1); then
  note "build: skipped, the module here (built for torch $(tail -n 1 "$work/carried.txt")) imports with CUDA kernels"
else
  if ADAMX_CUDA=1 TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS="$(nproc)" \
     timeout 400 "$py" setup.py build_ext --inplace >"$work/build.log" 2>&1; then
    note "build (sm_${arch/./}, $(nproc) jobs): ok, $(took)"
  else
    tail -n 40 "$work/build.log"
    note "build: FAILED, $(took)"; pack; exit 1
  fi
fi
pack

# 2. GPU tests --------------------------------------------------------------------------
if [ "$gpu_tests" = 1 ]; then
  t0=$(date +%s)
  timeout 240 "$py" -m pytest tests/test_cuda.py -v -rs -p no:cacheprovider \
    >"$work/test_cuda.log" 2>&1
  rc=$?
  grep -E "^(FAILED|ERROR)|^SKIPPED \[" "$work/test_cuda.log" | head -n 40 | tee -a "$out/summary.txt"
  note "tests/test_cuda.py: rc=$rc, $(tail -n 1 "$work/test_cuda.log"), $(took)"
  t0=$(date +%s)
  timeout 150 "$py" -m pytest tests/test_distributed.py -k "cpu_offload" -v -rs \
    -p no:cacheprovider >"$work/test_offload.log" 2>&1
  rc=$?
  grep -E "^(FAILED|ERROR)|^SKIPPED \[" "$work/test_offload.log" | head -n 10 | tee -a "$out/summary.txt"
  note "FSDP2 CPUOffloadPolicy test: rc=$rc, $(tail -n 1 "$work/test_offload.log"), $(took)"
  pack
fi

# 3. Benchmarks -------------------------------------------------------------------------
if [ "$bench" = 1 ]; then
  t0=$(date +%s)
  timeout 200 "$py" benchmarks/step_bench.py --device cuda --cases sweep,gpt2 --sweep-sizes 1e8 \
    --dtype float32,bfloat16 --no-progress --out "$work/step" \
    --peers torch-foreach,torch-fused,adamx,adamx-master,adamx-stochastic,adamx-bf16-state,adamx-int8-state \
    >"$work/step_cuda.txt" 2>&1
  note "step_bench cuda: rc=$?, $(took)"
  pack
  t0=$(date +%s)
  timeout 100 "$py" benchmarks/step_bench.py --device cuda --cases sweep,gpt2 --sweep-sizes 1e8 \
    --dtype float32 --grad-scaler --no-progress --out "$work/step-scaled" \
    --peers torch-foreach,torch-fused,adamx >"$work/step_cuda_scaled.txt" 2>&1
  note "step_bench cuda --grad-scaler: rc=$?, $(took)"
  t0=$(date +%s)
  timeout 100 "$py" benchmarks/cuda_scaled_step.py --out "$work/scaled-graph" \
    >"$work/cuda_scaled_step.txt" 2>&1
  note "cuda_scaled_step (eager and graph): rc=$?, $(took)"
  pack
fi

# 4. The rest of the suite --------------------------------------------------------------
if [ "$suite" = 1 ]; then
  t0=$(date +%s)
  xdist=()
  workers=$(( $(nproc) > 8 ? 8 : $(nproc) ))
  "$py" -c "import xdist" 2>/dev/null && xdist=(-n "$workers")
  timeout "$suite_limit" "$py" -m pytest tests benchmarks/tests -q -rs -p no:cacheprovider \
    --ignore=tests/test_cuda.py "${xdist[@]}" >"$work/tests.log" 2>&1
  rc=$?
  grep -E "^(FAILED|ERROR)|crashed" "$work/tests.log" | head -n 30 | tee -a "$out/summary.txt"
  note "rest of the suite: rc=$rc, $(tail -n 1 "$work/tests.log"), $(took)"
  pack
fi

if [ "$bench" = 1 ]; then
  { echo; echo "== step_bench cuda"; grep -v "^UNAVAILABLE" "$work/step_cuda.txt" | tail -n 60
    echo; echo "== step_bench cuda --grad-scaler"; tail -n 25 "$work/step_cuda_scaled.txt"
    echo; echo "== cuda_scaled_step"; cat "$work/cuda_scaled_step.txt"; } >>"$out/summary.txt"
fi
note "gpu-check: total $(( $(date +%s) - t_all )) s"
pack
