"""Where the naive causal attention path's time goes on the GPU shim, and which GEMM rung is
fastest for each of its triangle products (camel/gemm.py `triangle`). B = 1, H = 16, D = 64.

    python3 tools/gpu/triangle_products.py [T]      (default 4096)

First the kernels of one forward and backward on the default choices (camel.profile: one
command buffer a dispatch), summed by kernel name. Then each product of the path, timed
with every rung and variant that skips (tuning.time_ms), checked against the first one on
the wanted part: the scores q kᵀ and dP = dO vᵀ ("lower": (T, T) out, K = D), P v and
dS k ("a_lower": (T, D) out, K = T), Pᵀ dO and dSᵀ q ("a_upper", A read transposed).
"""

import sys
from functools import partial

import numpy as np

import camel
import camel.functional as F
from camel import config, gemm, metal, tuning

H, D = 16, 64


def profile_path(t, rng):
    """Per-kernel GPU ms of one forward and backward of the naive causal path."""
    config.set_choices(attention="naive")  # at T = 4096 the default would be flash
    q, k, v = (camel.tensor(rng.standard_normal((1, H, t, D), dtype=np.float32), device="mps",
                            requires_grad=True) for _ in range(3))  # fmt: skip
    g = camel.tensor(rng.standard_normal((1, H, t, D), dtype=np.float32), device="mps")
    F.scaled_dot_product_attention(q, k, v, causal=True).backward(g)  # warm-up and compile
    metal.synchronize()
    with camel.profile() as prof:
        F.scaled_dot_product_attention(q, k, v, causal=True).backward(g)
    print(f"\nnaive causal attention, T = {t}: forward + backward")
    print(prof.table())  # its first line: dispatches, kernels, total ms


def products(t, rng):
    """(label, a, b, transpose_a, transpose_b, triangle, wanted mask or None) of each product."""
    r = lambda *s: rng.standard_normal(s, dtype=np.float32)  # noqa: E731
    p = np.tril(r(H, t, t))  # a causal softmax output, or its gradient: 0 above the diagonal
    dev = lambda x: metal.DeviceArray.from_numpy(np.ascontiguousarray(x))  # noqa: E731
    lower = np.tril(np.ones((t, t), dtype=bool))
    return [
        ("q kT, dO vT  lower", dev(r(H, t, D)), dev(r(H, t, D)), False, True, "lower", lower),
        ("P v, dS k    a_lower", dev(p), dev(r(H, t, D)), False, False, "a_lower", None),
        ("PT dO, dST q a_upper", dev(p), dev(r(H, t, D)), True, False, "a_upper", None),
    ]


def time_products(t, rng):
    skipping = [v for v in gemm.all_versions() if gemm.get_rung(v).triangle]
    for label, a, b, ta, tb, tri, wanted in products(t, rng):
        m = a.shape[-1] if ta else a.shape[-2]
        n = b.shape[-2] if tb else b.shape[-1]
        kk = b.shape[-1] if tb else b.shape[-2]
        default = gemm.triangle_rung(gemm.parse_version(gemm.choose_version(m, n, kk, H))[0])
        print(f"\n{label}: {H} x ({m}, {n}) out, K = {kk}; default {default.version}")
        ref = None
        rows = []
        for v in skipping:
            try:
                out = gemm.matmul(a, b, ta, tb, version=v, triangle=tri).numpy()
            except RuntimeError as e:  # over this device's limits
                print(f"  {v:22s} skipped: {e}")
                continue
            got = out[:, wanted] if wanted is not None else out
            if ref is None:
                ref = got.copy()
            err = float(np.max(np.abs(got - ref)) / (np.max(np.abs(ref)) or 1.0))
            ms = tuning.time_ms(partial(gemm.matmul, a, b, ta, tb, version=v, triangle=tri))
            rows.append((ms, v, err))
        for ms, v, err in sorted(rows):
            mark = " <- default" if v == default.version else ""
            print(f"  {v:22s} {ms:8.3f} ms   max rel diff {err:.1e}{mark}")


def main(t):
    print(metal.device_name())
    rng = np.random.default_rng(0)
    profile_path(t, rng)
    time_products(t, rng)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 4096)
