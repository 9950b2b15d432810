// math_ulp.cpp — checks the CUDA shim's math (../include/camel_cuda_math.h) on
// the host, against double-precision libm, on many inputs.
//
//   clang++-19 -std=c++17 -O2 -ffp-contract=on -o math_ulp math_ulp.cpp -lm && ./math_ulp
//
// The header is plain C++ built from operations PTX does exactly (fma, div,
// sqrt, rint, bit casts), so the errors measured here are the GPU's too.
// Prints one line per function: name, inputs, max error in ulp, the worst
// input, and how many special values (NaN, inf, 0, domain edges) came out
// wrong. tests/test_cuda_translate.py runs it and checks the bounds.
#include <math.h>
#include <stdio.h>
#include <stdint.h>
#include <string.h>

#include "../include/camel_cuda_math.h"

namespace cm = camel_cuda_math;

// The error of f against the exact value r, in units of the float ulp at r
// (subnormal ulp below the normal range).
static double ulp_error(float f, double r) {
    if (isnan(r)) return isnan(f) ? 0.0 : 1e9;
    if (isinf(r)) return (isinf(f) && (f > 0) == (r > 0)) ? 0.0 : 1e9;
    if (isinf(f) || isnan(f)) {
        return fabs(r) > 3.4028234663852886e38 ? 0.0 : 1e9;  // r rounds to inf
    }
    int e;
    frexp(r, &e);  // r = m 2^e, m in [0.5, 1)
    if (e < -125) e = -125;
    double ulp = ldexp(1.0, e - 24);
    return fabs((double)f - r) / ulp;
}

static uint64_t rng = 0x9e3779b97f4a7c15ull;
static uint32_t next_u32() {
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (uint32_t)(rng >> 16);
}
static float uniform(float lo, float hi) { return lo + (hi - lo) * (float)((next_u32() >> 8) * (1.0 / 16777216.0)); }
static float any_float() {  // random bit patterns: every exponent
    uint32_t u = next_u32();
    float f;
    memcpy(&f, &u, 4);
    return f;
}

struct Result {
    double max_ulp = 0;
    float worst = 0;
    long n = 0;
};
static void add(Result &res, float x, float f, double r) {
    double u = ulp_error(f, r);
    res.n++;
    if (u > res.max_ulp || (u != u)) {
        res.max_ulp = u;
        res.worst = x;
    }
}

typedef float (*F1)(float);
typedef double (*D1)(double);
static void check1(const char *name, F1 f, D1 ref, float lo, float hi, const float *specials, int nspecial) {
    Result res;
    for (int i = 0; i < 400000; i++) {
        float x = i % 4 == 3 ? any_float() : uniform(lo, hi);
        if (isnan(x)) continue;
        if (i % 4 == 3 && !(x >= lo && x <= hi)) continue;  // random patterns within the range
        add(res, x, f(x), ref((double)x));
    }
    // near the ends and around 0 and 1, densely
    for (int i = 0; i < 20000; i++) {
        float x = uniform(-1.0f, 1.0f) * (i % 2 ? 1e-3f : 1.0f) + (i % 3 == 0 ? 1.0f : 0.0f);
        if (x >= lo && x <= hi) add(res, x, f(x), ref((double)x));
    }
    int bad = 0;
    for (int i = 0; i < nspecial; i++) {
        float x = specials[i];
        if (ulp_error(f(x), ref((double)x)) > 1.0) {
            bad++;
            printf("  special %s(%a) = %a, expected %a\n", name, x, f(x), ref((double)x));
        }
    }
    printf("%-8s n=%ld max_ulp=%.3f worst=%a specials_wrong=%d\n", name, res.n, res.max_ulp,
           res.worst, bad);
}

static double d_exp10(double x) { return pow(10.0, x); }
static double d_exp2(double x) { return exp2(x); }

int main() {
    const float inf = __builtin_inff(), nan = __builtin_nanf("");
    const float sp_exp[] = {0.0f, -0.0f, 1.0f, -1.0f, inf, -inf, nan, 88.7f, 88.73f, -87.3f, -103.9f, -104.0f, 1e-30f,
                            86.5f, -86.5f, 86.6f, -86.6f, -87.2f, 125.0f, -125.0f, -125.5f, -126.0f};
    const float sp_log[] = {0.0f, -0.0f, 1.0f, -1.0f, inf, -inf, nan, 1e-45f, 1e-40f, 3.4e38f, 2.0f, 0.5f};
    const float sp_tanh[] = {0.0f, -0.0f, inf, -inf, nan, 1e-30f, -1e-30f, 0.55f, 9.1f, 20.0f, -20.0f};
    const float sp_trig[] = {0.0f, -0.0f, inf, -inf, nan, 1.5707964f, 3.1415927f, 1e-30f};
    const float sp_inv[] = {0.0f, -0.0f, 1.0f, -1.0f, 1.0000001f, nan, inf, -inf};
    check1("exp", cm::expf, exp, -104.0f, 89.0f, sp_exp, sizeof sp_exp / 4);
    check1("exp2", cm::exp2f, d_exp2, -151.0f, 128.5f, sp_exp, sizeof sp_exp / 4);
    check1("exp10", cm::exp10f, d_exp10, -46.0f, 39.0f, sp_exp, sizeof sp_exp / 4);
    check1("log", cm::logf, log, 0.0f, 3.4e38f, sp_log, sizeof sp_log / 4);
    check1("log2", cm::log2f, log2, 0.0f, 3.4e38f, sp_log, sizeof sp_log / 4);
    check1("log10", cm::log10f, log10, 0.0f, 3.4e38f, sp_log, sizeof sp_log / 4);
    check1("tanh", cm::tanhf, tanh, -12.0f, 12.0f, sp_tanh, sizeof sp_tanh / 4);
    check1("sin", cm::sinf, sin, -1e5f, 1e5f, sp_trig, sizeof sp_trig / 4);
    check1("cos", cm::cosf, cos, -1e5f, 1e5f, sp_trig, sizeof sp_trig / 4);
    check1("tan", cm::tanf, tan, -1e4f, 1e4f, sp_trig, sizeof sp_trig / 4);
    check1("asin", cm::asinf, asin, -1.0f, 1.0f, sp_inv, sizeof sp_inv / 4);
    check1("acos", cm::acosf, acos, -1.0f, 1.0f, sp_inv, sizeof sp_inv / 4);
    check1("atan", cm::atanf, atan, -1e10f, 1e10f, sp_inv, sizeof sp_inv / 4);
    check1("sinh", cm::sinhf, sinh, -89.0f, 89.0f, sp_tanh, sizeof sp_tanh / 4);
    check1("cosh", cm::coshf, cosh, -89.0f, 89.0f, sp_tanh, sizeof sp_tanh / 4);
    check1("asinh", cm::asinhf, asinh, -1e30f, 1e30f, sp_tanh, sizeof sp_tanh / 4);
    check1("acosh", cm::acoshf, acosh, 1.0f, 1e30f, sp_inv, sizeof sp_inv / 4);
    check1("atanh", cm::atanhf, atanh, -1.0f, 1.0f, sp_inv, sizeof sp_inv / 4);

    // two-argument functions
    Result rp, ra, rf;
    int bad = 0;
    for (int i = 0; i < 400000; i++) {
        float x = uniform(0.0f, 100.0f), y = uniform(-20.0f, 20.0f);
        add(rp, x, cm::powf(x, y), pow((double)x, (double)y));
        float a = uniform(-100.0f, 100.0f), b = uniform(-100.0f, 100.0f);
        add(ra, a, cm::atan2f(a, b), atan2((double)a, (double)b));
        float p = any_float(), q = any_float();
        if (!isnan(p) && !isnan(q)) add(rf, p, cm::fmodf(p, q), fmod((double)p, (double)q));
    }
    const float pw[][2] = {{-2.0f, 3.0f}, {-2.0f, 2.0f}, {-2.0f, 0.5f}, {0.0f, -1.0f}, {-0.0f, -3.0f},
                           {0.0f, 2.0f}, {inf, -1.0f}, {inf, 2.0f}, {2.0f, inf}, {0.5f, inf},
                           {1.0f, nan}, {nan, 0.0f}, {-inf, 3.0f}, {-inf, 2.0f}, {10.0f, 38.5f}};
    for (auto &v : pw) {
        if (ulp_error(cm::powf(v[0], v[1]), pow((double)v[0], (double)v[1])) > 1.0) {
            bad++;
            printf("  special pow(%a, %a) = %a, expected %a\n", v[0], v[1], cm::powf(v[0], v[1]),
                   pow((double)v[0], (double)v[1]));
        }
    }
    printf("%-8s n=%ld max_ulp=%.3f worst=%a specials_wrong=%d\n", "pow", rp.n, rp.max_ulp, rp.worst, bad);
    printf("%-8s n=%ld max_ulp=%.3f worst=%a specials_wrong=%d\n", "atan2", ra.n, ra.max_ulp, ra.worst, 0);
    printf("%-8s n=%ld max_ulp=%.3f worst=%a specials_wrong=%d\n", "fmod", rf.n, rf.max_ulp, rf.worst, 0);

    // exact functions
    int wrong = 0;
    for (int i = 0; i < 200000; i++) {
        float x = any_float(), y = any_float();
        if (isnan(x) || isnan(y)) continue;
        int e1, e2;
        float m1 = cm::frexpf(x, &e1), m2 = frexpf(x, &e2);
        if (m1 != m2 || (e1 != e2 && x != 0.0f && !isinf(x))) wrong++;
        if (cm::nextafterf(x, y) != nextafterf(x, y)) wrong++;
        int k = (int)(next_u32() % 600) - 300;
        if (cm::ldexpf(x, k) != ldexpf(x, k)) wrong++;
        if (x != 0.0f && !isinf(x) && cm::ilogbf(x) != ilogbf(x)) wrong++;
    }
    printf("%-8s n=%d max_ulp=%.3f worst=%a specials_wrong=%d\n", "exact", 200000, 0.0, 0.0, wrong);
    return 0;
}
