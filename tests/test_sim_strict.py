"""The simulator's strict front end: small MSL snippets that Apple's compiler rejects
must be rejected here too, naming Metal's rule and the .metal line; valid but
tricky snippets must compile and compute the right values.

Each reject case is (id, source, words of the message, rule). The offending line
carries the marker `// <-`; the test finds its number. The rule column names the
section of the Metal Shading Language Specification (MSL 3.1, the version the
simulator reports in __METAL_VERSION__) or the Apple page the verdict comes from.
Only meaningful on the simulator: on a Mac with the Metal shim these are skipped.
"""

import uuid
from pathlib import Path

import numpy as np
import pytest

metal = pytest.importorskip("camel.metal")

HEADER = "#include <metal_stdlib>\nusing namespace metal;\n"


@pytest.fixture(autouse=True)
def _simulator_only():
    if not metal.is_simulator():
        pytest.skip("tests of the simulator's compiler")


def _kernel(body, params="device float* x [[buffer(0)]], uint i [[thread_position_in_grid]]"):
    return f"kernel void k({params}) {{\n{body}}}\n"


SPEC_RESTRICT = "MSL 1.5.4 Restrictions (C++ features Metal lacks)"
SPEC_PROGRAM = "MSL 4.1/4.2: program-scope variables are in the constant address space"
SPEC_TG = "MSL 4.4: threadgroup variables are declared in a kernel function's scope"
SPEC_BUFFER = "MSL 5.2.1: buffer arguments are device or constant pointers or references"
SPEC_BUILTIN = "MSL 5.2.3.6: types of the kernel input attributes (uint, ushort, and 2/3-vectors)"
SPEC_SIMD = "MSL 6.9.2: SIMD-group functions take scalar or vector types"
SPEC_MATRIX = "MSL 2.3/6.7: simdgroup_matrix is 8x8 of half or float"
SPEC_ATOMIC = "MSL 2.5/6.15: atomic types, atomic_float operations, memory_order_relaxed only"
SPEC_ARRAYS = "MSL 1.5.4 / C++14: array sizes are constant expressions"
SPEC_SPACES = "MSL 4.0: address spaces; a pointer or reference does not change address space"
SPEC_KERNEL = "MSL 5.1.3: kernel functions return void; 5.2.1 buffer slots 0..30"
# Before MSL 4.1 a pointer, reference or `this` written without an address space is in
# thread memory: Apple, "Writing reusable GPU functions with generic pointers" ("In MSL 4.0
# and earlier, every pointer in a GPU function requires an explicit address space
# annotation"; generic pointers only from MSL 4.1); Apple's compiler takes the unwritten
# space as thread (MLX #3963: "implicitly thread" before 4.1, `this` included) and rejects
# a member function without one called on a device object ("address space mismatch in
# 'this' argument ('const device MyData')", Apple Developer Forums thread 742665).
SPEC_MATRIX_IO = "MSL 6.7: simdgroup_load/simdgroup_store take device or threadgroup memory"
SPEC_IMPLICIT = "MSL 4.0 (before 4.1's generic pointers): an unwritten address space is thread"
# MSL 6.5, Table 6.4: T sincos(T x, T &cosval), T modf(T x, T &intval), T frexp(T x, Ti
# &exponent), T half or float, scalar or vector. The reference's space is unwritten, so thread
# (SPEC_IMPLICIT); Apple's compiler rejects device memory there ("candidate function not
# viable: address space mismatch in 2nd argument ('device float2'), parameter type must be
# 'metal::float2 &'" over `METAL_FUNC float2 modf(float2 x, thread float2 &intval)`,
# KhronosGroup/SPIRV-Cross#1759) and threadgroup memory (`frexp(4.4, param)` with a
# `threadgroup int& param`: "No matching function for call to 'frexp'", gpuweb/gpuweb#1846).
SPEC_MATH_OUT = "MSL 6.5: sincos/modf/frexp write their second result through a thread reference"

REJECT = [
    # ---- address spaces: no conversion between device, constant, threadgroup, thread ----
    (
        "device_to_thread_pointer",
        "void f(thread float* p) { p[0] = 1; }\n" + _kernel("    f(x); // <-\n"),
        "argument 1 of 'f': cannot convert device memory to thread",
        SPEC_SPACES,
    ),
    (
        "threadgroup_to_device_pointer",
        "void f(device float* p) { p[0] = 1; }\n"
        + _kernel("    threadgroup float t[4];\n    f(t); // <-\n"),
        "cannot convert threadgroup memory to device",
        SPEC_SPACES,
    ),
    (
        "device_to_threadgroup_pointer",
        "void f(threadgroup float* p) { p[0] = 1; }\n" + _kernel("    f(x); // <-\n"),
        "cannot convert device memory to threadgroup",
        SPEC_SPACES,
    ),
    (
        "local_address_to_device",
        "void f(device float* p) { p[0] = 1; }\n"
        + _kernel("    float v = 0;\n    f(&v); // <-\n    x[i] = v;\n"),
        "cannot convert thread memory to device",
        SPEC_SPACES,
    ),
    (
        "constant_member_to_thread_reference",
        "float g(thread float& r) { return r; }\n"
        + _kernel(
            "    x[i] = g(c.x); // <-\n",
            "device float* x [[buffer(0)]], constant float4& c [[buffer(1)]],\n"
            "              uint i [[thread_position_in_grid]]",
        ),
        "argument 1 of 'g': cannot convert constant memory to thread",
        SPEC_SPACES,
    ),
    (
        "threadgroup_to_device_reference",
        "void f(device float& r) { r = 1; }\n"
        + _kernel("    threadgroup float t;\n    f(t); // <-\n"),
        "cannot convert threadgroup memory to device",
        SPEC_SPACES,
    ),
    (
        "constant_to_device_pointer",
        "void f(device const float* p, device float* o) { o[0] = p[0]; }\n"
        + _kernel(
            "    f(c, x); // <-\n", "device float* x [[buffer(0)]], constant float* c [[buffer(1)]]"
        ),
        "cannot convert constant memory to device",
        SPEC_SPACES,
    ),
    (
        "declare_threadgroup_from_device",
        _kernel("    threadgroup float* p = x; // <-\n    p[0] = 0;\n"),
        "'p': cannot convert device memory to threadgroup",
        SPEC_SPACES,
    ),
    (
        "declare_device_reference_to_local",
        _kernel("    float v = 1;\n    device float& r = v; // <-\n    x[i] = r;\n"),
        "'r': cannot convert thread memory to device",
        SPEC_SPACES,
    ),
    (
        "declare_thread_pointer_from_constant",
        _kernel(
            "    thread const float* p = c; // <-\n    x[0] = p[0];\n",
            "device float* x [[buffer(0)]], constant float* c [[buffer(1)]]",
        ),
        "'p': cannot convert constant memory to thread",
        SPEC_SPACES,
    ),
    (
        "device_member_to_threadgroup_reference",
        "struct S { float a; };\n"
        "void f(threadgroup float& r) { r = 1; }\n"
        + _kernel("    f(s->a); // <-\n", "device S* s [[buffer(0)]]"),
        "cannot convert device memory to threadgroup",
        SPEC_SPACES,
    ),
    # ---- the same rule through expressions, templates, overloads, assignments, members
    # and returns: clang's own type check (the simulator's typed check, C++ for OpenCL) ----
    (
        "expression_argument",
        "void f(thread float* p) { p[0] = 1; }\n" + _kernel("    f(x + 1); // <-\n"),
        "cannot pass pointer to address space 'device' as a pointer to address space 'thread'",
        SPEC_SPACES,
    ),
    (
        "conditional_argument",
        "void f(thread float* p) { p[0] = 1; }\n" + _kernel("    f(i > 3 ? x : x + 1); // <-\n"),
        "cannot pass pointer to address space 'device' as a pointer to address space 'thread'",
        SPEC_SPACES,
    ),
    (
        "conditional_of_two_spaces",
        _kernel(
            "    threadgroup float t[4];\n"
            "    device float* p = i > 3 ? x : t; // <-\n    p[0] = 0;\n"
        ),
        "incompatible operand types ('device float *' and 'threadgroup float *')",
        SPEC_SPACES,
    ),
    (
        "cast_argument",
        "void f(thread float* p) { p[0] = 1; }\n" + _kernel("    f((device float*)x); // <-\n"),
        "cannot pass pointer to address space 'device' as a pointer to address space 'thread'",
        SPEC_SPACES,
    ),
    (
        "cast_between_spaces",
        _kernel(
            "    threadgroup float t[4];\n"
            "    device float* p = (device float*)t; // <-\n    p[0] = 0;\n"
        ),
        "C-style cast from 'threadgroup float *' to 'device float *' converts between mismatching "
        "address spaces",
        SPEC_SPACES,
    ),
    (
        "call_result_argument",
        "device float* at(device float* p, uint j) { return p + j; }\n"
        "void f(thread float* p) { p[0] = 1; }\n" + _kernel("    f(at(x, i)); // <-\n"),
        "cannot pass pointer to address space 'device' as a pointer to address space 'thread'",
        SPEC_SPACES,
    ),
    (
        "template_argument",
        "template <typename T> void f(thread T* p) { p[0] = 1; }\n" + _kernel("    f(x); // <-\n"),
        "of 1st parameter does not match adjusted type 'device float *' of argument",
        SPEC_SPACES,
    ),
    (
        "template_explicit_argument",
        "template <typename T> void f(threadgroup T* p) { p[0] = 1; }\n"
        + _kernel("    f<float>(x); // <-\n"),
        "cannot pass pointer to address space 'device' as a pointer to address space 'threadgroup'",
        SPEC_SPACES,
    ),
    (
        "overloaded_function",
        "void f(thread float* p) { p[0] = 1; }\nvoid f(thread int* p) { p[0] = 1; }\n"
        + _kernel("    f(x); // <-\n"),
        "cannot pass pointer to address space 'device' as a pointer to address space 'thread'",
        SPEC_SPACES,
    ),
    (
        "program_constant_array_to_device",
        "constant float table[4] = {1, 2, 4, 8};\n"
        "float f(device const float* p) { return p[0]; }\n"
        + _kernel("    x[i] = f(table); // <-\n"),
        "no known conversion from 'const constant float[4]' to 'const device float *'",
        SPEC_SPACES,
    ),
    (
        "program_constant_array_to_thread",
        "constant float table[4] = {1, 2, 4, 8};\n"
        + _kernel("    thread const float* p = table; // <-\n    x[i] = p[0];\n"),
        "of type 'const thread float *' with an lvalue of type 'const constant float[4]'",
        SPEC_SPACES,
    ),
    (
        "pointer_to_pointer",
        "void f(thread float* thread* pp) { (*pp)[0] = 1; }\n" + _kernel("    f(&x); // <-\n"),
        "no known conversion from 'device float *thread *' to 'thread float *thread *'",
        SPEC_SPACES,
    ),
    (
        "assignment_after_declaration",
        _kernel(
            "    float v = 0;\n    thread float* p = &v;\n    p = x; // <-\n    x[i] = p[0];\n"
        ),
        "assigning 'device float *' to 'thread float *' changes address space of pointer",
        SPEC_SPACES,
    ),
    (
        "struct_member_pointer",
        "struct S { device float* p; };\n"
        + _kernel("    threadgroup float t[4];\n    S s;\n    s.p = t; // <-\n    s.p[0] = 1;\n"),
        "assigning to 'device float *' from incompatible type 'threadgroup float[4]'",
        SPEC_SPACES,
    ),
    (
        "struct_member_pointer_argument",
        "struct S { device float* p; };\nvoid f(thread float* q) { q[0] = 1; }\n"
        + _kernel("    S s;\n    s.p = x;\n    f(s.p); // <-\n"),
        "cannot pass pointer to address space 'device' as a pointer to address space 'thread'",
        SPEC_SPACES,
    ),
    (
        "return_changes_space",
        "thread float* g(device float* p) {\n    return p; // <-\n}\n"
        + _kernel("    g(x)[0] = 1;\n"),
        "cannot initialize return object of type 'thread float *' with an lvalue of type "
        "'device float *'",
        SPEC_SPACES,
    ),
    (
        "reference_to_an_element",
        "void f(thread float& r) { r = 1; }\n" + _kernel("    f(x[i]); // <-\n"),
        "cannot bind reference in address space 'device' to object in address space 'thread'",
        SPEC_SPACES,
    ),
    (
        "member_function_of_another_space",
        "struct S {\n    float a;\n    float get() const device { return a; }\n};\n"
        + _kernel(
            "    S loc = s[i];\n    x[i] = loc.get(); // <-\n",
            "device float* x [[buffer(0)]], device S* s [[buffer(1)]],\n"
            "              uint i [[thread_position_in_grid]]",
        ),
        "cannot initialize object parameter of type 'const device S' with an expression of type "
        "'thread S'",
        SPEC_SPACES,
    ),
    # ---- no address space written: thread, before MSL 4.1 (the typed check) ----------
    (
        "unqualified_pointer_parameter",
        "void f(float* p) { p[0] = 1; }\n" + _kernel("    f(x); // <-\n"),
        "cannot pass pointer to address space 'device' as a pointer to address space 'thread'",
        SPEC_IMPLICIT,
    ),
    (
        "unqualified_reference_parameter",
        "void f(float& r) { r = 1; }\n" + _kernel("    f(x[i]); // <-\n"),
        "cannot bind reference in address space 'device' to object in address space 'thread'",
        SPEC_IMPLICIT,
    ),
    (
        "unqualified_local_pointer",
        _kernel("    float* p = x; // <-\n    p[i] = 1;\n"),
        "cannot initialize a variable of type 'thread float *' with an lvalue of type "
        "'device float *'",
        SPEC_IMPLICIT,
    ),
    (
        "unqualified_pointer_to_threadgroup",
        _kernel("    threadgroup float t[4];\n    const float* p = t; // <-\n    x[i] = p[0];\n"),
        "with an lvalue of type 'threadgroup float[4]'",
        SPEC_IMPLICIT,
    ),
    (
        "unqualified_reference_return",
        "float& first(device float* p) { return p[0]; } // <-\n" + _kernel("    first(x) = 1;\n"),
        "binding reference of type 'thread float' to value of type 'device float' changes "
        "address space",
        SPEC_IMPLICIT,
    ),
    (
        # Apple Developer Forums 742665: operator[] without a qualifier on a device buffer
        "unqualified_member_function_on_device_object",
        "struct MyData {\n    float data[12];\n"
        "    float operator[](int j) const { return data[j]; }\n};\n"
        + _kernel(
            "    x[i] = b[0][i % 12]; // <-\n",
            "device float* x [[buffer(0)]], device const MyData* b [[buffer(1)]],\n"
            "              uint i [[thread_position_in_grid]]",
        ),
        "'this' object is in address space 'device', but method expects object in address "
        "space 'thread'",
        SPEC_IMPLICIT,
    ),
    (
        "unqualified_member_function_on_constant_object",
        "struct Params {\n    float s;\n    float scaled(float v) const { return v * s; }\n};\n"
        + _kernel(
            "    x[i] = p.scaled(x[i]); // <-\n",
            "device float* x [[buffer(0)]], constant Params& p [[buffer(1)]],\n"
            "              uint i [[thread_position_in_grid]]",
        ),
        "cannot initialize object parameter of type 'const thread Params' with an expression "
        "of type 'const constant Params'",
        SPEC_IMPLICIT,
    ),
    # ---- program-scope variables ------------------------------------------------------
    (
        "global_float",
        "float scale = 2.0f; // <-\n" + _kernel("    x[i] *= scale;\n"),
        "must reside in the constant address space",
        SPEC_PROGRAM,
    ),
    (
        "global_const",
        "const float scale = 2.0f; // <-\n" + _kernel("    x[i] *= scale;\n"),
        "must reside in the constant address space",
        SPEC_PROGRAM,
    ),
    (
        "global_static",
        "static float counter; // <-\n" + _kernel("    x[i] = counter;\n"),
        "must reside in the constant address space",
        SPEC_PROGRAM,
    ),
    (
        "global_device_pointer",
        "device float* g; // <-\n" + _kernel("    x[i] = 0;\n"),
        "must reside in the constant address space",
        SPEC_PROGRAM,
    ),
    (
        "global_table",
        "int table[4] = {1, 2, 3, 4}; // <-\n" + _kernel("    x[i] = table[i & 3];\n"),
        "must reside in the constant address space",
        SPEC_PROGRAM,
    ),
    (
        "global_struct_var",
        "struct S { float a; } s; // <-\n" + _kernel("    x[i] = s.a;\n"),
        "'s' must reside in the constant address space",
        SPEC_PROGRAM,
    ),
    (
        "global_vector",
        "float2 offset; // <-\n" + _kernel("    x[i] = offset.x;\n"),
        "'offset' must reside in the constant address space",
        SPEC_PROGRAM,
    ),
    (
        "global_two",
        "uint n = 4, m = 5; // <-\n" + _kernel("    x[i] = n + m;\n"),
        "must reside in the constant address space",
        SPEC_PROGRAM,
    ),
    (
        "global_in_namespace",
        "namespace p {\nfloat bias = 1.0f; // <-\n}\n" + _kernel("    x[i] += p::bias;\n"),
        "'bias' must reside in the constant",
        SPEC_PROGRAM,
    ),
    (
        "global_threadgroup",
        "threadgroup float tile[64]; // <-\n" + _kernel("    x[i] = tile[0];\n"),
        "threadgroup variable 'tile' at program scope",
        SPEC_TG,
    ),
    # ---- threadgroup declarations outside kernels -------------------------------------
    (
        "tg_in_helper",
        "float helper(float v) {\n    threadgroup float t[32]; // <-\n"
        "    t[0] = v;\n    return t[0];\n}\n" + _kernel("    x[i] = helper(x[i]);\n"),
        "threadgroup variable 't' declared in a helper function",
        SPEC_TG,
    ),
    (
        "tg_in_template_helper",
        "template <class T> T helper(T v) {\n    threadgroup T t[4]; // <-\n"
        "    t[0] = v;\n    return t[0];\n}\n" + _kernel("    x[i] = helper(x[i]);\n"),
        "declared in a helper function",
        SPEC_TG,
    ),
    (
        "tg_in_namespace_helper",
        "namespace h {\ninline void f(device float* x) {\n"
        "    threadgroup float s; // <-\n    s = 1;\n    x[0] = s;\n}\n}\n"
        + _kernel("    h::f(x);\n"),
        "threadgroup variable 's' declared in a helper function",
        SPEC_TG,
    ),
    (
        "tg_in_member_function",
        "struct Acc {\n    float get() {\n        threadgroup float t[2]; // <-\n"
        "        return t[0];\n    }\n};\n" + _kernel("    Acc a;\n    x[i] = a.get();\n"),
        "declared in a helper function",
        SPEC_TG,
    ),
    (
        "tg_atomic_float",
        _kernel("    threadgroup atomic_float s; // <-\n    x[i] = 0;\n"),
        "threadgroup atomic_float 's'",
        SPEC_ATOMIC,
    ),
    (
        "tg_atomic_float_template",
        _kernel("    threadgroup atomic<float> s[4]; // <-\n    x[i] = 0;\n"),
        "threadgroup atomic_float 's'",
        SPEC_ATOMIC,
    ),
    # ---- variable-length arrays ---------------------------------------------------------
    (
        "vla_buffer_size",
        _kernel(
            "    float t[n]; // <-\n    t[0] = 1;\n    x[i] = t[0];\n",
            "device float* x [[buffer(0)]], constant uint& n "
            "[[buffer(1)]], uint i [[thread_position_in_grid]]",
        ),
        "variable length array",
        SPEC_ARRAYS,
    ),
    (
        "vla_thread_id",
        _kernel("    int t[i + 1]; // <-\n    t[0] = 1;\n    x[i] = t[0];\n"),
        "variable length array",
        SPEC_ARRAYS,
    ),
    (
        "vla_second_dim",
        _kernel(
            "    float t[4][n]; // <-\n    t[0][0] = 1;\n    x[i] = t[0][0];\n",
            "device float* x [[buffer(0)]], constant uint& n "
            "[[buffer(1)]], uint i [[thread_position_in_grid]]",
        ),
        "variable length array",
        SPEC_ARRAYS,
    ),
    (
        "vla_in_helper",
        "float f(uint n) {\n    float t[n]; // <-\n    t[0] = 2;\n    return t[0];\n}\n"
        + _kernel("    x[i] = f(i + 1);\n"),
        "variable length array",
        SPEC_ARRAYS,
    ),
    # ---- buffer arguments without device or constant --------------------------------------
    (
        "buffer_plain_pointer",
        _kernel(
            "    x[i] = 0;\n",
            "float* x [[buffer(0)]], // <-\n              uint i [[thread_position_in_grid]]",
        ),
        "must be a pointer or reference in the device or constant address space",
        SPEC_BUFFER,
    ),
    (
        "buffer_const_pointer",
        _kernel(
            "    x[0] = y[i];\n",
            "device float* x [[buffer(0)]],\n              const float* y [[buffer(1)]], // <-\n"
            "              uint i [[thread_position_in_grid]]",
        ),
        "'y': a [[buffer]] argument must be a pointer or reference in the device",
        SPEC_BUFFER,
    ),
    (
        "buffer_plain_reference",
        _kernel(
            "    x[i] = n;\n",
            "device float* x [[buffer(0)]],\n              const uint& n [[buffer(1)]], // <-\n"
            "              uint i [[thread_position_in_grid]]",
        ),
        "'n': a [[buffer]] argument must be",
        SPEC_BUFFER,
    ),
    (
        "buffer_threadgroup_pointer",
        _kernel(
            "    x[i] = t[0];\n",
            "device float* x [[buffer(0)]],\n"
            "              threadgroup float* t [[buffer(1)]], // <-\n"
            "              uint i [[thread_position_in_grid]]",
        ),
        "'t': a [[buffer]] argument must be",
        SPEC_BUFFER,
    ),
    (
        "buffer_by_value",
        _kernel(
            "    x[i] = n;\n",
            "device float* x [[buffer(0)]],\n              uint n [[buffer(1)]], // <-\n"
            "              uint i [[thread_position_in_grid]]",
        ),
        "must be a device or constant pointer or reference",
        SPEC_BUFFER,
    ),
    # ---- builtin attributes on the wrong types --------------------------------------------
    (
        "pos_float",
        _kernel(
            "    x[0] = i;\n",
            "device float* x [[buffer(0)]],\n"
            "              float i [[thread_position_in_grid]] // <-\n",
        ),
        "[[thread_position_in_grid]] cannot be declared as 'float'",
        SPEC_BUILTIN,
    ),
    (
        "pos_int",
        _kernel(
            "    x[i] = 0;\n",
            "device float* x [[buffer(0)]],\n"
            "              int i [[thread_position_in_grid]] // <-\n",
        ),
        "cannot be declared as 'int'",
        SPEC_BUILTIN,
    ),
    (
        "pos_uint4",
        _kernel(
            "    x[i.x] = 0;\n",
            "device float* x [[buffer(0)]],\n"
            "              uint4 i [[thread_position_in_grid]] // <-\n",
        ),
        "cannot be declared as 'uint4'",
        SPEC_BUILTIN,
    ),
    (
        "pos_long",
        _kernel(
            "    x[i] = 0;\n",
            "device float* x [[buffer(0)]],\n"
            "              long i [[thread_position_in_grid]] // <-\n",
        ),
        "cannot be declared as 'long'",
        SPEC_BUILTIN,
    ),
    (
        "index_uint2",
        _kernel(
            "    x[t.x] = 0;\n",
            "device float* x [[buffer(0)]],\n"
            "              uint2 t [[thread_index_in_threadgroup]] // <-\n",
        ),
        "[[thread_index_in_threadgroup]] cannot be declared "
        "as 'uint2'; MSL declares it as uint or ushort",
        SPEC_BUILTIN,
    ),
    (
        "lane_uint3",
        _kernel(
            "    x[l.x] = 0;\n",
            "device float* x [[buffer(0)]],\n"
            "              uint3 l [[thread_index_in_simdgroup]] // <-\n",
        ),
        "[[thread_index_in_simdgroup]] cannot be declared as 'uint3'",
        SPEC_BUILTIN,
    ),
    (
        "group_float4",
        _kernel(
            "    x[0] = g.x;\n",
            "device float* x [[buffer(0)]],\n"
            "              float4 g [[threadgroup_position_in_grid]] // <-\n",
        ),
        "cannot be declared as 'float4'",
        SPEC_BUILTIN,
    ),
    (
        "width_half",
        _kernel(
            "    x[0] = w;\n",
            "device float* x [[buffer(0)]],\n"
            "              half w [[threads_per_simdgroup]] // <-\n",
        ),
        "[[threads_per_simdgroup]] cannot be declared as 'half'",
        SPEC_BUILTIN,
    ),
    (
        "simdgroup_index_uint2",
        _kernel(
            "    x[s.x] = 0;\n",
            "device float* x [[buffer(0)]],\n"
            "              uint2 s [[simdgroup_index_in_threadgroup]] // <-\n",
        ),
        "cannot be declared as 'uint2'",
        SPEC_BUILTIN,
    ),
    (
        "quad_lane_bool",
        _kernel(
            "    x[0] = q;\n",
            "device float* x [[buffer(0)]],\n"
            "              bool q [[thread_index_in_quadgroup]] // <-\n",
        ),
        "cannot be declared as 'bool'",
        SPEC_BUILTIN,
    ),
    (
        "tpg_int3",
        _kernel(
            "    x[0] = n.x;\n",
            "device float* x [[buffer(0)]],\n"
            "              int3 n [[threads_per_threadgroup]] // <-\n",
        ),
        "cannot be declared as 'int3'",
        SPEC_BUILTIN,
    ),
    (
        "width_and_simd_width",
        "kernel void k(device float* x [[buffer(0)]], // <-\n"
        "              uint a [[thread_execution_width]],\n"
        "              uint b [[threads_per_simdgroup]]) {\n"
        "    x[0] = a + b;\n}\n",
        "declares both [[thread_execution_width]] and [[threads_per_simdgroup]]",
        "MSL 5.2.3.6: the two are aliases of one builtin (Apple forum 708854)",
    ),
    # ---- SIMD-group functions on structs ---------------------------------------------------
    (
        "simd_sum_struct",
        "struct P { float a, b; };\n"
        + _kernel("    P p = {x[i], 1.0f};\n    P s = simd_sum(p); // <-\n    x[i] = s.a;\n"),
        "reductions take a scalar or vector type",
        SPEC_SIMD,
    ),
    (
        "simd_max_struct",
        "struct P { float a; };\n"
        + _kernel("    P p = {x[i]};\n    P s = simd_max(p); // <-\n    x[i] = s.a;\n"),
        "reductions take a scalar or vector type",
        SPEC_SIMD,
    ),
    (
        "simd_prefix_struct",
        "struct P { int a; };\n"
        + _kernel(
            "    P p = {1};\n    P s = simd_prefix_exclusive_sum(p); // <-\n    x[i] = s.a;\n"
        ),
        "reductions take a scalar or vector type",
        SPEC_SIMD,
    ),
    (
        "quad_sum_struct",
        "struct P { float a; };\n"
        + _kernel("    P p = {x[i]};\n    P s = quad_sum(p); // <-\n    x[i] = s.a;\n"),
        "reductions take a scalar or vector type",
        SPEC_SIMD,
    ),
    (
        "simd_shuffle_struct",
        "struct P { float a; };\n"
        + _kernel("    P p = {x[i]};\n    P s = simd_shuffle_down(p, 1); // <-\n    x[i] = s.a;\n"),
        "shuffles and broadcasts take a scalar or vector type",
        SPEC_SIMD,
    ),
    (
        "simd_broadcast_struct",
        "struct P { float a; };\n"
        + _kernel("    P p = {x[i]};\n    P s = simd_broadcast(p, 0); // <-\n    x[i] = s.a;\n"),
        "shuffles and broadcasts take a scalar or vector type",
        SPEC_SIMD,
    ),
    # ---- simdgroup_matrix types and sizes -----------------------------------------------
    (
        "matrix_int",
        _kernel("    simdgroup_matrix<int, 8, 8> m; // <-\n    x[i] = 0;\n"),
        "simdgroup_matrix elements are float or half",
        SPEC_MATRIX,
    ),
    (
        "matrix_uint",
        _kernel("    simdgroup_matrix<uint, 8, 8> m; // <-\n    x[i] = 0;\n"),
        "simdgroup_matrix elements are float or half",
        SPEC_MATRIX,
    ),
    (
        "matrix_4x4",
        _kernel("    simdgroup_matrix<float, 4, 4> m; // <-\n    x[i] = 0;\n"),
        "simdgroup_matrix is 8x8",
        SPEC_MATRIX,
    ),
    (
        "matrix_16x16",
        _kernel("    simdgroup_matrix<half, 16, 16> m; // <-\n    x[i] = 0;\n"),
        "simdgroup_matrix is 8x8",
        SPEC_MATRIX,
    ),
    (
        "matrix_8x4",
        _kernel("    simdgroup_matrix<float, 8, 4> m; // <-\n    x[i] = 0;\n"),
        "simdgroup_matrix is 8x8",
        SPEC_MATRIX,
    ),
    (
        "matrix_filled_int",
        _kernel(
            "    auto m = make_filled_simdgroup_matrix<short, 8, 8>(1); // <-\n    x[i] = 0;\n"
        ),
        "simdgroup_matrix elements are float or half",
        SPEC_MATRIX,
    ),
    (
        "matrix_load_from_thread_memory",
        _kernel(
            "    float loc[64];\n    for (int j = 0; j < 64; j++) loc[j] = j;\n"
            "    simdgroup_float8x8 m;\n    simdgroup_load(m, loc, 8); // <-\n"
            "    simdgroup_store(m, x, 8);\n"
        ),
        "no known conversion from 'thread float[64]' to 'const device float *'",
        SPEC_MATRIX_IO,
    ),
    (
        "matrix_store_to_thread_memory",
        _kernel(
            "    half loc[64];\n"
            "    simdgroup_half8x8 m = make_filled_simdgroup_matrix<half, 8>(1.0h);\n"
            "    simdgroup_store(m, loc, 8); // <-\n    x[i] = loc[i % 64];\n"
        ),
        "no known conversion from 'thread half[64]' to 'threadgroup half *'",
        SPEC_MATRIX_IO,
    ),
    (
        "matrix_load_from_constant_memory",
        _kernel(
            "    simdgroup_float8x8 m;\n    simdgroup_load(m, c, 8); // <-\n"
            "    simdgroup_store(m, x, 8);\n",
            "device float* x [[buffer(0)]], constant float* c [[buffer(1)]]",
        ),
        "cannot pass pointer to address space 'constant' as a pointer to address space 'device'",
        SPEC_MATRIX_IO,
    ),
    (
        "matrix_load_from_a_constant_table",
        "constant half kTable[64] = {1, 2, 3};\n"
        + _kernel(
            "    simdgroup_half8x8 m;\n    simdgroup_load(m, kTable); // <-\n"
            "    simdgroup_store(m, h);\n",
            "device half* h [[buffer(0)]]",
        ),
        "simdgroup_load reads and simdgroup_store writes device or threadgroup memory",
        SPEC_MATRIX_IO,
    ),
    (
        "matrix_load_half_into_float",
        _kernel(
            "    simdgroup_float8x8 m;\n"
            "    simdgroup_load(m, h); // <-\n    simdgroup_store(m, x);\n",
            "device float* x [[buffer(0)]], device half* h [[buffer(1)]]",
        ),
        "need a pointer to the matrix's element type",
        SPEC_MATRIX,
    ),
    (
        "matrix_store_float_into_half",
        _kernel(
            "    simdgroup_float8x8 m(1.0f);\n    simdgroup_store(m, h); // <-\n",
            "device half* h [[buffer(0)]]",
        ),
        "need a pointer to the matrix's element type",
        SPEC_MATRIX,
    ),
    (
        "matrix_load_float_into_half",
        _kernel(
            "    simdgroup_half8x8 m;\n    simdgroup_load(m, x); // <-\n",
            "device float* x [[buffer(0)]]",
        ),
        "need a pointer to the matrix's element type",
        SPEC_MATRIX,
    ),
    # ---- math functions with a second result: a thread reference --------------------------
    (
        "sincos_cosval_in_device_memory",
        _kernel(
            "    x[i] = sincos(x[i], c[i]); // <-\n",
            "device float* x [[buffer(0)]], device float* c [[buffer(1)]],\n"
            "              uint i [[thread_position_in_grid]]",
        ),
        "cosval, intval and exponent are thread references",
        SPEC_MATH_OUT,
    ),
    (
        "modf_intval_in_a_device_struct",
        "struct Parts { float2 whole[4]; };\n"
        + _kernel(
            "    float2 v = float2(x[i], -x[i]);\n    v = modf(v, p->whole[i % 4]); // <-\n"
            "    x[i] = v.x;\n",
            "device float* x [[buffer(0)]], device Parts* p [[buffer(1)]],\n"
            "              uint i [[thread_position_in_grid]]",
        ),
        "cosval, intval and exponent are thread references",
        SPEC_MATH_OUT,
    ),
    (
        "modf_intval_in_threadgroup_memory",
        _kernel("    threadgroup float t[32];\n    x[i] = modf(x[i], t[i % 32]); // <-\n"),
        "cosval, intval and exponent are thread references",
        SPEC_MATH_OUT,
    ),
    (
        "frexp_exponent_in_threadgroup_memory",
        "float mant(float v, threadgroup int& e) { return frexp(v, e); } // <-\n"
        + _kernel("    threadgroup int e;\n    x[i] = mant(x[i], e);\n"),
        "cosval, intval and exponent are thread references",
        SPEC_MATH_OUT,
    ),
    (
        "frexp_exponent_in_device_memory",
        _kernel(
            "    x[i] = frexp(x[i], e[i]); // <-\n",
            "device float4* x [[buffer(0)]], device int4* e [[buffer(1)]],\n"
            "              uint i [[thread_position_in_grid]]",
        ),
        "cosval, intval and exponent are thread references",
        SPEC_MATH_OUT,
    ),
    # ---- atomics --------------------------------------------------------------------------
    (
        "atomic_float_fetch_max",
        _kernel(
            "    atomic_fetch_max_explicit(a, 1.0f, memory_order_relaxed); // <-\n",
            "device atomic_float* a [[buffer(0)]]",
        ),
        "atomic_float has no fetch_min/fetch_max",
        SPEC_ATOMIC,
    ),
    (
        "atomic_float_fetch_min",
        _kernel(
            "    atomic_fetch_min_explicit(a, 1.0f, memory_order_relaxed); // <-\n",
            "device atomic_float* a [[buffer(0)]]",
        ),
        "atomic_float has no fetch_min/fetch_max",
        SPEC_ATOMIC,
    ),
    (
        "atomic_float_fetch_or",
        _kernel(
            "    atomic_fetch_or_explicit(a, 1.0f, memory_order_relaxed); // <-\n",
            "device atomic_float* a [[buffer(0)]]",
        ),
        "atomic_float has no fetch_and/fetch_or",
        SPEC_ATOMIC,
    ),
    (
        "order_seq_cst",
        _kernel(
            "    atomic_fetch_add_explicit(a, 1, memory_order_seq_cst); // <-\n",
            "device atomic_int* a [[buffer(0)]]",
        ),
        "'memory_order_seq_cst': Metal's atomic functions support only",
        SPEC_ATOMIC,
    ),
    (
        "order_acquire",
        _kernel(
            "    int v = atomic_load_explicit(a, memory_order_acquire); // <-\n    (void)v;\n",
            "device atomic_int* a [[buffer(0)]]",
        ),
        "'memory_order_acquire'",
        SPEC_ATOMIC,
    ),
    (
        "order_release",
        _kernel(
            "    atomic_store_explicit(a, 1u, memory_order_release); // <-\n",
            "device atomic_uint* a [[buffer(0)]]",
        ),
        "'memory_order_release'",
        SPEC_ATOMIC,
    ),
    (
        "order_acq_rel",
        _kernel(
            "    atomic_exchange_explicit(a, 2, memory_order_acq_rel); // <-\n",
            "device atomic_int* a [[buffer(0)]]",
        ),
        "'memory_order_acq_rel'",
        SPEC_ATOMIC,
    ),
    (
        "order_in_helper",
        "inline void bump(device atomic_int* a) {\n"
        "    atomic_fetch_add_explicit(a, 1, memory_order_seq_cst); // <-\n}\n"
        + _kernel("    bump(a);\n", "device atomic_int* a [[buffer(0)]]"),
        "'memory_order_seq_cst'",
        SPEC_ATOMIC,
    ),
    (
        "atomic_local_int",
        _kernel("    atomic_int c; // <-\n    x[i] = 0;\n"),
        "'c': atomic types live in device or threadgroup memory",
        SPEC_ATOMIC,
    ),
    (
        "atomic_local_template",
        _kernel("    atomic<uint> c; // <-\n    x[i] = 0;\n"),
        "'c': atomic types live in device or threadgroup memory",
        SPEC_ATOMIC,
    ),
    (
        "atomic_local_float",
        _kernel("    atomic_float f; // <-\n    x[i] = 0;\n"),
        "Metal does not support atomics in thread memory",
        SPEC_ATOMIC,
    ),
    (
        "atomic_local_volatile",
        _kernel("    volatile atomic_uint c; // <-\n    x[i] = 0;\n"),
        "Metal does not support atomics in thread memory",
        SPEC_ATOMIC,
    ),
    (
        "atomic_local_in_helper",
        "inline uint f() {\n    atomic_uint c; // <-\n    return 0;\n}\n"
        + _kernel("    x[i] = f();\n"),
        "atomics in thread memory",
        SPEC_ATOMIC,
    ),
    # ---- C++ features Metal lacks --------------------------------------------------------
    (
        "lambda",
        _kernel("    auto twice = [](float v) { return 2 * v; }; // <-\n    x[i] = twice(x[i]);\n"),
        "lambda expressions are not supported by Metal",
        SPEC_RESTRICT,
    ),
    (
        "lambda_capture",
        _kernel("    auto zero = [&] { x[i] = 0; }; // <-\n    zero();\n"),
        "lambda expressions are not supported by Metal",
        SPEC_RESTRICT,
    ),
    (
        "lambda_argument",
        "template <class F> float apply(F f, float v) { return f(v); }\n"
        + _kernel("    x[i] = apply([](float v) { return v + 1; }, x[i]); // <-\n"),
        "lambda expressions are not supported",
        SPEC_RESTRICT,
    ),
    (
        "lambda_returned",
        "inline float f(float v) {\n    return [=]() { return v; }(); // <-\n}\n"
        + _kernel("    x[i] = f(x[i]);\n"),
        "lambda expressions are not supported",
        SPEC_RESTRICT,
    ),
    (
        "double_helper",
        "inline double twice(float v) { return 2 * v; } // <-\n"
        + _kernel("    x[i] = twice(x[i]);\n"),
        "'double' is not supported by Metal",
        SPEC_RESTRICT,
    ),
    (
        "goto",
        _kernel("    if (i > 3) goto done; // <-\n    x[i] = 0;\ndone:\n    return;\n"),
        "'goto' is not supported",
        SPEC_RESTRICT,
    ),
    (
        "virtual",
        "struct B {\n    virtual float f() { return 1; } // <-\n};\n" + _kernel("    x[i] = 0;\n"),
        "'virtual' functions are not supported",
        SPEC_RESTRICT,
    ),
    (
        "register",
        _kernel("    register float r = x[i]; // <-\n    x[i] = r;\n"),
        "'register' is not supported by Metal",
        SPEC_RESTRICT,
    ),
    (
        "noexcept_operator",
        _kernel("    bool b = noexcept(x[i] + 1); // <-\n    x[i] = b;\n"),
        "the 'noexcept' operator is not supported by Metal",
        SPEC_RESTRICT,
    ),
    (
        "new",
        _kernel("    float* p = new float; // <-\n    x[i] = *p;\n"),
        "'new' is not supported",
        SPEC_RESTRICT,
    ),
    (
        "throw",
        _kernel("    if (x[i] < 0) throw 1; // <-\n"),
        "exceptions are not supported",
        SPEC_RESTRICT,
    ),
    (
        "dynamic_cast",
        "struct B { float v; };\n"
        + _kernel("    B b{1};\n    B* p = dynamic_cast<B*>(&b); // <-\n    x[i] = p->v;\n"),
        "run-time type information",
        SPEC_RESTRICT,
    ),
    (
        "recursion",
        "float fact(float n) {\n    return n <= 1 ? 1 : n * fact(n - 1); // <-\n}\n"
        + _kernel("    x[i] = fact(x[i]);\n"),
        "recursion is not supported by Metal",
        SPEC_RESTRICT,
    ),
    (
        "std_header",
        "#include <cmath> // <-\n" + _kernel("    x[i] = 0;\n"),
        "no C or C++ standard library",
        SPEC_RESTRICT,
    ),
    ("long_double", _kernel("    x[i] = 2.5L; // <-\n"), "long double literal", SPEC_RESTRICT),
    # ---- kernel signatures ---------------------------------------------------------------
    (
        "kernel_returns_float",
        "kernel float k(device float* x [[buffer(0)]]) { // <-\n    return x[0];\n}\n",
        "kernel 'k' must return void",
        SPEC_KERNEL,
    ),
    (
        "buffer_slot_31",
        "kernel void k(device float* x [[buffer(31)]]) { // <-\n    x[0] = 0;\n}\n",
        "[[buffer(31)]] is out of range",
        SPEC_KERNEL,
    ),
    (
        "buffer_slot_twice",
        "kernel void k(device float* x [[buffer(0)]], // <-\n"
        "              device float* y [[buffer(0)]]) {\n    x[0] = y[0];\n}\n",
        "are both [[buffer(0)]]",
        SPEC_KERNEL,
    ),
    (
        "param_without_attribute",
        "kernel void k(device float* x [[buffer(0)]],\n"
        "              uint n) { // <-\n    x[0] = n;\n}\n",
        "'n' needs an attribute",
        SPEC_KERNEL,
    ),
]


# ---- valid but tricky: each compiles and computes the right values ------------------------
# (id, source, run) where run(lib) dispatches kernel "k" and checks against NumPy.


def _dev(x):
    return metal.DeviceArray.from_numpy(np.ascontiguousarray(x))


def _run_1d(lib, x, n=None, **kw):
    n = x.size if n is None else n
    y = _dev(x)
    lib.function("k")(y, threads=n, threads_per_threadgroup=kw.pop("tg", 32), **kw)
    return y.numpy()


X33 = np.arange(33, dtype=np.float32) - 16.5


def _check(want, **kw):
    def run(lib):
        np.testing.assert_allclose(_run_1d(lib, X33.copy(), **kw), want(X33), rtol=1e-6)

    return run


def _check_atomic_sum(lib):
    x = _dev(X33)
    total = metal.DeviceArray.zeros(1, np.float32)
    lib.function("k")(x, total, threads=33, threads_per_threadgroup=8)
    np.testing.assert_allclose(total.numpy()[0], X33.sum(), rtol=1e-5)


def _check_tg_counter(lib):
    out = metal.DeviceArray.zeros(3, np.uint32)
    lib.function("k")(out, threadgroups=3, threads_per_threadgroup=40)
    np.testing.assert_array_equal(out.numpy(), [40, 40, 40])


def _check_atomic_max(lib):
    x = np.array([3, 9, 1, 7, 2], np.uint32)
    out = metal.DeviceArray.zeros(1, np.uint32)
    lib.function("k")(_dev(x), out, threads=5, threads_per_threadgroup=5)
    assert out.numpy()[0] == 9


def _check_simd_sum4(lib):
    x = np.arange(64 * 4, dtype=np.float32).reshape(64, 4)
    y = metal.DeviceArray.zeros((64, 4), np.float32)
    lib.function("k")(_dev(x), y, threads=64, threads_per_threadgroup=64)
    want = np.repeat(x.reshape(2, 32, 4).sum(axis=1), 32, axis=0)
    np.testing.assert_allclose(y.numpy(), want, rtol=1e-6)


def _check_half_matmul(lib):
    rng = np.random.default_rng(0)
    a = rng.integers(-3, 4, (8, 8)).astype(np.float16)
    b = rng.integers(-3, 4, (8, 8)).astype(np.float16)
    c = metal.DeviceArray.zeros((8, 8), np.float16)
    lib.function("k")(_dev(a), _dev(b), c, threads=32, threads_per_threadgroup=32)
    np.testing.assert_array_equal(
        c.numpy(), (a.astype(np.float32) @ b.astype(np.float32)).astype(np.float16)
    )


def _check_tg_reduce(lib):
    x = np.arange(2 * 32, dtype=np.float32)
    out = metal.DeviceArray.zeros(2, np.float32)
    lib.function("k")(_dev(x), out, threadgroups=2, threads_per_threadgroup=32)
    np.testing.assert_allclose(out.numpy(), x.reshape(2, 32).sum(axis=1))


def _check_positions_2d(lib):
    out = metal.DeviceArray.zeros((5, 7), np.uint32)
    lib.function("k")(out, threads=(7, 5), threads_per_threadgroup=(4, 2))
    r, c = np.mgrid[0:5, 0:7]
    np.testing.assert_array_equal(out.numpy(), r * 100 + c)


def _check_width(lib):
    out = metal.DeviceArray.zeros(4, np.uint32)
    lib.function("k")(out, threads=4, threads_per_threadgroup=4)
    np.testing.assert_array_equal(out.numpy(), [32] * 4)


def _check_spaces(lib):
    c = np.array([1, 2, 3, 4], np.float32)
    y = _dev(X33)
    lib.function("k")(y, c, threads=33, threads_per_threadgroup=11)
    np.testing.assert_allclose(y.numpy(), X33 + 1 + 10 + 2)


def _check_unqualified(lib):
    y, acc = _dev(X33), metal.DeviceArray.from_numpy(np.zeros(66, np.float32))
    lib.function("k")(y, acc, threads=33, threads_per_threadgroup=11)
    np.testing.assert_allclose(y.numpy(), -5 * X33 + 3, rtol=1e-6)


MATH_OUT_KERNEL = (
    "struct Parts { float whole; };\n"
    "float split(float v, thread float& whole) { return modf(v, whole); }\n"
    "float cos_of(float v) { float c; sincos(v, c); return c; }\n"
    "kernel void k(device const float* x [[buffer(0)]], device float* o [[buffer(1)]],\n"
    "              device int4* e [[buffer(2)]], uint i [[thread_position_in_grid]]) {\n"
    "    float v = x[i];\n    device float* r = o + 20 * i;\n"
    "    thread float c;\n    r[0] = sincos(v, c);\n    r[1] = c + 0 * cos_of(v);\n"
    "    Parts p;\n    r[2] = split(v, p.whole);\n    r[3] = p.whole;\n"
    "    float3 c3;\n    float3 s3 = fast::sincos(float3(v, 2 * v, -v), c3);\n"
    "    r[4] = s3.x; r[5] = s3.y; r[6] = s3.z; r[7] = c3.x; r[8] = c3.y; r[9] = c3.z;\n"
    "    int4 ex;\n    float4 m = frexp(float4(v, 1 / (v + 0.25f), v * 1e6f, 0), ex);\n"
    "    r[10] = m.x; r[11] = m.y; r[12] = m.z; r[13] = m.w;\n    e[i] = ex;\n"
    "    half hc[2];\n    r[14] = precise::sincos(half(v * 0.125f), hc[1]);\n    r[15] = hc[1];\n"
    "    half2 hi;\n    half2 hf = modf(half2(v, v * -0.75h), hi);\n"
    "    r[16] = hf.x; r[17] = hf.y; r[18] = hi.x; r[19] = hi.y;\n}\n"
)


def _check_math_out(lib):
    n = X33.size
    o, e = metal.DeviceArray.zeros(20 * n, np.float32), metal.DeviceArray.zeros((n, 4), np.int32)
    lib.function("k")(_dev(X33), o, e, threads=n, threads_per_threadgroup=11)
    r, v = o.numpy().reshape(n, 20), X33.astype(np.float64)
    close = dict(rtol=2e-6, atol=2e-6)
    np.testing.assert_allclose(r[:, 0], np.sin(v), **close)
    np.testing.assert_allclose(r[:, 1], np.cos(v), **close)
    frac, whole = np.modf(X33)
    np.testing.assert_array_equal(r[:, 2:4], np.stack([frac, whole], 1))
    v3 = np.stack([v, 2 * v, -v], 1)
    np.testing.assert_allclose(r[:, 4:10], np.concatenate([np.sin(v3), np.cos(v3)], 1), **close)
    w = np.stack(
        [X33, np.float32(1) / (X33 + np.float32(0.25)), X33 * np.float32(1e6), 0 * X33], 1
    ).astype(np.float32)
    mant, ex = np.frexp(w)
    np.testing.assert_array_equal(r[:, 10:14], mant)
    np.testing.assert_array_equal(e.numpy(), ex)
    h = (X33 * np.float32(0.125)).astype(np.float16).astype(np.float64)
    np.testing.assert_allclose(r[:, 14], np.sin(h).astype(np.float16), atol=1e-3)
    np.testing.assert_allclose(r[:, 15], np.cos(h).astype(np.float16), atol=1e-3)
    h2 = np.stack([X33, X33 * np.float32(-0.75)], 1).astype(np.float16)
    hfrac, hwhole = np.modf(h2)
    np.testing.assert_array_equal(r[:, 16:20], np.concatenate([hfrac, hwhole], 1))


def _check_matrix_io(lib):
    a = np.arange(64, dtype=np.float32).reshape(8, 8) - 20.5
    b = (np.arange(64, dtype=np.float32).reshape(8, 8) * 0.25).astype(np.float16)
    x, h = _dev(a), _dev(b)
    lib.function("k")(x, h, threads=32, threads_per_threadgroup=32)
    np.testing.assert_array_equal(x.numpy(), a.T)
    np.testing.assert_array_equal(h.numpy(), b.T)


TABLE = np.array([1, 2, 4, 8], np.float32)


def _check_typed_spaces(lib):
    y = _dev(X33)
    lib.function("k")(y, np.array([2.0, 0.5], np.float32), threads=33, threads_per_threadgroup=11)
    want = X33 * 2 + 0.5 + TABLE[np.arange(33) % 4] + 7 + 3
    np.testing.assert_allclose(y.numpy(), want, rtol=1e-6)


ACCEPT = [
    (
        # before MSL 4.1 an unwritten address space is thread: helpers, locals, members,
        # aliases and templates that take thread memory so, a static member function, and a
        # member function with a device overload beside the unqualified (thread) one
        "unqualified_pointers_are_thread",
        "void neg(float* p) { *p = -*p; }\n"
        "float get(const float& r) { return r; }\n"
        "template <typename T> T twice(T* p) { return p[0] + p[0]; }\n"
        "typedef float real;\n"
        "struct Acc {\n    real v[2];\n"
        "    static float half_of(float a) { return a / 2; }\n"
        "    float& at(int j) { return v[j]; }\n"
        "    float sum() const { return v[0] + v[1]; }\n"
        "    float total() const { return sum() + half_of(v[1]); }\n"
        "    float first() const { return v[0]; }\n"
        "    float first() const device { return v[0]; }\n};\n"
        + _kernel(
            "    float loc[2] = {x[i], 2};\n    neg(loc);\n"
            "    float* p = loc;\n    real* q = &loc[1];\n    float** pp = &p;\n"
            "    Acc acc;\n    acc.at(0) = get(loc[0]);\n    acc.at(1) = *q;\n"
            "    thread float* t = &acc.v[0];\n    device float& r = x[i];\n"
            "    a[i] = acc;\n"
            "    r = acc.total() + twice(*pp) + twice(t) + a[i].first() - acc.first();\n",
            "device float* x [[buffer(0)]], device Acc* a [[buffer(1)]],\n"
            "              uint i [[thread_position_in_grid]]",
        ),
        lambda lib: _check_unqualified(lib),
    ),
    (
        "metal_func_helper_with_barrier",
        "METAL_FUNC float neighbour(threadgroup float* t, uint lid) {\n"
        "    threadgroup_barrier(mem_flags::mem_threadgroup);\n    return t[(lid + 1) % 32];\n}\n"
        "kernel void k(device float* x [[buffer(0)]], uint i [[thread_position_in_grid]],\n"
        "              uint lid [[thread_index_in_threadgroup]]) {\n"
        "    threadgroup float t[32];\n    t[lid] = x[i];\n    float v = neighbour(t, lid);\n"
        "    x[i] = v;\n}\n",
        lambda lib: np.testing.assert_array_equal(
            _run_1d(lib, np.arange(64, dtype=np.float32)),
            np.roll(np.arange(64, dtype=np.float32).reshape(2, 32), -1, axis=1).ravel(),
        ),
    ),
    (
        "noexcept_specifier",
        "struct Scale {\n    float s;\n"
        "    float apply(float v) const noexcept { return s * v; }\n};\n"
        "inline float twice(float v) noexcept { return 2 * v; }\n"
        + _kernel("    Scale sc{3.0f};\n    x[i] = sc.apply(twice(x[i]));\n"),
        _check(lambda x: 6 * x),
    ),
    (
        "address_spaces_that_match",
        "void put(device float* p, float v) { p[0] = v; }\n"
        "float get(thread const float& r) { return r; }\n"
        "float first(threadgroup const float* t) { return t[0]; }\n"
        "float read(constant float4& c) { return c.y; }\n"
        "kernel void k(device float* x [[buffer(0)]], constant float4& c [[buffer(1)]],\n"
        "              uint i [[thread_position_in_grid]], "
        "uint lid [[thread_index_in_threadgroup]]) {\n"
        "    threadgroup float t[1];\n    if (lid == 0) t[0] = 10;\n"
        "    threadgroup_barrier(mem_flags::mem_threadgroup);\n"
        "    float v = c.x;\n    device float* q = x + i;\n"
        "    float w = get(v) + first(t) + read(c);\n"
        "    put(q, x[i] + w);\n}\n",
        lambda lib: _check_spaces(lib),
    ),
    (
        # what the typed check must let through: spaces that match through expressions,
        # member functions qualified with a space, overloads by space, templates, a copy of
        # a constant struct, a program-scope constant array, a pointer to a pointer
        "typed_spaces_that_match",
        "struct Params {\n    float scale, offset;\n"
        "    float scaled(float v) const constant { return v * scale; }\n};\n"
        "struct Cursor {\n    device float* p;\n"
        "    device float* at(uint j) const thread { return p + j; }\n};\n"
        "constant float kTable[4] = {1, 2, 4, 8};\n"
        "float look(constant float* t, uint j) { return t[j & 3]; }\n"
        "template <typename T> T first(device const T* p) { return p[0]; }\n"
        "float sum2(thread const float* v) { return v[0] + v[1]; }\n"
        "float sum2(threadgroup const float* v) { return v[0] + v[1]; }\n"
        "device float* advance(device float* p, uint n) { return p + n; }\n"
        "kernel void k(device float* x [[buffer(0)]], constant Params& prm [[buffer(1)]],\n"
        "              uint i [[thread_position_in_grid]], "
        "uint lid [[thread_index_in_threadgroup]]) {\n"
        "    threadgroup float t[2];\n    if (lid == 0) { t[0] = 1; t[1] = 2; }\n"
        "    threadgroup_barrier(mem_flags::mem_threadgroup);\n"
        "    float loc[2] = {3, 4};\n    Params copy = prm;\n    Cursor c;\n    c.p = x;\n"
        "    device float* q = (i & 1) ? advance(x, i) : c.at(i);\n"
        "    device float* thread* pp = &q;\n    device float* r;\n    r = *pp;\n"
        "    float v = r[0] * 0 + first(x) * 0 + x[i];\n"
        "    x[i] = prm.scaled(v) + copy.offset + look(kTable, i) + sum2(loc) + sum2(t);\n}\n",
        _check_typed_spaces,
    ),
    (
        "constant_table",
        "constant float table[4] = {1, 2, 4, 8};\n" + _kernel("    x[i] = x[i] * table[i & 3];\n"),
        _check(lambda x: x * TABLE[np.arange(x.size) % 4]),
    ),
    (
        "constexpr_and_static_constant",
        "constexpr constant float kScale = 3.0f;\n"
        "static constant int kShift = 2;\nconstexpr float kBias = 0.5f;\n"
        + _kernel("    x[i] = x[i] * kScale + kShift + kBias;\n"),
        _check(lambda x: x * 3 + 2.5),
    ),
    (
        "types_at_program_scope",
        "struct Pair { float a, b; };\ntypedef Pair pair_t;\n"
        "enum class Mode { add, mul };\nusing real = float;\nstruct Fwd;\n"
        "template <class T> struct Box { T v; };\nconstant Pair kPair = {2.0f, 1.0f};\n"
        + _kernel(
            "    Box<real> b{x[i]};\n    pair_t p = kPair;\n    Mode m = Mode::mul;\n"
            "    x[i] = m == Mode::mul ? b.v * p.a + p.b : 0.0f;\n"
        ),
        _check(lambda x: x * 2 + 1),
    ),
    (
        "function_prototype_then_definition",
        "float twice(float v);\n"
        + _kernel("    x[i] = twice(x[i]);\n")
        + "float twice(float v) { return 2 * v; }\n",
        _check(lambda x: 2 * x),
    ),
    (
        "threadgroup_pointer_in_helper",
        "float group_sum(threadgroup float* t, uint lid, uint n) {\n"
        "    for (uint s = n / 2; s > 0; s /= 2) {\n        if (lid < s) t[lid] += t[lid + s];\n"
        "        threadgroup_barrier(mem_flags::mem_threadgroup);\n    }\n    return t[0];\n}\n"
        "kernel void k(device const float* x [[buffer(0)]], device float* out [[buffer(1)]],\n"
        "              uint gid [[thread_position_in_grid]], "
        "ushort lid [[thread_position_in_threadgroup]],\n"
        "              uint g [[threadgroup_position_in_grid]]) {\n    threadgroup float t[32];\n"
        "    t[lid] = x[gid];\n    threadgroup_barrier(mem_flags::mem_threadgroup);\n"
        "    float s = group_sum(t, lid, 32);\n    if (lid == 0) out[g] = s;\n}\n",
        _check_tg_reduce,
    ),
    (
        "threadgroup_in_kernel_template",
        "template <uint N>\nkernel void kt(device float* x [[buffer(0)]],\n"
        "               uint i [[thread_position_in_grid]], "
        "uint lid [[thread_index_in_threadgroup]]) {\n"
        "    threadgroup float t[N];\n    t[lid] = x[i];\n"
        "    threadgroup_barrier(mem_flags::mem_threadgroup);\n"
        "    x[i] = t[N - 1 - lid];\n}\n"
        'template [[host_name("k")]] kernel void kt<11>(device float*, uint, uint);\n',
        _check(lambda x: x.reshape(3, 11)[:, ::-1].ravel(), tg=11),
    ),
    (
        "ushort2_and_uint2_positions",
        "kernel void k(device uint* out [[buffer(0)]],\n"
        "              ushort2 p [[thread_position_in_grid]], uint2 n [[threads_per_grid]],\n"
        "              const uint t [[thread_index_in_threadgroup]]) {\n"
        "    out[p.y * n.x + p.x] = p.y * 100 + p.x + t * 0;\n}\n",
        _check_positions_2d,
    ),
    (
        "thread_execution_width_alone",
        "kernel void k(device uint* out [[buffer(0)]],\n"
        "              uint i [[thread_position_in_grid]], uint w [[thread_execution_width]]) {\n"
        "    out[i] = w;\n}\n",
        _check_width,
    ),
    (
        "device_atomic_float_add",
        "kernel void k(device const float* x [[buffer(0)]],\n"
        "              device atomic_float* total "
        "[[buffer(1)]], uint i [[thread_position_in_grid]]) {\n"
        "    atomic_fetch_add_explicit(total, x[i], memory_order_relaxed);\n}\n",
        _check_atomic_sum,
    ),
    (
        "threadgroup_atomic_int",
        "kernel void k(device uint* out [[buffer(0)]],\n"
        "              uint lid [[thread_index_in_threadgroup]], "
        "uint g [[threadgroup_position_in_grid]]) {\n"
        "    threadgroup atomic_uint count;\n"
        "    if (lid == 0) atomic_store_explicit(&count, 0u, memory_order_relaxed);\n"
        "    threadgroup_barrier(mem_flags::mem_threadgroup);\n"
        "    atomic_fetch_add_explicit(&count, 1u, memory_order_relaxed);\n"
        "    threadgroup_barrier(mem_flags::mem_threadgroup);\n"
        "    if (lid == 0) out[g] = atomic_load_explicit(&count, memory_order_relaxed);\n}\n",
        _check_tg_counter,
    ),
    (
        "atomic_uint_max_through_helper",
        "inline void keep_max(device atomic_uint* m, uint v) {\n"
        "    atomic_fetch_max_explicit(m, v, memory_order_relaxed);\n}\n"
        "kernel void k(device const uint* x [[buffer(0)]], device atomic_uint* m [[buffer(1)]],\n"
        "              uint i [[thread_position_in_grid]]) {\n    device atomic_uint* p = m;\n"
        "    keep_max(p, x[i]);\n}\n",
        _check_atomic_max,
    ),
    (
        "simd_sum_float4",
        "kernel void k(device const float4* x [[buffer(0)]], device float4* y [[buffer(1)]],\n"
        "              uint i [[thread_position_in_grid]]) {\n    y[i] = simd_sum(x[i]);\n}\n",
        _check_simd_sum4,
    ),
    (
        "half_simdgroup_matmul",
        "kernel void k(device const half* a [[buffer(0)]], device const half* b [[buffer(1)]],\n"
        "              device half* c [[buffer(2)]]) {\n    simdgroup_half8x8 ma, mb;\n"
        "    simdgroup_half8x8 mc = make_filled_simdgroup_matrix<half, 8, 8>(0.0h);\n"
        "    simdgroup_load(ma, a);\n    simdgroup_load(mb, b);\n"
        "    simdgroup_multiply_accumulate(mc, ma, mb, mc);\n    simdgroup_store(mc, c);\n}\n",
        _check_half_matmul,
    ),
    (
        "subscripts_that_look_like_lambdas",
        "constant float table[4] = {1, 2, 4, 8};\n"
        "inline float pick(constant float* t, uint j) { return (t)[j & 3]; }\n"
        + _kernel(
            "    float a[2] = {table[0], table[(i)&3]};\n    float b = i > 100 ? a[0] : a[1];\n"
            "    x[i] = x[i] * b + pick(table, 0) - (a)[0];\n"
        ),
        _check(lambda x: x * TABLE[np.arange(x.size) % 4]),
    ),
    (
        "arrays_sized_by_constants",
        "constant uint kN = 3;\ntemplate <uint N> float sum_first(thread float* v) {\n"
        "    float s = 0;\n    for (uint j = 0; j < N; j++) s += v[j];\n    return s;\n}\n"
        + _kernel(
            "    float v[kN + 1] = {x[i], 1, 2, 3};\n    float w[sizeof(float)];\n    w[0] = 1;\n"
            "    x[i] = sum_first<kN + 1>(v) * w[0];\n"
        ),
        _check(lambda x: x + 6),
    ),
    (
        "memory_order_relaxed_everywhere",
        "kernel void k(device atomic_int* a [[buffer(0)]],\n"
        "              uint i [[thread_position_in_grid]]) {\n"
        "    int old = atomic_exchange_explicit(a + i, 5, memory_order_relaxed);\n"
        "    int want = 5;\n"
        "    atomic_compare_exchange_weak_explicit(a + i, &want, old + 5, memory_order_relaxed,\n"
        "                                          memory_order_relaxed);\n}\n",
        lambda lib: np.testing.assert_array_equal(
            _run_1d(lib, np.arange(7, dtype=np.int32), tg=7), np.arange(7) + 5
        ),
    ),
    (
        # MSL 6.5: sincos, modf and frexp of half and float, scalars and vectors, their second
        # result in thread memory: a local (written `thread` or not), an array element, a
        # struct member, a helper's thread reference; the fast:: and precise:: spellings
        "math_second_results_in_thread_memory",
        MATH_OUT_KERNEL,
        lambda lib: _check_math_out(lib),
    ),
    (
        # MSL 6.7, Table 6.9: simdgroup_load from device and threadgroup memory, simdgroup_store
        # to both, float and half (constant memory is rejected above)
        "matrix_load_and_store_in_device_and_threadgroup_memory",
        "kernel void k(device float* x [[buffer(0)]], device half* h [[buffer(1)]],\n"
        "              uint lid [[thread_index_in_threadgroup]]) {\n"
        "    threadgroup float t[64];\n    threadgroup half th[64];\n"
        "    simdgroup_float8x8 m;\n    simdgroup_load(m, x, 8);\n"
        "    simdgroup_store(m, t, 8, ulong2(0, 0), true);\n"
        "    simdgroup_half8x8 hm;\n    simdgroup_load(hm, h, 8);\n"
        "    simdgroup_store(hm, th, 8);\n"
        "    simdgroup_barrier(mem_flags::mem_threadgroup);\n"
        "    simdgroup_load(m, t, 8);\n    simdgroup_load(hm, th, 8, ulong2(0, 0), true);\n"
        "    simdgroup_barrier(mem_flags::mem_threadgroup);\n"
        "    simdgroup_store(m, x, 8);\n    simdgroup_store(hm, h, 8);\n}\n",
        lambda lib: _check_matrix_io(lib),
    ),
    (
        "struct_methods_and_struct_copy_to_device",
        "struct Acc {\n    float s = 0;\n    void add(float v) { s += v; }\n};\n"
        "struct Out { float a, b; };\n"
        "kernel void k(device Out* o [[buffer(0)]], uint i [[thread_position_in_grid]]) {\n"
        "    Acc acc;\n    acc.add(o[i].a);\n    acc.add(o[i].b);\n"
        "    Out r = {acc.s, o[i].a};\n    o[i] = r;\n}\n",
        lambda lib: np.testing.assert_array_equal(
            _run_1d(lib, np.arange(10, dtype=np.float32), n=5, tg=5),
            np.array([[1, 0], [5, 2], [9, 4], [13, 6], [17, 8]], np.float32).ravel(),
        ),
    ),
]


@pytest.mark.parametrize("case", ACCEPT, ids=[c[0] for c in ACCEPT])
def test_strict_accepts_and_runs(case):
    _, body, run = case
    lib = metal.compile(HEADER + body, "good.metal")
    run(lib)


def _marked_line(src):
    for n, line in enumerate(src.splitlines(), 1):
        if "// <-" in line:
            return n
    raise AssertionError("a reject snippet needs a '// <-' marker on its offending line")


@pytest.mark.parametrize("case", REJECT, ids=[c[0] for c in REJECT])
def test_strict_rejects(case):
    _, body, words, _rule = case
    src = HEADER + body
    line = _marked_line(src)
    with pytest.raises(metal.CompileError) as info:
        metal.compile(src + f"\n// {uuid.uuid4().hex}\n", "bad.metal")
    msg = str(info.value)
    assert words in msg, msg
    # the rewrite says "bad.metal:7: ...", clang "bad.metal:7:12: ..."
    assert f"bad.metal:{line}:" in msg, msg


def test_enough_snippets():
    assert len(REJECT) >= 60 and len(ACCEPT) >= 15


def test_typed_check_can_be_turned_off_and_keeps_its_own_cache_entry(monkeypatch):
    # CAMEL_SIM_TYPED_CHECK=0 is the way out if the typed check ever rejects valid MSL; the
    # library it builds must not be found from the cache by a later compile with the check on
    src = HEADER + "void f(thread float* p) { p[0] = 1; }\n" + _kernel("    f(x + 1);\n")
    src += f"// {uuid.uuid4().hex}\n"
    with pytest.raises(metal.CompileError):
        metal.compile(src, "bad.metal")
    monkeypatch.setenv("CAMEL_SIM_TYPED_CHECK", "0")
    metal.compile(src, "bad.metal")
    monkeypatch.delenv("CAMEL_SIM_TYPED_CHECK")
    with pytest.raises(metal.CompileError) as info:
        metal.compile(src, "bad.metal")
    assert "bad.metal:5:" in str(info.value) and "address space 'device'" in str(info.value)


def test_typed_check_header_from_another_include_directory(monkeypatch, tmp_path):
    # The check's precompiled header names the headers by path: one built from another copy
    # of the headers (another checkout, since moved or deleted) failed to load ("malformed or
    # corrupted AST file"), a fatal error the check ignored, so it rejected nothing.
    import shutil

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    shim = Path(metal.__file__).parents[2] / "shim"
    other = tmp_path / "sim" / "include"  # its headers include ../../front/: copied too
    shutil.copytree(shim / "sim" / "include", other)
    shutil.copytree(shim / "front" / "include", tmp_path / "front" / "include")
    shutil.copy(shim / "front" / "sim_abi.h", tmp_path / "front")
    monkeypatch.setenv("CAMEL_SIM_INCLUDE", str(other))
    metal.compile(HEADER + _kernel("    x[i] = 1;\n") + f"// {uuid.uuid4().hex}\n", "good.metal")
    shutil.rmtree(other)
    monkeypatch.delenv("CAMEL_SIM_INCLUDE")
    src = HEADER + "void f(thread float* p) { p[0] = 1; }\n" + _kernel("    f(x + 1);\n")
    with pytest.raises(metal.CompileError) as info:
        metal.compile(src + f"// {uuid.uuid4().hex}\n", "bad.metal")
    assert "bad.metal:5:" in str(info.value) and "address space 'device'" in str(info.value)


# ---- Apple's component headers: <metal_stdlib> is their union ---------------------------
# (header, a statement using something it declares, NumPy's value of x for input x)
COMPONENT_HEADERS = [
    ("metal_math", "    x[i] = exp(x[i] * 0.1f);\n", lambda x: np.exp(x * 0.1)),
    ("metal_common", "    x[i] = clamp(x[i], -2.0f, 3.0f);\n", lambda x: np.clip(x, -2, 3)),
    (
        "metal_integer",
        "    x[i] = float(popcount(uint(i)));\n",
        lambda x: np.array([bin(j).count("1") for j in range(x.size)], np.float32),
    ),
    (
        "metal_relational",
        "    x[i] = select(x[i], 0.0f, x[i] < 0);\n",
        lambda x: np.where(x < 0, 0, x),
    ),
    ("metal_geometric", "    x[i] = dot(float2(x[i], 1), float2(2, 3));\n", lambda x: 2 * x + 3),
    ("metal_limits", "    x[i] = min(x[i], numeric_limits<float>::max());\n", lambda x: x),
    (
        "metal_compute",
        "    threadgroup_barrier(mem_flags::mem_none);\n    x[i] += 1;\n",
        lambda x: x + 1,
    ),
    ("metal_simdgroup", "    x[i] = simd_sum(1.0f);\n", lambda x: np.float32([32] * 32 + [1])),
    (
        "metal_atomic",
        "    x[i] = atomic_load_explicit((device atomic_float*)x + i, memory_order_relaxed);\n",
        lambda x: x,
    ),
    (
        "metal_simdgroup_matrix",
        "    simdgroup_float8x8 m = make_filled_simdgroup_matrix<float, 8, 8>(2.0f);\n"
        "    (void)m;\n",
        lambda x: x,
    ),
    ("metal_types", "    float4 v = float4(x[i]);\n    x[i] = v.w;\n", lambda x: x),
]


@pytest.mark.parametrize("case", COMPONENT_HEADERS, ids=[c[0] for c in COMPONENT_HEADERS])
def test_component_headers(case):
    header, body, want = case
    src = f"#include <{header}>\nusing namespace metal;\n" + _kernel(body)
    lib = metal.compile(src, "headers.metal")
    y = _dev(X33)
    lib.function("k")(y, threads=33, threads_per_threadgroup=32)
    np.testing.assert_allclose(y.numpy(), want(X33), rtol=1e-6)


# ---- kernel template instantiations -------------------------------------------------------
SCALE_TEMPLATE = (
    "namespace ns {\ntemplate <typename T>\n"
    "kernel void scale(device T* x [[buffer(0)]], uint i [[thread_position_in_grid]]) {\n"
    "    x[i] = x[i] * T(2);\n}\n}\n"
)


def test_decltype_instantiation_registers_the_kernel():
    src = HEADER + SCALE_TEMPLATE
    for name, t in [("scale_f32", "float"), ("scale_f16", "half")]:
        src += f'template [[host_name("{name}")]] [[kernel]] '
        src += f"decltype(ns::scale<{t}>) ns::scale<{t}>;\n"
    lib = metal.compile(src, "inst.metal")
    assert sorted(lib.function_names) == ["scale_f16", "scale_f32"]
    for name, dtype in [("scale_f32", np.float32), ("scale_f16", np.float16)]:
        x = _dev(np.arange(7, dtype=dtype))
        lib.function(name)(x, threads=7, threads_per_threadgroup=7)
        np.testing.assert_array_equal(x.numpy(), 2 * np.arange(7, dtype=dtype))


def test_typedef_instantiation_registers_the_kernel():
    # Apple accepts this typedef form (llama.cpp uses it); it once registered no kernel,
    # silently, then was an error: now it registers the kernel
    src = HEADER + SCALE_TEMPLATE + "typedef decltype(ns::scale<float>) scale_t;\n"
    src += 'template [[host_name("scale_f32")]] kernel scale_t ns::scale<float>;\n'
    lib = metal.compile(src + f"// {uuid.uuid4().hex}\n", "inst.metal")
    assert lib.function_names == ["scale_f32"]
    x = _dev(np.arange(9, dtype=np.float32))
    lib.function("scale_f32")(x, threads=9, threads_per_threadgroup=9)
    np.testing.assert_array_equal(x.numpy(), 2 * np.arange(9, dtype=np.float32))
