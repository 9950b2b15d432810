"""The Metal simulator's own costs: ``python -m camel.bench sim``.

What it measures (each result is validated against NumPy before it is timed):
  fiber switch       one hand-written context switch between two simulated threads
  cached library     camel_library_new of a source already in the on-disk kernel cache
  SGEMM 256^3        a tiled GEMM with 16x16 threadgroups and two barriers per tile step
  float4 add         4 M floats, barrier-free (a plain loop per threadgroup), vs NumPy
  dispatch overhead  the host cost of one dispatch through camel.metal (encode only, and
                     encode + run + wait for a one-thread kernel)

Runs with CAMEL_SIM_WORKERS=2 unless that variable is set. These are CPU timings of the
simulator, not GPU claims.
"""

import argparse
import ctypes
import os
import time

import numpy as np

SRC = r"""
#include <metal_stdlib>
using namespace metal;

// C (M, N) = A (M, K) @ B (K, N), row-major; one thread computes C[row, col].
kernel void sgemm_tiled16(device const float *A [[buffer(0)]], device const float *B [[buffer(1)]],
                          device float *C [[buffer(2)]], constant uint3 &mnk [[buffer(3)]],
                          uint2 gid [[thread_position_in_grid]],
                          uint2 lid [[thread_position_in_threadgroup]]) {
    threadgroup float As[16][16];
    threadgroup float Bs[16][16];
    uint M = mnk.x, N = mnk.y, K = mnk.z, row = gid.y, col = gid.x;
    float acc = 0.0;
    for (uint k0 = 0; k0 < K; k0 += 16) {
        As[lid.y][lid.x] = (row < M && k0 + lid.x < K) ? A[row * K + k0 + lid.x] : 0.0;
        Bs[lid.y][lid.x] = (k0 + lid.y < K && col < N) ? B[(k0 + lid.y) * N + col] : 0.0;
        threadgroup_barrier(mem_flags::mem_threadgroup);
        for (uint k = 0; k < 16; k++) acc += As[lid.y][k] * Bs[k][lid.x];
        threadgroup_barrier(mem_flags::mem_threadgroup);
    }
    if (row < M && col < N) C[row * N + col] = acc;
}

// One thread adds four floats.
kernel void add_f4(device const float4 *a [[buffer(0)]], device const float4 *b [[buffer(1)]],
                   device float4 *out [[buffer(2)]], uint i [[thread_position_in_grid]]) {
    out[i] = a[i] + b[i];
}

kernel void noop(device float *x [[buffer(0)]], uint i [[thread_position_in_grid]]) {
    if (i == 1u << 30) x[0] = 1.0;
}
"""


def verdict(value: float, limit: float | None) -> str:
    """'ok' or 'MISSED' against a target (value <= limit), as bench cpu marks its goals;
    '' for a figure that is only reported."""
    if limit is None:
        return ""
    return "ok" if value <= limit else "MISSED"


def best_ms(fn, repeat: int) -> float:
    """Best wall time of fn() in milliseconds over `repeat` runs (after one warm-up)."""
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * min(times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m camel.bench sim", description=__doc__)
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per figure (best)")
    args = parser.parse_args(argv)
    os.environ.setdefault("CAMEL_SIM_WORKERS", "2")
    import camel.metal as M

    if not M.is_simulator():
        print("[bench sim] this measures the simulator; run with CAMEL_SHIM=sim")
        return 1
    lib = M._native()
    print(f"device: {M.device_name()}   order: {os.environ.get('CAMEL_SIM_ORDER', 'forward')}")
    rows = []

    # 1. Fiber switch (an extra export of the simulator, not part of camel_shim.h).
    bench_switch = lib.camel_sim_bench_fiber_switch
    bench_switch.argtypes, bench_switch.restype = [ctypes.c_uint64], ctypes.c_double
    ns = min(bench_switch(2_000_000) for _ in range(args.repeat))
    rows.append(("fiber switch", f"{ns:.2f} ns", "<= 5 ns", verdict(ns, 5)))

    # 2. A cached library: the source is compiled once, then loaded from the disk cache.
    library = M.compile(SRC, "bench_sim.metal")
    src = SRC.encode()

    def load():
        handle = lib.camel_library_new(src, b"bench_sim.metal")
        assert handle, M._error_text()
        lib.camel_library_release(handle)

    ms_load = best_ms(load, args.repeat)
    rows.append(("cached library load", f"{ms_load:.2f} ms", "<= 5 ms", verdict(ms_load, 5)))

    # 3. SGEMM 256^3, 16x16 threadgroups.
    n = 256
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((n, n), np.float32), rng.standard_normal((n, n), np.float32)
    A, B, C = M.DeviceArray.from_numpy(a), M.DeviceArray.from_numpy(b), M.DeviceArray.zeros((n, n))
    mnk = np.array([n, n, n, 0], np.uint32)
    sgemm = library.function("sgemm_tiled16")

    def gemm():
        sgemm(A, B, C, mnk, threadgroups=(n // 16, n // 16), threads_per_threadgroup=(16, 16))
        M.synchronize()

    gemm()
    np.testing.assert_allclose(C.numpy(), a @ b, rtol=1e-3, atol=1e-3)
    time.sleep(0.2)  # let NumPy's BLAS threads stop spinning before we time
    ms = best_ms(gemm, args.repeat)
    # CPU time of all workers together: what the run costs when the machine is busy.
    cpu0 = time.process_time()
    for _ in range(args.repeat):
        gemm()
    cpu_ms = 1e3 * (time.process_time() - cpu0) / args.repeat
    gflops = 2 * n**3 / ms / 1e6
    rows.append(
        (
            "SGEMM 256^3 tiled 16x16",
            f"{ms:.1f} ms ({gflops:.2f} GFLOP/s), {cpu_ms:.0f} ms CPU",
            "<= 25 ms",
            verdict(ms, 25),
        )
    )

    # 4. float4 add of 4 M floats vs NumPy.
    m = 4 << 20
    x, y = rng.standard_normal(m, np.float32), rng.standard_normal(m, np.float32)
    X, Y, Z = M.DeviceArray.from_numpy(x), M.DeviceArray.from_numpy(y), M.DeviceArray.zeros((m,))
    add = library.function("add_f4")

    def add4():
        add(X, Y, Z, threads=m // 4, threads_per_threadgroup=256)
        M.synchronize()

    add4()
    np.testing.assert_array_equal(Z.numpy(), x + y)
    z = np.empty_like(x)
    ms_sim = best_ms(add4, args.repeat)
    ms_np = best_ms(lambda: np.add(x, y, out=z), args.repeat)
    rows.append(
        (
            "float4 add 4M",
            f"{ms_sim:.2f} ms vs NumPy {ms_np:.2f} ms = {ms_sim / ms_np:.1f}x",
            "<= 3x",
            verdict(ms_sim / ms_np, 3),
        )
    )

    # 5. Host overhead of one dispatch through camel.metal.
    noop = library.function("noop")
    count = 2000

    def encode_many():
        for _ in range(count):
            noop(X, threads=1, threads_per_threadgroup=1)
        M.synchronize()

    def round_trips():
        for _ in range(count // 10):
            noop(X, threads=1, threads_per_threadgroup=1)
            M.synchronize()

    us_encode = best_ms(encode_many, args.repeat) * 1e3 / count
    us_trip = best_ms(round_trips, args.repeat) * 1e3 / (count // 10)
    rows.append(("dispatch (encode + run)", f"{us_encode:.1f} us per dispatch", "report", ""))
    rows.append(("dispatch + synchronize", f"{us_trip:.1f} us per round trip", "report", ""))

    width = max(len(r[0]) for r in rows)
    print(f"{'what':<{width}} | {'measured':<40} | target")
    for what, measured, target, mark in rows:
        print(f"{what:<{width}} | {measured:<40} | {target:<8} {mark}".rstrip())
    missed = [r[0] for r in rows if r[3] == "MISSED"]
    if missed:
        print(f"[bench sim] missed targets: {', '.join(missed)} (CPU timings of this machine)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
