// ops_elementwise.metal — Stage 1: one kernel per elementwise op (float32 unless named).
//
// Kernels (every buffer is a flat, contiguous array of n elements unless said otherwise)
//   add_float            out[i] = a[i] + b[i]                one element per thread (version 1)
//   add_float4           out[i] = a[i] + b[i]                four elements per thread (version 2)
//   mul_float / mul_float4                out[i] = a[i] * b[i]
//   add_broadcast_float  out[i] = a[i] + b[i % m]            b is a trailing suffix of a (bias,
//   add_broadcast_float4                                     position embedding); float4: m % 4 == 0
//   mul_broadcast_float / mul_broadcast_float4   out[i] = a[i] * b[i % m]
//   add_scalar_float / add_scalar_float4     out[i] = a[i] + s
//   mul_scalar_float / mul_scalar_float4     out[i] = a[i] * s     (neg is mul_scalar by -1)
//   relu_float / relu_float4                 out[i] = max(x[i], 0), NaN stays NaN
//   relu_backward_float / relu_backward_float4   dx[i] = x[i] <= 0 ? 0 : dy[i]  (NaN passes dy)
//   fill_float4 / fill_int4                  out[i] = value
//   copy_uint / copy_uint4                   out[i] = in[i], bit for bit (float32 and int32 alike)
//   permute_uint         out = in with its axes permuted (a materialised transpose, any
//                        32-bit dtype, rank <= 8): one thread per output element. Used by
//                        Tensor.T, transpose and permute (attention's head split).
//
// The one optimisation of Stage 1 is float4 vectorisation. A "_float" kernel gives
// each thread one element: one 4-byte load per operand. A "_float4" kernel gives
// each thread four neighbouring elements and loads them as one 16-byte float4, so
// a SIMD group of 32 threads moves 512 contiguous bytes per load instruction
// instead of 128: a quarter of the load/store instructions and index arithmetic. The
// memory traffic is the same: the scalar version is already coalesced (32 lanes x 4 bytes
// = one 128-byte cache line per instruction), the float4 one touches the same lines, four
// per instruction. Whether that makes a memory-bound kernel faster is a measurement
// (docs/stage1.md: +27 % for add on an H200 through the CUDA shim).
// The host (camel/backend_mps.py) uses the float4 kernels whenever every operand
// starts at a 16-byte aligned offset (a float4 load must be 16-byte aligned) and
// falls back to the "_float" kernels otherwise.
//
// The scalar tail: n need not be a multiple of 4. The float4 kernels are
// dispatched with ceil(n / 4) threads; thread t owns elements 4t .. 4t+3. Every
// thread whose four elements all exist (4t + 3 < n) takes the vector path; the
// last thread, when n % 4 != 0, owns 1–3 real elements and loops over them one
// float at a time, so no thread ever reads or writes past element n - 1.
//
// Run:        every "mps" Tensor op in camel/backend_mps.py dispatches these.
// Test:       python -m pytest -q tests/test_kernels_elementwise.py
// Benchmark:  python -m camel.bench elementwise   (GB/s of float vs float4)

#include <metal_stdlib>
using namespace metal;

// ---------------------------------------------------------------------------
// version 1: one element per thread. Grid: n threads.
// ---------------------------------------------------------------------------

// One thread: out[i] = a[i] + b[i] for its i = thread_position_in_grid.
kernel void add_float(device const float *a [[buffer(0)]],
                      device const float *b [[buffer(1)]],
                      device float *out [[buffer(2)]],
                      constant uint &n [[buffer(3)]],
                      uint i [[thread_position_in_grid]])
{
    if (i < n) {
        out[i] = a[i] + b[i];
    }
}

// One thread: out[i] = a[i] * b[i].
kernel void mul_float(device const float *a [[buffer(0)]],
                      device const float *b [[buffer(1)]],
                      device float *out [[buffer(2)]],
                      constant uint &n [[buffer(3)]],
                      uint i [[thread_position_in_grid]])
{
    if (i < n) {
        out[i] = a[i] * b[i];
    }
}

// One thread: out[i] = a[i] + b[i % m]. a is (..., m) flattened, b is (m,) flattened.
kernel void add_broadcast_float(device const float *a [[buffer(0)]],
                                device const float *b [[buffer(1)]],
                                device float *out [[buffer(2)]],
                                constant uint &n [[buffer(3)]],
                                constant uint &m [[buffer(4)]],
                                uint i [[thread_position_in_grid]])
{
    if (i < n) {
        out[i] = a[i] + b[i % m];
    }
}

// One thread: out[i] = a[i] * b[i % m].
kernel void mul_broadcast_float(device const float *a [[buffer(0)]],
                                device const float *b [[buffer(1)]],
                                device float *out [[buffer(2)]],
                                constant uint &n [[buffer(3)]],
                                constant uint &m [[buffer(4)]],
                                uint i [[thread_position_in_grid]])
{
    if (i < n) {
        out[i] = a[i] * b[i % m];
    }
}

// One thread: out[i] = a[i] + s.
kernel void add_scalar_float(device const float *a [[buffer(0)]],
                             constant float &s [[buffer(1)]],
                             device float *out [[buffer(2)]],
                             constant uint &n [[buffer(3)]],
                             uint i [[thread_position_in_grid]])
{
    if (i < n) {
        out[i] = a[i] + s;
    }
}

// One thread: out[i] = a[i] * s.
kernel void mul_scalar_float(device const float *a [[buffer(0)]],
                             constant float &s [[buffer(1)]],
                             device float *out [[buffer(2)]],
                             constant uint &n [[buffer(3)]],
                             uint i [[thread_position_in_grid]])
{
    if (i < n) {
        out[i] = a[i] * s;
    }
}

// One thread: out[i] = max(x[i], 0). Metal's max returns the non-NaN operand, so a NaN
// is kept by hand (NumPy and PyTorch propagate it).
kernel void relu_float(device const float *x [[buffer(0)]],
                       device float *out [[buffer(1)]],
                       constant uint &n [[buffer(2)]],
                       uint i [[thread_position_in_grid]])
{
    if (i < n) {
        float v = x[i];
        out[i] = isnan(v) ? v : max(v, 0.0f);
    }
}

// One thread: dx[i] = 0 where x[i] <= 0, else dy[i] (the gradient at exactly 0 is 0; at
// NaN it is dy, as PyTorch's threshold_backward).
kernel void relu_backward_float(device const float *x [[buffer(0)]],
                                device const float *dy [[buffer(1)]],
                                device float *dx [[buffer(2)]],
                                constant uint &n [[buffer(3)]],
                                uint i [[thread_position_in_grid]])
{
    if (i < n) {
        dx[i] = x[i] <= 0.0f ? 0.0f : dy[i];
    }
}

// One thread: out[i] = in[i] as a 32-bit word (float32 and int32 copy bit for bit).
kernel void copy_uint(device const uint *in [[buffer(0)]],
                      device uint *out [[buffer(1)]],
                      constant uint &n [[buffer(2)]],
                      uint i [[thread_position_in_grid]])
{
    if (i < n) {
        out[i] = in[i];
    }
}

// ---------------------------------------------------------------------------
// version 2: four elements per thread through float4. Grid: ceil(n / 4) threads.
// Thread t owns elements 4t .. 4t+3; the last thread handles the scalar tail.
// ---------------------------------------------------------------------------

// One thread: out[4t .. 4t+3] = a + b, one float4 load per operand (scalar tail at the end).
kernel void add_float4(device const float *a [[buffer(0)]],
                       device const float *b [[buffer(1)]],
                       device float *out [[buffer(2)]],
                       constant uint &n [[buffer(3)]],
                       uint t [[thread_position_in_grid]])
{
    uint i = 4 * t;
    if (i + 3 < n) {
        float4 va = *((device const float4 *)(a + i));
        float4 vb = *((device const float4 *)(b + i));
        *((device float4 *)(out + i)) = va + vb;
    } else {
        for (uint j = i; j < n; ++j) {
            out[j] = a[j] + b[j];
        }
    }
}

// One thread: out[4t .. 4t+3] = a * b.
kernel void mul_float4(device const float *a [[buffer(0)]],
                       device const float *b [[buffer(1)]],
                       device float *out [[buffer(2)]],
                       constant uint &n [[buffer(3)]],
                       uint t [[thread_position_in_grid]])
{
    uint i = 4 * t;
    if (i + 3 < n) {
        float4 va = *((device const float4 *)(a + i));
        float4 vb = *((device const float4 *)(b + i));
        *((device float4 *)(out + i)) = va * vb;
    } else {
        for (uint j = i; j < n; ++j) {
            out[j] = a[j] * b[j];
        }
    }
}

// One thread: out[4t .. 4t+3] = a + b[(4t .. 4t+3) % m]. The host uses this only when
// m % 4 == 0 (then n % 4 == 0 too, so there is no tail): 4t % m is a multiple of 4,
// so the four elements of b are contiguous and form one aligned float4.
kernel void add_broadcast_float4(device const float *a [[buffer(0)]],
                                 device const float *b [[buffer(1)]],
                                 device float *out [[buffer(2)]],
                                 constant uint &n [[buffer(3)]],
                                 constant uint &m [[buffer(4)]],
                                 uint t [[thread_position_in_grid]])
{
    uint i = 4 * t;
    if (i < n) {
        float4 va = *((device const float4 *)(a + i));
        float4 vb = *((device const float4 *)(b + (i % m)));
        *((device float4 *)(out + i)) = va + vb;
    }
}

// One thread: out[4t .. 4t+3] = a * b[(4t .. 4t+3) % m]; same m % 4 == 0 rule as above.
kernel void mul_broadcast_float4(device const float *a [[buffer(0)]],
                                 device const float *b [[buffer(1)]],
                                 device float *out [[buffer(2)]],
                                 constant uint &n [[buffer(3)]],
                                 constant uint &m [[buffer(4)]],
                                 uint t [[thread_position_in_grid]])
{
    uint i = 4 * t;
    if (i < n) {
        float4 va = *((device const float4 *)(a + i));
        float4 vb = *((device const float4 *)(b + (i % m)));
        *((device float4 *)(out + i)) = va * vb;
    }
}

// One thread: out[4t .. 4t+3] = a + s.
kernel void add_scalar_float4(device const float *a [[buffer(0)]],
                              constant float &s [[buffer(1)]],
                              device float *out [[buffer(2)]],
                              constant uint &n [[buffer(3)]],
                              uint t [[thread_position_in_grid]])
{
    uint i = 4 * t;
    if (i + 3 < n) {
        *((device float4 *)(out + i)) = *((device const float4 *)(a + i)) + s;
    } else {
        for (uint j = i; j < n; ++j) {
            out[j] = a[j] + s;
        }
    }
}

// One thread: out[4t .. 4t+3] = a * s.
kernel void mul_scalar_float4(device const float *a [[buffer(0)]],
                              constant float &s [[buffer(1)]],
                              device float *out [[buffer(2)]],
                              constant uint &n [[buffer(3)]],
                              uint t [[thread_position_in_grid]])
{
    uint i = 4 * t;
    if (i + 3 < n) {
        *((device float4 *)(out + i)) = *((device const float4 *)(a + i)) * s;
    } else {
        for (uint j = i; j < n; ++j) {
            out[j] = a[j] * s;
        }
    }
}

// One thread: out[4t .. 4t+3] = max(x, 0), NaN kept (select(a, b, c) is c ? b : a).
kernel void relu_float4(device const float *x [[buffer(0)]],
                        device float *out [[buffer(1)]],
                        constant uint &n [[buffer(2)]],
                        uint t [[thread_position_in_grid]])
{
    uint i = 4 * t;
    if (i + 3 < n) {
        float4 v = *((device const float4 *)(x + i));
        *((device float4 *)(out + i)) = select(max(v, float4(0.0f)), v, isnan(v));
    } else {
        for (uint j = i; j < n; ++j) {
            float v = x[j];
            out[j] = isnan(v) ? v : max(v, 0.0f);
        }
    }
}

// One thread: dx[4t .. 4t+3] = x <= 0 ? 0 : dy, lane by lane (select(a, b, c) is c ? b : a).
kernel void relu_backward_float4(device const float *x [[buffer(0)]],
                                 device const float *dy [[buffer(1)]],
                                 device float *dx [[buffer(2)]],
                                 constant uint &n [[buffer(3)]],
                                 uint t [[thread_position_in_grid]])
{
    uint i = 4 * t;
    if (i + 3 < n) {
        float4 vx = *((device const float4 *)(x + i));
        float4 vdy = *((device const float4 *)(dy + i));
        *((device float4 *)(dx + i)) = select(vdy, float4(0.0f), vx <= 0.0f);
    } else {
        for (uint j = i; j < n; ++j) {
            dx[j] = x[j] <= 0.0f ? 0.0f : dy[j];
        }
    }
}

// One thread: out[4t .. 4t+3] = value (float32).
kernel void fill_float4(device float *out [[buffer(0)]],
                        constant float &value [[buffer(1)]],
                        constant uint &n [[buffer(2)]],
                        uint t [[thread_position_in_grid]])
{
    uint i = 4 * t;
    if (i + 3 < n) {
        *((device float4 *)(out + i)) = float4(value);
    } else {
        for (uint j = i; j < n; ++j) {
            out[j] = value;
        }
    }
}

// One thread: out[4t .. 4t+3] = value (int32: indices, targets).
kernel void fill_int4(device int *out [[buffer(0)]],
                      constant int &value [[buffer(1)]],
                      constant uint &n [[buffer(2)]],
                      uint t [[thread_position_in_grid]])
{
    uint i = 4 * t;
    if (i + 3 < n) {
        *((device int4 *)(out + i)) = int4(value);
    } else {
        for (uint j = i; j < n; ++j) {
            out[j] = value;
        }
    }
}

// One thread: out[4t .. 4t+3] = in[4t .. 4t+3] as 32-bit words, so float32 and int32
// storages copy bit for bit (n counts 32-bit elements).
kernel void copy_uint4(device const uint *in [[buffer(0)]],
                       device uint *out [[buffer(1)]],
                       constant uint &n [[buffer(2)]],
                       uint t [[thread_position_in_grid]])
{
    uint i = 4 * t;
    if (i + 3 < n) {
        *((device uint4 *)(out + i)) = *((device const uint4 *)(in + i));
    } else {
        for (uint j = i; j < n; ++j) {
            out[j] = in[j];
        }
    }
}

// ---------------------------------------------------------------------------
// layout: a materialised permutation of the axes
// ---------------------------------------------------------------------------

// out is C-contiguous with `rank` axes of sizes out_shape[0 .. rank-1]; in_strides[d] is
// the stride (in elements) in `in` of the input axis that becomes output axis d. One thread
// computes the coordinates of its output element i (last axis fastest) and gathers the one
// input word they name. Writes are coalesced; reads are strided (a tiled transpose through
// threadgroup memory would make both coalesced).
kernel void permute_uint(device const uint *in [[buffer(0)]],
                         device uint *out [[buffer(1)]],
                         constant uint *out_shape [[buffer(2)]],
                         constant uint *in_strides [[buffer(3)]],
                         constant uint &rank [[buffer(4)]],
                         constant uint &n [[buffer(5)]],
                         uint i [[thread_position_in_grid]])
{
    if (i >= n) {
        return;
    }
    uint rest = i;
    uint src = 0;
    for (uint d = rank; d > 0; --d) {
        uint size = out_shape[d - 1];
        src += (rest % size) * in_strides[d - 1];
        rest /= size;
    }
    out[i] = in[src];
}
