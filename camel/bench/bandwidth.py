"""What the memory-bound benchmarks (elementwise, reduce, softmax) share: the command
line, the validate-first start, and copy_uint4's bandwidth as the yardstick."""

from __future__ import annotations

import argparse

import numpy as np


def parse_args(prog: str, doc: str, reps: int, argv=None, add=None) -> argparse.Namespace:
    """--reps and --time for every benchmark; `add(parser)` adds a benchmark's own flags."""
    parser = argparse.ArgumentParser(
        prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--reps", type=int, default=reps, help="calls per timing")
    # Every bench times on the simulator, labelled (as matmul and attention do); --time is
    # what that used to take, kept so old command lines still run.
    parser.add_argument("--time", action="store_true", help="(the default; kept for old scripts)")
    if add is not None:
        add(parser)
    return parser.parse_args(argv)


def start(args, validate) -> tuple[int | None, str]:
    """Name the device, validate, and say what the times are.
    Returns (exit code, "") to stop here, or (None, unit) with the GB/s column's name."""
    from camel import metal

    sim = metal.is_simulator()
    print(f"device: {metal.device_name()}" + (" (the Metal simulator on the CPU)" if sim else ""))
    if not validate():
        return 1, ""
    if sim:
        # Timed like every bench (matmul, attention): sim GB/s compares kernels with each
        # other on this CPU and says nothing about a GPU's bandwidth.
        print("[bench] SIMULATOR: kernels run on the CPU; times below are NOT GPU timings")
    return None, "sim GB/s" if sim else "GB/s"


def copy_gbs(n: int, reps: int) -> float:
    """GB/s of copy_uint4 (Stage 1's float4 copy) over n floats: this device's measured
    copy bandwidth at this size, the ceiling for a kernel that reads its input once."""
    from camel import metal
    from camel.tuning import time_ms

    src = metal.DeviceArray.from_numpy(np.zeros(n, np.float32))
    dst = metal.DeviceArray.empty((n,), np.float32)
    fn = metal.kernel("ops_elementwise.metal", "copy_uint4")
    threads = (n + 3) // 4
    tpg = min(256, threads)
    ms = time_ms(lambda: fn(src, dst, n, threads=threads, threads_per_threadgroup=tpg), reps)
    return 2 * n * 4 / ms / 1e6


def time_cases(what: str, shapes, cases, reps: int, unit: str) -> None:
    """Time every case at every shape and print  op | shape | ms | GB/s | % of copy | % of
    roofline | the kernels one call ran, each with its own time in that call. cases(shape,
    rng) gives (label, run() -> DeviceArray, expected, bytes moved)."""
    import camel
    from camel.bench import roofline
    from camel.tuning import time_ms

    peaks = roofline.device_peaks()
    print(f"\n| op | {what} | ms | {unit} | % of copy | % of roofline | kernels |"
          "\n|---|---|---:|---:|---:|---:|---|")  # fmt: skip
    rng = np.random.default_rng(1)
    for shape in shapes:
        copy = copy_gbs(shape[0] * shape[1], reps)
        for label, run, _want, nbytes in cases(shape, rng):
            # the kernels one call dispatches: a version that cannot run this shape falls
            # back to another, and the row must say so. Their times (the profile gives each
            # dispatch its own command buffer) against the row's ms show what the op spends
            # outside its kernels: uploads, the gaps between dispatches, a host too slow.
            with camel.profile() as prof:
                run()
            each: dict[str, float] = {}
            for e in prof.events:
                each[e.name] = each.get(e.name, 0.0) + (e.ms or 0.0)
            kernels = ", ".join(f"{name} ({ms:.4f} ms)" for name, ms in each.items())
            ms = time_ms(run, reps)
            gbs = nbytes / ms / 1e6
            roof = roofline.percent(0.0, nbytes, ms, peaks)  # memory-bound: bytes / bandwidth
            pct = f"{100 * gbs / copy:.0f}%"
            print(f"| {label} | {shape} | {ms:.4f} | {gbs:.1f} | {pct} | {roof} | {kernels} |")
    print("\n" + roofline.note(peaks))


def with_choice(name: str, value, run):
    """run() with camel's per-op choice `name` (camel/config.py: "memory_kernels",
    "layernorm", ...) set to `value` for that one call, so one bench run can time two kernel
    versions side by side."""
    from camel import config

    def call(*args):
        with config.choices(**{name: value}):
            return run(*args)

    return call


def memory_version(version: int, run):
    """run() with CAMEL_MEMORY_KERNELS=version (1: the lesson kernels, 2: the ones that fill a
    big GPU; camel/backend_mps.py) for that one call."""
    return with_choice("memory_kernels", version, run)
