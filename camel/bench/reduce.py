"""Benchmark Stage 2's reductions: ``python -m camel.bench reduce``.

Kernels of shaders/ops_reduce.metal through camel/backend_mps.py:
  sum / max over the last axis   v1: one threadgroup per row, simd_sum / simd_max, one
                                 exchange through threadgroup memory; v2: one SIMD group per
                                 row (more for rows past 1024), float4 loads
  sum over everything            two passes: threadgroup partials, then one threadgroup
  sum over the leading axis      v1: one thread per column (the bias gradient); v2: blocks of
                                 rows in parallel, then the blocks' partials (two passes)

1. Validate each against NumPy (backend_cpu) at awkward shapes: rows of 1, 33 and 10 000,
   4097 elements in all, a (4097, 3) leading-axis sum; max ties resolved to the first index.
2. On an Apple GPU: time each after warm-up and print  op | shape | ms | GB/s
   (bytes read + written per call / time) and % of copy (copy_uint4 over the same
   array: the measured copy bandwidth). On the simulator: timed the same way, labelled
   (its times are CPU times, not GPU timings).
"""

from __future__ import annotations

import numpy as np

from camel.bench.bandwidth import memory_version, parse_args, start, time_cases

GPU_SHAPES = [(4096, 1024), (1024, 16384), (16384, 256), (65536, 1024)]  # the last: 256 MiB
SIM_SHAPES = [(256, 1024), (64, 10000)]


def cases(shape, rng):
    """(label, run() -> DeviceArray, expected, bytes) for each reduction at `shape`."""
    from camel import backend_cpu as cpu
    from camel import backend_mps as mps

    x = rng.standard_normal(shape, dtype=np.float32)
    ties = rng.integers(-3, 4, size=shape).astype(np.float32)
    dx, dt = mps.from_numpy(x), mps.from_numpy(ties)
    rows, k = shape
    f = 4
    out = []
    for v in (1, 2):  # v1: the lesson kernels; v2: a SIMD group per row, blocked column sum
        out += [
            (f"sum last axis v{v}", memory_version(v, lambda: mps.sum(dx, 1, False)),
             cpu.sum(x, 1, False), (x.size + rows) * f),
            (f"max last axis v{v}", memory_version(v, lambda: mps.max(dt, 1, False)[1]),
             cpu.max(ties, 1, False)[1], (x.size + 2 * rows) * f),
        ]  # fmt: skip
    for v in (1, 2):  # v2: float4 loads in pass 1
        run = memory_version(v, lambda: mps.sum(dx, None, False))
        out.append((f"sum all (2 passes) v{v}", run, cpu.sum(x, None, False), x.size * f))
    col = x.sum(0, dtype=np.float64).astype(np.float32)  # v1 adds a long float32 chain
    for v in (1, 2):
        run = memory_version(v, lambda: mps.sum(dx, 0, False))
        out.append((f"sum axis 0 (bias grad) v{v}", run, col, (x.size + k) * f))
    return out


def validate(log=print) -> bool:
    rng = np.random.default_rng(0)
    ok = True
    for shape in [(1, 1), (3, 33), (2, 10000), (4097, 3), (1, 4097)]:
        for label, run, want, _ in cases(shape, rng):
            got = run().numpy()
            good = got.shape == want.shape and np.allclose(got, want, rtol=1e-5, atol=1e-4)
            ok &= bool(good)
            if not good:
                log(f"  validate {label} {shape}: FAIL")
    log(f"  validate: {'ok' if ok else 'FAILED'}")
    return ok


def main(argv=None) -> int:
    args = parse_args("python -m camel.bench reduce", __doc__, reps=20, argv=argv)
    code, unit = start(args, validate)
    if code is not None:
        return code
    shapes = SIM_SHAPES if unit.startswith("sim") else GPU_SHAPES
    time_cases("shape", shapes, cases, args.reps, unit)
    return 0
