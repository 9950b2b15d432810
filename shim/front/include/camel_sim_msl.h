// camel_sim_msl.h — the Metal Shading Language standard library, as plain
// C++17 for clang, shared by the camel Metal simulator and the CUDA shim.
//
// A .metal file is rewritten by shim/front/translate.cpp (address spaces
// dropped, float literals suffixed, float4(a, b) turned into a call) and then
// compiled against this header. What is here:
//   - scalar and vector types (float4 is a clang ext_vector_type, so .xyzw
//     and .rgba swizzles work; half is _Float16)
//   - namespace metal: math, integer, relational and geometric functions
//     (with fast:: and precise:: spellings), as_type, numeric_limits, array
//   - atomics (std-free, on clang's __atomic builtins)
//   - the types of barriers and SIMD groups (mem_flags, simd_vote, quad_vote)
// No C or C++ standard-library header is included except <stdint.h> (through
// sim_abi.h): Metal has no standard library, and neither does a kernel here.
//
// Both targets compile kernels against this header: the simulator and the CUDA
// shim (shim/cuda/include/camel_cuda_msl.h defines __CAMEL_CUDA__ and includes it).
// The functions of barriers, SIMD groups and simdgroup_matrix are each target's own,
// in its include folder, and each target's <metal_stdlib> includes them right after
// this header: shim/sim/include/camel_sim_simd.h (through the simulator runtime,
// ../sim_abi.h) and shim/cuda/include/camel_cuda_simd.h (on warps). This header
// includes neither (tools/includes.py fails a shared header including a target's).
#pragma once
#ifndef __CAMEL_CUDA__
#include "../sim_abi.h"

#define __METAL_SIM__ 1
#endif

// ---------------------------------------------------------------------------
// Scalar and vector types (global, like the builtin types of MSL)
// ---------------------------------------------------------------------------
typedef unsigned char uchar;
typedef unsigned short ushort;
typedef unsigned int uint;
typedef unsigned long ulong;
typedef _Float16 half;
typedef __SIZE_TYPE__ size_t;
typedef __PTRDIFF_TYPE__ ptrdiff_t;

#define __CAMEL_VEC(T, name)                                  \
    typedef T name##2 __attribute__((ext_vector_type(2)));    \
    typedef T name##3 __attribute__((ext_vector_type(3)));    \
    typedef T name##4 __attribute__((ext_vector_type(4)));
__CAMEL_VEC(char, char)
__CAMEL_VEC(unsigned char, uchar)
__CAMEL_VEC(short, short)
__CAMEL_VEC(unsigned short, ushort)
__CAMEL_VEC(int, int)
__CAMEL_VEC(unsigned int, uint)
__CAMEL_VEC(long, long)
__CAMEL_VEC(unsigned long, ulong)
__CAMEL_VEC(_Float16, half)
__CAMEL_VEC(float, float)
#undef __CAMEL_VEC

// packed_float4 etc.: same components, only 4-byte (element) alignment.
#define __CAMEL_PACKED(T, name)                                                \
    typedef T packed_##name##2 __attribute__((ext_vector_type(2), aligned(sizeof(T)))); \
    typedef T packed_##name##4 __attribute__((ext_vector_type(4), aligned(sizeof(T))));
__CAMEL_PACKED(float, float)
__CAMEL_PACKED(_Float16, half)
__CAMEL_PACKED(int, int)
__CAMEL_PACKED(unsigned int, uint)
__CAMEL_PACKED(short, short)
__CAMEL_PACKED(unsigned short, ushort)
__CAMEL_PACKED(char, char)
__CAMEL_PACKED(unsigned char, uchar)
#undef __CAMEL_PACKED

// packed_float3: three floats, 12 bytes (float3 is 16 bytes like on the GPU).
#define __CAMEL_PACKED3(T, name)                                              \
    struct packed_##name##3 {                                                 \
        T x, y, z;                                                            \
        packed_##name##3() = default;                                         \
        packed_##name##3(T a, T b, T c) : x(a), y(b), z(c) {}                 \
        packed_##name##3(name##3 v) : x(v.x), y(v.y), z(v.z) {}               \
        operator name##3() const { return name##3{x, y, z}; }                 \
        T &operator[](int i) { return (&x)[i]; }                              \
        T operator[](int i) const { return (&x)[i]; }                         \
    };
__CAMEL_PACKED3(float, float)
__CAMEL_PACKED3(_Float16, half)
__CAMEL_PACKED3(int, int)
__CAMEL_PACKED3(unsigned int, uint)
#undef __CAMEL_PACKED3

// ---------------------------------------------------------------------------
// Small type traits (no <type_traits> in a kernel)
// ---------------------------------------------------------------------------
template <class T> struct __camel_vt { static constexpr int n = 1; typedef T elem; };
template <class T, int N> struct __camel_vt<T __attribute__((ext_vector_type(N)))> {
    static constexpr int n = N;
    typedef T elem;
};
template <class T> struct __camel_identity { typedef T type; };
template <class T> using __camel_identity_t = typename __camel_identity<T>::type;
template <bool B, class T = int> struct __camel_enable_if {};
template <class T> struct __camel_enable_if<true, T> { typedef T type; };
template <class T> struct __camel_remove_ref { typedef T type; };
template <class T> struct __camel_remove_ref<T &> { typedef T type; };
template <class T> struct __camel_remove_ref<T &&> { typedef T type; };
template <class T> using __camel_remove_ref_t = typename __camel_remove_ref<T>::type;
template <class T> struct __camel_is_ptr { static constexpr bool value = false; };
template <class T> struct __camel_is_ptr<T *> { static constexpr bool value = true; };
template <class T> struct __camel_is_ref { static constexpr bool value = false; };
template <class T> struct __camel_is_ref<T &> { static constexpr bool value = true; };
template <class A, class B> struct __camel_same { static constexpr bool value = false; };
template <class A> struct __camel_same<A, A> { static constexpr bool value = true; };
template <class T> struct __camel_is_float {
    static constexpr bool value = __camel_same<T, float>::value || __camel_same<T, _Float16>::value;
};
// The I-th parameter type of a function type (for the generated entry wrappers).
template <int I, class F> struct __camel_param;
template <int I, class R, class A0, class... A>
struct __camel_param<I, R(A0, A...)> : __camel_param<I - 1, R(A...)> {};
template <class R, class A0, class... A> struct __camel_param<0, R(A0, A...)> { typedef A0 type; };
template <int I, class F> using __camel_param_t = typename __camel_param<I, F>::type;

// Vector of the same length with another element type (bool4 for float4).
template <class T, class E> struct __camel_rebind { typedef E type; };
template <class T, int N, class E> struct __camel_rebind<T __attribute__((ext_vector_type(N))), E> {
    typedef E type __attribute__((ext_vector_type(N)));
};


// ---------------------------------------------------------------------------
// bool2/3/4. clang's bool vectors have no .x, and its vector comparisons give
// int masks (-1 = true), so MSL's bool vectors are small structs here: built
// from a comparison (bool4 m = a < b), indexed (m.x, m[i]), and accepted by
// all, any and select.
// ---------------------------------------------------------------------------
template <class T> struct __camel_is_boolvec { static constexpr bool value = false; };
#define __CAMEL_COMMA ,
#define __CAMEL_BOOLVEC(N, MEMBERS, ...)                                              \
    struct bool##N;                                                                  \
    template <> struct __camel_vt<bool##N> { static constexpr int n = N; typedef bool elem; }; \
    template <> struct __camel_is_boolvec<bool##N> { static constexpr bool value = true; }; \
    struct bool##N {                                                                 \
        bool MEMBERS;                                                                \
        bool##N() = default;                                                         \
        constexpr bool##N(bool s) : __VA_ARGS__ {}                                   \
        template <class V, class = typename __camel_enable_if<                       \
                               __camel_vt<V>::n == N && !__camel_same<V, bool##N>::value>::type> \
        bool##N(V m) {                                                               \
            for (int i = 0; i < N; i++) (*this)[i] = m[i] != 0;                      \
        }                                                                            \
        bool &operator[](int i) { return (&x)[i]; }                                  \
        bool operator[](int i) const { return (&x)[i]; }                             \
        bool##N operator!() const {                                                  \
            bool##N r;                                                               \
            for (int i = 0; i < N; i++) r[i] = !(*this)[i];                          \
            return r;                                                                \
        }                                                                            \
    };
__CAMEL_BOOLVEC(2, x __CAMEL_COMMA y, x(s), y(s))
__CAMEL_BOOLVEC(3, x __CAMEL_COMMA y __CAMEL_COMMA z, x(s), y(s), z(s))
__CAMEL_BOOLVEC(4, x __CAMEL_COMMA y __CAMEL_COMMA z __CAMEL_COMMA w, x(s), y(s), z(s), w(s))
#undef __CAMEL_BOOLVEC
#undef __CAMEL_COMMA
template <int N> struct __camel_boolvec_of;
template <> struct __camel_boolvec_of<2> { typedef bool2 type; };
template <> struct __camel_boolvec_of<3> { typedef bool3 type; };
template <> struct __camel_boolvec_of<4> { typedef bool4 type; };
template <class T, int N> struct __camel_rebind<T __attribute__((ext_vector_type(N))), bool> {
    typedef typename __camel_boolvec_of<N>::type type;
};

// ---------------------------------------------------------------------------
// Vector constructors: float4(a, b.xy) is rewritten to __camel_make<float4>(a, b.xy)
// ---------------------------------------------------------------------------
template <class V, class S> constexpr void __camel_put(V &v, int &i, S s) {
    typedef typename __camel_vt<V>::elem E;
    if constexpr (__camel_vt<S>::n == 1) {
        v[i++] = (E)s;
    } else {
        for (int k = 0; k < __camel_vt<S>::n; k++) v[i++] = (E)s[k];
    }
}
template <class V, class... A> constexpr V __camel_make(A... a) {
    typedef typename __camel_vt<V>::elem E;
    constexpr int n = __camel_vt<V>::n;
    if constexpr (sizeof...(A) == 0) {
        return V{};
    } else if constexpr (n == 1) {
        return (V)(a, ...);  // scalar "vector type": plain conversion
    } else if constexpr (sizeof...(A) == 1 && ((__camel_vt<A>::n == 1) && ...)) {
        return (V)(E)(a, ...);  // float4(x): every component is x
    } else if constexpr (sizeof...(A) == 1 && ((__camel_vt<A>::n == n) && ...) &&
                         !__camel_is_boolvec<V>::value &&
                         !(__camel_is_boolvec<A>::value || ...)) {
        return __builtin_convertvector((a, ...), V);  // float4(int4): convert each component
    } else if constexpr (sizeof...(A) == n && ((__camel_vt<A>::n == 1) && ...) &&
                         !__camel_is_boolvec<V>::value) {
        return V{(E)a...};  // float4(x, y, z, w): a constant expression, so a program-scope
                            // `constant float2 t[] = {float2(1, 2)}` needs no dynamic
                            // initialisation (which CUDA cannot give device memory)
    } else {
        static_assert(((int)__camel_vt<A>::n + ...) == n,
                      "vector constructor: the arguments must supply exactly as many "
                      "components as the vector has");
        V v{};
        int i = 0;
        (__camel_put(v, i, a), ...);
        return v;
    }
}
// packed_float3(a, b, c) and friends are structs with constructors already.
// (float4)x — a C-style cast between vector types converts in MSL but
// reinterprets bits in clang, so the translator turns it into
// __camel_conv<float4>() ->* x, which has the same precedence as a cast.
template <class V> struct __camel_conv {};
template <class V, class A> inline V operator->*(__camel_conv<V>, A a) { return __camel_make<V>(a); }
// T(a, b) and (T)v with T a template type parameter become __camel_construct<T>(a, b)
// and __camel_cast<T>() ->* v: for a vector or scalar T what float4(a, b) and
// (float4)v do (construct, convert); any other T (a struct, a pointer) as written.
template <class V, class... A> inline V __camel_construct(A &&...a) {
    if constexpr ((__is_class(V) || __is_union(V)) && !__camel_is_boolvec<V>::value)
        return V(static_cast<A &&>(a)...);
    else if constexpr (sizeof...(A) == 0)
        return V();
    else
        return __camel_make<V>(a...);
}
template <class V> struct __camel_cast {};
template <class V, class A> inline V operator->*(__camel_cast<V>, A &&a) {
    return __camel_construct<V>(static_cast<A &&>(a));
}

// ---------------------------------------------------------------------------
// The runtime, and which simulated thread is running (set by the entry wrapper)
// ---------------------------------------------------------------------------
#ifndef __CAMEL_CUDA__
inline const camel_sim_runtime *__camel_rt;
inline thread_local const camel_sim_thread *__camel_cur;

// threadgroup T x[N]; in a kernel becomes auto &x = *__camel_tg<T[N]>();
// every thread of the group gets the same address.
template <class T> inline T *__camel_tg() {
    const camel_sim_thread *t = __camel_cur;
    void *p = __camel_rt->threadgroup_static(t, sizeof(T), alignof(T));
    __camel_cur = t;
    return (T *)p;
}
#endif  // __CAMEL_CUDA__

// Entry-wrapper helpers: a binding address as the declared parameter type,
// and a builtin (uint3 in camel_sim_thread) as uint, ushort2, uint3, ...
template <class P> inline P __camel_bind(void *p) {
    if constexpr (__camel_is_ptr<P>::value) {
        return (P)p;
    } else {
        return *(__camel_remove_ref_t<P> *)p;
    }
}
template <class P> inline P __camel_builtin3(const uint32_t *v) {
    typedef typename __camel_vt<P>::elem E;
    constexpr int n = __camel_vt<P>::n;
    if constexpr (n == 1) {
        return (P)v[0];
    } else {
        P r{};
        for (int i = 0; i < n && i < 3; i++) r[i] = (E)v[i];
        return r;
    }
}
template <class P> inline P __camel_builtin1(uint32_t v) { return (P)v; }
// What an absent optional argument (MSL 5.8.1.2) of parameter position j points at:
// memory that faults, named by the runtime's crash message; null on CUDA.
inline void *__camel_absent_argument(int j) {
#ifdef __CAMEL_CUDA__
    (void)j;
    return nullptr;
#else
    if (j >= CAMEL_SIM_ABSENT_SLOTS) j = CAMEL_SIM_ABSENT_SLOTS - 1;
    return (char *)__camel_rt->absent_arguments + (uint64_t)j * CAMEL_SIM_ABSENT_SPAN +
           CAMEL_SIM_ABSENT_SPAN / 2;
#endif
}

#ifndef __CAMEL_CUDA__
// printf inside a kernel goes through the runtime (one line at a time).
extern "C++" inline int printf(const char *fmt, ...) {
    __builtin_va_list ap;
    __builtin_va_start(ap, fmt);
    int r = __camel_rt->vprintf(fmt, ap);
    __builtin_va_end(ap);
    return r;
}
// assert(e): Apple checks it under shader validation and reports a failed command
// buffer; the simulator always checks it (unless NDEBUG) and fails the dispatch.
inline void __camel_assert_failed(const char *expr, const char *file, unsigned line) {
    static thread_local char buf[300];
    __builtin_snprintf(buf, sizeof buf, "%s:%u: assertion failed: %s", file, line, expr);
    __camel_rt->fail(__camel_cur, buf);
}
#ifdef NDEBUG
#define assert(e) ((void)0)
#else
#define assert(e) ((e) ? (void)0 : __camel_assert_failed(#e, __FILE__, __LINE__))
#endif
#endif

// ---------------------------------------------------------------------------
// Constants
// ---------------------------------------------------------------------------
// Apple's headers define METAL_FUNC as inline + always_inline; plain inline here
// (the same results; the rewrite's barrier analysis also sees through a spelled-out
// __attribute__((always_inline)): test_barriers_and_simd_functions_in_helpers_with_gnu_attributes)
#ifndef METAL_FUNC
#define METAL_FUNC inline
#endif
#define MAXFLOAT 0x1.fffffep+127f
#define HUGE_VALF __builtin_huge_valf()
#define INFINITY __builtin_inff()
#define NAN __builtin_nanf("")
#define FLT_MAX 0x1.fffffep+127f
#define FLT_MIN 0x1.0p-126f
#define FLT_EPSILON 0x1.0p-23f
#define FLT_DIG 6
#define FLT_MANT_DIG 24
#define FLT_MAX_EXP 128
#define FLT_MIN_EXP -125
#define HALF_MAX ((half)65504.0f)
#define HALF_MIN ((half)0x1.0p-14f)
#define HALF_EPSILON ((half)0x1.0p-10f)
#define CHAR_BIT 8
#define SCHAR_MAX 127
#define SCHAR_MIN (-128)
#define UCHAR_MAX 255
#define CHAR_MAX SCHAR_MAX
#define CHAR_MIN SCHAR_MIN
#define SHRT_MAX 32767
#define SHRT_MIN (-32768)
#define USHRT_MAX 65535
#define INT_MAX 2147483647
#define INT_MIN (-2147483647 - 1)
#define UINT_MAX 0xffffffffu
#define LONG_MAX 0x7fffffffffffffffL
#define LONG_MIN (-0x7fffffffffffffffL - 1)
#define ULONG_MAX 0xffffffffffffffffUL
#define M_E_F 2.71828182845904523536f
#define M_LOG2E_F 1.44269504088896340736f
#define M_LOG10E_F 0.434294481903251827651f
#define M_LN2_F 0.693147180559945309417f
#define M_LN10_F 2.30258509299404568402f
#define M_PI_F 3.14159265358979323846f
#define M_PI_2_F 1.57079632679489661923f
#define M_PI_4_F 0.785398163397448309616f
#define M_1_PI_F 0.318309886183790671538f
#define M_2_PI_F 0.636619772367581343076f
#define M_2_SQRTPI_F 1.12837916709551257390f
#define M_SQRT2_F 1.41421356237309504880f
#define M_SQRT1_2_F 0.707106781186547524401f
#define M_E_H ((half)M_E_F)
#define M_LOG2E_H ((half)M_LOG2E_F)
#define M_LN2_H ((half)M_LN2_F)
#define M_PI_H ((half)M_PI_F)
#define M_PI_2_H ((half)M_PI_2_F)
#define M_SQRT2_H ((half)M_SQRT2_F)
#define M_SQRT1_2_H ((half)M_SQRT1_2_F)

namespace metal {

// The vector types are also reachable as metal::float4, and vec<T, N>.
using ::uchar; using ::ushort; using ::uint; using ::ulong; using ::half;
template <class T, int N> using vec = T __attribute__((ext_vector_type(N)));
#define __CAMEL_USING_VEC(name) using ::name##2; using ::name##3; using ::name##4;
__CAMEL_USING_VEC(bool) __CAMEL_USING_VEC(char) __CAMEL_USING_VEC(uchar)
__CAMEL_USING_VEC(short) __CAMEL_USING_VEC(ushort) __CAMEL_USING_VEC(int)
__CAMEL_USING_VEC(uint) __CAMEL_USING_VEC(long) __CAMEL_USING_VEC(ulong)
__CAMEL_USING_VEC(half) __CAMEL_USING_VEC(float)
#undef __CAMEL_USING_VEC
using ::__camel_make;  // metal::float4(x) is rewritten to metal::__camel_make<float4>(x)
using ::__camel_conv;
using ::__camel_construct;
using ::__camel_cast;

// Lists of the vector types, for functions defined once per type.
#define __CAMEL_FVECS(M) M(float2) M(float3) M(float4) M(half2) M(half3) M(half4)
#define __CAMEL_IVECS(M)                                                              \
    M(char2) M(char3) M(char4) M(uchar2) M(uchar3) M(uchar4) M(short2) M(short3)      \
    M(short4) M(ushort2) M(ushort3) M(ushort4) M(int2) M(int3) M(int4) M(uint2)       \
    M(uint3) M(uint4) M(long2) M(long3) M(long4) M(ulong2) M(ulong3) M(ulong4)
#define __CAMEL_ISCALARS(M) \
    M(char) M(uchar) M(short) M(ushort) M(int) M(uint) M(long) M(ulong)

template <class V> using __camel_if_fvec =
    typename __camel_enable_if<(__camel_vt<V>::n > 1) &&
                               __camel_is_float<typename __camel_vt<V>::elem>::value>::type;
template <class V> using __camel_if_vec = typename __camel_enable_if<(__camel_vt<V>::n > 1)>::type;

// ---------------------------------------------------------------------------
// Math: float and half scalars, and every float/half vector component-wise.
// half is computed in float and rounded back.
// ---------------------------------------------------------------------------
#define __CAMEL_UNARY(name, expr)                                                     \
    inline float name(float x) { return expr; }                                      \
    inline half name(half h) { return (half)name((float)h); }                        \
    template <class V, __camel_if_fvec<V> = 0> inline V name(V v) {                  \
        V r;                                                                         \
        for (int i = 0; i < __camel_vt<V>::n; i++) r[i] = name(v[i]);                \
        return r;                                                                    \
    }
// Binary and ternary functions: one non-template overload per vector type, so
// a scalar argument converts to the vector (max(v, 0.0f)) as in MSL.
#define __CAMEL_BINARY_V(V, name)                                                     \
    inline V name(V a, V b) {                                                        \
        V r;                                                                         \
        for (int i = 0; i < __camel_vt<V>::n; i++) r[i] = name(a[i], b[i]);          \
        return r;                                                                    \
    }
#define __CAMEL_BINARY(name, expr)                                                    \
    inline float name(float x, float y) { return expr; }                             \
    inline half name(half a, half b) { return (half)name((float)a, (float)b); }      \
    __CAMEL_BINARY_V(float2, name) __CAMEL_BINARY_V(float3, name)                    \
    __CAMEL_BINARY_V(float4, name) __CAMEL_BINARY_V(half2, name)                     \
    __CAMEL_BINARY_V(half3, name) __CAMEL_BINARY_V(half4, name)
#define __CAMEL_TERNARY_V(V, name)                                                    \
    inline V name(V a, V b, V c) {                                                   \
        V r;                                                                         \
        for (int i = 0; i < __camel_vt<V>::n; i++) r[i] = name(a[i], b[i], c[i]);    \
        return r;                                                                    \
    }
#define __CAMEL_TERNARY(name, expr)                                                   \
    inline float name(float x, float y, float z) { return expr; }                    \
    inline half name(half a, half b, half c) {                                       \
        return (half)name((float)a, (float)b, (float)c);                             \
    }                                                                                \
    __CAMEL_TERNARY_V(float2, name) __CAMEL_TERNARY_V(float3, name)                  \
    __CAMEL_TERNARY_V(float4, name) __CAMEL_TERNARY_V(half2, name)                   \
    __CAMEL_TERNARY_V(half3, name) __CAMEL_TERNARY_V(half4, name)

__CAMEL_UNARY(fabs, __builtin_fabsf(x))
__CAMEL_UNARY(sqrt, __builtin_sqrtf(x))
__CAMEL_UNARY(rsqrt, 1.0f / __builtin_sqrtf(x))
__CAMEL_UNARY(exp, __builtin_expf(x))
__CAMEL_UNARY(exp2, __builtin_exp2f(x))
__CAMEL_UNARY(exp10, __builtin_powf(10.0f, x))
__CAMEL_UNARY(log, __builtin_logf(x))
__CAMEL_UNARY(log2, __builtin_log2f(x))
__CAMEL_UNARY(log10, __builtin_log10f(x))
__CAMEL_UNARY(sin, __builtin_sinf(x))
__CAMEL_UNARY(cos, __builtin_cosf(x))
__CAMEL_UNARY(tan, __builtin_tanf(x))
__CAMEL_UNARY(asin, __builtin_asinf(x))
__CAMEL_UNARY(acos, __builtin_acosf(x))
__CAMEL_UNARY(atan, __builtin_atanf(x))
__CAMEL_UNARY(sinh, __builtin_sinhf(x))
__CAMEL_UNARY(cosh, __builtin_coshf(x))
__CAMEL_UNARY(tanh, __builtin_tanhf(x))
__CAMEL_UNARY(asinh, __builtin_asinhf(x))
__CAMEL_UNARY(acosh, __builtin_acoshf(x))
__CAMEL_UNARY(atanh, __builtin_atanhf(x))
__CAMEL_UNARY(sinpi, __builtin_sinf(x * M_PI_F))
__CAMEL_UNARY(cospi, __builtin_cosf(x * M_PI_F))
__CAMEL_UNARY(tanpi, __builtin_tanf(x * M_PI_F))
__CAMEL_UNARY(floor, __builtin_floorf(x))
__CAMEL_UNARY(ceil, __builtin_ceilf(x))
__CAMEL_UNARY(round, __builtin_roundf(x))
__CAMEL_UNARY(rint, __builtin_rintf(x))
__CAMEL_UNARY(trunc, __builtin_truncf(x))
// fract(x) = x - floor(x), kept below 1 (MSL: fmin(x - floor(x), 0x1.fffffep-1f)).
__CAMEL_UNARY(fract, __builtin_fminf(x - __builtin_floorf(x), 0x1.fffffep-1f))
__CAMEL_UNARY(saturate, __builtin_fminf(__builtin_fmaxf(x, 0.0f), 1.0f))
__CAMEL_UNARY(sign, x > 0.0f ? 1.0f : x < 0.0f ? -1.0f : (x != x ? 0.0f : x))

__CAMEL_BINARY(pow, __builtin_powf(x, y))
__CAMEL_BINARY(powr, __builtin_powf(x, y))
__CAMEL_BINARY(atan2, __builtin_atan2f(x, y))
__CAMEL_BINARY(fmod, __builtin_fmodf(x, y))
__CAMEL_BINARY(fmin, __builtin_fminf(x, y))
__CAMEL_BINARY(fmax, __builtin_fmaxf(x, y))
__CAMEL_BINARY(copysign, __builtin_copysignf(x, y))
__CAMEL_BINARY(fdim, x > y ? x - y : 0.0f)
__CAMEL_BINARY(step, y < x ? 0.0f : 1.0f)  // step(edge, x)
__CAMEL_BINARY(divide, x / y)
__CAMEL_BINARY(nextafter, __builtin_nextafterf(x, y))

__CAMEL_TERNARY(fma, __builtin_fmaf(x, y, z))
__CAMEL_TERNARY(mad, x * y + z)
__CAMEL_TERNARY(mix, x + (y - x) * z)  // mix(x, y, a)
__CAMEL_TERNARY(fclamp, __builtin_fminf(__builtin_fmaxf(x, y), z))
// smoothstep(edge0, edge1, x)
inline float __camel_smoothstep(float e0, float e1, float v) {
    float t = __builtin_fminf(__builtin_fmaxf((v - e0) / (e1 - e0), 0.0f), 1.0f);
    return t * t * (3.0f - 2.0f * t);
}
__CAMEL_TERNARY(smoothstep, __camel_smoothstep(x, y, z))

// min/max/clamp/abs for floats (NaN-ignoring like fmin/fmax) and integers.
__CAMEL_BINARY(min, __builtin_fminf(x, y))
__CAMEL_BINARY(max, __builtin_fmaxf(x, y))
__CAMEL_TERNARY(clamp, __builtin_fminf(__builtin_fmaxf(x, y), z))
__CAMEL_UNARY(abs, __builtin_fabsf(x))

#define __CAMEL_INT_MINMAX(T)                                                         \
    inline T min(T a, T b) { return b < a ? b : a; }                                 \
    inline T max(T a, T b) { return a < b ? b : a; }                                 \
    inline T clamp(T x, T lo, T hi) { return min(max(x, lo), hi); }                  \
    inline T abs(T x) { return x < (T)0 ? (T)(0 - x) : x; }                          \
    inline T absdiff(T a, T b) { return a < b ? (T)(b - a) : (T)(a - b); }
__CAMEL_ISCALARS(__CAMEL_INT_MINMAX)
#define __CAMEL_INT_MINMAX_V(V)                                                       \
    __CAMEL_BINARY_V(V, min) __CAMEL_BINARY_V(V, max) __CAMEL_TERNARY_V(V, clamp)    \
    __CAMEL_BINARY_V(V, absdiff)                                                     \
    inline V abs(V v) {                                                              \
        V r;                                                                         \
        for (int i = 0; i < __camel_vt<V>::n; i++) r[i] = abs(v[i]);                 \
        return r;                                                                    \
    }
__CAMEL_IVECS(__CAMEL_INT_MINMAX_V)

// Functions returning a second result through a reference (MSL 6.5, Table 6.4: T sincos(T x,
// T &cosval), T modf(T x, T &intval), T frexp(T x, Ti &exponent); T half or float, scalar or
// vector, Ti int of T's width). The reference's address space is unwritten, so it is thread
// (MSL before 4.1): Apple's compiler rejects device and threadgroup memory there ("address
// space mismatch in 2nd argument"). One overload per type, in thread memory for the typed
// check (camel_check_msl.h), so that clang names the space in its note; translate.cpp reads
// those notes for these three functions.
#ifdef __CAMEL_TYPED_CHECK
#define __CAMEL_THREAD_REF __private
#else
#define __CAMEL_THREAD_REF
#endif
inline float sincos(float x, __CAMEL_THREAD_REF float &c) {
    c = __builtin_cosf(x);
    return __builtin_sinf(x);
}
// modf: both parts carry x's sign (modf(-2) is -0 and -2), and an infinity's fraction is 0
inline float modf(float x, __CAMEL_THREAD_REF float &ip) {
    ip = __builtin_truncf(x);
    return __builtin_copysignf(__builtin_isinf(x) ? 0.0f : x - ip, x);
}
inline float frexp(float x, __CAMEL_THREAD_REF int &e) { return __builtin_frexpf(x, &e); }
inline half sincos(half x, __CAMEL_THREAD_REF half &c) {
    float cf, s = sincos((float)x, cf);
    c = (half)cf;
    return (half)s;
}
inline half modf(half x, __CAMEL_THREAD_REF half &ip) {
    float i, f = modf((float)x, i);
    ip = (half)i;
    return (half)f;
}
inline half frexp(half x, __CAMEL_THREAD_REF int &e) { return (half)frexp((float)x, e); }
#ifdef __CAMEL_TYPED_CHECK  // declarations, written out: clang's notes then point at them
float2 sincos(float2 x, __private float2 &cosval);
float2 modf(float2 x, __private float2 &intval);
float2 frexp(float2 x, __private int2 &exponent);
float3 sincos(float3 x, __private float3 &cosval);
float3 modf(float3 x, __private float3 &intval);
float3 frexp(float3 x, __private int3 &exponent);
float4 sincos(float4 x, __private float4 &cosval);
float4 modf(float4 x, __private float4 &intval);
float4 frexp(float4 x, __private int4 &exponent);
half2 sincos(half2 x, __private half2 &cosval);
half2 modf(half2 x, __private half2 &intval);
half2 frexp(half2 x, __private int2 &exponent);
half3 sincos(half3 x, __private half3 &cosval);
half3 modf(half3 x, __private half3 &intval);
half3 frexp(half3 x, __private int3 &exponent);
half4 sincos(half4 x, __private half4 &cosval);
half4 modf(half4 x, __private half4 &intval);
half4 frexp(half4 x, __private int4 &exponent);
#else
#define __CAMEL_SECOND_RESULT_V(V, I)                                                 \
    inline V sincos(V x, V &c) {                                                      \
        V s;                                                                          \
        for (int i = 0; i < __camel_vt<V>::n; i++) {                                  \
            typename __camel_vt<V>::elem ci;                                          \
            s[i] = sincos(x[i], ci);                                                  \
            c[i] = ci;                                                                \
        }                                                                             \
        return s;                                                                     \
    }                                                                                 \
    inline V modf(V x, V &ip) {                                                       \
        V f;                                                                          \
        for (int i = 0; i < __camel_vt<V>::n; i++) {                                  \
            typename __camel_vt<V>::elem w;                                           \
            f[i] = modf(x[i], w);                                                     \
            ip[i] = w;                                                                \
        }                                                                             \
        return f;                                                                     \
    }                                                                                 \
    inline V frexp(V x, I &e) {                                                       \
        V m;                                                                          \
        for (int i = 0; i < __camel_vt<V>::n; i++) {                                  \
            int ei;                                                                   \
            m[i] = frexp(x[i], ei);                                                   \
            e[i] = ei;                                                                \
        }                                                                             \
        return m;                                                                     \
    }
__CAMEL_SECOND_RESULT_V(float2, int2)
__CAMEL_SECOND_RESULT_V(float3, int3)
__CAMEL_SECOND_RESULT_V(float4, int4)
__CAMEL_SECOND_RESULT_V(half2, int2)
__CAMEL_SECOND_RESULT_V(half3, int3)
__CAMEL_SECOND_RESULT_V(half4, int4)
#undef __CAMEL_SECOND_RESULT_V
#endif
#undef __CAMEL_THREAD_REF
inline float ldexp(float x, int e) { return __builtin_ldexpf(x, e); }
inline int ilogb(float x) { return __builtin_ilogbf(x); }

// ---------------------------------------------------------------------------
// Relational
// ---------------------------------------------------------------------------
inline bool isnan(float x) { return __builtin_isnan(x); }
inline bool isnan(half x) { return __builtin_isnan((float)x); }
inline bool isinf(float x) { return __builtin_isinf(x); }
inline bool isinf(half x) { return __builtin_isinf((float)x); }
inline bool isfinite(float x) { return __builtin_isfinite(x); }
inline bool isfinite(half x) { return __builtin_isfinite((float)x); }
inline bool isnormal(float x) { return __builtin_isnormal(x); }
inline bool signbit(float x) { return __builtin_signbit(x); }
inline bool signbit(half x) { return __builtin_signbit((float)x); }
#define __CAMEL_REL_V(name)                                                           \
    template <class V, __camel_if_fvec<V> = 0>                                       \
    inline typename __camel_rebind<V, bool>::type name(V v) {                        \
        typename __camel_rebind<V, bool>::type r;                                    \
        for (int i = 0; i < __camel_vt<V>::n; i++) r[i] = name(v[i]);                \
        return r;                                                                    \
    }
__CAMEL_REL_V(isnan)
__CAMEL_REL_V(isinf)
__CAMEL_REL_V(isfinite)
__CAMEL_REL_V(signbit)

// all/any take bool vectors; comparisons of vectors give int masks in clang
// (-1 for true), so they are accepted too.
inline bool all(bool b) { return b; }
inline bool any(bool b) { return b; }
template <class V, __camel_if_vec<V> = 0> inline bool all(V v) {
    for (int i = 0; i < __camel_vt<V>::n; i++)
        if (!v[i]) return false;
    return true;
}
template <class V, __camel_if_vec<V> = 0> inline bool any(V v) {
    for (int i = 0; i < __camel_vt<V>::n; i++)
        if (v[i]) return true;
    return false;
}
// select(a, b, c): c ? b : a, per component when c is a vector.
template <class T, class C> inline T select(T a, __camel_identity_t<T> b, C c) {
    if constexpr (__camel_vt<C>::n == 1) {
        return c ? b : a;
    } else {
        T r;
        for (int i = 0; i < __camel_vt<T>::n; i++) r[i] = c[i] ? b[i] : a[i];
        return r;
    }
}

// ---------------------------------------------------------------------------
// Geometric
// ---------------------------------------------------------------------------
template <class V, __camel_if_fvec<V> = 0> inline typename __camel_vt<V>::elem dot(V a, V b) {
    float s = 0.0f;
    for (int i = 0; i < __camel_vt<V>::n; i++) s += (float)a[i] * (float)b[i];
    return (typename __camel_vt<V>::elem)s;
}
template <class V, __camel_if_fvec<V> = 0> inline typename __camel_vt<V>::elem length_squared(V a) {
    return dot(a, a);
}
template <class V, __camel_if_fvec<V> = 0> inline typename __camel_vt<V>::elem length(V a) {
    return (typename __camel_vt<V>::elem)__builtin_sqrtf((float)dot(a, a));
}
template <class V, __camel_if_fvec<V> = 0> inline typename __camel_vt<V>::elem distance(V a, V b) {
    return length(a - b);
}
template <class V, __camel_if_fvec<V> = 0>
inline typename __camel_vt<V>::elem distance_squared(V a, V b) {
    return length_squared(a - b);
}
template <class V, __camel_if_fvec<V> = 0> inline V normalize(V a) {
    return a * (typename __camel_vt<V>::elem)(1.0f / __builtin_sqrtf((float)dot(a, a)));
}
inline float3 cross(float3 a, float3 b) { return a.yzx * b.zxy - a.zxy * b.yzx; }
inline half3 cross(half3 a, half3 b) { return a.yzx * b.zxy - a.zxy * b.yzx; }
template <class V, __camel_if_fvec<V> = 0> inline V reflect(V i, V n) { return i - 2 * dot(n, i) * n; }

// ---------------------------------------------------------------------------
// Integer functions
// ---------------------------------------------------------------------------
template <class T> inline T __camel_popcount(T x) {
    return (T)__builtin_popcountll((unsigned long long)x & (~0ull >> (64 - 8 * sizeof(T))));
}
template <class T> inline T __camel_clz(T x) {
    unsigned long long u = (unsigned long long)x & (~0ull >> (64 - 8 * sizeof(T)));
    return (T)(u == 0 ? 8 * sizeof(T) : __builtin_clzll(u) - (64 - 8 * sizeof(T)));
}
template <class T> inline T __camel_ctz(T x) {
    unsigned long long u = (unsigned long long)x & (~0ull >> (64 - 8 * sizeof(T)));
    return (T)(u == 0 ? 8 * sizeof(T) : __builtin_ctzll(u));
}
template <class T> inline T __camel_mulhi(T a, T b) {
    if constexpr (sizeof(T) == 8) {
        if constexpr ((T)-1 < (T)0)
            return (T)(((__int128)a * (__int128)b) >> 64);
        else
            return (T)(((unsigned __int128)a * (unsigned __int128)b) >> 64);
    } else {
        return (T)(((long long)a * (long long)b) >> (8 * sizeof(T)));
    }
}
template <class T> inline T __camel_reverse_bits(T x) {
    T r = 0;
    for (unsigned i = 0; i < 8 * sizeof(T); i++)
        if ((x >> i) & 1) r |= (T)((T)1 << (8 * sizeof(T) - 1 - i));
    return r;
}
template <class T> inline T __camel_rotate(T v, T i) {
    typedef decltype(+v) P;
    constexpr unsigned bits = 8 * sizeof(T);
    unsigned long long u = (unsigned long long)v & (~0ull >> (64 - bits));
    unsigned s = (unsigned)i % bits;
    if (s == 0) return v;
    return (T)(P)((u << s) | (u >> (bits - s)));
}
#define __CAMEL_INT_FN(T)                                                             \
    inline T popcount(T x) { return __camel_popcount(x); }                           \
    inline T clz(T x) { return __camel_clz(x); }                                     \
    inline T ctz(T x) { return __camel_ctz(x); }                                     \
    inline T mulhi(T a, T b) { return __camel_mulhi(a, b); }                         \
    inline T madhi(T a, T b, T c) { return (T)(__camel_mulhi(a, b) + c); }           \
    inline T reverse_bits(T x) { return __camel_reverse_bits(x); }                   \
    inline T rotate(T v, T i) { return __camel_rotate(v, i); }                       \
    inline T hadd(T a, T b) { return (T)(((long long)a + (long long)b) >> 1); }      \
    inline T rhadd(T a, T b) { return (T)(((long long)a + (long long)b + 1) >> 1); }
__CAMEL_ISCALARS(__CAMEL_INT_FN)
#define __CAMEL_INT_FN_V1(V, name)                                                    \
    inline V name(V v) {                                                             \
        V r;                                                                         \
        for (int i = 0; i < __camel_vt<V>::n; i++) r[i] = name(v[i]);                \
        return r;                                                                    \
    }
#define __CAMEL_INT_FN_V(V)                                                           \
    __CAMEL_INT_FN_V1(V, popcount) __CAMEL_INT_FN_V1(V, clz) __CAMEL_INT_FN_V1(V, ctz) \
    __CAMEL_INT_FN_V1(V, reverse_bits) __CAMEL_BINARY_V(V, mulhi)                    \
    __CAMEL_BINARY_V(V, rotate) __CAMEL_BINARY_V(V, hadd) __CAMEL_BINARY_V(V, rhadd)    \
    __CAMEL_TERNARY_V(V, madhi)
__CAMEL_IVECS(__CAMEL_INT_FN_V)
inline uint extract_bits(uint x, uint offset, uint bits) {
    return bits == 0 ? 0u : bits >= 32 ? x : (x >> offset) & ((1u << bits) - 1u);
}
inline int extract_bits(int x, uint offset, uint bits) {
    if (bits == 0) return 0;
    return (int)((unsigned)x << (32 - offset - bits)) >> (32 - bits);
}
inline uint insert_bits(uint base, uint insert, uint offset, uint bits) {
    uint mask = (bits >= 32 ? ~0u : ((1u << bits) - 1u)) << offset;
    return (base & ~mask) | ((insert << offset) & mask);
}

// ---------------------------------------------------------------------------
// as_type, numeric_limits, array
// ---------------------------------------------------------------------------
template <class T, class U> inline T as_type(U x) {
    static_assert(sizeof(T) == sizeof(U), "as_type: source and destination sizes differ");
    return __builtin_bit_cast(T, x);
}

template <class T> struct numeric_limits;
#define __CAMEL_LIMITS_INT(T, lo, hi)                                                 \
    template <> struct numeric_limits<T> {                                           \
        static constexpr bool is_specialized = true;                                 \
        static constexpr bool is_signed = (T)-1 < (T)0;                              \
        static constexpr bool is_integer = true;                                     \
        static constexpr int digits = 8 * sizeof(T) - ((T)-1 < (T)0);                \
        static constexpr T min() { return lo; }                                      \
        static constexpr T lowest() { return lo; }                                   \
        static constexpr T max() { return hi; }                                      \
    };
__CAMEL_LIMITS_INT(char, (char)-128, (char)127)
__CAMEL_LIMITS_INT(uchar, (uchar)0, (uchar)255)
__CAMEL_LIMITS_INT(signed char, (signed char)-128, (signed char)127)  // int8_t
__CAMEL_LIMITS_INT(short, (short)-32768, (short)32767)
__CAMEL_LIMITS_INT(ushort, (ushort)0, (ushort)65535)
__CAMEL_LIMITS_INT(int, INT_MIN, INT_MAX)
__CAMEL_LIMITS_INT(uint, 0u, UINT_MAX)
__CAMEL_LIMITS_INT(long, LONG_MIN, LONG_MAX)
__CAMEL_LIMITS_INT(ulong, 0ul, ULONG_MAX)
__CAMEL_LIMITS_INT(bool, false, true)
template <> struct numeric_limits<float> {
    static constexpr bool is_specialized = true;
    static constexpr bool is_signed = true;
    static constexpr bool is_integer = false;
    static constexpr int digits = 24;
    static constexpr float min() { return FLT_MIN; }
    static constexpr float lowest() { return -FLT_MAX; }
    static constexpr float max() { return FLT_MAX; }
    static constexpr float epsilon() { return FLT_EPSILON; }
    static constexpr float infinity() { return __builtin_inff(); }
    static constexpr float quiet_NaN() { return __builtin_nanf(""); }
    static constexpr float denorm_min() { return 0x1.0p-149f; }
};
template <> struct numeric_limits<half> {
    static constexpr bool is_specialized = true;
    static constexpr bool is_signed = true;
    static constexpr bool is_integer = false;
    static constexpr int digits = 11;
    static constexpr half min() { return (half)0x1.0p-14f; }
    static constexpr half lowest() { return (half)-65504.0f; }
    static constexpr half max() { return (half)65504.0f; }
    static constexpr half epsilon() { return (half)0x1.0p-10f; }
    static constexpr half infinity() { return (half)__builtin_inff(); }
    static constexpr half quiet_NaN() { return (half)__builtin_nanf(""); }
    static constexpr half denorm_min() { return (half)0x1.0p-24f; }
};

template <class T, size_t N> struct array {
    T __elems[N];
    T &operator[](size_t i) { return __elems[i]; }
    const T &operator[](size_t i) const { return __elems[i]; }
    static constexpr size_t size() { return N; }
    T *data() { return __elems; }
    const T *data() const { return __elems; }
    T *begin() { return __elems; }
    T *end() { return __elems + N; }
};

// ---------------------------------------------------------------------------
// fast:: and precise:: spell the same functions (the simulator computes
// every function to float accuracy)
// ---------------------------------------------------------------------------
#define __CAMEL_MATH_NAMES(M)                                                         \
    M(fabs) M(abs) M(sqrt) M(rsqrt) M(exp) M(exp2) M(exp10) M(log) M(log2) M(log10)   \
    M(sin) M(cos) M(tan) M(asin) M(acos) M(atan) M(sinh) M(cosh) M(tanh) M(asinh)    \
    M(acosh) M(atanh) M(sinpi) M(cospi) M(tanpi) M(floor) M(ceil) M(round) M(rint)   \
    M(trunc) M(fract) M(saturate) M(sign) M(pow) M(powr) M(atan2) M(fmod) M(fmin)    \
    M(fmax) M(copysign) M(fdim) M(step) M(divide) M(fma) M(mad) M(mix) M(smoothstep) \
    M(min) M(max) M(clamp) M(sincos) M(modf) M(frexp) M(ldexp) M(length)             \
    M(distance) M(normalize) M(dot) M(cross) M(length_squared)
#define __CAMEL_USING(name) using metal::name;
namespace fast { __CAMEL_MATH_NAMES(__CAMEL_USING) }
namespace precise { __CAMEL_MATH_NAMES(__CAMEL_USING) }
#undef __CAMEL_USING

// ---------------------------------------------------------------------------
// Atomics. atomic<T> holds a T; every operation is a real atomic on it,
// because different threadgroups run on different worker threads.
// ---------------------------------------------------------------------------
enum memory_order {
    memory_order_relaxed = __ATOMIC_RELAXED,
    memory_order_acquire = __ATOMIC_ACQUIRE,
    memory_order_release = __ATOMIC_RELEASE,
    memory_order_acq_rel = __ATOMIC_ACQ_REL,
    memory_order_seq_cst = __ATOMIC_SEQ_CST,
};
enum class thread_scope { thread_scope_thread, thread_scope_simdgroup, thread_scope_threadgroup,
                          thread_scope_device };

template <class T> struct atomic { T __value; };

template <class T> inline void atomic_store_explicit(volatile atomic<T> *o, __camel_identity_t<T> v,
                                                     memory_order = memory_order_relaxed) {
#ifdef __CAMEL_CUDA__  // NVPTX has no atomic store instruction: an exchange
    T old;
    __atomic_exchange(&o->__value, &v, &old, __ATOMIC_SEQ_CST);
#else
    __atomic_store(&o->__value, &v, __ATOMIC_SEQ_CST);
#endif
}
template <class T> inline T atomic_load_explicit(const volatile atomic<T> *o,
                                                 memory_order = memory_order_relaxed) {
#ifdef __CAMEL_CUDA__  // a volatile load is a relaxed atomic load in PTX (ld.volatile)
    return *(const volatile T *)&o->__value;
#else
    T r;
    __atomic_load(&o->__value, &r, __ATOMIC_SEQ_CST);
    return r;
#endif
}
template <class T> inline T atomic_exchange_explicit(volatile atomic<T> *o, __camel_identity_t<T> v,
                                                     memory_order = memory_order_relaxed) {
    if constexpr (__camel_is_float<T>::value) {
        T old;
        __atomic_exchange(&o->__value, &v, &old, __ATOMIC_SEQ_CST);
        return old;
    } else {
        return __atomic_exchange_n(&o->__value, v, __ATOMIC_SEQ_CST);
    }
}
template <class T>
inline bool atomic_compare_exchange_weak_explicit(volatile atomic<T> *o, T *expected,
                                                  __camel_identity_t<T> desired,
                                                  memory_order = memory_order_relaxed,
                                                  memory_order = memory_order_relaxed) {
    return __atomic_compare_exchange(&o->__value, expected, &desired, false, __ATOMIC_SEQ_CST,
                                     __ATOMIC_SEQ_CST);
}
template <class T>
inline bool atomic_compare_exchange_strong_explicit(volatile atomic<T> *o, T *expected,
                                                    __camel_identity_t<T> desired,
                                                    memory_order = memory_order_relaxed,
                                                    memory_order = memory_order_relaxed) {
    return __atomic_compare_exchange(&o->__value, expected, &desired, false, __ATOMIC_SEQ_CST,
                                     __ATOMIC_SEQ_CST);
}
// Read-modify-write through a compare-exchange loop (works for float too).
template <class T, class F> inline T __camel_atomic_rmw(volatile atomic<T> *o, F f) {
    T old, want;
#ifdef __CAMEL_CUDA__
    old = *(volatile T *)&o->__value;
#else
    __atomic_load(&o->__value, &old, __ATOMIC_RELAXED);
#endif
    do {
        want = f(old);
    } while (!__atomic_compare_exchange(&o->__value, &old, &want, true, __ATOMIC_SEQ_CST,
                                        __ATOMIC_RELAXED));
    return old;
}
template <class T> inline T atomic_fetch_add_explicit(volatile atomic<T> *o, __camel_identity_t<T> v,
                                                      memory_order = memory_order_relaxed) {
    if constexpr (__camel_is_float<T>::value)
        return __camel_atomic_rmw(o, [v](T x) { return (T)(x + v); });
    else
        return __atomic_fetch_add(&o->__value, v, __ATOMIC_SEQ_CST);
}
template <class T> inline T atomic_fetch_sub_explicit(volatile atomic<T> *o, __camel_identity_t<T> v,
                                                      memory_order = memory_order_relaxed) {
    if constexpr (__camel_is_float<T>::value)
        return __camel_atomic_rmw(o, [v](T x) { return (T)(x - v); });
    else
        return __atomic_fetch_sub(&o->__value, v, __ATOMIC_SEQ_CST);
}
template <class T> inline T atomic_fetch_min_explicit(volatile atomic<T> *o, __camel_identity_t<T> v,
                                                      memory_order = memory_order_relaxed) {
    static_assert(!__camel_is_float<T>::value,
                  "MSL: atomic_float has no fetch_min/fetch_max (only load, store, exchange, "
                  "compare_exchange, fetch_add and fetch_sub)");
    return __camel_atomic_rmw(o, [v](T x) { return v < x ? v : x; });
}
template <class T> inline T atomic_fetch_max_explicit(volatile atomic<T> *o, __camel_identity_t<T> v,
                                                      memory_order = memory_order_relaxed) {
    static_assert(!__camel_is_float<T>::value,
                  "MSL: atomic_float has no fetch_min/fetch_max (only load, store, exchange, "
                  "compare_exchange, fetch_add and fetch_sub)");
    return __camel_atomic_rmw(o, [v](T x) { return x < v ? v : x; });
}
template <class T> inline T atomic_fetch_and_explicit(volatile atomic<T> *o, __camel_identity_t<T> v,
                                                      memory_order = memory_order_relaxed) {
    static_assert(!__camel_is_float<T>::value,
                  "MSL: atomic_float has no fetch_and/fetch_or/fetch_xor (only load, store, "
                  "exchange, compare_exchange, fetch_add and fetch_sub)");
    return __atomic_fetch_and(&o->__value, v, __ATOMIC_SEQ_CST);
}
template <class T> inline T atomic_fetch_or_explicit(volatile atomic<T> *o, __camel_identity_t<T> v,
                                                     memory_order = memory_order_relaxed) {
    static_assert(!__camel_is_float<T>::value,
                  "MSL: atomic_float has no fetch_and/fetch_or/fetch_xor (only load, store, "
                  "exchange, compare_exchange, fetch_add and fetch_sub)");
    return __atomic_fetch_or(&o->__value, v, __ATOMIC_SEQ_CST);
}
template <class T> inline T atomic_fetch_xor_explicit(volatile atomic<T> *o, __camel_identity_t<T> v,
                                                      memory_order = memory_order_relaxed) {
    static_assert(!__camel_is_float<T>::value,
                  "MSL: atomic_float has no fetch_and/fetch_or/fetch_xor (only load, store, "
                  "exchange, compare_exchange, fetch_add and fetch_sub)");
    return __atomic_fetch_xor(&o->__value, v, __ATOMIC_SEQ_CST);
}

// ---------------------------------------------------------------------------
// Barriers' flags, and SIMD-group votes: the functions that take and return them
// are each target's (camel_sim_simd.h, camel_cuda_simd.h; see the top of this file)
// ---------------------------------------------------------------------------
enum class mem_flags : uint {
    mem_none = 0,
    mem_device = 1,
    mem_threadgroup = 2,
    mem_texture = 4,
    mem_threadgroup_imageblock = 8,
    mem_object_data = 16,
};
inline constexpr mem_flags operator|(mem_flags a, mem_flags b) { return (mem_flags)((uint)a | (uint)b); }

// Votes: bit i set when active lane i passed true (the simulator and the CUDA shim).
struct simd_vote {
    typedef ulong vote_t;
    vote_t __bits;
    vote_t __active;
    explicit constexpr simd_vote(vote_t v = 0) : __bits(v), __active(~0ul >> 32) {}
    constexpr simd_vote(vote_t v, vote_t active) : __bits(v), __active(active) {}
    explicit constexpr operator vote_t() const { return __bits; }
    constexpr bool all() const { return (__bits & __active) == __active; }
    constexpr bool any() const { return __bits != 0; }
};
struct quad_vote {
    typedef ushort vote_t;
    vote_t __bits;
    vote_t __active;
    explicit constexpr quad_vote(vote_t v = 0) : __bits(v), __active(15) {}
    constexpr quad_vote(vote_t v, vote_t active) : __bits(v), __active(active) {}
    explicit constexpr operator vote_t() const { return __bits; }
    constexpr bool all() const { return (__bits & __active) == __active; }
    constexpr bool any() const { return __bits != 0; }
};

// The operators of the SIMD-group and quad-group reductions and scans (each target's
// simd_sum, quad_prefix_exclusive_product, ...); unit: the identity of a scan.
struct __camel_op_sum { template <class T> static T f(T a, T b) { return a + b; } static constexpr int unit = 0; };
struct __camel_op_product { template <class T> static T f(T a, T b) { return a * b; } static constexpr int unit = 1; };
struct __camel_op_min { template <class T> static T f(T a, T b) { return metal::min(a, b); } };
struct __camel_op_max { template <class T> static T f(T a, T b) { return metal::max(a, b); } };
struct __camel_op_and { template <class T> static T f(T a, T b) { return a & b; } };
struct __camel_op_or { template <class T> static T f(T a, T b) { return a | b; } };
struct __camel_op_xor { template <class T> static T f(T a, T b) { return a ^ b; } };

#include "camel_sim_types.h"  // traits, matrices, uniform<T>, bfloat
}  // namespace metal
#define __CAMEL_USING_MATRICES(T)                                                              \
    using metal::T##2x2; using metal::T##2x3; using metal::T##2x4; using metal::T##3x2;        \
    using metal::T##3x3; using metal::T##3x4; using metal::T##4x2; using metal::T##4x3;        \
    using metal::T##4x4;
__CAMEL_USING_MATRICES(float)
__CAMEL_USING_MATRICES(half)
#undef __CAMEL_USING_MATRICES
#ifdef __HAVE_BFLOAT__
using metal::bfloat;
using metal::bfloat2;
using metal::bfloat3;
using metal::bfloat4;
#endif

// MSL's atomic_int & co., as metal::atomic_int and without metal::.
namespace metal {
typedef atomic<int> atomic_int;
typedef atomic<uint> atomic_uint;
typedef atomic<float> atomic_float;
typedef atomic<bool> atomic_bool;
typedef atomic<ulong> atomic_ulong;
typedef atomic<long> atomic_long;
}  // namespace metal
using metal::atomic_int;
using metal::atomic_uint;
using metal::atomic_float;
using metal::atomic_bool;
using metal::atomic_ulong;
using metal::atomic_long;
using metal::memory_order;
using metal::memory_order_relaxed;
using metal::memory_order_acquire;
using metal::memory_order_release;
using metal::memory_order_acq_rel;
using metal::memory_order_seq_cst;
using metal::mem_flags;
