// ops_softmax.metal — Stage 2: softmax, log_softmax and a fused cross-entropy over the
// last axis (float32; targets int32).
//
// Kernels (x is (rows, K) C-contiguous: any leading shape flattened to rows)
//   softmax_last_axis         y[r, k] = exp(x[r, k] - m_r) / s_r        one threadgroup per row
//                             (optional causal mask for attention scores (..., T, S):
//                              row r sees columns k <= r % T; masked outputs are 0, or NaN
//                              when the visible part's sum is NaN, as PyTorch's
//                              masked_fill(-inf) then softmax)
//   log_softmax_last_axis     y[r, k] = x[r, k] - m_r - log(s_r)
//   softmax_backward          dx = y * (dy - sum_k(dy * y))               one threadgroup per row
//                             (causal: dx = 0 at the masked positions, masked_fill's gradient)
//   log_softmax_backward      dx = dy - exp(y) * sum_k(dy)                 one threadgroup per row
//   cross_entropy_forward     loss_r = m_r + log(s_r) - x[r, target_r], probs = softmax(x)
//                             (the mean over rows is sum_last_axis with scale 1/N, ops_reduce)
//   cross_entropy_backward    dx[r, k] = (probs[r, k] - (k == target_r)) * grad / N
// with m_r = max_k x[r, k] and s_r = sum_k exp(x[r, k] - m_r).
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

// Sum of `value` over the threadgroup; every thread returns it. partial: 32 floats.
static inline float threadgroup_sum(float value, threadgroup float *partial, uint lane,
                                    uint simd_group, uint num_simd_groups)
{
    value = simd_sum(value);
    if (lane == 0) {
        partial[simd_group] = value;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);  // all partials written
    float total = lane < num_simd_groups ? partial[lane] : 0.0f;
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

// x, y (rows, K). Threadgroup r computes row r in three sweeps: the max m, the sum s of
// exp(x - m), then y = exp(x - m) / s. causal_T == 0: no mask; otherwise row r only sees
// columns k <= r % causal_T (x is (..., T, S) attention scores) and y is 0 elsewhere.
kernel void softmax_last_axis(device const float *x [[buffer(0)]],
                              device float *y [[buffer(1)]],
                              constant uint &K [[buffer(2)]],
                              constant uint &causal_T [[buffer(3)]],
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
        m = max(m, xr[k]);
    }
    m = threadgroup_max(m, partial, lane, simd_group, num_simd_groups);

    float s = 0.0f;
    for (uint k = t; k < limit; k += T) {
        s += exp(xr[k] - m);
    }
    s = threadgroup_sum(s, partial, lane, simd_group, num_simd_groups);

    // A masked entry is exp(-inf - m) / s: 0, or NaN when s is NaN (PyTorch's result).
    const float masked = isnan(s) ? s : 0.0f;
    for (uint k = t; k < K; k += T) {
        yr[k] = k < limit ? exp(xr[k] - m) / s : masked;
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

// y = softmax(x), dy, dx (rows, K). Threadgroup r: dot = sum_k dy[r, k] * y[r, k], then
// dx = y * (dy - dot). causal_T as in softmax_last_axis: dx = 0 at the masked positions
// (not y * (dy - dot), which is NaN there when the row is NaN).
kernel void softmax_backward(device const float *y [[buffer(0)]],
                             device const float *dy [[buffer(1)]],
                             device float *dx [[buffer(2)]],
                             constant uint &K [[buffer(3)]],
                             constant uint &causal_T [[buffer(4)]],
                             uint row [[threadgroup_position_in_grid]],
                             uint t [[thread_position_in_threadgroup]],
                             uint T [[threads_per_threadgroup]],
                             uint lane [[thread_index_in_simdgroup]],
                             uint simd_group [[simdgroup_index_in_threadgroup]],
                             uint num_simd_groups [[simdgroups_per_threadgroup]])
{
    threadgroup float partial[32];
    uint base = row * K;
    float dot = 0.0f;
    for (uint k = t; k < K; k += T) {
        dot += dy[base + k] * y[base + k];
    }
    dot = threadgroup_sum(dot, partial, lane, simd_group, num_simd_groups);
    uint limit = causal_T == 0 ? uint(K) : min(uint(K), row % causal_T + 1);  // visible columns
    for (uint k = t; k < K; k += T) {
        dx[base + k] = k < limit ? y[base + k] * (dy[base + k] - dot) : 0.0f;
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
// backward needs. error is 3 ints, zero before the dispatch: a target outside [0, K) is
// counted in error[0]; the first thread to find one records its row in error[1] and the
// value in error[2], and its row loss is 0 (the kernel never reads outside the row).
// The host checks error after the dispatch and raises (see camel/backend_mps.py).
kernel void cross_entropy_forward(device const float *logits [[buffer(0)]],
                                  device const int *targets [[buffer(1)]],
                                  device float *row_loss [[buffer(2)]],
                                  device float *probs [[buffer(3)]],
                                  device atomic_int *error [[buffer(4)]],
                                  constant uint &K [[buffer(5)]],
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
        if (target < 0 || target >= int(K)) {
            int seen_before = atomic_fetch_add_explicit(&error[0], 1, memory_order_relaxed);
            if (seen_before == 0) {
                atomic_store_explicit(&error[1], int(row), memory_order_relaxed);
                atomic_store_explicit(&error[2], target, memory_order_relaxed);
            }
            row_loss[row] = 0.0f;
        } else {
            row_loss[row] = (m + log(s)) - xr[target];
        }
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
