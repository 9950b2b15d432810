"""camel.metal from Python: compile, dispatch with every argument kind, every error path,
device queries and camel.profile(). Runs on the simulator in CI (and on a Mac's GPU)."""

import os
import re
import subprocess
import sys

import numpy as np
import pytest
from conftest import require_shim

from camel import metal

require_shim()

SOURCE = """\
#include <metal_stdlib>
using namespace metal;

// y[i] = a * x[i] + b for i < n: one thread per element
kernel void axpb(device const float *x [[buffer(0)]],
                 device float *y [[buffer(1)]],
                 constant float &a [[buffer(2)]],
                 constant float &b [[buffer(3)]],
                 constant uint &n [[buffer(4)]],
                 uint i [[thread_position_in_grid]]) {
    if (i < n) y[i] = a * x[i] + b;
}

// out[i] = x[i] + shift, int32 (shift may be negative)
kernel void add_int(device const int *x [[buffer(0)]],
                    device int *out [[buffer(1)]],
                    constant int &shift [[buffer(2)]],
                    uint i [[thread_position_in_grid]]) {
    out[i] = x[i] + shift;
}

// out is (rows, cols) row-major; one thread writes out[r, c] = r * 1000 + c
kernel void iota2d(device float *out [[buffer(0)]],
                   constant uint2 &dims [[buffer(1)]],   // (cols, rows)
                   uint2 gid [[thread_position_in_grid]]) {
    if (gid.x < dims.x && gid.y < dims.y)
        out[gid.y * dims.x + gid.x] = float(gid.y * 1000 + gid.x);
}

// out[g] = sum of the g-th block of x: a tree reduction in threadgroup memory
kernel void group_sum(device const float *x [[buffer(0)]],
                      device float *out [[buffer(1)]],
                      threadgroup float *scratch [[threadgroup(0)]],
                      uint tid [[thread_index_in_threadgroup]],
                      uint group [[threadgroup_position_in_grid]],
                      uint tpg [[threads_per_threadgroup]]) {
    scratch[tid] = x[group * tpg + tid];
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (uint s = tpg / 2; s > 0; s >>= 1) {
        if (tid < s) scratch[tid] += scratch[tid + s];
        threadgroup_barrier(mem_flags::mem_threadgroup);
    }
    if (tid == 0) out[group] = scratch[0];
}
"""


@pytest.fixture(scope="module")
def lib():
    return metal.compile(SOURCE, "tests/test_metal_api.metal")


def test_device_queries():
    name = metal.device_name()
    assert isinstance(name, str) and name
    info = metal.device_info()
    assert info["name"] == name
    assert info["is_simulator"] == metal.is_simulator()
    assert info["max_threads_per_threadgroup"] >= 256
    assert info["max_threadgroup_memory"] >= 16384
    assert info["simd_width"] == 32
    if metal.shim() == "cuda":
        assert name.endswith("(CUDA shim: MSL translated to PTX)") and not metal.is_simulator()
    elif sys.platform != "darwin":
        assert metal.is_simulator()
        assert "sim" in name.lower()


def test_library_lists_kernels_and_function_limits(lib):
    assert set(lib.function_names) == {"axpb", "add_int", "iota2d", "group_sum"}
    fn = lib.function("axpb")
    assert fn is lib.function("axpb")  # pipelines are cached per library
    assert fn.name == "axpb"
    assert 32 <= fn.max_total_threads_per_threadgroup <= 1024
    assert fn.thread_execution_width == 32
    assert fn.static_threadgroup_memory == 0


@pytest.mark.parametrize("n", [1, 31, 33, 1000])
def test_dispatch_threads_with_buffers_floats_and_ints(lib, n):
    rng = np.random.default_rng(n)
    x = rng.standard_normal(n).astype(np.float32)
    dx, dy = metal.DeviceArray.from_numpy(x), metal.DeviceArray.empty(n)
    # threads= is dispatchThreads: the last threadgroup may be partial
    lib.function("axpb")(dx, dy, 2.5, -1.0, n, threads=n, threads_per_threadgroup=64)
    np.testing.assert_allclose(dy.numpy(), 2.5 * x - 1.0, rtol=1e-6, atol=1e-6)


def test_dispatch_threadgroups_with_numpy_scalars(lib):
    n = 100
    x = np.linspace(-3, 3, n, dtype=np.float32)
    dx, dy = metal.DeviceArray.from_numpy(x), metal.DeviceArray.empty(n)
    groups = (n + 31) // 32  # dispatchThreadgroups: the kernel's `if (i < n)` guards the tail
    fn = lib.function("axpb")
    fn(dx, dy, np.float32(0.5), np.float32(3), np.uint32(n), threadgroups=groups,
       threads_per_threadgroup=(32, 1, 1))  # fmt: skip
    np.testing.assert_allclose(dy.numpy(), 0.5 * x + 3, rtol=1e-6)


def test_negative_python_int_binds_int32(lib):
    x = np.arange(-5, 45, dtype=np.int32)
    dx, out = metal.DeviceArray.from_numpy(x), metal.DeviceArray.empty(x.shape, np.int32)
    lib.function("add_int")(dx, out, -7, threads=x.size, threads_per_threadgroup=16)
    np.testing.assert_array_equal(out.numpy(), x - 7)
    lib.function("add_int")(dx, out, np.int32(11), threads=x.size, threads_per_threadgroup=16)
    np.testing.assert_array_equal(out.numpy(), x + 11)


def test_buffer_offsets_bind_at_the_arrays_byte_offset(lib):
    # Two arrays living in one buffer: x at offset 0, y at offset 64 bytes.
    n = 16
    buf = metal.Buffer(64 + 4 * n)
    x = metal.DeviceArray((n,), np.float32, buf, offset=0)
    y = metal.DeviceArray((n,), np.float32, buf, offset=64)
    x.numpy()[:] = np.arange(n, dtype=np.float32)
    lib.function("axpb")(x, y, 1.0, 100.0, n, threads=n, threads_per_threadgroup=n)
    np.testing.assert_array_equal(y.numpy(), np.arange(n) + 100.0)
    np.testing.assert_array_equal(x.numpy(), np.arange(n))


@pytest.mark.parametrize("rows, cols", [(1, 1), (7, 33), (40, 17)])
def test_2d_grid_with_small_array_bytes(lib, rows, cols):
    out = metal.DeviceArray.empty((rows, cols))
    dims = np.array([cols, rows], dtype=np.uint32)  # a small array binds its bytes
    fn = lib.function("iota2d")
    fn(out, dims, threads=(cols, rows), threads_per_threadgroup=(8, 4, 1))
    r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    np.testing.assert_array_equal(out.numpy(), r * 1000 + c)
    # the same grid as threadgroups (rounded up; the kernel guards the edges)
    out2 = metal.DeviceArray.empty((rows, cols))
    fn(out2, dims, threadgroups=((cols + 7) // 8, (rows + 3) // 4, 1),
       threads_per_threadgroup=(8, 4))  # fmt: skip
    np.testing.assert_array_equal(out2.numpy(), r * 1000 + c)


@pytest.mark.parametrize("tpg", [32, 64, 256])
def test_threadgroup_memory(lib, tpg):
    groups = 5
    x = np.random.default_rng(tpg).standard_normal(groups * tpg).astype(np.float32)
    dx, out = metal.DeviceArray.from_numpy(x), metal.DeviceArray.empty(groups)
    lib.function("group_sum")(dx, out, threadgroups=groups, threads_per_threadgroup=tpg,
                              threadgroup_memory=[4 * tpg])  # fmt: skip
    np.testing.assert_allclose(out.numpy(), x.reshape(groups, tpg).sum(1), rtol=1e-5, atol=1e-5)


IMPLICIT_SRC = """
#include <metal_stdlib>
using namespace metal;
// MSL 4, 5.2.1: an argument without [[buffer(i)]] takes the first free index, in order:
// x is buffer 1 (0 and 3 are written), scale buffer 2, bias buffer 4; threadgroup t is 0
kernel void implicit_indices(device float *y [[buffer(0)]], device const float *x,
                             constant float &scale, constant uint &n [[buffer(3)]],
                             device const float *bias, threadgroup float *t,
                             threadgroup float *u [[threadgroup(1)]],
                             uint i [[thread_position_in_grid]],
                             uint l [[thread_position_in_threadgroup]]) {
    t[l] = x[min(i, n - 1)];
    u[l] = bias[min(i, n - 1)];
    threadgroup_barrier(mem_flags::mem_threadgroup);
    if (i < n) y[i] = scale * t[l] + u[l];
}
"""


def test_arguments_without_an_index_take_the_first_free_one():
    """Apple's rule (MSL 4, 5.2.1, "If the location indices are not specified, the Metal
    compiler assigns them using the first available location index"); before, the
    simulator gave the highest explicit index + 1 (x would have been buffer 4)."""
    lib = metal.compile(IMPLICIT_SRC, "implicit.metal")
    n = 1037
    rng = np.random.default_rng(7)
    x, bias = rng.standard_normal(n).astype(np.float32), rng.standard_normal(n).astype(np.float32)
    y = metal.DeviceArray.from_numpy(np.full(n, np.nan, np.float32))
    dx, db = metal.DeviceArray.from_numpy(x), metal.DeviceArray.from_numpy(bias)
    lib.function("implicit_indices")(y, dx, 0.5, n, db, threads=n, threads_per_threadgroup=64,
                                     threadgroup_memory=[256, 256])  # fmt: skip
    np.testing.assert_allclose(y.numpy(), np.float32(0.5) * x + bias, rtol=1e-6, atol=1e-6)


def test_tensor_arguments():
    camel = pytest.importorskip("camel")
    lib = metal.compile(SOURCE)
    fn = lib.function("axpb")
    x = np.arange(8, dtype=np.float32)
    y = metal.DeviceArray.empty(8)
    cpu = camel.tensor(x)
    with pytest.raises(TypeError, match=r"axpb.*argument 0.*'cpu'.*to\('mps'\)"):
        fn(cpu, y, 1.0, 0.0, 8, threads=8, threads_per_threadgroup=8)

    class FakeMpsTensor:  # what camel.Tensor looks like on "mps": storage is a DeviceArray
        device = "mps"
        storage = metal.DeviceArray.from_numpy(x)

    fn(FakeMpsTensor(), y, 3.0, 0.0, 8, threads=8, threads_per_threadgroup=8)
    np.testing.assert_array_equal(y.numpy(), 3 * x)


# ---- error paths ------------------------------------------------------------------


def test_compile_error_points_at_the_line():
    bad = SOURCE.replace("y[i] = a * x[i] + b;", "y[i] = a * x[i] + undefined_name;")
    line = bad.splitlines().index(next(s for s in bad.splitlines() if "undefined_name" in s)) + 1
    with pytest.raises(metal.CompileError) as err:
        metal.compile(bad, "shaders/broken.metal")
    assert "undefined_name" in err.value.log
    assert re.search(rf"broken\.metal:{line}\b", err.value.log), err.value.log
    assert "broken.metal" in str(err.value)
    assert err.value.path == "shaders/broken.metal"
    # One header naming the file (the shim's), not one from camel.metal on top of it.
    # (Metal: "... broken.metal failed", the simulator: "broken.metal: compilation failed",
    # the CUDA shim: "compiling shaders/broken.metal to PTX for sm_90 failed")
    headers = re.findall(r"broken\.metal[^\n]*failed", str(err.value))
    assert len(headers) == 1, str(err.value)


def test_unknown_kernel_lists_the_available_ones(lib):
    with pytest.raises(metal.MetalError, match="axbp") as err:
        lib.function("axbp")
    for name in ("axpb", "add_int", "iota2d", "group_sum"):
        assert name in str(err.value)


def test_oversized_threadgroup_shows_request_and_limit(lib):
    fn = lib.function("axpb")
    x, y = metal.DeviceArray.empty(64), metal.DeviceArray.empty(64)
    limit = fn.max_total_threads_per_threadgroup
    with pytest.raises(metal.DispatchError) as err:
        fn(x, y, 1.0, 0.0, 64, threads=64, threads_per_threadgroup=(limit, 2, 1))
    msg = str(err.value)
    assert "axpb" in msg and str(2 * limit) in msg and str(limit) in msg


def test_too_much_threadgroup_memory_shows_request_and_limit(lib):
    fn = lib.function("group_sum")
    x, out = metal.DeviceArray.empty(64), metal.DeviceArray.empty(1)
    limit = metal.device_info()["max_threadgroup_memory"]
    with pytest.raises(metal.DispatchError) as err:
        fn(x, out, threadgroups=1, threads_per_threadgroup=64, threadgroup_memory=[limit + 1024])
    msg = str(err.value)
    assert "group_sum" in msg and str(limit + 1024) in msg and str(limit) in msg


def test_wrong_argument_count_names_the_kernel(lib):
    fn = lib.function("axpb")
    x, y = metal.DeviceArray.empty(8), metal.DeviceArray.empty(8)
    with pytest.raises(metal.DispatchError, match="axpb") as err:
        fn(x, y, threads=8, threads_per_threadgroup=8)  # buffers 2..4 missing
    assert "2 arguments" in str(err.value)


@pytest.mark.parametrize(
    "bad, match",
    [
        ("a string", r"\[axpb\] argument 2 \(str\)"),
        ([1.0, 2.0], r"\[axpb\] argument 2 \(list\)"),
        (np.zeros(2), r"\[axpb\] argument 2 is float64"),
        (np.zeros(2000, np.float32), r"\[axpb\] argument 2: a float32 array of 8000 bytes"),
        # Apple: setBytes takes "smaller than 4 KB", so exactly 4096 bytes is already too many.
        (np.zeros(1024, np.float32), r"argument 2: a float32 array of 4096 bytes .*\(1\.\.4095\)"),
    ],
)
def test_unsupported_argument_types_name_kernel_and_index(lib, bad, match):
    fn = lib.function("axpb")
    x, y = metal.DeviceArray.empty(8), metal.DeviceArray.empty(8)
    with pytest.raises(TypeError, match=match):
        fn(x, y, bad, 0.0, 8, threads=8, threads_per_threadgroup=8)


def test_bad_grids_and_ints(lib):
    fn = lib.function("axpb")
    x, y = metal.DeviceArray.empty(8), metal.DeviceArray.empty(8)
    with pytest.raises(OverflowError, match=r"argument 4 = 4294967296"):
        fn(x, y, 1.0, 0.0, 2**32, threads=8, threads_per_threadgroup=8)
    with pytest.raises(TypeError, match="threadgroups=.*threads="):
        fn(x, y, 1.0, 0.0, 8, threads_per_threadgroup=8)
    with pytest.raises(TypeError, match="not both"):
        fn(x, y, 1.0, 0.0, 8, threads=8, threadgroups=1, threads_per_threadgroup=8)
    with pytest.raises(TypeError, match="threads_per_threadgroup"):
        fn(x, y, 1.0, 0.0, 8, threads=8)
    with pytest.raises(ValueError, match=r"grid must be >= 1.*\(0, 1\)"):
        fn(x, y, 1.0, 0.0, 8, threads=(0, 1), threads_per_threadgroup=8)


def test_released_buffer_cannot_be_used(lib):
    fn = lib.function("axpb")
    x, y = metal.DeviceArray.empty(8), metal.DeviceArray.empty(8)
    x.buffer.release()
    assert x.buffer.released
    with pytest.raises(metal.MetalError, match=r"\[axpb\] argument 0: use of a released buffer"):
        fn(x, y, 1.0, 0.0, 8, threads=8, threads_per_threadgroup=8)
    with pytest.raises(metal.MetalError, match="released"):
        x.numpy()
    with pytest.raises(metal.MetalError, match="released twice"):
        x.buffer.release()


def test_camel_shim_metal_on_linux_is_a_clear_error(monkeypatch):
    if sys.platform == "darwin":
        pytest.skip("CAMEL_SHIM=metal is valid on macOS")
    monkeypatch.setenv("CAMEL_SHIM", "metal")
    with pytest.raises(metal.MetalError, match="CAMEL_SHIM=sim"):
        metal._shim_choice()
    monkeypatch.setenv("CAMEL_SHIM", "vulkan")
    with pytest.raises(metal.MetalError, match="'metal', 'sim' or 'cuda'"):
        metal._shim_choice()
    monkeypatch.setenv("CAMEL_SHIM", "cuda")
    assert metal._shim_choice() == "cuda"  # asked for: no probing, no fallback
    monkeypatch.setenv("CAMEL_SHIM", "sim")
    assert metal._shim_choice() == "sim"


def test_shader_files_compile_once_per_process(tmp_path):
    path = tmp_path / "mine.metal"
    path.write_text(SOURCE)
    lib = metal.library(str(path))
    assert metal.library(str(path)) is lib
    assert metal.kernel(str(path), "axpb") is lib.function("axpb")
    with pytest.raises(FileNotFoundError, match="no shader file"):
        metal.library("no_such_file.metal")


# ---- camel.profile() ------------------------------------------------------------


def test_profile_records_every_dispatch(lib):
    from camel.profiler import profile

    n = 4096
    x = metal.DeviceArray.from_numpy(np.ones(n, np.float32))
    y = metal.DeviceArray.empty(n)
    out = metal.DeviceArray.empty(n // 256)
    with profile() as prof:
        for _ in range(3):
            lib.function("axpb")(x, y, 2.0, 1.0, n, threads=n, threads_per_threadgroup=128,
                                 bytes=8 * n)  # fmt: skip
        lib.function("group_sum")(x, out, threadgroups=n // 256, threads_per_threadgroup=256,
                                  threadgroup_memory=[1024], flops=n)  # fmt: skip
    lib.function("axpb")(x, y, 2.0, 1.0, n, threads=n, threads_per_threadgroup=128)  # not recorded

    events = prof.events
    assert [e.name for e in events] == ["axpb"] * 3 + ["group_sum"]
    assert events[0].grid == (n, 1, 1) and events[0].grid_is_threads
    assert events[0].threads_per_threadgroup == (128, 1, 1)
    assert events[3].grid == (n // 256, 1, 1) and not events[3].grid_is_threads
    assert len({e.command_buffer for e in events}) == 4  # one command buffer each
    assert all(e.ms is not None and e.ms >= 0 for e in events)
    assert sum(e.ms for e in events) > 0

    table = prof.table()
    axpb_row = next(line for line in table.splitlines() if line.startswith("axpb"))
    assert axpb_row.split()[1] == "3"  # calls
    assert axpb_row.split()[-1] != "-"  # GB/s known (bytes= given)
    sum_row = next(line for line in table.splitlines() if line.startswith("group_sum"))
    assert sum_row.split()[-2] != "-"  # GFLOP/s known (flops= given)
    assert ("simulator" in table) == metal.is_simulator()
    np.testing.assert_array_equal(out.numpy(), np.full(n // 256, 256.0))


def test_camel_profile_env_prints_table_at_exit(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(
        "import numpy as np\n"
        "import camel.profiler\n"
        "from camel import metal\n"
        f"lib = metal.compile({SOURCE!r})\n"
        "x = metal.DeviceArray.from_numpy(np.ones(64, np.float32))\n"
        "y = metal.DeviceArray.empty(64)\n"
        "lib.function('axpb')(x, y, 1.0, 2.0, 64, threads=64, threads_per_threadgroup=32)\n"
        "assert (y.numpy() == 3).all()\n"
    )
    env = dict(os.environ, CAMEL_PROFILE="1")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert "camel.profile: 1 dispatches" in proc.stderr
    assert re.search(r"^axpb\s+1\s", proc.stderr, re.M), proc.stderr


@pytest.mark.parametrize(
    "grid, error, match",
    [
        ((1.5, 1, 1), TypeError, "tuple of 1-3 ints"),
        ((4, -1, 1), ValueError, ">= 1 in every dimension"),
        (2**32, ValueError, ">= 1 in every dimension"),
        ("x", TypeError, "tuple of 1-3 ints"),
        ((1, 1, 1, 1), TypeError, "1-3 entries"),
    ],
)
def test_grid_spellings_that_are_rejected(lib, grid, error, match):
    fn = lib.function("axpb")
    x, y = metal.DeviceArray.empty(8), metal.DeviceArray.empty(8)
    with pytest.raises(error, match=match):
        fn(x, y, 1.0, 0.0, 8, threads=grid, threads_per_threadgroup=8)
    with pytest.raises(error, match=match):
        fn(x, y, 1.0, 0.0, 8, threads=8, threads_per_threadgroup=grid)


def test_grid_spellings_that_are_accepted(lib):
    fn = lib.function("axpb")
    x = metal.DeviceArray.from_numpy(np.arange(40, dtype=np.float32))
    for grid, tpg in [(40, 8), ((40,), (8,)), ((40, 1), (8, 1)), (np.int64(40), np.int32(8)),
                      ((np.uint32(40), 1, 1), [8, 1, 1])]:  # fmt: skip
        y = metal.DeviceArray.zeros(40)
        fn(x, y, 2.0, 0.0, 40, threads=grid, threads_per_threadgroup=tpg)
        np.testing.assert_array_equal(y.numpy(), 2 * np.arange(40))


def test_profile_without_dispatches():
    from camel.profiler import profile

    with profile() as prof:
        pass
    assert prof.events == []
    assert prof.table() == "camel.profile: no kernel dispatches"


def test_the_packages_state_is_read_where_it_lives_and_not_set_on_the_package():
    # camel.metal is a package; the shim's state and the poison hook live in its modules.
    # A name set on the package would reach no code: that is an error naming the module.
    metal.device_name()  # loaded
    assert metal._lib is metal.loading._lib is not None
    assert metal.poison_byte is metal.buffers.poison_byte
    with pytest.raises(AttributeError, match=r"set camel\.metal\.buffers\.poison_byte"):
        metal.poison_byte = 0xFF
    assert metal.buffers.poison_byte is None
    with pytest.raises(AttributeError, match="has no attribute '_no_such_name'"):
        metal._no_such_name  # noqa: B018
