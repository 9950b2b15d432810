"""Benchmark Stage 1's elementwise kernels: ``python -m camel.bench elementwise``.

Version 1 gives each thread one float (``add_float``), version 2 four neighbouring
floats loaded as one float4 (``add_float4``); the same for mul and relu, and the
float4 copy (``copy_uint4``) is the reference bandwidth: a kernel that only moves bytes.

1. Validate every kernel against NumPy at awkward sizes (1, 3, 31, 33, 1000, 4097):
   exact equality (add, mul, relu and copy are exact in float32).
2. On an Apple GPU: time each kernel after warm-up (GPU timestamps of one command
   buffer of `--reps` dispatches) and print  kernel | n | ms | GB/s | % of copy,
   where "% of copy" compares with copy_uint4's bandwidth at the same size (this
   device's measured copy bandwidth).
   On the simulator: timed the same way, labelled: the simulator's times are CPU
   times that compare kernels here and say nothing about a GPU.
"""

from __future__ import annotations

import numpy as np

from camel.bench.bandwidth import parse_args, start

VALIDATE_SIZES = [1, 3, 31, 33, 1000, 4097]
GPU_SIZES = [1 << 16, 1 << 20, 1 << 24, 1 << 26]  # 256 KiB ... 256 MiB per array
SIM_SIZES = [1 << 14, 1 << 18]
SHADER = "ops_elementwise.metal"


def variants(n: int, rng):
    """(kernel, args, threads, bytes moved, output DeviceArray, expected) per kernel, at n."""
    from camel.metal import DeviceArray

    a = rng.standard_normal(n, dtype=np.float32)
    b = rng.standard_normal(n, dtype=np.float32)
    da, db = DeviceArray.from_numpy(a), DeviceArray.from_numpy(b)
    out = DeviceArray.empty((n,), np.float32)
    v4 = (n + 3) // 4
    f = 4  # bytes per float
    return [
        ("copy_uint4", (da, out, n), v4, 2 * n * f, out, a),
        ("add_float", (da, db, out, n), n, 3 * n * f, out, a + b),
        ("add_float4", (da, db, out, n), v4, 3 * n * f, out, a + b),
        ("mul_float", (da, db, out, n), n, 3 * n * f, out, a * b),
        ("mul_float4", (da, db, out, n), v4, 3 * n * f, out, a * b),
        ("relu_float", (da, out, n), n, 2 * n * f, out, np.maximum(a, 0)),
        ("relu_float4", (da, out, n), v4, 2 * n * f, out, np.maximum(a, 0)),
        ("relu_backward_float4", (da, db, out, n), v4, 3 * n * f, out, np.where(a > 0, b, 0)),
        ("mul_scalar_float4", (da, 0.5, out, n), v4, 2 * n * f, out, a * np.float32(0.5)),
    ]


def _run(name, args, threads, nbytes):
    from camel import metal

    fn = metal.kernel(SHADER, name)
    fn(*args, threads=threads, threads_per_threadgroup=min(256, threads), bytes=nbytes)


def validate(log=print) -> bool:
    rng = np.random.default_rng(0)
    ok = True
    for n in VALIDATE_SIZES:
        for name, args, threads, nbytes, out, want in variants(n, rng):
            _run(name, args, threads, nbytes)
            good = np.array_equal(out.numpy(), want.astype(np.float32))
            ok &= good
            if not good:
                log(f"  validate {name} n={n}: FAIL")
    log(f"  validate: {'ok' if ok else 'FAILED'} (every kernel at n = {VALIDATE_SIZES})")
    return ok


def time_all(sizes, reps, log=print) -> list[tuple]:
    from camel.tuning import time_ms

    rng = np.random.default_rng(1)
    rows = []
    for n in sizes:
        copy_gbs = None
        for name, args, threads, nbytes, _out, _want in variants(n, rng):
            ms = time_ms(lambda: _run(name, args, threads, nbytes), reps)  # noqa: B023
            gbs = nbytes / ms / 1e6
            if name == "copy_uint4":
                copy_gbs = gbs
            rows.append((name, n, ms, gbs, 100.0 * gbs / copy_gbs))
    return rows


def main(argv=None) -> int:
    def flags(parser):
        parser.add_argument("--sizes", type=int, nargs="+", help="element counts to time")

    args = parse_args("python -m camel.bench elementwise", __doc__, 50, argv, add=flags)
    code, unit = start(args, validate)
    if code is not None:
        return code
    sizes = args.sizes or (SIM_SIZES if unit.startswith("sim") else GPU_SIZES)
    from camel.bench import roofline

    peaks = roofline.device_peaks()
    print(f"\n| kernel | n | ms | {unit} | % of copy | % of roofline |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, n, ms, gbs, pct in time_all(sizes, args.reps):
        roof = roofline.percent(0.0, gbs * ms * 1e6, ms, peaks)  # memory-bound
        print(f"| {name} | {n} | {ms:.4f} | {gbs:.1f} | {pct:.0f}% | {roof} |")
    print("\n" + roofline.note(peaks))
    return 0
