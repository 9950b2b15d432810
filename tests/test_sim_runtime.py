"""The simulator runtime on its own: the C ABI of shim/build/libcamel_sim.so driven
through ctypes with a hand-written kernel library (shim/sim/runtime_selftest_kernels.cc),
so the scheduler, barriers, SIMD collectives, limits and error paths are tested
without the MSL compiler. Kernels written in MSL are tested in test_sim_kernels.py.
"""

import ctypes as C
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / "shim" / "build"
ORDERS = ["forward", "reverse", "random"]


def _build():
    r = subprocess.run(
        ["make", "-s", "-C", str(ROOT / "shim"), "sim", "sim-selftest"],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        pytest.skip(f"cannot build the simulator: {r.stdout}{r.stderr}")


class Arg(C.Structure):
    _fields_ = [
        ("buffer", C.c_void_p),
        ("offset", C.c_uint64),
        ("bytes", C.c_void_p),
        ("length", C.c_uint64),
    ]


class DispatchDesc(C.Structure):
    _fields_ = [
        ("pipeline", C.c_void_p),
        ("args", C.POINTER(Arg)),
        ("nargs", C.c_uint32),
        ("threadgroup_memory", C.POINTER(C.c_uint32)),
        ("nthreadgroup_memory", C.c_uint32),
        ("grid", C.c_uint32 * 3),
        ("threads_per_threadgroup", C.c_uint32 * 3),
        ("grid_is_threads", C.c_int32),
    ]


class DeviceInfo(C.Structure):
    _fields_ = [
        ("name", C.c_char * 128),
        ("is_simulator", C.c_int32),
        ("max_threads_per_threadgroup", C.c_uint32),
        ("max_threadgroup_memory", C.c_uint32),
        ("simd_width", C.c_uint32),
        ("recommended_working_set", C.c_uint64),
    ]


class PipelineInfo(C.Structure):
    _fields_ = [
        ("max_total_threads_per_threadgroup", C.c_uint32),
        ("thread_execution_width", C.c_uint32),
        ("static_threadgroup_memory", C.c_uint32),
    ]


class MemoryInfo(C.Structure):
    _fields_ = [("allocated_bytes", C.c_uint64), ("buffers", C.c_uint64)]


class SimError(RuntimeError):
    pass


class Sim:
    """A minimal ctypes view of the simulator's C ABI (camel/metal/ is the real one)."""

    def __init__(self):
        lib = C.CDLL(str(BUILD / "libcamel_sim.so"))
        vp, u32, u64 = C.c_void_p, C.c_uint32, C.c_uint64
        sigs = {
            "camel_init": ([], C.c_int),
            "camel_last_error": ([], C.c_char_p),
            "camel_device_info_get": ([C.POINTER(DeviceInfo)], C.c_int),
            "camel_buffer_new": ([u64, C.POINTER(vp)], vp),
            "camel_buffer_release": ([vp], C.c_int),
            "camel_memory_info_get": ([C.POINTER(MemoryInfo)], C.c_int),
            "camel_sim_library_load": ([C.c_char_p], vp),
            "camel_library_function_names": ([vp, C.c_char_p, u64], u64),
            "camel_pipeline_new": ([vp, C.c_char_p], vp),
            "camel_pipeline_info_get": ([vp, C.POINTER(PipelineInfo)], C.c_int),
            "camel_pipeline_release": ([vp], None),
            "camel_dispatch": ([C.POINTER(DispatchDesc)], u64),
            "camel_commit": ([], u64),
            "camel_synchronize": ([], C.c_int),
            "camel_completed_id": ([], u64),
            "camel_command_buffer_time": (
                [u64, C.POINTER(C.c_double), C.POINTER(C.c_double)],
                C.c_int,
            ),
            "camel_mps_matmul": ([vp, vp, vp, u32, u32, u32], u64),
            "camel_capture_begin": ([C.c_char_p], C.c_int),
            "camel_sim_bench_fiber_switch": ([u64], C.c_double),
        }
        for name, (args, res) in sigs.items():
            f = getattr(lib, name)
            f.argtypes, f.restype = args, res
        self.lib = lib
        assert lib.camel_init() == 0, self.error()
        self.kernels = lib.camel_sim_library_load(str(BUILD / "libcamel_sim_selftest.so").encode())
        assert self.kernels, self.error()
        self.pipelines = {}

    def error(self):
        return self.lib.camel_last_error().decode()

    def buffer(self, array):
        """A buffer holding a copy of `array`; returns (handle, numpy view)."""
        array = np.ascontiguousarray(array)
        ptr = C.c_void_p()
        handle = self.lib.camel_buffer_new(max(array.nbytes, 1), C.byref(ptr))
        assert handle, self.error()
        view = np.ctypeslib.as_array((C.c_uint8 * array.nbytes).from_address(ptr.value))
        view = view.view(array.dtype).reshape(array.shape)
        view[...] = array
        return handle, view

    def pipeline(self, name):
        if name not in self.pipelines:
            p = self.lib.camel_pipeline_new(self.kernels, name.encode())
            if not p:
                raise SimError(self.error())
            self.pipelines[name] = p
        return self.pipelines[name]

    def dispatch(self, name, args, grid, tpg, threads=False, tg_memory=()):
        """args: buffer handles (int) or bytes objects (setBytes)."""
        keep = []
        cargs = (Arg * max(len(args), 1))()
        for i, a in enumerate(args):
            if isinstance(a, bytes):
                buf = C.create_string_buffer(a, len(a))
                keep.append(buf)
                cargs[i] = Arg(None, 0, C.cast(buf, C.c_void_p), len(a))
            else:
                cargs[i] = Arg(a, 0, None, 0)
        tgm = (C.c_uint32 * max(len(tg_memory), 1))(*tg_memory)
        desc = DispatchDesc(
            self.pipeline(name), cargs, len(args), tgm, len(tg_memory),
            (C.c_uint32 * 3)(*grid), (C.c_uint32 * 3)(*tpg), int(threads),
        )  # fmt: skip
        cb = self.lib.camel_dispatch(C.byref(desc))
        if cb == 0:
            raise SimError(self.error())
        return cb

    def sync(self):
        if self.lib.camel_synchronize() != 0:
            raise SimError(self.error())

    def run(self, *a, **k):
        cb = self.dispatch(*a, **k)
        self.sync()
        return cb


@pytest.fixture(scope="module")
def sim():
    _build()
    return Sim()


@pytest.fixture(params=ORDERS)
def order(request, monkeypatch):
    monkeypatch.setenv("CAMEL_SIM_ORDER", request.param)
    return request.param


def test_device_info(sim):
    info = DeviceInfo()
    assert sim.lib.camel_device_info_get(C.byref(info)) == 0
    assert info.name.decode().startswith("camel simulator (")
    assert info.is_simulator == 1
    assert (info.max_threads_per_threadgroup, info.max_threadgroup_memory, info.simd_width) == (
        1024,
        32768,
        32,
    )


def test_function_names_and_unknown_kernel(sim):
    n = sim.lib.camel_library_function_names(sim.kernels, None, 0)
    out = C.create_string_buffer(n + 1)
    sim.lib.camel_library_function_names(sim.kernels, out, n + 1)
    names = out.value.decode().split("\n")
    assert "add" in names and "reduce" in names
    with pytest.raises(SimError, match=r"no kernel named 'nope'.*add, reduce"):
        sim.pipeline("nope")


@pytest.mark.parametrize("n", [1, 31, 33, 1000])
def test_add_plain_loop(sim, order, n):
    rng = np.random.default_rng(n)
    a, b = rng.standard_normal(n, dtype=np.float32), rng.standard_normal(n, dtype=np.float32)
    (ha, _), (hb, _), (ho, out) = sim.buffer(a), sim.buffer(b), sim.buffer(np.zeros(n, np.float32))
    nbytes = np.uint32(n).tobytes()
    sim.run("add", [ha, hb, ho, nbytes], grid=((n + 63) // 64, 1, 1), tpg=(64, 1, 1))
    np.testing.assert_array_equal(out, a + b)
    for h in (ha, hb, ho):
        assert sim.lib.camel_buffer_release(h) == 0


@pytest.mark.parametrize("tpg", [1, 32, 64, 1024])
def test_reduce_with_barriers(sim, order, tpg):
    groups = 5
    x = np.random.default_rng(tpg).standard_normal(groups * tpg).astype(np.float32)
    (hi, _), (ho, out) = sim.buffer(x), sim.buffer(np.zeros(groups, np.float32))
    sim.run("reduce", [hi, ho], grid=(groups, 1, 1), tpg=(tpg, 1, 1))
    np.testing.assert_allclose(out, x.reshape(groups, tpg).sum(1), rtol=1e-5, atol=1e-5)
    info = PipelineInfo()
    sim.lib.camel_pipeline_info_get(sim.pipeline("reduce"), C.byref(info))
    assert info.static_threadgroup_memory == 4096  # measured on the first run


def test_missing_barrier_shows_up(sim, order):
    x = np.arange(64, dtype=np.float32)
    (hi, _), (ho, out) = sim.buffer(x), sim.buffer(np.zeros(64, np.float32))
    expect = np.roll(x.reshape(2, 32), -1, axis=1).ravel()
    sim.run("exchange", [hi, ho], grid=(2, 1, 1), tpg=(32, 1, 1))
    np.testing.assert_array_equal(out, expect)
    # Without the barrier a thread reads a neighbour's slot before it is
    # written: the NaN that threadgroup memory starts with shows through.
    sim.run("exchange_nobarrier", [hi, ho], grid=(2, 1, 1), tpg=(32, 1, 1))
    assert np.isnan(out).any()


def test_simd_collectives(sim, order):
    n = 96 + 8  # three full SIMD groups and a partial one (threadgroup of 104)
    x = np.random.default_rng(0).standard_normal(n).astype(np.float32)
    hs = [sim.buffer(x)[0]] + [sim.buffer(np.zeros(n, np.float32)) for _ in range(3)]
    outs = [h[1] for h in hs[1:]]
    sim.run("simd", [hs[0]] + [h[0] for h in hs[1:]], grid=(1, 1, 1), tpg=(n, 1, 1))
    groups = [slice(i, min(i + 32, n)) for i in range(0, n, 32)]
    for s in groups:
        np.testing.assert_allclose(outs[0][s], x[s].sum(), rtol=1e-5)
        evens = outs[1][s][0::2]
        np.testing.assert_array_equal(evens, len(evens))  # only the even lanes took part
        np.testing.assert_array_equal(outs[1][s][1::2], -1)
        shifted = np.append(x[s][1:], x[s][-1])  # the last lane keeps its own value
        np.testing.assert_array_equal(outs[2][s], shifted)


@pytest.mark.parametrize(
    "threads,tpg",
    [((100, 1, 1), (32, 1, 1)), ((17, 9, 1), (8, 4, 1)), ((5, 6, 7), (2, 4, 3))],
)
@pytest.mark.parametrize("kernel", ["ids", "ids_fibers"])
def test_dispatch_threads_partial_edge_groups(sim, threads, tpg, kernel):
    total = int(np.prod(threads))
    ho, out = sim.buffer(np.zeros((total, 24), np.uint32))
    sim.run(kernel, [ho], grid=threads, tpg=tpg, threads=True)
    assert out[:, 23].all(), "every thread of the grid ran exactly once"
    pos = out[:, 0:3]
    tgp = np.array(tpg)
    groups = -(-np.array(threads) // tgp)
    np.testing.assert_array_equal(out[:, 3:6], pos % tgp)
    np.testing.assert_array_equal(out[:, 6:9], pos // tgp)
    # threads_per_threadgroup is this group's size: smaller at the grid's edge.
    np.testing.assert_array_equal(out[:, 9:12], np.minimum(tgp, threads - (pos // tgp) * tgp))
    np.testing.assert_array_equal(out[:, 12:15], np.broadcast_to(tgp, (total, 3)))
    np.testing.assert_array_equal(out[:, 15:18], np.broadcast_to(groups, (total, 3)))
    size = out[:, 9:12]
    lin = out[:, 3] + size[:, 0] * (out[:, 4] + size[:, 1] * out[:, 5])
    np.testing.assert_array_equal(out[:, 18], lin)
    np.testing.assert_array_equal(out[:, 19], lin % 32)
    np.testing.assert_array_equal(out[:, 20], lin // 32)
    np.testing.assert_array_equal(out[:, 21], (size.prod(1) + 31) // 32)
    np.testing.assert_array_equal(out[:, 22], lin % 4)


def test_dispatch_threadgroups_3d(sim):
    groups, tpg = (3, 2, 2), (4, 2, 3)
    threads = tuple(g * t for g, t in zip(groups, tpg, strict=True))
    ho, out = sim.buffer(np.zeros((int(np.prod(threads)), 24), np.uint32))
    sim.run("ids", [ho], grid=groups, tpg=tpg)
    assert out[:, 23].all()
    np.testing.assert_array_equal(out[:, 9:12], np.broadcast_to(tpg, (len(out), 3)))


def test_dynamic_threadgroup_memory_is_nan_poisoned(sim, order):
    n, groups = 48, 3
    (ho, out), (hf, first) = (
        sim.buffer(np.zeros(n * groups, np.float32)),
        sim.buffer(np.zeros(n * groups, np.float32)),
    )
    sim.run("dyn", [ho, hf], grid=(groups, 1, 1), tpg=(n, 1, 1), tg_memory=[n * 4])
    assert np.isnan(first).all()
    assert (first.view(np.uint32) == 0x7FC00000).all()
    np.testing.assert_array_equal(out, np.tile(np.arange(n)[::-1], groups))


def test_partial_barrier_is_an_error(sim):
    sim.dispatch("partial_barrier", [], grid=(2, 1, 1), tpg=(64, 1, 1))
    with pytest.raises(SimError) as e:
        sim.sync()
    msg = str(e.value)
    assert "kernel 'partial_barrier'" in msg
    assert "reached by 32 of 64 threads; the other 32 had returned" in msg
    sim.run("reduce", [sim.buffer(np.ones(32, np.float32))[0], sim.buffer(np.zeros(1))[0]],
            grid=(1, 1, 1), tpg=(32, 1, 1))  # fmt: skip


def test_different_barriers_is_an_error(sim):
    with pytest.raises(SimError, match=r"different threadgroup_barrier calls \(32 at line \d+"):
        sim.run("two_barriers", [], grid=(1, 1, 1), tpg=(64, 1, 1))


def test_resolver_error_fails_the_command_buffer(sim):
    with pytest.raises(SimError, match="simdgroup_matrix needs all 32 lanes"):
        sim.run("matrix_partial", [], grid=(1, 1, 1), tpg=(40, 1, 1))


def test_random_order_failure_names_the_seed(sim, monkeypatch):
    monkeypatch.setenv("CAMEL_SIM_ORDER", "random")
    monkeypatch.setenv("CAMEL_SIM_SEED", "1234")
    with pytest.raises(SimError, match="CAMEL_SIM_SEED=1234 replays"):
        sim.run("partial_barrier", [], grid=(1, 1, 1), tpg=(8, 1, 1))


def test_bad_order_is_an_error(sim, monkeypatch):
    monkeypatch.setenv("CAMEL_SIM_ORDER", "sideways")
    with pytest.raises(SimError, match="must be forward, reverse or random, got 'sideways'"):
        sim.dispatch("partial_barrier", [], grid=(1, 1, 1), tpg=(8, 1, 1))


@pytest.mark.parametrize("kernel", ["crash", "crash_fiber"])
def test_segfault_in_kernel_is_reported_not_fatal(sim, kernel):
    with pytest.raises(SimError, match=rf"kernel '{kernel}'.*SIGSEGV.*CAMEL_SIM_SANITIZE=address"):
        sim.run(kernel, [], grid=(4, 1, 1), tpg=(8, 1, 1))
    sim.run("partial_barrier", [], grid=(1, 1, 1), tpg=(1, 1, 1))  # still usable


def test_division_by_zero_in_kernel_is_reported(sim):
    h, _ = sim.buffer(np.zeros(8, np.int32))
    with pytest.raises(SimError, match="SIGFPE"):
        sim.run("divzero", [h], grid=(1, 1, 1), tpg=(8, 1, 1))


def test_kernel_fail_call(sim):
    with pytest.raises(SimError, match=r"kernel 'fail'.*thread 3: index 99 out of bounds"):
        sim.run("fail", [], grid=(1, 1, 1), tpg=(8, 1, 1))


def test_failure_skips_rest_of_command_buffer(sim):
    h, out = sim.buffer(np.zeros(8, np.float32))
    cb1 = sim.dispatch("fail", [], grid=(1, 1, 1), tpg=(8, 1, 1))
    cb2 = sim.dispatch("scale", [h, h, np.float32(2).tobytes()], grid=(1, 1, 1), tpg=(8, 1, 1))
    assert cb1 == cb2
    with pytest.raises(SimError, match=f"command buffer {cb1} failed"):
        sim.sync()
    sim.sync()  # the failure is reported once


def test_threadgroup_size_limit(sim):
    with pytest.raises(SimError, match=r"\(32, 64, 1\) = 2048 threads exceeds .* 1024"):
        sim.dispatch("partial_barrier", [], grid=(1, 1, 1), tpg=(32, 64, 1))


def test_grid_too_large(sim):
    with pytest.raises(SimError, match=r"grid \(8388608, 1, 1\) threadgroups is too large"):
        sim.dispatch("partial_barrier", [], grid=(1 << 23, 1, 1), tpg=(1024, 1, 1))


def test_threadgroup_memory_limits(sim):
    with pytest.raises(SimError, match="40000 bytes of threadgroup variables .* 32768"):
        sim.run("big_static", [], grid=(1, 1, 1), tpg=(1, 1, 1))
    with pytest.raises(SimError, match=r"needs 36864 bytes .*36864 in \[\[threadgroup"):
        sim.dispatch("static_8k", [], grid=(1, 1, 1), tpg=(4, 1, 1), tg_memory=[36864])
    sim.run("static_8k", [], grid=(1, 1, 1), tpg=(4, 1, 1), tg_memory=[16])
    # After the first run the 8 KiB of threadgroup variables are known and counted.
    with pytest.raises(SimError, match=r"needs 36864 bytes .*28672 in .* 8192 of threadgroup"):
        sim.dispatch("static_8k", [], grid=(1, 1, 1), tpg=(4, 1, 1), tg_memory=[28672])
    with pytest.raises(SimError, match=r"'scratch' \(\[\[threadgroup\(0\)\]\]\) needs a thread"):
        sim.dispatch("static_8k", [], grid=(1, 1, 1), tpg=(4, 1, 1))


def test_argument_errors(sim):
    (h, _) = sim.buffer(np.zeros(4, np.float32))
    with pytest.raises(SimError, match=r"kernel 'add' takes 4 buffer arguments .*got 3"):
        sim.dispatch("add", [h, h, h], grid=(1, 1, 1), tpg=(4, 1, 1))
    with pytest.raises(
        SimError, match=r"kernel 'scale' parameter 2 'scale' .* 4-byte value, got 8"
    ):
        sim.dispatch("scale", [h, h, np.float64(2).tobytes()], grid=(1, 1, 1), tpg=(4, 1, 1))
    with pytest.raises(SimError, match=r"argument 0: 5000 bytes is more than setBytes allows"):
        sim.dispatch("scale", [bytes(5000), h, bytes(4)], grid=(1, 1, 1), tpg=(4, 1, 1))
    # A pointer parameter bound to bytes is fine (setBytes of a small array).
    x = np.arange(4, dtype=np.float32)
    (ho, out) = sim.buffer(np.zeros(4, np.float32))
    sim.run("scale", [x.tobytes(), ho, np.float32(3).tobytes()], grid=(1, 1, 1), tpg=(4, 1, 1))
    np.testing.assert_array_equal(out, 3 * x)


def test_set_bytes_limit_is_below_4_kib(sim):
    # Apple: setBytes takes "smaller than 4 KB"; what passes here must pass on Metal.
    (ho, out) = sim.buffer(np.zeros(4, np.float32))
    with pytest.raises(SimError, match=r"argument 0: 4096 bytes .* setBytes allows \(4095\)"):
        sim.dispatch("scale", [bytes(4096), ho, bytes(4)], grid=(1, 1, 1), tpg=(4, 1, 1))
    x = np.zeros(4095, np.uint8)
    x[:16] = np.arange(4, dtype=np.float32).view(np.uint8)
    sim.run("scale", [x.tobytes(), ho, np.float32(2).tobytes()], grid=(1, 1, 1), tpg=(4, 1, 1))
    np.testing.assert_array_equal(out, 2 * np.arange(4, dtype=np.float32))


def test_buffers_released_twice_and_after_release(sim):
    info = MemoryInfo()
    sim.lib.camel_memory_info_get(C.byref(info))
    before = (info.allocated_bytes, info.buffers)
    h, _ = sim.buffer(np.zeros(1000, np.float32))
    sim.lib.camel_memory_info_get(C.byref(info))
    assert (info.allocated_bytes, info.buffers) == (before[0] + 4000, before[1] + 1)
    assert sim.lib.camel_buffer_release(h) == 0
    assert sim.lib.camel_buffer_release(h) != 0
    assert "not a live buffer (released twice?)" in sim.error()
    with pytest.raises(SimError, match="argument 0: the buffer was released"):
        sim.dispatch("scale", [h, h, bytes(4)], grid=(1, 1, 1), tpg=(4, 1, 1))
    sim.lib.camel_memory_info_get(C.byref(info))
    assert (info.allocated_bytes, info.buffers) == before


def test_release_while_pending_defers_the_free(sim):
    x = np.arange(64, dtype=np.float32)
    (hi, _), (ho, out) = sim.buffer(x), sim.buffer(np.zeros(64, np.float32))
    sim.dispatch("scale", [hi, ho, np.float32(2).tobytes()], grid=(2, 1, 1), tpg=(32, 1, 1))
    assert sim.lib.camel_buffer_release(hi) == 0  # the queued dispatch still holds it
    info = MemoryInfo()
    sim.lib.camel_memory_info_get(C.byref(info))
    live = info.buffers
    sim.sync()
    np.testing.assert_array_equal(out, 2 * x)
    sim.lib.camel_memory_info_get(C.byref(info))
    assert info.buffers == live - 1


def test_command_buffers_commit_time_and_autocommit(sim):
    h, out = sim.buffer(np.ones(32, np.float32))
    two = np.float32(2).tobytes()
    ids = [sim.dispatch("scale", [h, h, two], grid=(1, 1, 1), tpg=(32, 1, 1)) for _ in range(300)]
    assert ids[0] == ids[255] and ids[256] == ids[-1] == ids[0] + 1  # 256 per command buffer
    assert sim.lib.camel_completed_id() == ids[0]  # the full one ran by itself
    assert sim.lib.camel_commit() == ids[-1]
    assert sim.lib.camel_commit() == 0
    assert sim.lib.camel_completed_id() == ids[-1]
    np.testing.assert_array_equal(out, 2.0**300 if 2.0**300 < 3e38 else np.inf)
    start, end = C.c_double(), C.c_double()
    assert sim.lib.camel_command_buffer_time(ids[-1], C.byref(start), C.byref(end)) == 0
    assert 0 <= end.value - start.value < 10
    assert sim.lib.camel_command_buffer_time(10**9, C.byref(start), C.byref(end)) != 0


def test_metal_only_features_say_so(sim):
    assert sim.lib.camel_mps_matmul(None, None, None, 1, 1, 1) == 0
    assert "MPS is not available on the simulator" in sim.error()
    assert sim.lib.camel_capture_begin(b"x.gputrace") != 0
    assert "GPU capture needs Metal (macOS)" in sim.error()


def test_printf_from_kernel(sim, capfd):
    sim.run("printf", [], grid=(1, 1, 1), tpg=(3, 1, 1))
    out = capfd.readouterr().out
    assert sorted(out.splitlines()) == [f"hello from thread {i}" for i in range(3)]


def test_fiber_switch_is_fast(sim):
    ns = min(sim.lib.camel_sim_bench_fiber_switch(200_000) for _ in range(3))
    assert ns < 50  # the benchmark reports the real figure (a few ns); CI machines vary


def test_workers_env(sim):
    code = (
        f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
        "import test_sim_runtime as t; "
        "s = t.Sim(); i = t.DeviceInfo(); s.lib.camel_device_info_get(t.C.byref(i)); "
        "print(i.name.decode())"
    )
    env = dict(os.environ, CAMEL_SIM_WORKERS="3")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert r.stdout.strip() == "camel simulator (3 workers)", r.stderr


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_fork_child_runs_alone(sim):
    x = np.arange(256, dtype=np.float32)
    (hi, _), (ho, out) = sim.buffer(x), sim.buffer(np.zeros(256, np.float32))
    sim.run("reduce", [hi, ho], grid=(4, 1, 1), tpg=(64, 1, 1))  # the pool has started
    pid = os.fork()
    if pid == 0:  # the child has no helper threads: it must not wait for them
        sim.run("scale", [hi, ho, np.float32(3).tobytes()], grid=(4, 1, 1), tpg=(64, 1, 1))
        os._exit(0 if np.array_equal(out, 3 * x) else 1)
    _, status = os.waitpid(pid, 0)
    assert status == 0
