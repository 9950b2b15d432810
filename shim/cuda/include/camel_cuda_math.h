// camel_cuda_math.h — MSL's float math for the CUDA shim, without libdevice.
//
// clang compiles MSL-as-CUDA with -nocudalib, so a call such as
// __builtin_expf(x) has no implementation on the GPU ("no libcall available
// for fexp"). These are our own, written with operations PTX does exactly
// (add, mul, fma, div.rn, sqrt.rn, cvt.rni, bit casts), so they give the same
// result on the GPU as on the CPU, where shim/cuda/tests/math_ulp.cpp checks
// them against double-precision libm (Metal with fast math off promises
// exp, exp2, log, log2: 4 ulp; tanh, sin, cos, pow: 5 to 16 ulp).
//
//   hot in camel's kernels, in float:   exp, exp2, log, log2, tanh
//   the rest, through double:           pow, sin, cos, tan, asin, acos, atan,
//                                       atan2, sinh, cosh, asinh, acosh,
//                                       atanh, exp10, log10 (accurate, slower)
//   exact by bits:                      fmod, nextafter, frexp, ldexp, ilogb
//
// Plain C++ with no GPU intrinsics, so the same text compiles for the host
// test. Limits: sin/cos/tan reduce the argument with pi/2 in three parts, so
// they are accurate for |x| < 1.6e6 (Metal's own bound is |x| < 2^16 or so for
// fast math); beyond that the error grows.
#pragma once

namespace camel_cuda_math {

typedef unsigned int u32;
typedef unsigned long long u64;

inline float as_float(u32 u) { return __builtin_bit_cast(float, u); }
inline u32 as_u32(float f) { return __builtin_bit_cast(u32, f); }
inline double as_double(u64 u) { return __builtin_bit_cast(double, u); }
inline u64 as_u64(double d) { return __builtin_bit_cast(u64, d); }
inline float inf() { return __builtin_inff(); }
inline float nan() { return __builtin_nanf(""); }

// 2^n for a normal power of two (-126 <= n <= 127), and x * 2^n in two exact
// steps so that the result rounds once even when it is subnormal.
inline float pow2(int n) { return as_float((u32)(n + 127) << 23); }
inline float scale(float x, int n) {
    int a = n / 2;
    return x * pow2(a) * pow2(n - a);
}
// x * 2^n by adding n to x's exponent field: exact, and two integer operations, when x
// and the result are normal (the callers check the range first).
inline float scale_normal(float x, int n) { return as_float(as_u32(x) + ((u32)n << 23)); }
inline double pow2d(int n) { return as_double((u64)(n + 1023) << 52); }
inline double scaled(double x, int n) {
    int a = n / 2;
    return x * pow2d(a) * pow2d(n - a);
}

// exp(x) = 2^k exp(r), x = k ln2 + r, |r| <= ln2 / 2, exp(r) by its Taylor
// series to r^7 (truncation below 0.05 ulp). For |x| <= 86.5, k is in [-125, 125] and
// exp(r) in [0.7, 1.42], so 2^k exp(r) is normal and scale_normal is exact: the common
// case costs no range checks before it (a softmax's exp is most of its instructions).
inline float expf(float x) {
    float k = __builtin_rintf(x * 1.44269502162933349609375f);
    float r = __builtin_fmaf(k, -0.693147182464599609375f, x);  // ln2, high part
    r = __builtin_fmaf(k, 1.904654323148236e-09f, r);            // ln2, low part
    float p = 1.0f / 5040.0f;
    p = __builtin_fmaf(p, r, 1.0f / 720.0f);
    p = __builtin_fmaf(p, r, 1.0f / 120.0f);
    p = __builtin_fmaf(p, r, 1.0f / 24.0f);
    p = __builtin_fmaf(p, r, 1.0f / 6.0f);
    p = __builtin_fmaf(p, r, 0.5f);
    p = __builtin_fmaf(p, r, 1.0f);
    p = __builtin_fmaf(p, r, 1.0f);
    if (__builtin_fabsf(x) <= 86.5f) return scale_normal(p, (int)k);
    if (x != x) return x;
    if (x > 88.72283935546875f) return inf();
    if (x < -103.97208404541015625f) return 0.0f;
    return scale(p, (int)k);  // a subnormal result (or near overflow): rounded once
}

// exp2(x) = 2^k 2^r, k = rint(x), r = x - k exact, 2^r = exp(r ln2) by series; the
// range checks after the common case |x| <= 125, as in expf.
inline float exp2f(float x) {
    float k = __builtin_rintf(x);
    float r = x - k;
    float p = 1.3215486790144307e-06f;
    p = __builtin_fmaf(p, r, 1.525273380405984e-05f);
    p = __builtin_fmaf(p, r, 1.5403530393381608e-04f);
    p = __builtin_fmaf(p, r, 1.3333558146428443e-03f);
    p = __builtin_fmaf(p, r, 9.618129107628477e-03f);
    p = __builtin_fmaf(p, r, 5.550410866482158e-02f);
    p = __builtin_fmaf(p, r, 2.402265069591007e-01f);
    p = __builtin_fmaf(p, r, 6.931471805599453e-01f);
    p = __builtin_fmaf(p, r, 1.0f);
    if (__builtin_fabsf(x) <= 125.0f) return scale_normal(p, (int)k);
    if (x != x) return x;
    if (x >= 128.0f) return inf();
    if (x < -150.0f) return 0.0f;
    return scale(p, (int)k);
}

// x = m 2^e with m in [sqrt(1/2), sqrt(2)); log(m) = log(1 + f) from
// s = f / (2 + f) as in fdlibm: f - (f^2/2 - s (f^2/2 + R(s^2))).
inline float log_m(float x, int &e) {
    e = 0;
    if (x < 1.17549435e-38f) {  // subnormal: make it normal first
        x *= 8388608.0f;
        e = -23;
    }
    u32 b = as_u32(x);
    e += (int)((b >> 23) & 0xff) - 127;
    float m = as_float((b & 0x7fffffu) | 0x3f800000u);
    if (m > 1.41421356f) {
        m *= 0.5f;
        e++;
    }
    float f = m - 1.0f;
    float s = f / (2.0f + f);
    float z = s * s;
    float R = 2.0f / 13.0f;
    R = __builtin_fmaf(R, z, 2.0f / 11.0f);
    R = __builtin_fmaf(R, z, 2.0f / 9.0f);
    R = __builtin_fmaf(R, z, 2.0f / 7.0f);
    R = __builtin_fmaf(R, z, 2.0f / 5.0f);
    R = __builtin_fmaf(R, z, 2.0f / 3.0f);
    R *= z;
    float hfsq = 0.5f * f * f;
    return f - (hfsq - s * (hfsq + R));
}
inline bool log_special(float x, float &r) {
    if (x != x) r = x;
    else if (x < 0.0f) r = nan();
    else if (x == 0.0f) r = -inf();
    else if (x == inf()) r = x;
    else return false;
    return true;
}
inline float logf(float x) {
    float r;
    if (log_special(x, r)) return r;
    int e;
    float lm = log_m(x, e);
    return __builtin_fmaf((float)e, 0.693147182464599609375f,
                          __builtin_fmaf((float)e, -1.904654323148236e-09f, lm));
}
inline float log2f(float x) {
    float r;
    if (log_special(x, r)) return r;
    int e;
    float lm = log_m(x, e);
    return __builtin_fmaf(lm, 1.44269502162933349609375f,
                          __builtin_fmaf(lm, 1.925963033500011e-08f, (float)e));
}

// expm1(y) for |y| <= 1.1 by its Taylor series to y^11 (no cancellation).
inline float expm1_small(float y) {
    float p = 1.0f / 39916800.0f;
    p = __builtin_fmaf(p, y, 1.0f / 3628800.0f);
    p = __builtin_fmaf(p, y, 1.0f / 362880.0f);
    p = __builtin_fmaf(p, y, 1.0f / 40320.0f);
    p = __builtin_fmaf(p, y, 1.0f / 5040.0f);
    p = __builtin_fmaf(p, y, 1.0f / 720.0f);
    p = __builtin_fmaf(p, y, 1.0f / 120.0f);
    p = __builtin_fmaf(p, y, 1.0f / 24.0f);
    p = __builtin_fmaf(p, y, 1.0f / 6.0f);
    p = __builtin_fmaf(p, y, 0.5f);
    p = __builtin_fmaf(p, y, 1.0f);
    return p * y;
}
// tanh(a) = u / (u + 2) with u = expm1(2a) near 0, 1 - 2 / (exp(2a) + 1) above.
inline float tanhf(float x) {
    if (x != x) return x;
    float a = __builtin_fabsf(x), r;
    if (a > 9.1f) r = 1.0f;
    else if (a >= 0.55f) r = 1.0f - 2.0f / (expf(2.0f * a) + 1.0f);
    else if (a < 0x1p-12f) r = a;
    else {
        float u = expm1_small(2.0f * a);
        r = u / (u + 2.0f);
    }
    return __builtin_copysignf(r, x);
}

// ---- double-precision helpers for the less frequent functions -----------
inline double exp_d(double x) {
    if (x != x) return x;
    if (x > 709.0) return (double)inf();
    if (x < -745.0) return 0.0;
    double k = __builtin_rint(x * 1.4426950408889634);
    double r = x - k * 6.93147180369123816490e-01;  // fdlibm's ln2_hi (exact product)
    r = r - k * 1.90821492927058770002e-10;
    double p = 1.0 / 6227020800.0;  // 1/13!
    const double c[] = {1.0 / 479001600.0, 1.0 / 39916800.0, 1.0 / 3628800.0, 1.0 / 362880.0,
                        1.0 / 40320.0, 1.0 / 5040.0, 1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0,
                        1.0 / 6.0, 0.5, 1.0, 1.0};
    for (int i = 0; i < 13; i++) p = __builtin_fma(p, r, c[i]);
    return scaled(p, (int)k);
}
// log(x) for x > 0 (a float widened, so normal as a double); +inf -> +inf.
inline double log_d(double x) {
    if (x != x || x < 0.0) return (double)nan();
    if (x == 0.0) return -(double)inf();
    if (x == (double)inf()) return x;
    u64 b = as_u64(x);
    int e = (int)((b >> 52) & 0x7ff) - 1023;
    double m = as_double((b & 0xfffffffffffffull) | 0x3ff0000000000000ull);
    if (m > 1.4142135623730951) {
        m *= 0.5;
        e++;
    }
    double f = m - 1.0, s = f / (2.0 + f), z = s * s, R = 0.0;
    for (int i = 21; i >= 3; i -= 2) R = __builtin_fma(R, z, 2.0 / i);
    R *= z;
    double hfsq = 0.5 * f * f;
    double lm = f - (hfsq - s * (hfsq + R));
    return e * 6.93147180369123816490e-01 + (e * 1.90821492927058770002e-10 + lm);
}
// sin and cos of x = k pi/2 + r, |r| <= pi/4 (pi/2 in three parts, fdlibm's).
inline double reduce_pio2(double x, int &quadrant) {
    double k = __builtin_rint(x * 6.36619772367581382433e-01);
    double r = x - k * 1.57079632673412561417e+00;
    r = r - k * 6.07710050630396597660e-11;
    r = r - k * 2.02226624871116645580e-21;
    quadrant = (int)((long long)k & 3);
    return r;
}
inline double sin_poly(double r) {  // Taylor to r^17
    double z = r * r, p = 0.0;
    double d = 1.0;
    double c[9];
    for (int i = 0; i < 9; i++) {  // c[i] = (-1)^i / (2i+1)!
        c[i] = (i & 1 ? -1.0 : 1.0) / d;
        d *= (2 * i + 2) * (2 * i + 3);
    }
    for (int i = 8; i >= 0; i--) p = __builtin_fma(p, z, c[i]);
    return p * r;
}
inline double cos_poly(double r) {  // Taylor to r^18
    double z = r * r, p = 0.0;
    double d = 1.0;
    double c[10];
    for (int i = 0; i < 10; i++) {  // c[i] = (-1)^i / (2i)!
        c[i] = (i & 1 ? -1.0 : 1.0) / d;
        d *= (2 * i + 1) * (2 * i + 2);
    }
    for (int i = 9; i >= 0; i--) p = __builtin_fma(p, z, c[i]);
    return p;
}
inline double sin_d(double x) {
    int q;
    double r = reduce_pio2(x, q);
    double v = (q & 1) ? cos_poly(r) : sin_poly(r);
    return (q & 2) ? -v : v;
}
inline double cos_d(double x) {
    int q;
    double r = reduce_pio2(x, q);
    double v = (q & 1) ? sin_poly(r) : cos_poly(r);
    return ((q + 1) & 2) ? -v : v;
}
// atan: 1/x above 1, then two argument halvings to |a| <= tan(pi/16), series to a^23.
inline double atan_d(double x) {
    if (x != x) return x;
    double a = __builtin_fabs(x);
    bool invert = a > 1.0;
    if (a == (double)inf()) return __builtin_copysign(1.57079632679489661923, x);
    if (invert) a = 1.0 / a;
    for (int i = 0; i < 2; i++) a = a / (1.0 + __builtin_sqrt(1.0 + a * a));
    double z = a * a, p = 0.0;
    for (int i = 23; i >= 1; i -= 2) p = __builtin_fma(p, z, ((i / 2) & 1 ? -1.0 : 1.0) / i);
    double r = 4.0 * p * a;
    if (invert) r = 1.57079632679489661923 - r;
    return __builtin_copysign(r, x);
}
inline double atan2_d(double y, double x) {
    const double pi = 3.14159265358979323846;
    if (x != x || y != y) return x + y;
    if (y == 0.0) return __builtin_signbit(x) ? __builtin_copysign(pi, y) : y;
    if (x == 0.0) return __builtin_copysign(pi / 2, y);
    double ax = __builtin_fabs(x), ay = __builtin_fabs(y), r;
    if (ax == (double)inf() && ay == (double)inf()) r = pi / 4;
    else if (ax == (double)inf()) r = 0.0;
    else if (ay == (double)inf()) r = pi / 2;
    else r = ay > ax ? pi / 2 - atan_d(ax / ay) : atan_d(ay / ax);
    if (x < 0.0) r = pi - r;
    return __builtin_copysign(r, y);
}

// ---- the float functions that go through double ----------------------
inline bool is_odd_integer(float y) {
    float a = __builtin_fabsf(y);
    return a < 16777216.0f && __builtin_truncf(y) == y && ((long long)a & 1);
}
inline float powr_abs(float ax, float y) { return (float)exp_d((double)y * log_d((double)ax)); }
inline float powf(float x, float y) {
    if (y == 0.0f || x == 1.0f) return 1.0f;
    if (x != x || y != y) return x + y;
    if (x < 0.0f || (x == 0.0f && __builtin_signbit(x))) {
        bool integer = __builtin_truncf(y) == y;
        if (!integer && x != -inf()) return nan();
        float r = powr_abs(-x, y);
        return is_odd_integer(y) ? -r : r;
    }
    return powr_abs(x, y);
}
inline float powrf(float x, float y) { return x < 0.0f ? nan() : powf(x, y); }
inline float sinf(float x) { return x - x != 0.0f ? nan() : (float)sin_d(x); }
inline float cosf(float x) { return x - x != 0.0f ? nan() : (float)cos_d(x); }
inline float tanf(float x) {
    if (x - x != 0.0f) return nan();
    return (float)(sin_d(x) / cos_d(x));
}
inline float atanf(float x) { return (float)atan_d(x); }
inline float atan2f(float y, float x) { return (float)atan2_d(y, x); }
inline float asinf(float x) {
    if (!(__builtin_fabsf(x) <= 1.0f)) return nan();
    double d = x;
    return (float)atan2_d(d, __builtin_sqrt((1.0 - d) * (1.0 + d)));
}
inline float acosf(float x) {
    if (!(__builtin_fabsf(x) <= 1.0f)) return nan();
    double d = x;
    return (float)atan2_d(__builtin_sqrt((1.0 - d) * (1.0 + d)), d);
}
inline float sinhf(float x) {
    if (__builtin_fabsf(x) < 1e-4f) return x;  // x + x^3/6: below half an ulp
    double e = exp_d(x);
    return (float)(0.5 * (e - 1.0 / e));
}
inline float coshf(float x) {
    double e = exp_d(x);
    return (float)(0.5 * (e + 1.0 / e));
}
inline float asinhf(float x) {
    double a = __builtin_fabs((double)x);
    if (a < 1e-4) return x;
    if (a == (double)inf()) return x;
    return (float)__builtin_copysign(log_d(a + __builtin_sqrt(a * a + 1.0)), (double)x);
}
inline float acoshf(float x) {
    if (!(x >= 1.0f)) return nan();
    double d = x;
    if (x == inf()) return x;
    return (float)log_d(d + __builtin_sqrt((d - 1.0) * (d + 1.0)));
}
inline float atanhf(float x) {
    float a = __builtin_fabsf(x);
    if (!(a <= 1.0f)) return nan();
    if (a < 1e-4f) return x;
    double d = x;
    return (float)(0.5 * log_d((1.0 + d) / (1.0 - d)));
}
inline float exp10f(float x) { return (float)exp_d((double)x * 2.302585092994045684); }
inline float log10f(float x) {
    float r;
    if (log_special(x, r)) return r;
    return (float)(log_d(x) * 0.434294481903251827651);
}

// ---- exact, by bits -------------------------------------------------------
inline float fmodf(float x, float y) {
    float ax = __builtin_fabsf(x), ay = __builtin_fabsf(y);
    if (x != x || y != y || ax == inf() || ay == 0.0f) return nan();
    if (ax < ay) return x;
    // subtract y * 2^j (the largest not above r) until r < |y|; every step is exact
    double r = ax, d = ay;
    while (r >= d) {
        int er = (int)((as_u64(r) >> 52) & 0x7ff), ed = (int)((as_u64(d) >> 52) & 0x7ff);
        double t = scaled(d, er - ed);
        if (t > r) t *= 0.5;
        r -= t;
    }
    return __builtin_copysignf((float)r, x);
}
inline float nextafterf(float x, float y) {
    if (x != x || y != y) return x + y;
    if (x == y) return y;
    if (x == 0.0f) return __builtin_copysignf(as_float(1), y);
    u32 b = as_u32(x);
    b += ((x < y) == (x > 0.0f)) ? 1 : -1;
    return as_float(b);
}
inline int ilogbf(float x) {
    if (x != x) return -2147483647 - 1;  // FP_ILOGBNAN
    if (x == 0.0f) return -2147483647 - 1;  // FP_ILOGB0
    float a = __builtin_fabsf(x);
    if (a == inf()) return 2147483647;
    int e;
    if (a < 1.17549435e-38f) return (int)((as_u32(a * 8388608.0f) >> 23) & 0xff) - 127 - 23;
    e = (int)((as_u32(a) >> 23) & 0xff) - 127;
    return e;
}
inline float frexpf(float x, int *e) {
    if (x != x || x == 0.0f || __builtin_fabsf(x) == inf()) {
        *e = 0;
        return x;
    }
    int k = ilogbf(x) + 1;
    *e = k;
    return scale(x, -k);
}
inline float ldexpf(float x, int e) {  // exact in double, one rounding to float
    if (e > 400) e = 400;
    if (e < -400) e = -400;
    return (float)scaled((double)x, e);
}

}  // namespace camel_cuda_math
