// ops_embedding.metal — Stage 5A: embedding gather (forward) and a DETERMINISTIC
// scatter-add (backward), float32 values, int32 indices.
//
// Kernels (idx is (N,) int32: any index shape flattened; weight, dweight (V, D);
//          out, grad (N, D))
//   embedding_forward         out[n, d] = weight[idx[n], d]         one thread per output element
//   embedding_backward_link   one thread per vocabulary row v: walks idx in order and links
//                             the positions that hold v into a list:
//                             head[v] = first such n (or -1), next_pos[n] = the following
//                             one (or -1)
//   embedding_backward_sum    dweight[v, d] = sum of grad[n, d] over v's list, in list order
//                             one thread per (d, v)
//
// Why not one thread per position doing dweight[idx[n]] += grad[n] with atomics? Two
// positions with the same token would race; float atomics make that correct but the
// ORDER of the additions changes from run to run, and float addition is not associative:
// the gradient would differ in the last bits on every run (and training would not be
// reproducible). Here every sum runs in position order, so the same inputs give
// bit-identical gradients, with no atomics at all.
//
// Cost: the link pass reads idx once per vocabulary row, V * N index reads (tiny next to
// the N * D gradient reads for character vocabularies; for a 50k-token vocabulary a
// counting sort of the positions would be the next step). The sum pass reads each grad
// element once.
//
// Indices outside [0, V): camel/functional.py rejects them before any kernel runs; the
// kernels still never read or write outside their buffers (a bad index reads as a zero
// row and is left out of the lists).
//
// Run:        camel/backend_mps.py: embedding, embedding_backward.
// Test:       python -m pytest -q tests/test_transformer_kernels.py -k embedding
// Lesson:     docs/stage5a.md

#include <metal_stdlib>
using namespace metal;

// One thread: out[i] = weight[idx[i / D] * D + i % D] for i = n * D + d.
kernel void embedding_forward(device const int *idx [[buffer(0)]],
                              device const float *weight [[buffer(1)]],
                              device float *out [[buffer(2)]],
                              constant uint &V [[buffer(3)]],
                              constant uint &D [[buffer(4)]],
                              constant uint &total [[buffer(5)]],
                              uint i [[thread_position_in_grid]])
{
    if (i >= total) {
        return;
    }
    uint n = i / D;
    uint d = i - n * D;
    int v = idx[n];
    out[i] = (v >= 0 && uint(v) < V) ? weight[uint(v) * D + d] : 0.0f;
}

// One thread per vocabulary row v: link the positions n with idx[n] == v, in order.
// Each position is linked by exactly one thread (the one of its token), so no two
// threads write the same next_pos[n].
kernel void embedding_backward_link(device const int *idx [[buffer(0)]],
                                    device int *head [[buffer(1)]],
                                    device int *next_pos [[buffer(2)]],
                                    constant uint &V [[buffer(3)]],
                                    constant uint &N [[buffer(4)]],
                                    uint v [[thread_position_in_grid]])
{
    if (v >= V) {
        return;
    }
    int first = -1;
    int prev = -1;
    for (uint n = 0; n < N; n++) {
        if (idx[n] == int(v)) {
            if (prev < 0) {
                first = int(n);
            } else {
                next_pos[prev] = int(n);
            }
            prev = int(n);
        }
    }
    if (prev >= 0) {
        next_pos[prev] = -1;  // end of v's list
    }
    head[v] = first;
}

// One thread per (d, v) (grid x = column, y = vocabulary row): follow v's list in
// position order and add up column d of those grad rows. Rows no position uses get 0.
kernel void embedding_backward_sum(device const float *grad [[buffer(0)]],
                                   device const int *head [[buffer(1)]],
                                   device const int *next_pos [[buffer(2)]],
                                   device float *dweight [[buffer(3)]],
                                   constant uint &V [[buffer(4)]],
                                   constant uint &D [[buffer(5)]],
                                   uint2 pos [[thread_position_in_grid]])
{
    uint d = pos.x;
    uint v = pos.y;
    if (d >= D || v >= V) {
        return;
    }
    float acc = 0.0f;
    for (int n = head[v]; n >= 0; n = next_pos[n]) {
        acc += grad[uint(n) * D + d];
    }
    dweight[v * D + d] = acc;
}
