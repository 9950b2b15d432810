"""GPU smoke test of the CUDA shim's translator, with no camel runtime.

Compiles small MSL kernels with libcamel_cuda.so (camel_cuda_compile: MSL ->
CUDA -> PTX with clang), loads the PTX with the CUDA driver (ctypes over
libcuda.so.1), launches each dispatch the way shim/cuda/cuda_abi.h describes
(up to eight uniform pieces, each with the block size Metal gives that part of
the grid, and group_origin saying where it starts), and compares with NumPy:

  simd_reduce   simd_sum/max/min(uint)/prefix_exclusive_sum/ballot in partial
                SIMD groups (edge threadgroups, threads that returned early)
  shuffles      simd_shuffle, _xor, _down, _up, simd_broadcast, quad_sum, quad_shuffle_xor
  barrier       a tree reduction in [[threadgroup(0)]] memory with threadgroup_barrier,
                in full and edge threadgroups, plus a static threadgroup array
  matrix        simdgroup_float8x8 load (also transposed), multiply_accumulate,
                multiply, a diagonal matrix, store at an origin
  math          exp, exp2, log, log2, tanh, sin, cos, pow, sqrt, rsqrt, divide:
                error in ulp against NumPy float64
  dispatch      a 3-D grid with edges in x, y and z: every builtin per thread,
                each grid position run exactly once (a device atomic)
  value sizes   camel_kernel_<n>_value_sizes read from the module

Run (python3 with numpy; clang++-19 on PATH or CAMEL_CUDA_CXX set; the shim
built with `make -C shim cuda`):
    python3 shim/cuda/tests/gpu_smoke.py            # on an NVIDIA GPU
    python3 shim/cuda/tests/gpu_smoke.py --sim      # the same checks on camel's simulator
Prints PASS/FAIL per check; exits 1 if any failed, 2 if it could not run.
"""

import ctypes
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent.parent
LIB = REPO / "shim" / "build" / "libcamel_cuda.so"

SOURCE = r"""
#include <metal_stdlib>
using namespace metal;

// Reductions over the active lanes: lanes whose u is a multiple of 5 return first.
kernel void simd_reduce(device const float *x [[buffer(0)]],
                        device const uint *u [[buffer(1)]],
                        device float *out [[buffer(2)]],     // (n, 4)
                        device uint *uout [[buffer(3)]],     // (n, 2)
                        uint i [[thread_position_in_grid]]) {
    if (u[i] % 5 == 0) return;
    float v = x[i];
    out[4 * i + 0] = simd_sum(v);
    out[4 * i + 1] = simd_max(v);
    out[4 * i + 2] = simd_prefix_exclusive_sum(v);
    out[4 * i + 3] = simd_prefix_inclusive_sum(v);
    uout[2 * i + 0] = simd_min(u[i]);
    uout[2 * i + 1] = popcount((uint)(ulong)simd_ballot(v > 0.0f));
}

kernel void shuffles(device const float *x [[buffer(0)]],
                     device float *out [[buffer(1)]],      // (n, 8)
                     uint i [[thread_position_in_grid]],
                     uint lane [[thread_index_in_simdgroup]]) {
    float v = x[i];
    device float *o = out + 8 * i;
    o[0] = simd_shuffle(v, (lane + 5) % 32);
    o[1] = simd_shuffle_xor(v, 3);
    o[2] = simd_shuffle_down(v, 2);
    o[3] = simd_shuffle_up(v, 1);
    o[4] = simd_broadcast(v, 7);
    o[5] = quad_sum(v);
    o[6] = quad_shuffle_xor(v, 1);
    o[7] = simd_all(v > -1000.0f) && simd_any(v > 30.0f) ? 1.0f : 0.0f;
}

// out[i] = sum of x over i's threadgroup, any threadgroup size
kernel void barrier_sum(device const float *x [[buffer(0)]],
                        device float *out [[buffer(1)]],
                        threadgroup float *scratch [[threadgroup(0)]],
                        uint i [[thread_position_in_grid]],
                        uint t [[thread_position_in_threadgroup]],
                        uint T [[threads_per_threadgroup]]) {
    threadgroup float total[1];
    scratch[t] = x[i];
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (uint s = 1; s < T; s *= 2) {
        if (t % (2 * s) == 0 && t + s < T) scratch[t] += scratch[t + s];
        threadgroup_barrier(mem_flags::mem_threadgroup);
    }
    if (t == 0) total[0] = scratch[0];
    threadgroup_barrier(mem_flags::mem_threadgroup);
    out[i] = total[0];
}

// d = a * bt^T + c; e = [2a | a * bt^T]   (a, bt, c, d: 8x8; e: 8x16; one SIMD group)
kernel void matrix(device const float *a [[buffer(0)]],
                   device const float *bt [[buffer(1)]],
                   device const float *c [[buffer(2)]],
                   device float *d [[buffer(3)]],
                   device float *e [[buffer(4)]]) {
    simdgroup_float8x8 A, B, C, D;
    simdgroup_load(A, a, 8);
    simdgroup_load(B, bt, 8, ulong2(0, 0), true);
    simdgroup_load(C, c, 8);
    simdgroup_multiply_accumulate(D, A, B, C);
    simdgroup_store(D, d, 8);
    simdgroup_multiply(D, A, B);
    simdgroup_store(D, e, 16, ulong2(8, 0));
    simdgroup_float8x8 two(2.0f);
    simdgroup_multiply(D, A, two);
    simdgroup_store(D, e, 16);
}

kernel void math(device const float *x [[buffer(0)]],
                 device const float *y [[buffer(1)]],
                 device float *out [[buffer(2)]],       // (11, n)
                 constant uint &n [[buffer(3)]],
                 uint i [[thread_position_in_grid]]) {
    float v = x[i], a = fabs(v) + 1e-3f;
    out[0 * n + i] = exp(v);
    out[1 * n + i] = exp2(v);
    out[2 * n + i] = log(a);
    out[3 * n + i] = log2(a);
    out[4 * n + i] = precise::tanh(v);
    out[5 * n + i] = sin(v);
    out[6 * n + i] = cos(v);
    out[7 * n + i] = pow(a, y[i]);
    out[8 * n + i] = sqrt(a);
    out[9 * n + i] = rsqrt(a);
    out[10 * n + i] = v / y[i];
}

kernel void dispatch(device uint4 *pos [[buffer(0)]],
                     device uint4 *size [[buffer(1)]],
                     device uint4 *group [[buffer(2)]],
                     device atomic_uint *hits [[buffer(3)]],
                     device const uint *grid [[buffer(4)]],
                     uint3 p [[thread_position_in_grid]],
                     uint3 local [[thread_position_in_threadgroup]],
                     uint3 tpt [[threads_per_threadgroup]],
                     uint3 g [[threadgroup_position_in_grid]],
                     uint3 ng [[threadgroups_per_grid]],
                     uint3 tpg [[threads_per_grid]],
                     uint index [[thread_index_in_threadgroup]],
                     uint sg [[simdgroup_index_in_threadgroup]]) {
    uint cell = p.x + grid[0] * (p.y + grid[1] * p.z);
    pos[cell] = uint4(p, index);
    size[cell] = uint4(tpt, sg);
    group[cell] = uint4(g, ng.x + 1000 * ng.y + 1000000 * ng.z + 0 * tpg.x);
    atomic_fetch_add_explicit(&hits[cell], 1u, memory_order_relaxed);
}
"""


# ---- the CUDA driver, through ctypes -----------------------------------------------
class CudaArgs(ctypes.Structure):  # shim/cuda/cuda_abi.h: camel_cuda_args
    _fields_ = [
        ("buffers", ctypes.c_uint64 * 31),
        ("threadgroup_offset", ctypes.c_uint32 * 31),
        ("group_origin", ctypes.c_uint32 * 3),
        ("threadgroups_per_grid", ctypes.c_uint32 * 3),
        ("threads_per_grid", ctypes.c_uint32 * 3),
        ("dispatch_threads_per_threadgroup", ctypes.c_uint32 * 3),
    ]


def pieces(grid, tpg):
    """The uniform launches of a dispatchThreads grid: (origin, groups, block) each."""
    parts = []
    for dim in range(3):
        full, rest = divmod(grid[dim], tpg[dim])
        p = []
        if full:
            p.append((0, full, tpg[dim]))
        if rest:
            p.append((full, 1, rest))
        parts.append(p)
    out = []
    for px in parts[0]:
        for py in parts[1]:
            for pz in parts[2]:
                out.append(tuple(zip(px, py, pz, strict=True)))
    return out  # each: ((ox, oy, oz), (gx, gy, gz), (bx, by, bz))


class Cuda:
    name = "cuda"

    def __init__(self):
        try:
            self.cu = ctypes.CDLL("libcuda.so.1")
        except OSError as e:
            print(f"[gpu_smoke] cannot load libcuda.so.1 ({e}): no NVIDIA driver here")
            raise SystemExit(2) from None
        self.check(self.cu.cuInit(0), "cuInit")
        dev = ctypes.c_int()
        self.check(self.cu.cuDeviceGet(ctypes.byref(dev), 0), "cuDeviceGet")
        major, minor = ctypes.c_int(), ctypes.c_int()
        self.cu.cuDeviceGetAttribute(ctypes.byref(major), 75, dev)  # COMPUTE_CAPABILITY_MAJOR
        self.cu.cuDeviceGetAttribute(ctypes.byref(minor), 76, dev)
        self.arch = major.value * 10 + minor.value
        name = ctypes.create_string_buffer(256)
        self.cu.cuDeviceGetName(name, 256, dev)
        self.device = f"{name.value.decode()} (sm_{self.arch})"
        self.ctx = ctypes.c_void_p()
        self.check(self.cu.cuDevicePrimaryCtxRetain(ctypes.byref(self.ctx), dev), "ctx retain")
        self.check(self.cu.cuCtxSetCurrent(self.ctx), "cuCtxSetCurrent")
        self.cu.cuMemAlloc_v2.argtypes = [ctypes.POINTER(ctypes.c_uint64), ctypes.c_size_t]
        self.cu.cuMemcpyHtoD_v2.argtypes = [ctypes.c_uint64, ctypes.c_void_p, ctypes.c_size_t]
        self.cu.cuMemcpyDtoH_v2.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_size_t]
        self.cu.cuMemFree_v2.argtypes = [ctypes.c_uint64]
        self.cu.cuLaunchKernel.argtypes = (
            [ctypes.c_void_p]
            + [ctypes.c_uint] * 7
            + [
                ctypes.c_void_p,
                ctypes.c_void_p,
                ctypes.c_void_p,
            ]
        )
        self.modules = {}

    def check(self, rc, what):
        if rc != 0:
            s = ctypes.c_char_p()
            self.cu.cuGetErrorString(rc, ctypes.byref(s))
            raise RuntimeError(f"[gpu_smoke] {what} failed: {rc} {s.value and s.value.decode()}")

    def module(self, source):
        if source not in self.modules:
            ptx, desc = camel_cuda_compile(source, "gpu_smoke.metal", self.arch)
            mod = ctypes.c_void_p()
            log = ctypes.create_string_buffer(1 << 16)
            opts = (ctypes.c_int * 2)(5, 6)  # CU_JIT_ERROR_LOG_BUFFER, its size
            vals = (ctypes.c_void_p * 2)(ctypes.cast(log, ctypes.c_void_p), len(log))
            rc = self.cu.cuModuleLoadDataEx(ctypes.byref(mod), ptx.encode() + b"\0", 2, opts, vals)
            if rc != 0:
                raise RuntimeError(f"[gpu_smoke] PTX JIT failed ({rc}):\n{log.value.decode()}")
            kernels = {}
            for line in desc.splitlines():
                w = line.split()
                if w[0] == "kernel":  # kernel <n> <name> <barrier> <simd> <entry>
                    kernels[w[2]] = (int(w[1]), [], w[5])
                elif w[0] == "param":
                    n = int(w[1])
                    for k in kernels.values():
                        if k[0] == n:
                            k[1].append((w[3], int(w[4]), int(w[5]), int(w[6])))
            self.modules[source] = (mod, kernels)
        return self.modules[source]

    def value_sizes(self, source, name):
        mod, kernels = self.module(source)
        n, params, _ = kernels[name]
        ptr, size = ctypes.c_uint64(), ctypes.c_size_t()
        sym = f"camel_kernel_{n}_value_sizes".encode()
        self.check(
            self.cu.cuModuleGetGlobal_v2(ctypes.byref(ptr), ctypes.byref(size), mod, sym), "global"
        )
        out = np.zeros(size.value // 4, np.uint32)
        self.check(self.cu.cuMemcpyDtoH_v2(out.ctypes.data, ptr.value, size.value), "DtoH")
        return out[: len(params)]

    def run(self, source, name, args, grid, tpg, threadgroup_memory=()):
        mod, kernels = self.module(source)
        n, params, entry = kernels[name]
        fn = ctypes.c_void_p()
        self.check(self.cu.cuModuleGetFunction(ctypes.byref(fn), mod, entry.encode()), "fn")
        a = CudaArgs()
        ptrs = []
        arrays = [np.ascontiguousarray(np.atleast_1d(x)) for x in args]
        for i, arr in enumerate(arrays):
            p = ctypes.c_uint64()
            self.check(self.cu.cuMemAlloc_v2(ctypes.byref(p), max(arr.nbytes, 4)), "cuMemAlloc")
            self.check(self.cu.cuMemcpyHtoD_v2(p.value, arr.ctypes.data, arr.nbytes), "HtoD")
            a.buffers[i] = p.value
            ptrs.append(p.value)
        offset = 0
        for i, nbytes in enumerate(threadgroup_memory):
            a.threadgroup_offset[i] = offset
            offset += (nbytes + 15) & ~15
        for d in range(3):
            a.threadgroups_per_grid[d] = -(-grid[d] // tpg[d])
            a.threads_per_grid[d] = grid[d]
            a.dispatch_threads_per_threadgroup[d] = tpg[d]
        for origin, groups, block in pieces(grid, tpg):
            for d in range(3):
                a.group_origin[d] = origin[d]
            # kernelParams: one pointer, to the one parameter (camel_cuda_args by value)
            params_ = (ctypes.c_void_p * 1)(ctypes.cast(ctypes.pointer(a), ctypes.c_void_p))
            rc = self.cu.cuLaunchKernel(
                fn, *groups, *block, offset, None, ctypes.cast(params_, ctypes.c_void_p), None
            )
            self.check(rc, f"cuLaunchKernel {name} piece at {origin}")
            self.check(self.cu.cuCtxSynchronize(), f"{name} piece at {origin}")
        outs = []
        for arr, p in zip(arrays, ptrs, strict=True):
            host = np.empty_like(arr)
            self.check(self.cu.cuMemcpyDtoH_v2(host.ctypes.data, p, arr.nbytes), "DtoH")
            self.cu.cuMemFree_v2(p)
            outs.append(host)
        return outs


class Sim:
    """The same dispatches on camel's Metal simulator (checks the checks)."""

    name = "sim"

    def __init__(self):
        sys.path.insert(0, str(REPO))
        import camel.metal as m

        self.m = m
        self.device = m.device_name()
        self.libs = {}

    def value_sizes(self, source, name):
        return None

    def run(self, source, name, args, grid, tpg, threadgroup_memory=()):
        m = self.m
        if source not in self.libs:
            self.libs[source] = m.compile(source, "gpu_smoke.metal")
        arrays = [m.DeviceArray.from_numpy(np.ascontiguousarray(np.atleast_1d(x))) for x in args]
        self.libs[source][name](
            *arrays,
            threads=grid,
            threads_per_threadgroup=tpg,
            threadgroup_memory=list(threadgroup_memory) or None,
        )
        m.synchronize()
        return [a.numpy().copy() for a in arrays]


def camel_cuda_compile(source, path, arch):
    lib = ctypes.CDLL(str(LIB))
    out = ctypes.POINTER(ctypes.c_void_p)
    lib.camel_cuda_compile.argtypes = [
        ctypes.c_char_p,
        ctypes.c_char_p,
        ctypes.c_int,
        out,
        out,
        out,
    ]
    lib.camel_cuda_compile.restype = ctypes.c_int
    lib.camel_cuda_free.argtypes = [ctypes.c_void_p]
    ptx, desc, log = ctypes.c_void_p(), ctypes.c_void_p(), ctypes.c_void_p()
    rc = lib.camel_cuda_compile(
        source.encode(),
        path.encode(),
        arch,
        ctypes.byref(ptx),
        ctypes.byref(desc),
        ctypes.byref(log),
    )
    texts = [ctypes.string_at(p.value).decode() if p.value else "" for p in (ptx, desc, log)]
    for p in (ptx, desc, log):
        if p.value:
            lib.camel_cuda_free(p)
    if rc != 0:
        raise RuntimeError(texts[2])
    return texts[0], texts[1]


# ---- the checks ----------------------------------------------------------------------
def ulp_error(got, ref):
    """|got - ref| in float32 ulps at ref (float64 reference)."""
    ref = np.asarray(ref, np.float64)
    got = np.asarray(got, np.float64)
    e = np.frexp(ref)[1]
    ulp = np.ldexp(1.0, np.maximum(e, -125) - 24)
    err = np.abs(got - ref) / ulp
    return np.where(np.isfinite(ref), err, np.where(got == ref, 0.0, np.inf))


def check_simd_reduce(gpu, rng):
    n, tg = 100, 48  # groups of 48, 48 and 4 threads: warps of 32, 16, 32, 16, 4 lanes
    x = rng.integers(-8, 9, n).astype(np.float32)
    u = rng.integers(0, 1000, n).astype(np.uint32)
    out = np.full((n, 4), -7.0, np.float32)
    uout = np.full((n, 2), 7, np.uint32)
    _, _, out, uout = gpu.run(SOURCE, "simd_reduce", [x, u, out, uout], (n, 1, 1), (tg, 1, 1))
    out, uout = out.reshape(n, 4), uout.reshape(n, 2)
    want = np.full((n, 4), -7.0, np.float32)
    uwant = np.full((n, 2), 7, np.uint32)
    i = np.arange(n)
    warp = (i // tg) * 100 + (i % tg) // 32
    for w in np.unique(warp):
        lanes = i[(warp == w) & (u % 5 != 0)]
        if len(lanes) == 0:
            continue
        v = x[lanes]
        want[lanes, 0] = v.sum()
        want[lanes, 1] = v.max()
        want[lanes, 2] = np.cumsum(v) - v
        want[lanes, 3] = np.cumsum(v)
        uwant[lanes, 0] = u[lanes].min()
        uwant[lanes, 1] = (v > 0).sum()
    return np.array_equal(out, want) and np.array_equal(uout, uwant)


def check_shuffles(gpu, rng):
    n, tg = 128, 64
    x = rng.integers(-50, 50, n).astype(np.float32)
    x[40] = 31.0
    (_, out) = gpu.run(SOURCE, "shuffles", [x, np.zeros((n, 8), np.float32)], (n, 1, 1), (tg, 1, 1))
    out = out.reshape(n, 8)
    i = np.arange(n)
    lane, base = i % 32, i - i % 32
    want = np.zeros((n, 8), np.float32)
    want[:, 0] = x[base + (lane + 5) % 32]
    want[:, 1] = x[base + (lane ^ 3)]
    want[:, 2] = x[np.where(lane + 2 < 32, i + 2, i)]
    want[:, 3] = x[np.where(lane >= 1, i - 1, i)]
    want[:, 4] = x[base + 7]
    want[:, 5] = x.reshape(-1, 4).sum(1).repeat(4)
    want[:, 6] = x[i ^ 1]
    warp_any = (x.reshape(-1, 32) > 30).any(1).repeat(32)
    want[:, 7] = warp_any.astype(np.float32)
    return np.array_equal(out, want)


def check_barrier(gpu, rng):
    n, tg = 1000, 256  # the last group has 232 threads
    x = rng.integers(-100, 100, n).astype(np.float32)
    (_, out) = gpu.run(
        SOURCE, "barrier_sum", [x, np.zeros(n, np.float32)], (n, 1, 1), (tg, 1, 1), [tg * 4]
    )
    g = np.arange(n) // tg
    want = np.array([x[g == k].sum() for k in g], np.float32)
    return np.array_equal(out, want)


def check_matrix(gpu, rng):
    a, bt, c = (rng.standard_normal((8, 8)).astype(np.float32) for _ in range(3))
    d = np.zeros((8, 8), np.float32)
    e = np.zeros((8, 16), np.float32)
    _, _, _, d, e = gpu.run(SOURCE, "matrix", [a, bt, c, d, e], (32, 1, 1), (32, 1, 1))
    ab = a.astype(np.float64) @ bt.T.astype(np.float64)
    ok = np.allclose(d.reshape(8, 8), ab + c, rtol=1e-5, atol=1e-5)
    e = e.reshape(8, 16)
    ok &= np.allclose(e[:, 8:], ab, rtol=1e-5, atol=1e-5)
    ok &= np.array_equal(e[:, :8], 2 * a)
    return bool(ok)


MATH_BOUNDS = [  # (name, reference, max ulp)
    ("exp", lambda x, a, y: np.exp(x), 2.0),
    ("exp2", lambda x, a, y: np.exp2(x), 2.0),
    ("log", lambda x, a, y: np.log(a), 2.0),
    ("log2", lambda x, a, y: np.log2(a), 2.0),
    ("tanh", lambda x, a, y: np.tanh(x), 4.0),
    ("sin", lambda x, a, y: np.sin(x), 1.0),
    ("cos", lambda x, a, y: np.cos(x), 1.0),
    ("pow", lambda x, a, y: np.power(a, y), 1.0),
    ("sqrt", lambda x, a, y: np.sqrt(a), 0.5),
    ("rsqrt", lambda x, a, y: 1.0 / np.sqrt(a), 2.0),
    ("divide", lambda x, a, y: x / y, 0.5),
]


def check_math(gpu, rng, report):
    n = 1 << 18
    x = np.concatenate(
        [rng.uniform(-30, 30, n // 2), rng.uniform(-1, 1, n // 4), rng.uniform(-1e-3, 1e-3, n // 4)]
    ).astype(np.float32)
    y = rng.uniform(-8, 8, n).astype(np.float32)
    y[y == 0] = 1.0
    _, _, out, _ = gpu.run(
        SOURCE, "math", [x, y, np.zeros((11, n), np.float32), np.uint32(n)], (n, 1, 1), (256, 1, 1)
    )
    out = out.reshape(11, n)
    x64, y64 = x.astype(np.float64), y.astype(np.float64)
    a64 = (np.abs(x) + np.float32(1e-3)).astype(np.float64)
    ok = True
    for k, (name, ref, bound) in enumerate(MATH_BOUNDS):
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            r = ref(x64, a64, y64)
        err = ulp_error(out[k], r)
        worst = float(np.nanmax(err))
        good = worst <= bound
        ok &= good
        report(f"math {name:6s} max {worst:.3f} ulp (bound {bound})", good)
    return ok


def check_dispatch(gpu, rng):
    grid, tpg = (37, 29, 3), (8, 4, 2)  # edges in x (5), y (1) and z (1)
    cells = grid[0] * grid[1] * grid[2]
    bufs = [np.zeros((cells, 4), np.uint32) for _ in range(3)] + [np.zeros(cells, np.uint32)]
    pos, size, group, hits, _ = gpu.run(
        SOURCE, "dispatch", bufs + [np.array(grid, np.uint32)], grid, tpg
    )
    z, y, x = np.meshgrid(*(np.arange(g) for g in grid[::-1]), indexing="ij")
    p = np.stack([x.ravel(), y.ravel(), z.ravel()], 1)
    t = np.array(tpg)
    g = p // t
    local = p % t
    tpt = np.minimum(t, np.array(grid) - g * t)  # Metal's edge threadgroup size
    index = local[:, 0] + tpt[:, 0] * (local[:, 1] + tpt[:, 1] * local[:, 2])
    ng = -(-np.array(grid) // t)
    ok = np.array_equal(hits, np.ones(cells, np.uint32))
    ok &= np.array_equal(pos.reshape(cells, 4), np.column_stack([p, index]))
    ok &= np.array_equal(size.reshape(cells, 4), np.column_stack([tpt, index // 32]))
    want_g = np.column_stack([g, np.full(cells, ng[0] + 1000 * ng[1] + 1000000 * ng[2])])
    ok &= np.array_equal(group.reshape(cells, 4), want_g)
    return bool(ok)


def main():
    use_sim = "--sim" in sys.argv
    if not LIB.exists():
        print(f"[gpu_smoke] {LIB} is missing: run `make -C shim cuda` first")
        return 2
    gpu = Sim() if use_sim else Cuda()
    print(f"[gpu_smoke] {gpu.name}: {gpu.device}")
    rng = np.random.default_rng(11)
    failures = []

    def report(name, ok):
        print(f"{'PASS' if ok else 'FAIL'}  {name}")
        if not ok:
            failures.append(name)

    checks = [
        ("simd_reduce: partial SIMD groups, early returns", check_simd_reduce),
        (
            "shuffles: simd_shuffle/_xor/_down/_up/broadcast, quad_sum, quad_shuffle_xor, all/any",
            check_shuffles,
        ),
        ("barrier: tree reduction in [[threadgroup(0)]] memory, edge group of 232", check_barrier),
        ("matrix: simdgroup_float8x8 load/transpose/multiply(_accumulate)/store", check_matrix),
        ("dispatch: 3-D grid with edges, builtins, each position once", check_dispatch),
    ]
    for name, fn in checks:
        try:
            report(name, fn(gpu, rng))
        except Exception as e:  # a failed launch is a FAIL of that check, not the end
            report(f"{name}: {e}", False)
    try:
        check_math(gpu, rng, report)
    except Exception as e:
        report(f"math: {e}", False)
    sizes = gpu.value_sizes(SOURCE, "math")
    if sizes is not None:
        report(
            f"value sizes of math: {list(sizes)} (constant uint &n is 4 bytes)",
            list(sizes) == [0, 0, 0, 4, 0],
        )
    print(f"[gpu_smoke] {len(failures)} failed" if failures else "[gpu_smoke] all passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
