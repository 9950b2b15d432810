"""The CUDA shim's host logic, without a GPU: shim/build/libcamel_cuda.so over a fake
libcuda.so.1 (shim/cuda/tests/fake_libcuda.c, compiled here into a temporary folder put
first on LD_LIBRARY_PATH of a Python subprocess). The fake keeps "device memory" on the
host, runs queued work only when someone waits (so pending work is observable) and logs
every launch with its configuration. What it checks: how dispatchThreads is split into
uniform launches, setBytes staging, host mirrors (did_modify / sync order), deferred
frees, the error texts (JIT log, out of memory, a sticky fault) and the shim selection.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import itertools
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FAKE_SRC = ROOT / "shim" / "cuda" / "tests" / "fake_libcuda.c"
CUDA_LIB = ROOT / "shim" / "build" / "libcamel_cuda.so"


def _cc():
    for cc in ("clang-19", "clang-18", "clang-17", "clang-16", "clang", "cc", "gcc"):
        if shutil.which(cc):
            return cc
    pytest.skip("no C compiler for the fake libcuda")


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    """A folder holding the fake libcuda.so.1 (the CUDA shim built first)."""
    r = subprocess.run(["make", "-C", str(ROOT / "shim"), "cuda"], capture_output=True, text=True)
    if r.returncode != 0:
        if os.environ.get("CI"):
            raise AssertionError(f"make cuda failed:\n{r.stdout}{r.stderr}")
        pytest.skip(f"cannot build the CUDA shim: {r.stderr[-500:]}")
    folder = tmp_path_factory.mktemp("fake_cuda")
    out = folder / "libcuda.so.1"
    r = subprocess.run(
        [_cc(), "-shared", "-fPIC", "-O1", "-Wall", "-o", str(out), str(FAKE_SRC)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    return folder


PRELUDE = '''
import ctypes
import ctypes.util
import numpy as np
from camel import metal

PTX = """
entry camel_kernel_0 cover
entry camel_kernel_1 axpb
global camel_kernel_1_value_sizes 0 0 4 4 4
entry camel_kernel_2 fault
entry camel_kernel_3 record
smem camel_kernel_3 1024
entry camel_kernel_4 record
maxthreads camel_kernel_4 256
"""
KERNELS = """kernel 0 cover 0 0
param 0 0 counts 1 0 1
param 0 1 sizes 1 1 1
param 0 2 errors 1 2 1
param 0 3 gid 3 0 0
kernel 1 axpb 0 0
param 1 0 x 1 0 1
param 1 1 y 1 1 1
param 1 2 a 1 2 0
param 1 3 b 1 3 0
param 1 4 n 1 4 0
kernel 2 fault 0 0
param 2 0 out 1 0 1
kernel 3 tgmem 1 0
param 3 0 out 1 0 1
param 3 1 scratch 2 0 1
kernel 4 heavy 0 0
param 4 0 out 1 0 1
"""


def load(ptx=PTX, kernels=KERNELS):
    lib = metal._native()
    f = lib.camel_cuda_library_load
    f.argtypes = [ctypes.c_char_p] * 3
    f.restype = ctypes.c_void_p
    handle = f(ptx.encode(), kernels.encode(), b"fake.metal")
    if not handle:
        raise metal.CompileError(metal._error_text(), metal._error_text())
    return metal.Library(handle, "fake.metal")


def log():
    import os

    path = os.environ["FAKE_CUDA_LOG"]
    return open(path).read().splitlines() if os.path.exists(path) else []
'''


def run(fake: Path, body: str, **env) -> subprocess.CompletedProcess:
    """Run PRELUDE + body in a Python subprocess on the fake driver; env adds variables."""
    full = dict(os.environ)
    full.pop("CAMEL_SHIM_LIBRARY", None)
    full.update(
        LD_LIBRARY_PATH=f"{fake}:{os.environ.get('LD_LIBRARY_PATH', '')}",
        CAMEL_SHIM="cuda",
        PYTHONPATH=str(ROOT),
        FAKE_CUDA_LOG=str(fake / f"log-{os.getpid()}-{abs(hash(body))}"),
    )
    Path(full["FAKE_CUDA_LOG"]).unlink(missing_ok=True)
    full.update({k: str(v) for k, v in env.items() if v is not None})
    for k, v in env.items():
        if v is None:
            full.pop(k, None)
    code = PRELUDE + textwrap.dedent(body)
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=full, timeout=120
    )


def ok(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 0, f"stdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    return r.stdout


# ---- dispatchThreads as uniform launches ---------------------------------------------


def _split(grid, tpg, is_threads=1, max_grid=(0x7FFFFFFF, 65535, 65535)):
    lib = ctypes.CDLL(str(CUDA_LIB))  # camel_cuda_split needs no driver
    u3 = ctypes.c_uint32 * 3
    out = (ctypes.c_uint32 * (9 * 64))()
    lib.camel_cuda_split.restype = ctypes.c_uint32
    n = lib.camel_cuda_split(u3(*grid), u3(*tpg), is_threads, u3(*max_grid), out, 64)
    return [
        tuple(tuple(out[9 * i + 3 * j : 9 * i + 3 * j + 3]) for j in range(3)) for i in range(n)
    ]


def _metal_threads(grid, tpg):
    """(thread position, threads_per_threadgroup) of every thread Metal runs."""
    for gid in itertools.product(*(range(n) for n in grid)):
        group = [g // t for g, t in zip(gid, tpg, strict=True)]
        size = tuple(min(t, n - grp * t) for n, t, grp in zip(grid, tpg, group, strict=True))
        yield gid, size


def _piece_threads(pieces, tpg):
    for grid, block, origin in pieces:
        for b in itertools.product(*(range(n) for n in grid)):
            for t in itertools.product(*(range(n) for n in block)):
                parts = zip(origin, b, tpg, t, strict=True)
                gid = tuple((o + bb) * tt + th for o, bb, tt, th in parts)
                yield gid, block


@pytest.mark.parametrize(
    "grid, tpg",
    [
        ((33, 1, 1), (32, 1, 1)),
        ((257, 3, 5), (32, 2, 4)),
        ((32, 1, 1), (32, 1, 1)),
        ((1, 1, 1), (64, 1, 1)),
        ((65, 7, 1), (8, 8, 1)),
    ],  # fmt: skip
)
def test_dispatch_threads_split_matches_metal(fake, grid, tpg):
    pieces = _split(grid, tpg)
    assert 1 <= len(pieces) <= 8
    got = sorted(_piece_threads(pieces, tpg))
    want = sorted(_metal_threads(grid, tpg))
    assert got == want  # every thread exactly once, none outside, Metal's edge sizes


def test_split_examples(fake):
    assert _split((33, 1, 1), (32, 1, 1)) == [
        ((1, 1, 1), (32, 1, 1), (0, 0, 0)),
        ((1, 1, 1), (1, 1, 1), (1, 0, 0)),
    ]
    assert len(_split((257, 3, 5), (32, 2, 4))) == 8
    # dispatchThreadgroups: one launch of uniform groups
    assert _split((5, 6, 7), (32, 2, 1), is_threads=0) == [((5, 6, 7), (32, 2, 1), (0, 0, 0))]
    # CUDA's grid limit (65535 in y): more launches, the origin says where each starts
    assert _split((1, 10, 1), (32, 1, 1), 0, (0x7FFFFFFF, 4, 65535)) == [
        ((1, 4, 1), (32, 1, 1), (0, 0, 0)),
        ((1, 4, 1), (32, 1, 1), (0, 4, 0)),
        ((1, 2, 1), (32, 1, 1), (0, 8, 0)),
    ]


def test_pieces_run_on_the_driver(fake):
    out = ok(
        run(
            fake,
            """
            L = load()
            n = (257, 3, 5)
            c = metal.DeviceArray.zeros(n[::-1], np.uint32)
            s = metal.DeviceArray.zeros(n[::-1], np.uint32)
            e = metal.DeviceArray.zeros(1, np.uint32)
            L.function("cover")(c, s, e, threads=n, threads_per_threadgroup=(32, 2, 4))
            assert (c.numpy() == 1).all() and e.numpy()[0] == 0
            sizes = s.numpy()
            bx, by, bz = sizes & 2047, (sizes >> 11) & 2047, sizes >> 22
            assert (bx[:, :, :256] == 32).all() and (bx[:, :, 256] == 1).all()
            assert (by[:, :2] == 2).all() and (by[:, 2] == 1).all()
            assert (bz[:4] == 4).all() and (bz[4] == 1).all()
            launches = [line for line in log() if line.startswith("launch")]
            assert len(launches) == 8, launches
            assert "grid 1 1 1 block 1 1 1 smem 0 origin 8 1 1" in launches[-1]
            print("ok")
            """,
        )
    )
    assert out.strip() == "ok"


# ---- setBytes, mirrors, deferred frees ---------------------------------------------------


def test_setbytes_are_staged_and_mirrors_follow_the_rule(fake):
    ok(
        run(
            fake,
            """
            L = load()
            fn = L.function("axpb")
            x = np.arange(37, dtype=np.float32)
            dx, dy = metal.DeviceArray.from_numpy(x), metal.DeviceArray.empty(37)
            fn(dx, dy, 2.0, 1.0, 37, threads=37, threads_per_threadgroup=32)  # a, b, n staged
            np.testing.assert_array_equal(dy.numpy(), 2 * x + 1)  # a kernel writes, host reads
            view = dx.numpy()
            view[:] = -x  # the host writes through a view ...
            fn(dx, dy, 2.0, 1.0, 37, threads=37, threads_per_threadgroup=32)  # ... a kernel reads
            np.testing.assert_array_equal(dy.numpy(), -2 * x + 1)
            out_view = dy.numpy()
            fn(dx, dy, 1.0, 0.0, 37, threads=37, threads_per_threadgroup=32)
            metal.synchronize()  # refreshes live views
            np.testing.assert_array_equal(out_view, -x)
            del view, out_view
            dx.numpy()[:] = 3 * x  # a temporary view, written and dropped at once
            fn(dx, dy, 1.0, 0.0, 37, threads=37, threads_per_threadgroup=32)
            np.testing.assert_array_equal(dy.numpy(), 3 * x)
            old = dy.numpy()  # read, then a kernel writes the buffer, then the view dies:
            fn(dx, dy, 2.0, 0.0, 37, threads=37, threads_per_threadgroup=32)
            del old  # ... the device's result stands (nothing to upload)
            np.testing.assert_array_equal(dy.numpy(), 6 * x)
            lines = log()
            # each upload precedes the launch that reads it; downloads follow it
            first = lines.index(next(l for l in lines if l.startswith("launch")))
            assert lines[first - 2 : first] == ["htod 48", "htod 148"], lines  # setBytes, x
            assert lines[first + 1].startswith("launch")  # the edge piece: 5 threads
            assert lines[first + 2] == "dtoh 256", lines  # dy.numpy()
            # while views of dx and dy live, both are uploaded before the dispatch
            third = [i for i, l in enumerate(lines) if "block 32 1 1" in l][2]
            assert lines[third - 3 : third] == ["htod 48", "htod 256", "htod 256"], lines
            """,
        )
    )


def test_value_sizes_checked_against_setbytes(fake):
    r = run(
        fake,
        """
        L = load()
        dx, dy = metal.DeviceArray.empty(4), metal.DeviceArray.empty(4)
        L.function("axpb")(dx, dy, np.zeros(2, np.float32), 1.0, 4, threads=4,
                           threads_per_threadgroup=4)
        """,
    )
    assert r.returncode != 0
    assert "parameter 2 'a' ([[buffer(2)]]) is a 4-byte value, got 8 bytes" in r.stderr


def test_buffers_released_while_pending_are_freed_after_completion(fake):
    ok(
        run(
            fake,
            """
            L = load()
            x = metal.DeviceArray.from_numpy(np.ones(1000, np.float32))
            y = metal.DeviceArray.empty(1000)
            L.function("axpb")(x, y, 2.0, 1.0, 1000, threads=1000, threads_per_threadgroup=256)
            metal.commit()  # queued on the (lazy) fake GPU, not run
            before = metal.memory_stats()["buffers"]
            del x, y
            metal.empty_cache()  # releases both while the command buffer is pending
            assert metal.memory_stats()["buffers"] == before, "freed while pending"
            assert not any(l.startswith("free 4096") for l in log())
            metal.synchronize()
            assert metal.memory_stats()["buffers"] == before - 2
            assert sum(l == "free 4096" for l in log()) == 2, log()
            """,
        )
    )


def test_dynamic_shared_memory_opt_in_and_limits(fake):
    ok(
        run(
            fake,
            """
            L = load()
            out = metal.DeviceArray.empty(4)
            fn = L.function("tgmem")
            assert fn.static_threadgroup_memory == 1024
            fn(out, threads=32, threads_per_threadgroup=32, threadgroup_memory=[100 * 1024])
            metal.synchronize()
            assert "setattr camel_kernel_3 max_dynamic_shared 102400" in log(), log()
            assert any("smem 102400" in l for l in log())
            try:
                fn(out, threads=32, threads_per_threadgroup=32, threadgroup_memory=[300 * 1024])
                raise SystemExit("no error")
            except metal.DispatchError as e:
                assert "needs 308224 bytes" in str(e) and "232448" in str(e), e
            heavy = L.function("heavy")
            assert heavy.max_total_threads_per_threadgroup == 256
            try:
                heavy(out, threads=512, threads_per_threadgroup=512)
                raise SystemExit("no error")
            except metal.DispatchError as e:
                assert "512 threads exceeds" in str(e) and "256" in str(e), e
            try:
                heavy(out, threads=(1, 1, 128), threads_per_threadgroup=(1, 1, 128))
                raise SystemExit("no error")
            except metal.DispatchError as e:
                assert "block limit 64" in str(e), e
            """,
        )
    )


# ---- errors ---------------------------------------------------------------------------------


def test_ptx_jit_errors_carry_the_log(fake):
    r = run(fake, "load(ptx='bad ptx')")
    assert r.returncode != 0
    assert "cannot load the PTX of fake.metal: CUDA_ERROR_INVALID_PTX" in r.stderr
    assert "fake syntax error" in r.stderr


def test_out_of_memory_names_the_sizes(fake):
    r = run(fake, "metal.DeviceArray.empty(1 << 20)", FAKE_CUDA_MEM_LIMIT=1 << 20)
    assert r.returncode != 0
    assert "out of device memory: cannot allocate a buffer of 4194304 bytes (4.0 MiB)" in r.stderr
    assert "free of 1.0 MiB" in r.stderr


def test_a_fault_names_the_kernel_and_leaves_the_context_unusable(fake):
    body = """
        L = load()
        out = metal.DeviceArray.empty(4)
        x = metal.DeviceArray.empty(4)
        L.function("axpb")(x, out, 1.0, 0.0, 4, threads=4, threads_per_threadgroup=4)
        try:
            L.function("fault")(out, threads=(40, 2), threads_per_threadgroup=(32, 1))
            metal.synchronize()
            raise SystemExit("no error")
        except metal.MetalError as e:
            print(e)
        try:
            metal.DeviceArray.empty(4)
            raise SystemExit("no second error")
        except metal.MetalError as e:
            print(e)
        """
    out = ok(run(fake, body))
    first, second = out.strip().split("\n")
    assert "CUDA_ERROR_ILLEGAL_ADDRESS (an illegal memory access was encountered)" in first
    assert "'fault' (dispatch 2: threads=(40, 2, 1), threads_per_threadgroup=(32, 1, 1))" in first
    assert "'axpb' (dispatch 1" in first
    assert "unusable" in first and "restart the Python process" in first
    assert "CAMEL_CUDA_SYNC=1" in first
    assert "unusable" in second
    # CAMEL_CUDA_SYNC=1: the dispatch itself fails, naming that one kernel
    out = ok(run(fake, body, CAMEL_CUDA_SYNC=1))
    first = out.strip().split("\n")[0]
    assert "dispatch of kernel 'fault' failed" in first and "held 1 dispatch:" in first


def test_vendor_extras_say_what_is_missing(fake):
    out = ok(
        run(
            fake,
            """
            a = metal.DeviceArray.empty((2, 3))
            c = metal.DeviceArray.empty((2, 2))
            for call in (lambda: metal.mps_matmul(a, a.reshape(3, 2), c),
                         lambda: metal.mpsgraph_attention(a, a, a, a, 1.0),
                         lambda: metal.capture_begin("x.gputrace")):
                try:
                    call()
                    raise SystemExit("no error")
                except metal.MetalError as e:
                    print(e)
            """,
            CAMEL_CUBLAS="/nonexistent/libcublas.so.12",  # a real one must not meet the fake
        )
    )
    gemm, attention, capture = out.strip().split("\n")
    assert "needs cuBLAS, and CAMEL_CUBLAS could not be loaded" in gemm
    assert "/nonexistent/libcublas.so.12" in gemm
    assert "MPSGraph attention is not available on the CUDA shim" in attention
    assert "scaled_dot_product_attention" in attention
    assert "Nsight" in capture


def test_mps_matmul_through_cublas_is_row_major(fake):
    ok(
        run(
            fake,
            """
            rng = np.random.default_rng(0)
            a = rng.standard_normal((5, 3)).astype(np.float32)
            b = rng.standard_normal((3, 7)).astype(np.float32)
            da, db = metal.DeviceArray.from_numpy(a), metal.DeviceArray.from_numpy(b)
            dc = metal.DeviceArray.empty((5, 7))
            metal.mps_matmul(da, db, dc)
            np.testing.assert_allclose(dc.numpy(), a @ b, rtol=1e-5, atol=1e-5)
            assert "cublas math mode 0" in log()  # CUBLAS_DEFAULT_MATH: no TF32
            assert "sgemm 7 5 3" in log(), log()  # column-major Cᵀ = Bᵀ·Aᵀ
            """,
            CAMEL_CUBLAS=fake / "libcuda.so.1",
        )
    )


# ---- selection ----------------------------------------------------------------------------


def test_selection(fake, tmp_path):
    probe = "print(metal.shim(), '|', metal.device_name())"
    # the default on Linux: cuda when the driver loads and sees a device ...
    out = ok(run(fake, probe, CAMEL_SHIM=None))
    assert out.strip() == "cuda | Fake GPU (CUDA shim: MSL translated to PTX)"
    # ... else the simulator
    out = ok(run(fake, probe, CAMEL_SHIM=None, FAKE_CUDA_DEVICES=0))
    assert out.strip().startswith("sim | camel simulator")
    # asked for explicitly: a clear error, no fallback
    r = run(fake, probe, FAKE_CUDA_DEVICES=0)
    assert r.returncode != 0 and "no CUDA device" in r.stderr and "CAMEL_SHIM=sim" in r.stderr
    empty = tmp_path / "no_driver"
    empty.mkdir()
    if ctypes.util.find_library("cuda") is None:  # this machine has no real driver
        r = run(empty, probe)
        assert r.returncode != 0
        assert "no NVIDIA driver: cannot load libcuda.so.1" in r.stderr, r.stderr
        out = ok(run(empty, probe, CAMEL_SHIM=None))
        assert out.startswith("sim |")


def test_device_cuda_is_an_alias_of_mps_there(fake):
    out = ok(
        run(
            fake,
            """
            import camel
            t = camel.tensor([1.0, 2.0, 3.0], device="cuda")
            assert t.device == "mps" and t.to("cuda") is t and t.to("mps") is t
            np.testing.assert_array_equal(t.numpy(), [1.0, 2.0, 3.0])
            print(t.to("cpu").device)
            """,
        )
    )
    assert out.strip() == "cpu"


def test_translated_shaders_load_bind_and_check_value_sizes(fake):
    """The translator's real PTX and kernel description through the runtime: entries
    found, parameters bound, the value sizes read from the module and enforced."""
    ok(
        run(
            fake,
            """
            fn = metal.kernel("ops_elementwise.metal", "add_float")
            a, b, out = (metal.DeviceArray.empty(100) for _ in range(3))
            fn(a, b, out, 100, threads=100, threads_per_threadgroup=64)
            metal.synchronize()
            launches = [l for l in log() if l.startswith("launch")]
            assert launches == [
                "launch camel_add_float grid 1 1 1 block 64 1 1 smem 0 origin 0 0 0",
                "launch camel_add_float grid 1 1 1 block 36 1 1 smem 0 origin 1 0 0",
            ], launches
            try:  # n is a `constant uint &`: 4 bytes, from camel_kernel_0_value_sizes
                fn(a, b, out, np.zeros(2, np.uint32), threads=100, threads_per_threadgroup=64)
                raise SystemExit("no error")
            except metal.DispatchError as e:
                assert "is a 4-byte value, got 8 bytes" in str(e), e
            """,
        )
    )


def test_function_constants_specialise_the_kernel(fake):
    """camel_pipeline_new_with_constants on the CUDA shim: the library lists its function
    constants, each set of values is a PTX module of that kernel alone (the fake records
    each module's entries), the values are in the translation, and a constant the kernel
    uses without a value fails the pipeline with its name."""
    ok(
        run(
            fake,
            """
            import glob, os
            src = (
                "#include <metal_stdlib>\\n"
                "using namespace metal;\\n"
                "constant int k [[function_constant(0)]];\\n"
                "constant float scale [[function_constant(3)]];\\n"
                "constant bool has_k = is_function_constant_defined(k);\\n"
                "kernel void fc_scale(device float *y [[buffer(0)]],\\n"
                "                     uint i [[thread_position_in_grid]]) {\\n"
                "    y[i] = (has_k ? float(k) : -1.0f) * scale;\\n"
                "}\\n"
                "kernel void fc_plain(device float *y [[buffer(0)]],\\n"
                "                     uint i [[thread_position_in_grid]]) {\\n"
                "    y[i] = 1.0f;\\n"
                "}\\n"
            )
            lib = metal.compile(src, "fc_cuda.metal")
            want = {"k": (0, "int"), "scale": (3, "float")}
            assert lib.function_constants == want, lib.function_constants
            y = metal.DeviceArray.empty(40)
            fn = lib.function("fc_scale", constants={"k": 7, "scale": 2.5})
            fn(y, threads=40, threads_per_threadgroup=32)
            lib.function("fc_scale", constants={3: -0.75})(y, threads=8, threads_per_threadgroup=8)
            lib.function("fc_plain")(y, threads=8, threads_per_threadgroup=8)
            metal.synchronize()
            launches = [line.split()[1] for line in log() if line.startswith("launch")]
            want = ["camel_fc_scale"] * 3 + ["camel_fc_plain"]
            assert launches == want, launches
            folder = os.environ["XDG_CACHE_HOME"] + "/camel/cuda/"
            cached = [open(p).read() for p in glob.glob(folder + "*.cu")]
            special = [c for c in cached if "camel_fc_scale(camel_cuda_args" in c]
            special = [c for c in special if "camel_fc_plain(camel_cuda_args" not in c]
            values = ("int k = int(7);", "float scale = 0x1.4p+1f;")
            assert any(all(v in c for v in values) for c in special), len(special)
            try:
                lib.function("fc_scale", constants={"k": 1})
                raise SystemExit("no error")
            except metal.MetalError as e:
                assert "kernel 'fc_scale' uses function constant 'scale' (index 3" in str(e), e
            """,
            XDG_CACHE_HOME=fake / "cache-fc",
        )
    )


def test_command_buffers_commit_early_and_at_256(fake):
    out = ok(
        run(
            fake,
            """
            L = load()
            out = metal.DeviceArray.empty(4)
            fn = L.function("heavy")  # records its launch, nothing more
            ids = []
            for _ in range(300):
                fn(out, threads=32, threads_per_threadgroup=32)
                ids.append(out.buffer.last_use)
            sizes = [ids.count(i) for i in sorted(set(ids))]
            print(sizes)
            """,
        )
    )
    # 16 encoded with the GPU idle: sent; 16 more with one queued: sent; then two are
    # queued (the fake GPU runs only when waited on), so the third waits for the cap.
    assert out.strip() == "[16, 16, 256, 12]"


def test_set_bytes_limit_matches_the_other_shims():
    import re

    from camel import metal

    source = (ROOT / "shim" / "cuda" / "runtime.cpp").read_text()
    assert int(re.search(r"kMaxSetBytes = (\d+)", source).group(1)) == metal.MAX_SET_BYTES
