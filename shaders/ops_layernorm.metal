// ops_layernorm.metal — Stage 4: LayerNorm forward and backward, GELU forward and backward
// (float32).
//
// Kernels (x is (rows, D) C-contiguous: any leading shape flattened to rows)
//   layernorm_forward_v1        three sweeps over the row: mean, then the variance of the
//                               centred values, then out = (x - mean) * rstd * w + b
//   layernorm_forward_v2        two sweeps: sum and sum of squares together (shifted by the
//                               row's first element, see below), then the write sweep
//   layernorm_forward_v3        ONE read: each thread keeps its (at most 4) columns of the row
//                               in registers, so mean, variance and output need no re-read
//                               (D <= 4 * threads per threadgroup, i.e. D <= 1024)
//   layernorm_forward_v4        v3's one read with a SIMD group per row (more for rows past
//                               1024 floats, D <= 16384) and float4 loads: no threadgroup
//                               memory, enough rows in flight to fill a large GPU
//     all: also write mean[r] and rstd[r] = 1 / sqrt(var + eps); v1-v3 one threadgroup per row
//   layernorm_backward_dx       dx = rstd * (g - mean_D(g) - xhat * mean_D(g * xhat)),
//                               g = grad * w: one threadgroup per row, two sweeps
//   layernorm_backward_params   dw[d] = sum_r grad[r, d] * xhat[r, d], db[d] = sum_r grad[r, d]:
//                               a column reduction, one thread per column d, rows summed in
//                               order (deterministic, no atomics)
//   layernorm_backward_params_blocked   the same in two passes for many rows: one thread per
//                               (column, block of rows) writes partial sums (blocks, D); the
//                               host then sums the partials over blocks, in order, with
//                               sum_axis_strided (ops_reduce.metal): D * blocks threads
//                               instead of D, and still deterministic
//   layernorm_backward_v2       dx, and per block of rows partial dw and db, from ONE read of
//                               grad and x (a SIMD group per row, D <= 1024; see below)
//   layernorm_backward_v3       v2 with a row shared by 1 to 8 SIMD groups: a quarter of
//                               the registers a lane, D <= 2048 (see below)
//   gelu_forward                out = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
//   gelu_backward               dx = grad * gelu'(x)                 one thread per element
//   gelu_forward_float4, gelu_backward_float4   the same, four elements per thread, as
//                               x * sigmoid(2u) (see below)
//
// The optimisation of Stage 4 is "fewer passes over memory". LayerNorm is memory bound:
// a row is read from device memory once per sweep. v1 reads it three times and writes it
// once; v2 reads it twice; v3 once (the row stays in registers). v2 gets the variance from
// the same sweep as the mean with
// var = E[(x - s)^2] - E[x - s]^2. The shift s (the row's first element) keeps the two
// terms small: without it, a row with mean 1000 and std 1 subtracts two numbers near 1e6
// and float32 keeps only ~0.1 of the variance. (Welford's algorithm is the other cure.)
// The backward dx kernel likewise computes both row means in ONE sweep.
//
// Thread mapping for the row kernels: T threads (a multiple of 32) per row; thread t visits
// columns t, t + T, t + 2T, ... (neighbouring threads read neighbouring floats), and the
// partial sums are combined with simd_sum and one exchange through threadgroup memory.
//
// Run:        camel/backend_mps.py: layer_norm, layer_norm_backward, gelu, gelu_backward.
// Test:       python -m pytest -q tests/test_transformer_kernels.py
// Lesson:     docs/stage4.md

#include <metal_stdlib>
using namespace metal;

// Sum of `value` over the threadgroup; every thread returns it. partial: 32 floats.
// (The same helper as in ops_reduce.metal: each .metal file is compiled on its own.)
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

// x, out (rows, D); w, b (D,); mean, rstd (rows,). Threadgroup r normalises row r.
// version 1: sweep 1 sums x -> mean; sweep 2 sums (x - mean)^2 -> var; sweep 3 writes.
kernel void layernorm_forward_v1(device const float *x [[buffer(0)]],
                                 device const float *w [[buffer(1)]],
                                 device const float *b [[buffer(2)]],
                                 device float *out [[buffer(3)]],
                                 device float *mean_out [[buffer(4)]],
                                 device float *rstd_out [[buffer(5)]],
                                 constant uint &D [[buffer(6)]],
                                 constant float &eps [[buffer(7)]],
                                 uint row [[threadgroup_position_in_grid]],
                                 uint t [[thread_position_in_threadgroup]],
                                 uint T [[threads_per_threadgroup]],
                                 uint lane [[thread_index_in_simdgroup]],
                                 uint simd_group [[simdgroup_index_in_threadgroup]],
                                 uint num_simd_groups [[simdgroups_per_threadgroup]])
{
    threadgroup float partial[32];
    device const float *xr = x + row * D;
    device float *outr = out + row * D;

    float s = 0.0f;
    for (uint k = t; k < D; k += T) {
        s += xr[k];
    }
    float mean = threadgroup_sum(s, partial, lane, simd_group, num_simd_groups) / float(D);

    float ss = 0.0f;
    for (uint k = t; k < D; k += T) {
        float c = xr[k] - mean;
        ss += c * c;
    }
    float var = threadgroup_sum(ss, partial, lane, simd_group, num_simd_groups) / float(D);
    float rstd = 1.0f / sqrt(var + eps);

    for (uint k = t; k < D; k += T) {
        outr[k] = (xr[k] - mean) * rstd * w[k] + b[k];
    }
    if (t == 0) {
        mean_out[row] = mean;
        rstd_out[row] = rstd;
    }
}

// version 2: the same result with one sweep less. Sweep 1 sums d = x - shift and d^2 at
// once (shift = the row's first element); sweep 2 writes.
kernel void layernorm_forward_v2(device const float *x [[buffer(0)]],
                                 device const float *w [[buffer(1)]],
                                 device const float *b [[buffer(2)]],
                                 device float *out [[buffer(3)]],
                                 device float *mean_out [[buffer(4)]],
                                 device float *rstd_out [[buffer(5)]],
                                 constant uint &D [[buffer(6)]],
                                 constant float &eps [[buffer(7)]],
                                 uint row [[threadgroup_position_in_grid]],
                                 uint t [[thread_position_in_threadgroup]],
                                 uint T [[threads_per_threadgroup]],
                                 uint lane [[thread_index_in_simdgroup]],
                                 uint simd_group [[simdgroup_index_in_threadgroup]],
                                 uint num_simd_groups [[simdgroups_per_threadgroup]])
{
    threadgroup float partial[32];
    device const float *xr = x + row * D;
    device float *outr = out + row * D;
    float shift = xr[0];  // every thread reads the same word: one broadcast load

    float s = 0.0f;
    float ss = 0.0f;
    for (uint k = t; k < D; k += T) {
        float d = xr[k] - shift;
        s += d;
        ss += d * d;
    }
    float mean_d = threadgroup_sum(s, partial, lane, simd_group, num_simd_groups) / float(D);
    float mean_dd = threadgroup_sum(ss, partial, lane, simd_group, num_simd_groups) / float(D);
    // Rounding may leave a tiny negative; an inf in the row gives inf - inf = NaN, which
    // must stay NaN (as in PyTorch), but Metal's max would return the 0.
    float var = mean_dd - mean_d * mean_d;
    var = isnan(var) ? var : max(var, 0.0f);
    float mean = shift + mean_d;
    float rstd = 1.0f / sqrt(var + eps);

    for (uint k = t; k < D; k += T) {
        outr[k] = (xr[k] - mean) * rstd * w[k] + b[k];
    }
    if (t == 0) {
        mean_out[row] = mean;
        rstd_out[row] = rstd;
    }
}

// version 3: the row is read from device memory once. Thread t holds columns t, t + T,
// t + 2T, t + 3T in a 4-float register array, so the centred variance (exact two-pass
// numerics, no shift trick needed) costs no second read. Memory traffic: 8 bytes per
// element (read x, write out), the minimum. Needs D <= 4 * T.
constant uint LN_PER_THREAD = 4;

kernel void layernorm_forward_v3(device const float *x [[buffer(0)]],
                                 device const float *w [[buffer(1)]],
                                 device const float *b [[buffer(2)]],
                                 device float *out [[buffer(3)]],
                                 device float *mean_out [[buffer(4)]],
                                 device float *rstd_out [[buffer(5)]],
                                 constant uint &D [[buffer(6)]],
                                 constant float &eps [[buffer(7)]],
                                 uint row [[threadgroup_position_in_grid]],
                                 uint t [[thread_position_in_threadgroup]],
                                 uint T [[threads_per_threadgroup]],
                                 uint lane [[thread_index_in_simdgroup]],
                                 uint simd_group [[simdgroup_index_in_threadgroup]],
                                 uint num_simd_groups [[simdgroups_per_threadgroup]])
{
    threadgroup float partial[32];
    device const float *xr = x + row * D;
    device float *outr = out + row * D;

    float v[LN_PER_THREAD];  // this thread's columns; 0 past the end of the row
    float s = 0.0f;
    for (uint j = 0; j < LN_PER_THREAD; j++) {
        uint k = t + j * T;
        v[j] = k < D ? xr[k] : 0.0f;
        s += v[j];
    }
    float mean = threadgroup_sum(s, partial, lane, simd_group, num_simd_groups) / float(D);

    float ss = 0.0f;
    for (uint j = 0; j < LN_PER_THREAD; j++) {
        float c = t + j * T < D ? v[j] - mean : 0.0f;
        ss += c * c;
    }
    float var = threadgroup_sum(ss, partial, lane, simd_group, num_simd_groups) / float(D);
    float rstd = 1.0f / sqrt(var + eps);

    for (uint j = 0; j < LN_PER_THREAD; j++) {
        uint k = t + j * T;
        if (k < D) {
            outr[k] = (v[j] - mean) * rstd * w[k] + b[k];
        }
    }
    if (t == 0) {
        mean_out[row] = mean;
        rstd_out[row] = rstd;
    }
}

// version 4: v3's one read with the geometry of a large GPU's row kernels. v3 gives a
// row to a threadgroup of 256 threads that load one float each and combine through
// threadgroup memory (70 % of the copy bandwidth on an H200, docs/cuda.md); v4 gives it
// P SIMD groups (1 up to 1024 floats, then 2, 4, 8, 16 up to 16384) in threadgroups of
// max(8, P) SIMD groups, and lane l of part p keeps float4 number (32 p + l) + 32 P j,
// j = 0 .. 7, of the row in registers (floats when D % 4 != 0 or an array is not 16-byte
// aligned). All 8 loads are issued before the first is used; the two row sums are
// simd_sum, through threadgroup memory only when P > 1; w and b are read as float4s too
// (every row reads the same D floats: from the cache). Numerics as v3 (centred variance).

static inline float horizontal_sum(float v)
{
    return v;
}

static inline float horizontal_sum(float4 v)
{
    return (v.x + v.y) + (v.z + v.w);
}

// Sum over the P SIMD groups sharing a row (consecutive SIMD groups; P the same for the
// whole threadgroup, so every thread reaches the same barriers); every lane returns it.
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

// One row of v4. V = float4 (N = 8) or float (N = 32); xr, outr the row as n V's; active:
// false for a SIMD group past the last row (it loads and writes nothing, joins the barriers).
template <typename V, uint N>
static inline void layernorm_row_v4(device const V *xr, device const V *w, device const V *b,
                                    device V *outr, uint n, uint D, float eps, bool active,
                                    uint first, uint stride, threadgroup float *partial,
                                    uint P, uint lane, uint simd_group, thread float &mean,
                                    thread float &rstd)
{
    V v[N];
#pragma clang loop unroll(full)
    for (uint j = 0; j < N; j++) {  // N independent loads in flight
        uint q = first + j * stride;
        v[j] = active && q < n ? xr[q] : V(0.0f);
    }
    float s = 0.0f;
#pragma clang loop unroll(full)
    for (uint j = 0; j < N; j++) {
        s += horizontal_sum(v[j]);
    }
    mean = row_sum(s, partial, P, lane, simd_group) / float(D);

    float ss = 0.0f;
#pragma clang loop unroll(full)
    for (uint j = 0; j < N; j++) {
        uint q = first + j * stride;
        V c = active && q < n ? v[j] - mean : V(0.0f);
        ss += horizontal_sum(c * c);
    }
    float var = row_sum(ss, partial, P, lane, simd_group) / float(D);
    rstd = 1.0f / sqrt(var + eps);

#pragma clang loop unroll(full)
    for (uint j = 0; j < N; j++) {
        uint q = first + j * stride;
        if (active && q < n) {
            outr[q] = (v[j] - mean) * rstd * w[q] + b[q];
        }
    }
}

// x, out (rows, D); w, b (D,); mean, rstd (rows,). P SIMD groups per row (the host picks
// the fewest of 1, 2, 4, 8, 16 with D <= 1024 P) in threadgroups of S = max(8, P) SIMD
// groups, S / P rows each; vec4 = 1 when D % 4 == 0 and every array is 16-byte aligned.
// Grid: ceil(rows P / S) threadgroups.
kernel void layernorm_forward_v4(device const float *x [[buffer(0)]],
                                 device const float *w [[buffer(1)]],
                                 device const float *b [[buffer(2)]],
                                 device float *out [[buffer(3)]],
                                 device float *mean_out [[buffer(4)]],
                                 device float *rstd_out [[buffer(5)]],
                                 constant uint &D [[buffer(6)]],
                                 constant float &eps [[buffer(7)]],
                                 constant uint &rows [[buffer(8)]],
                                 constant uint &P [[buffer(9)]],
                                 constant uint &vec4 [[buffer(10)]],
                                 uint group [[threadgroup_position_in_grid]],
                                 uint lane [[thread_index_in_simdgroup]],
                                 uint simd_group [[simdgroup_index_in_threadgroup]],
                                 uint num_simd_groups [[simdgroups_per_threadgroup]])
{
    threadgroup float partial[32];
    uint row = group * (num_simd_groups / P) + simd_group / P;
    uint first = (simd_group % P) * 32 + lane;
    bool active = row < rows;
    uint base = active ? row * D : 0;
    float mean;
    float rstd;
    if (vec4 != 0) {
        layernorm_row_v4<float4, 8>((device const float4 *)(x + base), (device const float4 *)w,
                                    (device const float4 *)b, (device float4 *)(out + base),
                                    D / 4, D, eps, active, first, 32 * P, partial, P, lane,
                                    simd_group, mean, rstd);
    } else {
        layernorm_row_v4<float, 32>(x + base, w, b, out + base, D, D, eps, active, first,
                                    32 * P, partial, P, lane, simd_group, mean, rstd);
    }
    if (active && first == 0) {
        mean_out[row] = mean;
        rstd_out[row] = rstd;
    }
}

// grad, x, dx (rows, D); w (D,); mean, rstd (rows,). Threadgroup r computes row r of dx.
// Sweep 1 sums g = grad * w and g * xhat together; sweep 2 writes dx.
kernel void layernorm_backward_dx(device const float *grad [[buffer(0)]],
                                  device const float *x [[buffer(1)]],
                                  device const float *w [[buffer(2)]],
                                  device const float *mean [[buffer(3)]],
                                  device const float *rstd [[buffer(4)]],
                                  device float *dx [[buffer(5)]],
                                  constant uint &D [[buffer(6)]],
                                  uint row [[threadgroup_position_in_grid]],
                                  uint t [[thread_position_in_threadgroup]],
                                  uint T [[threads_per_threadgroup]],
                                  uint lane [[thread_index_in_simdgroup]],
                                  uint simd_group [[simdgroup_index_in_threadgroup]],
                                  uint num_simd_groups [[simdgroups_per_threadgroup]])
{
    threadgroup float partial[32];
    device const float *gr = grad + row * D;
    device const float *xr = x + row * D;
    device float *dxr = dx + row * D;
    float m = mean[row];
    float r = rstd[row];

    float sg = 0.0f;
    float sgx = 0.0f;
    for (uint k = t; k < D; k += T) {
        float g = gr[k] * w[k];
        sg += g;
        sgx += g * (xr[k] - m) * r;
    }
    float mean_g = threadgroup_sum(sg, partial, lane, simd_group, num_simd_groups) / float(D);
    float mean_gx = threadgroup_sum(sgx, partial, lane, simd_group, num_simd_groups) / float(D);

    for (uint k = t; k < D; k += T) {
        float xhat = (xr[k] - m) * r;
        dxr[k] = r * (gr[k] * w[k] - mean_g - xhat * mean_gx);
    }
}

// grad, x (rows, D); mean, rstd (rows,); dw, db (D,). One thread per column d sums its
// column over the rows in order 0, 1, 2, ...: the same order every run, so the result is
// bit-identical run after run. Neighbouring threads read neighbouring columns of a row.
kernel void layernorm_backward_params(device const float *grad [[buffer(0)]],
                                      device const float *x [[buffer(1)]],
                                      device const float *mean [[buffer(2)]],
                                      device const float *rstd [[buffer(3)]],
                                      device float *dw [[buffer(4)]],
                                      device float *db [[buffer(5)]],
                                      constant uint &rows [[buffer(6)]],
                                      constant uint &D [[buffer(7)]],
                                      uint d [[thread_position_in_grid]])
{
    if (d >= D) {
        return;
    }
    float sw = 0.0f;
    float sb = 0.0f;
    for (uint r = 0; r < rows; r++) {
        float g = grad[r * D + d];
        sw += g * (x[r * D + d] - mean[r]) * rstd[r];
        sb += g;
    }
    dw[d] = sw;
    db[d] = sb;
}

// grad, x (rows, D); mean, rstd (rows,); partial_w, partial_b (blocks, D). One thread per
// (d, blk) (grid x = column, y = block) sums rows blk * rows_per_block ... in order.
kernel void layernorm_backward_params_blocked(device const float *grad [[buffer(0)]],
                                              device const float *x [[buffer(1)]],
                                              device const float *mean [[buffer(2)]],
                                              device const float *rstd [[buffer(3)]],
                                              device float *partial_w [[buffer(4)]],
                                              device float *partial_b [[buffer(5)]],
                                              constant uint &rows [[buffer(6)]],
                                              constant uint &D [[buffer(7)]],
                                              constant uint &rows_per_block [[buffer(8)]],
                                              uint2 pos [[thread_position_in_grid]])
{
    uint d = pos.x;
    uint blk = pos.y;
    uint first = blk * rows_per_block;
    if (d >= D || first >= rows) {
        return;
    }
    uint last = min(rows, first + rows_per_block);
    float sw = 0.0f;
    float sb = 0.0f;
    for (uint r = first; r < last; r++) {
        float g = grad[r * D + d];
        sw += g * (x[r * D + d] - mean[r]) * rstd[r];
        sb += g;
    }
    partial_w[blk * D + d] = sw;
    partial_b[blk * D + d] = sb;
}

// GELU, tanh approximation (PyTorch's approximate="tanh"). precise::tanh pins the precise
// variant: camel's Metal shim compiles with fast math off, where plain tanh is that variant
// already, but a compile with fast math on (Metal's own default) would give plain tanh its
// fast variant, whose error against the CPU reference (compared to ~1e-5) is unmeasured.
// The simulator and the CUDA shim have one tanh for both spellings.
constant float GELU_C = 0.7978845608028654f;  // sqrt(2 / pi)
constant float GELU_A = 0.044715f;

// One thread: out[i] = gelu(x[i]).
kernel void gelu_forward(device const float *x [[buffer(0)]],
                         device float *out [[buffer(1)]],
                         constant uint &n [[buffer(2)]],
                         uint i [[thread_position_in_grid]])
{
    if (i >= n) {
        return;
    }
    float v = x[i];
    float u = GELU_C * (v + GELU_A * v * v * v);
    out[i] = 0.5f * v * (1.0f + precise::tanh(u));
}

// One thread: dx[i] = grad[i] * (0.5 (1 + t) + 0.5 x (1 - t^2) du/dx), t = tanh(u),
// du/dx = sqrt(2/pi) (1 + 3 * 0.044715 x^2).
kernel void gelu_backward(device const float *x [[buffer(0)]],
                          device const float *grad [[buffer(1)]],
                          device float *dx [[buffer(2)]],
                          constant uint &n [[buffer(3)]],
                          uint i [[thread_position_in_grid]])
{
    if (i >= n) {
        return;
    }
    float v = x[i];
    float th = precise::tanh(GELU_C * (v + GELU_A * v * v * v));
    float dudx = GELU_C * (1.0f + 3.0f * GELU_A * v * v);
    dx[i] = grad[i] * (0.5f * (1.0f + th) + 0.5f * v * (1.0f - th * th) * dudx);
}

// ---------------------------------------------------------------------------
// version 2 of the backward: one kernel, grad and x read once
// ---------------------------------------------------------------------------
//
// layernorm_backward_dx reads grad and x twice (two sweeps), and the dweight / dbias kernels
// read both again: 7 floats moved per element where 3 are compulsory (read grad and x, write
// dx): 35 % of the copy bandwidth on an H200 (docs/cuda.md). layernorm_backward_v2 gives a
// row to one SIMD group: lane l keeps float4 number l + 32 j (j = 0 .. 7; floats when
// D % 4 != 0) of the row's grad and x in registers, so both row means and dx come from one
// read. The lane owns the same columns in every row, so it also adds grad * xhat and grad
// for its columns into register accumulators over all rows its SIMD group visits. At the
// end the S SIMD groups of a threadgroup add their accumulators into threadgroup memory one
// after another (a fixed order), and the threadgroup writes one partial row of dweight and
// of dbias for its block of rows; the host adds the blocks' partials in block order with
// sum_axis_blocks (ops_reduce.metal). Deterministic, no atomics. Needs D <= 1024.


template <typename V, uint N>
static inline void layernorm_backward_rows(device const V *grad, device const V *x,
                                           device const V *w, device const float *mean,
                                           device const float *rstd, device V *dx,
                                           threadgroup V *acc_w, threadgroup V *acc_b,
                                           uint D, uint n, uint first_row,
                                           uint last_row, uint lane, uint simd_group, uint S)
{
    V dw[N];
    V db[N];
#pragma clang loop unroll(full)
    for (uint j = 0; j < N; j++) {
        dw[j] = V(0.0f);
        db[j] = V(0.0f);
    }
    for (uint row = first_row + simd_group; row < last_row; row += S) {
        uint base = row * n;  // the row's first V
        V g[N];
        V xr[N];
#pragma clang loop unroll(full)
        for (uint j = 0; j < N; j++) {  // 2 N independent loads in flight
            uint q = lane + 32 * j;
            g[j] = q < n ? grad[base + q] : V(0.0f);
            xr[j] = q < n ? x[base + q] : V(0.0f);
        }
        float m = mean[row];
        float r = rstd[row];
        float sg = 0.0f;
        float sgx = 0.0f;
#pragma clang loop unroll(full)
        for (uint j = 0; j < N; j++) {
            uint q = lane + 32 * j;
            V wv = q < n ? w[q] : V(0.0f);  // 4 KiB shared by every row: from the cache
            V gw = g[j] * wv;
            xr[j] = q < n ? (xr[j] - m) * r : V(0.0f);  // xhat from here on
            sg += horizontal_sum(gw);
            sgx += horizontal_sum(gw * xr[j]);
            dw[j] += g[j] * xr[j];
            db[j] += g[j];
            g[j] = gw;  // g * w from here on
        }
        float mean_g = simd_sum(sg) / float(D);
        float mean_gx = simd_sum(sgx) / float(D);
#pragma clang loop unroll(full)
        for (uint j = 0; j < N; j++) {
            uint q = lane + 32 * j;
            if (q < n) {
                dx[base + q] = r * (g[j] - mean_g - xr[j] * mean_gx);
            }
        }
    }
    // The SIMD groups add their column sums into threadgroup memory in order 0, 1, ... S - 1.
    for (uint s = 0; s < S; s++) {
        if (simd_group == s) {
#pragma clang loop unroll(full)
            for (uint j = 0; j < N; j++) {
                uint q = lane + 32 * j;
                if (q < n) {
                    acc_w[q] = s == 0 ? dw[j] : acc_w[q] + dw[j];
                    acc_b[q] = s == 0 ? db[j] : acc_b[q] + db[j];
                }
            }
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);
    }
}

// grad, x, dx (rows, D); w (D,); mean, rstd (rows,); partials (2, blocks, D): [0] the
// blocks' dweight, [1] their dbias. Threadgroup b (S SIMD groups: the host's choice, 4 or 8)
// takes rows b R .. b R + R - 1, SIMD group s of it rows b R + s, b R + s + S, ... (a lane
// holds 64 floats of the row and 64 of column sums: few threadgroups fit a core, so small
// ones waste less). vec4 = 1: D % 4 == 0 and every array
// 16-byte aligned (rows read as float4s). Grid: blocks = ceil(rows / R) threadgroups.
kernel void layernorm_backward_v2(device const float *grad [[buffer(0)]],
                                  device const float *x [[buffer(1)]],
                                  device const float *w [[buffer(2)]],
                                  device const float *mean [[buffer(3)]],
                                  device const float *rstd [[buffer(4)]],
                                  device float *dx [[buffer(5)]],
                                  device float *partials [[buffer(6)]],
                                  constant uint &rows [[buffer(7)]],
                                  constant uint &D [[buffer(8)]],
                                  constant uint &R [[buffer(9)]],
                                  constant uint &vec4 [[buffer(10)]],
                                  uint block [[threadgroup_position_in_grid]],
                                  uint blocks [[threadgroups_per_grid]],
                                  uint t [[thread_position_in_threadgroup]],
                                  uint T [[threads_per_threadgroup]],
                                  uint lane [[thread_index_in_simdgroup]],
                                  uint simd_group [[simdgroup_index_in_threadgroup]],
                                  uint S [[simdgroups_per_threadgroup]])
{
    threadgroup float4 acc_w[256];  // this block's column sums: D <= 1024 floats each
    threadgroup float4 acc_b[256];
    uint first_row = block * R;
    uint last_row = min(rows, first_row + R);
    if (vec4 != 0) {
        layernorm_backward_rows<float4, 8>(
            (device const float4 *)grad, (device const float4 *)x, (device const float4 *)w,
            mean, rstd, (device float4 *)dx, acc_w, acc_b, D, D / 4, first_row, last_row,
            lane, simd_group, S);
    } else {
        layernorm_backward_rows<float, 32>(grad, x, w, mean, rstd, dx,
                                           (threadgroup float *)acc_w, (threadgroup float *)acc_b,
                                           D, D, first_row, last_row, lane, simd_group, S);
    }
    // Every thread writes some of the block's partials: neighbouring threads, neighbouring floats.
    threadgroup const float *sum_w = (threadgroup const float *)acc_w;
    threadgroup const float *sum_b = (threadgroup const float *)acc_b;
    for (uint d = t; d < D; d += T) {
        partials[block * D + d] = sum_w[d];
        partials[(blocks + block) * D + d] = sum_b[d];
    }
}

// ---------------------------------------------------------------------------
// version 3 of the backward: v2 with a row shared by P SIMD groups
// ---------------------------------------------------------------------------
//
// v2's lane holds 8 float4s of grad, 8 of x and 16 of column sums: 255 registers and spills
// for sm_90 (ptxas -v), so few SIMD groups run at once and the spills go to memory: 53 % of
// the copy bandwidth on an H200 (docs/cuda.md). v3 gives a lane a quarter of that: P SIMD
// groups share a row (P = 1 for D <= 256, 2, 4, 8 up to 2048), lane l of part p keeps
// float4 number (32 p + l) + 32 P j, j = 0, 1, of the row's grad and x (floats when
// D % 4 != 0: 8 a lane), and the P parts add their two row sums through threadgroup memory (two barriers a
// row, none when P = 1). Everything else is v2's: column sums in registers over the rows the
// SIMD group visits, added into threadgroup memory in a fixed order, one partial row of
// dweight and of dbias per threadgroup. Deterministic, no atomics. Needs D <= 2048.

template <typename V, uint N>
static inline void layernorm_backward_rows_shared(
    device const V *grad, device const V *x, device const V *w, device const float *mean,
    device const float *rstd, device V *dx, threadgroup V *acc_w, threadgroup V *acc_b,
    threadgroup float2 *partial, uint D, uint n, uint P, uint first_row, uint last_row,
    uint lane, uint simd_group, uint S)
{
    V dw[N];
    V db[N];
#pragma clang loop unroll(full)
    for (uint j = 0; j < N; j++) {
        dw[j] = V(0.0f);
        db[j] = V(0.0f);
    }
    uint first = (simd_group % P) * 32 + lane;  // the lane's first V of a row
    uint stride = 32 * P;
    // Every SIMD group runs the same number of iterations (the barriers inside need all):
    // S / P rows per iteration, SIMD group s on row row0 + s / P.
    for (uint row0 = first_row; row0 < last_row; row0 += S / P) {
        uint row = row0 + simd_group / P;
        bool active = row < last_row;
        uint base = active ? row * n : 0;  // the row's first V
        V g[N];
        V xr[N];
#pragma clang loop unroll(full)
        for (uint j = 0; j < N; j++) {  // 2 N independent loads in flight
            uint q = first + j * stride;
            g[j] = active && q < n ? grad[base + q] : V(0.0f);
            xr[j] = active && q < n ? x[base + q] : V(0.0f);
        }
        float m = active ? mean[row] : 0.0f;
        float r = active ? rstd[row] : 0.0f;
        float2 sums = float2(0.0f);  // (sum g w, sum g w xhat) over the lane's columns
#pragma clang loop unroll(full)
        for (uint j = 0; j < N; j++) {
            uint q = first + j * stride;
            V wv = q < n ? w[q] : V(0.0f);  // shared by every row: from the cache
            V gw = g[j] * wv;
            xr[j] = active && q < n ? (xr[j] - m) * r : V(0.0f);  // xhat from here on
            sums.x += horizontal_sum(gw);
            sums.y += horizontal_sum(gw * xr[j]);
            dw[j] += g[j] * xr[j];
            db[j] += g[j];
            g[j] = gw;  // g * w from here on
        }
        sums = float2(simd_sum(sums.x), simd_sum(sums.y));
        if (P > 1) {  // the row's P parts meet in threadgroup memory
            if (lane == 0) {
                partial[simd_group] = sums;
            }
            threadgroup_barrier(mem_flags::mem_threadgroup);
            uint part0 = simd_group - simd_group % P;
            sums = partial[part0];
            for (uint p = 1; p < P; p++) {
                sums += partial[part0 + p];
            }
            threadgroup_barrier(mem_flags::mem_threadgroup);  // all read: reused next row
        }
        float mean_g = sums.x / float(D);
        float mean_gx = sums.y / float(D);
#pragma clang loop unroll(full)
        for (uint j = 0; j < N; j++) {
            uint q = first + j * stride;
            if (active && q < n) {
                dx[base + q] = r * (g[j] - mean_g - xr[j] * mean_gx);
            }
        }
    }
    // The SIMD groups add their column sums into threadgroup memory in order 0, 1, ... S - 1
    // (the first P of them, one per part, start the sums of their columns).
    for (uint s = 0; s < S; s++) {
        if (simd_group == s) {
#pragma clang loop unroll(full)
            for (uint j = 0; j < N; j++) {
                uint q = first + j * stride;
                if (q < n) {
                    acc_w[q] = s < P ? dw[j] : acc_w[q] + dw[j];
                    acc_b[q] = s < P ? db[j] : acc_b[q] + db[j];
                }
            }
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);
    }
}

// grad, x, dx (rows, D); w (D,); mean, rstd (rows,); partials (2, blocks, D) as in v2.
// Threadgroup b (S SIMD groups, a multiple of P) takes rows b R .. b R + R - 1, S / P of
// them at a time; P = 1, 2, 4 or 8 SIMD groups per row (the host: the fewest with
// D <= 256 P). Two instantiations: "layernorm_backward_v3" (V = float4, N = 2: D % 4 == 0
// and every array 16-byte aligned) and "layernorm_backward_v3_float" (V = float, N = 8),
// two kernels so that the float path's registers do not count against the float4 one's
// (94 against 146 registers in one kernel, ptxas -v for sm_90).
// Grid: blocks = ceil(rows / R) threadgroups.
template <typename V, uint N>
kernel void layernorm_backward_v3(device const float *grad [[buffer(0)]],
                                  device const float *x [[buffer(1)]],
                                  device const float *w [[buffer(2)]],
                                  device const float *mean [[buffer(3)]],
                                  device const float *rstd [[buffer(4)]],
                                  device float *dx [[buffer(5)]],
                                  device float *partials [[buffer(6)]],
                                  constant uint &rows [[buffer(7)]],
                                  constant uint &D [[buffer(8)]],
                                  constant uint &R [[buffer(9)]],
                                  constant uint &P [[buffer(10)]],
                                  uint block [[threadgroup_position_in_grid]],
                                  uint blocks [[threadgroups_per_grid]],
                                  uint t [[thread_position_in_threadgroup]],
                                  uint T [[threads_per_threadgroup]],
                                  uint lane [[thread_index_in_simdgroup]],
                                  uint simd_group [[simdgroup_index_in_threadgroup]],
                                  uint S [[simdgroups_per_threadgroup]])
{
    constexpr uint W = sizeof(V) / sizeof(float);
    threadgroup V acc_w[2048 / W];  // this block's column sums: D <= 2048 floats each
    threadgroup V acc_b[2048 / W];
    threadgroup float2 partial[32];  // one (sum g w, sum g w xhat) per SIMD group
    uint first_row = block * R;
    uint last_row = min(rows, first_row + R);
    layernorm_backward_rows_shared<V, N>(
        (device const V *)grad, (device const V *)x, (device const V *)w, mean, rstd,
        (device V *)dx, acc_w, acc_b, partial, D, D / W, P, first_row, last_row, lane,
        simd_group, S);
    threadgroup const float *sum_w = (threadgroup const float *)acc_w;
    threadgroup const float *sum_b = (threadgroup const float *)acc_b;
    for (uint d = t; d < D; d += T) {
        partials[block * D + d] = sum_w[d];
        partials[(blocks + block) * D + d] = sum_b[d];
    }
}

#define LAYERNORM_BACKWARD_V3(NAME, V, N)                                                      \
    template [[host_name(NAME)]] kernel void layernorm_backward_v3<V, N>(                      \
        device const float *grad [[buffer(0)]], device const float *x [[buffer(1)]],           \
        device const float *w [[buffer(2)]], device const float *mean [[buffer(3)]],           \
        device const float *rstd [[buffer(4)]], device float *dx [[buffer(5)]],                \
        device float *partials [[buffer(6)]], constant uint &rows [[buffer(7)]],               \
        constant uint &D [[buffer(8)]], constant uint &R [[buffer(9)]],                        \
        constant uint &P [[buffer(10)]], uint block [[threadgroup_position_in_grid]],          \
        uint blocks [[threadgroups_per_grid]], uint t [[thread_position_in_threadgroup]],      \
        uint T [[threads_per_threadgroup]], uint lane [[thread_index_in_simdgroup]],           \
        uint simd_group [[simdgroup_index_in_threadgroup]],                                    \
        uint S [[simdgroups_per_threadgroup]]);

LAYERNORM_BACKWARD_V3("layernorm_backward_v3", float4, 2)
LAYERNORM_BACKWARD_V3("layernorm_backward_v3_float", float, 8)

// ---------------------------------------------------------------------------
// GELU, version 2: four elements per thread, and a cheaper form of the same function
// ---------------------------------------------------------------------------
//
// gelu_forward / gelu_backward above give each thread one element (one 4-byte load per
// operand, Stage 1's version 1) and call precise::tanh, which on the CUDA shim is a
// branchy function whose two paths a SIMD group often takes both of: 41 % and 48 % of the
// copy bandwidth on an H200 (docs/cuda.md). Version 2 moves four elements per thread as
// float4s (Stage 1's version 2, with the same scalar tail) and uses the identity
//     0.5 (1 + tanh(u)) = 1 / (1 + exp(-2u)) = sigmoid(2u),
// so gelu(x) = x * s with s = 1 / (1 + exp(-2u)): one exp and one division, no branches,
// and no cancellation in 1 + tanh(u) for negative u. The derivative:
//     gelu'(x) = s + 2 x s (1 - s) du/dx,   s (1 - s) computed as s - s * s
// (never 0 * inf: for u -> -inf, exp(-2u) = inf gives s = 0 and s - s * s = 0). NaN and
// +-inf give what the tanh form gives (gelu(-inf) = -inf * 0 = NaN, as in PyTorch).

static inline float gelu_sigmoid(float v)  // s = 0.5 (1 + tanh(u)) = sigmoid(2u)
{
    float u = GELU_C * (v + GELU_A * v * v * v);
    return 1.0f / (1.0f + exp(-2.0f * u));
}

static inline float gelu_value(float v)
{
    return v * gelu_sigmoid(v);
}

static inline float gelu_derivative(float v)
{
    float s = gelu_sigmoid(v);
    float dudx = GELU_C * (1.0f + 3.0f * GELU_A * v * v);
    return s + 2.0f * v * (s - s * s) * dudx;
}

// One thread: out[4t .. 4t+3] = gelu(x[4t .. 4t+3]), one float4 load and store (the last
// thread does the scalar tail). Grid: ceil(n / 4) threads.
kernel void gelu_forward_float4(device const float *x [[buffer(0)]],
                                device float *out [[buffer(1)]],
                                constant uint &n [[buffer(2)]],
                                uint t [[thread_position_in_grid]])
{
    uint i = 4 * t;
    if (i + 3 < n) {
        float4 v = *((device const float4 *)(x + i));
        *((device float4 *)(out + i)) =
            float4(gelu_value(v.x), gelu_value(v.y), gelu_value(v.z), gelu_value(v.w));
    } else {
        for (uint j = i; j < n; ++j) {
            out[j] = gelu_value(x[j]);
        }
    }
}

// One thread: dx[4t .. 4t+3] = grad * gelu'(x), float4 loads of x and grad.
kernel void gelu_backward_float4(device const float *x [[buffer(0)]],
                                 device const float *grad [[buffer(1)]],
                                 device float *dx [[buffer(2)]],
                                 constant uint &n [[buffer(3)]],
                                 uint t [[thread_position_in_grid]])
{
    uint i = 4 * t;
    if (i + 3 < n) {
        float4 v = *((device const float4 *)(x + i));
        float4 g = *((device const float4 *)(grad + i));
        *((device float4 *)(dx + i)) =
            g * float4(gelu_derivative(v.x), gelu_derivative(v.y), gelu_derivative(v.z),
                       gelu_derivative(v.w));
    } else {
        for (uint j = i; j < n; ++j) {
            dx[j] = grad[j] * gelu_derivative(x[j]);
        }
    }
}
