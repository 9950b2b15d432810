// ops_optim.metal — fused optimiser updates over one parameter's buffer (float32).
//
// Kernels (param, grad and the state buffers are flat arrays of n floats)
//   sgd_step            param -= lr * (grad + weight_decay * param)            (no momentum)
//   sgd_momentum_step   g = grad + weight_decay * param
//                       buf = g (first step) | momentum * buf + g (later);  param -= lr * buf
//   adam_step           g = grad + weight_decay * param
//                       m = m + (1 - beta1) * (g - m);  v = beta2 * v + (1 - beta2) * g^2
//                       param -= (lr / (1 - beta1^t)) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
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
// One thread: element i (grid: n threads).
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

// One thread: Adam's moments m[i], v[i] and the parameter of element i.
//   lr_over_bias1  = lr / (1 - beta1^t)
//   bias2_sqrt     = sqrt(1 - beta2^t)
//   one_minus_beta1, one_minus_beta2 = 1 - beta1, 1 - beta2 (rounded once on the host)
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
        float p = param[i];
        float g = with_weight_decay(grad[i], p, weight_decay);
        float mi = m[i] + one_minus_beta1 * (g - m[i]);
        float vi = beta2 * v[i] + one_minus_beta2 * g * g;
        m[i] = mi;
        v[i] = vi;
        float denom = sqrt(vi) / bias2_sqrt + eps;
        param[i] = p - lr_over_bias1 * (mi / denom);
    }
}
