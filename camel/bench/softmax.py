"""Benchmark Stage 2's softmax family: ``python -m camel.bench softmax``.

Kernels of shaders/ops_softmax.metal through camel/backend_mps.py: softmax and
log_softmax forward (v1: one threadgroup per row, three sweeps over the row: max, sum of
exp, write; v2: the row read once into the registers of one SIMD group, or 2-16 for rows
past 1024 floats, up to 16384; v2_r4: half the registers a lane, 2-32 SIMD groups past 512
floats; v3: none held, the row read twice, the second time from the cache, any width),
softmax backward (v1: two sweeps; v2, v2_r4, v3: y and dy read once into registers or
twice, as the forward), the fused cross-entropy forward (v1, v2, v3 as softmax),
and its backward (v1: one thread per element; v2: one per float4 when C % 4 == 0).

1. Validate each against NumPy (backend_cpu) at awkward shapes (rows of 1, 33, 10 000)
   and extreme logits (+-1e4, -inf entries): no NaN, equal to float32 tolerance.
2. On an Apple GPU: time each after warm-up and print  op | (N, C) | ms | GB/s
   (the compulsory bytes: read x once, write y once) and % of copy (copy_uint4 over
   the same array: the measured copy bandwidth). On the simulator: timed the same way,
   labelled (its times are CPU times, not GPU timings).
"""

from __future__ import annotations

import numpy as np

from camel.bench.bandwidth import memory_version, parse_args, start, time_cases

GPU_SHAPES = [(4096, 1024), (1024, 16384), (65536, 10), (65536, 1024)]  # the last: 256 MiB
SIM_SHAPES = [(256, 1000), (16, 10000)]
# (CAMEL_MEMORY_KERNELS, backend_mps.ROW_FLOAT4S, label) of each softmax row kernel timed
ROW_KERNELS = ((1, 8, "v1"), (2, 8, "v2"), (2, 4, "v2_r4"), (2, 0, "v3"))


def cases(shape, rng, extreme=False):
    """(label, run() -> DeviceArray, expected, bytes) per kernel at (N, C)."""
    from camel import backend_cpu as cpu
    from camel import backend_mps as mps

    n, c = shape
    x = rng.standard_normal(shape, dtype=np.float32) * np.float32(1e4 if extreme else 3)
    if extreme:
        x[:, 1::7] = -np.inf
    g = rng.standard_normal(shape, dtype=np.float32)
    t = rng.integers(0, c, size=n).astype(np.int32)
    dx, dg, dt = mps.from_numpy(x), mps.from_numpy(g), mps.from_numpy(t)
    with np.errstate(all="ignore"):
        y = cpu.softmax(x)
        _, probs = cpu.cross_entropy(x, t)
    dy, dprobs = mps.from_numpy(y), mps.from_numpy(probs)
    one = mps.from_numpy(np.array(1.0, np.float32))
    f = 4
    forward = []
    # v1: three sweeps, one threadgroup per row; v2: the row in registers, 8 float4s a lane;
    # v2_r4: 4 float4s a lane, twice the SIMD groups a row; v3: none held, the row read
    # twice (backend_mps.ROW_FLOAT4S)
    for v, float4s, name in ROW_KERNELS:
        forward += [
            (f"softmax {name}", _rows(v, float4s, lambda: mps.softmax(dx)), y, 2 * x.size * f),
            (f"log_softmax {name}", _rows(v, float4s, lambda: mps.log_softmax(dx)),
             cpu.log_softmax(x), 2 * x.size * f),
        ]  # fmt: skip
    return forward + [
        (f"softmax_backward {name}", _rows(v, float4s, lambda: mps.softmax_backward(dy, dg)),
         cpu.softmax_backward(y, g), 3 * x.size * f)
        for v, float4s, name in ROW_KERNELS
    ] + [
        (f"cross_entropy (forward) {name}",
         _rows(v, float4s, lambda: mps.cross_entropy(dx, dt)[1]), probs, 2 * x.size * f)
        # probs (and the loss): v1 three sweeps; v2 the row in registers; v3 read twice
        for v, float4s, name in ((1, 8, "v1"), (2, 8, "v2"), (2, 0, "v3"))
    ] + [
        (f"cross_entropy_backward v{v}",
         memory_version(v, lambda: mps.cross_entropy_backward(dprobs, dt, one)),
         cpu.cross_entropy_backward(probs, t, np.array(1.0, np.float32)), 2 * x.size * f)
        for v in (1, 2)  # v1: one thread per element; v2: one per float4 (C % 4 == 0)
    ]  # fmt: skip


def _rows(version: int, float4s: int, run):
    """memory_version(version, run) with backend_mps.ROW_FLOAT4S = float4s for each call."""
    from camel import backend_mps as mps

    def call():
        saved, mps.ROW_FLOAT4S = mps.ROW_FLOAT4S, float4s
        try:
            return run()
        finally:
            mps.ROW_FLOAT4S = saved

    return memory_version(version, call)


def validate(log=print) -> bool:
    rng = np.random.default_rng(0)
    ok = True
    for shape, extreme in [((1, 1), False), ((3, 33), False), ((2, 10000), False),
                           ((4, 1000), True)]:  # fmt: skip
        for label, run, want, _ in cases(shape, rng, extreme):
            got = run().numpy()
            finite = np.isfinite(want)
            good = (
                not np.isnan(got).any()
                and np.array_equal(np.isfinite(got), finite)
                and np.allclose(
                    got[finite], want[finite], rtol=2e-5, atol=1e-3 if extreme else 1e-6
                )
            )
            ok &= bool(good)
            if not good:
                log(f"  validate {label} {shape}{' extreme' if extreme else ''}: FAIL")
    log(f"  validate: {'ok' if ok else 'FAILED'}")
    return ok


def main(argv=None) -> int:
    args = parse_args("python -m camel.bench softmax", __doc__, reps=20, argv=argv)
    code, unit = start(args, validate)
    if code is not None:
        return code
    shapes = SIM_SHAPES if unit.startswith("sim") else GPU_SHAPES
    time_cases("(N, C)", shapes, cases, args.reps, unit)
    return 0
