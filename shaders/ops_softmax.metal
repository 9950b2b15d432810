// ops_softmax.metal — Stage 2: softmax, log_softmax and a fused cross-entropy over the
// last axis (float32; targets int32).
//
// Kernels (x is (rows, K) C-contiguous: any leading shape flattened to rows)
//   softmax_last_axis         y[r, k] = exp(a x[r, k] - m_r) / s_r      one threadgroup per row
//                             (a: a scale, 1 by default; attention passes 1/sqrt(D), so no
//                              separate scaling pass; optional causal mask for attention
//                              scores (..., T, S): row r sees columns k <= r % T and reads
//                              no other; masked outputs are 0, or NaN when the visible
//                              part's sum is NaN, as PyTorch's masked_fill(-inf) then softmax)
//   log_softmax_last_axis     y[r, k] = x[r, k] - m_r - log(s_r)
//   softmax_backward          dx = a y * (dy - sum_k(dy * y))             one threadgroup per row
//                             (causal: dx = 0 at the masked positions, masked_fill's gradient,
//                              and neither y nor dy is read there)
//   log_softmax_backward      dx = dy - exp(y) * sum_k(dy)                 one threadgroup per row
//   cross_entropy_forward     loss_r = m_r + log(s_r) - x[r, target_r], probs = softmax(x)
//   cross_entropy_mean        loss = mean_r loss_r, and the record of out-of-range targets
//   cross_entropy_backward    dx[r, k] = (probs[r, k] - (k == target_r)) * grad / N
// with m_r = max_k a x[r, k] and s_r = sum_k exp(a x[r, k] - m_r) (a = 1 but for softmax).
//
// Numerical stability: subtracting the row maximum first makes every exponent <= 0, so
// exp never overflows (logits of +-1e4 are fine) and s_r >= 1, so log(s_r) is finite.
// A -inf entry gives exp(-inf) = 0 and contributes nothing; only a row that is -inf
// everywhere gives NaN (as in NumPy and PyTorch: the softmax of nothing is undefined).
// NaN and +inf: threadgroup_max uses Metal's max, which skips a NaN, but a NaN (or
// +inf - +inf) still reaches s through exp, so the whole row is NaN, as in PyTorch.
//
// Thread mapping: one threadgroup of T threads (a multiple of 32) per row; thread t visits
// columns t, t + T, t + 2T, ... (coalesced), and the row max and row sum are combined with
// simd_max / simd_sum and one exchange through threadgroup memory (see ops_reduce.metal,
// whose two helpers are repeated here because each .metal file is compiled on its own).
//
// Run:        camel/backend_mps.py: softmax, log_softmax, cross_entropy and their backward.
// Test:       python -m pytest -q tests/test_kernels_softmax.py
// Benchmark:  python -m camel.bench softmax

#include <metal_stdlib>
using namespace metal;

// Sum of `value` (a float, or a uint count) over the threadgroup; every thread returns it.
// partial: 32 of them.
template <typename T>
static inline T threadgroup_sum(T value, threadgroup T *partial, uint lane, uint simd_group,
                                uint num_simd_groups)
{
    value = simd_sum(value);
    if (lane == 0) {
        partial[simd_group] = value;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);  // all partials written
    T total = lane < num_simd_groups ? partial[lane] : T(0);
    total = simd_sum(total);
    threadgroup_barrier(mem_flags::mem_threadgroup);  // all read: partial may be reused
    return total;
}

// Maximum of `value` over the threadgroup; every thread returns it. partial: 32 floats.
static inline float threadgroup_max(float value, threadgroup float *partial, uint lane,
                                    uint simd_group, uint num_simd_groups)
{
    value = simd_max(value);
    if (lane == 0) {
        partial[simd_group] = value;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    float total = lane < num_simd_groups ? partial[lane] : -INFINITY;
    total = simd_max(total);
    threadgroup_barrier(mem_flags::mem_threadgroup);
    return total;
}

// Minimum of `value` over the threadgroup; every thread returns it. partial: 32 uints.
static inline uint threadgroup_min(uint value, threadgroup uint *partial, uint lane,
                                   uint simd_group, uint num_simd_groups)
{
    value = simd_min(value);
    if (lane == 0) {
        partial[simd_group] = value;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    uint total = lane < num_simd_groups ? partial[lane] : 0xFFFFFFFFu;
    total = simd_min(total);
    threadgroup_barrier(mem_flags::mem_threadgroup);
    return total;
}

// The cross-entropy's rule for a target: a column of the row, [0, K). Outside it a row's
// loss is 0 and cross_entropy_mean records the target as an error.
static inline bool target_in_row(int target, uint K)
{
    return target >= 0 && target < int(K);
}

// x, y (rows, K). Threadgroup r computes row r of softmax(scale x) in three sweeps: the max
// m of scale x, the sum s of exp(scale x - m), then y = exp(scale x - m) / s. causal_T == 0:
// no mask; otherwise row r only sees (and reads) columns k <= r % causal_T (x is (..., T, S)
// attention scores) and y is 0 elsewhere. scale x is one rounded product, as a separate
// scaling pass would store it.
kernel void softmax_last_axis(device const float *x [[buffer(0)]],
                              device float *y [[buffer(1)]],
                              constant uint &K [[buffer(2)]],
                              constant uint &causal_T [[buffer(3)]],
                              constant float &scale [[buffer(4)]],
                              uint row [[threadgroup_position_in_grid]],
                              uint t [[thread_position_in_threadgroup]],
                              uint T [[threads_per_threadgroup]],
                              uint lane [[thread_index_in_simdgroup]],
                              uint simd_group [[simdgroup_index_in_threadgroup]],
                              uint num_simd_groups [[simdgroups_per_threadgroup]])
{
    threadgroup float partial[32];
    device const float *xr = x + row * K;
    device float *yr = y + row * K;
    uint limit = causal_T == 0 ? uint(K) : min(uint(K), row % causal_T + 1);  // columns this row sees

    float m = -INFINITY;
    for (uint k = t; k < limit; k += T) {
        m = max(m, xr[k] * scale);
    }
    m = threadgroup_max(m, partial, lane, simd_group, num_simd_groups);

    float s = 0.0f;
    for (uint k = t; k < limit; k += T) {
        s += exp(xr[k] * scale - m);
    }
    s = threadgroup_sum(s, partial, lane, simd_group, num_simd_groups);

    // A masked entry is exp(-inf - m) / s: 0, or NaN when s is NaN (PyTorch's result).
    const float masked = isnan(s) ? s : 0.0f;
    for (uint k = t; k < limit; k += T) {
        yr[k] = exp(xr[k] * scale - m) / s;
    }
    for (uint k = limit + t; k < K; k += T) {  // the masked columns: written, never read
        yr[k] = masked;
    }
}

// x, y (rows, K). Threadgroup r: y = (x - m) - log(s). Subtracting before the log keeps
// large logits exact: log_softmax of (1e4, 0) is (0, -1e4), not log(0) = -inf.
kernel void log_softmax_last_axis(device const float *x [[buffer(0)]],
                                  device float *y [[buffer(1)]],
                                  constant uint &K [[buffer(2)]],
                                  uint row [[threadgroup_position_in_grid]],
                                  uint t [[thread_position_in_threadgroup]],
                                  uint T [[threads_per_threadgroup]],
                                  uint lane [[thread_index_in_simdgroup]],
                                  uint simd_group [[simdgroup_index_in_threadgroup]],
                                  uint num_simd_groups [[simdgroups_per_threadgroup]])
{
    threadgroup float partial[32];
    device const float *xr = x + row * K;
    device float *yr = y + row * K;

    float m = -INFINITY;
    for (uint k = t; k < K; k += T) {
        m = max(m, xr[k]);
    }
    m = threadgroup_max(m, partial, lane, simd_group, num_simd_groups);

    float s = 0.0f;
    for (uint k = t; k < K; k += T) {
        s += exp(xr[k] - m);
    }
    s = threadgroup_sum(s, partial, lane, simd_group, num_simd_groups);

    float log_s = log(s);
    for (uint k = t; k < K; k += T) {
        yr[k] = (xr[k] - m) - log_s;
    }
}

// y = softmax(scale x), dy, dx (rows, K). Threadgroup r: dot = sum_k dy[r, k] * y[r, k],
// then dx = (y * (dy - dot)) * scale. causal_T as in softmax_last_axis: the sum and dx run
// over the visible columns only, and dx = 0 at the masked positions (not y * (dy - dot),
// which is NaN there when the row is NaN); y and dy are not read there (a causal
// attention's dy is not computed above the diagonal: camel/gemm.py, triangle).
kernel void softmax_backward(device const float *y [[buffer(0)]],
                             device const float *dy [[buffer(1)]],
                             device float *dx [[buffer(2)]],
                             constant uint &K [[buffer(3)]],
                             constant uint &causal_T [[buffer(4)]],
                             constant float &scale [[buffer(5)]],
                             uint row [[threadgroup_position_in_grid]],
                             uint t [[thread_position_in_threadgroup]],
                             uint T [[threads_per_threadgroup]],
                             uint lane [[thread_index_in_simdgroup]],
                             uint simd_group [[simdgroup_index_in_threadgroup]],
                             uint num_simd_groups [[simdgroups_per_threadgroup]])
{
    threadgroup float partial[32];
    uint base = row * K;
    uint limit = causal_T == 0 ? uint(K) : min(uint(K), row % causal_T + 1);  // visible columns
    float dot = 0.0f;
    for (uint k = t; k < limit; k += T) {
        dot += dy[base + k] * y[base + k];
    }
    dot = threadgroup_sum(dot, partial, lane, simd_group, num_simd_groups);
    for (uint k = t; k < limit; k += T) {
        dx[base + k] = (y[base + k] * (dy[base + k] - dot)) * scale;
    }
    for (uint k = limit + t; k < K; k += T) {
        dx[base + k] = 0.0f;
    }
}

// y = log_softmax(x), dy, dx (rows, K). Threadgroup r: s = sum_k dy[r, k], then
// dx = dy - exp(y) * s  (exp(y) is the softmax).
kernel void log_softmax_backward(device const float *y [[buffer(0)]],
                                 device const float *dy [[buffer(1)]],
                                 device float *dx [[buffer(2)]],
                                 constant uint &K [[buffer(3)]],
                                 uint row [[threadgroup_position_in_grid]],
                                 uint t [[thread_position_in_threadgroup]],
                                 uint T [[threads_per_threadgroup]],
                                 uint lane [[thread_index_in_simdgroup]],
                                 uint simd_group [[simdgroup_index_in_threadgroup]],
                                 uint num_simd_groups [[simdgroups_per_threadgroup]])
{
    threadgroup float partial[32];
    uint base = row * K;
    float s = 0.0f;
    for (uint k = t; k < K; k += T) {
        s += dy[base + k];
    }
    s = threadgroup_sum(s, partial, lane, simd_group, num_simd_groups);
    for (uint k = t; k < K; k += T) {
        dx[base + k] = dy[base + k] - exp(y[base + k]) * s;
    }
}

// logits, probs (N, K); targets, row_loss (N,). Threadgroup r computes the log-sum-exp of
// row r (lse = m + log(s)), row_loss[r] = lse - logits[r, target], and the softmax the
// backward needs. A target outside [0, K) gives row_loss 0 (the kernel never reads outside
// the row); cross_entropy_mean, which runs next, finds it and records it.
kernel void cross_entropy_forward(device const float *logits [[buffer(0)]],
                                  device const int *targets [[buffer(1)]],
                                  device float *row_loss [[buffer(2)]],
                                  device float *probs [[buffer(3)]],
                                  constant uint &K [[buffer(4)]],
                                  uint row [[threadgroup_position_in_grid]],
                                  uint t [[thread_position_in_threadgroup]],
                                  uint T [[threads_per_threadgroup]],
                                  uint lane [[thread_index_in_simdgroup]],
                                  uint simd_group [[simdgroup_index_in_threadgroup]],
                                  uint num_simd_groups [[simdgroups_per_threadgroup]])
{
    threadgroup float partial[32];
    device const float *xr = logits + row * K;
    device float *pr = probs + row * K;

    float m = -INFINITY;
    for (uint k = t; k < K; k += T) {
        m = max(m, xr[k]);
    }
    m = threadgroup_max(m, partial, lane, simd_group, num_simd_groups);

    float s = 0.0f;
    for (uint k = t; k < K; k += T) {
        s += exp(xr[k] - m);
    }
    s = threadgroup_sum(s, partial, lane, simd_group, num_simd_groups);

    for (uint k = t; k < K; k += T) {
        pr[k] = exp(xr[k] - m) / s;
    }

    if (t == 0) {
        int target = targets[row];
        row_loss[row] = target_in_row(target, K) ? (m + log(s)) - xr[target] : 0.0f;
    }
}

// row_loss, targets (N,) from any version of cross_entropy_forward; loss one float; error
// 3 ints. One threadgroup: loss = the mean of row_loss, and the targets' error record:
// error = (how many targets are outside [0, K), the first such row, its target), or
// (0, 0, 0). Every field is written, so the record needs no zeroing before the dispatch
// (no host write, no upload); the host reads it at the next synchronisation
// (camel/backend_mps.py). Thread t visits rows t, t + T, ...
kernel void cross_entropy_mean(device const float *row_loss [[buffer(0)]],
                               device const int *targets [[buffer(1)]],
                               device float *loss [[buffer(2)]],
                               device int *error [[buffer(3)]],
                               constant uint &N [[buffer(4)]],
                               constant uint &K [[buffer(5)]],
                               uint t [[thread_position_in_threadgroup]],
                               uint T [[threads_per_threadgroup]],
                               uint lane [[thread_index_in_simdgroup]],
                               uint simd_group [[simdgroup_index_in_threadgroup]],
                               uint num_simd_groups [[simdgroups_per_threadgroup]])
{
    threadgroup float partial[32];
    threadgroup uint partial_u[32];
    float sum = 0.0f;
    uint bad = 0;
    uint first_bad = N;  // none yet
    for (uint r = t; r < N; r += T) {
        sum += row_loss[r];
        int target = targets[r];
        if (!target_in_row(target, K)) {
            bad++;
            first_bad = min(first_bad, r);
        }
    }
    sum = threadgroup_sum(sum, partial, lane, simd_group, num_simd_groups);
    bad = threadgroup_sum(bad, partial_u, lane, simd_group, num_simd_groups);
    first_bad = threadgroup_min(first_bad, partial_u, lane, simd_group, num_simd_groups);
    if (t == 0) {
        loss[0] = sum / float(N);
        error[0] = int(bad);
        error[1] = bad > 0 ? int(first_bad) : 0;
        error[2] = bad > 0 ? targets[first_bad] : 0;
    }
}

// probs (N, K) from cross_entropy_forward, targets (N,), grad a single float (the loss's
// gradient, on the device), dx (N, K). One thread per element i = (r, k):
// dx = (probs - onehot) * (grad / N). Grid: N * K threads.
kernel void cross_entropy_backward(device const float *probs [[buffer(0)]],
                                   device const int *targets [[buffer(1)]],
                                   device const float *grad [[buffer(2)]],
                                   device float *dx [[buffer(3)]],
                                   constant uint &N [[buffer(4)]],
                                   constant uint &K [[buffer(5)]],
                                   uint i [[thread_position_in_grid]])
{
    if (i >= N * K) {
        return;
    }
    uint r = i / K;
    int k = int(i % K);
    float onehot = k == targets[r] ? 1.0f : 0.0f;
    dx[i] = (probs[i] - onehot) * (grad[0] / float(N));
}

// ---------------------------------------------------------------------------
// version 2 of softmax and log_softmax: the row in registers, read once
// ---------------------------------------------------------------------------
//
// The kernels above read a row three times (max, sum, write) with one float per thread per
// step: 36 % and 45 % of the copy bandwidth on an H200 (docs/cuda.md). Version 2 reads it
// once and writes it once, the minimum (8 bytes per element): P SIMD groups share a row
// (P = 1 up to 1024 floats, then 2, 4, 8, 16 up to 16384), in threadgroups of max(8, P)
// SIMD groups (256 or 512 threads), and
// lane l of part p keeps float4 number (32 p + l) + 32 P j, j = 0 .. 7, of its row in
// registers (floats when K % 4 != 0 or x is not 16-byte aligned: 8 float4s or 32 floats a
// lane). All 8 loads are issued before the first is used. The row max and sum are simd_max /
// simd_sum, through threadgroup memory only when P > 1. Rows wider than 16384 floats take
// version 1 (camel/backend_mps.py). The numerics are version 1's: the max skips NaN
// (Metal's max), which still reaches s through exp; masked outputs are 0, or NaN when s is.

// float4s of a row per lane (a SIMD group holds 1024 floats); a macro: a template argument.
// The softmax kernels also come with 4 (the _r4 instantiations below); j runs to R - 1.
#define ROW_REGS 8

// Maximum (Metal's max: NaN skipped) or sum over the P SIMD groups sharing a row, as
// row_sum in ops_reduce.metal; every lane of them returns it. partial: one float per SIMD group.
static inline float row_combine(float value, bool is_max, threadgroup float *partial, uint P,
                                uint lane, uint simd_group)
{
    value = is_max ? simd_max(value) : simd_sum(value);
    if (P == 1) {
        return value;  // the row is this SIMD group's: no threadgroup memory, no barrier
    }
    if (lane == 0) {
        partial[simd_group] = value;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    uint first = simd_group - simd_group % P;
    float total = partial[first];
    for (uint s = 1; s < P; s++) {
        total = is_max ? max(total, partial[first + s]) : total + partial[first + s];
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);  // all read: partial may be reused
    return total;
}

// The element index of component c of V number q (V = float: q; float4: 4 q + c).
static inline uint element(float, uint q, uint) { return q; }
static inline uint element(float4, uint q, uint c) { return 4 * q + c; }
static inline float component(float v, uint) { return v; }
static inline float component(float4 v, uint c) { return v[c]; }
static inline void set_component(thread float &v, uint, float value) { v = value; }
static inline void set_component(thread float4 &v, uint c, float value) { v[c] = value; }

// One row of softmax (LOG false) or log_softmax (LOG true) with the row in registers.
// V = float4 (N = R, ROW_REGS or 4) or float (N = 4 R); xr, yr: the row as V's, n of them;
// limit: the visible columns (K, or fewer under a causal mask; 0 for a SIMD group past the
// last row, which loads nothing and joins the barriers); a V that starts past the limit is
// not loaded. scale: the row is scale x (one rounded product an element). Returns (m, s):
// the row's max and sum of exp(scale x - m), for the cross-entropy.
template <typename V, uint N, bool LOG>
static inline float2 softmax_row(device const V *xr, device V *yr, uint n, uint limit,
                               float scale, uint first, uint stride,
                               threadgroup float *partial, uint P, uint lane, uint simd_group)
{
    constexpr uint W = sizeof(V) / sizeof(float);
    V v[N];
    #pragma clang loop unroll(full)
    for (uint j = 0; j < N; j++) {  // N independent loads in flight
        uint q = first + j * stride;
        v[j] = q < n && element(V(), q, 0) < limit ? xr[q] * scale : V(-INFINITY);
    }
    float m = -INFINITY;
    #pragma clang loop unroll(full)
    for (uint j = 0; j < N; j++) {
        uint q = first + j * stride;
        #pragma clang loop unroll(full)
        for (uint c = 0; c < W; c++) {
            if (element(V(), q, c) < limit) {
                m = max(m, component(v[j], c));
            }
        }
    }
    m = row_combine(m, true, partial, P, lane, simd_group);

    float s = 0.0f;
    #pragma clang loop unroll(full)
    for (uint j = 0; j < N; j++) {
        uint q = first + j * stride;
        #pragma clang loop unroll(full)
        for (uint c = 0; c < W; c++) {
            if (element(V(), q, c) < limit) {
                float e = exp(component(v[j], c) - m);
                s += e;
                if (!LOG) {
                    set_component(v[j], c, e);  // keep exp(x - m) for the write
                }
            }
        }
    }
    s = row_combine(s, false, partial, P, lane, simd_group);

    float log_s = log(s);
    float inv_s = 1.0f / s;  // one division a lane, not one an element (<= 1 ulp more)
    float masked = isnan(s) ? s : 0.0f;  // exp(-inf - m) / s: 0, or NaN when s is NaN
    #pragma clang loop unroll(full)
    for (uint j = 0; j < N; j++) {
        uint q = first + j * stride;
        if (q < n && limit > 0) {
            V out = v[j];
            #pragma clang loop unroll(full)
            for (uint c = 0; c < W; c++) {
                float value = component(v[j], c);
                float y = LOG ? (value - m) - log_s : value * inv_s;
                set_component(out, c, element(V(), q, c) < limit ? y : masked);
            }
            yr[q] = out;
        }
    }
    return float2(m, s);
}

// x, y (rows, K). P SIMD groups per row (1, 2, 4, 8, 16: the host picks the fewest for
// which K <= 1024 P) in threadgroups of S = max(8, P) SIMD groups, S / P rows each; vec4 = 1
// when K % 4 == 0 and x, y are 16-byte aligned. causal_T and scale as in softmax_last_axis
// (0: no mask; LOG: always 0, scale 1). Grid: ceil(rows P / S) threadgroups.
template <bool LOG, uint R>
kernel void softmax_rows_v2(device const float *x [[buffer(0)]],
                            device float *y [[buffer(1)]],
                            constant uint &rows [[buffer(2)]],
                            constant uint &K [[buffer(3)]],
                            constant uint &causal_T [[buffer(4)]],
                            constant uint &P [[buffer(5)]],
                            constant uint &vec4 [[buffer(6)]],
                            constant float &scale [[buffer(7)]],
                            uint group [[threadgroup_position_in_grid]],
                            uint lane [[thread_index_in_simdgroup]],
                            uint simd_group [[simdgroup_index_in_threadgroup]],
                            uint num_simd_groups [[simdgroups_per_threadgroup]])
{
    threadgroup float partial[32];
    uint row = group * (num_simd_groups / P) + simd_group / P;
    uint first = (simd_group % P) * 32 + lane;
    uint limit = causal_T == 0 ? K : min(K, row % causal_T + 1);
    limit = row < rows ? limit : 0;
    uint base = row < rows ? row * K : 0;
    if (vec4 != 0) {
        softmax_row<float4, R, LOG>((device const float4 *)(x + base),
                                    (device float4 *)(y + base), K / 4, limit, scale, first,
                                    32 * P, partial, P, lane, simd_group);
    } else {
        softmax_row<float, 4 * R, LOG>(x + base, y + base, K, limit, scale, first, 32 * P,
                                       partial, P, lane, simd_group);
    }
}

#define SOFTMAX_ROWS_V2(NAME, LOG, R)                                                          \
    template [[host_name(NAME)]] kernel void softmax_rows_v2<LOG, R>(                          \
        device const float *x [[buffer(0)]], device float *y [[buffer(1)]],                    \
        constant uint &rows [[buffer(2)]], constant uint &K [[buffer(3)]],                     \
        constant uint &causal_T [[buffer(4)]], constant uint &P [[buffer(5)]],                 \
        constant uint &vec4 [[buffer(6)]], constant float &scale [[buffer(7)]],                \
        uint group [[threadgroup_position_in_grid]], uint lane [[thread_index_in_simdgroup]],  \
        uint simd_group [[simdgroup_index_in_threadgroup]],                                    \
        uint num_simd_groups [[simdgroups_per_threadgroup]]);

SOFTMAX_ROWS_V2("softmax_last_axis_v2", false, ROW_REGS)
SOFTMAX_ROWS_V2("log_softmax_last_axis_v2", true, ROW_REGS)
// The same with half the registers a lane: 4 float4s (512 floats a SIMD group), so twice
// the SIMD groups a row (P up to 32, a threadgroup of 1024 threads for rows past 8192).
// Fewer registers a thread let more threadgroups stay resident, and more loads are in
// flight per core: on an H100 0.92 -> 0.66 ms for the causal (16 x 4096, 4096) softmax of
// attention (docs/cuda.md). camel/backend_mps.py ROW_FLOAT4S picks one.
SOFTMAX_ROWS_V2("softmax_last_axis_v2_r4", false, 4)
SOFTMAX_ROWS_V2("log_softmax_last_axis_v2_r4", true, 4)

// The target of a row and the row's logit there, for cross_entropy_row_loss. The lane that
// writes the loss loads them before the row's sweeps, whose loads hide their latency; loaded
// after, the loss would wait on two dependent loads at the end of every row. A target
// outside [0, K) reads no logit. active: the lane writes the loss.
struct RowTarget {
    bool in_range;  // the target is in [0, K)
    float logit;    // x[target], if it is
};

static inline RowTarget row_target(device const float *xr, device const int *targets, uint row,
                                   uint K, bool active)
{
    RowTarget t = {false, 0.0f};
    if (active) {
        int target = targets[row];
        t.in_range = target_in_row(target, K);
        if (t.in_range) {
            t.logit = xr[target];
        }
    }
    return t;
}

// row_loss[row] = m + log(s) - x[target] for ms = (m, s) of row `row`, or 0 for a target
// outside [0, K) (cross_entropy_mean records it). One lane a row.
static inline void cross_entropy_row_loss(float2 ms, RowTarget t, device float *row_loss,
                                          uint row)
{
    row_loss[row] = t.in_range ? (ms.x + log(ms.y)) - t.logit : 0.0f;
}

// logits, probs (N, K); targets, row_loss (N,) as in cross_entropy_forward. Version 2
// of the fused cross-entropy: the softmax of softmax_rows_v2 (the row read once into
// registers, probs written once; geometry and vec4 as there). Lane 0 of the row's first
// SIMD group loads the target and logits[r, target] first (row_target), and after the
// softmax checks the target and writes row_loss = m + log(s) - logits[r, target].
// Grid: ceil(N P / S) threadgroups.
kernel void cross_entropy_forward_v2(device const float *logits [[buffer(0)]],
                                     device const int *targets [[buffer(1)]],
                                     device float *row_loss [[buffer(2)]],
                                     device float *probs [[buffer(3)]],
                                     constant uint &rows [[buffer(4)]],
                                     constant uint &K [[buffer(5)]],
                                     constant uint &P [[buffer(6)]],
                                     constant uint &vec4 [[buffer(7)]],
                                     uint group [[threadgroup_position_in_grid]],
                                     uint lane [[thread_index_in_simdgroup]],
                                     uint simd_group [[simdgroup_index_in_threadgroup]],
                                     uint num_simd_groups [[simdgroups_per_threadgroup]])
{
    threadgroup float partial[32];
    uint row = group * (num_simd_groups / P) + simd_group / P;
    uint first = (simd_group % P) * 32 + lane;
    uint limit = row < rows ? K : 0;
    uint base = row < rows ? row * K : 0;
    RowTarget target = row_target(logits + base, targets, row, K, row < rows && first == 0);
    float2 ms;
    if (vec4 != 0) {
        ms = softmax_row<float4, ROW_REGS, false>((device const float4 *)(logits + base),
                                                  (device float4 *)(probs + base), K / 4, limit,
                                                  1.0f, first, 32 * P, partial, P, lane,
                                                  simd_group);
    } else {
        ms = softmax_row<float, 4 * ROW_REGS, false>(logits + base, probs + base, K, limit, 1.0f,
                                                     first, 32 * P, partial, P, lane, simd_group);
    }
    if (row < rows && first == 0) {
        cross_entropy_row_loss(ms, target, row_loss, row);
    }
}

// probs, dx (N, K) with K % 4 == 0 and every array 16-byte aligned; targets (N,); grad one
// float. Version 2 of cross_entropy_backward: one thread per float4, which never straddles
// two rows (K % 4 == 0), so a thread looks up one target and computes grad / N once for four
// elements (version 1: one thread, one division and one target load per element).
// Grid: N * K / 4 threads.
kernel void cross_entropy_backward_float4(device const float4 *probs [[buffer(0)]],
                                          device const int *targets [[buffer(1)]],
                                          device const float *grad [[buffer(2)]],
                                          device float4 *dx [[buffer(3)]],
                                          constant uint &N [[buffer(4)]],
                                          constant uint &K [[buffer(5)]],
                                          uint q [[thread_position_in_grid]])
{
    if (q >= N * (K / 4)) {
        return;
    }
    uint i = 4 * q;  // the first of the thread's four elements
    uint r = i / K;
    int k = int(i - r * K);
    int target = targets[r];
    float4 onehot = float4(k == target ? 1.0f : 0.0f, k + 1 == target ? 1.0f : 0.0f,
                           k + 2 == target ? 1.0f : 0.0f, k + 3 == target ? 1.0f : 0.0f);
    dx[q] = (probs[q] - onehot) * (grad[0] / float(N));
}

// ---------------------------------------------------------------------------
// version 2 of the softmax and log_softmax backward: y and dy read once
// ---------------------------------------------------------------------------
//
// The geometry of softmax_rows_v2: P SIMD groups per row, lane l of part p keeps float4
// number (32 p + l) + 32 P j, j = 0 .. 7, of the row's y and dy in registers (floats when
// K % 4 != 0 or an array is not 16-byte aligned), one row sum (simd_sum, threadgroup memory
// only when P > 1), one write. The sums run over the visible columns, as in version 1.

// One row: LOG false: dot = sum_k dy y, dx = scale y (dy - dot) (0 at masked columns:
// k >= limit, where y and dy are not read but for the rest of a V that starts before the
// limit); LOG true: s = sum_k dy, dx = scale (dy - exp(y) s). n: the row's V's; active
// false for a SIMD group past the last row.
template <typename V, uint N, bool LOG>
static inline void softmax_backward_row(device const V *yr, device const V *dyr, device V *dxr,
                                        uint n, uint limit, float scale, bool active,
                                        uint first, uint stride, threadgroup float *partial,
                                        uint P, uint lane, uint simd_group)
{
    constexpr uint W = sizeof(V) / sizeof(float);
    V y[N];
    V dy[N];
#pragma clang loop unroll(full)
    for (uint j = 0; j < N; j++) {  // 2 N independent loads in flight
        uint q = first + j * stride;
        bool in_row = active && q < n && element(V(), q, 0) < limit;
        y[j] = in_row ? yr[q] : V(0.0f);
        dy[j] = in_row ? dyr[q] : V(0.0f);
    }
    float s = 0.0f;
#pragma clang loop unroll(full)
    for (uint j = 0; j < N; j++) {
        uint q = first + j * stride;
#pragma clang loop unroll(full)
        for (uint c = 0; c < W; c++) {
            if (element(V(), q, c) < limit) {
                s += LOG ? component(dy[j], c) : component(dy[j], c) * component(y[j], c);
            }
        }
    }
    s = row_combine(s, false, partial, P, lane, simd_group);
#pragma clang loop unroll(full)
    for (uint j = 0; j < N; j++) {
        uint q = first + j * stride;
        if (active && q < n) {
            V out = y[j];
#pragma clang loop unroll(full)
            for (uint c = 0; c < W; c++) {
                float yc = component(y[j], c);
                float dyc = component(dy[j], c);
                float d = (LOG ? dyc - exp(yc) * s : yc * (dyc - s)) * scale;
                set_component(out, c, element(V(), q, c) < limit ? d : 0.0f);
            }
            dxr[q] = out;
        }
    }
}

// y, dy, dx (rows, K); geometry as softmax_rows_v2 (vec4 = 1: K % 4 == 0 and the three
// arrays 16-byte aligned). causal_T and scale as in softmax_backward (LOG: always 0, 1).
template <bool LOG, uint R>
kernel void softmax_backward_rows_v2(device const float *y [[buffer(0)]],
                                     device const float *dy [[buffer(1)]],
                                     device float *dx [[buffer(2)]],
                                     constant uint &rows [[buffer(3)]],
                                     constant uint &K [[buffer(4)]],
                                     constant uint &causal_T [[buffer(5)]],
                                     constant uint &P [[buffer(6)]],
                                     constant uint &vec4 [[buffer(7)]],
                                     constant float &scale [[buffer(8)]],
                                     uint group [[threadgroup_position_in_grid]],
                                     uint lane [[thread_index_in_simdgroup]],
                                     uint simd_group [[simdgroup_index_in_threadgroup]],
                                     uint num_simd_groups [[simdgroups_per_threadgroup]])
{
    threadgroup float partial[32];
    uint row = group * (num_simd_groups / P) + simd_group / P;
    uint first = (simd_group % P) * 32 + lane;
    bool active = row < rows;
    uint limit = causal_T == 0 ? K : min(K, row % causal_T + 1);
    uint base = active ? row * K : 0;
    if (vec4 != 0) {
        softmax_backward_row<float4, R, LOG>(
            (device const float4 *)(y + base), (device const float4 *)(dy + base),
            (device float4 *)(dx + base), K / 4, limit, scale, active, first, 32 * P, partial, P,
            lane, simd_group);
    } else {
        softmax_backward_row<float, 4 * R, LOG>(y + base, dy + base, dx + base, K, limit, scale,
                                                active, first, 32 * P, partial, P, lane,
                                                simd_group);
    }
}

#define SOFTMAX_BACKWARD_ROWS_V2(NAME, LOG, R)                                                 \
    template [[host_name(NAME)]] kernel void softmax_backward_rows_v2<LOG, R>(                 \
        device const float *y [[buffer(0)]], device const float *dy [[buffer(1)]],             \
        device float *dx [[buffer(2)]], constant uint &rows [[buffer(3)]],                     \
        constant uint &K [[buffer(4)]], constant uint &causal_T [[buffer(5)]],                 \
        constant uint &P [[buffer(6)]], constant uint &vec4 [[buffer(7)]],                     \
        constant float &scale [[buffer(8)]], uint group [[threadgroup_position_in_grid]],      \
        uint lane [[thread_index_in_simdgroup]],                                               \
        uint simd_group [[simdgroup_index_in_threadgroup]],                                    \
        uint num_simd_groups [[simdgroups_per_threadgroup]]);

SOFTMAX_BACKWARD_ROWS_V2("softmax_backward_v2", false, ROW_REGS)
SOFTMAX_BACKWARD_ROWS_V2("log_softmax_backward_v2", true, ROW_REGS)
// With 4 float4s of y and 4 of dy a lane, as softmax_last_axis_v2_r4.
SOFTMAX_BACKWARD_ROWS_V2("softmax_backward_v2_r4", false, 4)
SOFTMAX_BACKWARD_ROWS_V2("log_softmax_backward_v2_r4", true, 4)

// ---------------------------------------------------------------------------
// version 3: rows too wide for registers, read twice (the second time from the cache)
// ---------------------------------------------------------------------------
//
// Version 2 holds the row in registers, so a wide row fills a core: a 16384-float row takes
// 1024 threads at 64 registers, an H100 SM's whole register file, one threadgroup an SM,
// and its load, reduce and write phases run one after another with nothing to overlap them
// (54 % of the copy, docs/cuda.md). Version 3 holds nothing across the row reduction:
//   sweep 1 reads the row and keeps a running (m, s) a lane, the max so far and the sum of
//           exp(x - m) so far, rescaling s by exp(m_old - m_new) when the max grows (the
//           online softmax FlashAttention uses, Stage 5B); the lanes' pairs then combine
//           into the row's (m, s): s_row = sum over lanes of s exp(m - m_row);
//   sweep 2 reads the row again and writes y.
// A lane keeps U = 4 V's in flight and drops them once counted, so a thread needs few
// registers, more threadgroups share a core, and one's sweeps overlap another's
// reductions. The second read is cheap when it comes from the cache: a threadgroup reads its
// row (64 KB at 16384 floats) and reads it again microseconds later, while the rows in
// flight (resident threadgroups x row bytes) fit the last-level cache. Then the memory
// traffic is version 2's (8 bytes an element) and the cache serves the third 4 (the host
// picks the threads a row for that: camel/backend_mps.py, _softmax_kernel; on an H100 at
// (1024, 16384) softmax 75 % of the copy against version 2's 59 %, docs/cuda.md). Any K: the
// sweeps loop. Geometry (P SIMD groups a row, 32 lanes x U float4s a SIMD group a step) and
// numerics are version 2's (NaN and +inf reach s; a row of -inf gives NaN: its s is 0 x
// exp(-inf + inf)); the sums are associated differently (a few ulp).

#define ROW_STEP 4  // U: V's a lane loads before it uses the first (loads in flight)

// v[j] = scale * xr[q0 + j stride] for the V's that start before limit, fill for the rest.
template <typename V>
static inline void load_step(thread V *v, device const V *xr, uint q0, uint stride, uint n,
                             uint limit, float scale, float fill)
{
    #pragma clang loop unroll(full)
    for (uint j = 0; j < ROW_STEP; j++) {
        uint q = q0 + j * stride;
        v[j] = q < n && element(V(), q, 0) < limit ? xr[q] * scale : V(fill);
    }
}

// One row of softmax (LOG false) or log_softmax (LOG true) in two sweeps; arguments and
// return value as softmax_row's.
template <typename V, bool LOG>
static inline float2 softmax_row_streamed(device const V *xr, device V *yr, uint n, uint limit,
                                          float scale, uint first, uint stride,
                                          threadgroup float *partial, uint P, uint lane,
                                          uint simd_group)
{
    constexpr uint W = sizeof(V) / sizeof(float);
    float m = -INFINITY;  // this lane's max so far (Metal's max: NaN skipped) ...
    float s = 0.0f;       // ... and its sum of exp(x - m) so far
    for (uint q0 = first; q0 < n; q0 += ROW_STEP * stride) {
        V v[ROW_STEP];
        load_step(v, xr, q0, stride, n, limit, scale, -INFINITY);
        float step_max = -INFINITY;
        #pragma clang loop unroll(full)
        for (uint j = 0; j < ROW_STEP; j++) {
            #pragma clang loop unroll(full)
            for (uint c = 0; c < W; c++) {
                if (element(V(), q0 + j * stride, c) < limit) {
                    step_max = max(step_max, component(v[j], c));
                }
            }
        }
        if (step_max > m) {
            s *= exp(m - step_max);  // the terms so far, now relative to the new max
            m = step_max;
        }
        #pragma clang loop unroll(full)
        for (uint j = 0; j < ROW_STEP; j++) {
            #pragma clang loop unroll(full)
            for (uint c = 0; c < W; c++) {
                float value = component(v[j], c);
                // -inf adds 0 (also while m is still -inf, where exp would give NaN)
                if (element(V(), q0 + j * stride, c) < limit && value != -INFINITY) {
                    s += exp(value - m);
                }
            }
        }
    }
    float row_m = row_combine(m, true, partial, P, lane, simd_group);
    s = row_combine(s * exp(m - row_m), false, partial, P, lane, simd_group);

    float log_s = log(s);
    float inv_s = 1.0f / s;
    float masked = isnan(s) ? s : 0.0f;  // as in softmax_row
    for (uint q0 = first; q0 < n && limit > 0; q0 += ROW_STEP * stride) {
        V v[ROW_STEP];
        load_step(v, xr, q0, stride, n, limit, scale, -INFINITY);
        #pragma clang loop unroll(full)
        for (uint j = 0; j < ROW_STEP; j++) {
            uint q = q0 + j * stride;
            if (q < n) {
                V out = v[j];
                #pragma clang loop unroll(full)
                for (uint c = 0; c < W; c++) {
                    float value = component(v[j], c);
                    float y = LOG ? (value - row_m) - log_s : exp(value - row_m) * inv_s;
                    set_component(out, c, element(V(), q, c) < limit ? y : masked);
                }
                yr[q] = out;
            }
        }
    }
    return float2(row_m, s);
}

// x, y (rows, K); the arguments and geometry of softmax_rows_v2, with ROW_STEP float4s a
// lane a step (P SIMD groups a row: the host picks the fewest for which K <= 1024 P, two
// steps a lane, at most 16, so that the rows in flight stay in the cache; wider rows loop).
// Grid: ceil(rows P / S) threadgroups.
template <bool LOG>
kernel void softmax_rows_v3(device const float *x [[buffer(0)]],
                            device float *y [[buffer(1)]],
                            constant uint &rows [[buffer(2)]],
                            constant uint &K [[buffer(3)]],
                            constant uint &causal_T [[buffer(4)]],
                            constant uint &P [[buffer(5)]],
                            constant uint &vec4 [[buffer(6)]],
                            constant float &scale [[buffer(7)]],
                            uint group [[threadgroup_position_in_grid]],
                            uint lane [[thread_index_in_simdgroup]],
                            uint simd_group [[simdgroup_index_in_threadgroup]],
                            uint num_simd_groups [[simdgroups_per_threadgroup]])
{
    threadgroup float partial[32];
    uint row = group * (num_simd_groups / P) + simd_group / P;
    uint first = (simd_group % P) * 32 + lane;
    uint limit = causal_T == 0 ? K : min(K, row % causal_T + 1);
    limit = row < rows ? limit : 0;
    uint base = row < rows ? row * K : 0;
    if (vec4 != 0) {
        softmax_row_streamed<float4, LOG>((device const float4 *)(x + base),
                                          (device float4 *)(y + base), K / 4, limit, scale,
                                          first, 32 * P, partial, P, lane, simd_group);
    } else {
        softmax_row_streamed<float, LOG>(x + base, y + base, K, limit, scale, first, 32 * P,
                                         partial, P, lane, simd_group);
    }
}

#define SOFTMAX_ROWS_V3(NAME, LOG)                                                             \
    template [[host_name(NAME)]] kernel void softmax_rows_v3<LOG>(                             \
        device const float *x [[buffer(0)]], device float *y [[buffer(1)]],                    \
        constant uint &rows [[buffer(2)]], constant uint &K [[buffer(3)]],                     \
        constant uint &causal_T [[buffer(4)]], constant uint &P [[buffer(5)]],                 \
        constant uint &vec4 [[buffer(6)]], constant float &scale [[buffer(7)]],                \
        uint group [[threadgroup_position_in_grid]], uint lane [[thread_index_in_simdgroup]],  \
        uint simd_group [[simdgroup_index_in_threadgroup]],                                    \
        uint num_simd_groups [[simdgroups_per_threadgroup]]);

SOFTMAX_ROWS_V3("softmax_last_axis_v3", false)
SOFTMAX_ROWS_V3("log_softmax_last_axis_v3", true)

// logits, probs (N, K); targets, row_loss (N,) as in cross_entropy_forward. Version 3
// of the fused cross-entropy: softmax_row_streamed, then the row loss as version 2.
kernel void cross_entropy_forward_v3(device const float *logits [[buffer(0)]],
                                     device const int *targets [[buffer(1)]],
                                     device float *row_loss [[buffer(2)]],
                                     device float *probs [[buffer(3)]],
                                     constant uint &rows [[buffer(4)]],
                                     constant uint &K [[buffer(5)]],
                                     constant uint &P [[buffer(6)]],
                                     constant uint &vec4 [[buffer(7)]],
                                     uint group [[threadgroup_position_in_grid]],
                                     uint lane [[thread_index_in_simdgroup]],
                                     uint simd_group [[simdgroup_index_in_threadgroup]],
                                     uint num_simd_groups [[simdgroups_per_threadgroup]])
{
    threadgroup float partial[32];
    uint row = group * (num_simd_groups / P) + simd_group / P;
    uint first = (simd_group % P) * 32 + lane;
    uint limit = row < rows ? K : 0;
    uint base = row < rows ? row * K : 0;
    RowTarget target = row_target(logits + base, targets, row, K, row < rows && first == 0);
    float2 ms;
    if (vec4 != 0) {
        ms = softmax_row_streamed<float4, false>((device const float4 *)(logits + base),
                                                 (device float4 *)(probs + base), K / 4, limit,
                                                 1.0f, first, 32 * P, partial, P, lane,
                                                 simd_group);
    } else {
        ms = softmax_row_streamed<float, false>(logits + base, probs + base, K, limit, 1.0f,
                                                first, 32 * P, partial, P, lane, simd_group);
    }
    if (row < rows && first == 0) {
        cross_entropy_row_loss(ms, target, row_loss, row);
    }
}

// One row of the softmax / log_softmax backward in two sweeps (the sum, then dx), each
// reading y and dy; arguments as softmax_backward_row's.
template <typename V, bool LOG>
static inline void softmax_backward_row_streamed(device const V *yr, device const V *dyr,
                                                 device V *dxr, uint n, uint limit,
                                                 float scale, bool active, uint first,
                                                 uint stride, threadgroup float *partial,
                                                 uint P, uint lane, uint simd_group)
{
    constexpr uint W = sizeof(V) / sizeof(float);
    limit = active ? limit : 0;
    float s = 0.0f;
    for (uint q0 = first; q0 < n; q0 += ROW_STEP * stride) {
        V y[ROW_STEP];
        V dy[ROW_STEP];
        load_step(y, yr, q0, stride, n, limit, 1.0f, 0.0f);
        load_step(dy, dyr, q0, stride, n, limit, 1.0f, 0.0f);
        #pragma clang loop unroll(full)
        for (uint j = 0; j < ROW_STEP; j++) {
            #pragma clang loop unroll(full)
            for (uint c = 0; c < W; c++) {
                if (element(V(), q0 + j * stride, c) < limit) {
                    s += LOG ? component(dy[j], c) : component(dy[j], c) * component(y[j], c);
                }
            }
        }
    }
    s = row_combine(s, false, partial, P, lane, simd_group);
    for (uint q0 = first; q0 < n && active; q0 += ROW_STEP * stride) {
        V y[ROW_STEP];
        V dy[ROW_STEP];
        load_step(y, yr, q0, stride, n, limit, 1.0f, 0.0f);
        load_step(dy, dyr, q0, stride, n, limit, 1.0f, 0.0f);
        #pragma clang loop unroll(full)
        for (uint j = 0; j < ROW_STEP; j++) {
            uint q = q0 + j * stride;
            if (q < n) {
                V out = y[j];
                #pragma clang loop unroll(full)
                for (uint c = 0; c < W; c++) {
                    float yc = component(y[j], c);
                    float dyc = component(dy[j], c);
                    float d = (LOG ? dyc - exp(yc) * s : yc * (dyc - s)) * scale;
                    set_component(out, c, element(V(), q, c) < limit ? d : 0.0f);
                }
                dxr[q] = out;
            }
        }
    }
}

// y, dy, dx (rows, K); the arguments and geometry of softmax_backward_rows_v2, any K (the
// host picks the fewest P for which K <= 512 P, one step a lane, at most 32: a row is twice
// the forward's bytes, so half the rows in flight).
template <bool LOG>
kernel void softmax_backward_rows_v3(device const float *y [[buffer(0)]],
                                     device const float *dy [[buffer(1)]],
                                     device float *dx [[buffer(2)]],
                                     constant uint &rows [[buffer(3)]],
                                     constant uint &K [[buffer(4)]],
                                     constant uint &causal_T [[buffer(5)]],
                                     constant uint &P [[buffer(6)]],
                                     constant uint &vec4 [[buffer(7)]],
                                     constant float &scale [[buffer(8)]],
                                     uint group [[threadgroup_position_in_grid]],
                                     uint lane [[thread_index_in_simdgroup]],
                                     uint simd_group [[simdgroup_index_in_threadgroup]],
                                     uint num_simd_groups [[simdgroups_per_threadgroup]])
{
    threadgroup float partial[32];
    uint row = group * (num_simd_groups / P) + simd_group / P;
    uint first = (simd_group % P) * 32 + lane;
    bool active = row < rows;
    uint limit = causal_T == 0 ? K : min(K, row % causal_T + 1);
    uint base = active ? row * K : 0;
    if (vec4 != 0) {
        softmax_backward_row_streamed<float4, LOG>(
            (device const float4 *)(y + base), (device const float4 *)(dy + base),
            (device float4 *)(dx + base), K / 4, limit, scale, active, first, 32 * P, partial,
            P, lane, simd_group);
    } else {
        softmax_backward_row_streamed<float, LOG>(y + base, dy + base, dx + base, K, limit,
                                                  scale, active, first, 32 * P, partial, P,
                                                  lane, simd_group);
    }
}

#define SOFTMAX_BACKWARD_ROWS_V3(NAME, LOG)                                                    \
    template [[host_name(NAME)]] kernel void softmax_backward_rows_v3<LOG>(                    \
        device const float *y [[buffer(0)]], device const float *dy [[buffer(1)]],             \
        device float *dx [[buffer(2)]], constant uint &rows [[buffer(3)]],                     \
        constant uint &K [[buffer(4)]], constant uint &causal_T [[buffer(5)]],                 \
        constant uint &P [[buffer(6)]], constant uint &vec4 [[buffer(7)]],                     \
        constant float &scale [[buffer(8)]], uint group [[threadgroup_position_in_grid]],      \
        uint lane [[thread_index_in_simdgroup]],                                               \
        uint simd_group [[simdgroup_index_in_threadgroup]],                                    \
        uint num_simd_groups [[simdgroups_per_threadgroup]]);

SOFTMAX_BACKWARD_ROWS_V3("softmax_backward_v3", false)
SOFTMAX_BACKWARD_ROWS_V3("log_softmax_backward_v3", true)
