"""Time the naive attention path (Stage 5A) forward and forward + backward on the GPU shim:
today's (the scale inside the softmax, causal products on their triangle) against the four
ops it replaced (q·kᵀ, a mul_scalar pass, the causal softmax, P·v over the whole square),
and PyTorch's FP32 SDPA when a CUDA PyTorch is importable. B = 1, H = 16, D = 64.

    python3 tools/gpu/naive_attention.py [T ...]      (default 1024 4096)
"""

import math
import sys
import time
from functools import partial

import numpy as np

import camel
import camel.functional as F
from camel import config, metal
from camel.functional import MatMul, MulScalar, Softmax


def four_ops(q, k, v, causal):
    """The naive path as it was before the triangle and the fused scale."""
    s = MatMul.apply(q, k, transpose_b=True)
    s = MulScalar.apply(s, 1.0 / math.sqrt(q.shape[-1]))
    return MatMul.apply(Softmax.apply(s, causal), v)


def today(q, k, v, causal):
    return F.scaled_dot_product_attention(q, k, v, causal=causal)


def _time(fn, sync, reps):
    fn()
    sync()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    sync()
    return (time.perf_counter() - start) / reps * 1e3


def _step(path, xs, g, causal):
    """Forward and backward once (grads reset first)."""
    for x in xs:
        x.grad = None
    path(*xs, causal).backward(g)


def camel_case(path, q, k, v, g, causal, reps):
    """(fwd ms, fwd+bwd ms, out, grads) of one path on "mps"."""
    xs = [camel.tensor(x, device="mps") for x in (q, k, v)]
    fwd = _time(partial(path, *xs, causal), metal.synchronize, reps)
    ys = [camel.tensor(x, device="mps", requires_grad=True) for x in (q, k, v)]
    gt = camel.tensor(g, device="mps")
    both = _time(partial(_step, path, ys, gt, causal), metal.synchronize, reps)
    _step(path, ys, gt, causal)
    out = path(*ys, causal).numpy().copy()
    return fwd, both, out, [y.grad.numpy().copy() for y in ys]


def torch_case(q, k, v, g, causal, reps):
    """(fwd ms, fwd+bwd ms) of PyTorch's FP32 SDPA on the GPU."""
    import torch

    sdpa = partial(torch.nn.functional.scaled_dot_product_attention, is_causal=causal)
    xs = [torch.tensor(x, device="cuda", requires_grad=True) for x in (q, k, v)]
    gt = torch.tensor(g, device="cuda")
    with torch.no_grad():
        fwd = _time(partial(sdpa, *xs), torch.cuda.synchronize, reps)
    both = _time(partial(_step, lambda *a: sdpa(*a[:3]), xs, gt, causal), torch.cuda.synchronize,
                 reps)  # fmt: skip
    return fwd, both


def main(seqs):
    config.set_choices(attention="naive")
    print(metal.device_name())
    h, d = 16, 64
    try:
        import torch

        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        has_torch = torch.cuda.is_available()
    except ImportError:
        has_torch = False
    for t in seqs:
        rng = np.random.default_rng(t)
        q, k, v, g = (rng.standard_normal((1, h, t, d), dtype=np.float32) for _ in range(4))
        reps = 20 if t <= 2048 else 5
        for causal in (True, False):
            old = camel_case(four_ops, q, k, v, g, causal, reps)
            new = camel_case(today, q, k, v, g, causal, reps)
            err = max(
                float(np.abs(a - b).max() / (np.abs(b).max() + 1e-30))
                for a, b in zip([new[2], *new[3]], [old[2], *old[3]], strict=True)
            )
            line = f"T={t} causal={causal}: before fwd {old[0]:.3f} ms fwd+bwd {old[1]:.3f} ms"
            line += f"; today fwd {new[0]:.3f} ms fwd+bwd {new[1]:.3f} ms"
            line += f"; max rel diff {err:.2e}"
            if has_torch:
                tf, tb = torch_case(q, k, v, g, causal, reps)
                line += f"; SDPA fwd {tf:.3f} ms fwd+bwd {tb:.3f} ms (today: fwd "
                line += f"{100 * tf / new[0]:.0f} % of SDPA, fwd+bwd {100 * tb / new[1]:.0f} %)"
            print(line, flush=True)


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [1024, 4096])
