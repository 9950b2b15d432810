"""simdgroup_matrix on every shim (the simulator, the CUDA shim, Metal): the paths a
multiply takes, against NumPy.

The CUDA shim multiplies on the tensor cores (3xTF32, shim/cuda/include/camel_cuda_simd.h):
its B operand comes from a copy simdgroup_load keeps, or is gathered with shuffles when
the matrix is a multiply's result; a warp with a
non-finite operand takes the exact FP32 path. Each kernel below drives one of those
paths; on the simulator they check the simulator's own matrix functions.
"""

import numpy as np
import pytest
from conftest import ORDERS, require_shim

require_shim()
from camel import metal as M  # noqa: E402

SRC = r"""
#include <metal_stdlib>
using namespace metal;

// One SIMD group. C (8 x 8) = A (8 x K) @ B (K x 8), row-major, K a multiple of 8: the
// B fragments straight from simdgroup_load.
kernel void mm_loaded(device const float *A [[buffer(0)]], device const float *B [[buffer(1)]],
                      device float *C [[buffer(2)]], constant uint &K [[buffer(3)]]) {
    simdgroup_float8x8 acc = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
    for (uint k = 0; k < K; k += 8) {
        simdgroup_float8x8 a, b;
        simdgroup_load(a, A + k, K);
        simdgroup_load(b, B + k * 8, 8);
        simdgroup_multiply_accumulate(acc, a, b, acc);
    }
    simdgroup_store(acc, C, 8);
}

// One SIMD group, 8x8 matrices: T = A @ B, then C = D @ T (T, a multiply's result, as
// the B operand) and E = T @ D (as the A operand).
kernel void mm_chain(device const float *A [[buffer(0)]], device const float *B [[buffer(1)]],
                     device const float *D [[buffer(2)]], device float *C [[buffer(3)]],
                     device float *E [[buffer(4)]]) {
    simdgroup_float8x8 a, b, d, t, c, e;
    simdgroup_load(a, A, 8);
    simdgroup_load(b, B, 8);
    simdgroup_load(d, D, 8);
    simdgroup_multiply(t, a, b);
    simdgroup_multiply(c, d, t);
    simdgroup_multiply(e, t, d);
    simdgroup_store(c, C, 8);
    simdgroup_store(e, E, 8);
}

// One SIMD group, 8x8: E = A @ Bᵀ through the transposed load.
kernel void mm_transposed(device const float *A [[buffer(0)]], device const float *B [[buffer(1)]],
                          device float *E [[buffer(2)]]) {
    simdgroup_float8x8 a, bt, e;
    simdgroup_load(a, A, 8);
    simdgroup_load(bt, B, 8, ulong2(0, 0), true);
    simdgroup_multiply(e, a, bt);
    simdgroup_store(e, E, 8);
}
"""

rng = np.random.default_rng(11)


@pytest.fixture(scope="module")
def lib():
    return M.compile(SRC, "test_simdgroup_matrix.metal")


@pytest.fixture(params=ORDERS)
def order(request, monkeypatch):
    monkeypatch.setenv("CAMEL_SIM_ORDER", request.param)
    return request.param


def dev(a):
    return M.DeviceArray.from_numpy(np.ascontiguousarray(a, np.float32))


def out(shape):
    return M.DeviceArray.zeros(shape, np.float32)


def run(fn, *args):
    fn(*args, threadgroups=1, threads_per_threadgroup=32)
    M.synchronize()


def fp32_bound(a, b):
    """What FP32 (fma, any summation order) may be off by, elementwise: K ulps-worth of
    sum |a||b|. A product carried with TF32's 11 bits only is off by ~2^-11 of it."""
    k = a.shape[1]
    return 2.0 * k * 2.0**-24 * (np.abs(a).astype(np.float64) @ np.abs(b).astype(np.float64))


def check(got, a, b):
    want = a.astype(np.float64) @ b.astype(np.float64)
    err = np.abs(got.astype(np.float64) - want)
    bound = fp32_bound(a, b) + 1e-30
    worst = np.unravel_index(np.argmax(err / bound), err.shape)
    assert np.all(err <= bound), (
        f"error {err[worst]:.3g} at {worst} exceeds the FP32 bound {bound[worst]:.3g}"
    )


@pytest.mark.parametrize("k", [8, 64, 520])
def test_loaded_fragments_reach_fp32_accuracy(lib, order, k):
    # values with full 24-bit mantissas and mixed magnitudes: TF32's 10 bits alone fail
    a = (rng.standard_normal((8, k)) * np.exp2(rng.integers(-6, 7, (8, k)))).astype(np.float32)
    b = (rng.standard_normal((k, 8)) * np.exp2(rng.integers(-6, 7, (k, 8)))).astype(np.float32)
    c = out((8, 8))
    run(lib.function("mm_loaded"), dev(a), dev(b), c, k)
    check(c.numpy(), a, b)


def test_a_product_as_either_operand(lib, order):
    a, b, d = (rng.standard_normal((8, 8)).astype(np.float32) for _ in range(3))
    c, e = out((8, 8)), out((8, 8))
    run(lib.function("mm_chain"), dev(a), dev(b), dev(d), c, e)
    t = a.astype(np.float64) @ b.astype(np.float64)
    # entries ~3 and ~8: FP32 is off by ~1e-6; products carried with 11 bits by ~1e-2
    np.testing.assert_allclose(c.numpy(), d.astype(np.float64) @ t, rtol=1e-5, atol=2e-5)
    np.testing.assert_allclose(e.numpy(), t @ d.astype(np.float64), rtol=1e-5, atol=2e-5)


def test_transposed_load(lib, order):
    a, b = (rng.standard_normal((8, 8)).astype(np.float32) for _ in range(2))
    e = out((8, 8))
    run(lib.function("mm_transposed"), dev(a), dev(b), e)
    check(e.numpy(), a, np.ascontiguousarray(b.T))


def test_inf_and_nan_as_fp32_gives_them(lib, order):
    # inf * 0 = NaN, inf * x = inf, inf - inf = NaN, NaN anywhere = NaN: the tensor-core
    # path's cross terms would turn the inf rows into NaN; its exact fallback must not.
    k = 16
    a = rng.standard_normal((8, k)).astype(np.float32)
    b = rng.standard_normal((k, 8)).astype(np.float32)
    a[1, 3] = np.inf  # row 1: +-inf wherever b[3] is nonzero
    b[3, 5] = 0.0  # ... and inf * 0 = NaN at column 5
    b[3, 1], b[3, 4] = 1.0, -2.5  # TF32 holds these exactly: inf times their "small" 0
    a[4, 0], a[4, 9] = np.inf, -np.inf  # row 4: inf - inf where signs of b[0], b[9] agree
    b[7, 2] = np.nan  # column 2: NaN everywhere
    b[12, 6] = np.inf  # column 6: +-inf (row 1 and row 4 aside)
    c = out((8, 8))
    run(lib.function("mm_loaded"), dev(a), dev(b), c, k)
    with np.errstate(invalid="ignore", over="ignore"):
        want = (a.astype(np.float64)[:, :, None] * b.astype(np.float64)[None, :, :]).sum(axis=1)
    got = c.numpy()
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_array_equal(np.isposinf(got), np.isposinf(want))
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want))
    finite = np.isfinite(want)
    np.testing.assert_allclose(got[finite], want[finite], rtol=1e-5, atol=1e-5)
