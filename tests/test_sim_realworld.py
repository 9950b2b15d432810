"""MSL constructs that real projects (MLX, llama.cpp and others) ship and Apple's compiler
accepts: each must compile in the simulator and compute what NumPy computes.

One test per construct (issue 12, part 3). The simulator-only ones are skipped on a Mac.
"""

import uuid

import numpy as np
import pytest

metal = pytest.importorskip("camel.metal")

HEADER = "#include <metal_stdlib>\nusing namespace metal;\n"


@pytest.fixture(autouse=True)
def _simulator_only():
    if not metal.is_simulator():
        pytest.skip("tests of the simulator's compiler")


def _dev(x):
    return metal.DeviceArray.from_numpy(np.ascontiguousarray(x))


def _compile(body, name="real.metal"):
    return metal.compile(HEADER + body + f"\n// {uuid.uuid4().hex}\n", name)


def _run(lib, name, *args, n, tg=32):
    lib.function(name)(*args, threads=n, threads_per_threadgroup=tg)


X = np.arange(37, dtype=np.float32) * 0.75 - 9.0

# ---- kernel template instantiations ---------------------------------------------------------
SCALE = (
    "namespace ns {\ntemplate <typename T, int N = 3>\n"
    "kernel void scale(device T* x [[buffer(0)]], uint i [[thread_position_in_grid]]) {\n"
    "    x[i] = x[i] * T(N);\n}\n}\n"
)


def test_typedef_instantiation_registers_the_kernel():
    # llama.cpp's form: a typedef of the function type, then `kernel k_t k<T>;`
    src = SCALE + "typedef decltype(ns::scale<float>) scale_f_t;\n"
    src += "typedef decltype(ns::scale<half, 5>) scale_h_t;\n"
    src += 'template [[host_name("scale_f32")]] kernel scale_f_t ns::scale<float>;\n'
    src += 'template [[host_name("scale_f16")]] kernel scale_h_t ns::scale<half, 5>;\n'
    lib = _compile(src)
    assert sorted(lib.function_names) == ["scale_f16", "scale_f32"]
    for name, dtype, k in [("scale_f32", np.float32, 3), ("scale_f16", np.float16, 5)]:
        x = _dev(X.astype(dtype))
        _run(lib, name, x, n=X.size)
        np.testing.assert_array_equal(x.numpy(), (X * k).astype(dtype))


def test_default_template_arguments():
    src = (
        SCALE
        + 'template [[host_name("three")]] kernel void ns::scale<float>(device float*, uint);\n'
    )
    src += 'template [[host_name("seven")]] [[kernel]] decltype(ns::scale<float, 7>)'
    src += " ns::scale<float, 7>;\n"
    lib = _compile(src)
    for name, k in [("three", 3), ("seven", 7)]:
        x = _dev(X)
        _run(lib, name, x, n=X.size)
        np.testing.assert_array_equal(x.numpy(), X * k)


def test_instantiating_a_helper_with_a_host_name_is_an_error():
    # it would register no kernel: say so, naming the line, never succeed silently
    src = "template <typename T> T twice(T v) { return v * 2; }\n" + SCALE
    src += 'template [[host_name("twice_f32")]] float twice<float>(float);\n'
    with pytest.raises(metal.CompileError) as info:
        _compile(src, "inst.metal")
    msg = str(info.value)
    assert "inst.metal:10: instantiation of 'twice'" in msg and "registers no kernel" in msg, msg


# ---- types -----------------------------------------------------------------------------------
def _to_bfloat(a):  # float32 -> bfloat bits, round to nearest even
    u = np.asarray(a, np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def _from_bfloat(b):
    return (np.asarray(b, np.uint16).astype(np.uint32) << 16).view(np.float32)


def test_bfloat_scalars_and_vectors():
    lib = _compile(
        "#ifndef __HAVE_BFLOAT__\n#error no bfloat\n#endif\n"
        "kernel void k(device bfloat* x [[buffer(0)]], device bfloat4* y [[buffer(1)]],\n"
        "              uint i [[thread_position_in_grid]]) {\n"
        "    x[i] = x[i] * bfloat(3.0f) + bfloat(0.1f);\n"
        "    float4 f = float4(y[i]);\n    y[i] = bfloat4(f * f);\n}\n"
    )
    xb = _to_bfloat(X)
    y = np.linspace(-3, 5, 37 * 4, dtype=np.float32).reshape(37, 4)
    yb = _to_bfloat(y)
    dx, dy = _dev(xb.view(np.float16)), _dev(yb.view(np.float16))  # 16-bit containers
    _run(lib, "k", dx, dy, n=37)
    # each bfloat operation rounds to bfloat, as on the GPU
    prod = _to_bfloat(_from_bfloat(xb) * _from_bfloat(_to_bfloat(3.0)))
    want_x = _to_bfloat(_from_bfloat(prod) + _from_bfloat(_to_bfloat(0.1)))
    np.testing.assert_array_equal(dx.numpy().view(np.uint16), want_x)
    want_y = _to_bfloat(_from_bfloat(yb) ** 2)
    np.testing.assert_array_equal(dy.numpy().view(np.uint16), want_y)


def test_type_traits():
    lib = _compile(
        "template <typename T, typename = enable_if_t<is_floating_point_v<T>>>\n"
        "T halve(T v) { return v / 2; }\n"
        "template <typename T, typename = enable_if_t<is_integral_v<T>>, typename = void>\n"
        "T halve(T v) { return v >> 1; }\n"
        "template <typename T> struct Acc { using type = conditional_t<is_same_v<T,"
        " half>, float, T>; };\n"
        "static_assert(is_same_v<Acc<half>::type, float> && is_same<Acc<int>::type,"
        ' int>::value, "");\n'
        "static_assert(is_signed_v<int> && is_unsigned_v<uint> && !is_signed_v<uint> &&\n"
        "              is_floating_point_v<half> && is_arithmetic_v<const float> &&\n"
        "              !is_integral_v<float> && is_convertible_v<int, float> &&\n"
        "              is_same_v<remove_cv_t<const volatile int>, int> &&\n"
        "              is_same_v<make_unsigned_t<int>, uint> && is_vector_v<float4> &&\n"
        '              vec_elements<half3>::value == 3 && !is_vector_v<float>, "");\n'
        "kernel void k(device float* x [[buffer(0)]], device int* y [[buffer(1)]],\n"
        "              uint i [[thread_position_in_grid]]) {\n"
        "    x[i] = halve(x[i]);\n    y[i] = halve(y[i]);\n}\n"
    )
    x, y = _dev(X), _dev(np.arange(-18, 19, dtype=np.int32))
    _run(lib, "k", x, y, n=37)
    np.testing.assert_array_equal(x.numpy(), X / 2)
    np.testing.assert_array_equal(y.numpy(), np.arange(-18, 19, dtype=np.int32) >> 1)


def test_matrix_types():
    lib = _compile(
        "kernel void k(device const float4x4* m [[buffer(0)]], device float4* v [[buffer(1)]],\n"
        "              device float* d [[buffer(2)]], device half4* h [[buffer(3)]],\n"
        "              uint i [[thread_position_in_grid]]) {\n"
        "    float4x4 a = m[i];\n    float4x4 b = a * transpose(a) + float4x4(1.0f);\n"
        "    float4 w = v[i];\n    v[i] = b * w + w * a - a[2];\n"
        "    float3x3 c = float3x3(a[0].xyz, a[1].xyz, a[2].xyz);\n"
        "    float2x2 e = float2x2(1, 2, 3, 4) * 2.0f;\n"
        "    d[i] = determinant(a) + determinant(c) + determinant(e);\n"
        "    half4x4 ha = half4x4(a);\n    h[i] = ha * half4(1, 0, 0, 0);\n}\n"
    )
    rng = np.random.default_rng(1)
    n = 7
    m = rng.integers(-3, 4, (n, 4, 4)).astype(np.float32)  # m[i][c] is column c
    v = rng.integers(-3, 4, (n, 4)).astype(np.float32)
    dv, dd, dh = (
        _dev(v),
        metal.DeviceArray.zeros(n, np.float32),
        metal.DeviceArray.zeros((n, 4), np.float16),
    )
    _run(lib, "k", _dev(m), dv, dd, dh, n=n, tg=n)
    A = np.transpose(m, (0, 2, 1))  # as row-major matrices: A[i][row][col]
    B = A @ np.transpose(A, (0, 2, 1)) + np.eye(4, dtype=np.float32)
    want_v = np.einsum("nrc,nc->nr", B, v) + np.einsum("nr,nrc->nc", v, A) - m[:, 2]
    np.testing.assert_allclose(dv.numpy(), want_v, rtol=1e-6)
    want_d = (
        np.linalg.det(A)
        + np.linalg.det(A[:, :3, :3])
        + np.linalg.det(2 * np.array([[1, 3], [2, 4]]))
    )
    np.testing.assert_allclose(dd.numpy(), want_d, rtol=1e-5, atol=1e-3)
    np.testing.assert_array_equal(dh.numpy(), m[:, 0].astype(np.float16))


def test_uniform_and_numeric_limits_of_int8():
    lib = _compile(
        "kernel void k(device float* x [[buffer(0)]], constant uint& n [[buffer(1)]],\n"
        "              uint i [[thread_position_in_grid]]) {\n"
        "    uniform<uint> count = make_uniform(n);\n    uniform<float> s = 2.0f;\n"
        "    if (i < count) x[i] = x[i] * s + numeric_limits<int8_t>::max() +\n"
        "                          numeric_limits<int8_t>::min() +"
        " numeric_limits<uint8_t>::max();\n}\n"
    )
    x = _dev(X)
    _run(lib, "k", x, np.uint32(30), n=37)
    want = X.copy()
    want[:30] = X[:30] * 2 + 127 - 128 + 255
    np.testing.assert_array_equal(x.numpy(), want)


def test_make_filled_simdgroup_matrix_with_one_size():
    lib = _compile(
        "kernel void k(device float* out [[buffer(0)]]) {\n"
        "    simdgroup_float8x8 a = make_filled_simdgroup_matrix<float, 8>(1.5f);\n"
        "    simdgroup_float8x8 b = make_filled_simdgroup_matrix<float, 8, 8>(2.0f);\n"
        "    simdgroup_float8x8 c;\n    simdgroup_multiply(c, a, b);\n   "
        " simdgroup_store(c, out);\n}\n"
    )
    out = metal.DeviceArray.zeros((8, 8), np.float32)
    _run(lib, "k", out, n=32)
    np.testing.assert_array_equal(out.numpy(), np.full((8, 8), 1.5 * 2 * 8, np.float32))


# ---- threadgroup structs defined in their declaration -----------------------------------------
def test_threadgroup_struct_defined_in_the_declaration():
    # C++ lets a declaration define its struct, named or not; the threadgroup rewrite took
    # the whole definition for a type ("declaration of anonymous struct must be a
    # definition") and a member's [4] for the variable's dimensions
    lib = _compile(
        "kernel void k(device float* x [[buffer(0)]], uint i [[thread_position_in_grid]],\n"
        "              uint lid [[thread_index_in_threadgroup]]) {\n"
        "    threadgroup struct { float a[4]; int n; } s;\n"
        "    threadgroup struct Pair { float u, v; } p[3], q;\n"
        "    if (lid == 0) { s.a[3] = 5; s.n = 2; p[2].v = 10; q.u = 100; }\n"
        "    threadgroup_barrier(mem_flags::mem_threadgroup);\n"
        "    Pair c = p[2];\n"
        "    x[i] = x[i] + s.a[3] + s.n + c.v + q.u;\n}\n"
    )
    x = _dev(X)
    _run(lib, "k", x, n=37, tg=8)
    np.testing.assert_allclose(x.numpy(), X + 117)


# ---- threadgroup initialisers ----------------------------------------------------------------
# Apple's compiler accepts them: MLX's layer_norm.metal ships `threadgroup float
# local_buffer[SIMD_SIZE] = {0};`, Skia's SkSL emits `threadgroup Threadgroups
# _threadgroups{{}};`. Both then write the memory before reading it (MLX zeroes the buffer
# from SIMD group 0 and calls threadgroup_barrier): nothing promises the initialiser's
# value. The simulator drops it, so the variable starts as NaN like all threadgroup memory.
TG_INIT = """
struct Scratch { float v[64]; };

kernel void reverse_sum(device const float* x [[buffer(0)]], device float* out [[buffer(1)]],
                        device float* before [[buffer(2)]],
                        uint gid [[threadgroup_position_in_grid]],
                        uint lid [[thread_index_in_threadgroup]],
                        uint sg [[simdgroup_index_in_threadgroup]],
                        uint lane [[thread_index_in_simdgroup]]) {
    threadgroup float partial[2] = {0};     // MLX's form
    threadgroup Scratch s{{}};              // Skia's form
    threadgroup int unused = 7, more[3]{};
    (void)unused; (void)more;
    if (lid == 0) before[gid] = partial[1];  // the initialiser set nothing: NaN here
    threadgroup_barrier(mem_flags::mem_threadgroup);  // that read before anyone writes
    if (sg == 0) partial[lane % 2] = 0.0f;   // written before it is read, as MLX does
    s.v[lid] = x[gid * 64 + lid];
    threadgroup_barrier(mem_flags::mem_threadgroup);
    float r = s.v[63 - lid];                 // one copy per threadgroup, not per thread
    float t = simd_sum(r);
    if (lane == 0) partial[sg] = t;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    out[gid * 64 + lid] = r + partial[0] + partial[1];
}
"""


def test_threadgroup_initialisers_compile_and_set_no_value():
    lib = _compile(TG_INIT, "tg_init.metal")
    groups = 3
    x = np.arange(groups * 64, dtype=np.float32).reshape(groups, 64) * 0.5 - 7
    out = metal.DeviceArray.zeros((groups, 64), np.float32)
    before = metal.DeviceArray.zeros(groups, np.float32)
    lib.function("reverse_sum")(
        _dev(x), out, before, threadgroups=groups, threads_per_threadgroup=64
    )
    want = x[:, ::-1] + x.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(out.numpy(), want, rtol=1e-6)
    assert np.isnan(before.numpy()).all(), before.numpy()


@pytest.mark.parametrize(
    "where,src,words",
    [
        (
            "program scope",
            "threadgroup float t[4] = {0};\n"
            "kernel void k(device float* x [[buffer(0)]]) { x[0] = t[0]; }\n",
            "threadgroup variable 't' at program scope",
        ),
        (
            "a helper",
            "float h(float v) {\n    threadgroup float t[4] = {0};\n    t[0] = v;\n"
            "    return t[0];\n}\n"
            "kernel void k(device float* x [[buffer(0)]]) { x[0] = h(x[0]); }\n",
            "threadgroup variable 't' declared in a helper function",
        ),
    ],
)
def test_threadgroup_initialisers_stay_rejected_outside_a_kernel(where, src, words):
    # Apple: "program scope variable must reside in constant address space" (its message
    # in Tint's MSL test logs); MSL 4.4: threadgroup variables in a kernel's scope only
    with pytest.raises(metal.CompileError) as info:
        _compile(src, "tg_init_bad.metal")
    assert words in str(info.value), str(info.value)


# ---- project headers through an include path --------------------------------------------------
# MLX builds its kernels with the repository root on the include path: a kernel does
# `#include <mlx/backend/metal/kernels/utils.h>`, and that header includes its neighbours
# by the same root, with angle brackets or quotes.
def _mlx_tree(root):
    kdir = root / "mlx" / "backend" / "metal" / "kernels"
    (kdir / "steel").mkdir(parents=True)
    (kdir / "defines.h").write_text("#pragma once\n#define ROW_SIZE 16\n")
    (kdir / "steel" / "ops.h").write_text(
        "#pragma once\n#include <metal_stdlib>\n"
        "template <typename T> METAL_FUNC T axpb(T x, T a, T b) { return metal::fma(a, x, b); }\n"
    )
    (kdir / "utils.h").write_text(
        "#pragma once\n#include <metal_simdgroup>\n"
        '#include "mlx/backend/metal/kernels/defines.h"\n'
        "#include <mlx/backend/metal/kernels/steel/ops.h>\n"
        "template <typename T> METAL_FUNC T row_sum(T v) { return metal::simd_sum(v); }\n"
    )
    (root / "kernels").mkdir()
    return root / "kernels" / "affine.metal"


AFFINE = """#include <mlx/backend/metal/kernels/utils.h>
using namespace metal;
template <typename T>
[[kernel]] void affine(device T* x [[buffer(0)]], device T* s [[buffer(1)]],
                       uint i [[thread_position_in_grid]],
                       uint lane [[thread_index_in_simdgroup]]) {
    x[i] = axpb(x[i], T(2), T(ROW_SIZE));
    T total = row_sum(x[i]);
    if (lane == 0) s[i / 32] = total;
}
template [[host_name("affine_f32")]] [[kernel]] decltype(affine<float>) affine<float>;
"""


def test_project_headers_through_an_include_path(tmp_path, monkeypatch):
    path = _mlx_tree(tmp_path)
    x0 = np.arange(64, dtype=np.float32) * 0.25 - 3
    want = 2 * x0 + 16

    def run(lib):
        x, s = _dev(x0), metal.DeviceArray.zeros(2, np.float32)
        lib.function("affine_f32")(x, s, threads=64, threads_per_threadgroup=64)
        np.testing.assert_array_equal(x.numpy(), want)
        np.testing.assert_allclose(s.numpy(), want.reshape(2, 32).sum(axis=1), rtol=1e-6)

    run(metal.compile(AFFINE, str(path), include_dirs=[tmp_path]))
    monkeypatch.setenv("CAMEL_INCLUDE_PATH", str(tmp_path))  # the same, for every compile
    run(metal.compile(AFFINE + "// env\n", str(path)))


def test_include_path_errors_name_the_header(tmp_path):
    path = _mlx_tree(tmp_path)
    with pytest.raises(metal.CompileError) as info:  # no include path: not found, not "C++"
        metal.compile(AFFINE, str(path))
    msg = str(info.value)
    assert "affine.metal:1: '#include <mlx/backend/metal/kernels/utils.h>': not found" in msg
    assert "in the include path" in msg and "include_dirs=" in msg, msg
    # a project header that pulls in the C++ standard library is refused, naming its line
    ops = tmp_path / "mlx" / "backend" / "metal" / "kernels" / "steel" / "ops.h"
    ops.write_text("#pragma once\n#include <metal_stdlib>\n#include <vector>\n")
    with pytest.raises(metal.CompileError) as info:
        metal.compile(AFFINE, str(path), include_dirs=[tmp_path])
    msg = str(info.value)
    assert f"{ops}:3: includes " in msg and "standard-library header" in msg, msg


# llama.cpp's kernel_mul_mm and flash attention: half tiles multiplied into a float
# accumulator (d = a * b + c, a and b simdgroup_half8x8, c and d simdgroup_float8x8), a
# float tile times a half one, and simdgroup_multiply of half tiles into a float one.
MIXED_MMA = """
kernel void mixed(device const half* A [[buffer(0)]], device const half* B [[buffer(1)]],
                  device const float* C [[buffer(2)]], device float* D [[buffer(3)]],
                  device float* E [[buffer(4)]], device float* F [[buffer(5)]],
                  ushort lane [[thread_index_in_simdgroup]]) {
    simdgroup_float8x8 acc;
    simdgroup_load(acc, C, 8);
    for (short k = 0; k < 24; k += 8) {             // (8, 24) x (24, 8): three K steps
        simdgroup_half8x8 a, b;
        simdgroup_load(a, A + k, 24);
        simdgroup_load(b, B + k * 8, 8);
        simdgroup_multiply_accumulate(acc, a, b, acc);
    }
    simdgroup_store(acc, D, 8);
    simdgroup_half8x8 a0, b0;
    simdgroup_load(a0, A, 24);
    simdgroup_load(b0, B, 8);
    simdgroup_float8x8 p;
    simdgroup_multiply(p, a0, b0);                  // half x half -> float
    simdgroup_float8x8 q = make_filled_simdgroup_matrix<float, 8>(0.5f);
    simdgroup_multiply_accumulate(q, p, b0, q);     // float x half + float
    simdgroup_store(p, E, 8);
    simdgroup_store(q, F, 8);
}
"""


def test_half_operands_float_accumulator_multiply_accumulate():
    lib = _compile(MIXED_MMA, "mixed_mma.metal")
    rng = np.random.default_rng(7)
    a = rng.standard_normal((8, 24)).astype(np.float16)  # half-rounded inputs
    b = rng.standard_normal((24, 8)).astype(np.float16)
    c = rng.standard_normal((8, 8)).astype(np.float32)
    d, e, f = (metal.DeviceArray.zeros((8, 8), np.float32) for _ in range(3))
    lib.function("mixed")(
        _dev(a), _dev(b), _dev(c), d, e, f, threads=32, threads_per_threadgroup=32
    )
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    want_d = c + a64 @ b64  # every half product is exact in float; float sums
    want_e = a64[:, :8] @ b64[:8]
    want_f = 0.5 + want_e.astype(np.float32).astype(np.float64) @ b64[:8]
    # float accumulation: within a few float ulps (a half accumulator is ~1e-3 off)
    for got, want in [(d, want_d), (e, want_e), (f, want_f)]:
        err = np.abs(got.numpy() - want).max() / np.abs(want).max()
        assert err < 1e-6, err


# llama.cpp's bfloat kernels (GGML_METAL_HAS_BF16, which it keeps only where
# __METAL_VERSION__ >= 310): simdgroup_bfloat8x8 tiles loaded from bfloat data, multiplied
# into a float accumulator, and a bfloat product stored back as bfloat.
BF16_MMA = """
kernel void bf(device const bfloat* A [[buffer(0)]], device const bfloat* B [[buffer(1)]],
               device float* D [[buffer(2)]], device bfloat* E [[buffer(3)]],
               ushort lane [[thread_index_in_simdgroup]]) {
    threadgroup bfloat tb[8 * 8];
    for (short j = lane; j < 64; j += 32) tb[j] = B[j];
    threadgroup_barrier(mem_flags::mem_threadgroup);
    simdgroup_float8x8 acc = make_filled_simdgroup_matrix<float, 8>(0.25f);
    for (short k = 0; k < 16; k += 8) {             // (8, 16) x (16, 8): two K steps
        simdgroup_bfloat8x8 a, b;
        simdgroup_load(a, A + k, 16);
        simdgroup_load(b, B + k * 8, 8);
        simdgroup_multiply_accumulate(acc, a, b, acc);
    }
    simdgroup_store(acc, D, 8);
    simdgroup_bfloat8x8 a0, b0, e;
    simdgroup_load(a0, A, 16);
    simdgroup_load(b0, tb, 8);
    simdgroup_multiply(e, a0, b0);                  // bfloat x bfloat -> bfloat, rounded once
    simdgroup_store(e, E, 8);
}
"""


def test_bfloat_simdgroup_matrices():
    lib = _compile(BF16_MMA, "bf16_mma.metal")
    rng = np.random.default_rng(11)
    a = _to_bfloat(rng.standard_normal((8, 16)).astype(np.float32))
    b = _to_bfloat(rng.standard_normal((16, 8)).astype(np.float32))
    d = metal.DeviceArray.zeros((8, 8), np.float32)
    e = metal.DeviceArray.zeros((8, 8), np.float16)  # a 16-bit container of bfloat bits
    lib.function("bf")(
        _dev(a.view(np.float16)),
        _dev(b.view(np.float16)),
        d,
        e,
        threads=32,
        threads_per_threadgroup=32,
    )
    a64, b64 = _from_bfloat(a).astype(np.float64), _from_bfloat(b).astype(np.float64)
    want_d = 0.25 + a64 @ b64  # bfloat products are exact in float; float sums
    err = np.abs(d.numpy() - want_d).max() / np.abs(want_d).max()
    assert err < 1e-6, err
    want_e = _to_bfloat((a64[:, :8] @ b64[:8]).astype(np.float32))
    got_e = _from_bfloat(e.numpy().view(np.uint16))
    # float sums of exact products, rounded once to bfloat: within one bfloat ulp
    np.testing.assert_allclose(got_e, _from_bfloat(want_e), rtol=2**-7, atol=1e-6)


# ---- functions and expressions ---------------------------------------------------------------
def test_madhi():
    lib = _compile(
        "kernel void k(device const int* a [[buffer(0)]], device int* y [[buffer(1)]],\n"
        "              device uint4* z [[buffer(2)]], uint i [[thread_position_in_grid]]) {\n"
        "    y[i] = madhi(a[i], 0x7fffffff, int(i));\n"
        "    z[i] = madhi(uint4(i) * 0x10000001u, uint4(0x80000000u), uint4(1, 2, 3, 4));\n}\n"
    )
    a = (np.arange(37, dtype=np.int64) * 123456789 - 2**31 // 2).astype(np.int32)
    y, z = metal.DeviceArray.zeros(37, np.int32), metal.DeviceArray.zeros((37, 4), np.uint32)
    _run(lib, "k", _dev(a), y, z, n=37)
    i = np.arange(37, dtype=np.int64)
    np.testing.assert_array_equal(y.numpy(), ((a.astype(np.int64) * 0x7FFFFFFF) >> 32) + i)
    prod = ((i * 0x10000001) & 0xFFFFFFFF) * 0x80000000 >> 32
    np.testing.assert_array_equal(z.numpy(), prod[:, None] + np.arange(1, 5))


def test_braced_lists_as_vector_and_struct_arguments():
    lib = _compile(
        "struct Pair { float a, b; };\nfloat sum(Pair p) { return p.a + p.b; }\n"
        "float2 add2(float2 a, float2 b) { return a + b; }\n"
        "int4 addi(int4 a, int4 b) { return a + b; }\n"
        "kernel void k(device float* x [[buffer(0)]], uint i [[thread_position_in_grid]]) {\n"
        "    float2 u = add2({1.0f, x[i]}, {x[i], 3});\n"
        "    int4 w = addi({1, 2, 3, int(i)}, int4(1));\n"
        "    x[i] = u.x * u.y + sum({x[i], 0.5f}) + w.w;\n}\n"
    )
    x = _dev(X)
    _run(lib, "k", x, n=37)
    np.testing.assert_allclose(
        x.numpy(), (1 + X) * (X + 3) + X + 0.5 + np.arange(37) + 1, rtol=1e-6
    )


def test_vector_construction_through_typedefs_and_template_parameters():
    lib = _compile(
        "typedef float4 vec4_t;\nusing f2 = metal::float2;\n"
        "template <typename V> V pair(float a) { return V(a, a + 1); }\n"
        "template <typename T, typename U> T convert(U v) { return (T)v; }\n"
        "struct Ref { thread float& r; Ref(thread float& x) : r(x) {} };\n"
        "template <typename R> void set(thread float& y) { R ref(y); R(y).r += 1; ref.r += 2; }\n"
        "kernel void k(device float4* x [[buffer(0)]], uint i [[thread_position_in_grid]]) {\n"
        "    vec4_t v = vec4_t(f2(x[i].x, 1), pair<f2>(2.0f));\n"
        "    float y = 0;\n    set<Ref>(y);\n"
        "    x[i] = v + convert<float4>(int4(int(i), -2, 3, 4)) + y;\n}\n"
    )
    x4 = np.stack([X, X, X, X], axis=1)
    x = _dev(x4)
    _run(lib, "k", x, n=37)
    i = np.arange(37, dtype=np.float32)
    want = np.stack([X + i, 1 - 2 + 0 * X, 2 + 3 + 0 * X, 3 + 4 + 0 * X], axis=1) + 3
    np.testing.assert_array_equal(x.numpy(), want)


def test_out_of_class_constant_static_member():
    lib = _compile(
        "struct Cfg {\n    static constant float scale;\n    static constant constexpr"
        " int bias = 3;\n};\n"
        "constant float Cfg::scale = 2.5f;\n"
        "kernel void k(device float* x [[buffer(0)]], uint i [[thread_position_in_grid]]) {\n"
        "    x[i] = x[i] * Cfg::scale + Cfg::bias;\n}\n"
    )
    x = _dev(X)
    _run(lib, "k", x, n=37)
    np.testing.assert_array_equal(x.numpy(), X * 2.5 + 3)


def test_assert_passes_and_fails_naming_the_line():
    lib = _compile(
        "kernel void k(device float* x [[buffer(0)]], uint i [[thread_position_in_grid]]) {\n"
        "    assert(x[i] >= 0);\n    x[i] = sqrt(x[i]);\n}\n",
        "assert.metal",
    )
    good = np.abs(X)
    x = _dev(good)
    _run(lib, "k", x, n=37)
    np.testing.assert_allclose(x.numpy(), np.sqrt(good), rtol=1e-6)
    x = _dev(good.copy())
    bad = good.copy()
    bad[29] = -1
    x = _dev(bad)
    with pytest.raises(metal.MetalError) as info:
        _run(lib, "k", x, n=37)
        metal.synchronize()
    msg = str(info.value)
    assert "assert.metal:4: assertion failed: x[i] >= 0" in msg and "kernel 'k'" in msg, msg


# ---- helpers declared with GNU attributes (Apple's METAL_FUNC) -------------------------------
# The barrier analysis once took `__attribute__` for the helper's name, so a barrier or a
# SIMD-group function in such a helper failed at run time ("marked barrier-free").
GNU_HELPERS = (
    "{attr} void stage(threadgroup float* t, uint i, float v) {{\n"
    "    t[i] = v;\n    threadgroup_barrier(mem_flags::mem_threadgroup);\n}}\n"
    "{attr} float lane_total(float v) {{ return simd_sum(v); }}\n"
    "kernel void rev(device const float* x [[buffer(0)]], device float* y [[buffer(1)]],\n"
    "                uint i [[thread_position_in_threadgroup]],\n"
    "                uint g [[thread_position_in_grid]]) {{\n"
    "    threadgroup float t[64];\n    stage(t, i, x[g]);\n    y[g] = t[63 - i];\n}}\n"
    "kernel void lanes(device const float* x [[buffer(0)]], device float* y [[buffer(1)]],\n"
    "                  uint g [[thread_position_in_grid]]) {{\n"
    "    y[g] = lane_total(x[g]);\n}}\n"
)


@pytest.mark.parametrize(
    "attr",
    [
        "inline __attribute__((always_inline))",
        "static inline __attribute__((always_inline))",
        "__attribute__((noinline))",
        "__attribute__((always_inline)) inline",
        "[[gnu::always_inline]] inline",
    ],
)
def test_barriers_and_simd_functions_in_helpers_with_gnu_attributes(attr, monkeypatch):
    lib = _compile(GNU_HELPERS.format(attr=attr))
    x_np = (np.arange(192, dtype=np.float32) * 0.37 - 20.0).astype(np.float32)
    for order in ["forward", "reverse", "random"]:
        monkeypatch.setenv("CAMEL_SIM_ORDER", order)
        x, y = _dev(x_np), _dev(np.zeros_like(x_np))
        _run(lib, "rev", x, y, n=192, tg=64)
        np.testing.assert_array_equal(y.numpy(), x_np.reshape(3, 64)[:, ::-1].ravel(), order)
        y = _dev(np.zeros_like(x_np))
        _run(lib, "lanes", x, y, n=192, tg=64)
        want = np.repeat(x_np.reshape(6, 32).sum(axis=1, dtype=np.float64), 32)
        np.testing.assert_allclose(y.numpy(), want, rtol=1e-5, atol=1e-4, err_msg=order)


# ---- kernel names ----------------------------------------------------------------------------
# Kernels named like the locals of the simulator's entry wrapper (b, t, tg, g, x, i) once
# failed to compile (issue 12): the wrapper must call the kernel by its qualified name.
SHORT_NAMES = ["b", "t", "tg", "g", "x", "i"]


def test_kernels_with_one_and_two_letter_names():
    src = "".join(
        f"kernel void {name}(device float* y [[buffer(0)]], uint j [[thread_position_in_grid]]) "
        f"{{\n    y[j] = y[j] * {m + 2}.0f + {m}.0f;\n}}\n"
        for m, name in enumerate(SHORT_NAMES)
    )
    lib = _compile(src, "names.metal")
    for m, name in enumerate(SHORT_NAMES):
        y = _dev(X)
        _run(lib, name, y, n=37)
        np.testing.assert_array_equal(y.numpy(), X * (m + 2) + m, err_msg=name)


# ---- address spaces erased -------------------------------------------------------------------
def test_address_space_overloads_constructors_and_specialisations():
    lib = _compile(
        "float first(device const float* p) { return p[0]; }\n"
        "float first(threadgroup const float* p) { return p[0]; }\n"
        "template <typename T> struct Src;\n"
        "template <typename T> struct Src<device T*> {\n"
        "    static T get(device T* p, uint i) { return p[i]; }\n};\n"
        "template <typename T> struct Src<threadgroup T*> {\n"
        "    static T get(threadgroup T* p, uint i) { return p[i]; }\n};\n"
        "struct Loader {\n    float v;\n"
        "    Loader(const device float* q) : v(q[1]) {}\n"
        "    Loader(const threadgroup float* q) : v(q[1]) {}\n};\n"
        "kernel void k(device float* x [[buffer(0)]], device float* y [[buffer(1)]],\n"
        "              uint i [[thread_position_in_grid]], uint lid"
        " [[thread_index_in_threadgroup]]) {\n"
        "    threadgroup float t[32];\n    t[lid] = 2 * x[i];\n"
        "    threadgroup_barrier(mem_flags::mem_threadgroup);\n"
        "    Loader a(x), b(t);\n"
        "    float r = first(x) + first(t) + Src<device float*>::get(x, i) +\n"
        "              Src<threadgroup float*>::get(t, 31 - lid) + a.v + b.v;\n"
        "    y[i] = r;\n}\n"
    )
    x0 = np.arange(64, dtype=np.float32) * 0.5 + 1
    x = metal.DeviceArray.zeros(64, np.float32)
    _run(lib, "k", _dev(x0), x, n=64)
    g = x0.reshape(2, 32)
    want = x0[0] + 2 * g[:, :1] + g + 2 * g[:, ::-1] + x0[1] + 2 * g[:, 1:2]
    np.testing.assert_array_equal(x.numpy(), want.ravel())


def test_address_space_overloads_with_different_bodies_are_an_error():
    src = (
        "float first(device const float* p) { return p[0]; }\n"
        "float first(threadgroup const float* p) { return p[1]; }\n"
        "kernel void k(device float* x [[buffer(0)]]) { x[0] = first(x); }\n"
    )
    with pytest.raises(metal.CompileError) as info:
        _compile(src, "spaces.metal")
    msg = str(info.value)
    assert (
        "spaces.metal:4: this definition differs from the one at line 3 only in address spaces"
        in msg
    ), msg


# ---- kernels in the style of public projects (their constructs, written anew) ---------------
# llama.cpp's ggml-metal style: an args struct in a constant buffer, a templated kernel
# instantiated per type through a typedef with host_name, one SIMD group per row reduced
# with simd_sum, the row's partial sums across SIMD groups through threadgroup memory.
GGML_STYLE = """
typedef struct {
    int32_t ne00;   // row length
    int32_t ne01;   // rows
    uint64_t nb01;  // bytes between rows
    float eps;
} rms_norm_args;

template <typename T>
kernel void kernel_rms_norm(constant rms_norm_args & args [[buffer(0)]],
                            device const char * src [[buffer(1)]],
                            device char * dst [[buffer(2)]],
                            threadgroup float * shared [[threadgroup(0)]],
                            uint row [[threadgroup_position_in_grid]],
                            ushort tid [[thread_position_in_threadgroup]],
                            ushort ntg [[threads_per_threadgroup]],
                            ushort sg [[simdgroup_index_in_threadgroup]],
                            ushort lane [[thread_index_in_simdgroup]]) {
    device const T * x = (device const T *) (src + row * args.nb01);
    float sum = 0.0f;
    for (int i = tid; i < args.ne00; i += ntg) {
        sum += float(x[i]) * float(x[i]);
    }
    sum = simd_sum(sum);
    if (lane == 0) shared[sg] = sum;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    if (sg == 0) {
        float part = lane < (ntg + 31) / 32 ? shared[lane] : 0.0f;
        part = simd_sum(part);
        if (lane == 0) shared[0] = part;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    const float scale = 1.0f / sqrt(shared[0] / args.ne00 + args.eps);
    for (int i = tid; i < args.ne00; i += ntg) {
        ((device T *) dst)[row * args.ne00 + i] = T(float(x[i]) * scale);
    }
}

typedef decltype(kernel_rms_norm<float>) kernel_rms_norm_t;
template [[host_name("kernel_rms_norm_f32")]] kernel kernel_rms_norm_t kernel_rms_norm<float>;
template [[host_name("kernel_rms_norm_f16")]] kernel kernel_rms_norm_t kernel_rms_norm<half>;
"""


@pytest.mark.parametrize("dtype,name", [(np.float32, "f32"), (np.float16, "f16")])
def test_ggml_style_rms_norm(dtype, name):
    lib = _compile(GGML_STYLE, "ggml_style.metal")
    rows, cols, pad = 5, 333, 7  # rows padded in memory: nb01 > ne00 * sizeof(T)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((rows, cols + pad)).astype(dtype)
    args = np.zeros(
        1, [("ne00", "<i4"), ("ne01", "<i4"), ("nb01", "<u8"), ("eps", "<f4"), ("_", "<i4")]
    )
    args[0] = (cols, rows, (cols + pad) * x.itemsize, 1e-5, 0)
    out = metal.DeviceArray.zeros((rows, cols), dtype)
    src = _dev(x.view(np.float16) if dtype == np.float16 else x)
    fn = lib.function(f"kernel_rms_norm_{name}")
    fn(
        args.view(np.uint8),
        src,
        out,
        threadgroups=rows,
        threads_per_threadgroup=96,
        threadgroup_memory=[32 * 4],
    )
    xf = x[:, :cols].astype(np.float32)
    want = xf / np.sqrt((xf * xf).mean(axis=1, keepdims=True) + 1e-5)
    tol = 1e-5 if dtype == np.float32 else 2e-3
    np.testing.assert_allclose(out.numpy().astype(np.float32), want, rtol=tol, atol=tol)


# MLX's steel style: METAL_FUNC helpers, traits choosing the accumulator type, a tile
# struct whose fragments are simdgroup_matrix objects read through thread_elements(),
# loads from device memory into threadgroup memory, and kernels instantiated with
# [[host_name]] through decltype and a default template argument.
MLX_STYLE = """
template <typename T>
struct AccumHelper {
    using acc_t = conditional_t<is_same_v<T, half> || is_same_v<T, bfloat>, float, T>;
};

template <typename T, short TM, short TN>
struct Frags {
    simdgroup_matrix<T, 8, 8> m[TM][TN];
    METAL_FUNC void fill(T v) {
        for (short i = 0; i < TM; i++)
            for (short j = 0; j < TN; j++) m[i][j] = make_filled_simdgroup_matrix<T, 8>(v);
    }
};

template <typename T, typename U>
METAL_FUNC void load_tile(threadgroup U* dst, const device T* src, int ld, int rows, int cols,
                          int r0, int c0, ushort tid, ushort ntg) {
    for (int e = tid; e < 16 * 16; e += ntg) {
        int r = e / 16, c = e % 16;
        bool in = r0 + r < rows && c0 + c < cols;
        dst[r * 16 + c] = in ? static_cast<U>(src[(r0 + r) * ld + c0 + c]) : U(0);
    }
}

// C = A * B for a (M, K) x (K, N) problem: one 16x16 tile of C per threadgroup of 4
// SIMD groups, each owning one 8x8 fragment.
template <typename T, typename AccT = typename AccumHelper<T>::acc_t>
[[kernel]] void steel_gemm(const device T* A [[buffer(0)]], const device T* B [[buffer(1)]],
                           device T* C [[buffer(2)]], constant int3& mnk [[buffer(3)]],
                           uint2 tg [[threadgroup_position_in_grid]],
                           ushort tid [[thread_index_in_threadgroup]],
                           ushort sg [[simdgroup_index_in_threadgroup]],
                           ushort lane [[thread_index_in_simdgroup]]) {
    static_assert(is_floating_point_v<AccT>, "accumulate in a floating type");
    threadgroup AccT As[16 * 16];
    threadgroup AccT Bs[16 * 16];
    const int M = mnk.x, N = mnk.y, K = mnk.z;
    const int row0 = tg.y * 16, col0 = tg.x * 16;
    const short fr = (sg / 2) * 8, fc = (sg % 2) * 8;
    Frags<AccT, 1, 1> acc;
    acc.fill(AccT(0));
    for (int k0 = 0; k0 < K; k0 += 16) {
        load_tile(As, A, K, M, K, row0, k0, tid, 128);
        load_tile(Bs, B, N, K, N, k0, col0, tid, 128);
        threadgroup_barrier(mem_flags::mem_threadgroup);
        for (short kk = 0; kk < 16; kk += 8) {
            simdgroup_matrix<AccT, 8, 8> a, b;
            simdgroup_load(a, As + fr * 16 + kk, 16);
            simdgroup_load(b, Bs + kk * 16 + fc, 16);
            simdgroup_multiply_accumulate(acc.m[0][0], a, b, acc.m[0][0]);
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);
    }
    // each lane stores its own two elements (Apple's lane layout)
    const short q = lane / 4;
    const short r = (q & 4) + (lane / 2) % 4, c = (q & 2) * 2 + (lane % 2) * 2;
    vec<AccT, 2> v = acc.m[0][0].thread_elements();
    for (short j = 0; j < 2; j++) {
        int gr = row0 + fr + r, gc = col0 + fc + c + j;
        if (gr < M && gc < N) C[gr * N + gc] = static_cast<T>(v[j]);
    }
}

template [[host_name("steel_gemm_f32")]] [[kernel]] decltype(steel_gemm<float>) steel_gemm<float>;
template [[host_name("steel_gemm_f16")]] [[kernel]] decltype(steel_gemm<half>) steel_gemm<half>;
"""


@pytest.mark.parametrize("dtype,name", [(np.float32, "f32"), (np.float16, "f16")])
def test_mlx_style_steel_gemm(dtype, name):
    lib = _compile(MLX_STYLE, "mlx_style.metal")
    M, N, K = 37, 29, 41
    rng = np.random.default_rng(5)
    a = rng.integers(-4, 5, (M, K)).astype(dtype)
    b = rng.integers(-4, 5, (K, N)).astype(dtype)
    c = metal.DeviceArray.zeros((M, N), dtype)
    mnk = np.array([M, N, K, 0], np.int32)  # int3: 16 bytes
    lib.function(f"steel_gemm_{name}")(
        _dev(a),
        _dev(b),
        c,
        mnk,
        threadgroups=((N + 15) // 16, (M + 15) // 16),
        threads_per_threadgroup=128,
    )
    want = (a.astype(np.float32) @ b.astype(np.float32)).astype(dtype)  # exact: small integers
    np.testing.assert_array_equal(c.numpy(), want)
