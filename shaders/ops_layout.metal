// ops_layout.metal — Stage 5A: strided slice copies and their backward (any 32-bit dtype
// for the forward, float32 for the backward), rank <= 8.
//
// Kernels (every tensor C-contiguous; per axis i of the input: start_i, step_i (may be
// negative, never 0), count_i = the output's size on that axis)
//   slice_uint            out[c0, c1, ...] = in[start_0 + step_0 c0, start_1 + step_1 c1, ...]
//                         one thread per OUTPUT element (a gather): tokens[:, :-1],
//                         qkv[:, :, C:2C], x[::-1]
//   slice_backward_float  dx[j0, j1, ...] = grad[c0, c1, ...] if every j_i = start_i + step_i c_i
//                         for some 0 <= c_i < count_i, else 0
//                         one thread per INPUT element (a gather too: no zero-fill pass,
//                         no scatter, every element written exactly once)
//
// Permutes, e.g. (B, T, H, D) <-> (B, H, T, D) for attention heads, are permute_uint in
// ops_elementwise.metal; a contiguous reshape needs no kernel (the same buffer, a new shape).
//
// Run:        camel/backend_mps.py: slice, slice_backward (Tensor.__getitem__).
// Test:       python -m pytest -q tests/test_transformer_kernels.py -k slice

#include <metal_stdlib>
using namespace metal;

// One thread: output element i. Its coordinates c_a come from i and counts (last axis
// fastest); the source offset is sum_a (start_a + step_a * c_a) * in_stride_a.
kernel void slice_uint(device const uint *in [[buffer(0)]],
                       device uint *out [[buffer(1)]],
                       constant uint *counts [[buffer(2)]],
                       constant int *starts [[buffer(3)]],
                       constant int *steps [[buffer(4)]],
                       constant uint *in_strides [[buffer(5)]],
                       constant uint &rank [[buffer(6)]],
                       constant uint &n [[buffer(7)]],
                       uint i [[thread_position_in_grid]])
{
    if (i >= n) {
        return;
    }
    uint rest = i;
    uint src = 0;
    for (int a = int(rank) - 1; a >= 0; a--) {
        uint c = rest % counts[a];
        rest /= counts[a];
        src += uint(starts[a] + steps[a] * int(c)) * in_strides[a];
    }
    out[i] = in[src];
}

// One thread: input element i with coordinates j_a (from i and in_shape). It was copied to
// the output iff on every axis q = (j_a - start_a) / step_a is a whole number in
// [0, count_a); then dx[i] = grad[the output element at the q_a], else 0.
kernel void slice_backward_float(device const float *grad [[buffer(0)]],
                                 device float *dx [[buffer(1)]],
                                 constant uint *in_shape [[buffer(2)]],
                                 constant int *starts [[buffer(3)]],
                                 constant int *steps [[buffer(4)]],
                                 constant uint *counts [[buffer(5)]],
                                 constant uint &rank [[buffer(6)]],
                                 constant uint &n [[buffer(7)]],
                                 uint i [[thread_position_in_grid]])
{
    if (i >= n) {
        return;
    }
    uint rest = i;
    uint src = 0;
    uint grad_stride = 1;  // stride of axis a in grad, built from the last axis up
    bool hit = true;
    for (int a = int(rank) - 1; a >= 0; a--) {
        int j = int(rest % in_shape[a]);
        rest /= in_shape[a];
        int offset = j - starts[a];
        int q = offset / steps[a];  // truncates toward zero; checked exactly below
        if (q * steps[a] != offset || q < 0 || uint(q) >= counts[a]) {
            hit = false;
        }
        src += uint(max(q, 0)) * grad_stride;
        grad_stride *= counts[a];
    }
    dx[i] = hit ? grad[src] : 0.0f;
}
