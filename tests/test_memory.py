""" "mps" memory: zero-copy views, the buffer cache, the host-write hazard, memory stats."""

import gc
import weakref

import numpy as np
import pytest
from conftest import require_shim

from camel import metal

require_shim()

SOURCE = """\
#include <metal_stdlib>
using namespace metal;

// y[i] = a * x[i] + b: one thread per element (the grid is exactly n threads)
kernel void axpb(device const float *x [[buffer(0)]],
                 device float *y [[buffer(1)]],
                 constant float &a [[buffer(2)]],
                 constant float &b [[buffer(3)]],
                 uint i [[thread_position_in_grid]]) {
    y[i] = a * x[i] + b;
}
"""


@pytest.fixture(autouse=True)
def async_commit(monkeypatch):
    """On the simulator, command buffers complete on a thread of their own here, as on a GPU
    (CAMEL_SIM_ASYNC=1): completed_id lags behind commit, so host/GPU races can show."""
    monkeypatch.setenv("CAMEL_SIM_ASYNC", "1")
    yield
    metal.synchronize()


@pytest.fixture(scope="module")
def axpb():
    return metal.compile(SOURCE, "tests/test_memory.metal").function("axpb")


def run_axpb(fn, x, y, a=2.0, b=1.0):
    fn(x, y, a, b, threads=x.size, threads_per_threadgroup=min(x.size, 64))


def test_numpy_is_a_zero_copy_view(axpb):
    x = np.arange(37, dtype=np.float32)
    dx, dy = metal.DeviceArray.from_numpy(x), metal.DeviceArray.empty(37)
    view = dx.numpy()
    assert view.ctypes.data == dx.buffer.contents + dx.offset  # the buffer's own memory
    assert view.shape == (37,) and view.dtype == np.float32 and view.flags.writeable
    view[:] = -x  # write through the view ...
    run_axpb(axpb, dx, dy)  # ... and a kernel reads it
    np.testing.assert_array_equal(dy.numpy(), -2 * x + 1)
    # the output view sees the kernel's later writes too (after synchronising)
    out_view = dy.numpy()
    run_axpb(axpb, dx, dy, a=1.0, b=0.0)
    metal.synchronize()
    np.testing.assert_array_equal(out_view, -x)


def test_view_keeps_the_buffer_alive():
    x = np.random.default_rng(0).standard_normal((5, 7)).astype(np.float32)
    dx = metal.DeviceArray.from_numpy(x)
    buffer = weakref.ref(dx.buffer)
    view = dx.numpy()
    del dx
    gc.collect()
    assert buffer() is not None  # the view's .base chain holds it
    # allocations of the same size must not receive (and overwrite) that buffer
    others = [metal.DeviceArray.from_numpy(np.full((5, 7), 9, np.float32)) for _ in range(3)]
    assert all(o.buffer is not buffer() for o in others)
    np.testing.assert_array_equal(view, x)
    del view
    gc.collect()
    assert buffer() is None  # last reference gone: the buffer went back to the cache


def test_reshape_shares_the_buffer():
    x = np.arange(24, dtype=np.float32)
    dx = metal.DeviceArray.from_numpy(x)
    r = dx.reshape(2, -1, 3)
    assert r.shape == (2, 4, 3) and r.buffer is dx.buffer and r.offset == dx.offset
    r.numpy()[1, 0, 0] = 100.0
    assert dx.numpy()[12] == 100.0
    assert dx.reshape((24,)).shape == (24,)
    with pytest.raises(ValueError, match=r"cannot reshape \(24,\).*\(5, 5\)"):
        dx.reshape(5, 5)


def test_dtypes_round_trip_and_bad_dtypes():
    i = np.array([[-3, 0, 2**31 - 1]], dtype=np.int32)
    di = metal.DeviceArray.from_numpy(i)
    assert di.dtype == np.int32 and di.shape == (1, 3) and di.nbytes == 12 and di.size == 3
    np.testing.assert_array_equal(di.numpy(), i)
    f = np.asfortranarray(np.arange(12, dtype=np.float32).reshape(3, 4))  # any layout copies in
    np.testing.assert_array_equal(metal.DeviceArray.from_numpy(f).numpy(), f)
    with pytest.raises(TypeError, match="float64 is not supported"):
        metal.DeviceArray.from_numpy(np.zeros(3))
    empty = metal.DeviceArray.empty((0, 3))
    assert empty.numpy().shape == (0, 3) and empty.nbytes == 0


def test_zeros_is_zero_even_on_a_reused_buffer():
    shape = (333,)
    junk = metal.DeviceArray.from_numpy(np.full(shape, 7.0, np.float32))
    del junk  # its buffer goes to the cache ...
    z = metal.DeviceArray.zeros(shape)  # ... and zeros may reuse it
    np.testing.assert_array_equal(z.numpy(), np.zeros(shape, np.float32))


def test_size_classes():
    assert metal._size_class(1) == 256 and metal._size_class(256) == 256
    previous = 0
    for n in list(range(1, 5000, 7)) + [2**20, 2**20 + 1, 3 * 2**20 + 5, 10**9]:
        c = metal._size_class(n)
        assert c >= n and c >= previous
        assert c <= max(256, 1.25 * n)  # under 25% waste
        assert c % 64 == 0  # float4 kernels may round lengths up to 4 elements
        previous = c


def test_steady_state_loop_allocates_no_new_buffers(axpb):
    rng = np.random.default_rng(1)

    def step(n):
        # one "training step": upload, two kernels, temporaries dropped, read back
        x = metal.DeviceArray.from_numpy(rng.standard_normal(n).astype(np.float32))
        h = metal.DeviceArray.empty(n)
        y = metal.DeviceArray.empty(n)
        run_axpb(axpb, x, h)
        run_axpb(axpb, h, y, a=0.5, b=0.0)
        return float(y.numpy().sum())

    sizes = [1000, 64, 4097]
    for _ in range(3):  # warm up the cache
        for n in sizes:
            step(n)
    gc.collect()
    before = metal.memory_stats()
    for _ in range(20):
        for n in sizes:
            step(n)
    after = metal.memory_stats()
    assert after["buffers"] == before["buffers"]
    assert after["allocated_bytes"] == before["allocated_bytes"]


def test_host_writes_never_take_a_buffer_a_pending_kernel_reads(axpb):
    n = 4096
    old = np.arange(n, dtype=np.float32)
    new = -np.ones(n, np.float32)
    metal.synchronize()
    x = metal.DeviceArray.from_numpy(old)
    y = metal.DeviceArray.empty(n)
    run_axpb(axpb, x, y, a=1.0, b=0.0)  # encoded into the open command buffer, not yet run
    handle = x.buffer.handle
    assert x.buffer.last_use > metal.completed_id()  # the kernel is still pending
    del x  # Python drops X; the pending kernel still reads its buffer
    z = metal.DeviceArray.from_numpy(new)  # a host write of the same size
    assert z.buffer.handle != handle  # ... must not land in X's buffer
    w = metal.DeviceArray.empty(n)  # a GPU-write allocation may reuse it (the queue is in order)
    assert w.buffer.handle == handle
    metal.synchronize()
    np.testing.assert_array_equal(y.numpy(), old)  # the kernel saw the OLD data
    np.testing.assert_array_equal(z.numpy(), new)
    # once the command buffer completed, host writes may reuse that buffer
    del w
    again = metal.DeviceArray.from_numpy(new)
    assert again.buffer.handle == handle


SPIN = """\
#include <metal_stdlib>
using namespace metal;
// y[i] = x[i] + a value that takes a million dependent multiply-adds (~0.1 s in all)
kernel void spin(device const float *x [[buffer(0)]], device float *y [[buffer(1)]],
                 uint i [[thread_position_in_grid]]) {
    float acc = 0.0f;
    for (uint k = 0; k < 1000000; k++) acc = fma(acc, 0.5f, 1.0f);
    y[i] = x[i] + acc;
}
"""


def test_a_committed_kernel_still_running_keeps_its_buffers_from_host_writes():
    spin = metal.compile(SPIN, "tests/spin.metal").function("spin")
    metal.synchronize()
    old, new = np.arange(64, dtype=np.float32), -np.ones(64, np.float32)
    x, y = metal.DeviceArray.from_numpy(old), metal.DeviceArray.empty(64)
    handle = x.buffer.handle
    spin(x, y, threads=64, threads_per_threadgroup=64)
    cb = metal.commit()
    if metal.is_simulator():  # on a GPU it may be done already; the simulator is slower
        assert metal.completed_id() < cb  # committed, still running
    del x
    z = metal.DeviceArray.from_numpy(new)  # a host write must not take X's buffer
    assert z.buffer.handle != handle
    metal.synchronize()
    assert metal.completed_id() >= cb
    np.testing.assert_array_equal(y.numpy(), old + 2)  # acc -> 2
    np.testing.assert_array_equal(z.numpy(), new)


def test_memory_stats_and_peak():
    gc.collect()
    metal.synchronize()
    metal.empty_cache()
    metal.reset_peak_memory_stats()
    base = metal.memory_stats()
    assert set(base) >= {"allocated_bytes", "peak_bytes", "buffers", "cached_bytes"}
    assert base["peak_bytes"] <= base["allocated_bytes"]

    big = metal.DeviceArray.empty((3, 1 << 18))  # 3 MiB, a size class nothing else uses
    stats = metal.memory_stats()
    assert stats["allocated_bytes"] - base["allocated_bytes"] == big.buffer.capacity >= 3 << 20
    assert stats["buffers"] == base["buffers"] + 1
    # peak counts what camel.metal holds; allocated_bytes is the shim's, which includes
    # buffers made through the shim's C API directly (tests/test_sim_runtime.py's): the
    # peak after a reset starts from camel.metal's own bytes, base["peak_bytes"]
    assert stats["peak_bytes"] >= base["peak_bytes"] + (3 << 20)

    del big  # into the cache: still allocated by the shim, now counted as cached
    stats = metal.memory_stats()
    assert stats["cached_bytes"] - base["cached_bytes"] >= 3 << 20
    assert stats["allocated_bytes"] - base["allocated_bytes"] >= 3 << 20

    metal.empty_cache()
    metal.synchronize()
    stats = metal.memory_stats()
    assert stats["cached_bytes"] == 0
    assert stats["allocated_bytes"] <= base["allocated_bytes"]
    assert stats["peak_bytes"] >= base["peak_bytes"] + (3 << 20)  # the peak remembers
    metal.reset_peak_memory_stats()
    assert metal.memory_stats()["peak_bytes"] <= stats["allocated_bytes"]


def test_buffer_release_is_exactly_once():
    b = metal.Buffer(100)
    assert b.nbytes == 100 and b.capacity >= 100 and b.handle and b.contents
    b.release()
    with pytest.raises(metal.MetalError, match="use of a released buffer"):
        _ = b.handle
    with pytest.raises(metal.MetalError, match="released twice"):
        b.release()
    del b  # __del__ after release must not give it back a second time
    gc.collect()
    assert all(len({id(blk) for blk in blocks}) == len(blocks) for blocks in metal._free.values())
