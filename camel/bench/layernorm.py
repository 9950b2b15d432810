"""Benchmark Stage 4's LayerNorm and GELU: ``python -m camel.bench layernorm``.

Kernels of shaders/ops_layernorm.metal through camel/backend_mps.py:
  layer_norm v1 .. v4     v1-v3 one threadgroup per row, reading x three times, twice,
                          once; v4 once, a SIMD group per row with float4s (CAMEL_LAYERNORM
                          picks one; the default is v4 for D <= 16384)
  layer_norm_backward     v1: dx per row, then dweight and dbias as a column reduction;
                          v2: one kernel reads grad and x once (D <= 1024), then the
                          blocks' partial dweight and dbias are summed; v3: v2 with a row
                          shared by P SIMD groups (D <= 2048; the default)
  gelu, gelu_backward     v1: one thread per element; v2: four (float4), as x * sigmoid(2u)

1. Validate each against NumPy (backend_cpu) at awkward shapes ((1, 1), (3, 33), (5, 1000)).
2. On a GPU: time each after warm-up and print  op | (N, D) | ms | GB/s | % of copy, where
   GB/s counts the compulsory bytes (forward: read x, write out; backward: read grad and x,
   write dx) and % of copy compares with copy_uint4 over the same array in the same run.
   On the simulator: validation only (its times are CPU times, not GPU timings);
   ``--time`` prints them anyway, labelled.
"""

from __future__ import annotations

import numpy as np

from camel.bench.bandwidth import memory_version, parse_args, start, time_cases, with_choice

GPU_SHAPES = [(4096, 768), (16384, 1024), (65536, 1024)]  # 12, 64 and 256 MiB
SIM_SHAPES = [(256, 384), (64, 1000)]


def _layer_norm(version: int):
    """backend_mps.layer_norm with CAMEL_LAYERNORM=version for this one call."""
    from camel import backend_mps as mps

    return with_choice("layernorm", version, lambda x, w, b: mps.layer_norm(x, w, b, 1e-5)[0])


def cases(shape, rng):
    """(label, run() -> DeviceArray, expected, bytes) per kernel at (N, D)."""
    from camel import backend_cpu as cpu
    from camel import backend_mps as mps

    n, d = shape
    x = rng.standard_normal(shape, dtype=np.float32) * np.float32(2) + np.float32(0.5)
    w = rng.standard_normal(d, dtype=np.float32)
    b = rng.standard_normal(d, dtype=np.float32)
    g = rng.standard_normal(shape, dtype=np.float32)
    want, mean, rstd = cpu.layer_norm(x, w, b, 1e-5)
    dx_want = cpu.layer_norm_backward(g, x, w, mean, rstd)[0]
    dx, dw, db, dg = (mps.from_numpy(a) for a in (x, w, b, g))
    dmean, drstd = mps.from_numpy(mean), mps.from_numpy(rstd)
    f = 4
    rows = [
        (f"layer_norm v{v}", lambda v=v: _layer_norm(v)(dx, dw, db), want, 2 * x.size * f)
        for v in (1, 2, 3, 4)
        if (v != 3 or d <= 1024) and (v != 4 or d <= 16384)
    ]
    # v1: dx in two sweeps, then the column sums; v2: one read, fused (D <= 1024); v3: v2
    # with a row shared by P SIMD groups (D <= 2048)
    for v in [1] + [2] * (d <= 1024) + [3] * (d <= 2048):
        run = with_choice("layernorm_backward", v,
                       lambda: mps.layer_norm_backward(dg, dx, dw, dmean, drstd)[0])  # fmt: skip
        rows.append((f"layer_norm_backward v{v}", run, dx_want, 3 * x.size * f))
    for v in (1, 2):  # v1: one element per thread, tanh; v2: float4s, x * sigmoid(2u)
        rows += [
            (f"gelu v{v}", memory_version(v, lambda: mps.gelu(dx)), cpu.gelu(x), 2 * x.size * f),
            (f"gelu_backward v{v}", memory_version(v, lambda: mps.gelu_backward(dx, dg)),
             cpu.gelu_backward(x, g), 3 * x.size * f),
        ]  # fmt: skip
    return rows


def validate(log=print) -> bool:
    rng = np.random.default_rng(0)
    ok = True
    for shape in [(1, 1), (3, 33), (5, 1000)]:
        for label, run, want, _ in cases(shape, rng):
            got = run().numpy()
            good = np.allclose(got, want, rtol=1e-4, atol=1e-4)
            ok &= bool(good)
            if not good:
                err = float(np.abs(got - want).max())
                log(f"  validate {label} {shape}: FAIL (max error {err:.1e})")
    log(f"  validate: {'ok' if ok else 'FAILED'}")
    return ok


def main(argv=None) -> int:
    args = parse_args("python -m camel.bench layernorm", __doc__, reps=20, argv=argv)
    code, unit = start(args, validate)
    if code is not None:
        return code
    shapes = SIM_SHAPES if unit.startswith("sim") else GPU_SHAPES
    time_cases("(N, D)", shapes, cases, args.reps, unit)
    return 0
