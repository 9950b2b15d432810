// ops_optim.metal — fused optimiser updates over parameters' buffers (float32).
//
// Kernels (param, grad and the state buffers are flat arrays of n floats)
//   sgd_step            param -= lr * (grad + weight_decay * param)            (no momentum)
//   sgd_momentum_step   g = grad + weight_decay * param
//                       buf = g (first step) | momentum * buf + g (later);  param -= lr * buf
//   adam_step           g = grad + weight_decay * param
//                       m = m + (1 - beta1) * (g - m);  v = beta2 * v + (1 - beta2) * g^2
//                       param -= (lr / (1 - beta1^t)) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
//   adam_step_tensors   adam_step for up to 7 parameters (same step count) in one dispatch
//
// weight_decay == 0 skips the decay term (g = grad), as PyTorch and the CPU reference do, so
// an infinite parameter stays infinite instead of becoming NaN through inf * 0.
//
// These are torch.optim.SGD (dampening 0, no Nesterov) and torch.optim.Adam (L2 weight
// decay, no amsgrad), written in the same order of operations as the CPU reference
// (camel/backend_cpu.py: sgd_step, adam_step), so both backends agree to float32
// rounding. The host computes the per-step scalars (lr / (1 - beta1^t),
// sqrt(1 - beta2^t), 1 - beta1, 1 - beta2) once in double precision and passes them as
// float32, exactly as the CPU reference rounds them; MSL has no double.
//
// Fused: one thread reads grad, param and the state of its element once, and writes param
// and the state once. Unfused, each line above would be its own kernel reading and
// writing whole buffers: Adam would move ~4x the bytes.
//
// One thread: element i (grid: n threads; adam_step_tensors: threadgroups of the tensors).
// Run:   camel.optim.SGD / Adam on "mps" parameters (camel/backend_mps.py).
// Test:  python -m pytest -q tests/test_kernels_optim.py

#include <metal_stdlib>
using namespace metal;

// g = grad + weight_decay * param, and just grad when weight_decay is 0, as PyTorch: an
// infinite parameter must not turn into NaN through inf * 0.
static inline float with_weight_decay(float grad, float param, float weight_decay)
{
    return weight_decay != 0.0f ? grad + weight_decay * param : grad;
}

// One thread: param[i] -= lr * (grad[i] + weight_decay * param[i]).
kernel void sgd_step(device float *param [[buffer(0)]],
                     device const float *grad [[buffer(1)]],
                     constant float &lr [[buffer(2)]],
                     constant float &weight_decay [[buffer(3)]],
                     constant uint &n [[buffer(4)]],
                     uint i [[thread_position_in_grid]])
{
    if (i < n) {
        float p = param[i];
        float g = with_weight_decay(grad[i], p, weight_decay);
        param[i] = p - lr * g;
    }
}

// One thread: the momentum buffer and the parameter of element i.
// first_step != 0 starts the buffer at g (PyTorch's first step), not momentum * 0 + g;
// the two agree, but saying it keeps the kernel equal to the formula.
kernel void sgd_momentum_step(device float *param [[buffer(0)]],
                              device const float *grad [[buffer(1)]],
                              device float *momentum_buf [[buffer(2)]],
                              constant float &lr [[buffer(3)]],
                              constant float &momentum [[buffer(4)]],
                              constant float &weight_decay [[buffer(5)]],
                              constant uint &first_step [[buffer(6)]],
                              constant uint &n [[buffer(7)]],
                              uint i [[thread_position_in_grid]])
{
    if (i < n) {
        float p = param[i];
        float g = with_weight_decay(grad[i], p, weight_decay);
        float buf = first_step != 0 ? g : momentum * momentum_buf[i] + g;
        momentum_buf[i] = buf;
        param[i] = p - lr * buf;
    }
}

// Adam's step for element i of one tensor (adam_step and adam_step_tensors both run it).
//   lr_over_bias1  = lr / (1 - beta1^t)
//   bias2_sqrt     = sqrt(1 - beta2^t)
//   one_minus_beta1, one_minus_beta2 = 1 - beta1, 1 - beta2 (rounded once on the host)
struct AdamScalars {
    float lr_over_bias1;
    float one_minus_beta1;
    float beta2;
    float one_minus_beta2;
    float bias2_sqrt;
    float eps;
    float weight_decay;
};

static inline void adam_element(device float *param, device const float *grad, device float *m,
                                device float *v, uint i, AdamScalars c)
{
    float p = param[i];
    float g = with_weight_decay(grad[i], p, c.weight_decay);
    float mi = m[i] + c.one_minus_beta1 * (g - m[i]);
    float vi = c.beta2 * v[i] + c.one_minus_beta2 * g * g;
    m[i] = mi;
    v[i] = vi;
    float denom = sqrt(vi) / c.bias2_sqrt + c.eps;
    param[i] = p - c.lr_over_bias1 * (mi / denom);
}

// One thread: Adam's moments m[i], v[i] and the parameter of element i.
kernel void adam_step(device float *param [[buffer(0)]],
                      device const float *grad [[buffer(1)]],
                      device float *m [[buffer(2)]],
                      device float *v [[buffer(3)]],
                      constant float &lr_over_bias1 [[buffer(4)]],
                      constant float &one_minus_beta1 [[buffer(5)]],
                      constant float &beta2 [[buffer(6)]],
                      constant float &one_minus_beta2 [[buffer(7)]],
                      constant float &bias2_sqrt [[buffer(8)]],
                      constant float &eps [[buffer(9)]],
                      constant float &weight_decay [[buffer(10)]],
                      constant uint &n [[buffer(11)]],
                      uint i [[thread_position_in_grid]])
{
    if (i < n) {
        AdamScalars c = {lr_over_bias1, one_minus_beta1, beta2, one_minus_beta2, bias2_sqrt, eps,
                         weight_decay};
        adam_element(param, grad, m, v, i, c);
    }
}

// adam_step for up to ADAM_TENSORS parameters in one dispatch (PyTorch's multi-tensor Adam).
// A model has dozens of small parameters, and a dispatch costs the host tens of microseconds
// on a GPU (docs/cuda.md): one dispatch per parameter made the optimiser's step host-bound.
// Tensor k owns threadgroups first_group[k] .. first_group[k + 1] - 1, one element a thread;
// each tensor comes as its four buffers (param, grad, m, v), and a slot the host does not
// fill repeats another tensor's buffers with no threadgroups of its own. 7 tensors: 28
// buffers and the table take 29 of the 31 buffer slots Metal gives a kernel.
constant constexpr uint ADAM_TENSORS = 7;

struct AdamTensors {
    uint n[ADAM_TENSORS];                 // elements of tensor k
    uint first_group[ADAM_TENSORS + 1];   // its first threadgroup; [ADAM_TENSORS]: the total
    AdamScalars c;                        // one step count: the same scalars for every tensor
};

// One thread: element i of the tensor its threadgroup belongs to.
kernel void adam_step_tensors(constant AdamTensors &t [[buffer(0)]],
                              device float *p0 [[buffer(1)]], device const float *g0 [[buffer(2)]],
                              device float *m0 [[buffer(3)]], device float *v0 [[buffer(4)]],
                              device float *p1 [[buffer(5)]], device const float *g1 [[buffer(6)]],
                              device float *m1 [[buffer(7)]], device float *v1 [[buffer(8)]],
                              device float *p2 [[buffer(9)]], device const float *g2 [[buffer(10)]],
                              device float *m2 [[buffer(11)]], device float *v2 [[buffer(12)]],
                              device float *p3 [[buffer(13)]], device const float *g3 [[buffer(14)]],
                              device float *m3 [[buffer(15)]], device float *v3 [[buffer(16)]],
                              device float *p4 [[buffer(17)]], device const float *g4 [[buffer(18)]],
                              device float *m4 [[buffer(19)]], device float *v4 [[buffer(20)]],
                              device float *p5 [[buffer(21)]], device const float *g5 [[buffer(22)]],
                              device float *m5 [[buffer(23)]], device float *v5 [[buffer(24)]],
                              device float *p6 [[buffer(25)]], device const float *g6 [[buffer(26)]],
                              device float *m6 [[buffer(27)]], device float *v6 [[buffer(28)]],
                              uint group [[threadgroup_position_in_grid]],
                              uint lid [[thread_position_in_threadgroup]],
                              uint width [[threads_per_threadgroup]])
{
    uint k = 0;  // the tensor: the last whose first threadgroup is at or before this one
    while (k + 1 < ADAM_TENSORS && group >= t.first_group[k + 1])
        k++;
    uint i = (group - t.first_group[k]) * width + lid;
    if (i >= t.n[k])
        return;
    switch (k) {
        case 0: adam_element(p0, g0, m0, v0, i, t.c); break;
        case 1: adam_element(p1, g1, m1, v1, i, t.c); break;
        case 2: adam_element(p2, g2, m2, v2, i, t.c); break;
        case 3: adam_element(p3, g3, m3, v3, i, t.c); break;
        case 4: adam_element(p4, g4, m4, v4, i, t.c); break;
        case 5: adam_element(p5, g5, m5, v5, i, t.c); break;
        default: adam_element(p6, g6, m6, v6, i, t.c); break;
    }
}
