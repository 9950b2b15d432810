"""Function constants (`constant T name [[function_constant(index)]];`): a library
compiles with them unset, as Apple's does; Library.function(name, constants={...}) makes
a pipeline with their values (MTLFunctionConstantValues + newFunctionWithName:
constantValues:error:). Run against NumPy at awkward sizes; the errors name the kernel
and the constant."""

import numpy as np
import pytest

M = pytest.importorskip("camel.metal")

N = 1037  # not a multiple of the threadgroup size

SRC = r"""
#include <metal_stdlib>
using namespace metal;

constant int mode [[function_constant(0)]];
constant float alpha_given [[function_constant(1)]];
constant bool relu [[function_constant(2)]];
constant half bias [[function_constant(3)]];
constant float2 line_ab [[function_constant(7)]];
constant ushort repeats [[function_constant(9)]];
// a default through is_function_constant_defined
constant float alpha = is_function_constant_defined(alpha_given) ? alpha_given : 1.5f;
constant bool has_bias = is_function_constant_defined(bias);

kernel void fc_map(device const float *x [[buffer(0)]], device float *y [[buffer(1)]],
                   constant uint &n [[buffer(2)]], uint i [[thread_position_in_grid]]) {
    if (i >= n) return;
    float v = x[i];
    if (mode == 0) v = alpha * v;
    else if (mode == 1) v = v * v - alpha;
    else v = -v + float(mode);
    if (has_bias) v += float(bias);
    if (relu) v = max(v, 0.0f);
    y[i] = v;
}

kernel void fc_line(device const float *x [[buffer(0)]], device float *y [[buffer(1)]],
                    uint i [[thread_position_in_grid]]) {
    float v = x[i];
    for (ushort r = 0; r < repeats; r++) v = line_ab.x * v + line_ab.y;
    y[i] = v;
}

// uses no function constant: needs no value
kernel void fc_plain(device const float *x [[buffer(0)]], device float *y [[buffer(1)]],
                     uint i [[thread_position_in_grid]]) {
    y[i] = x[i] + 1.0f;
}
"""


@pytest.fixture(scope="module")
def lib():
    return M.compile(SRC, "function_constants.metal")


def _run(fn, x, *extra):
    dx = M.DeviceArray.from_numpy(x)
    dy = M.DeviceArray.from_numpy(np.full_like(x, np.nan))
    fn(dx, dy, *extra, threads=x.size, threads_per_threadgroup=64)
    return dy.numpy()


def _x():
    return np.random.default_rng(12).standard_normal(N).astype(np.float32)


def test_the_library_lists_its_constants(lib):
    assert lib.function_constants == {
        "mode": (0, "int"),
        "alpha_given": (1, "float"),
        "relu": (2, "bool"),
        "bias": (3, "half"),
        "line_ab": (7, "float2"),
        "repeats": (9, "ushort"),
    }
    assert sorted(lib.function_names) == ["fc_line", "fc_map", "fc_plain"]


@pytest.mark.parametrize(
    "constants",
    [
        {"mode": 0, "relu": False},  # alpha: the default 1.5, no bias
        {"mode": 0, "relu": True, "alpha_given": -2.25},
        {"mode": 1, "relu": False, "alpha_given": 0.5, "bias": 0.375},
        {0: 5, 2: True, 3: -1.0},  # by index
        {"mode": -3, "relu": True, 1: 3.0},  # name and index mixed
    ],
)
def test_values_specialise_the_kernel(lib, constants):
    named = {}
    names = {i: n for n, (i, _) in lib.function_constants.items()}
    for k, v in constants.items():
        named[names.get(k, k)] = v
    x = _x()
    alpha = np.float32(named.get("alpha_given", 1.5))
    mode = named["mode"]
    if mode == 0:
        want = alpha * x
    elif mode == 1:
        want = x * x - alpha
    else:
        want = -x + np.float32(mode)
    if "bias" in named:
        want = want + np.float32(np.float16(named["bias"]))
    if named["relu"]:
        want = np.maximum(want, 0)
    got = _run(lib.function("fc_map", constants=constants), x, N)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_vector_and_short_constants_and_loops_over_them(lib):
    x = _x()
    for ab, reps in (((0.5, 1.0), 3), ((-1.25, 0.0), 1), ((2.0, -0.5), 0)):
        fn = lib.function("fc_line", constants={"line_ab": ab, "repeats": reps})
        want = x.copy()
        for _ in range(reps):
            want = np.float32(ab[0]) * want + np.float32(ab[1])
        np.testing.assert_allclose(_run(fn, x), want, rtol=1e-6, atol=1e-6)


def test_pipelines_are_cached_per_set_of_values(lib):
    a = lib.function("fc_map", constants={"mode": 0, "relu": False})
    assert lib.function("fc_map", constants={0: 0, "relu": False}) is a
    assert lib.function("fc_map", constants={"mode": 0, "relu": True}) is not a


def test_a_kernel_without_constants_needs_no_values(lib):
    x = _x()
    np.testing.assert_array_equal(_run(lib.function("fc_plain"), x), x + 1)
    # values for constants the kernel does not use are ignored, as Metal ignores them
    fn = lib.function("fc_plain", constants={"mode": 4})
    np.testing.assert_array_equal(_run(fn, x), x + 1)


def test_a_used_constant_without_a_value_fails_the_pipeline(lib):
    # relu is used without is_function_constant_defined: required (Apple: the compiler
    # cannot compile the function); bias and alpha_given are guarded, optional
    ours = M.shim() != "metal"  # Apple's compiler words its own message
    match = r"fc_map.*function constant 'relu' \(index 2, bool\)" if ours else "fc_map"
    with pytest.raises(M.MetalError, match=match):
        lib.function("fc_map", constants={"mode": 1})
    match = r"fc_line.*function constant '(line_ab|repeats)'" if ours else "fc_line"
    with pytest.raises(M.MetalError, match=match):
        lib.function("fc_line", constants={"repeats": 2})


@pytest.mark.parametrize(
    "constants, error, match",
    [
        ({"mod": 1}, ValueError, r"\[fc_map\] no function constant named 'mod'.*mode \(index 0"),
        ({4: 1}, ValueError, r"\[fc_map\] no function constant with index 4"),
        ({"mode": 1.5}, TypeError, r"\[fc_map\] function constant 'mode' \(index 0\) is int"),
        ({"mode": 2**31}, ValueError, r"'mode' \(index 0\): 2147483648 is out of range for int"),
        ({"repeats": -1}, ValueError, r"'repeats' \(index 9\): -1 is out of range for ushort"),
        ({"repeats": 65536}, ValueError, r"65536 is out of range for ushort \(0 \.\. 65535\)"),
        ({"relu": 1}, TypeError, r"'relu' \(index 2\) is bool: give True or False"),
        ({"bias": 70000.0}, ValueError, r"'bias' \(index 3\): 70000.0 is out of range for half"),
        ({"alpha_given": 1e39}, ValueError, r"out of range for float"),
        ({"line_ab": 1.0}, TypeError, r"'line_ab' \(index 7\) is float2: give 2 values"),
        ({"line_ab": (1, 2, 3)}, ValueError, r"is float2: give 2 values, got 3"),
        ({"mode": 1, 0: 2}, ValueError, r"'mode' \(index 0\) is given twice"),
        ([("mode", 1)], TypeError, r"constants= must be a dict"),
    ],
)
def test_bad_values_name_the_kernel_and_the_constant(lib, constants, error, match):
    with pytest.raises(error, match=match):
        lib.function("fc_map", constants=constants)


def test_constants_on_a_library_without_any():
    lib = M.compile(
        "#include <metal_stdlib>\nusing namespace metal;\n"
        "kernel void k(device float *y [[buffer(0)]], uint i [[thread_position_in_grid]]) "
        "{ y[i] = 2.0f; }",
        "plain.metal",
    )
    assert lib.function_constants == {}
    with pytest.raises(ValueError, match=r"\[k\] no function constant named 'a'.*declares: none"):
        lib.function("k", constants={"a": 1})


OPTIONAL_SRC = r"""
#include <metal_stdlib>
using namespace metal;
constant bool has_bias [[function_constant(0)]];
constant int scale_mode [[function_constant(1)]];
constant uint has_gate [[function_constant(2)]];  // nonzero: present (MSL 5.8.1.2)
// the specification's own form: a constant set to is_function_constant_defined
constant bool scale_defined = is_function_constant_defined(scale_mode);

kernel void opt_affine(device const float *x [[buffer(0)]],
                       device const float *bias [[buffer(1), function_constant(has_bias)]],
                       device float *y [[buffer(2)]],
                       constant uint &n [[buffer(3)]],
                       constant float &scale [[function_constant(scale_defined), buffer(4)]],
                       device const float *gate [[buffer(5), function_constant(has_gate)]],
                       uint i [[thread_position_in_grid]]) {
    if (i >= n) return;
    float v = x[i];
    if (scale_defined) v *= scale + float(scale_mode);
    if (has_bias) v += bias[i];
    if (has_gate) v *= gate[i];
    y[i] = v;
}

kernel void opt_reads_absent(device float *y [[buffer(0)]],
                             device const float *b [[buffer(1), function_constant(has_bias)]],
                             uint i [[thread_position_in_grid]]) {
    y[i] = b[i];  // not guarded by has_bias: the kernel author's bug when it is false
}

kernel void opt_writes_absent(device const float *x [[buffer(0)]],
                              device float *g [[function_constant(has_gate), buffer(5)]],
                              uint i [[thread_position_in_grid]]) {
    g[i] = x[i];  // not guarded by has_gate
}
"""


@pytest.fixture(scope="module")
def opt_lib():
    return M.compile(OPTIONAL_SRC, "opt.metal")


@pytest.mark.parametrize("has_bias", [False, True])
@pytest.mark.parametrize("scale_mode", [None, 3])
@pytest.mark.parametrize("has_gate", [0, 7])
def test_optional_arguments_are_declared_only_when_their_constant_is_true(
    opt_lib, has_bias, scale_mode, has_gate
):
    """MSL 5.8.1.2: an argument with [[function_constant(name)]] is in the specialised
    function's signature when name is nonzero or true, and not when it is 0, false or
    has no value; a left-out index binds nothing (None), the last ones are not passed."""
    rng = np.random.default_rng(5)
    x, bias, gate = (rng.standard_normal(N).astype(np.float32) for _ in range(3))
    constants = {"has_bias": has_bias, "has_gate": has_gate}
    if scale_mode is not None:
        constants["scale_mode"] = scale_mode
    fn = opt_lib.function("opt_affine", constants=constants)
    dy = M.DeviceArray.from_numpy(np.full_like(x, np.nan))
    args = [M.DeviceArray.from_numpy(x), M.DeviceArray.from_numpy(bias) if has_bias else None]
    args += [dy, N]
    want = x.copy()
    if scale_mode is not None:
        args.append(0.25)
        want = want * np.float32(0.25 + scale_mode)
    elif has_gate:
        args.append(None)  # buffer(4) is not declared: nothing binds it
    if has_bias:
        want = want + bias
    if has_gate:
        args.append(M.DeviceArray.from_numpy(gate))
        want = want * gate
    fn(*args, threads=N, threads_per_threadgroup=64)
    np.testing.assert_allclose(dy.numpy(), want, rtol=1e-6, atol=1e-6)


def test_a_present_optional_argument_left_unbound_names_the_kernel_and_the_index(opt_lib):
    x = M.DeviceArray.from_numpy(np.ones(N, np.float32))
    y = M.DeviceArray.from_numpy(np.zeros(N, np.float32))
    fn = opt_lib.function(
        "opt_affine", constants={"has_bias": True, "scale_mode": 1, "has_gate": 1}
    )
    ours = M.shim() != "metal"
    match = r"opt_affine.*\[\[buffer\(5\)\]\] 'gate' is not bound" if ours else "opt_affine"
    with pytest.raises(M.DispatchError, match=match):
        fn(x, x, y, N, 0.5, threads=N, threads_per_threadgroup=64)
    # bias is declared at buffer(1): None there is no binding
    match = r"opt_affine.*'bias' \(\[\[buffer\(1\)\]\]\) is not bound" if ours else "opt_affine"
    with pytest.raises(M.DispatchError, match=match):
        fn(x, None, y, N, 0.5, x, threads=N, threads_per_threadgroup=64)
    # and an argument for an index the pipeline leaves out, past its last one
    fn = opt_lib.function("opt_affine", constants={"has_bias": False, "has_gate": 0})
    match = (
        r"opt_affine' takes 4 buffer arguments.*got 5.*optional arguments 'bias'" if ours else "opt"
    )
    with pytest.raises(M.DispatchError, match=match):
        fn(x, None, y, N, 0.5, threads=N, threads_per_threadgroup=64)


@pytest.mark.skipif(M.shim() != "sim", reason="the simulator's crash message (undefined on a GPU)")
def test_reading_an_absent_optional_argument_names_it(opt_lib):
    fn = opt_lib.function("opt_reads_absent", constants={"has_bias": False})
    y = M.DeviceArray.from_numpy(np.zeros(64, np.float32))
    with pytest.raises(M.MetalError, match=r"opt_reads_absent.*optional argument 'b'.*5\.8\.1\.2"):
        fn(y, threads=64, threads_per_threadgroup=64)
        M.synchronize()
    # What happened, and why: the argument, its index, the constant and its value. It was a
    # fault on memory that holds nothing, so nothing is damaged.
    for kernel, constants, args, what in [
        ("opt_reads_absent", {"has_bias": False}, [y], "read"),
        ("opt_reads_absent", {}, [y], "read"),
        ("opt_writes_absent", {"has_gate": 0}, [y], "wrote"),
    ]:
        with pytest.raises(M.MetalError) as e:
            opt_lib.function(kernel, constants=constants)(
                *args, threads=64, threads_per_threadgroup=64
            )
            M.synchronize()
        msg = str(e.value)
        name, index, const = (
            ("b", 1, "has_bias") if kernel == "opt_reads_absent" else ("g", 5, "has_gate")
        )
        why = "has no value" if not constants else "is 0" if const == "has_gate" else "is false"
        assert (
            f"the kernel {what} its optional argument '{name}' ([[buffer({index})]], "
            f"[[function_constant]]), which this pipeline leaves out because function constant "
            f"'{const}' {why}"
        ) in msg, msg
        assert f"inside `if ({const})`" in msg and "damaged" not in msg
    b = M.DeviceArray.from_numpy(np.arange(64, dtype=np.float32))
    fn = opt_lib.function("opt_reads_absent", constants={"has_bias": True})
    fn(y, b, threads=64, threads_per_threadgroup=64)
    np.testing.assert_array_equal(y.numpy(), np.arange(64, dtype=np.float32))


@pytest.mark.skipif(M.shim() == "metal", reason="the simulator's and CUDA shim's parser")
@pytest.mark.parametrize(
    "decl, param, match",
    [
        (
            "constant float2 v [[function_constant(0)]];",
            "device float *b [[buffer(1), function_constant(v)]]",
            r"'v' is a float2; an optional argument's function constant is a scalar",
        ),
        (
            "constant bool a [[function_constant(0)]];",
            "device float *b [[buffer(1), function_constant(nope)]]",
            r"function_constant\(nope\): 'nope' is not a function constant declared above",
        ),
        (
            "constant bool a [[function_constant(0)]];",
            "device float *b [[buffer(1), function_constant(1)]]",
            r"takes the name of a function constant \(MSL 5\.8\.1\.2",
        ),
        (
            "constant bool a [[function_constant(0)]];",
            "uint j [[thread_index_in_simdgroup, function_constant(a)]]",
            r"\[\[thread_index_in_simdgroup\]\] cannot be optional",
        ),
        (
            "constant bool a [[function_constant(0)]];\n"
            "struct P { float u; float v [[function_constant(a)]]; };",
            "constant P &b [[buffer(1)]]",
            r"on a structure member is not supported.*MSL 5\.8\.1\.6",
        ),
        (
            "constant bool a [[function_constant(0)]];\n"
            "float f(device float *q [[function_constant(a)]]) { return q[0]; }",
            "device float *b [[buffer(1)]]",
            r"only on a kernel's parameters",
        ),
    ],
)
def test_unsupported_optional_forms_name_the_line(decl, param, match):
    src = "#include <metal_stdlib>\nusing namespace metal;\n" + decl + "\n"
    src += "kernel void k(device float *y [[buffer(0)]], " + param + ") { y[0] = 1.0f; }\n"
    with pytest.raises(M.CompileError, match=r"opt_bad.metal:\d+: .*" + match):
        M.compile(src, "opt_bad.metal")


@pytest.mark.skipif(M.shim() == "metal", reason="the simulator's and CUDA shim's parser")
@pytest.mark.parametrize(
    "decl, match",
    [
        ("constant double d [[function_constant(0)]];", r"'d' has type 'double'"),
        ("constant int a [[function_constant(N)]];", r"form is not supported"),
        (
            "constant int a [[function_constant(1)]]; constant int b [[function_constant(1)]];",
            r"'a' and 'b' both have index 1",
        ),
        ("constant bool q = is_function_constant_defined(nope);", r"is_function_constant_defined"),
    ],
)
def test_unsupported_declarations_name_the_line(decl, match):
    src = "#include <metal_stdlib>\nusing namespace metal;\n" + decl + "\n"
    src += "kernel void k(device float *y [[buffer(0)]]) { y[0] = 1.0f; }\n"
    with pytest.raises(M.CompileError, match=r"bad_fc.metal:3: .*" + match):
        M.compile(src, "bad_fc.metal")
