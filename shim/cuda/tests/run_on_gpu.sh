#!/usr/bin/env bash
# run_on_gpu.sh — build the CUDA shim and run camel's whole test suite on an NVIDIA GPU.
#
#   CLANG_ROOT=/path/to/clang19 OUT=/path/to/logs shim/cuda/tests/run_on_gpu.sh [pytest args]
#
# CLANG_ROOT: Debian's clang-19 unpacked with dpkg -x (clang-19, libclang-cpp19, libllvm19,
# libclang-common-19-dev), i.e. it holds usr/lib/llvm-19/bin/clang++. No CUDA toolkit is needed:
# the driver (libcuda.so.1) is opened at run time. OUT (default ./gpu-run) receives
#   env.txt     the GPU, driver, compiler, Python packages
#   build.log   make -C shim clean shim
#   smoke.log   the device name and one kernel checked against NumPy
#   pytest.log  the suite with CAMEL_SHIM=cuda (and junit.xml)
# Extra arguments go to pytest (default: the whole suite), e.g. tests/test_gemm.py -x.
# PYTHON picks the interpreter (default: python on PATH). CAMEL_CUDA_SYNC=1 in the environment makes every dispatch wait, so a fault names its kernel.
set -uo pipefail
cd "$(dirname "$0")/../../.."  # the repository root
: "${CLANG_ROOT:?set CLANG_ROOT to the folder where the clang-19 .debs were unpacked}"
OUT=${OUT:-$PWD/gpu-run}
mkdir -p "$OUT"
PY=${PYTHON:-$(command -v python || command -v python3)}  # before PATH changes

# clang-19 through small wrappers that find its libraries: LD_LIBRARY_PATH for clang only
# (set for the whole run it could hand Python a different libpython).
BIN=$(mktemp -d)/bin
mkdir -p "$BIN"
for tool in clang clang++; do
    real="$CLANG_ROOT/usr/lib/llvm-19/bin/$tool"
    [ -x "$real" ] || continue
    printf '#!/bin/sh\nLD_LIBRARY_PATH="%s:%s${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" exec "%s" "$@"\n' \
        "$CLANG_ROOT/usr/lib/x86_64-linux-gnu" "$CLANG_ROOT/usr/lib/llvm-19/lib" "$real" >"$BIN/$tool-19"
    chmod +x "$BIN/$tool-19"
done
export PATH="$BIN:$PATH"
export CAMEL_SHIM=cuda
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export XDG_CACHE_HOME=${XDG_CACHE_HOME:-/tmp/camel-cache}  # PTX and simulator libraries

fail() { echo "run_on_gpu.sh: $*" | tee -a "$OUT/env.txt" >&2; exit 1; }

# ---- environment ------------------------------------------------------------------
{
    date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1
    command -v clang++-19 && clang++-19 --version | head -1
    "$PY" --version
    "$PY" -c "import numpy, pytest; print('numpy', numpy.__version__, 'pytest', pytest.__version__)"
    "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" 2>&1 | tail -1
} >"$OUT/env.txt" 2>&1
command -v clang++-19 >/dev/null || fail "no clang++ under $CLANG_ROOT/usr/lib/llvm-19/bin"
missing=$(LD_LIBRARY_PATH="$CLANG_ROOT/usr/lib/x86_64-linux-gnu:$CLANG_ROOT/usr/lib/llvm-19/lib" \
          ldd "$CLANG_ROOT/usr/lib/llvm-19/bin/clang++" | grep "not found")
[ -z "$missing" ] || fail "clang++-19 libraries do not resolve: $missing"
clang++-19 -print-resource-dir >>"$OUT/env.txt" 2>&1 || fail "clang++-19 does not run"

# cuBLAS for camel_mps_matmul: the toolkit's, or the one a CUDA PyTorch brought along.
if [ -z "${CAMEL_CUBLAS:-}" ]; then
    for dir in $("$PY" -c "import nvidia, os; [print(os.path.join(p, sub, 'lib')) for p in nvidia.__path__ for sub in ('cublas', 'cu13', 'cu12')]" 2>/dev/null) \
               /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do
        lib=$(ls "$dir"/libcublas.so.1[0-9]* 2>/dev/null | head -1)
        if [ -n "$lib" ]; then export CAMEL_CUBLAS="$lib"; break; fi
    done
fi
echo "CAMEL_CUBLAS=${CAMEL_CUBLAS:-(not found: the vendor GEMM rows will say so)}" >>"$OUT/env.txt"
if [ -n "${CAMEL_CUBLAS:-}" ]; then  # its libcublasLt sits beside it
    export LD_LIBRARY_PATH="$(dirname "$CAMEL_CUBLAS"):$LD_LIBRARY_PATH"
fi

# ---- build ------------------------------------------------------------------------
make -C shim clean shim >"$OUT/build.log" 2>&1 || fail "the build failed: see $OUT/build.log"

# ---- smoke: the device and one kernel ----------------------------------------------
"$PY" - >"$OUT/smoke.log" 2>&1 <<'EOF' || fail "the smoke test failed: see $OUT/smoke.log"
import time
import numpy as np
from camel import metal
print(metal.shim(), "|", metal.device_name())
print(metal.device_info())
t = time.time()
fn = metal.kernel("ops_elementwise.metal", "add_float")
print(f"compiled ops_elementwise.metal in {time.time() - t:.1f} s")
for n in (1, 33, 1000, 1 << 20):
    a, b = (np.random.default_rng(n).standard_normal(n, dtype=np.float32) for _ in "ab")
    da, db, out = metal.DeviceArray.from_numpy(a), metal.DeviceArray.from_numpy(b), metal.DeviceArray.empty(n)
    fn(da, db, out, n, threads=n, threads_per_threadgroup=256)
    np.testing.assert_array_equal(out.numpy(), a + b)
print("add_float matches NumPy at 1, 33, 1000, 2^20")
EOF

# ---- the suite ----------------------------------------------------------------------
[ $# -gt 0 ] || set -- tests
"$PY" -m pytest -q -p no:cacheprovider -ra --durations=25 --junitxml="$OUT/junit.xml" "$@" \
    >"$OUT/pytest.log" 2>&1
rc=$?
tail -5 "$OUT/pytest.log"
exit $rc
