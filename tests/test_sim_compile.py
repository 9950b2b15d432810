"""The simulator's MSL compiler (shim/front/translate*.cpp): errors with .metal line
numbers, the portability guard, templates with [[host_name]], the rewrite of
address spaces and threadgroup declarations, the on-disk cache and sanitizers.

Only meaningful on the simulator: on a Mac with the Metal shim these are skipped.
"""

import os
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
from conftest import sim_library_description

metal = pytest.importorskip("camel.metal")

ROOT = Path(__file__).resolve().parents[1]
HEADER = "#include <metal_stdlib>\nusing namespace metal;\n"


@pytest.fixture(autouse=True)
def _simulator_only():
    if not metal.is_simulator():
        pytest.skip("tests of the simulator's compiler")


def _fresh(source):
    """Make the source unique so it misses the kernel cache."""
    return source + f"\n// {uuid.uuid4().hex}\n"


def _compile_error(source, path="bad.metal"):
    with pytest.raises(metal.CompileError) as info:
        metal.compile(_fresh(source), path)
    return str(info.value)


def _dev(x):
    return metal.DeviceArray.from_numpy(np.ascontiguousarray(x))


# ---- compiler errors point into the .metal file ------------------------------------------


def test_compile_error_has_metal_line():
    src = HEADER + (
        "\n"  # line 3
        "/* a comment\n"  # 4
        "   over two lines */\n"  # 5
        "#define SCALE 2.0\n"  # 6
        "kernel void k(device float* x [[buffer(0)]],\n"  # 7
        "              uint i [[thread_position_in_grid]]) {\n"  # 8
        "    threadgroup float tile[16];\n"  # 9
        "    x[i] = x[i] * SCALE;\n"  # 10
        "    x[i] = undefined_name + 1.0;\n"  # 11
        "}\n"
    )
    msg = _compile_error(src, "shaders/broken.metal")
    assert "shaders/broken.metal:11:" in msg
    assert "undefined_name" in msg


def test_compile_error_without_path_names_program_source():
    msg = _compile_error(
        HEADER + "kernel void k(device float* x [[buffer(0)]]) { x[0] = y; }\n", None
    )
    assert "program_source:3:" in msg


def test_compile_error_in_included_header_keeps_line(tmp_path):
    (tmp_path / "helpers.h").write_text("inline float twice(float x) {\n    return x * 2.0;\n}\n")
    src = HEADER + '#include "helpers.h"\nkernel void k(device float* x [[buffer(0)]]) {\n'
    src += "    x[0] = twice(x[0]) + nope;\n}\n"
    msg = _compile_error(src, str(tmp_path / "main.metal"))
    assert "main.metal:5:" in msg


def test_kernel_parameter_without_attribute_is_an_error():
    src = HEADER + "kernel void k(device float* x [[buffer(0)]],\n              uint i) {\n}\n"
    msg = _compile_error(src)
    assert "bad.metal:4:" in msg and "'i' needs an attribute" in msg


def test_kernel_must_return_void():
    src = HEADER + "kernel float k(device float* a [[buffer(0)]]) {\n    return a[0];\n}\n"
    assert "bad.metal:3: kernel 'k' must return void" in _compile_error(src)


def test_buffer_slots_are_checked():
    src = HEADER + (
        "kernel void k(device float* a [[buffer(1)]],\n"
        "              device float* b [[buffer(1)]],\n"
        "              device float* c [[buffer(31)]]) {\n"
        "}\n"
    )
    msg = _compile_error(src, "slots.metal")
    assert "slots.metal:3: kernel 'k': parameters 'a' and 'b' are both [[buffer(1)]]" in msg
    assert "[[buffer(31)]] is out of range; Metal has slots 0 to 30" in msg


# ---- the portability guard: what Apple's compiler rejects ---------------------------------

GUARD_CASES = [
    ("double", "    double d = 1.0;\n", "'double' is not supported by Metal"),
    ("long_double_literal", "    float d = 1.0L;\n", "long double literal"),
    ("new", "    float* p = new float[4];\n", "'new' is not supported by Metal"),
    ("delete", "    delete x;\n", "'delete' is not supported by Metal"),
    ("throw", "    if (x[0] < 0) throw 1;\n", "exceptions are not supported"),
    ("try", "    try { x[0] = 1; } catch (...) {}\n", "'try': exceptions"),
    ("goto", "    goto end; end: x[0] = 0;\n", "'goto' is not supported"),
    ("thread_local", "    static thread_local float t = 0;\n", "'thread_local' is not supported"),
    ("virtual", "    struct S { virtual float f() { return 1; } };\n", "'virtual' functions"),
    ("typeid", "    auto &t = typeid(x);\n", "'typeid' (run-time type information)"),
]


@pytest.mark.parametrize("case", GUARD_CASES, ids=[c[0] for c in GUARD_CASES])
def test_guard_rejects_with_line(case):
    _, line, message = case
    src = HEADER + "kernel void k(device float* x [[buffer(0)]]) {\n" + line + "}\n"
    msg = _compile_error(src, "shaders/guard.metal")
    assert "[sim] shaders/guard.metal:4: " in msg and message in msg, msg


@pytest.mark.parametrize("header", ["cmath", "vector", "iostream", "stdio.h"])
def test_guard_rejects_standard_library_includes(header):
    src = "#include <metal_stdlib>\n#include <" + header + ">\nusing namespace metal;\n"
    msg = _compile_error(src, "std.metal")
    assert f"std.metal:2: '#include <{header}>'" in msg
    assert "no C or C++ standard library" in msg


def test_guard_rejects_recursion():
    src = HEADER + (
        "float fact(float n) {\n"  # 3
        "    return n <= 1.0f ? 1.0f : n * fact(n - 1.0f);\n"  # 4
        "}\n"
        "kernel void k(device float* x [[buffer(0)]]) { x[0] = fact(x[0]); }\n"
    )
    msg = _compile_error(src, "rec.metal")
    assert "rec.metal:4: function 'fact' calls itself; recursion is not supported" in msg


def test_overloads_calling_each_other_are_not_recursion():
    src = HEADER + (
        "inline float relu(float x) { return max(x, 0.0f); }\n"
        "inline float4 relu(float4 v) {\n"
        "    return float4(relu(v.x), relu(v.y), relu(v.z), relu(v.w));\n"
        "}\n"
        "kernel void k(device float4* x [[buffer(0)]], uint i [[thread_position_in_grid]]) {\n"
        "    x[i] = relu(x[i]);\n"
        "}\n"
    )
    lib = metal.compile(src, "overloads.metal")
    x = _dev(np.array([[-1, 2, -3, 4], [5, -6, 7, -8]], np.float32))
    lib.function("k")(x, threads=2, threads_per_threadgroup=2)
    np.testing.assert_array_equal(x.numpy(), [[0, 2, 0, 4], [5, 0, 7, 0]])


def test_guard_reports_every_problem():
    src = HEADER + (
        "kernel void k(device float* x [[buffer(0)]]) {\n"
        "    double a = 1;\n"  # 4
        "    float* p = new float;\n"  # 5
        "}\n"
    )
    msg = _compile_error(src, "two.metal")
    assert "two.metal:4:" in msg and "two.metal:5:" in msg


# ---- what the rewrite accepts -------------------------------------------------------------

REWRITE_SRC = (
    HEADER
    + r"""
constant float kScale = 3.0;
constant float kTable[4] = {1.0, 2.0, 4.0, 8.0};

struct Params {
    uint n;
    float bias;
    // called on a constant Params&: `this` in constant memory (unqualified, it is thread)
    float apply(float v) const constant { return v * kScale + bias; }
};

namespace detail {
// helper taking pointers into threadgroup and device memory
inline void copy_in(threadgroup float* dst, device const float* src, uint i) { dst[i] = src[i]; }
}

// templates: two instantiations of one kernel under host names
template <typename T, uint WIDTH>
kernel void scale_t(device const T* x [[buffer(0)]], device T* y [[buffer(1)]],
                    constant Params& p [[buffer(2)]],
                    uint2 gid [[thread_position_in_grid]]) {
    uint i = gid.y * WIDTH + gid.x;
    if (i < p.n) y[i] = T(p.apply(float(x[i]))) + T(kTable[i % 4]);
}
template [[host_name("scale_f32")]] kernel void scale_t<float, 8>(
    device const float*, device float*, constant Params&, uint2);
template [[host_name("scale_f16_w4")]] [[kernel]] void scale_t<half, 4>(
    device const half*, device half*, constant Params&, uint2);

namespace nested {
template <typename T>
kernel void fill_t(device T* y [[buffer(0)]], uint i [[thread_position_in_grid]]) { y[i] = T(i); }
}
template [[host_name("fill_u32")]] kernel void nested::fill_t<uint>(device uint*, uint);

namespace nested {
// reverse within a threadgroup: a threadgroup array, a barrier, ushort builtins
kernel void reverse_tg(device const float* x [[buffer(0)]], device float* y [[buffer(1)]],
                       ushort lid [[thread_position_in_threadgroup]],
                       ushort n [[threads_per_threadgroup]],
                       uint gid [[thread_position_in_grid]]) {
    threadgroup float tile[64],
                      unused[2];
    detail::copy_in(tile, x + (gid - lid), lid);
    threadgroup_barrier(mem_flags::mem_threadgroup);
    y[gid] = tile[n - 1 - lid];
}
}

// dynamic threadgroup memory through [[threadgroup(0)]], parameters without indices
kernel void shift_dyn(device const float* x, device float* y,
                      threadgroup float* buf [[threadgroup(0)]],
                      uint lid [[thread_index_in_threadgroup]],
                      uint gid [[thread_position_in_grid]],
                      uint3 ntg [[threadgroups_per_grid]]) {
    buf[lid] = x[gid];
    threadgroup_barrier(mem_flags::mem_threadgroup);
    y[gid] = buf[(lid + 1) % 32] + float(ntg.x);
}
"""
)


@pytest.fixture(scope="module")
def rewrite_lib():
    return metal.compile(REWRITE_SRC, "rewrite.metal")


def test_kernel_names(rewrite_lib):
    assert sorted(rewrite_lib.function_names) == [
        "fill_u32",
        "reverse_tg",
        "scale_f16_w4",
        "scale_f32",
        "shift_dyn",
    ]


@pytest.mark.parametrize(
    "name,dtype,width", [("scale_f32", np.float32, 8), ("scale_f16_w4", np.float16, 4)]
)
def test_template_instantiations(rewrite_lib, name, dtype, width):
    n = 29
    x = np.linspace(-2, 2, n).astype(dtype)
    y = metal.DeviceArray.zeros(n, dtype)
    params = np.array([(n, 0.5)], dtype=[("n", np.uint32), ("bias", np.float32)])
    rows = (n + width - 1) // width
    rewrite_lib.function(name)(
        _dev(x), y, params, threads=(width, rows), threads_per_threadgroup=(width, 1)
    )
    table = np.array([1, 2, 4, 8], np.float32)[np.arange(n) % 4]
    want = (x.astype(np.float32) * 3 + 0.5).astype(dtype) + table.astype(dtype)
    tol = 1e-6 if dtype == np.float32 else 1e-2
    np.testing.assert_allclose(y.numpy().astype(np.float32), want.astype(np.float32), rtol=tol)


def test_template_instantiated_outside_its_namespace(rewrite_lib):
    y = metal.DeviceArray.zeros(10, np.uint32)
    rewrite_lib.function("fill_u32")(y, threads=10, threads_per_threadgroup=4)
    np.testing.assert_array_equal(y.numpy(), np.arange(10))


def test_threadgroup_array_and_ushort_builtins(rewrite_lib):
    x = np.arange(3 * 64, dtype=np.float32)
    y = metal.DeviceArray.zeros(x.size, np.float32)
    rewrite_lib.function("reverse_tg")(_dev(x), y, threadgroups=3, threads_per_threadgroup=64)
    np.testing.assert_array_equal(y.numpy(), x.reshape(3, 64)[:, ::-1].ravel())


def test_dynamic_threadgroup_memory_and_implicit_indices(rewrite_lib):
    x = np.arange(2 * 32, dtype=np.float32)
    y = metal.DeviceArray.zeros(x.size, np.float32)
    rewrite_lib.function("shift_dyn")(
        _dev(x), y, threadgroups=2, threads_per_threadgroup=32, threadgroup_memory=[32 * 4]
    )
    want = np.roll(x.reshape(2, 32), -1, axis=1).ravel() + 2
    np.testing.assert_array_equal(y.numpy(), want)


# ---- the kernel cache ----------------------------------------------------------------------


def _compile_logged(source, capfd):
    metal.compile(source, "cache.metal")
    return capfd.readouterr().err


def test_cache_hit_does_not_rerun_clang(tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("CAMEL_SIM_VERBOSE", "1")
    src = _fresh(HEADER + "kernel void k(device float* x [[buffer(0)]]) { x[0] = 1.0; }\n")
    first = _compile_logged(src, capfd)
    assert "[sim] compiling cache.metal" in first and "clang" in first
    second = _compile_logged(src, capfd)
    assert "[sim] cache hit cache.metal" in second and "clang" not in second
    libs = list((tmp_path / "camel" / "sim").glob("*.so"))
    assert len(libs) == 1
    # the translated C++ is kept next to the library, for the curious
    assert libs[0].with_suffix(".cpp").exists()
    # another path (it appears in messages) or another source is another entry
    metal.compile(src, "other.metal")
    assert len(list((tmp_path / "camel" / "sim").glob("*.so"))) == 2


def _logging_compiler(tmp_path, monkeypatch, env_name):
    """A clang++ that logs each command line to tmp_path/compiles.log (CAMEL_SIM_CXX or
    CAMEL_CUDA_CXX set to it); the path of the log."""
    import shutil

    real = next(filter(None, map(shutil.which, ("clang++-19", "clang++-18", "clang++-17"))), None)
    if real is None:
        pytest.skip("no clang++ 17-19 to wrap")
    log, wrapper = tmp_path / "compiles.log", tmp_path / "clang++"
    wrapper.write_text(f'#!/bin/sh\necho "$*" >> "{log}"\nexec "{real}" "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.setenv(env_name, str(wrapper))
    return log


def test_processes_missing_the_same_entry_compile_it_once(tmp_path, monkeypatch):
    # pytest-xdist's workers (and any two programs) share the cache: the second one to miss
    # an entry waits for the first one's compile (a lock per entry) and loads its library
    import threading

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    log = _logging_compiler(tmp_path, monkeypatch, "CAMEL_SIM_CXX")
    src = _fresh(HEADER + "kernel void k(device float* x [[buffer(0)]]) { x[0] = 4.0; }\n")
    libs, errors = [], []

    def build():
        try:
            libs.append(metal.compile(src, "twice.metal"))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=build) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(libs) == 3
    shared = [line for line in log.read_text().splitlines() if " -shared " in line]
    assert len(shared) == 1, shared
    x = metal.DeviceArray.zeros((1,))
    libs[2].function("k")(x, threads=1, threads_per_threadgroup=1)
    assert x.numpy()[0] == 4.0
    assert len(list((tmp_path / "cache" / "camel" / "sim").glob("*.so"))) == 1


def test_editing_an_included_header_recompiles(tmp_path, monkeypatch, capfd):
    # the key covers the project headers the source includes, transitively: an edited
    # header is a new library, not the stale one
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("CAMEL_SIM_VERBOSE", "1")
    proj = tmp_path / "proj"
    (proj / "inner").mkdir(parents=True)
    (proj / "scale.h").write_text(
        '#include "inner/bias.h"\ninline float f(float v) { return 2 * v + BIAS; }\n'
    )
    bias = proj / "inner" / "bias.h"
    bias.write_text("#define BIAS 1.0f\n")
    src = _fresh(
        HEADER + '#include "scale.h"\n'
        "kernel void k(device float* x [[buffer(0)]], uint i [[thread_position_in_grid]]) {\n"
        "    x[i] = f(x[i]);\n}\n"
    )
    x0 = np.arange(37, dtype=np.float32) - 5

    def run():
        x = _dev(x0)
        metal.compile(src, str(proj / "main.metal")).function("k")(
            x, threads=37, threads_per_threadgroup=32
        )
        return x.numpy()

    np.testing.assert_array_equal(run(), 2 * x0 + 1)
    assert "[sim] compiling" in capfd.readouterr().err
    np.testing.assert_array_equal(run(), 2 * x0 + 1)
    assert "[sim] cache hit" in capfd.readouterr().err
    bias.write_text("#define BIAS 5.0f\n")  # the nested header, same length of text
    np.testing.assert_array_equal(run(), 2 * x0 + 5)
    assert "[sim] compiling" in capfd.readouterr().err
    bias.write_text("#define BIAS 1.0f\n")  # back as it was: that library is still there
    np.testing.assert_array_equal(run(), 2 * x0 + 1)
    assert "[sim] cache hit" in capfd.readouterr().err


def test_sanitizer_flags_are_a_separate_cache_entry(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    src = _fresh(HEADER + "kernel void k(device float* x [[buffer(0)]]) { x[0] = 1.0; }\n")
    metal.compile(src, "san.metal")
    monkeypatch.setenv("CAMEL_SIM_SANITIZE", "bogus")
    with pytest.raises(metal.CompileError, match="unknown sanitizer 'bogus'"):
        metal.compile(src, "san.metal")


UBSAN_SCRIPT = r"""
import numpy as np, camel.metal as M
src = '''#include <metal_stdlib>
using namespace metal;
kernel void shl(device int* x [[buffer(0)]], uint i [[thread_position_in_grid]]) {
    int s = x[i];
    x[i] = 1 << s;
}
'''
x = M.DeviceArray.from_numpy(np.array([3, 40], np.int32))
M.compile(src, "shaders/ub.metal").function("shl")(x, threads=2, threads_per_threadgroup=2)
print("result", x.numpy()[0])
"""


@pytest.mark.skipif(sys.platform != "linux", reason="sanitizer runtimes checked on Linux")
def test_undefined_behaviour_sanitizer_names_the_metal_line(tmp_path):
    env = dict(
        os.environ,
        CAMEL_SIM_SANITIZE="undefined",
        XDG_CACHE_HOME=str(tmp_path),
        PYTHONPATH=str(ROOT),
    )
    r = subprocess.run(
        [sys.executable, "-c", UBSAN_SCRIPT], env=env, capture_output=True, text=True, timeout=300
    )
    if "cannot load kernel library" in r.stderr and "ubsan" in r.stderr:
        pytest.skip("no UBSan runtime (Debian: apt-get install libclang-rt-19-dev)")
    assert "result 8" in r.stdout, r.stderr
    assert "shaders/ub.metal:5:" in r.stderr and "shift exponent 40" in r.stderr


# ---- the generated library description (shim/front/sim_abi.h), read directly ---------------


DESC_SRC = (
    HEADER
    + r"""
struct Params { float scale; uint n; uint pad[2]; };
inline float reduce(float v) { return simd_sum(v); }       // a SIMD op, one call away
inline float twice(float v) { return reduce(v) * 2.0f; }   // ...and two calls away
kernel void plain(device const float* x [[buffer(0)]], device float* y [[buffer(2)]],
                  constant Params& p [[buffer(5)]], uint2 gid [[thread_position_in_grid]]) {
    y[gid.x] = x[gid.x] * p.scale;
}
kernel void with_barrier(device float* x [[buffer(0)]], threadgroup float* tg [[threadgroup(1)]],
                         ushort lid [[thread_index_in_simdgroup]]) {
    tg[lid] = x[lid];
    threadgroup_barrier(mem_flags::mem_threadgroup);
    x[lid] = tg[0];
}
kernel void indirect_simd(device float* x [[buffer(0)]], constant uint& n [[buffer(1)]],
                          uint i [[thread_position_in_grid]]) {
    x[i] = twice(x[i]);
}
"""
)


def test_library_description():
    """Parameter kinds, indices, sizes and needs_fibers, as the runtime sees them."""
    desc = sim_library_description(DESC_SRC, "desc.metal")
    assert desc.abi_version == 5 and desc.nkernels == 3
    kernels, group_entries = {}, {}
    for k in desc.kernels[: desc.nkernels]:
        assert all(p.left_out is None for p in k.params[: k.nparams])  # no optional arguments
        params = [
            (p.name.decode(), p.kind, p.index, p.value_size, p.is_pointer, p.writable, p.align)
            for p in k.params[: k.nparams]
        ]
        kernels[k.name.decode()] = (params, k.max_buffer_index, k.needs_fibers)
        group_entries[k.name.decode()] = bool(k.group_entry)
    # The barrier-free kernel runs a threadgroup as a loop, the one with a barrier as two
    # barrier regions; the SIMD-group function keeps the fibers.
    assert group_entries == {"plain": True, "with_barrier": True, "indirect_simd": False}
    BUF, TG, BUILTIN = 1, 2, 3
    assert kernels["plain"] == (
        [
            ("x", BUF, 0, 0, 1, 0, 4),  # const: may be a NumPy array (setBytes)
            ("y", BUF, 2, 0, 1, 1, 4),  # written: must be a buffer
            ("p", BUF, 5, 16, 0, 0, 4),
            ("gid", BUILTIN, -1, 0, 0, 0, 0),
        ],
        5,
        0,
    )
    assert kernels["with_barrier"] == (
        [("x", BUF, 0, 0, 1, 1, 4), ("tg", TG, 1, 0, 1, 0, 0), ("lid", BUILTIN, -1, 0, 0, 0, 0)],
        0,
        1,
    )
    assert kernels["indirect_simd"] == (
        [("x", BUF, 0, 0, 1, 1, 4), ("n", BUF, 1, 4, 0, 0, 4), ("i", BUILTIN, -1, 0, 0, 0, 0)],
        1,
        1,
    )
