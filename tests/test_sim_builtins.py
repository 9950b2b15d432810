"""The Metal Shading Language builtins, one table row each, against NumPy.

Every row is a tiny kernel `out[i] = <expression>(a[i], b[i], c[i])`; all rows
are compiled as one .metal source (so the compile cost is paid once) and run
on 37 threads (an awkward count: the last threadgroup is partial). Then come
atomics, SIMD-group and quad-group functions and simdgroup_matrix, each with
its own kernel. On Linux this runs on the Metal simulator (shim/sim); on a Mac
the same source runs on the GPU, so the table also checks the simulator's
reading of the MSL specification against Apple's compiler.
"""

import zlib

import numpy as np
import pytest

metal = pytest.importorskip("camel.metal")

N = 37  # threads per elementwise test: one partial threadgroup of 16

# MSL type -> (NumPy dtype, components). float3 is not used: it is 16 bytes in buffers.
TYPES = {
    "float": (np.float32, 1),
    "float2": (np.float32, 2),
    "float4": (np.float32, 4),
    "half": (np.float16, 1),
    "half4": (np.float16, 4),
    "int": (np.int32, 1),
    "int4": (np.int32, 4),
    "uint": (np.uint32, 1),
    "uint4": (np.uint32, 4),
}


def _input(kind, dtype, shape, rng):
    """Inputs by kind: any (-3..3), pos (0.1..5), unit (-0.99..0.99), small (0.5..1.5),
    int (-1000..1000), uint (0..2**32)."""
    if kind == "any":
        x = rng.uniform(-3, 3, shape)
    elif kind == "pos":
        x = rng.uniform(0.1, 5, shape)
    elif kind == "unit":
        x = rng.uniform(-0.99, 0.99, shape)
    elif kind == "small":
        x = rng.uniform(0.5, 1.5, shape)
    elif kind == "int":
        x = rng.integers(-1000, 1000, shape)
    elif kind == "uint":
        x = rng.integers(0, 2**32, shape, dtype=np.uint64)
    else:
        raise ValueError(kind)
    return x.astype(dtype)


def _round_half_away(x):
    return np.sign(x) * np.floor(np.abs(x) + 0.5)


def _bits(x, f):
    """Apply f to each uint32 bit pattern (popcount, clz, ...)."""
    return np.array([f(int(v)) for v in x.ravel()], dtype=np.uint32).reshape(x.shape)


def _clz(v):
    return 32 - v.bit_length()


def _ctz(v):
    return 32 if v == 0 else (v & -v).bit_length() - 1


def _reverse(v):
    return int(f"{v:032b}"[::-1], 2)


def _rotl(v, s):
    return ((v << s) | (v >> (32 - s))) & 0xFFFFFFFF


def _smoothstep(e0, e1, x):
    t = np.clip((x - e0) / (e1 - e0), 0, 1)
    return t * t * (3 - 2 * t)


f32 = np.float32
# (id, expression, reference(a, b, c), input types, output type, input kinds, tolerance)
# Tolerances are relative (plus the same absolute amount): the simulator is
# exact to float rounding; a GPU's fast math is within a few ulp.
CASES = [
    # ---- math: float --------------------------------------------------------------
    ("abs", "abs(a)", lambda a, b, c: np.abs(a), "float", "float", "any", 0),
    ("fabs", "fabs(a)", lambda a, b, c: np.abs(a), "float", "float", "any", 0),
    ("sqrt", "sqrt(a)", lambda a, b, c: np.sqrt(a), "float", "float", "pos", 1e-6),
    ("rsqrt", "rsqrt(a)", lambda a, b, c: 1 / np.sqrt(a), "float", "float", "pos", 1e-6),
    ("exp", "exp(a)", lambda a, b, c: np.exp(a), "float", "float", "any", 1e-6),
    ("exp2", "exp2(a)", lambda a, b, c: np.exp2(a), "float", "float", "any", 1e-6),
    ("exp10", "exp10(a)", lambda a, b, c: 10.0**a, "float", "float", "any", 1e-5),
    ("log", "log(a)", lambda a, b, c: np.log(a), "float", "float", "pos", 1e-6),
    ("log2", "log2(a)", lambda a, b, c: np.log2(a), "float", "float", "pos", 1e-6),
    ("log10", "log10(a)", lambda a, b, c: np.log10(a), "float", "float", "pos", 1e-6),
    ("sin", "sin(a)", lambda a, b, c: np.sin(a), "float", "float", "any", 1e-6),
    ("cos", "cos(a)", lambda a, b, c: np.cos(a), "float", "float", "any", 1e-6),
    ("tan", "tan(a)", lambda a, b, c: np.tan(a), "float", "float", "unit", 1e-6),
    ("asin", "asin(a)", lambda a, b, c: np.arcsin(a), "float", "float", "unit", 1e-6),
    ("acos", "acos(a)", lambda a, b, c: np.arccos(a), "float", "float", "unit", 1e-6),
    ("atan", "atan(a)", lambda a, b, c: np.arctan(a), "float", "float", "any", 1e-6),
    ("sinh", "sinh(a)", lambda a, b, c: np.sinh(a), "float", "float", "any", 1e-6),
    ("cosh", "cosh(a)", lambda a, b, c: np.cosh(a), "float", "float", "any", 1e-6),
    ("tanh", "tanh(a)", lambda a, b, c: np.tanh(a), "float", "float", "any", 1e-6),
    ("floor", "floor(a)", lambda a, b, c: np.floor(a), "float", "float", "any", 0),
    ("ceil", "ceil(a)", lambda a, b, c: np.ceil(a), "float", "float", "any", 0),
    (
        "round",
        "round(a * 2.0f)",
        lambda a, b, c: _round_half_away(f32(a * 2)),
        "float",
        "float",
        "any",
        0,
    ),
    ("rint", "rint(a * 2.0f)", lambda a, b, c: np.rint(f32(a * 2)), "float", "float", "any", 0),
    ("trunc", "trunc(a)", lambda a, b, c: np.trunc(a), "float", "float", "any", 0),
    ("fract", "fract(a)", lambda a, b, c: a - np.floor(a), "float", "float", "any", 1e-6),
    ("sign", "sign(a)", lambda a, b, c: np.sign(a), "float", "float", "any", 0),
    ("saturate", "saturate(a)", lambda a, b, c: np.clip(a, 0, 1), "float", "float", "any", 0),
    ("fast_exp", "fast::exp(a)", lambda a, b, c: np.exp(a), "float", "float", "any", 1e-5),
    ("precise_tanh", "precise::tanh(a)", lambda a, b, c: np.tanh(a), "float", "float", "any", 1e-6),
    ("pow", "pow(a, b)", lambda a, b, c: np.power(a, b), "float", "float", ("pos", "any"), 1e-5),
    ("powr", "powr(a, b)", lambda a, b, c: np.power(a, b), "float", "float", ("pos", "any"), 1e-5),
    ("atan2", "atan2(a, b)", lambda a, b, c: np.arctan2(a, b), "float", "float", "any", 1e-6),
    ("fmod", "fmod(a, b)", lambda a, b, c: np.fmod(a, b), "float", "float", ("any", "pos"), 1e-6),
    ("fmin", "fmin(a, b)", lambda a, b, c: np.fmin(a, b), "float", "float", "any", 0),
    ("fmax", "fmax(a, b)", lambda a, b, c: np.fmax(a, b), "float", "float", "any", 0),
    ("min", "min(a, b)", lambda a, b, c: np.minimum(a, b), "float", "float", "any", 0),
    ("max", "max(a, 0.0f)", lambda a, b, c: np.maximum(a, 0), "float", "float", "any", 0),
    ("copysign", "copysign(a, b)", lambda a, b, c: np.copysign(a, b), "float", "float", "any", 0),
    ("step", "step(a, b)", lambda a, b, c: np.where(b < a, 0, 1), "float", "float", "any", 0),
    ("fma", "fma(a, b, c)", lambda a, b, c: a * b + c, "float", "float", "any", 1e-6),
    (
        "mix",
        "mix(a, b, c)",
        lambda a, b, c: a + (b - a) * c,
        "float",
        "float",
        ("any", "any", "unit"),
        1e-6,
    ),
    (
        "clamp",
        "clamp(a, -1.0f, 0.5f)",
        lambda a, b, c: np.clip(a, -1, 0.5),
        "float",
        "float",
        "any",
        0,
    ),
    (
        "smoothstep",
        "smoothstep(-1.0f, 2.0f, a)",
        lambda a, b, c: _smoothstep(-1, 2, a),
        "float",
        "float",
        "any",
        1e-6,
    ),
    # ---- literals and constants: MSL has no double -----------------------------------
    (
        "literal_float",
        "a * 0.1 + 0.2",
        lambda a, b, c: f32(a * f32(0.1)) + f32(0.2),
        "float",
        "float",
        "any",
        0,
    ),
    ("literal_exp", "1e-3 * a", lambda a, b, c: f32(1e-3) * a, "float", "float", "any", 0),
    ("pi", "M_PI_F * a", lambda a, b, c: f32(np.pi) * a, "float", "float", "any", 0),
    (
        "flt_max",
        "min(a * FLT_MAX, FLT_MAX)",
        lambda a, b, c: np.minimum(np.float32(3.4028235e38) * a, np.float32(3.4028235e38)),
        "float",
        "float",
        "pos",
        0,
    ),
    (
        "infinity",
        "a > 0.0f ? INFINITY : -INFINITY",
        lambda a, b, c: np.where(a > 0, np.inf, -np.inf),
        "float",
        "float",
        "any",
        0,
    ),
    (
        "isnan",
        "int(isnan(a > 0.0f ? NAN : a))",
        lambda a, b, c: (a > 0).astype(np.int32),
        "float",
        "int",
        "any",
        0,
    ),
    (
        "isinf",
        "int(isinf(a / 0.0f))",
        lambda a, b, c: np.ones_like(a, np.int32),
        "float",
        "int",
        "pos",
        0,
    ),
    (
        "limits",
        "numeric_limits<float>::max() * 0.5f + float(numeric_limits<int>::min()) * a",
        lambda a, b, c: f32(3.4028235e38) * f32(0.5) + f32(-(2.0**31)) * a,
        "float",
        "float",
        "any",
        1e-6,
    ),
    # ---- vectors ------------------------------------------------------------------
    ("vec_arith", "a + b * c", lambda a, b, c: a + b * c, "float4", "float4", "any", 1e-6),
    ("vec_scalar", "a * 2.0f - 1.0f", lambda a, b, c: a * 2 - 1, "float4", "float4", "any", 1e-6),
    (
        "vec_max_scalar",
        "max(a, 0.5f)",
        lambda a, b, c: np.maximum(a, 0.5),
        "float4",
        "float4",
        "any",
        0,
    ),
    (
        "vec_clamp",
        "clamp(a, float4(-1.0f), float4(1.0f))",
        lambda a, b, c: np.clip(a, -1, 1),
        "float4",
        "float4",
        "any",
        0,
    ),
    ("vec_exp", "exp(a)", lambda a, b, c: np.exp(a), "float4", "float4", "any", 1e-6),
    ("vec_dot", "dot(a, b)", lambda a, b, c: (a * b).sum(-1), "float4", "float", "any", 1e-5),
    (
        "vec_length",
        "length(a)",
        lambda a, b, c: np.sqrt((a * a).sum(-1)),
        "float4",
        "float",
        "any",
        1e-6,
    ),
    (
        "vec_distance",
        "distance(a, b)",
        lambda a, b, c: np.sqrt(((a - b) ** 2).sum(-1)),
        "float4",
        "float",
        "any",
        1e-6,
    ),
    (
        "vec_normalize",
        "normalize(a)",
        lambda a, b, c: a / np.sqrt((a * a).sum(-1, keepdims=True)),
        "float4",
        "float4",
        "any",
        1e-6,
    ),
    (
        "vec_cross",
        "float4(cross(a.xyz, b.xyz), 0.0f)",
        lambda a, b, c: np.concatenate([np.cross(a[:, :3], b[:, :3]), np.zeros((len(a), 1))], 1),
        "float4",
        "float4",
        "any",
        1e-5,
    ),
    ("swizzle_reverse", "a.wzyx", lambda a, b, c: a[:, ::-1], "float4", "float4", "any", 0),
    (
        "swizzle_rgba",
        "a.bgra + b.xxyy",
        lambda a, b, c: a[:, [2, 1, 0, 3]] + b[:, [0, 0, 1, 1]],
        "float4",
        "float4",
        "any",
        1e-6,
    ),
    (
        "ctor_mixed",
        "float4(a.xy, b.zw)",
        lambda a, b, c: np.concatenate([a[:, :2], b[:, 2:]], 1),
        "float4",
        "float4",
        "any",
        0,
    ),
    (
        "ctor_scalars",
        "float4(a.x, b.yz, 1.0f)",
        lambda a, b, c: np.stack([a[:, 0], b[:, 1], b[:, 2], np.ones(len(a))], 1),
        "float4",
        "float4",
        "any",
        0,
    ),
    ("ctor_splat", "float4(2.0f) + a", lambda a, b, c: a + 2, "float4", "float4", "any", 0),
    (
        "ctor_float2",
        "float4(float2(a.w), float2(b.x, 3.0f))",
        lambda a, b, c: np.stack([a[:, 3], a[:, 3], b[:, 0], np.full(len(a), 3)], 1),
        "float4",
        "float4",
        "any",
        0,
    ),
    (
        "swizzle_write",
        "float4(a.zw, a.xy)",
        lambda a, b, c: a[:, [2, 3, 0, 1]],
        "float4",
        "float4",
        "any",
        0,
    ),
    (
        "select_vec",
        "select(a, b, a < b)",
        lambda a, b, c: np.where(a < b, b, a),
        "float4",
        "float4",
        "any",
        0,
    ),
    (
        "select_scalar",
        "select(a, b, a.x > 0.0f)",
        lambda a, b, c: np.where(a[:, :1] > 0, b, a),
        "float4",
        "float4",
        "any",
        0,
    ),
    (
        "all",
        "int(all(a < b))",
        lambda a, b, c: (a < b).all(-1).astype(np.int32),
        "float4",
        "int",
        ("unit", "small"),
        0,
    ),
    (
        "any",
        "int(any(a > b))",
        lambda a, b, c: (a > b).any(-1).astype(np.int32),
        "float4",
        "int",
        "any",
        0,
    ),
    (
        "vec_float2",
        "a * b + float2(1.0f, -1.0f)",
        lambda a, b, c: a * b + np.array([1, -1]),
        "float2",
        "float2",
        "any",
        1e-6,
    ),
    (
        "bool4",
        "float4(bool4(a < b)) * 2.0f + float4(float(bool4(a > b).x))",
        lambda a, b, c: (a < b) * 2.0 + (a[:, :1] > b[:, :1]),
        "float4",
        "float4",
        "any",
        0,
    ),
    (
        "bool4_members",
        "float4(float(bool4(a < b).y), float(bool4(a < b)[3]), float(all(bool4(a < b))), "
        "float(any(!bool4(a < b))))",
        lambda a, b, c: np.stack(
            [(a < b)[:, 1], (a < b)[:, 3], (a < b).all(1), (a >= b).any(1)], 1
        ),
        "float4",
        "float4",
        ("unit", "small"),
        0,
    ),
    (
        "isnan_vec",
        "float4(isnan(select(a, float4(NAN), a > 0.5f)))",
        lambda a, b, c: (a > 0.5).astype(np.float32),
        "float4",
        "float4",
        "any",
        0,
    ),
    # ---- conversions ----------------------------------------------------------------
    (
        "float_to_int",
        "int(a * 100.0f)",
        lambda a, b, c: np.trunc(f32(a * 100)).astype(np.int32),
        "float",
        "int",
        "any",
        0,
    ),
    (
        "int_to_float",
        "float(a) * 0.5f",
        lambda a, b, c: a.astype(np.float32) * 0.5,
        "int",
        "float",
        "int",
        0,
    ),
    ("int_to_uint", "uint(a)", lambda a, b, c: a.astype(np.uint32), "int", "uint", "int", 0),
    ("uint_to_ushort", "uint(ushort(a))", lambda a, b, c: a & 0xFFFF, "uint", "uint", "uint", 0),
    (
        "as_type_uint",
        "as_type<uint>(a)",
        lambda a, b, c: a.view(np.uint32),
        "float",
        "uint",
        "any",
        0,
    ),
    (
        "as_type_float",
        "as_type<float>(a & 0x3fffffffu)",
        lambda a, b, c: (a & 0x3FFFFFFF).view(np.float32),
        "uint",
        "float",
        "uint",
        0,
    ),
    (
        "vec_convert_ctor",
        "int4(a * 10.0f)",
        lambda a, b, c: np.trunc(f32(a * 10)).astype(np.int32),
        "float4",
        "int4",
        "any",
        0,
    ),
    (
        "vec_convert_cast",
        "(int4)(a * 10.0f)",
        lambda a, b, c: np.trunc(f32(a * 10)).astype(np.int32),
        "float4",
        "int4",
        "any",
        0,
    ),
    (
        "vec_convert_static",
        "static_cast<float4>(a) * 0.5f",
        lambda a, b, c: a.astype(np.float32) * 0.5,
        "int4",
        "float4",
        "int",
        0,
    ),
    (
        "half_roundtrip",
        "float(half(a * 1000.0f))",
        lambda a, b, c: f32(a * 1000).astype(np.float16).astype(np.float32),
        "float",
        "float",
        "any",
        0,
    ),
    (
        "half_arith",
        "a * b + half(1.0h)",
        lambda a, b, c: (a * b + np.float16(1)).astype(np.float16),
        "half",
        "half",
        "any",
        1e-3,
    ),
    (
        # a GPU rounds every half operation to half (NumPy's float16 does too)
        "half_rounding",
        "a * b * c + a",
        lambda a, b, c: a * b * c + a,
        "half",
        "half",
        "any",
        0,
    ),
    (
        "half4_exp",
        "exp(a)",
        lambda a, b, c: np.exp(a.astype(np.float32)).astype(np.float16),
        "half4",
        "half4",
        "unit",
        1e-3,
    ),
    (
        "half_to_float4",
        "float4(a) * 2.0f",
        lambda a, b, c: a.astype(np.float32) * 2,
        "half4",
        "float4",
        "any",
        0,
    ),
    # ---- integers -----------------------------------------------------------------
    ("int_abs", "abs(a)", lambda a, b, c: np.abs(a), "int", "int", "int", 0),
    ("int_min", "min(a, b)", lambda a, b, c: np.minimum(a, b), "int", "int", "int", 0),
    ("int_max", "max(a, b)", lambda a, b, c: np.maximum(a, b), "int", "int", "int", 0),
    (
        "int_clamp",
        "clamp(a, -100, 200)",
        lambda a, b, c: np.clip(a, -100, 200),
        "int",
        "int",
        "int",
        0,
    ),
    (
        "int_shift",
        "(a >> 2) + (b << 3)",
        lambda a, b, c: (a >> 2) + (b << 3),
        "int",
        "int",
        "int",
        0,
    ),
    (
        "int_divmod",
        "a / 7 + a % 5",
        lambda a, b, c: np.trunc(a / 7).astype(np.int32) + np.fmod(a, 5),
        "int",
        "int",
        "int",
        0,
    ),
    ("uint_min", "min(a, b)", lambda a, b, c: np.minimum(a, b), "uint", "uint", "uint", 0),
    ("uint_wrap", "a + b", lambda a, b, c: a + b, "uint", "uint", "uint", 0),
    (
        "popcount",
        "popcount(a)",
        lambda a, b, c: _bits(a, lambda v: bin(v).count("1")),
        "uint",
        "uint",
        "uint",
        0,
    ),
    (
        "clz",
        "clz(a >> (b & 31u))",
        lambda a, b, c: _bits(a >> (b & 31), _clz),
        "uint",
        "uint",
        "uint",
        0,
    ),
    (
        "ctz",
        "ctz(a << (b & 31u))",
        lambda a, b, c: _bits(a << (b & 31), _ctz),
        "uint",
        "uint",
        "uint",
        0,
    ),
    (
        "mulhi",
        "mulhi(a, b)",
        lambda a, b, c: ((a.astype(np.uint64) * b.astype(np.uint64)) >> 32).astype(np.uint32),
        "uint",
        "uint",
        "uint",
        0,
    ),
    (
        "reverse_bits",
        "reverse_bits(a)",
        lambda a, b, c: _bits(a, _reverse),
        "uint",
        "uint",
        "uint",
        0,
    ),
    (
        "rotate",
        "rotate(a, 7u)",
        lambda a, b, c: _bits(a, lambda v: _rotl(v, 7)),
        "uint",
        "uint",
        "uint",
        0,
    ),
    # ---- second results through a thread reference (MSL 6.5): helpers in SOURCE ----------
    (
        "sincos_sin_float2",
        "sincos_sin(a)",
        lambda a, b, c: np.sin(a),
        "float2",
        "float2",
        "any",
        1e-6,
    ),
    (
        "sincos_cos_float4",
        "sincos_cos(a)",
        lambda a, b, c: np.cos(a),
        "float4",
        "float4",
        "any",
        1e-6,
    ),
    (
        "sincos_cos_half4",
        "sincos_cos(a)",
        lambda a, b, c: np.cos(a.astype(f32)),
        "half4",
        "half4",
        "any",
        2e-3,
    ),
    (
        "modf_fraction",
        "modf_frac(a * 4.0f)",
        lambda a, b, c: np.modf(f32(a * 4))[0],
        "float",
        "float",
        "any",
        0,
    ),
    (
        "modf_whole_float4",
        "modf_whole(a * 4.0f)",
        lambda a, b, c: np.modf(f32(a * 4))[1],
        "float4",
        "float4",
        "any",
        0,
    ),
    (
        # both parts carry x's sign: modf(-2) is (-0, -2); an infinity's fraction is a zero
        "modf_fraction_signs",
        "copysign(1.0f, modf_frac(floor(a))) + 2.0f * copysign(1.0f, modf_frac(a * INFINITY))",
        lambda a, b, c: (
            np.copysign(1, np.modf(np.floor(a))[0])
            + 2 * np.copysign(1, np.modf(a * np.float32(np.inf))[0])
        ),
        "float",
        "float",
        "any",
        0,
    ),
    (
        "modf_half4",
        "modf_frac(a) * 8.0h + modf_whole(a)",
        lambda a, b, c: np.modf(a.astype(f32))[0] * 8 + np.modf(a.astype(f32))[1],
        "half4",
        "half4",
        "any",
        0,
    ),
    (
        "frexp_mantissa_float4",
        "frexp_mant(a * 1000.0f)",
        lambda a, b, c: np.frexp(f32(a * 1000))[0],
        "float4",
        "float4",
        "any",
        0,
    ),
    (
        "frexp_exponent",
        "frexp_exp(a * 1000.0f)",
        lambda a, b, c: np.frexp(f32(a * 1000))[1],
        "float",
        "int",
        "any",
        0,
    ),
    (
        "frexp_half",
        "frexp_mant(a) * 64.0h + half(frexp_exp(a))",
        lambda a, b, c: np.frexp(a)[0].astype(f32) * 64 + np.frexp(a)[1],
        "half",
        "half",
        "any",
        0,
    ),
    (
        "uint4_popcount",
        "popcount(a)",
        lambda a, b, c: _bits(a, lambda v: bin(v).count("1")),
        "uint4",
        "uint4",
        "uint",
        0,
    ),
    (
        "int4_abs_max",
        "max(abs(a), b)",
        lambda a, b, c: np.maximum(np.abs(a), b),
        "int4",
        "int4",
        "int",
        0,
    ),
]


def _kernel_source(case):
    cid, expr, _, tin, tout, _, _ = case
    return f"""
kernel void t_{cid}(device const {tin}* A [[buffer(0)]], device const {tin}* B [[buffer(1)]],
                    device const {tin}* C [[buffer(2)]], device {tout}* out [[buffer(3)]],
                    constant uint& n [[buffer(4)]], uint i [[thread_position_in_grid]]) {{
    if (i >= n) return;
    {tin} a = A[i], b = B[i], c = C[i];
    out[i] = {expr};
}}
"""


# sincos, modf and frexp give a second result through a thread reference: a local here
SECOND_RESULTS = """
template <class T> T sincos_sin(T x) { T c; return sincos(x, c); }
template <class T> T sincos_cos(T x) { thread T c; sincos(x, c); return c; }
template <class T> T modf_frac(T x) { T w; return modf(x, w); }
template <class T> T modf_whole(T x) { T w; modf(x, w); return w; }
template <class T> T frexp_mant(T x) { int e; return frexp(x, e); }
float4 frexp_mant(float4 x) { int4 e; return frexp(x, e); }
int frexp_exp(float x) { int e; frexp(x, e); return e; }
int frexp_exp(half x) { int e; frexp(x, e); return e; }
"""

SOURCE = (
    "#include <metal_stdlib>\nusing namespace metal;\n"
    + SECOND_RESULTS
    + "".join(_kernel_source(c) for c in CASES)
)


@pytest.fixture(scope="module")
def lib():
    return metal.compile(SOURCE, "test_sim_builtins.metal")


def _array(t, values):
    dtype, width = TYPES[t]
    shape = (N,) if width == 1 else (N, width)
    return values.astype(dtype).reshape(shape)


# Exact cases whose expression multiplies then adds: a GPU shim may fuse them (below). A fused
# a * b + c skips one rounding of the product, so the result may differ by one unit in the
# last place of the largest of product, addend and sum (many ulp of the result when the sum
# cancels; seen on the H200: 1 ulp of a 0.43 sum of 0.23 and 0.2).
MAY_FUSE = {
    "literal_float": lambda a, b, c: np.maximum(np.abs(a * 0.1), 0.2),
    "half_rounding": lambda a, b, c: np.abs(a.astype(np.float32) * b * c) + np.abs(a),
}


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_builtin(lib, case):
    cid, expr, ref, tin, tout, kinds, tol = case
    rng = np.random.default_rng(zlib.crc32(cid.encode()))  # the same inputs every run
    kinds = (kinds,) * 3 if isinstance(kinds, str) else tuple(kinds) + ("any",) * 3
    dtype, width = TYPES[tin]
    shape = (N,) if width == 1 else (N, width)
    a, b, c = (_input(k, dtype, shape, rng) for k in kinds[:3])
    out_dtype, out_width = TYPES[tout]
    out = metal.DeviceArray.zeros((N,) if out_width == 1 else (N, out_width), out_dtype)
    args = [metal.DeviceArray.from_numpy(x) for x in (a, b, c)]
    lib.function(f"t_{cid}")(*args, out, N, threads=N, threads_per_threadgroup=16)
    got = out.numpy()
    with np.errstate(all="ignore"):
        want = np.asarray(ref(a, b, c)).astype(out_dtype).reshape(got.shape)
    if tol == 0 and cid in MAY_FUSE and metal.shim() != "sim":
        # A GPU compiler may fuse a * b + c in one expression into one FMA (one rounding
        # instead of two): the CUDA translation does (-ffp-contract=on), the simulator never.
        terms = MAY_FUSE[cid](a, b, c).astype(out_dtype).reshape(got.shape)
        largest = np.maximum(terms, np.abs(want))  # the product, the addend or the sum
        err = np.abs(got.astype(np.float64) - want)
        assert (err <= np.spacing(largest)).all(), f"{expr}: {err.max()} > 1 ulp of the terms"
    elif tol == 0:
        np.testing.assert_array_equal(got, want, err_msg=f"{expr} with {tin} inputs")
    else:
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol, err_msg=f"{expr}")


# ---- atomics ----------------------------------------------------------------------------

ATOMICS = r"""
#include <metal_stdlib>
using namespace metal;

// hist[v % 16] += 1 for every value, in device memory (threadgroups on different workers)
kernel void hist_device(device const uint* x [[buffer(0)]], device atomic_uint* hist [[buffer(1)]],
                        constant uint& n [[buffer(2)]], uint i [[thread_position_in_grid]]) {
    if (i >= n) return;
    atomic_fetch_add_explicit(&hist[x[i] % 16], 1u, memory_order_relaxed);
}

// the same through a threadgroup histogram, added to the device one at the end
kernel void hist_threadgroup(device const uint* x [[buffer(0)]],
                             device atomic_uint* hist [[buffer(1)]],
                             constant uint& n [[buffer(2)]], uint i [[thread_position_in_grid]],
                             uint lid [[thread_index_in_threadgroup]]) {
    threadgroup atomic_uint local[16];
    if (lid < 16) atomic_store_explicit(&local[lid], 0u, memory_order_relaxed);
    threadgroup_barrier(mem_flags::mem_threadgroup);
    if (i < n) atomic_fetch_add_explicit(&local[x[i] % 16], 1u, memory_order_relaxed);
    threadgroup_barrier(mem_flags::mem_threadgroup);
    if (lid < 16) {
        uint v = atomic_load_explicit(&local[lid], memory_order_relaxed);
        atomic_fetch_add_explicit(&hist[lid], v, memory_order_relaxed);
    }
}

// sum = total (float atomics); r = max, min, count by compare-exchange, -2n, OR of bits
kernel void reduce_atomic(device const float* x [[buffer(0)]], device const int* y [[buffer(1)]],
                          device atomic_float* sum [[buffer(2)]],
                          device atomic_int* r [[buffer(3)]],
                          constant uint& n [[buffer(4)]], uint i [[thread_position_in_grid]]) {
    if (i >= n) return;
    atomic_fetch_add_explicit(sum, x[i], memory_order_relaxed);
    atomic_fetch_max_explicit(&r[0], y[i], memory_order_relaxed);
    atomic_fetch_min_explicit(&r[1], y[i], memory_order_relaxed);
    int old = atomic_load_explicit(&r[2], memory_order_relaxed);
    while (!atomic_compare_exchange_weak_explicit(&r[2], &old, old + 1, memory_order_relaxed,
                                                  memory_order_relaxed)) {
    }
    atomic_fetch_sub_explicit(&r[3], 2, memory_order_relaxed);
    atomic_fetch_or_explicit(&r[4], 1 << (y[i] & 15), memory_order_relaxed);
}
"""


@pytest.fixture(scope="module")
def atomics():
    return metal.compile(ATOMICS, "test_atomics.metal")


@pytest.mark.parametrize("kernel", ["hist_device", "hist_threadgroup"])
def test_atomic_histogram(atomics, kernel):
    n = 1000
    x = np.random.default_rng(1).integers(0, 1000, n).astype(np.uint32)
    hist = metal.DeviceArray.zeros(16, np.uint32)
    atomics.function(kernel)(
        metal.DeviceArray.from_numpy(x), hist, n, threads=n, threads_per_threadgroup=64
    )
    np.testing.assert_array_equal(hist.numpy(), np.bincount(x % 16, minlength=16))


def test_atomic_reductions(atomics):
    n = 777
    rng = np.random.default_rng(2)
    x = rng.uniform(-1, 1, n).astype(np.float32)
    y = rng.integers(-5000, 5000, n).astype(np.int32)
    total = metal.DeviceArray.zeros(1, np.float32)
    r = metal.DeviceArray.from_numpy(np.array([-(2**31), 2**31 - 1, 0, 0, 0], np.int32))
    atomics.function("reduce_atomic")(
        metal.DeviceArray.from_numpy(x),
        metal.DeviceArray.from_numpy(y),
        total,
        r,
        n,
        threads=n,
        threads_per_threadgroup=32,
    )
    np.testing.assert_allclose(total.numpy()[0], x.sum(dtype=np.float64), atol=1e-3)
    mask = np.bitwise_or.reduce(1 << (y & 15))
    np.testing.assert_array_equal(r.numpy(), [y.max(), y.min(), n, -2 * n, mask])


# ---- SIMD-group and quad-group functions ------------------------------------------------

# (name, expression of x (float) / u (uint) / lane, reference on one SIMD group of 32 values)
SIMD_CASES = [
    ("simd_sum", "simd_sum(x)", lambda x, u: np.full(32, x.sum())),
    ("simd_product", "simd_product(x)", lambda x, u: np.full(32, np.prod(x))),
    ("simd_min", "simd_min(x)", lambda x, u: np.full(32, x.min())),
    ("simd_max", "simd_max(x)", lambda x, u: np.full(32, x.max())),
    ("simd_and", "float(simd_and(u))", lambda x, u: np.full(32, np.bitwise_and.reduce(u))),
    ("simd_or", "float(simd_or(u))", lambda x, u: np.full(32, np.bitwise_or.reduce(u))),
    ("simd_xor", "float(simd_xor(u))", lambda x, u: np.full(32, np.bitwise_xor.reduce(u))),
    ("prefix_incl", "simd_prefix_inclusive_sum(x)", lambda x, u: np.cumsum(x)),
    ("prefix_excl", "simd_prefix_exclusive_sum(x)", lambda x, u: np.cumsum(x) - x),
    ("prefix_prod", "simd_prefix_exclusive_product(x)", lambda x, u: np.cumprod(x) / x),
    (
        "shuffle",
        "simd_shuffle(x, (lane * 7 + 3) % 32)",
        lambda x, u: x[(np.arange(32) * 7 + 3) % 32],
    ),
    ("shuffle_up", "simd_shuffle_up(x, 3)", lambda x, u: np.concatenate([x[:3], x[:-3]])),
    ("shuffle_down", "simd_shuffle_down(x, 5)", lambda x, u: np.concatenate([x[5:], x[-5:]])),
    ("shuffle_xor", "simd_shuffle_xor(x, 6)", lambda x, u: x[np.arange(32) ^ 6]),
    ("rotate_up", "simd_shuffle_rotate_up(x, 5)", lambda x, u: np.roll(x, 5)),
    ("rotate_down", "simd_shuffle_rotate_down(x, 5)", lambda x, u: np.roll(x, -5)),
    ("broadcast", "simd_broadcast(x, 7)", lambda x, u: np.full(32, x[7])),
    ("broadcast_first", "simd_broadcast_first(x)", lambda x, u: np.full(32, x[0])),
    (
        "ballot",
        "float(uint(ulong(simd_ballot(x > 1.0f)) & 0xffffffffu))",
        lambda x, u: np.full(32, float(sum(1 << i for i in range(32) if x[i] > 1))),
    ),
    (
        "fill_down",
        "simd_shuffle_and_fill_down(x, x + 100.0f, 3)",
        lambda x, u: np.concatenate([x[3:], x[:3] + 100]),
    ),
    (
        "fill_up_modulo",
        "simd_shuffle_and_fill_up(x, -x, 2, 8)",
        lambda x, u: np.concatenate([np.r_[-q[-2:], q[:-2]] for q in x.reshape(4, 8)]),
    ),
    ("all", "float(simd_all(x > 0.4f))", lambda x, u: np.full(32, float((x > 0.4).all()))),
    ("any", "float(simd_any(x > 1.45f))", lambda x, u: np.full(32, float((x > 1.45).any()))),
    ("is_first", "float(simd_is_first())", lambda x, u: (np.arange(32) == 0).astype(float)),
    ("quad_sum", "quad_sum(x)", lambda x, u: np.repeat(x.reshape(8, 4).sum(1), 4)),
    ("quad_shuffle", "quad_shuffle(x, 2)", lambda x, u: np.repeat(x.reshape(8, 4)[:, 2], 4)),
    (
        "quad_shuffle_down",
        "quad_shuffle_down(x, 1)",
        lambda x, u: np.concatenate([np.r_[q[1:], q[3:]] for q in x.reshape(8, 4)]),
    ),
    ("quad_broadcast", "quad_broadcast(x, 3)", lambda x, u: np.repeat(x.reshape(8, 4)[:, 3], 4)),
    (
        "quad_prefix",
        "quad_prefix_inclusive_sum(x)",
        lambda x, u: np.cumsum(x.reshape(8, 4), 1).ravel(),
    ),
    (
        "sum_float4",
        "simd_sum(float4(x, 2.0f * x, 0.0f, 1.0f)).y",
        lambda x, u: np.full(32, 2 * x.sum()),
    ),
    (
        "max_int",
        "float(simd_max(int(u % 1000u) - 500))",
        lambda x, u: np.full(32, (u % 1000).astype(np.int64).max() - 500),
    ),
]

SIMD_SOURCE = (
    "#include <metal_stdlib>\nusing namespace metal;\n"
    + "".join(
        f"""
kernel void s_{name}(device const float* X [[buffer(0)]], device const uint* U [[buffer(1)]],
                     device float* out [[buffer(2)]], uint i [[thread_position_in_grid]],
                     ushort lane [[thread_index_in_simdgroup]]) {{
    float x = X[i];
    uint u = U[i];
    out[i] = {expr};
}}
"""
        for name, expr, _ in SIMD_CASES
    )
    + r"""
// Reductions over a partial SIMD group: threads past `active` return first.
kernel void s_partial(device const float* X [[buffer(0)]], device float* out [[buffer(1)]],
                      constant uint& active [[buffer(2)]], uint i [[thread_position_in_grid]],
                      uint lane [[thread_index_in_simdgroup]]) {
    if (lane >= active) return;
    out[i] = simd_sum(X[i]) + 1000.0f * float(simd_is_first());
}

// Two-level reduction: simd_sum, then the SIMD-group partials through threadgroup memory.
kernel void s_block_sum(device const float* X [[buffer(0)]], device float* out [[buffer(1)]],
                        uint i [[thread_position_in_grid]], uint g [[threadgroup_position_in_grid]],
                        uint sg [[simdgroup_index_in_threadgroup]],
                        uint nsg [[simdgroups_per_threadgroup]],
                        uint lane [[thread_index_in_simdgroup]]) {
    threadgroup float partial[32];
    float s = simd_sum(X[i]);
    if (lane == 0) partial[sg] = s;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    if (sg == 0) {
        float v = lane < nsg ? partial[lane] : 0.0f;
        v = simd_sum(v);
        if (lane == 0) out[g] = v;
    }
}
"""
)


@pytest.fixture(scope="module")
def simd():
    return metal.compile(SIMD_SOURCE, "test_simd.metal")


@pytest.mark.parametrize("case", SIMD_CASES, ids=[c[0] for c in SIMD_CASES])
def test_simd(simd, case):
    name, expr, ref = case
    groups = 3 * 2  # 3 threadgroups of 64 threads = 6 SIMD groups
    rng = np.random.default_rng(sum(map(ord, name)))
    x = rng.uniform(0.5, 1.5, groups * 32).astype(np.float32)
    u = rng.integers(0, 2**32, groups * 32, dtype=np.uint64).astype(np.uint32)
    out = metal.DeviceArray.zeros(groups * 32, np.float32)
    simd.function(f"s_{name}")(
        metal.DeviceArray.from_numpy(x),
        metal.DeviceArray.from_numpy(u),
        out,
        threads=groups * 32,
        threads_per_threadgroup=64,
    )
    got = out.numpy().reshape(groups, 32)
    want = np.stack(
        [ref(x[g * 32 : (g + 1) * 32], u[g * 32 : (g + 1) * 32]) for g in range(groups)]
    )
    np.testing.assert_allclose(got, want.astype(np.float32), rtol=1e-5, err_msg=expr)


@pytest.mark.parametrize("active", [1, 20, 32])
def test_simd_partial_group(simd, active):
    """Lanes that returned early do not take part: simd_sum adds the active lanes only."""
    x = np.random.default_rng(active).uniform(-1, 1, 64).astype(np.float32)
    out = metal.DeviceArray.from_numpy(np.full(64, -7.0, np.float32))
    simd.function("s_partial")(
        metal.DeviceArray.from_numpy(x), out, active, threads=64, threads_per_threadgroup=64
    )
    got = out.numpy().reshape(2, 32)
    for g in range(2):
        xs = x[g * 32 : g * 32 + active]
        want = np.full(32, -7.0, np.float32)
        want[:active] = xs.sum()
        want[0] += 1000
        np.testing.assert_allclose(got[g], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tpg", [32, 48, 256, 1024])
def test_simd_two_level_sum(simd, tpg):
    """Threadgroups whose size is not a multiple of 32 end with a partial SIMD group."""
    groups = 3
    x = np.random.default_rng(tpg).uniform(-1, 1, groups * tpg).astype(np.float32)
    out = metal.DeviceArray.zeros(groups, np.float32)
    simd.function("s_block_sum")(
        metal.DeviceArray.from_numpy(x), out, threadgroups=groups, threads_per_threadgroup=tpg
    )
    np.testing.assert_allclose(out.numpy(), x.reshape(groups, tpg).sum(1), rtol=1e-4, atol=1e-4)


# ---- simdgroup_matrix -----------------------------------------------------------------

MATRIX = r"""
#include <metal_stdlib>
using namespace metal;

// D = A * B for 8x8 float matrices, one SIMD group.
kernel void mm8(device const float* A [[buffer(0)]], device const float* B [[buffer(1)]],
                device float* D [[buffer(2)]]) {
    simdgroup_float8x8 a, b, d;
    simdgroup_load(a, A);
    simdgroup_load(b, B);
    simdgroup_multiply(d, a, b);
    simdgroup_store(d, D);
}

// D(8x8) = A[8:16, 0:8] * B^T + C, from 16-wide row-major storage, with an accumulator.
kernel void mm8_origin(device const float* A [[buffer(0)]], device const float* B [[buffer(1)]],
                       device const float* C [[buffer(2)]], device float* D [[buffer(3)]]) {
    simdgroup_float8x8 a, b, c = make_filled_simdgroup_matrix<float, 8, 8>(0.0f), d;
    simdgroup_load(a, A, 16, ulong2(0, 8));
    simdgroup_load(b, B, 8, ulong2(0, 0), true);
    simdgroup_load(c, C);
    simdgroup_multiply_accumulate(d, a, b, c);
    simdgroup_store(d, D, 16, ulong2(8, 0));
}

// A 16x16 GEMM from 8x8 tiles: 4 SIMD groups, each one 8x8 block of D.
kernel void mm16(device const float* A [[buffer(0)]], device const float* B [[buffer(1)]],
                 device float* D [[buffer(2)]], uint sg [[simdgroup_index_in_threadgroup]]) {
    uint r = (sg / 2) * 8, c = (sg % 2) * 8;
    simdgroup_float8x8 acc = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
    for (uint k = 0; k < 16; k += 8) {
        simdgroup_float8x8 a, b;
        simdgroup_load(a, A + r * 16 + k, 16);
        simdgroup_load(b, B + k * 16 + c, 16);
        simdgroup_multiply_accumulate(acc, a, b, acc);
    }
    simdgroup_store(acc, D + r * 16 + c, 16);
}

// half matrices: D = A * B + I (identity through the diagonal constructor)
kernel void mm8_half(device const half* A [[buffer(0)]], device const half* B [[buffer(1)]],
                     device half* D [[buffer(2)]]) {
    simdgroup_half8x8 a, b, d;
    simdgroup_half8x8 eye = simdgroup_half8x8(1.0h);
    simdgroup_load(a, A);
    simdgroup_load(b, B);
    simdgroup_multiply_accumulate(d, a, b, eye);
    simdgroup_store(d, D);
}
"""


@pytest.fixture(scope="module")
def matrix():
    return metal.compile(MATRIX, "test_simdgroup_matrix.metal")


def _dev(x):
    return metal.DeviceArray.from_numpy(np.ascontiguousarray(x))


def test_simdgroup_multiply(matrix):
    rng = np.random.default_rng(5)
    a, b = rng.standard_normal((2, 8, 8)).astype(np.float32)
    d = metal.DeviceArray.zeros((8, 8), np.float32)
    matrix.function("mm8")(_dev(a), _dev(b), d, threadgroups=1, threads_per_threadgroup=32)
    np.testing.assert_allclose(d.numpy(), a @ b, rtol=1e-5, atol=1e-5)


def test_simdgroup_origin_transpose_accumulate(matrix):
    rng = np.random.default_rng(6)
    a = rng.standard_normal((16, 16)).astype(np.float32)
    b, c = rng.standard_normal((2, 8, 8)).astype(np.float32)
    d = metal.DeviceArray.from_numpy(np.full((8, 16), 5.0, np.float32))
    matrix.function("mm8_origin")(
        _dev(a), _dev(b), _dev(c), d, threadgroups=1, threads_per_threadgroup=32
    )
    want = np.full((8, 16), 5.0, np.float32)
    want[:, 8:] = a[8:16, 0:8] @ b.T + c
    np.testing.assert_allclose(d.numpy(), want, rtol=1e-5, atol=1e-5)


def test_simdgroup_gemm16(matrix):
    rng = np.random.default_rng(7)
    a, b = rng.standard_normal((2, 16, 16)).astype(np.float32)
    d = metal.DeviceArray.zeros((16, 16), np.float32)
    matrix.function("mm16")(_dev(a), _dev(b), d, threadgroups=1, threads_per_threadgroup=128)
    np.testing.assert_allclose(d.numpy(), a @ b, rtol=1e-5, atol=1e-5)


def test_simdgroup_half(matrix):
    rng = np.random.default_rng(8)
    a, b = rng.uniform(-1, 1, (2, 8, 8)).astype(np.float16)
    d = metal.DeviceArray.zeros((8, 8), np.float16)
    matrix.function("mm8_half")(_dev(a), _dev(b), d, threadgroups=1, threads_per_threadgroup=32)
    want = a.astype(np.float32) @ b.astype(np.float32) + np.eye(8)
    np.testing.assert_allclose(d.numpy().astype(np.float32), want, rtol=1e-2, atol=1e-2)


def test_simdgroup_matrix_needs_full_simdgroup(matrix):
    """On the simulator, a simdgroup_matrix op with fewer than 32 threads is an error
    (the hardware needs the whole SIMD group; the result would be undefined)."""
    if not metal.is_simulator():
        pytest.skip("undefined behaviour on a GPU; only the simulator checks it")
    d = metal.DeviceArray.zeros((8, 8), np.float32)
    z = _dev(np.zeros((8, 8), np.float32))
    with pytest.raises(metal.MetalError, match="all 32 threads"):
        matrix.function("mm8")(z, z, d, threadgroups=1, threads_per_threadgroup=16)
        metal.synchronize()


# ---- simdgroup_matrix element layout, and MLX-style kernels built on thread_elements() ---
#
# Apple GPUs spread an 8x8 simdgroup_matrix over the 32 lanes, two elements per lane, and
# thread_elements() gives a lane its two. MLX's steel GEMM and attention kernels rely on
# the layout: they load and store fragments element by element. Lane l holds row
# (q & 4) + (l / 2) % 4 with q = l / 4, columns c0 and c0 + 1 with c0 = (q & 2) * 2 +
# (l % 2) * 2. The kernels below spell it once (frag_coord); NumPy spells it again here.


def _frag_coord(lane):
    q = lane // 4
    return (q & 4) + (lane // 2) % 4, (q & 2) * 2 + (lane % 2) * 2  # (row, first column)


FRAGMENTS = r"""
#include <metal_stdlib>
#include <metal_simdgroup_matrix>
using namespace metal;

// Where this lane's two elements of an 8x8 fragment are: row .y, columns .x and .x + 1.
METAL_FUNC ushort2 frag_coord(ushort lane) {
    const ushort quad = lane / 4;
    return ushort2((quad & 2) * 2 + (lane % 2) * 2, (quad & 4) + (lane / 2) % 4);
}

// What each lane holds after simdgroup_load (plain, transposed) and how simdgroup_store
// lays out what lanes put into thread_elements(); the diagonal constructor and a half
// matrix through the same path.
kernel void frag_layout(device const float* src [[buffer(0)]],
                        device float2* plain [[buffer(1)]],
                        device float2* transposed [[buffer(2)]],
                        device float* stored [[buffer(3)]],
                        device float* diagonal [[buffer(4)]],
                        device const half* hsrc [[buffer(5)]],
                        device half* hstored [[buffer(6)]],
                        ushort lane [[thread_index_in_simdgroup]]) {
    simdgroup_float8x8 m;
    simdgroup_load(m, src);
    plain[lane] = float2(m.thread_elements()[0], m.thread_elements()[1]);
    simdgroup_load(m, src, 8, ulong2(0, 0), true);
    transposed[lane] = reinterpret_cast<thread float2&>(m.thread_elements());
    m.thread_elements()[0] = 100.0f * lane;
    m.thread_elements()[1] = 100.0f * lane + 1.0f;
    simdgroup_store(m, stored);
    simdgroup_float8x8 d = simdgroup_float8x8(2.5f);
    simdgroup_store(d, diagonal);
    simdgroup_half8x8 h;
    simdgroup_load(h, hsrc);
    h.thread_elements() *= 2.0h;
    simdgroup_store(h, hstored);
}

// C (M x N) = A (M x K) · B (K x N), all row-major, any sizes. A threadgroup of 4 SIMD
// groups (2 x 2) computes a 32 x 32 tile of C, each SIMD group a 16 x 16 part held as
// 2 x 2 fragments. In the style of MLX's steel GEMM: every lane reads its own fragment
// elements out of threadgroup memory into thread_elements() (no simdgroup_load) and
// writes its results to C itself with bounds checks (no simdgroup_store, no scratch).
struct FragDims {
    uint M, N, K;
};
#define FT_M 32
#define FT_N 32
#define FT_K 16
kernel void gemm_thread_elements(device const float* A [[buffer(0)]],
                                 device const float* B [[buffer(1)]],
                                 device float* C [[buffer(2)]],
                                 constant FragDims& d [[buffer(3)]],
                                 uint2 group [[threadgroup_position_in_grid]],
                                 ushort tid [[thread_index_in_threadgroup]],
                                 ushort sg [[simdgroup_index_in_threadgroup]],
                                 ushort lane [[thread_index_in_simdgroup]]) {
    threadgroup float As[FT_M][FT_K + 1];  // +1: rows start in different banks
    threadgroup float Bs[FT_K][FT_N + 2];  // +2: keeps a lane's float pair 8-byte aligned
    const uint m0 = group.y * FT_M, n0 = group.x * FT_N;
    const uint wm = (sg / 2) * 16, wn = (sg % 2) * 16;  // this SIMD group's part
    const ushort2 at = frag_coord(lane);
    simdgroup_float8x8 acc[2][2];
    for (uint i = 0; i < 2; i++)
        for (uint j = 0; j < 2; j++) acc[i][j] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
    for (uint k0 = 0; k0 < d.K; k0 += FT_K) {
        for (uint e = tid; e < FT_M * FT_K; e += 128) {
            const uint r = e / FT_K, c = e % FT_K;
            As[r][c] = (m0 + r < d.M && k0 + c < d.K) ? A[(m0 + r) * d.K + k0 + c] : 0.0f;
        }
        for (uint e = tid; e < FT_K * FT_N; e += 128) {
            const uint r = e / FT_N, c = e % FT_N;
            Bs[r][c] = (k0 + r < d.K && n0 + c < d.N) ? B[(k0 + r) * d.N + n0 + c] : 0.0f;
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);
        for (uint kk = 0; kk < FT_K; kk += 8) {
            simdgroup_float8x8 a[2], b[2];
            for (uint i = 0; i < 2; i++) {
                threadgroup const float* p = &As[wm + i * 8 + at.y][kk + at.x];
                a[i].thread_elements()[0] = p[0];
                a[i].thread_elements()[1] = p[1];
            }
            for (uint j = 0; j < 2; j++) {
                threadgroup const float* p = &Bs[kk + at.y][wn + j * 8 + at.x];
                b[j].thread_elements() = float2(p[0], p[1]);
            }
            for (uint i = 0; i < 2; i++)
                for (uint j = 0; j < 2; j++)
                    simdgroup_multiply_accumulate(acc[i][j], a[i], b[j], acc[i][j]);
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);  // tiles read before the next load
    }
    for (uint i = 0; i < 2; i++) {
        for (uint j = 0; j < 2; j++) {
            const uint r = m0 + wm + i * 8 + at.y, c = n0 + wn + j * 8 + at.x;
            const float2 v = acc[i][j].thread_elements();
            if (r < d.M && c < d.N) C[r * d.N + c] = v.x;
            if (r < d.M && c + 1 < d.N) C[r * d.N + c + 1] = v.y;
        }
    }
}
"""


@pytest.fixture(scope="module")
def fragments():
    if metal.shim() == "cuda":
        pytest.skip(
            "Apple's thread_elements() layout; the CUDA shim keeps the tensor cores' layout "
            "(lane l: row l / 4, columns 2 (l % 4) and + 1; docs/cuda.md)"
        )
    return metal.compile(FRAGMENTS, "test_simdgroup_fragments.metal")


def test_simdgroup_matrix_lane_layout(fragments):
    src = np.arange(64, dtype=np.float32).reshape(8, 8)
    hsrc = (np.arange(64) / 8).astype(np.float16).reshape(8, 8)
    plain, transposed = (metal.DeviceArray.zeros((32, 2), np.float32) for _ in range(2))
    stored, diagonal = (metal.DeviceArray.zeros((8, 8), np.float32) for _ in range(2))
    hstored = metal.DeviceArray.zeros((8, 8), np.float16)
    fragments.function("frag_layout")(
        _dev(src), plain, transposed, stored, diagonal, _dev(hsrc), hstored,
        threadgroups=1, threads_per_threadgroup=32,
    )  # fmt: skip
    want_plain, want_t = np.zeros((32, 2), np.float32), np.zeros((32, 2), np.float32)
    want_stored = np.zeros((8, 8), np.float32)
    for lane in range(32):
        r, c = _frag_coord(lane)
        want_plain[lane] = src[r, c : c + 2]
        want_t[lane] = src.T[r, c : c + 2]
        want_stored[r, c : c + 2] = [100 * lane, 100 * lane + 1]
    np.testing.assert_array_equal(plain.numpy(), want_plain)
    np.testing.assert_array_equal(transposed.numpy(), want_t)
    np.testing.assert_array_equal(stored.numpy(), want_stored)
    np.testing.assert_array_equal(diagonal.numpy(), 2.5 * np.eye(8, dtype=np.float32))
    np.testing.assert_array_equal(hstored.numpy(), hsrc * np.float16(2))


@pytest.mark.parametrize("order", ["forward", "reverse", "random"])
@pytest.mark.parametrize("m,n,k", [(8, 8, 8), (37, 29, 45), (64, 70, 17), (1, 3, 2)])
def test_mlx_style_gemm_through_thread_elements(fragments, monkeypatch, order, m, n, k):
    monkeypatch.setenv("CAMEL_SIM_ORDER", order)
    rng = np.random.default_rng(m * 1000 + n * 10 + k)
    a = rng.standard_normal((m, k), dtype=np.float32)
    b = rng.standard_normal((k, n), dtype=np.float32)
    c = metal.DeviceArray.from_numpy(np.full((m, n), np.nan, np.float32))  # every one written
    dims = np.array([m, n, k], np.uint32)
    grid = ((n + 31) // 32, (m + 31) // 32, 1)
    fragments.function("gemm_thread_elements")(
        _dev(a), _dev(b), c, dims, threadgroups=grid, threads_per_threadgroup=128
    )
    metal.synchronize()
    np.testing.assert_allclose(c.numpy(), a @ b, rtol=1e-5, atol=1e-4)


def test_fused_multiply_add_tolerance_is_tight_and_enough():
    """MAY_FUSE's bound holds for a true FMA (one rounding, computed in float64 here) and is
    no looser than one ulp of the largest term."""
    rng = np.random.default_rng(3)
    a = rng.uniform(-4, 4, 100_000).astype(np.float32)
    want = (a * np.float32(0.1)).astype(np.float32) + np.float32(0.2)  # two roundings
    fused = a.astype(np.float64) * np.float64(np.float32(0.1)) + np.float64(np.float32(0.2))
    fused = fused.astype(np.float32)
    terms = MAY_FUSE["literal_float"](a, a, a).astype(np.float32)
    bound = np.spacing(np.maximum(terms, np.abs(want)))
    err = np.abs(fused.astype(np.float64) - want)
    assert (err <= bound).all()
    assert (err > 0).any() and bound.max() <= np.spacing(np.float32(4.0))
