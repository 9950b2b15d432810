// ops_reduce.metal — Stage 2: sum and max reductions (float32), and their backward.
//
// Every reduction sees its input as (outer, K, inner), C-contiguous, and reduces the
// K axis: the last axis is inner == 1, the whole tensor is outer == inner == 1, the
// leading axes (a bias gradient, sum_to_shape) are outer == 1.
//
// Kernels
//   sum_last_axis        out[r] = scale * sum_k x[r, k]          x (rows, K); one threadgroup per row
//   max_last_axis        values[r], indices[r] = max, argmax_k x[r, k]   (first maximum on ties)
//   sum_all_partials     partials[g] = sum of the elements threadgroup g visits   (pass 1 of 2)
//                        -> pass 2 is sum_last_axis over the (1, G) partials
//   max_all_partials     (value, flat index) of the maximum threadgroup g visits  (pass 1 of 2)
//   max_all_final        one threadgroup reduces the G partial (value, index) pairs (pass 2)
//   sum_axis_strided     out[o, j] = sum_k x[o, k, j]             one thread per output
//   max_axis_strided     values[o, j], indices[o, j] = max, argmax_k x[o, k, j]
//   sum_backward_expand  dx[o, k, j] = grad[o, j]                 one thread per dx element
//   max_backward         dx[o, k, j] = k == indices[o, j] ? grad[o, j] : 0
//
// The one optimisation of Stage 2 is the SIMD-group reduction. A threadgroup of T
// threads (a multiple of 32) reduces a row in three steps:
//   1. strided loads: thread t adds x[t], x[t + T], x[t + 2T], ... — at every step the
//      32 lanes of a SIMD group read 32 neighbouring floats (coalesced);
//   2. simd_sum / simd_max: the 32 lanes of each SIMD group combine their values in
//      registers, with no threadgroup memory and no barrier;
//   3. threadgroup combine: lane 0 of each SIMD group writes its result to threadgroup
//      memory, one barrier, then every SIMD group reads the (at most 32) partials and
//      combines them with one more simd_sum. A second barrier lets the caller reuse the
//      threadgroup memory.
// A classic tree reduction in threadgroup memory needs log2(T) barriers; this needs two.
//
// Ties in max: the first (smallest-index) maximum wins, like np.argmax and the CPU
// reference (camel/backend_cpu.py). Every thread scans its indices in increasing order
// keeping a strictly greater value, and every combine prefers the smaller index on
// equal values.
//
// NaN: larger than every number, as np.argmax and torch.max (a line with a NaN gives
// NaN and the index of its first NaN). Metal's max and simd_max return the non-NaN
// operand, so the scans test isnan themselves and the combines first look for a NaN
// (the smallest index holding one) before taking simd_max of the numbers.
//
// Sizes: element counts and indices are 32-bit (fewer than 2^32 elements).
//
// Run:        camel/backend_mps.py: sum, max, sum_backward, max_backward, sum_to_shape.
// Test:       python -m pytest -q tests/test_kernels_reduce.py
// Benchmark:  python -m camel.bench reduce

#include <metal_stdlib>
using namespace metal;

// "No index yet": larger than any real index, so a min over indices ignores it. A macro,
// not a `constant` variable, so `cond ? index : NO_INDEX` never mixes address spaces.
#define NO_INDEX 0xFFFFFFFFu

// Sum of `value` over every thread of the threadgroup; every thread returns the total.
// partial: threadgroup memory of at least 32 floats (one per SIMD group).
// The threadgroup size must be a multiple of 32 (all lanes of every SIMD group active).
static inline float threadgroup_sum(float value, threadgroup float *partial, uint lane,
                                    uint simd_group, uint num_simd_groups)
{
    value = simd_sum(value);  // step 2: within each SIMD group, in registers
    if (lane == 0) {
        partial[simd_group] = value;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);  // all partials written
    float total = lane < num_simd_groups ? partial[lane] : 0.0f;
    total = simd_sum(total);  // step 3: every SIMD group combines all partials
    threadgroup_barrier(mem_flags::mem_threadgroup);  // all partials read: safe to reuse
    return total;
}

// Is (v, i) a better maximum than (best, best_index)? NaN first (it beats any number),
// then the larger value; on equal values (two NaNs included) the smaller index wins.
static inline bool better_max(float v, uint i, float best, uint best_index)
{
    if (isnan(v) != isnan(best)) {
        return isnan(v);
    }
    return v > best || ((v == best || isnan(v)) && i < best_index);
}

// Maximum and its index over the 32 lanes of a SIMD group; every lane gets both.
// A NaN wins: the smallest index holding one. Otherwise the max and its first index.
static inline void simd_argmax(thread float &value, thread uint &index)
{
    uint nan_i = simd_min(isnan(value) ? index : NO_INDEX);
    float m = simd_max(value);  // ignores NaN
    uint i = simd_min(value == m ? index : NO_INDEX);  // first lane index holding the max
    if (nan_i != NO_INDEX) {
        m = NAN;
        i = nan_i;
    }
    value = m;
    index = i;
}

// Maximum and its index over every thread of the threadgroup; every thread gets both.
// A thread that saw no element passes (-INFINITY, NO_INDEX).
static inline void threadgroup_argmax(thread float &value, thread uint &index,
                                      threadgroup float *partial_value,
                                      threadgroup uint *partial_index, uint lane,
                                      uint simd_group, uint num_simd_groups)
{
    float m = value;
    uint i = index;
    simd_argmax(m, i);
    if (lane == 0) {
        partial_value[simd_group] = m;
        partial_index[simd_group] = i;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    float v = lane < num_simd_groups ? partial_value[lane] : -INFINITY;
    uint vi = lane < num_simd_groups ? partial_index[lane] : NO_INDEX;
    simd_argmax(v, vi);
    threadgroup_barrier(mem_flags::mem_threadgroup);
    value = v;
    index = vi;
}

// ---------------------------------------------------------------------------
// over the last axis: one threadgroup per row
// ---------------------------------------------------------------------------

// x is (rows, K), out is (rows,). Threadgroup r reduces row r; thread t of T adds
// x[r, t], x[r, t + T], ... and the threadgroup combines the T sums.
// scale multiplies the result (1 for sum, 1/K for a mean).
kernel void sum_last_axis(device const float *x [[buffer(0)]],
                          device float *out [[buffer(1)]],
                          constant uint &K [[buffer(2)]],
                          constant float &scale [[buffer(3)]],
                          uint row [[threadgroup_position_in_grid]],
                          uint t [[thread_position_in_threadgroup]],
                          uint T [[threads_per_threadgroup]],
                          uint lane [[thread_index_in_simdgroup]],
                          uint simd_group [[simdgroup_index_in_threadgroup]],
                          uint num_simd_groups [[simdgroups_per_threadgroup]])
{
    threadgroup float partial[32];
    device const float *xr = x + row * K;
    float acc = 0.0f;
    for (uint k = t; k < K; k += T) {
        acc += xr[k];
    }
    float total = threadgroup_sum(acc, partial, lane, simd_group, num_simd_groups);
    if (t == 0) {
        out[row] = scale * total;
    }
}

// x is (rows, K); values and indices are (rows,). Threadgroup r finds the maximum of
// row r and its position k (the first one on ties).
kernel void max_last_axis(device const float *x [[buffer(0)]],
                          device float *values [[buffer(1)]],
                          device int *indices [[buffer(2)]],
                          constant uint &K [[buffer(3)]],
                          uint row [[threadgroup_position_in_grid]],
                          uint t [[thread_position_in_threadgroup]],
                          uint T [[threads_per_threadgroup]],
                          uint lane [[thread_index_in_simdgroup]],
                          uint simd_group [[simdgroup_index_in_threadgroup]],
                          uint num_simd_groups [[simdgroups_per_threadgroup]])
{
    threadgroup float partial_value[32];
    threadgroup uint partial_index[32];
    device const float *xr = x + row * K;
    float best = -INFINITY;
    uint best_index = NO_INDEX;
    for (uint k = t; k < K; k += T) {
        if (better_max(xr[k], k, best, best_index)) {
            best = xr[k];
            best_index = k;
        }
    }
    threadgroup_argmax(best, best_index, partial_value, partial_index, lane, simd_group,
                       num_simd_groups);
    if (t == 0) {
        values[row] = best;
        indices[row] = int(best_index);
    }
}

// ---------------------------------------------------------------------------
// over the whole tensor: two passes
// ---------------------------------------------------------------------------

// Pass 1. x has n elements; the grid has G threadgroups of T threads. Thread t of group g
// visits i = g*T + t, then i + G*T, ... (a grid-stride loop: each step of the whole grid
// reads G*T neighbouring floats), and group g writes the sum of what its threads saw to
// partials[g]. Pass 2 is sum_last_axis over partials as one row of G.
kernel void sum_all_partials(device const float *x [[buffer(0)]],
                             device float *partials [[buffer(1)]],
                             constant uint &n [[buffer(2)]],
                             uint g [[threadgroup_position_in_grid]],
                             uint G [[threadgroups_per_grid]],
                             uint t [[thread_position_in_threadgroup]],
                             uint T [[threads_per_threadgroup]],
                             uint lane [[thread_index_in_simdgroup]],
                             uint simd_group [[simdgroup_index_in_threadgroup]],
                             uint num_simd_groups [[simdgroups_per_threadgroup]])
{
    threadgroup float partial[32];
    float acc = 0.0f;
    for (uint i = g * T + t; i < n; i += G * T) {
        acc += x[i];
    }
    float total = threadgroup_sum(acc, partial, lane, simd_group, num_simd_groups);
    if (t == 0) {
        partials[g] = total;
    }
}

// Pass 1 of the whole-tensor max: like sum_all_partials, but each group writes the
// maximum it saw and its flat index in x.
kernel void max_all_partials(device const float *x [[buffer(0)]],
                             device float *partial_values [[buffer(1)]],
                             device uint *partial_indices [[buffer(2)]],
                             constant uint &n [[buffer(3)]],
                             uint g [[threadgroup_position_in_grid]],
                             uint G [[threadgroups_per_grid]],
                             uint t [[thread_position_in_threadgroup]],
                             uint T [[threads_per_threadgroup]],
                             uint lane [[thread_index_in_simdgroup]],
                             uint simd_group [[simdgroup_index_in_threadgroup]],
                             uint num_simd_groups [[simdgroups_per_threadgroup]])
{
    threadgroup float partial_value[32];
    threadgroup uint partial_index[32];
    float best = -INFINITY;
    uint best_index = NO_INDEX;
    for (uint i = g * T + t; i < n; i += G * T) {
        if (better_max(x[i], i, best, best_index)) {
            best = x[i];
            best_index = i;
        }
    }
    threadgroup_argmax(best, best_index, partial_value, partial_index, lane, simd_group,
                       num_simd_groups);
    if (t == 0) {
        partial_values[g] = best;
        partial_indices[g] = best_index;
    }
}

// Pass 2 of the whole-tensor max: one threadgroup reduces the G pairs
// (partial_values[g], partial_indices[g]) to value[0] and index[0] (a flat index of x).
kernel void max_all_final(device const float *partial_values [[buffer(0)]],
                          device const uint *partial_indices [[buffer(1)]],
                          device float *value [[buffer(2)]],
                          device int *index [[buffer(3)]],
                          constant uint &G [[buffer(4)]],
                          uint t [[thread_position_in_threadgroup]],
                          uint T [[threads_per_threadgroup]],
                          uint lane [[thread_index_in_simdgroup]],
                          uint simd_group [[simdgroup_index_in_threadgroup]],
                          uint num_simd_groups [[simdgroups_per_threadgroup]])
{
    threadgroup float partial_value[32];
    threadgroup uint partial_index[32];
    float best = -INFINITY;
    uint best_index = NO_INDEX;
    for (uint g = t; g < G; g += T) {
        if (better_max(partial_values[g], partial_indices[g], best, best_index)) {
            best = partial_values[g];
            best_index = partial_indices[g];
        }
    }
    threadgroup_argmax(best, best_index, partial_value, partial_index, lane, simd_group,
                       num_simd_groups);
    if (t == 0) {
        value[0] = best;
        index[0] = int(best_index);
    }
}

// ---------------------------------------------------------------------------
// over a leading or middle axis: one thread per output element
// ---------------------------------------------------------------------------

// x is (outer, K, inner), out is (outer, inner). One thread computes out[o, j] by walking
// down column j: x[o, 0, j], x[o, 1, j], ... Neighbouring threads take neighbouring j, so
// each step of the loop reads neighbouring floats (coalesced). This is the bias gradient
// (outer == 1: sum a (B, C) gradient over B) and sum_to_shape. Grid: outer * inner threads.
kernel void sum_axis_strided(device const float *x [[buffer(0)]],
                             device float *out [[buffer(1)]],
                             constant uint &K [[buffer(2)]],
                             constant uint &inner [[buffer(3)]],
                             constant uint &n_out [[buffer(4)]],
                             uint i [[thread_position_in_grid]])
{
    if (i >= n_out) {
        return;
    }
    uint o = i / inner;
    uint j = i % inner;
    device const float *column = x + o * K * inner + j;
    float acc = 0.0f;
    for (uint k = 0; k < K; ++k) {
        acc += column[k * inner];
    }
    out[i] = acc;
}

// x is (outer, K, inner); values and indices are (outer, inner). One thread walks column
// j of slab o and keeps the first maximum. Grid: outer * inner threads.
kernel void max_axis_strided(device const float *x [[buffer(0)]],
                             device float *values [[buffer(1)]],
                             device int *indices [[buffer(2)]],
                             constant uint &K [[buffer(3)]],
                             constant uint &inner [[buffer(4)]],
                             constant uint &n_out [[buffer(5)]],
                             uint i [[thread_position_in_grid]])
{
    if (i >= n_out) {
        return;
    }
    uint o = i / inner;
    uint j = i % inner;
    device const float *column = x + o * K * inner + j;
    float best = column[0];
    uint best_index = 0;
    for (uint k = 1; k < K; ++k) {
        float v = column[k * inner];
        if (v > best || (isnan(v) && !isnan(best))) {  // the first maximum (or NaN) wins
            best = v;
            best_index = k;
        }
    }
    values[i] = best;
    indices[i] = int(best_index);
}

// ---------------------------------------------------------------------------
// backward
// ---------------------------------------------------------------------------

// Gradient of sum over K: dx (outer, K, inner), grad (outer, inner). One thread writes
// dx[i] = grad[o, j] for its i = (o, k, j). Grid: n = outer * K * inner threads.
kernel void sum_backward_expand(device const float *grad [[buffer(0)]],
                                device float *dx [[buffer(1)]],
                                constant uint &K [[buffer(2)]],
                                constant uint &inner [[buffer(3)]],
                                constant uint &n [[buffer(4)]],
                                uint i [[thread_position_in_grid]])
{
    if (i < n) {
        uint o = i / (K * inner);
        uint j = i % inner;
        dx[i] = grad[o * inner + j];
    }
}

// Gradient of max over K: the gradient goes to the argmax, zero elsewhere.
// dx (outer, K, inner); grad and indices (outer, inner). One thread writes dx[i] for its
// i = (o, k, j): a gather, so no thread races another and dx needs no zero fill first.
kernel void max_backward(device const float *grad [[buffer(0)]],
                         device const int *indices [[buffer(1)]],
                         device float *dx [[buffer(2)]],
                         constant uint &K [[buffer(3)]],
                         constant uint &inner [[buffer(4)]],
                         constant uint &n [[buffer(5)]],
                         uint i [[thread_position_in_grid]])
{
    if (i < n) {
        uint o = i / (K * inner);
        uint k = (i / inner) % K;
        uint j = i % inner;
        uint src = o * inner + j;
        dx[i] = uint(indices[src]) == k ? grad[src] : 0.0f;
    }
}

// ---------------------------------------------------------------------------
// version 2: enough independent loads in flight to fill a large GPU
// ---------------------------------------------------------------------------
//
// The kernels above are right and coalesced, but on a GPU with many cores they leave
// most of its memory parallelism unused (measured on an H200, docs/cuda.md "Memory-bound
// kernels": the row sum at 45 % of the copy bandwidth, the row max at 31 %, the column
// sum at 2 % — a (65536, 1024) bias gradient ran on 1024 threads). A memory-bound kernel
// is fast when many bytes are on their way at once: many SIMD groups, each lane with
// several 16-byte loads issued before it uses the first. Version 2:
//   sum_last_axis_v2, max_last_axis_v2   one SIMD group per row (P = 2, 4, 8 or 16 SIMD
//       groups for rows longer than 1024 floats), threadgroups of max(8, P) SIMD groups. Lane
//       l of part p reads float4 number 32 p + l, then + 32 P, ... of its row, four in flight;
//       simd_sum / simd_max combine the lanes, and only a row shared by P > 1 SIMD groups
//       goes through threadgroup memory.
//   sum_all_partials_v2   pass 1 of the whole-tensor sum with float4 loads, four in flight
//   sum_axis_blocks_float4 / _float   the column sum (bias gradient, sum_to_shape, a middle
//       axis) in two dispatches of one kernel: a threadgroup of 32 x 8 threads owns 32
//       columns (float4s when inner % 4 == 0) and a block of rows; its 8 slices of threads
//       add every 8th row, then combine in threadgroup memory in slice order and write one
//       partial per (block, column). The second dispatch adds the blocks' partials in
//       block order. Deterministic, no atomics.
// The host (camel/backend_mps.py) picks version 2 unless CAMEL_MEMORY_KERNELS=1.

// Sum of p[first], p[first + stride], ... below n, in that order. Four loads are issued
// before the first add: they do not depend on each other, so the GPU keeps all four in
// flight. (The indices stay below 2^32: n + 3 * stride does, for n < 2^32 - 768.)
template <typename V>
static inline V strided_sum(device const V *p, uint n, uint first, uint stride)
{
    V acc = V(0.0f);
    uint i = first;
    for (; i + 3 * stride < n; i += 4 * stride) {
        V a = p[i];
        V b = p[i + stride];
        V c = p[i + 2 * stride];
        V d = p[i + 3 * stride];
        acc += (a + b) + (c + d);
    }
    for (; i < n; i += stride) {
        acc += p[i];
    }
    return acc;
}

static inline float horizontal_sum(float4 v)
{
    return (v.x + v.y) + (v.z + v.w);
}

// Sum of `value` over the P SIMD groups sharing a row (consecutive SIMD groups; P = 1, 2,
// 4, 8 or 16, the same for the whole threadgroup, so every thread takes the same branch and
// reaches the same barriers); every lane of them returns the total.
// partial: one float per SIMD group of the threadgroup.
static inline float row_sum(float value, threadgroup float *partial, uint P, uint lane,
                            uint simd_group)
{
    value = simd_sum(value);
    if (P == 1) {
        return value;  // the row is this SIMD group's: no threadgroup memory, no barrier
    }
    if (lane == 0) {
        partial[simd_group] = value;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    uint first = simd_group - simd_group % P;
    float total = 0.0f;
    for (uint s = 0; s < P; s++) {
        total += partial[first + s];  // the same order in every lane
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);  // all read: partial may be reused
    return total;
}

// x is (rows, K), out is (rows,): out[r] = scale * sum_k x[r, k], as sum_last_axis.
// Threadgroups of S = max(8, P) SIMD groups (256 or 512 threads); SIMD groups g P ..
// g P + P - 1 of threadgroup t share row t S / P + g (the host picks the fewest P in 1, 2,
// 4, 8, 16 with K <= 1024 P). vec4 = 1 when K % 4 == 0 and x is 16-byte aligned (every row
// then starts aligned: read as K / 4 float4s); 0: floats. Grid: ceil(rows P / S) threadgroups.
kernel void sum_last_axis_v2(device const float *x [[buffer(0)]],
                             device float *out [[buffer(1)]],
                             constant uint &rows [[buffer(2)]],
                             constant uint &K [[buffer(3)]],
                             constant float &scale [[buffer(4)]],
                             constant uint &P [[buffer(5)]],
                             constant uint &vec4 [[buffer(6)]],
                             uint group [[threadgroup_position_in_grid]],
                             uint lane [[thread_index_in_simdgroup]],
                             uint simd_group [[simdgroup_index_in_threadgroup]],
                             uint num_simd_groups [[simdgroups_per_threadgroup]])
{
    threadgroup float partial[32];
    uint row = group * (num_simd_groups / P) + simd_group / P;
    uint first = (simd_group % P) * 32 + lane;  // this lane's first float4 (or float)
    float acc = 0.0f;
    if (row < rows) {  // a SIMD group past the last row adds nothing but joins the barriers
        device const float *xr = x + row * K;
        if (vec4 != 0) {
            acc = horizontal_sum(strided_sum((device const float4 *)xr, K / 4, first, 32 * P));
        } else {
            acc = strided_sum(xr, K, first, 32 * P);
        }
    }
    float total = row_sum(acc, partial, P, lane, simd_group);
    if (row < rows && first == 0) {
        out[row] = scale * total;
    }
}

// Pass 1 of the whole-tensor sum, version 2: as sum_all_partials (thread t of group g starts
// at g T + t and strides by G T over the whole tensor: each step of the grid reads G T
// neighbouring float4s), with float4 loads (vec4 = 1: x 16-byte aligned) four in flight;
// the last n % 4 elements are added by thread 0 of group 0. Pass 2 is sum_last_axis_v2
// over the (1, G) partials.
kernel void sum_all_partials_v2(device const float *x [[buffer(0)]],
                                device float *partials [[buffer(1)]],
                                constant uint &n [[buffer(2)]],
                                constant uint &vec4 [[buffer(3)]],
                                uint g [[threadgroup_position_in_grid]],
                                uint G [[threadgroups_per_grid]],
                                uint t [[thread_position_in_threadgroup]],
                                uint T [[threads_per_threadgroup]],
                                uint lane [[thread_index_in_simdgroup]],
                                uint simd_group [[simdgroup_index_in_threadgroup]],
                                uint num_simd_groups [[simdgroups_per_threadgroup]])
{
    threadgroup float partial[32];
    float acc;
    if (vec4 != 0) {
        acc = horizontal_sum(strided_sum((device const float4 *)x, n / 4, g * T + t, G * T));
        if (g == 0 && t == 0) {
            for (uint i = n / 4 * 4; i < n; i++) {
                acc += x[i];
            }
        }
    } else {
        acc = strided_sum(x, n, g * T + t, G * T);
    }
    float total = threadgroup_sum(acc, partial, lane, simd_group, num_simd_groups);
    if (t == 0) {
        partials[g] = total;
    }
}

// One step of a lane's scan in increasing index order: v at index i replaces the best so
// far when it is larger, a NaN (NaN beats every number), or the first element seen (a row
// of -inf). Nothing replaces a NaN, and an equal value never replaces: the first wins.
static inline void scan_max(float v, uint i, thread float &best, thread uint &best_index)
{
    if (!isnan(best) && (v > best || isnan(v) || best_index == NO_INDEX)) {
        best = v;
        best_index = i;
    }
}

static inline void scan_max(float4 v, uint q, thread float &best, thread uint &best_index)
{
    scan_max(v.x, 4 * q, best, best_index);
    scan_max(v.y, 4 * q + 1, best, best_index);
    scan_max(v.z, 4 * q + 2, best, best_index);
    scan_max(v.w, 4 * q + 3, best, best_index);
}

// The maximum of p[first], p[first + stride], ... below n and its element index (the first
// one on ties, NaN first), four loads in flight as in strided_sum.
template <typename V>
static inline void strided_argmax(device const V *p, uint n, uint first, uint stride,
                                  thread float &best, thread uint &best_index)
{
    uint i = first;
    for (; i + 3 * stride < n; i += 4 * stride) {
        V a = p[i];
        V b = p[i + stride];
        V c = p[i + 2 * stride];
        V d = p[i + 3 * stride];
        scan_max(a, i, best, best_index);
        scan_max(b, i + stride, best, best_index);
        scan_max(c, i + 2 * stride, best, best_index);
        scan_max(d, i + 3 * stride, best, best_index);
    }
    for (; i < n; i += stride) {
        scan_max(p[i], i, best, best_index);
    }
}

// Maximum and index over the P SIMD groups sharing a row (as row_sum); every lane of them
// gets both. The SIMD groups' indices interleave, so the combine prefers the smaller index.
static inline void row_argmax(thread float &value, thread uint &index,
                              threadgroup float *partial_value, threadgroup uint *partial_index,
                              uint P, uint lane, uint simd_group)
{
    simd_argmax(value, index);
    if (P == 1) {
        return;
    }
    if (lane == 0) {
        partial_value[simd_group] = value;
        partial_index[simd_group] = index;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    uint first = simd_group - simd_group % P;
    float best = -INFINITY;
    uint best_index = NO_INDEX;
    for (uint s = 0; s < P; s++) {
        if (better_max(partial_value[first + s], partial_index[first + s], best, best_index)) {
            best = partial_value[first + s];
            best_index = partial_index[first + s];
        }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    value = best;
    index = best_index;
}

// x is (rows, K); values and indices are (rows,): the maximum of each row and its first
// index, as max_last_axis, with the geometry of sum_last_axis_v2.
kernel void max_last_axis_v2(device const float *x [[buffer(0)]],
                             device float *values [[buffer(1)]],
                             device int *indices [[buffer(2)]],
                             constant uint &rows [[buffer(3)]],
                             constant uint &K [[buffer(4)]],
                             constant uint &P [[buffer(5)]],
                             constant uint &vec4 [[buffer(6)]],
                             uint group [[threadgroup_position_in_grid]],
                             uint lane [[thread_index_in_simdgroup]],
                             uint simd_group [[simdgroup_index_in_threadgroup]],
                             uint num_simd_groups [[simdgroups_per_threadgroup]])
{
    threadgroup float partial_value[32];
    threadgroup uint partial_index[32];
    uint row = group * (num_simd_groups / P) + simd_group / P;
    uint first = (simd_group % P) * 32 + lane;
    float best = -INFINITY;
    uint best_index = NO_INDEX;
    if (row < rows) {
        device const float *xr = x + row * K;
        if (vec4 != 0) {
            strided_argmax((device const float4 *)xr, K / 4, first, 32 * P, best, best_index);
        } else {
            strided_argmax(xr, K, first, 32 * P, best, best_index);
        }
    }
    row_argmax(best, best_index, partial_value, partial_index, P, lane, simd_group);
    if (row < rows && first == 0) {
        values[row] = best;
        indices[row] = int(best_index);
    }
}

// The column sum. x is (outer, K, inner) and partials (outer, blocks, inner), in units of
// V (float4 when the true inner % 4 == 0 and x is 16-byte aligned, else float).
// Threadgroup (gx, b, o) has 32 x 8 threads: thread (c, s) adds column j = 32 gx + c over
// the rows k = b R + s, b R + s + 8, ... below min(K, (b + 1) R), four rows in flight; the
// 8 slices then add their sums in slice order and partials[o, b, j] gets the total.
// Neighbouring threads read neighbouring columns: a slice reads 32 V's of a row at once.
// With one block (blocks == 1, R >= K) it is the whole column sum; otherwise the host runs
// it again on the partials, as (outer, blocks, inner) with R = blocks.
// Grid: (ceil(inner / 32), blocks, outer) threadgroups of (32, 8, 1).
constant uint COL_WIDTH = 32;  // columns per threadgroup
constant uint COL_SLICES = 8;  // rows added side by side

template <typename V>
kernel void sum_axis_blocks(device const V *x [[buffer(0)]],
                            device V *partials [[buffer(1)]],
                            constant uint &K [[buffer(2)]],
                            constant uint &inner [[buffer(3)]],
                            constant uint &R [[buffer(4)]],
                            uint3 group [[threadgroup_position_in_grid]],
                            uint3 groups [[threadgroups_per_grid]],
                            uint2 t [[thread_position_in_threadgroup]])
{
    threadgroup V slice_sum[COL_SLICES][COL_WIDTH];
    uint j = group.x * COL_WIDTH + t.x;
    uint end = min(K, group.y * R + R);
    V acc = V(0.0f);
    if (j < inner) {
        device const V *column = x + group.z * K * inner + j;
        uint k = group.y * R + t.y;
        for (; k + 3 * COL_SLICES < end; k += 4 * COL_SLICES) {
            V a = column[k * inner];
            V b = column[(k + COL_SLICES) * inner];
            V c = column[(k + 2 * COL_SLICES) * inner];
            V d = column[(k + 3 * COL_SLICES) * inner];
            acc += (a + b) + (c + d);
        }
        for (; k < end; k += COL_SLICES) {
            acc += column[k * inner];
        }
    }
    slice_sum[t.y][t.x] = acc;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    if (t.y == 0 && j < inner) {
        V total = slice_sum[0][t.x];
        for (uint s = 1; s < COL_SLICES; s++) {
            total += slice_sum[s][t.x];
        }
        partials[(group.z * groups.y + group.y) * inner + j] = total;
    }
}

#define SUM_AXIS_BLOCKS(NAME, V)                                                               \
    template [[host_name(NAME)]] kernel void sum_axis_blocks<V>(                               \
        device const V *x [[buffer(0)]], device V *partials [[buffer(1)]],                     \
        constant uint &K [[buffer(2)]], constant uint &inner [[buffer(3)]],                    \
        constant uint &R [[buffer(4)]], uint3 group [[threadgroup_position_in_grid]],          \
        uint3 groups [[threadgroups_per_grid]], uint2 t [[thread_position_in_threadgroup]]);

SUM_AXIS_BLOCKS("sum_axis_blocks_float4", float4)
SUM_AXIS_BLOCKS("sum_axis_blocks_float", float)
