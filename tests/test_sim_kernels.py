"""Idiomatic MSL kernels of every feature the simulator runs, through camel.metal, in all
three schedule orders (CAMEL_SIM_ORDER=forward|reverse|random), against NumPy; plus the
debugging features (missing barrier, NaN-poisoned threadgroup memory, address sanitizer),
every error path, and the documented known gaps (docs/simulator.md).
"""

import os
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from conftest import run_under_asan

M = pytest.importorskip("camel.metal")
if not M.is_simulator():
    pytest.skip("simulator-only tests (CAMEL_SHIM=sim runs them on a Mac)", allow_module_level=True)

ORDERS = ["forward", "reverse", "random"]
ROOT = Path(__file__).resolve().parents[1]

SRC = r"""
#include <metal_stdlib>
using namespace metal;

// One thread adds one float4 (four floats).
kernel void add_f4(device const float4 *a [[buffer(0)]], device const float4 *b [[buffer(1)]],
                   device float4 *out [[buffer(2)]], uint i [[thread_position_in_grid]]) {
    out[i] = a[i] + b[i];
}

// Two-level sum: simd_sum inside each SIMD group, then SIMD group 0 sums the partials.
// One threadgroup sums up to threads_per_threadgroup elements into out[group].
kernel void reduce_sum(device const float *x [[buffer(0)]], device float *out [[buffer(1)]],
                       constant uint &n [[buffer(2)]],
                       uint gid [[thread_position_in_grid]],
                       uint group [[threadgroup_position_in_grid]],
                       uint lane [[thread_index_in_simdgroup]],
                       uint sg [[simdgroup_index_in_threadgroup]],
                       uint nsg [[simdgroups_per_threadgroup]]) {
    threadgroup float partial[32];
    float v = simd_sum(gid < n ? x[gid] : 0.0);
    if (lane == 0) partial[sg] = v;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    if (sg == 0) {
        float p = simd_sum(lane < nsg ? partial[lane] : 0.0);
        if (lane == 0) out[group] = p;
    }
}

// C (M, N) = A (M, K) @ B (K, N), row-major. One thread computes C[row, col];
// a 16x16 threadgroup stages 16x16 tiles of A and B in threadgroup memory.
#define TILE 16
kernel void gemm_tiled(device const float *A [[buffer(0)]], device const float *B [[buffer(1)]],
                       device float *C [[buffer(2)]], constant uint3 &mnk [[buffer(3)]],
                       uint2 gid [[thread_position_in_grid]],
                       uint2 lid [[thread_position_in_threadgroup]]) {
    threadgroup float As[TILE][TILE];
    threadgroup float Bs[TILE][TILE];
    uint M = mnk.x, N = mnk.y, K = mnk.z;
    uint row = gid.y, col = gid.x;
    float acc = 0.0;
    for (uint k0 = 0; k0 < K; k0 += TILE) {
        As[lid.y][lid.x] = (row < M && k0 + lid.x < K) ? A[row * K + k0 + lid.x] : 0.0;
        Bs[lid.y][lid.x] = (k0 + lid.y < K && col < N) ? B[(k0 + lid.y) * N + col] : 0.0;
        threadgroup_barrier(mem_flags::mem_threadgroup);
        for (uint k = 0; k < TILE; k++) acc += As[lid.y][k] * Bs[k][lid.x];
        threadgroup_barrier(mem_flags::mem_threadgroup);
    }
    if (row < M && col < N) C[row * N + col] = acc;
}

// One SIMD group computes an 8x8 block of C with simdgroup_matrix (M, N, K multiples of 8).
kernel void gemm_simdgroup(device const float *A [[buffer(0)]], device const float *B [[buffer(1)]],
                           device float *C [[buffer(2)]], constant uint3 &mnk [[buffer(3)]],
                           uint2 block [[threadgroup_position_in_grid]]) {
    uint N = mnk.y, K = mnk.z;
    simdgroup_float8x8 acc = make_filled_simdgroup_matrix<float, 8, 8>(0.0);
    simdgroup_float8x8 a, b;
    for (uint k = 0; k < K; k += 8) {
        simdgroup_load(a, A + block.y * 8 * K + k, K);
        simdgroup_load(b, B + k * N + block.x * 8, N);
        simdgroup_multiply_accumulate(acc, a, b, acc);
    }
    simdgroup_store(acc, C + block.y * 8 * N + block.x * 8, N);
}

// Histogram of bytes: per-threadgroup counts with threadgroup atomics, then device atomics.
kernel void histogram(device const uint *data [[buffer(0)]], device atomic_uint *bins [[buffer(1)]],
                      constant uint &n [[buffer(2)]],
                      uint gid [[thread_position_in_grid]],
                      uint lid [[thread_index_in_threadgroup]],
                      uint tgsize [[threads_per_threadgroup]]) {
    threadgroup atomic_uint local[256];
    for (uint i = lid; i < 256; i += tgsize)
        atomic_store_explicit(&local[i], 0u, memory_order_relaxed);
    threadgroup_barrier(mem_flags::mem_threadgroup);
    if (gid < n) atomic_fetch_add_explicit(&local[data[gid]], 1u, memory_order_relaxed);
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (uint i = lid; i < 256; i += tgsize) {
        uint c = atomic_load_explicit(&local[i], memory_order_relaxed);
        if (c) atomic_fetch_add_explicit(&bins[i], c, memory_order_relaxed);
    }
}

// A template instantiated twice under host names.
template <typename T>
kernel void axpy(device const T *x [[buffer(0)]], device T *y [[buffer(1)]],
                 constant float &alpha [[buffer(2)]], uint i [[thread_position_in_grid]]) {
    y[i] = T(alpha) * x[i] + y[i];
}
template [[host_name("axpy_f32")]] kernel void axpy<float>(device const float *, device float *,
                                                          constant float &, uint);
template [[host_name("axpy_i32")]] kernel void axpy<int>(device const int *, device int *,
                                                        constant float &, uint);

// Reverse each threadgroup's slice through dynamic threadgroup memory.
kernel void reverse_tg(device const float *x [[buffer(0)]], device float *out [[buffer(1)]],
                       threadgroup float *tile [[threadgroup(0)]],
                       uint gid [[thread_position_in_grid]],
                       uint lid [[thread_index_in_threadgroup]],
                       uint n [[threads_per_threadgroup]]) {
    tile[lid] = x[gid];
    threadgroup_barrier(mem_flags::mem_threadgroup);
    out[gid] = tile[n - 1 - lid];
}

// 3-D grid: out[z][y][x] = x + 100 y + 10000 z (only inside the (nx, ny, nz) box).
kernel void index3d(device float *out [[buffer(0)]], constant uint3 &dims [[buffer(1)]],
                    uint3 p [[thread_position_in_grid]]) {
    if (p.x < dims.x && p.y < dims.y && p.z < dims.z)
        out[(p.z * dims.y + p.y) * dims.x + p.x] = p.x + 100 * p.y + 10000 * p.z;
}

// 2-D transpose through a threadgroup tile (any threadgroup shape up to 32 x 32).
kernel void transpose_tg(device const float *x [[buffer(0)]], device float *out [[buffer(1)]],
                         constant uint2 &shape [[buffer(2)]],
                         uint2 gid [[thread_position_in_grid]],
                         uint2 lid [[thread_position_in_threadgroup]]) {
    threadgroup float tile[32][33];
    uint rows = shape.y, cols = shape.x;
    bool inside = gid.x < cols && gid.y < rows;
    tile[lid.y][lid.x] = inside ? x[gid.y * cols + gid.x] : 0.0;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    if (inside) out[gid.x * rows + gid.y] = tile[lid.y][lid.x];
}

// The missing barrier: read the left neighbour's value without waiting for it.
kernel void shift_no_barrier(device const float *x [[buffer(0)]], device float *out [[buffer(1)]],
                             uint gid [[thread_position_in_grid]],
                             uint lid [[thread_index_in_threadgroup]]) {
    threadgroup float tile[256];
    tile[lid] = x[gid];
    // threadgroup_barrier(mem_flags::mem_threadgroup);   <- forgotten
    out[gid] = lid > 0 ? tile[lid - 1] : 0.0;
}

kernel void shift_barrier(device const float *x [[buffer(0)]], device float *out [[buffer(1)]],
                          uint gid [[thread_position_in_grid]],
                          uint lid [[thread_index_in_threadgroup]]) {
    threadgroup float tile[256];
    tile[lid] = x[gid];
    threadgroup_barrier(mem_flags::mem_threadgroup);
    out[gid] = lid > 0 ? tile[lid - 1] : 0.0;
}

// Threads that return before the barrier: a bug on a GPU.
kernel void early_return(device float *out [[buffer(0)]],
                         uint lid [[thread_index_in_threadgroup]]) {
    threadgroup float tile[64];
    if (lid >= 16) return;
    tile[lid] = lid;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    out[lid] = tile[15 - lid];
}

kernel void big_tile(device float *out [[buffer(0)]], uint lid [[thread_index_in_threadgroup]]) {
    threadgroup float tile[9000];   // 36000 bytes > 32 KiB
    tile[lid] = 1.0;
    out[lid] = tile[lid];
}
"""


@pytest.fixture(scope="module")
def lib():
    return M.compile(SRC, "test_sim_kernels.metal")


@pytest.fixture(params=ORDERS)
def order(request, monkeypatch):
    monkeypatch.setenv("CAMEL_SIM_ORDER", request.param)
    return request.param


def dev(a):
    return M.DeviceArray.from_numpy(np.ascontiguousarray(a))


def run(fn, *args, **kw):
    fn(*args, **kw)
    M.synchronize()


rng = np.random.default_rng(0)


@pytest.mark.parametrize("n4", [1, 33, 1000])
def test_float4_add(lib, order, n4):
    a, b = rng.standard_normal(4 * n4, np.float32), rng.standard_normal(4 * n4, np.float32)
    out = M.DeviceArray.zeros((4 * n4,))
    run(lib.function("add_f4"), dev(a), dev(b), out, threads=n4, threads_per_threadgroup=64)
    np.testing.assert_array_equal(out.numpy(), a + b)


@pytest.mark.parametrize("n,tpg", [(1, 32), (1000, 256), (4097, 1024), (77, 96)])
def test_two_level_reduction(lib, order, n, tpg):
    x = rng.standard_normal(n, np.float32)
    groups = -(-n // tpg)
    out = M.DeviceArray.zeros((groups,))
    run(
        lib.function("reduce_sum"), dev(x), out, n, threadgroups=groups, threads_per_threadgroup=tpg
    )
    xs = np.zeros(groups * tpg, np.float32)
    xs[:n] = x
    np.testing.assert_allclose(out.numpy(), xs.reshape(groups, tpg).sum(1), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("m,n,k", [(1, 1, 1), (33, 47, 65), (64, 32, 16)])
def test_tiled_gemm(lib, order, m, n, k):
    a, b = rng.standard_normal((m, k), np.float32), rng.standard_normal((k, n), np.float32)
    c = M.DeviceArray.zeros((m, n))
    mnk = np.array([m, n, k, 0], np.uint32)  # uint3 is 16 bytes in MSL
    # Whole 16 x 16 threadgroups: every thread helps load the tiles.
    run(lib.function("gemm_tiled"), dev(a), dev(b), c, mnk,
        threadgroups=(-(-n // 16), -(-m // 16)), threads_per_threadgroup=(16, 16))  # fmt: skip
    np.testing.assert_allclose(c.numpy(), a @ b, rtol=1e-4, atol=1e-4)


def test_nan_poison_shows_tiles_nobody_loaded(lib):
    # The same GEMM with dispatchThreads: the edge threadgroups are partial, so nobody
    # loads part of their tiles. On a GPU those entries hold garbage; in the simulator
    # they hold NaN, and the NaN shows up exactly in the edge blocks of C.
    m, n, k = 33, 47, 65
    a, b = rng.standard_normal((m, k), np.float32), rng.standard_normal((k, n), np.float32)
    c = M.DeviceArray.zeros((m, n))
    mnk = np.array([m, n, k, 0], np.uint32)
    run(lib.function("gemm_tiled"), dev(a), dev(b), c, mnk,
        threads=(n, m), threads_per_threadgroup=(16, 16))  # fmt: skip
    bad = np.isnan(c.numpy())
    assert bad[32:, :].all() and bad[:, 32:].all()  # the partial groups' rows and columns
    assert not bad[:32, :32].any()
    np.testing.assert_allclose(c.numpy()[:32, :32], (a @ b)[:32, :32], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("m,n,k", [(8, 8, 8), (24, 40, 16)])
def test_simdgroup_matrix_gemm(lib, order, m, n, k):
    a, b = rng.standard_normal((m, k), np.float32), rng.standard_normal((k, n), np.float32)
    c = M.DeviceArray.zeros((m, n))
    mnk = np.array([m, n, k, 0], np.uint32)
    run(lib.function("gemm_simdgroup"), dev(a), dev(b), c, mnk,
        threadgroups=(n // 8, m // 8), threads_per_threadgroup=32)  # fmt: skip
    np.testing.assert_allclose(c.numpy(), a @ b, rtol=1e-4, atol=1e-4)


def test_atomics_histogram(lib, order):
    n = 5000
    data = rng.integers(0, 256, n).astype(np.uint32)
    bins = M.DeviceArray.zeros((256,), np.uint32)
    run(lib.function("histogram"), dev(data), bins, n, threads=n, threads_per_threadgroup=100)
    np.testing.assert_array_equal(bins.numpy(), np.bincount(data, minlength=256))


def test_templated_kernels_with_host_names(lib, order):
    x, y = rng.standard_normal(100, np.float32), rng.standard_normal(100, np.float32)
    yd = dev(y)
    run(lib.function("axpy_f32"), dev(x), yd, 2.5, threads=100, threads_per_threadgroup=32)
    np.testing.assert_allclose(yd.numpy(), 2.5 * x + y, rtol=1e-6)
    xi, yi = np.arange(100, dtype=np.int32), np.full(100, 7, np.int32)
    yid = dev(yi)
    run(lib.function("axpy_i32"), dev(xi), yid, 3.0, threads=100, threads_per_threadgroup=32)
    np.testing.assert_array_equal(yid.numpy(), 3 * xi + 7)


@pytest.mark.parametrize("tpg", [1, 7, 64, 1000])
def test_dynamic_threadgroup_memory(lib, order, tpg):
    groups = 3
    x = rng.standard_normal(groups * tpg, np.float32)
    out = M.DeviceArray.zeros((groups * tpg,))
    run(lib.function("reverse_tg"), dev(x), out, threadgroups=groups,
        threads_per_threadgroup=tpg, threadgroup_memory=[4 * tpg])  # fmt: skip
    np.testing.assert_array_equal(out.numpy(), x.reshape(groups, tpg)[:, ::-1].ravel())


@pytest.mark.parametrize("tpg", [(4, 4, 4), (5, 3, 2), (1, 1, 1)])
def test_3d_grid(lib, order, tpg):
    dims = (11, 6, 5)
    out = M.DeviceArray.zeros(dims[::-1])
    run(lib.function("index3d"), out, np.array([*dims, 0], np.uint32),
        threads=dims, threads_per_threadgroup=tpg)  # fmt: skip
    z, y, x = np.indices(dims[::-1])
    np.testing.assert_array_equal(out.numpy(), x + 100 * y + 10000 * z)


@pytest.mark.parametrize("tpg", [(32, 32), (7, 3), (16, 5)])
@pytest.mark.parametrize("grid", ["threads", "threadgroups"])
def test_2d_uneven_threadgroups(lib, order, tpg, grid):
    rows, cols = 37, 29
    x = rng.standard_normal((rows, cols), np.float32)
    out = M.DeviceArray.zeros((cols, rows))
    shape = np.array([cols, rows], np.uint32)
    if grid == "threads":  # partial edge threadgroups
        kw = {"threads": (cols, rows)}
    else:  # whole threadgroups covering the matrix; the kernel checks bounds
        kw = {"threadgroups": (-(-cols // tpg[0]), -(-rows // tpg[1]))}
    run(lib.function("transpose_tg"), dev(x), out, shape, threads_per_threadgroup=tpg, **kw)
    np.testing.assert_array_equal(out.numpy(), x.T)


def test_missing_barrier_is_caught_by_reverse_and_random(lib, monkeypatch):
    x = np.arange(1, 257, dtype=np.float32)
    expect = np.concatenate([[0], x[:-1]])
    results = {}
    for order in ORDERS:
        monkeypatch.setenv("CAMEL_SIM_ORDER", order)
        for name in ("shift_no_barrier", "shift_barrier"):
            out = M.DeviceArray.zeros((256,))
            run(lib.function(name), dev(x), out, threadgroups=1, threads_per_threadgroup=256)
            results[order, name] = out.numpy().copy()
        np.testing.assert_array_equal(results[order, "shift_barrier"], expect)
    # Forward order happens to run the left neighbour first, so the bug hides...
    np.testing.assert_array_equal(results["forward", "shift_no_barrier"], expect)
    # ...reverse and random order read threadgroup memory before it is written: NaN.
    assert np.isnan(results["reverse", "shift_no_barrier"][1:]).all()
    assert np.isnan(results["random", "shift_no_barrier"]).any()


# A SIMD-group function synchronises the 32 lanes of its SIMD group, never the threadgroup:
# each kernel writes t[lid], calls one, then reads t[63 - lid], which a thread of the *other*
# SIMD group wrote. Only the `_barrier` variant is correct.
SIMD_RACE_SRC = r"""
#include <metal_stdlib>
using namespace metal;
#define PROBE(NAME, SYNC)                                                            \
kernel void NAME(device float *out [[buffer(0)]], uint lid [[thread_index_in_threadgroup]]) { \
    threadgroup float t[64];                                                         \
    t[lid] = float(lid);                                                             \
    float s = 0.0;                                                                   \
    SYNC;                                                                            \
    out[lid] = t[63 - lid] + s;                                                      \
}
PROBE(race_simd_sum, s = simd_sum(1.0) - 32.0)
PROBE(race_simd_shuffle, s = simd_shuffle_down(float(lid), 1) * 0.0)
PROBE(race_simdgroup_barrier, simdgroup_barrier(mem_flags::mem_threadgroup))
PROBE(race_fixed, s = simd_sum(1.0) - 32.0; threadgroup_barrier(mem_flags::mem_threadgroup))
"""


@pytest.mark.parametrize("sync", ["simd_sum", "simd_shuffle", "simdgroup_barrier"])
def test_simd_function_is_no_threadgroup_barrier(monkeypatch, sync):
    lib = M.compile(SIMD_RACE_SRC, "simd_race.metal")
    expect = np.arange(63, -1, -1, dtype=np.float32)
    for order in ORDERS:
        monkeypatch.setenv("CAMEL_SIM_ORDER", order)
        out = M.DeviceArray.zeros((64,))
        run(lib.function("race_fixed"), out, threadgroups=1, threads_per_threadgroup=64)
        np.testing.assert_array_equal(out.numpy(), expect)
        run(lib.function(f"race_{sync}"), out, threadgroups=1, threads_per_threadgroup=64)
        got = out.numpy()
        # The SIMD group that runs first reads the other one's slots before they are written.
        first = slice(0, 32) if order == "forward" else slice(32, 64)
        if order != "random":
            assert np.isnan(got[first]).all(), (order, got)
            np.testing.assert_array_equal(np.delete(got, first), np.delete(expect, first))
        else:
            assert np.isnan(got).any(), got


# The lanes of one SIMD group do not run in lockstep around simdgroup_matrix operations,
# and Metal does not say which lane moves which element of a simdgroup_load/store: the
# simulator treats each as the SIMD group's access of the whole block, and a store's values
# land at the SIMD group's next barrier (the block reads NaN until then). Each probe moves
# 8x8 matrices through threadgroup memory; only the `_fixed` variants (with the
# simdgroup_barrier) are correct, and each race shows in every order.
LANE_RACE_SRC = r"""
#include <metal_stdlib>
using namespace metal;
#define BARRIER simdgroup_barrier(mem_flags::mem_threadgroup)

// store, then read elements lane and lane + 32 (held by other lanes): read-after-write
#define STORE_READ(NAME, SYNC)                                                           \
kernel void NAME(device const float *x [[buffer(0)]], device float *out [[buffer(1)]],    \
                 ushort lane [[thread_index_in_simdgroup]]) {                             \
    threadgroup float t[64];                                                              \
    simdgroup_float8x8 m;                                                                 \
    simdgroup_load(m, x);                                                                 \
    simdgroup_store(m, t, 8);                                                             \
    SYNC;                                                                                 \
    out[lane] = t[lane];                                                                  \
    out[lane + 32] = t[lane + 32];                                                        \
}
STORE_READ(store_read_race, )
STORE_READ(store_read_fixed, BARRIER)

// store, then load back transposed: read-after-write through simdgroup_load
#define STORE_LOAD(NAME, SYNC)                                                           \
kernel void NAME(device const float *x [[buffer(0)]], device float *out [[buffer(1)]]) { \
    threadgroup float t[64];                                                              \
    simdgroup_float8x8 m;                                                                 \
    simdgroup_load(m, x);                                                                 \
    simdgroup_store(m, t, 8);                                                             \
    SYNC;                                                                                 \
    simdgroup_load(m, t, 8, ulong2(0, 0), true);                                          \
    simdgroup_store(m, out);                                                              \
}
STORE_LOAD(store_load_race, )
STORE_LOAD(store_load_fixed, BARRIER)

// two matrices through one scratch, as GEMM v10/v11's edge store: without the second
// barrier a lane stores matrix 1 over elements other lanes have not read yet (write after read)
#define REUSE(NAME, SYNC)                                                                \
kernel void NAME(device const float *x [[buffer(0)]], device float *out [[buffer(1)]],    \
                 ushort lane [[thread_index_in_simdgroup]]) {                             \
    threadgroup float t[64];                                                              \
    for (uint k = 0; k < 2; k++) {                                                        \
        simdgroup_float8x8 m;                                                             \
        simdgroup_load(m, x + 64 * k);                                                    \
        simdgroup_store(m, t, 8);                                                         \
        BARRIER;                                                                          \
        out[64 * k + lane] = t[lane];                                                     \
        out[64 * k + lane + 32] = t[lane + 32];                                           \
        SYNC;                                                                             \
    }                                                                                     \
}
REUSE(reuse_race, )
REUSE(reuse_fixed, BARRIER)
"""


def _owner(row, col):
    """The lane that holds element (row, col) of an 8x8 simdgroup_matrix on Apple GPUs
    (the layout in shim/sim/include/camel_sim_simd.h, spelt independently)."""
    for lane in range(32):
        q = lane // 4
        if (q & 4) + (lane // 2) % 4 == row and (q & 2) * 2 + (lane % 2) * 2 in (col, col - 1):
            return lane
    raise AssertionError((row, col))


@pytest.mark.parametrize("probe", ["store_read", "store_load", "reuse"])
def test_simdgroup_matrix_lanes_do_not_run_in_lockstep(monkeypatch, probe):
    lib = M.compile(LANE_RACE_SRC, "lane_race.metal")
    x = np.arange(1, 129, dtype=np.float32).reshape(2, 8, 8)
    n = 128 if probe == "reuse" else 64
    expect = {"store_read": x[0], "store_load": x[0].T, "reuse": x}[probe].reshape(-1)
    for order in ORDERS:
        monkeypatch.setenv("CAMEL_SIM_ORDER", order)
        out = M.DeviceArray.zeros((n,))
        run(lib.function(f"{probe}_fixed"), dev(x), out, threadgroups=1, threads_per_threadgroup=32)
        np.testing.assert_array_equal(out.numpy(), expect, err_msg=order)
        race = lib.function(f"{probe}_race")
        if probe == "store_load":  # a load of the block the SIMD group stored: an error
            race(dev(x), out, threadgroups=1, threads_per_threadgroup=32)
            want = r"'store_load_race'.*simdgroup_load at line \d+ reads a block that "
            with pytest.raises(M.MetalError, match=want + "simdgroup_store at line"):
                M.synchronize()
            continue
        run(race, dev(x), out, threadgroups=1, threads_per_threadgroup=32)
        got = out.numpy()
        if probe == "store_read":  # the lanes read before the store lands: all NaN
            assert np.isnan(got).all(), (order, got)
            continue
        # reuse: the first lane to run after the barrier reads its elements lane and
        # lane + 32 of matrix 0, then stores matrix 1 (NaN until the next barrier) before
        # any other lane has read: every other element of matrix 0 reads NaN.
        first = {"forward": 0, "reverse": 31}.get(order)
        ok = ~np.isnan(got[:64])
        if first is None:
            first = int(np.flatnonzero(ok)[0])
        assert list(np.flatnonzero(ok)) == [first, first + 32], (order, got)
        np.testing.assert_array_equal(got[ok.nonzero()], expect[[first, first + 32]])
        np.testing.assert_array_equal(got[64:], expect[64:], err_msg=order)


# Races inside one SIMD group that no schedule of whole lanes shows. A shuffle, a
# reduction, a ballot or a multiply lets no lane on before every lane has arrived, so all
# earlier writes are done after it here; Metal orders memory only at barriers. And Metal
# does not say which lane moves which element of a simdgroup_load/store, so a load and a
# store of one block race even when each lane here touches only its own two elements. The
# simulator treats each simdgroup_load/store as the SIMD group's access of the whole block:
# one that meets another access of it since the last barrier is an error, and a store's
# values land at the next barrier (the block reads NaN until then). `barrier` = 1 puts the
# missing simdgroup_barrier in.
BLOCK_RACE_SRC = r"""
#include <metal_stdlib>
using namespace metal;

// Lanes write t with plain stores, meet in a SIMD-group function, then load t as a block.
kernel void write_collective_load(device const float *x [[buffer(0)]],
                                  device float *out [[buffer(1)]],
                                  constant uint2 &how [[buffer(2)]],  // collective, barrier
                                  ushort lane [[thread_index_in_simdgroup]]) {
    threadgroup float t[64];
    t[lane] = x[lane];
    t[lane + 32] = x[lane + 32];
    float s = 0.0;
    if (how.x == 0) s = simd_sum(1.0) - 32.0;
    if (how.x == 1) s = simd_shuffle_xor(float(lane), 1) * 0.0;
    if (how.x == 2) s = simd_ballot(lane < 40).all() ? 0.0 : 1.0;
    if (how.x > 2) {
        simdgroup_float8x8 one(1.0f), p;
        simdgroup_multiply(p, one, one);  // how.x == 3
        s = p.thread_elements()[0] * 0.0;
    }
    if (how.y) simdgroup_barrier(mem_flags::mem_threadgroup);
    simdgroup_float8x8 m;
    simdgroup_load(m, t, 8);  // the load after the writes
    simdgroup_store(m, out, 8);
    out[64 + lane] = s;
}

// The SIMD group stores a block, the lanes meet in simd_sum, then read it with plain loads.
kernel void store_collective_read(device const float *x [[buffer(0)]],
                                  device float *out [[buffer(1)]],
                                  constant uint &barrier [[buffer(2)]],
                                  ushort lane [[thread_index_in_simdgroup]]) {
    threadgroup float t[64];
    simdgroup_float8x8 m;
    simdgroup_load(m, x);
    simdgroup_store(m, t, 8);
    float s = simd_sum(1.0) - 32.0;
    if (barrier) simdgroup_barrier(mem_flags::mem_threadgroup);
    out[lane] = t[lane] + s;
    out[lane + 32] = t[lane + 32] + s;
}

// A store, then a load of the same block in the same layout.
kernel void store_then_load(device const float *x [[buffer(0)]], device float *out [[buffer(1)]],
                            constant uint &barrier [[buffer(2)]]) {
    threadgroup float t[64];
    simdgroup_float8x8 a, b;
    simdgroup_load(a, x);
    simdgroup_store(a, t, 8);  // store: the first access
    if (barrier) simdgroup_barrier(mem_flags::mem_threadgroup);
    simdgroup_load(b, t, 8);  // load: the second
    simdgroup_store(b, out);
}

// A load, then a store of another matrix over the same block (scratch reuse, as in flash
// attention's scale_rows_exact).
kernel void load_then_store(device const float *x [[buffer(0)]], device float *out [[buffer(1)]],
                            constant uint &barrier [[buffer(2)]]) {
    threadgroup float t[64];
    simdgroup_float8x8 a, b;
    simdgroup_load(a, x);
    simdgroup_store(a, t, 8);
    simdgroup_barrier(mem_flags::mem_threadgroup);
    simdgroup_load(b, t, 8);  // load: the first access
    if (barrier) simdgroup_barrier(mem_flags::mem_threadgroup);
    simdgroup_load(a, x + 64);
    simdgroup_store(a, t, 8);  // store: the second
    simdgroup_barrier(mem_flags::mem_threadgroup);
    simdgroup_store(b, out);
    simdgroup_load(a, t, 8);
    simdgroup_store(a, out + 64);
}

// A load, then plain stores over the block.
kernel void load_then_write(device const float *x [[buffer(0)]], device float *out [[buffer(1)]],
                            constant uint &barrier [[buffer(2)]],
                            ushort lane [[thread_index_in_simdgroup]]) {
    threadgroup float t[64];
    t[lane] = x[lane];
    t[lane + 32] = x[lane + 32];
    simdgroup_barrier(mem_flags::mem_threadgroup);
    simdgroup_float8x8 m;
    simdgroup_load(m, t, 8);
    if (barrier) simdgroup_barrier(mem_flags::mem_threadgroup);
    t[lane] = 0.0;
    t[lane + 32] = 0.0;
    simdgroup_store(m, out);
}

// A store, then plain stores over the block.
kernel void store_then_write(device const float *x [[buffer(0)]], device float *out [[buffer(1)]],
                             constant uint &barrier [[buffer(2)]],
                             ushort lane [[thread_index_in_simdgroup]]) {
    threadgroup float t[64];
    simdgroup_float8x8 m;
    simdgroup_load(m, x);
    simdgroup_store(m, t, 8);
    if (barrier) simdgroup_barrier(mem_flags::mem_threadgroup);
    t[lane] = 0.0;
    simdgroup_barrier(mem_flags::mem_threadgroup);
    out[lane] = t[lane];
    out[lane + 32] = t[lane + 32];
}

// Legal without barriers: two loads of one block, a store and a load of different blocks,
// and two SIMD groups each on its own block.
kernel void no_race(device const float *x [[buffer(0)]], device float *out [[buffer(1)]],
                    ushort sg [[simdgroup_index_in_threadgroup]]) {
    threadgroup float t[2][128];
    simdgroup_float8x8 a, b;
    simdgroup_load(a, x + 64 * sg);
    simdgroup_store(a, t[sg], 8);
    simdgroup_barrier(mem_flags::mem_threadgroup);
    simdgroup_load(a, t[sg], 8);
    simdgroup_load(b, t[sg], 8, ulong2(0, 0), true);
    simdgroup_store(b, t[sg] + 64, 8);
    simdgroup_barrier(mem_flags::mem_threadgroup);
    simdgroup_store(a, out + 128 * sg);
    simdgroup_load(b, t[sg] + 64, 8);
    simdgroup_store(b, out + 128 * sg + 64);
}
"""


def line_of(src, text):
    """The 1-based line of src that contains text (once), for matching messages."""
    lines = [i + 1 for i, line in enumerate(src.splitlines()) if text in line]
    assert len(lines) == 1, (text, lines)
    return lines[0]


def run_race(lib, name, x, n, *args, tpg=32):
    out = M.DeviceArray.zeros((n,))
    run(lib.function(name), dev(x), out, *args, threadgroups=1, threads_per_threadgroup=tpg)
    return out.numpy()


COLLECTIVES = {"simd_sum": 0, "simd_shuffle_xor": 1, "simd_ballot": 2, "simdgroup_multiply": 3}


@pytest.mark.parametrize("collective", COLLECTIVES)
def test_writes_then_a_collective_then_a_block_load_is_an_error(order, collective):
    # A library of its own: in the first order the race is the first dispatch of its kernel.
    lib = M.compile(BLOCK_RACE_SRC + f"// {collective}\n", "block_race.metal")
    x = np.arange(64, dtype=np.float32) + 1
    how = COLLECTIVES[collective]
    load = line_of(BLOCK_RACE_SRC, "the load after the writes")
    call = line_of(BLOCK_RACE_SRC, f"how.x == {how}")
    with pytest.raises(
        M.MetalError,
        match=rf"kernel 'write_collective_load', threadgroup \(0, 0, 0\): SIMD group 0: "
        rf"simdgroup_load at line {load} reads element \[\d\]\[\d\] of the block \(threadgroup "
        rf"memory, byte \d+\), which a thread wrote since SIMD group 0's last barrier \(none "
        rf"since the kernel started\)\. The SIMD-group function at line {call} since that "
        rf"barrier exchanges values but does not order memory\..*simdgroup_barrier",
    ):
        run_race(lib, "write_collective_load", x, 96, np.array([how, 0], np.uint32))
    got = run_race(lib, "write_collective_load", x, 96, np.array([how, 1], np.uint32))
    np.testing.assert_array_equal(got, np.concatenate([x, np.zeros(32)]))  # with the barrier


def test_a_block_store_lands_at_the_next_barrier(order):
    lib = M.compile(BLOCK_RACE_SRC, "block_race.metal")
    x = np.arange(64, dtype=np.float32) + 1
    np.testing.assert_array_equal(run_race(lib, "store_collective_read", x, 64, np.uint32(1)), x)
    # Without the barrier every lane reads NaN, its own elements too (Metal does not say
    # which lane stores which element), though the simd_sum has met every lane's store.
    assert np.isnan(run_race(lib, "store_collective_read", x, 64, np.uint32(0))).all()


@pytest.mark.parametrize("kernel", ["store_then_load", "load_then_store"])
def test_a_block_load_and_store_of_one_block_need_a_barrier(order, kernel):
    lib = M.compile(BLOCK_RACE_SRC, "block_race.metal")
    x = np.arange(128, dtype=np.float32).reshape(2, 64) + 1
    n = 128 if kernel == "load_then_store" else 64
    np.testing.assert_array_equal(run_race(lib, kernel, x, n, np.uint32(1)), x.ravel()[:n])
    first, then = kernel.split("_then_")
    line = {first: line_of(BLOCK_RACE_SRC, f"{first}: the first")}
    line[then] = line_of(BLOCK_RACE_SRC, f"{then}: the second")
    with pytest.raises(
        M.MetalError,
        match=rf"'{kernel}'.*SIMD group 0: simdgroup_{then} at line {line[then]} (reads|writes) "
        rf"a block that simdgroup_{first} at line {line[first]} (wrote|read) since SIMD group 0's "
        r"last barrier.*Metal does not say which lane moves which element of a block: put "
        r"simdgroup_barrier\(mem_flags::mem_threadgroup\) between the two accesses",
    ):
        run_race(lib, kernel, x, n, np.uint32(0))


@pytest.mark.parametrize("kernel", ["load_then_write", "store_then_write"])
def test_plain_stores_over_a_block_access_need_a_barrier(order, kernel):
    lib = M.compile(BLOCK_RACE_SRC, "block_race.metal")
    x = np.arange(64, dtype=np.float32) + 1
    got = run_race(lib, kernel, x, 64, np.uint32(1))
    if kernel == "load_then_write":
        np.testing.assert_array_equal(got, x)
    else:  # lane i zeroed element i after the store had landed
        np.testing.assert_array_equal(got, np.where(np.arange(64) < 32, 0, x))
    what = "that simdgroup_load at line" if kernel == "load_then_write" else "after simdgroup_store"
    want = rf"'{kernel}'.*SIMD group 0: a thread wrote element \[\d\]\[\d\] of the block \("
    with pytest.raises(M.MetalError, match=want + rf"threadgroup memory, byte \d+\) {what}"):
        run_race(lib, kernel, x, 64, np.uint32(0))


def test_block_accesses_that_do_not_race_need_no_barrier(order):
    lib = M.compile(BLOCK_RACE_SRC, "block_race.metal")
    x = np.arange(128, dtype=np.float32).reshape(2, 8, 8) + 1
    got = run_race(lib, "no_race", x, 256, tpg=64).reshape(2, 2, 8, 8)
    np.testing.assert_array_equal(got[:, 0], x)
    np.testing.assert_array_equal(got[:, 1], x.transpose(0, 2, 1))


def test_partial_barrier_is_an_error(lib):
    out = M.DeviceArray.zeros((64,))
    lib.function("early_return")(out, threadgroups=2, threads_per_threadgroup=64)
    with pytest.raises(M.MetalError, match=r"'early_return'.*reached by 16 of 64 threads"):
        M.synchronize()
    M.synchronize()  # reported once; the device keeps working


def test_error_paths(lib):
    add = lib.function("add_f4")
    x = M.DeviceArray.zeros((64,))
    with pytest.raises(M.MetalError, match=r"2048 .*1024"):
        add(x, x, x, threadgroups=1, threads_per_threadgroup=(32, 64))
    with pytest.raises(M.MetalError, match=r"'add_f4' takes 3 buffer arguments"):
        add(x, x, threadgroups=1, threads_per_threadgroup=16)
    rev = lib.function("reverse_tg")
    with pytest.raises(M.MetalError, match=r"40000 bytes of threadgroup memory.*32768"):
        rev(x, x, threadgroups=1, threads_per_threadgroup=16, threadgroup_memory=[40000])
    with pytest.raises(M.MetalError, match=r"36000 bytes of threadgroup variables.*32768"):
        run(lib.function("big_tile"), x, threadgroups=1, threads_per_threadgroup=16)
    gemm = lib.function("gemm_tiled")
    with pytest.raises(M.MetalError, match=r"'gemm_tiled' parameter 3 'mnk'.*16-byte value, got 4"):
        gemm(x, x, x, 3, threads=(4, 4), threads_per_threadgroup=(4, 4))
    buf = M.DeviceArray.zeros((64,))
    buf.buffer.release()
    with pytest.raises(M.MetalError, match="released"):
        add(buf, x, x, threadgroups=1, threads_per_threadgroup=16)


def test_numpy_array_for_a_written_parameter_is_refused(lib):
    # setBytes copies: the kernel's writes to `out` would vanish without a word.
    add = lib.function("add_f4")
    x = dev(np.ones(64, np.float32))
    with pytest.raises(M.MetalError, match=r"'add_f4' parameter 2 'out'.*written by the kernel"):
        add(x, x, np.zeros(64, np.float32), threadgroups=1, threads_per_threadgroup=16)
    # Read-only (const) parameters may still take a NumPy array.
    out = M.DeviceArray.zeros((64,))
    run(add, np.ones(64, np.float32), x, out, threadgroups=1, threads_per_threadgroup=16)
    np.testing.assert_array_equal(out.numpy(), 2)


def test_buffer_offset_must_be_aligned_to_the_element_type(lib):
    # Metal: the offset of a buffer must be a multiple of the alignment of the type the
    # kernel reads through it (16 for float4).
    add = lib.function("add_f4")
    x = M.DeviceArray.zeros((80,))
    shifted = M.DeviceArray((64,), np.float32, x.buffer, offset=4)
    with pytest.raises(
        M.MetalError, match=r"'add_f4' parameter 0 'a'.*offset 4 is not a multiple of 16"
    ):
        add(shifted, x, x, threadgroups=1, threads_per_threadgroup=16)
    aligned = M.DeviceArray((64,), np.float32, x.buffer, offset=16)
    run(add, aligned, x, x, threadgroups=1, threads_per_threadgroup=16)


OVERRUN_SRC = r"""
#include <metal_stdlib>
kernel void write_at(device float *out [[buffer(0)]], constant uint &i [[buffer(1)]]) {
    out[i] = 1.0;
}
kernel void also_write_at(device float *out [[buffer(0)]], constant uint &i [[buffer(1)]]) {
    out[i] = 2.0;
}
kernel void read_at(device const float *x [[buffer(0)]], device float *y [[buffer(1)]],
                    constant uint &i [[buffer(2)]]) {
    y[0] = x[i];
}
kernel void fill(device float *out [[buffer(0)]], uint i [[thread_position_in_grid]]) {
    out[i] = float(i);
}
"""

NO_ASAN = pytest.mark.skipif(
    "address" in os.environ.get("CAMEL_SIM_SANITIZE", ""), reason="ASan reports it instead"
)


def slack_of(a):
    """The bytes of a's buffer past its length (from the next multiple of 16)."""
    return a.buffer.capacity - -(-a.nbytes // 16) * 16


@pytest.mark.parametrize("n, past", [(1000, 4), (1000, 30), (1024, 0), (5, 3)])
@NO_ASAN
def test_write_past_the_end_is_reported_with_the_kernel(n, past):
    # n floats live in a size class of more bytes (1000 floats: 4096); the kernel writes
    # element n + past: into the slack, or past the allocation (1024 floats: 4096 exactly).
    lib = M.compile(OVERRUN_SRC, "overrun.metal")
    out = M.DeviceArray.zeros((n,))
    used = -(-n * 4 // 16) * 16  # lengths are guarded from the next multiple of 16 bytes
    index = used // 4 + past
    lib.function("write_at")(out, np.uint32(index), threadgroups=1, threads_per_threadgroup=1)
    with pytest.raises(M.MetalError, match=r"'write_at' wrote past the end of argument 0 \('out'"):
        M.synchronize()
    M.synchronize()  # reported once; the guard is re-armed
    run(lib.function("write_at"), out, np.uint32(n - 1), threadgroups=1, threads_per_threadgroup=1)
    assert out.numpy()[n - 1] == 1


@NO_ASAN
@pytest.mark.parametrize(
    "n, past_bytes",
    [
        (1040, 600),  # a small buffer (4160 bytes in 5120): past the first 256 bytes of slack
        (1_250_003, 800),  # a large one (pages of its own): before the next page boundary
    ],
)
def test_write_far_into_the_slack_is_reported_when_the_command_buffer_completes(n, past_bytes):
    # Not just past the end: the whole slack up to the next page boundary is checked once per
    # command buffer, and the kernels of the command buffer that may write the buffer are named.
    lib = M.compile(OVERRUN_SRC, "overrun.metal")
    out = M.DeviceArray.zeros((n,))
    used = -(-n * 4 // 16) * 16
    assert slack_of(out) > past_bytes
    index = np.uint32((used + past_bytes) // 4)
    lib.function("write_at")(out, index, threadgroups=1, threads_per_threadgroup=1)
    with pytest.raises(
        M.MetalError,
        match=rf"'write_at' wrote past the end of argument 0 \('out'.*byte {used + past_bytes} of "
        rf"a buffer of {used} bytes changed \({past_bytes} bytes past the end\).*completed",
    ):
        M.synchronize()
    # Two kernels that write it in one command buffer, one that only reads it: both writers
    # are named, the reader is not.
    other = M.DeviceArray.zeros((4,))
    lib.function("read_at")(out, other, np.uint32(0), threadgroups=1, threads_per_threadgroup=1)
    lib.function("also_write_at")(out, np.uint32(0), threadgroups=1, threads_per_threadgroup=1)
    lib.function("write_at")(out, index, threadgroups=1, threads_per_threadgroup=1)
    with pytest.raises(M.MetalError) as e:
        M.synchronize()
    assert "kernels of the command buffer that may write it: 'also_write_at' argument 0" in str(
        e.value
    ) and "'write_at' argument 0 ('out'" in str(e.value)
    assert "read_at" not in str(e.value)
    M.synchronize()  # reported once; the guard is re-armed
    run(lib.function("write_at"), out, np.uint32(n - 1), threadgroups=1, threads_per_threadgroup=1)
    assert out.numpy()[n - 1] == 1


@NO_ASAN
@pytest.mark.parametrize("kernel", ["write_at", "read_at"])
def test_access_far_past_the_end_of_a_large_buffer_faults_naming_the_kernel(kernel):
    # 5 MB in a 5 MiB size class: 242 KB of slack, whose pages past the length fault.
    lib = M.compile(OVERRUN_SRC, "overrun.metal")
    n = 1_250_000
    out = M.DeviceArray.zeros((n,))
    far = 50_000  # elements past the end: 200 KB, still inside the allocation
    assert slack_of(out) > far * 4
    y = M.DeviceArray.zeros((1,))
    if kernel == "write_at":
        lib.function(kernel)(out, np.uint32(n + far), threadgroups=1, threads_per_threadgroup=1)
        verb, param = "wrote", "out"
    else:
        lib.function(kernel)(out, y, np.uint32(n + far), threadgroups=1, threads_per_threadgroup=1)
        verb, param = "read", "x"
    with pytest.raises(M.MetalError) as e:
        M.synchronize()
    msg = str(e.value)
    assert f"'{kernel}'" in msg
    assert f"it {verb} past the end of argument 0 ('{param}', [[buffer(0)]])" in msg
    assert f"byte {(n + far) * 4} of a buffer of {n * 4} bytes ({far * 4} bytes past" in msg
    assert "may be damaged" not in msg
    run(lib.function("fill"), out, threads=n, threads_per_threadgroup=256)
    np.testing.assert_array_equal(out.numpy()[-3:], np.arange(n - 3, n, dtype=np.float32))


@NO_ASAN
def test_a_reused_large_buffer_is_whole_for_its_new_length():
    # The cache hands a buffer of a size class to a shorter, then a longer owner: the pages
    # the shorter one left out fault, the longer one may use them all, also through .numpy().
    lib = M.compile(OVERRUN_SRC, "overrun.metal")
    short, long = 1_100_000, 1_250_000  # both in the 5 MiB class
    a = M.DeviceArray.empty((short,))
    capacity, contents = a.buffer.capacity, a.buffer.contents
    run(lib.function("fill"), a, threads=short, threads_per_threadgroup=256)
    del a
    b = M.DeviceArray.empty((long,))
    assert (b.buffer.capacity, b.buffer.contents) == (capacity, contents)  # the same storage
    run(lib.function("fill"), b, threads=long, threads_per_threadgroup=256)
    np.testing.assert_array_equal(b.numpy(), np.arange(long, dtype=np.float32))
    view = b.numpy()
    assert view.nbytes == long * 4
    view[:] = 3.0  # host writes through the view reach every byte of the new length
    lib.function("write_at")(b, np.uint32(long - 1), threadgroups=1, threads_per_threadgroup=1)
    assert b.numpy()[-2:].tolist() == [3.0, 1.0]
    del view, b
    c = M.DeviceArray.empty((short,))
    assert c.buffer.contents == contents
    lib.function("write_at")(c, np.uint32(long - 1), threadgroups=1, threads_per_threadgroup=1)
    with pytest.raises(M.MetalError, match=r"'write_at'.*it wrote past the end of argument 0"):
        M.synchronize()


@NO_ASAN
def test_a_view_kept_past_release_that_touches_protected_slack_is_named():
    # Buffer.release() with a NumPy view still alive, the storage reused by a shorter owner:
    # the view's last bytes lie in pages that now fault. Python dies (a subprocess), but
    # the simulator says why first.
    import subprocess

    script = textwrap.dedent("""
        import camel.metal as M
        a = M.DeviceArray.zeros((1_250_000,))
        view = a.numpy()
        a.buffer.release()
        b = M.DeviceArray.zeros((1_100_000,))
        view[-1] = 1.0
        print("not caught")
    """)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert r.returncode != 0 and "not caught" not in r.stdout, r.stdout + r.stderr
    assert (
        "[sim] the host touched byte 4999996 of a buffer of 4400000 bytes, 599996 bytes past its "
        "length, in the slack pages the simulator protects: a NumPy view or ctypes pointer kept "
        "after Buffer.release()?"
    ) in r.stderr, r.stderr


@pytest.mark.parametrize("k", [None, 3])
def test_misaligned_float4_store_is_reported_as_misaligned(k):
    """A float4 store 4 bytes past a 16-byte boundary: the error names the kernel, says
    "misaligned" and gives the address, which x86-64 does not report (the simulator decodes
    the faulting instruction's operand: a constant offset, and one indexed by a uint)."""
    index = "0" if k is None else "k + i"  # the indexed store: [base + index] (a SIB byte)
    lib = M.compile(
        textwrap.dedent(f"""
        #include <metal_stdlib>
        using namespace metal;
        kernel void misaligned(device float *p [[buffer(0)]], constant uint &k [[buffer(1)]],
                               uint i [[thread_position_in_grid]]) {{
            device float4 *q = (device float4 *)(p + 1);   // 4 bytes past 16-aligned
            q[{index}] = float4(1.0);
        }}""")
    )
    out = M.DeviceArray.zeros((16,))
    lib.function("misaligned")(out, k or 0, threads=1, threads_per_threadgroup=1)
    address = out.buffer.contents + 4 + 16 * (k or 0)
    with pytest.raises(
        M.MetalError,
        match=rf"'misaligned'.*at {hex(address)}\); a misaligned vector access: the address is "
        r"4 bytes past a multiple of 16",
    ):
        M.synchronize()


GAPS_SRC = r"""
#include <metal_stdlib>
using namespace metal;

// Lane i joins the simd_sum only from iteration i on. A GPU runs iteration j with
// lanes 0..j active, each adding j: lane 1 gets 1*2 + 2*3 + 3*4 = 20. The simulator
// cannot tell iterations apart at one call site and merges lanes that are in
// different iterations.
kernel void loop_divergent(device float *out [[buffer(0)]],
                           uint lane [[thread_index_in_simdgroup]]) {
    float total = 0.0;
    for (uint j = 0; j < 4; j++)
        if (j >= lane) total += simd_sum(float(j));
    out[lane] = total;
}

// Relies on the 32 lanes of a SIMD group running in lockstep: lane i reads what
// lane i+1 wrote without any barrier. Works on Apple GPUs by accident of the
// hardware; in the simulator (one lane after the other) lane i reads NaN.
kernel void implicit_lockstep(device float *out [[buffer(0)]],
                              uint lane [[thread_index_in_simdgroup]]) {
    threadgroup float tile[32];
    tile[lane] = lane;
    out[lane] = tile[(lane + 1) % 32];
}

// Every thread adds 1 to one threadgroup float without an atomic: on a GPU updates get
// lost; in the simulator a thread runs uninterrupted between blocking points, so each
// += runs whole and the count is always right.
kernel void lost_updates(device float *out [[buffer(0)]],
                         uint lid [[thread_index_in_threadgroup]]) {
    threadgroup float count;
    if (lid == 0) count = 0.0;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    count += 1.0;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    if (lid == 0) out[0] = count;
}

// Lanes write t with plain stores, meet in a simd_sum, and read each other's slot with no
// simdgroup_barrier: a race on a GPU (the simd_sum orders no memory). The simulator cannot
// see plain loads and stores one by one, and the simd_sum lets no lane on before every lane
// has stored, so every lane reads its neighbour's value.
kernel void collective_orders_plain_memory(device float *out [[buffer(0)]],
                                           ushort lane [[thread_index_in_simdgroup]]) {
    threadgroup float t[32];
    t[lane] = lane;
    float s = simd_sum(1.0) - 32.0;
    out[lane] = t[lane ^ 1] + s;
}

// Lanes read t, meet in a simd_sum, then the SIMD group stores a block over t with no
// simdgroup_barrier: a race on a GPU; here every read is done before the store begins.
kernel void read_collective_store(device const float *x [[buffer(0)]],
                                  device float *out [[buffer(1)]],
                                  ushort lane [[thread_index_in_simdgroup]]) {
    threadgroup float t[64];
    t[lane] = x[lane];
    t[lane + 32] = x[lane + 32];
    simdgroup_barrier(mem_flags::mem_threadgroup);
    float a = t[(lane + 1) % 32], b = t[lane + 32];
    float s = simd_sum(1.0) - 32.0;
    simdgroup_float8x8 m = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
    simdgroup_store(m, t, 8);
    out[lane] = a + s;
    out[lane + 32] = b;
}

// Half the lanes return before a simdgroup_store: undefined on a GPU (it needs all 32);
// here no error, and the missing lanes' elements are NaN (the store's mark until it lands).
kernel void store_after_return(device float *out [[buffer(0)]],
                               ushort lane [[thread_index_in_simdgroup]]) {
    simdgroup_float8x8 m = make_filled_simdgroup_matrix<float, 8, 8>(1.0f);
    if (lane >= 16) return;
    simdgroup_store(m, out);
}

// Lanes pass different pointers to one simdgroup_load (Apple requires the arguments to
// be the same in every lane; the result is undefined): here each lane loads its own two
// elements from its own pointer.
kernel void non_uniform_load(device const float *x [[buffer(0)]],
                             device float *out [[buffer(1)]],
                             ushort lane [[thread_index_in_simdgroup]]) {
    simdgroup_float8x8 m;
    simdgroup_load(m, x + (lane % 2) * 64);
    simdgroup_store(m, out);
}

"""


def test_known_gap_loop_divergent_simd_op():
    lib = M.compile(GAPS_SRC, "gaps.metal")
    out = M.DeviceArray.zeros((32,))
    run(lib.function("loop_divergent"), out, threadgroups=1, threads_per_threadgroup=32)
    got = out.numpy()
    gpu = [0 + 2 + 6 + 12, 2 + 6 + 12, 6 + 12, 12]  # sum over j >= lane of j * (j + 1)
    # Phase 1: lane i waits in iteration i, all four at the one call site: 0+1+2+3 = 6.
    # Phase 2: lanes 0, 1, 2 in iterations 1, 2, 3: 6. Phase 3: 2 + 3 = 5. Phase 4: 3.
    sim = [6 + 6 + 5 + 3, 6 + 6 + 5, 6 + 6, 6]
    np.testing.assert_array_equal(got[:4], sim)
    assert list(got[:4]) != gpu  # the documented gap: not what a GPU computes
    np.testing.assert_array_equal(got[4:], 0)


def test_known_gap_implicit_lockstep(monkeypatch):
    # What the simulator computes depends on its schedule; in forward order every
    # thread reads its neighbour's slot before the neighbour wrote it.
    monkeypatch.setenv("CAMEL_SIM_ORDER", "forward")
    lib = M.compile(GAPS_SRC, "gaps.metal")
    out = M.DeviceArray.zeros((32,))
    run(lib.function("implicit_lockstep"), out, threadgroups=1, threads_per_threadgroup=32)
    got = out.numpy()
    assert np.isnan(got[:31]).all() and got[31] == 0  # lockstep would give 1, 2, ..., 31, 0


def test_known_gap_non_atomic_update_is_never_lost(order):
    lib = M.compile(GAPS_SRC, "gaps.metal")
    out = M.DeviceArray.zeros((1,))
    run(lib.function("lost_updates"), out, threadgroups=1, threads_per_threadgroup=256)
    assert out.numpy()[0] == 256  # a GPU may well give less


def test_known_gap_collectives_order_plain_memory_inside_a_simd_group(order):
    lib = M.compile(GAPS_SRC, "gaps.metal")
    out = M.DeviceArray.zeros((32,))
    run(lib.function("collective_orders_plain_memory"), out, threadgroups=1,
        threads_per_threadgroup=32)  # fmt: skip
    np.testing.assert_array_equal(out.numpy(), np.arange(32) ^ 1)  # a GPU may read stale slots


def test_known_gap_reads_then_a_collective_then_a_block_store(order):
    lib = M.compile(GAPS_SRC, "gaps.metal")
    x = np.arange(64, dtype=np.float32) + 1
    out = M.DeviceArray.zeros((64,))
    run(lib.function("read_collective_store"), dev(x), out, threadgroups=1,
        threads_per_threadgroup=32)  # fmt: skip
    # every lane read before the store began; a GPU may store over a slot not yet read
    np.testing.assert_array_equal(out.numpy(), np.concatenate([np.roll(x[:32], -1), x[32:]]))


def test_known_gap_simdgroup_store_after_an_early_return_is_no_error(order):
    lib = M.compile(GAPS_SRC, "gaps.metal")
    out = M.DeviceArray.zeros((8, 8))
    run(lib.function("store_after_return"), out, threadgroups=1, threads_per_threadgroup=32)
    want = np.array([[_owner(r, c) < 16 for c in range(8)] for r in range(8)], np.float32)
    np.testing.assert_array_equal(out.numpy(), np.where(want == 1, 1, np.nan))  # rows 4-7 NaN


def test_known_gap_non_uniform_simdgroup_load_is_no_error(order):
    lib = M.compile(GAPS_SRC, "gaps.metal")
    x = np.arange(128, dtype=np.float32).reshape(2, 8, 8)
    out = M.DeviceArray.zeros((8, 8))
    run(lib.function("non_uniform_load"), dev(x), out, threadgroups=1, threads_per_threadgroup=32)
    odd = np.array([[_owner(r, c) % 2 for c in range(8)] for r in range(8)])
    np.testing.assert_array_equal(out.numpy(), np.where(odd == 1, x[1], x[0]))


ASAN_SCRIPT = """
import sys, numpy as np, camel.metal as M
lib = M.compile('''
#include <metal_stdlib>
kernel void oob(device float *out [[buffer(0)]], uint i [[thread_position_in_grid]]) {
    out[i + 1] = 1.0;   // the last thread writes one past the end
}''')
n = int(sys.argv[1])
out = M.DeviceArray.zeros((n,))
lib.function("oob")(out, threads=n, threads_per_threadgroup=64)
M.synchronize()
print("no error")
"""


# 1024 floats fill their size class (4096 bytes): the write lands past the allocation.
# 1000 floats live in a 4096-byte block too: the write lands in its poisoned slack.
@pytest.mark.skipif(sys.platform != "linux", reason="LD_PRELOAD recipe for Linux")
@pytest.mark.parametrize("n, report", [(1024, "heap-buffer-overflow"), (1000, "use-after-poison")])
def test_address_sanitizer_catches_out_of_bounds_write(n, report):
    r = run_under_asan(ASAN_SCRIPT, str(n), timeout=300)
    assert "no error" not in r.stdout
    assert report in r.stderr, r.stderr[-3000:]
    assert "WRITE of size 4" in r.stderr


def test_printf_in_kernel(capfd):
    lib = M.compile(
        textwrap.dedent("""
        #include <metal_stdlib>
        kernel void hello(uint i [[thread_position_in_grid]]) {
            printf("thread %u says hi\\n", i);
        }""")
    )
    run(lib.function("hello"), threads=3, threads_per_threadgroup=3)
    lines = sorted(capfd.readouterr().out.splitlines())
    assert lines == [f"thread {i} says hi" for i in range(3)]


def test_printf_in_kernel_with_barriers_and_simd_functions(capfd):
    # Fibers run printf on their own small stacks: a float conversion must fit there.
    lib = M.compile(
        textwrap.dedent("""
        #include <metal_stdlib>
        using namespace metal;
        kernel void partials(device float *out [[buffer(0)]],
                             uint i [[thread_position_in_grid]],
                             uint lane [[thread_index_in_simdgroup]],
                             uint sg [[simdgroup_index_in_threadgroup]]) {
            threadgroup float partial[32];
            float v = simd_sum(float(i));
            if (lane == 0) { printf("group %u partial %f\\n", sg, v); partial[sg] = v; }
            threadgroup_barrier(mem_flags::mem_threadgroup);
            out[i] = partial[0];
        }""")
    )
    out = M.DeviceArray.zeros((1024,))
    run(lib.function("partials"), out, threadgroups=1, threads_per_threadgroup=1024)
    lines = sorted(capfd.readouterr().out.splitlines())
    expected = sorted(f"group {g} partial {sum(range(32 * g, 32 * g + 32)):.6f}" for g in range(32))
    assert lines == expected
    np.testing.assert_array_equal(out.numpy(), sum(range(32)))
