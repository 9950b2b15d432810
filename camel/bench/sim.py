"""The Metal simulator's own costs: ``python -m camel.bench sim``.

What it measures (each result is validated against NumPy before it is timed):
  fiber switch       one hand-written context switch between two simulated threads
  cached library     camel_library_new of a source already in the on-disk kernel cache
  SGEMM 256^3        a tiled GEMM with 16x16 threadgroups and two barriers per tile step
  float4 add         4 M floats, barrier-free (a plain loop per threadgroup), vs NumPy
  fibers             a threadgroup_barrier per thread, a simd_sum per lane (kernels the
                     barrier regions cannot take run on fibers)
  dispatch overhead  the host cost of one dispatch through camel.metal (encode only, and
                     encode + run + wait for a one-thread kernel)

With --vs-pocl it measures the simulator against PoCL (OpenCL on the CPU) instead: the same
kernels (saxpy scalar and float4, a row sum with a tree in threadgroup memory, tiled SGEMM),
written once in MSL and once in OpenCL C, with the same launch geometry, both on 2 threads,
each result checked against NumPy, the two timed in turn in one process. It needs pyopencl
and a PoCL device: `apt-get install pocl-opencl-icd` and `pip install pyopencl` (a virtual
environment made with --system-site-packages is enough).

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

// Barriers in a while loop (not barrier regions: this runs on fibers). Each round every
// thread takes its right neighbour's value: after n rounds, thread i holds (i + n) % size.
kernel void fiber_barriers(device float *out [[buffer(0)]], constant uint &n [[buffer(1)]],
                           uint lid [[thread_position_in_threadgroup]],
                           uint group [[threadgroup_position_in_grid]],
                           uint size [[threads_per_threadgroup]]) {
    threadgroup float t[1024];
    t[lid] = float(lid);
    uint k = 0;
    while (k < n) {
        threadgroup_barrier(mem_flags::mem_threadgroup);
        float v = t[(lid + 1) % size];
        threadgroup_barrier(mem_flags::mem_threadgroup);
        t[lid] = v;
        k++;
    }
    out[group * size + lid] = t[lid];
}

// n simd_sums in a row; the lanes of a SIMD group start with 0..31, so every sum is 496
// and s stays 496 / 32 = 15.5.
kernel void fiber_simd_sums(device float *out [[buffer(0)]], constant uint &n [[buffer(1)]],
                            uint i [[thread_position_in_grid]]) {
    float s = float(i % 32);
    for (uint k = 0; k < n; k++) s = simd_sum(s) * (1.0f / 32.0f);
    out[i] = s;
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
    parser.add_argument("--vs-pocl", action="store_true", help="the simulator against PoCL")
    args = parser.parse_args(argv)
    os.environ.setdefault("CAMEL_SIM_WORKERS", "2")
    if args.vs_pocl:
        return vs_pocl(args.repeat)
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

    # 5. Fibers: a barrier per thread, a simd_sum per lane (256 groups of 256 threads;
    # CPU time of all workers, per thread and call).
    groups, size, calls = 256, 256, 32
    workers = int(os.environ["CAMEL_SIM_WORKERS"])
    out = M.DeviceArray.zeros((groups * size,))
    n_calls = np.uint32(calls)
    barriers = library.function("fiber_barriers")
    sums = library.function("fiber_simd_sums")

    def barrier_run():
        barriers(out, n_calls, threadgroups=groups, threads_per_threadgroup=size)
        M.synchronize()

    def simd_run():
        sums(out, n_calls, threads=groups * size, threads_per_threadgroup=size)
        M.synchronize()

    barrier_run()
    want = np.tile((np.arange(size) + calls) % size, groups).astype(np.float32)
    np.testing.assert_array_equal(out.numpy(), want)
    ns = best_ms(barrier_run, args.repeat) * 1e6 * workers / (groups * size * 2 * calls)
    rows.append(
        ("fibers: threadgroup_barrier", f"{ns:.1f} ns per thread and barrier", "report", "")
    )
    simd_run()
    np.testing.assert_array_equal(out.numpy(), np.full(groups * size, 15.5, np.float32))
    ns = best_ms(simd_run, args.repeat) * 1e6 * workers / (groups * size * calls)
    rows.append(("fibers: simd_sum", f"{ns:.1f} ns per lane per call", "report", ""))

    # 6. Host overhead of one dispatch through camel.metal.
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


# ---- --vs-pocl: the simulator against PoCL ----------------------------------------------

# The same kernels in MSL (the simulator) and OpenCL C (PoCL); SGEMM is sgemm_tiled16 above.
VS_MSL = r"""
kernel void saxpy(device const float *x [[buffer(0)]], device const float *y [[buffer(1)]],
                  device float *out [[buffer(2)]], constant float &a [[buffer(3)]],
                  uint i [[thread_position_in_grid]]) {
    out[i] = a * x[i] + y[i];
}

kernel void saxpy4(device const float4 *x [[buffer(0)]], device const float4 *y [[buffer(1)]],
                   device float4 *out [[buffer(2)]], constant float &a [[buffer(3)]],
                   uint i [[thread_position_in_grid]]) {
    out[i] = a * x[i] + y[i];
}

// One threadgroup of 256 threads per row: strided partial sums, then a tree (9 barriers).
kernel void row_sum(device const float *x [[buffer(0)]], device float *out [[buffer(1)]],
                    constant uint &cols [[buffer(2)]], uint row [[threadgroup_position_in_grid]],
                    uint lid [[thread_position_in_threadgroup]]) {
    threadgroup float t[256];
    float s = 0.0f;
    for (uint c = lid; c < cols; c += 256) s += x[row * cols + c];
    t[lid] = s;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (uint k = 128; k > 0; k >>= 1) {
        if (lid < k) t[lid] += t[lid + k];
        threadgroup_barrier(mem_flags::mem_threadgroup);
    }
    if (lid == 0) out[row] = t[0];
}
"""

VS_OPENCL = r"""
__kernel void saxpy(__global const float *x, __global const float *y, __global float *out,
                    const float a) {
    uint i = get_global_id(0);
    out[i] = a * x[i] + y[i];
}

__kernel void saxpy4(__global const float4 *x, __global const float4 *y, __global float4 *out,
                     const float a) {
    uint i = get_global_id(0);
    out[i] = a * x[i] + y[i];
}

__kernel void row_sum(__global const float *x, __global float *out, const uint cols) {
    __local float t[256];
    uint row = get_group_id(0), lid = get_local_id(0);
    float s = 0.0f;
    for (uint c = lid; c < cols; c += 256) s += x[row * cols + c];
    t[lid] = s;
    barrier(CLK_LOCAL_MEM_FENCE);
    for (uint k = 128; k > 0; k >>= 1) {
        if (lid < k) t[lid] += t[lid + k];
        barrier(CLK_LOCAL_MEM_FENCE);
    }
    if (lid == 0) out[row] = t[0];
}

__kernel void sgemm_tiled16(__global const float *A, __global const float *B, __global float *C,
                            const uint M, const uint N, const uint K) {
    __local float As[16][16];
    __local float Bs[16][16];
    uint row = get_global_id(1), col = get_global_id(0);
    uint ly = get_local_id(1), lx = get_local_id(0);
    float acc = 0.0f;
    for (uint k0 = 0; k0 < K; k0 += 16) {
        As[ly][lx] = (row < M && k0 + lx < K) ? A[row * K + k0 + lx] : 0.0f;
        Bs[ly][lx] = (k0 + ly < K && col < N) ? B[(k0 + ly) * N + col] : 0.0f;
        barrier(CLK_LOCAL_MEM_FENCE);
        for (uint k = 0; k < 16; k++) acc += As[ly][k] * Bs[k][lx];
        barrier(CLK_LOCAL_MEM_FENCE);
    }
    if (row < M && col < N) C[row * N + col] = acc;
}
"""

POCL_HOWTO = (
    "[bench sim] --vs-pocl needs pyopencl and a PoCL device: `apt-get install pocl-opencl-icd` "
    "(Debian/Ubuntu) and `pip install pyopencl` (a venv made with --system-site-packages is "
    "enough)"
)


def pocl_queue(threads: int):
    """A command queue on PoCL's CPU device limited to `threads` threads, or None (printed why).
    PoCL 3.x reads POCL_MAX_PTHREAD_COUNT (newer versions also POCL_CPU_MAX_CU_COUNT) when the
    platform starts, so both are set before pyopencl is imported."""
    os.environ.setdefault("POCL_MAX_PTHREAD_COUNT", str(threads))
    os.environ.setdefault("POCL_CPU_MAX_CU_COUNT", str(threads))
    try:
        import pyopencl as cl
    except ImportError:
        print(POCL_HOWTO + "; pyopencl is not installed")
        return None, None
    try:
        platforms = cl.get_platforms()
    except cl.Error as e:  # no ICD at all
        print(f"{POCL_HOWTO}; no OpenCL platform ({e})")
        return None, None
    for platform in platforms:
        if "Portable Computing Language" in platform.name:
            devices = platform.get_devices(device_type=cl.device_type.CPU)
            if devices:
                ctx = cl.Context([devices[0]])
                return cl, cl.CommandQueue(ctx)
    print(f"{POCL_HOWTO}; platforms found: {[p.name for p in platforms] or 'none'}")
    return None, None


def vs_pocl(repeat: int) -> int:
    """The issue-13 table: each kernel on the simulator and on PoCL, timed in turn."""
    threads = int(os.environ["CAMEL_SIM_WORKERS"])
    cl, queue = pocl_queue(threads)
    if queue is None:
        return 1
    import camel.metal as M

    if not M.is_simulator():
        print("[bench sim] this measures the simulator; run with CAMEL_SHIM=sim")
        return 1
    dev = queue.device
    print(f"simulator: {M.device_name()}, order {os.environ.get('CAMEL_SIM_ORDER', 'forward')}")
    print(
        f"PoCL: {dev.platform.version}, {dev.name}, {dev.max_compute_units} compute units "
        f"(POCL_MAX_PTHREAD_COUNT={os.environ['POCL_MAX_PTHREAD_COUNT']})"
    )
    library = M.compile(SRC + VS_MSL, "bench_sim_vs_pocl.metal")
    program = cl.Program(queue.context, VS_OPENCL).build()
    mf = cl.mem_flags
    rng = np.random.default_rng(0)

    def cl_in(arr):
        return cl.Buffer(queue.context, mf.READ_ONLY | mf.COPY_HOST_PTR, hostbuf=arr)

    def cl_out(nbytes):
        return cl.Buffer(queue.context, mf.WRITE_ONLY, nbytes)

    def cl_read(buf, shape):
        out = np.empty(shape, np.float32)
        cl.enqueue_copy(queue, out, buf)
        return out

    def cl_runner(name, args, global_size, local_size):
        kernel = cl.Kernel(program, name)
        kernel.set_args(*args)

        def run(args=args):  # (set_args keeps no reference: the buffers live here)
            cl.enqueue_nd_range_kernel(queue, kernel, global_size, local_size)
            queue.finish()

        return run

    def sim_runner(name, args, **grid):
        fn = library.function(name)

        def run():
            fn(*args, **grid)
            M.synchronize()

        return run

    cases = []  # (kernel, size, simulator run, PoCL run, simulator result, PoCL result, want)
    n = 4 << 20
    a = np.float32(1.5)
    x, y = rng.standard_normal(n, np.float32), rng.standard_normal(n, np.float32)
    X, Y, Z = M.DeviceArray.from_numpy(x), M.DeviceArray.from_numpy(y), M.DeviceArray.zeros((n,))
    cx, cy, cz = cl_in(x), cl_in(y), cl_out(4 * n)
    want = a * x + y
    for name, width in (("saxpy", 1), ("saxpy4", 4)):
        cases.append(
            (
                f"saxpy, {'scalar' if width == 1 else 'float4'}",
                "4M floats, 256 per threadgroup",
                sim_runner(name, (X, Y, Z, a), threads=n // width, threads_per_threadgroup=256),
                cl_runner(name, (cx, cy, cz, a), (n // width,), (256,)),
                lambda: Z.numpy(),
                lambda: cl_read(cz, (n,)),
                want,
            )
        )
    rows, cols = 4096, 1024
    m = rng.standard_normal((rows, cols), np.float32)
    XM, S = M.DeviceArray.from_numpy(m), M.DeviceArray.zeros((rows,))
    cm, cs = cl_in(m), cl_out(4 * rows)
    ncols = np.uint32(cols)
    cases.append(
        (
            "row sum, tree in threadgroup memory (9 barriers)",
            f"{rows} x {cols}, 256 per threadgroup",
            sim_runner("row_sum", (XM, S, ncols), threadgroups=rows, threads_per_threadgroup=256),
            cl_runner("row_sum", (cm, cs, ncols), (rows * 256,), (256,)),
            lambda: S.numpy(),
            lambda: cl_read(cs, (rows,)),
            m.sum(axis=1),
        )
    )
    for size in (256, 512):
        ga = rng.standard_normal((size, size), np.float32)
        gb = rng.standard_normal((size, size), np.float32)
        A, B = M.DeviceArray.from_numpy(ga), M.DeviceArray.from_numpy(gb)
        C = M.DeviceArray.zeros((size, size))
        ca, cb, cc = cl_in(ga), cl_in(gb), cl_out(4 * size * size)
        dims = np.uint32(size)
        mnk = np.array([size, size, size, 0], np.uint32)
        cases.append(
            (
                "SGEMM, 16x16 tiles, two barriers per K step",
                f"{size}^3",
                sim_runner(
                    "sgemm_tiled16",
                    (A, B, C, mnk),
                    threadgroups=(size // 16, size // 16),
                    threads_per_threadgroup=(16, 16),
                ),
                cl_runner("sgemm_tiled16", (ca, cb, cc, dims, dims, dims), (size, size), (16, 16)),
                (lambda C=C: C.numpy()),
                (lambda cc=cc, size=size: cl_read(cc, (size, size))),
                ga @ gb,
            )
        )

    # Validate both against NumPy, then time them in turn (the machine's load hits both alike).
    for what, size, run_sim, run_cl, got_sim, got_cl, want in cases:
        run_sim()
        run_cl()
        for who, got in (("simulator", got_sim()), ("PoCL", got_cl())):
            np.testing.assert_allclose(
                got, want, rtol=1e-4, atol=1e-3, err_msg=f"[bench sim] {what} {size} on {who}"
            )
    time.sleep(0.2)  # let NumPy's BLAS threads stop spinning before we time
    times = [([], []) for _ in cases]
    for _ in range(repeat):
        for (_, _, run_sim, run_cl, *_), (t_sim, t_cl) in zip(cases, times, strict=True):
            for run, acc in ((run_sim, t_sim), (run_cl, t_cl)):
                t0 = time.perf_counter()
                run()
                acc.append(1e3 * (time.perf_counter() - t0))

    print(f"best of {repeat}, both on {threads} threads; ratio = simulator / PoCL (goal <= 1.5)")
    header = ("kernel", "size", "simulator", "PoCL", "ratio", "per-run ratios", "")
    table = [header]
    for (what, size, *_), (t_sim, t_cl) in zip(cases, times, strict=True):
        ratio = min(t_sim) / min(t_cl)
        each = sorted(s / c for s, c in zip(t_sim, t_cl, strict=True))
        table.append(
            (
                what,
                size,
                f"{min(t_sim):.2f} ms",
                f"{min(t_cl):.2f} ms",
                f"{ratio:.2f}x",
                f"{each[0]:.2f}-{each[-1]:.2f}x",
                verdict(ratio, 1.5),
            )
        )
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    for r in table:
        print(" | ".join(f"{c:<{w}}" for c, w in zip(r, widths, strict=True)).rstrip(" |"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
