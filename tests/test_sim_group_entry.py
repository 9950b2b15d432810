"""The simulator's group entries: a barrier-free kernel (no barrier, SIMD-group function or
`threadgroup` variable) runs a whole threadgroup as loops generated into its own library
(shim/front/translate_rewrite.cpp, group_entry), so clang can vectorise across threads. These
tests check that nothing changed for the kernel: the threads still run one after the other
in CAMEL_SIM_ORDER's order, every builtin has the value the per-thread path gives it, and a
crash still names the thread."""

import numpy as np
import pytest

import camel.metal as M

if not M.is_simulator():
    pytest.skip("simulator only", allow_module_level=True)

ORDERS = ["forward", "reverse", "random"]

SRC = r"""
#include <metal_stdlib>
using namespace metal;

// Which turn each thread had: the order the threads of the group ran in.
kernel void turn(device atomic_uint *counter [[buffer(0)]], device uint *out [[buffer(1)]],
                 uint lid [[thread_index_in_threadgroup]]) {
    out[lid] = atomic_fetch_add_explicit(counter, 1u, memory_order_relaxed);
}

// Thread i reads what thread i - 1 wrote (a race on a GPU; here the order decides).
kernel void chain(device float *x [[buffer(0)]], uint i [[thread_position_in_grid]]) {
    x[i + 1] = x[i] + 1.0;
}

#define BUILTINS                                                                        \
    uint3 gid [[thread_position_in_grid]], ushort3 lid [[thread_position_in_threadgroup]], \
    uint3 tgid [[threadgroup_position_in_grid]], uint3 tpg [[threads_per_threadgroup]],   \
    uint3 dtpg [[dispatch_threads_per_threadgroup]], uint2 ntg [[threadgroups_per_grid]], \
    uint3 grid [[threads_per_grid]], uint tid [[thread_index_in_threadgroup]],            \
    ushort lane [[thread_index_in_simdgroup]], uint sg [[simdgroup_index_in_threadgroup]], \
    uint nsg [[simdgroups_per_threadgroup]], uint width [[threads_per_simdgroup]],        \
    uint qlane [[thread_index_in_quadgroup]], uint quad [[quadgroup_index_in_threadgroup]], \
    uint nquad [[quadgroups_per_threadgroup]], uint xgid [[thread_position_in_grid]]
#define WRITE_BUILTINS                                                                  \
    uint at = ((gid.z * grid.y + gid.y) * grid.x + gid.x) * 24;                         \
    uint v[24] = {gid.x, gid.y, gid.z, lid.x, lid.y, lid.z, tgid.x, tgid.y, tgid.z,      \
                  tpg.x * 10000 + tpg.y * 100 + tpg.z, dtpg.x * 10000 + dtpg.y * 100 + dtpg.z, \
                  ntg.x * 100 + ntg.y, grid.x * 10000 + grid.y * 100 + grid.z, tid, lane, sg, \
                  nsg, width, qlane, quad, nquad, xgid, 0, 0};                     \
    for (uint k = 0; k < 24; k++) out[at + k] = v[k];

// The same kernel twice: the second has a threadgroup variable, so it takes the per-thread
// path (one call per thread with its camel_sim_thread), the reference.
// (No variable named simd_* or quad_*: the translator would take it for a SIMD-group function.)
kernel void builtins(device uint *out [[buffer(0)]], BUILTINS) { WRITE_BUILTINS }
kernel void builtins_per_thread(device uint *out [[buffer(0)]], BUILTINS) {
    threadgroup uint unused[1];
    (void)unused;
    WRITE_BUILTINS
}
// And on fibers (a SIMD-group function), whose threads keep their fields from one
// threadgroup to the next of the same shape and move only their positions.
kernel void builtins_fibers(device uint *out [[buffer(0)]], BUILTINS) {
    simdgroup_barrier(mem_flags::mem_none);
    WRITE_BUILTINS
}

kernel void crash_at(device float *out [[buffer(0)]], uint i [[thread_position_in_grid]]) {
    out[i == 37 ? (1ul << 40) : i] = 1.0;   // thread 37 writes far out of bounds
}
"""


@pytest.fixture(scope="module")
def lib():
    return M.compile(SRC, "group_entry.metal")


def run(fn, *args, **kw):
    fn(*args, **kw)
    M.synchronize()


@pytest.mark.parametrize("order", ORDERS)
def test_threads_run_in_the_order_asked(lib, monkeypatch, order):
    monkeypatch.setenv("CAMEL_SIM_ORDER", order)
    n = 5 * 3 * 2
    counter = M.DeviceArray.zeros((1,), np.uint32)
    out = M.DeviceArray.zeros((n,), np.uint32)
    run(lib.function("turn"), counter, out, threadgroups=1, threads_per_threadgroup=(5, 3, 2))
    got = out.numpy()
    assert sorted(got) == list(range(n))
    if order == "forward":
        np.testing.assert_array_equal(got, np.arange(n))
    elif order == "reverse":
        np.testing.assert_array_equal(got, np.arange(n)[::-1])
    else:  # a shuffle, and a different one for each threadgroup
        assert not (got == np.arange(n)).all() and not (got == np.arange(n)[::-1]).all()


@pytest.mark.parametrize("order", ORDERS)
def test_a_vectorised_loop_keeps_the_order(lib, monkeypatch, order):
    # Forward order passes the value along the whole group; reverse order reads every
    # slot before its left neighbour writes it. Vectorising must not change either.
    monkeypatch.setenv("CAMEL_SIM_ORDER", order)
    x = M.DeviceArray.zeros((257,))
    run(lib.function("chain"), x, threads=256, threads_per_threadgroup=256)
    got = x.numpy()
    if order == "forward":
        np.testing.assert_array_equal(got, np.arange(257))
    elif order == "reverse":
        np.testing.assert_array_equal(got, np.minimum(np.arange(257), 1))
    else:
        assert got[0] == 0 and (np.diff(got)[1:] <= 1).all() and got.max() < 256


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize(
    "tpg, grid", [((8, 4, 2), "threads"), ((5, 7, 3), "threads"), ((64, 1, 1), "threadgroups")]
)
def test_builtins_match_the_per_thread_path(lib, monkeypatch, order, tpg, grid):
    monkeypatch.setenv("CAMEL_SIM_ORDER", order)
    dims = (13, 9, 4)  # partial edge groups along every axis with threads=
    if grid == "threads":
        kw, shape = {"threads": dims}, dims
    else:
        groups = (3, 2, 1)
        kw = {"threadgroups": groups}
        shape = tuple(g * t for g, t in zip(groups, tpg, strict=True))
    results = []
    for name in ("builtins", "builtins_per_thread", "builtins_fibers"):
        out = M.DeviceArray.zeros((int(np.prod(shape)) * 24,), np.uint32)
        run(lib.function(name), out, threads_per_threadgroup=tpg, **kw)
        results.append(out.numpy().reshape(shape[::-1] + (24,)))
    np.testing.assert_array_equal(results[0], results[1])
    np.testing.assert_array_equal(results[2], results[1], err_msg="fibers")
    got = results[0]
    z, y, x = np.indices(shape[::-1])
    np.testing.assert_array_equal(got[..., 0], x)  # a sanity check of the reference itself
    np.testing.assert_array_equal(got[..., 3:6], np.stack([x, y, z], -1) % tpg)
    np.testing.assert_array_equal(got[..., 6:9], np.stack([x, y, z], -1) // tpg)
    # this group's size: smaller in the partial edge groups of threads=
    size = np.minimum(tpg, np.array(shape) - np.stack([x, y, z], -1) // tpg * tpg)
    packed = size[..., 0] * 10000 + size[..., 1] * 100 + size[..., 2]
    np.testing.assert_array_equal(got[..., 9], packed)
    np.testing.assert_array_equal(got[..., 21], x)


def test_crash_names_the_thread(lib):
    out = M.DeviceArray.zeros((256,))
    with pytest.raises(
        M.MetalError, match=r"kernel 'crash_at', threadgroup \(0, 0, 0\), thread 37"
    ):
        run(lib.function("crash_at"), out, threads=256, threads_per_threadgroup=64)
