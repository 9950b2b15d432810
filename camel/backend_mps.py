"""The "mps" backend: camel's narrow waist as Metal kernels.

The same functions with the same signatures as camel/backend_cpu.py (read its
docstring: it is the contract), over `camel.metal.DeviceArray` storages. Every op
is one or more kernel dispatches from shaders/*.metal; nothing is computed in
NumPy and nothing makes a round trip through the host (the exceptions say why:
from_numpy / to_numpy are the transfers; cross_entropy's 3-int error record is read
at the next synchronisation). On Linux the kernels run on the Metal simulator, unchanged.

    file                        kernels used here
    shaders/ops_elementwise     add, mul (and their broadcast forms), add_scalar,
                                mul_scalar, relu, relu_backward, fill, copy, permute
    shaders/ops_reduce          sum / max over the last axis, the whole tensor
                                (two passes) or a leading/middle axis; their backward
    shaders/ops_softmax         softmax, log_softmax, cross_entropy, their backward
    shaders/ops_optim           sgd_step, sgd_momentum_step, adam_step, adam_step_tensors
    shaders/ops_matmul          the GEMM ladder, through camel/gemm.py
    shaders/ops_layernorm       layer_norm (v1, v2), layer_norm_backward, gelu, gelu_backward
    shaders/ops_embedding       embedding, embedding_backward (deterministic scatter-add)
    shaders/ops_layout          slice, slice_backward

Every dispatch passes flops= and bytes= so `camel.profile()` shows GFLOP/s and GB/s.
"""

import builtins
import math
from typing import NamedTuple

import numpy as np

from camel import config, metal
from camel.metal import DeviceArray

DEVICE = "mps"

_EW = "ops_elementwise.metal"
_RED = "ops_reduce.metal"
_SOFT = "ops_softmax.metal"
_OPT = "ops_optim.metal"
_LN = "ops_layernorm.metal"
_EMB = "ops_embedding.metal"
_LAYOUT = "ops_layout.metal"

_THREADS = 256  # threads per threadgroup for one-thread-per-element kernels
_MAX_PARTIALS = 1024  # threadgroups in pass 1 of a whole-tensor reduction, at most
_PER_THREAD = 16  # elements each thread of pass 1 adds, at least (fewer, fuller threadgroups)
_F32 = 4  # bytes per float32 / int32 element


# Memory-bound kernels, version 1 or 2. Version 1 is each op's lesson kernel (Stage 2's
# one threadgroup per row, one thread per column); version 2 keeps a large GPU's memory busy:
# a SIMD group per row with float4 loads, a column sum over blocks of rows in two passes
# (shaders/ops_reduce.metal, "version 2"). Default (None): 2; CAMEL_MEMORY_KERNELS=1|2
# forces one (the benches time both).
MEMORY_KERNELS_VERSION = None
_ROW_SIMD_GROUPS = 8  # SIMD groups in a threadgroup of a version-2 row kernel (256 threads)
_ROW_SPAN = 1024  # floats of a row one SIMD group takes in version 2 (32 lanes x 8 float4s)
_ROW_MAX_P = 16  # SIMD groups per row at most (a threadgroup of 512 for rows past 8192)
# The softmax kernels of version 2 hold 8 float4s of a row a lane (the kernels as first
# written, _ROW_SPAN floats a SIMD group) or 4 (the "_r4" kernels: twice the SIMD groups a
# row, up to 32, and half the registers a thread; on an H100 the causal attention softmax
# at (16 x 4096, 4096) took 0.66 ms against 0.92: docs/cuda.md); version 3 ("_v3", 0 here)
# holds none: it reads the row twice, the second time from the cache, and takes any width.
# None: rows wider than _STREAM_ROWS_PAST floats take version 3, the rest 4 float4s on a
# GPU and 8 on the simulator, where twice the threads take twice as long to simulate.
ROW_FLOAT4S = None
_STREAM_ROWS_PAST = 8192
_STREAM_SPAN = 512  # floats a SIMD group of version 3 takes a step (32 lanes x ROW_STEP float4s)


_V2_MAX_ELEMENTS = 2**32 - 2**20  # version-2 kernels index in 32 bits (with some headroom)


def _memory_version(op="mps", n=0):
    """The memory-kernel version for op on an array of n elements; version 2 refuses arrays
    its 32-bit indices cannot address."""
    given = config.memory_kernels()
    version = str(given if given is not None else (MEMORY_KERNELS_VERSION or 2))
    if version not in ("1", "2"):
        raise ValueError(
            f"[mps] unknown memory-kernel version {version!r} (CAMEL_MEMORY_KERNELS or "
            "MEMORY_KERNELS_VERSION); valid: 1 (the lesson kernels), 2"
        )
    if version == "2":
        _check_32bit_indices(op, n)
    return int(version)


def _check_32bit_indices(op, n):
    if n > _V2_MAX_ELEMENTS:
        raise ValueError(
            f"[{op}] {n} elements: camel's memory-bound kernels index with 32-bit integers, "
            f"at most {_V2_MAX_ELEMENTS} elements an array; split the tensor"
        )


def _row_geometry(rows, k, fn, span=_ROW_SPAN, most=_ROW_MAX_P):
    """(P, threadgroups, threads per threadgroup) of a version-2 row kernel fn: P SIMD groups
    per row (1, 2, 4, ... up to `most`: at most `span` floats each, and no more SIMD groups
    than fn's registers allow in one threadgroup), in threadgroups of max(8, P) SIMD groups,
    so 8 / P rows per threadgroup (one for P >= 8). A kernel that holds the row in registers
    needs P * span >= k (_row_fits)."""
    max_p = builtins.min(most, fn.max_total_threads_per_threadgroup // 32)
    p = 1
    while 2 * p <= max_p and p * span < k:
        p *= 2
    simd_groups = builtins.max(p, builtins.min(_ROW_SIMD_GROUPS, max_p) // p * p)  # P divides it
    per_group = simd_groups // p
    return p, (rows + per_group - 1) // per_group, 32 * simd_groups


def _row_fits(fn, k, span=_ROW_SPAN, most=_ROW_MAX_P):
    """Can fn, a version-2 kernel holding a row in registers, take rows of k floats?"""
    return _row_geometry(1, k, fn, span, most)[0] * span >= k


class _RowKernel(NamedTuple):
    name: str  # the kernel in ops_softmax.metal
    span: int  # floats of a row a SIMD group holds (version 2) or takes a step (version 3)
    most: int  # SIMD groups a row at most
    holds_row: bool  # version 2: the row must fit (_row_fits); version 3 takes any width

    def fits(self, fn, k):
        return not self.holds_row or _row_fits(fn, k, self.span, self.most)


def _softmax_kernel(name, k, held=(4, 8), reads=1):
    """The softmax-family kernel for rows of k floats: name (a version-2 kernel,
    "softmax_last_axis_v2"), its "_r4" twin or its version 3 ("_v3"), as ROW_FLOAT4S says
    (see there); held: the float4s a lane name's version 2 comes with (4 falls back to 8);
    reads: the arrays it reads (the backward: y and dy)."""
    float4s = ROW_FLOAT4S
    if float4s is None:
        float4s = 0 if k > _STREAM_ROWS_PAST else 8 if metal.is_simulator() else 4
    if float4s not in (0, 4, 8):
        raise ValueError(f"[mps] ROW_FLOAT4S must be 0, 4, 8 or None, got {ROW_FLOAT4S!r}")
    if float4s == 0:
        # Version 3's second sweep is fast only while the rows in flight stay in the cache:
        # a forward lane takes two steps a row (512 threads for 16384 floats, 2 threadgroups
        # an H100 SM at 48 registers: 17 MB of rows in flight); the backward reads twice the
        # bytes a row, so a lane takes one step (1024 threads, one threadgroup an SM: 17 MB).
        # Measured on an H100 (docs/cuda.md): twice the rows in flight read the row twice
        # from DRAM, and half as many leave the SM idle between sweeps.
        span = 2 * _STREAM_SPAN // reads
        return _RowKernel(name.replace("_v2", "_v3"), span, _ROW_MAX_P * reads, False)
    if float4s == 8 or 4 not in held:
        return _RowKernel(name, _ROW_SPAN, _ROW_MAX_P, True)
    return _RowKernel(f"{name}_r4", _ROW_SPAN // 2, 2 * _ROW_MAX_P, True)


def _kernel(filename, name):
    return metal.kernel(filename, name)  # compiled once per process, then cached


def _empty(shape, dtype=np.float32):
    return DeviceArray.empty(tuple(shape), dtype)


def _aligned(*arrays):
    # A float4 load or store needs a 16-byte aligned address.
    return all(a.offset % 16 == 0 for a in arrays)


def _launch_1d(fn, args, n, flops, nbytes):
    """Dispatch fn over n threads (dispatchThreads: the last threadgroup may be partial)."""
    fn(*args, threads=n, threads_per_threadgroup=min(_THREADS, n), flops=flops, bytes=nbytes)


def _row_threads(k):
    """Threads per threadgroup for a kernel that gives one threadgroup to a row of k:
    a multiple of 32 (whole SIMD groups, which simd_sum needs), at most 256."""
    return min(_THREADS, builtins.max(32, (k + 31) // 32 * 32))


def _split(shape, axis):
    """(outer, K, inner) for a reduction of `shape` over `axis` (None: everything)."""
    if axis is None:
        return 1, math.prod(shape), 1
    return math.prod(shape[:axis]), shape[axis], math.prod(shape[axis + 1 :])


def _reduced_shape(shape, axis, keepdims):
    if axis is None:
        return (1,) * len(shape) if keepdims else ()
    if keepdims:
        return shape[:axis] + (1,) + shape[axis + 1 :]
    return shape[:axis] + shape[axis + 1 :]


# ---------------------------------------------------------------------------
# transfer and creation
# ---------------------------------------------------------------------------


def from_numpy(arr):
    """A new device storage holding a copy of `arr` (float32 or int32)."""
    # DeviceArray.from_numpy takes any layout; np.ascontiguousarray would turn a
    # 0-d array (a loss, a full sum) into shape (1,).
    return DeviceArray.from_numpy(arr)


def to_numpy(x):
    """Synchronise, then a zero-copy NumPy view of x's buffer."""
    return x.numpy()


def full(shape, value, dtype):
    """A new storage of `shape` and `dtype` ("float32" or "int32") filled with `value`."""
    dt = np.dtype(dtype)
    out = _empty(shape, dt)
    n = out.size
    if n == 0:
        return out
    if dt == np.float32:
        fn, v = _kernel(_EW, "fill_float4"), float(value)
    elif dt == np.int32:
        fn, v = _kernel(_EW, "fill_int4"), np.int32(value)
    else:
        raise TypeError(f"[full] dtype {dt.name} is not supported on 'mps' (float32, int32)")
    _launch_1d(fn, (out, v, n), (n + 3) // 4, 0, n * _F32)  # a new buffer is 16-byte aligned
    return out


def copy(x):
    """A new storage with the same shape, dtype and values (32-bit words copied)."""
    out = _empty(x.shape, x.dtype)
    n = x.size
    if n:
        if _aligned(x, out):
            _launch_1d(_kernel(_EW, "copy_uint4"), (x, out, n), (n + 3) // 4, 0, 2 * n * _F32)
        else:
            _launch_1d(_kernel(_EW, "copy_uint"), (x, out, n), n, 0, 2 * n * _F32)
    return out


def reshape(x, shape):
    """The same buffer seen with a new shape (no kernel, no copy)."""
    return x.reshape(tuple(shape))


def view(x, start, shape):
    """The run of x's elements from flat index `start`, seen with `shape`: the same buffer
    at a byte offset (no kernel, no copy). Kernels that read float4 check the offset's
    alignment (_aligned) and take their one-element path when it is not 16 bytes."""
    return DeviceArray(tuple(shape), x.dtype, x.buffer, x.offset + start * x.dtype.itemsize)


# ---------------------------------------------------------------------------
# elementwise: ops_elementwise.metal. Each op picks the float4 kernel when all its
# operands are 16-byte aligned (always, for buffers camel allocates) and the
# one-element-per-thread kernel otherwise.
# ---------------------------------------------------------------------------


def _binary(op, a, b):
    out = _empty(a.shape, np.float32)
    n, m = a.size, b.size
    if n == 0:
        return out
    nbytes = (2 * n + m) * _F32
    if m == n:
        if _aligned(a, b, out):
            _launch_1d(_kernel(_EW, op + "_float4"), (a, b, out, n), (n + 3) // 4, n, nbytes)
        else:
            _launch_1d(_kernel(_EW, op + "_float"), (a, b, out, n), n, n, nbytes)
    elif m % 4 == 0 and _aligned(a, b, out):
        fn = _kernel(_EW, op + "_broadcast_float4")
        _launch_1d(fn, (a, b, out, n, m), n // 4, n, nbytes)
    else:
        _launch_1d(_kernel(_EW, op + "_broadcast_float"), (a, b, out, n, m), n, n, nbytes)
    return out


def add(a, b):
    """out = a + b; b.shape is a trailing suffix of a.shape (b[i % b.size])."""
    return _binary("add", a, b)


def mul(a, b):
    """out = a * b; b.shape is a trailing suffix of a.shape (b[i % b.size])."""
    return _binary("mul", a, b)


def _scalar(op, a, s):
    out = _empty(a.shape, np.float32)
    n = a.size
    if n:
        suffix = "_float4" if _aligned(a, out) else "_float"
        threads = (n + 3) // 4 if suffix == "_float4" else n
        _launch_1d(_kernel(_EW, op + suffix), (a, float(s), out, n), threads, n, 2 * n * _F32)
    return out


def add_scalar(a, s):
    """out = a + s (s a Python float, rounded to float32)."""
    return _scalar("add_scalar", a, s)


def mul_scalar(a, s):
    """out = a * s (s a Python float, rounded to float32)."""
    return _scalar("mul_scalar", a, s)


def neg(a):
    """out = -a, as mul_scalar by -1 (exact in float32)."""
    return _scalar("mul_scalar", a, -1.0)


def relu(x):
    """out = max(x, 0)."""
    out = _empty(x.shape, np.float32)
    n = x.size
    if n:
        if _aligned(x, out):
            _launch_1d(_kernel(_EW, "relu_float4"), (x, out, n), (n + 3) // 4, n, 2 * n * _F32)
        else:
            _launch_1d(_kernel(_EW, "relu_float"), (x, out, n), n, n, 2 * n * _F32)
    return out


def relu_backward(x, grad):
    """dx = 0 where x <= 0, else grad (so a NaN passes grad, as PyTorch)."""
    out = _empty(x.shape, np.float32)
    n = x.size
    if n:
        args = (x, grad, out, n)
        if _aligned(x, grad, out):
            _launch_1d(_kernel(_EW, "relu_backward_float4"), args, (n + 3) // 4, n, 3 * n * _F32)
        else:
            _launch_1d(_kernel(_EW, "relu_backward_float"), args, n, n, 3 * n * _F32)
    return out


def gelu(x):
    """GELU, tanh approximation (ops_layernorm.metal): version 2, four elements per thread
    (float4) as x * sigmoid(2u); version 1 (or unaligned data), one thread per element."""
    out = _empty(x.shape, np.float32)
    n = x.size
    if n:
        if _memory_version("gelu", n) == 2 and _aligned(x, out):
            fn = _kernel(_LN, "gelu_forward_float4")
            _launch_1d(fn, (x, out, n), (n + 3) // 4, 10 * n, 2 * n * _F32)
        else:
            fn = _kernel(_LN, "gelu_forward")
            _launch_1d(fn, (x, out, n), n, 10 * n, 2 * n * _F32)
    return out


def gelu_backward(x, grad):
    """dx = grad * gelu'(x) (ops_layernorm.metal): version 2 float4, version 1 (or unaligned
    data) one thread per element."""
    out = _empty(x.shape, np.float32)
    n = x.size
    if n:
        if _memory_version("gelu_backward", n) == 2 and _aligned(x, grad, out):
            fn = _kernel(_LN, "gelu_backward_float4")
            _launch_1d(fn, (x, grad, out, n), (n + 3) // 4, 16 * n, 3 * n * _F32)
        else:
            fn = _kernel(_LN, "gelu_backward")
            _launch_1d(fn, (x, grad, out, n), n, 16 * n, 3 * n * _F32)
    return out


# ---------------------------------------------------------------------------
# reductions: ops_reduce.metal
# ---------------------------------------------------------------------------


def _sum_rows(x2, out, rows, k, scale=1.0):
    """out[r] = scale * sum of row r of x2 (rows, k): version 2, a SIMD group per row;
    version 1, one threadgroup per row."""
    if _memory_version("sum", rows * k) == 2:
        fn = _kernel(_RED, "sum_last_axis_v2")
        p, groups, tpg = _row_geometry(rows, k, fn)
        vec4 = int(k % 4 == 0 and _aligned(x2))
        fn(x2, out, rows, k, float(scale), p, vec4, threadgroups=groups,
           threads_per_threadgroup=tpg, flops=rows * k,
           bytes=(rows * k + rows) * _F32)  # fmt: skip
        return
    fn = _kernel(_RED, "sum_last_axis")
    fn(
        x2,
        out,
        k,
        float(scale),
        threadgroups=rows,
        threads_per_threadgroup=_row_threads(k),
        flops=rows * k,
        bytes=(rows * k + rows) * _F32,
    )


def _partial_groups(n):
    """Threadgroups for pass 1 of a whole-tensor reduction of n elements: enough to fill
    the GPU, few enough that each thread adds >= _PER_THREAD elements in its grid-stride
    loop (a threadgroup's combine and its partial cost the same whatever it summed)."""
    per_group = _THREADS * _PER_THREAD
    return min(_MAX_PARTIALS, (n + per_group - 1) // per_group)


def _sum_all(x, out, scale=1.0):
    """out (one element) = scale * sum of every element of x: two passes (partials, then one
    threadgroup sums them); one pass when a single threadgroup covers x."""
    n = x.size
    groups = _partial_groups(n)
    if groups <= 1:
        _sum_rows(x, out, 1, n, scale)
        return
    partials = _empty((groups,))
    nbytes = (n + groups) * _F32
    if _memory_version("sum", n) == 2:  # float4 loads, four in flight
        fn = _kernel(_RED, "sum_all_partials_v2")
        fn(x, partials, n, int(_aligned(x)), threadgroups=groups,
           threads_per_threadgroup=_THREADS, flops=n, bytes=nbytes)  # fmt: skip
    else:
        fn = _kernel(_RED, "sum_all_partials")
        fn(x, partials, n, threadgroups=groups, threads_per_threadgroup=_THREADS, flops=n,
           bytes=nbytes)  # fmt: skip
    _sum_rows(partials, out, 1, groups, scale)


def sum(x, axis, keepdims):  # noqa: A001 (the backend contract's name)
    """Sum over one axis (int >= 0) or everything (axis None)."""
    out = _empty(_reduced_shape(x.shape, axis, keepdims))
    outer, k, inner = _split(x.shape, axis)
    if out.size == 0:
        return out
    if k == 0:
        return full(out.shape, 0.0, "float32")
    if axis is None:
        _sum_all(x, out)
    elif inner == 1:
        _sum_rows(x, out, outer, k)
    else:
        _sum_axis(x, out, outer, k, inner)
    return out


_COL_GROUPS = 1024  # threadgroups pass 1 of the column sum aims for (one wave on an H200)
_COL_MIN_ROWS = 64  # rows per block at least: each of a threadgroup's 8 slices adds >= 8
_COL_MAX_BLOCKS = 256  # blocks at most: pass 2 adds <= 256 partials per column


def _sum_axis(x, out, outer, k, inner):
    """out (outer, inner) = x (outer, k, inner) summed over k. Version 2: blocks of rows in
    parallel, then their partials in block order (sum_axis_blocks, two dispatches unless one
    block does); version 1: one thread per output walks its column (sum_axis_strided)."""
    n_out = outer * inner
    if _memory_version("sum", x.size) == 1:
        fn = _kernel(_RED, "sum_axis_strided")
        _launch_1d(fn, (x, out, k, inner, n_out), n_out, x.size, (x.size + n_out) * _F32)
        return
    width = 4 if inner % 4 == 0 and _aligned(x, out) else 1
    fn = _kernel(_RED, "sum_axis_blocks_float4" if width == 4 else "sum_axis_blocks_float")
    inner_v = inner // width  # columns in float4s (or floats)
    col_groups = (inner_v + 31) // 32
    per_block = builtins.max(_COL_MIN_ROWS, -(-k * col_groups * outer // _COL_GROUPS))
    blocks = builtins.min(_COL_MAX_BLOCKS, -(-k // per_block))
    per_block = -(-k // blocks)
    tpg = (32, 8, 1)
    if blocks == 1:
        fn(x, out, k, inner_v, k, threadgroups=(col_groups, 1, outer), threads_per_threadgroup=tpg,
           flops=x.size, bytes=(x.size + n_out) * _F32)  # fmt: skip
        return
    partials = _empty((outer, blocks, inner))
    fn(x, partials, k, inner_v, per_block, threadgroups=(col_groups, blocks, outer),
       threads_per_threadgroup=tpg, flops=x.size,
       bytes=(x.size + partials.size) * _F32)  # fmt: skip
    fn(partials, out, blocks, inner_v, blocks, threadgroups=(col_groups, 1, outer),
       threads_per_threadgroup=tpg, flops=partials.size,
       bytes=(partials.size + n_out) * _F32)  # fmt: skip


def sum_backward(grad, in_shape, axis):
    """Copy grad along the reduced axis back to in_shape."""
    dx = _empty(in_shape)
    n = dx.size
    if n:
        _outer, k, inner = _split(tuple(in_shape), axis)
        fn = _kernel(_RED, "sum_backward_expand")
        _launch_1d(fn, (grad, dx, k, inner, n), n, 0, (n + grad.size) * _F32)
    return dx


def max(x, axis, keepdims):  # noqa: A001 (the backend contract's name)
    """(values, indices) of the maximum over one axis or everything; the first maximum
    wins ties (np.argmax), and a NaN beats every number (the first NaN's index, as
    np.argmax and torch.max). For axis None the index is the flat index."""
    shape = _reduced_shape(x.shape, axis, keepdims)
    values, indices = _empty(shape), _empty(shape, np.int32)
    outer, k, inner = _split(x.shape, axis)
    if k == 0:
        raise ValueError(f"[max] cannot take the maximum over an empty axis of shape {x.shape}")
    if values.size == 0:
        return values, indices
    nbytes = (x.size + 2 * values.size) * _F32
    if axis is None or inner == 1:
        rows = 1 if axis is None else outer
        groups = _partial_groups(x.size)
        if axis is None and groups > 1:
            _max_all(x, values, indices, groups)
        elif _memory_version("max", x.size) == 2:
            fn = _kernel(_RED, "max_last_axis_v2")
            p, groups, tpg = _row_geometry(rows, k, fn)
            vec4 = int(k % 4 == 0 and _aligned(x))
            fn(x, values, indices, rows, k, p, vec4, threadgroups=groups,
               threads_per_threadgroup=tpg, flops=x.size,
               bytes=nbytes)  # fmt: skip
        else:
            fn = _kernel(_RED, "max_last_axis")
            tpg = _row_threads(k)
            fn(x, values, indices, k, threadgroups=rows, threads_per_threadgroup=tpg,
               flops=x.size, bytes=nbytes)  # fmt: skip
    else:
        fn = _kernel(_RED, "max_axis_strided")
        n_out = outer * inner
        _launch_1d(fn, (x, values, indices, k, inner, n_out), n_out, x.size, nbytes)
    return values, indices


def _max_all(x, values, indices, groups):
    n = x.size
    part_v, part_i = _empty((groups,)), _empty((groups,), np.uint32)
    fn = _kernel(_RED, "max_all_partials")
    fn(x, part_v, part_i, n, threadgroups=groups, threads_per_threadgroup=_THREADS,
       flops=n, bytes=(n + 2 * groups) * _F32)  # fmt: skip
    fn = _kernel(_RED, "max_all_final")
    fn(part_v, part_i, values, indices, groups, threadgroups=1,
       threads_per_threadgroup=_row_threads(groups), flops=groups,
       bytes=(2 * groups + 2) * _F32)  # fmt: skip


def max_backward(grad, indices, in_shape, axis):
    """The gradient goes to the argmax position, zero elsewhere (one gather per element)."""
    dx = _empty(in_shape)
    n = dx.size
    if n:
        _outer, k, inner = _split(tuple(in_shape), axis)
        fn = _kernel(_RED, "max_backward")
        nbytes = (n + 2 * grad.size) * _F32
        _launch_1d(fn, (grad, indices, dx, k, inner, n), n, 0, nbytes)
    return dx


def sum_to_shape(grad, shape):
    """Sum grad (..., *shape) over its leading axes down to `shape` (a trailing suffix)."""
    shape = tuple(shape)
    if len(shape) == len(grad.shape):
        return copy(grad)
    out = _empty(shape)
    inner = out.size
    if inner == 0:
        return out
    lead = grad.size // inner if inner else 0
    if lead == 0:
        return full(shape, 0.0, "float32")
    if inner == 1:
        _sum_all(grad, out)
    else:
        _sum_axis(grad, out, 1, lead, inner)
    return out


# ---------------------------------------------------------------------------
# layout
# ---------------------------------------------------------------------------

_MAX_RANK = 8  # permute_uint's limit


def permute(x, dims):
    """Materialised transpose: out = x.transpose(dims), C-contiguous (one gather per element)."""
    dims = tuple(dims)
    out_shape = tuple(x.shape[d] for d in dims)
    out = _empty(out_shape, x.dtype)
    n = out.size
    if n == 0:
        return out
    if len(dims) == 0 or dims == tuple(range(len(dims))):
        return copy(x)
    if len(dims) > _MAX_RANK:
        raise ValueError(f"[permute] at most {_MAX_RANK} axes on 'mps', got shape {x.shape}")
    strides = [math.prod(x.shape[d + 1 :]) for d in range(len(x.shape))]  # in elements
    out_dims = np.array(out_shape, dtype=np.uint32)
    in_strides = np.array([strides[d] for d in dims], dtype=np.uint32)
    fn = _kernel(_EW, "permute_uint")
    _launch_1d(fn, (x, out, out_dims, in_strides, len(dims), n), n, 0, 2 * n * _F32)
    return out


def _layout_args(shape, starts, steps, counts, op):
    if len(shape) > _MAX_RANK:
        raise ValueError(f"[{op}] at most {_MAX_RANK} axes on 'mps', got shape {tuple(shape)}")
    return (
        np.array(counts, dtype=np.uint32),
        np.array(starts, dtype=np.int32),
        np.array(steps, dtype=np.int32),
    )


def slice(x, starts, steps, counts):  # noqa: A001 (the backend contract's name)
    """Strided copy (ops_layout.metal slice_uint): one thread per output element gathers
    x[starts + steps * c]; any 32-bit dtype (int32 tokens too)."""
    out = _empty(tuple(counts), x.dtype)
    n = out.size
    if n == 0:
        return out
    if len(x.shape) == 0:
        return copy(x)
    c, st, sp = _layout_args(x.shape, starts, steps, counts, "slice")
    in_strides = np.array([math.prod(x.shape[a + 1 :]) for a in range(len(x.shape))], np.uint32)
    fn = _kernel(_LAYOUT, "slice_uint")
    _launch_1d(fn, (x, out, c, st, sp, in_strides, len(x.shape), n), n, 0, 2 * n * _F32)
    return out


def slice_backward(grad, in_shape, starts, steps):
    """Zeros of in_shape with grad at the sliced positions (ops_layout.metal
    slice_backward_float): one thread per INPUT element, a gather, no scatter."""
    in_shape = tuple(in_shape)
    dx = _empty(in_shape)
    n = dx.size
    if n == 0:
        return dx
    if len(in_shape) == 0:
        return copy(grad)
    c, st, sp = _layout_args(in_shape, starts, steps, grad.shape, "slice_backward")
    dims = np.array(in_shape, dtype=np.uint32)
    fn = _kernel(_LAYOUT, "slice_backward_float")
    nbytes = (n + grad.size) * _F32
    _launch_1d(fn, (grad, dx, dims, st, sp, c, len(in_shape), n), n, 0, nbytes)
    return dx


# ---------------------------------------------------------------------------
# matmul: the GEMM ladder (camel/gemm.py, shaders/ops_matmul.metal)
# ---------------------------------------------------------------------------


def matmul(a, b, transpose_a=False, transpose_b=False, triangle=None):
    """out = op(a) @ op(b); see camel/gemm.py for the rungs, their selection and `triangle`
    (the causal attention products)."""
    from camel import gemm  # imported here: the ladder is its own module

    return gemm.matmul(a, b, transpose_a=transpose_a, transpose_b=transpose_b, triangle=triangle)


# ---------------------------------------------------------------------------
# softmax family: ops_softmax.metal, always over the last axis, one threadgroup per row
# ---------------------------------------------------------------------------


def _rows(x):
    k = x.shape[-1] if x.shape else 1
    return (x.size // k if k else 0), k


def softmax(x, causal=False, scale=1.0):
    """softmax(scale * x) over the last axis (max subtracted first; the scale multiplies in
    the kernel, no separate pass). causal: x is (..., T, S) and row i sees (and reads) only
    columns j <= i; masked outputs are 0 (NaN in a row whose visible part gives NaN, as
    masked_fill(-inf) then softmax in PyTorch)."""
    y = _empty(x.shape)
    rows, k = _rows(x)
    if rows == 0 or k == 0:
        return y
    causal_t = x.shape[-2] if causal else 0
    # bytes: the reads stop at the mask (about half of a causal (T, T) matrix), writes do not
    read = _visible(x.shape, causal_t)
    if _softmax_v2("softmax_last_axis_v2", x, y, rows, k, causal_t, scale, read):
        return y
    fn = _kernel(_SOFT, "softmax_last_axis")
    fn(x, y, k, causal_t, float(scale), threadgroups=rows,
       threads_per_threadgroup=_row_threads(k), flops=5 * read,
       bytes=(read + x.size) * _F32)  # fmt: skip
    return y


def _visible(shape, causal_t):
    """Elements a (..., T, S) softmax reads: all, or under the causal mask row t's
    min(S, t + 1) columns."""
    size = int(np.prod(shape, dtype=np.int64))
    if not causal_t:
        return size
    t, s = shape[-2], shape[-1]
    d = min(t, s)  # rows 0 .. d-1 see i + 1 columns, the rest all s
    per_matrix = d * (d + 1) // 2 + (t - d) * s
    return size // (t * s) * per_matrix if t * s else 0


def _softmax_v2(name, x, y, rows, k, causal_t, scale=1.0, read=None):
    """Version 2 or 3 of softmax / log_softmax (_softmax_kernel) when it applies: version 2
    chosen (CAMEL_MEMORY_KERNELS), and for a kernel that holds the row, the row fits its
    registers (up to 16384 floats, if the kernel can run the threadgroup size: rows past 8192
    floats take 512 threads, or 1024 with 4 float4s a lane). Returns whether it ran."""
    if _memory_version(name, x.size) != 2:
        return False
    kernel = _softmax_kernel(name, k)
    fn = _kernel(_SOFT, kernel.name)
    if not kernel.fits(fn, k):
        return False
    p, groups, tpg = _row_geometry(rows, k, fn, kernel.span, kernel.most)
    vec4 = int(k % 4 == 0 and _aligned(x, y))
    read = x.size if read is None else read
    fn(x, y, rows, k, causal_t, p, vec4, float(scale), threadgroups=groups,
       threads_per_threadgroup=tpg, flops=5 * read, bytes=(read + x.size) * _F32)  # fmt: skip
    return True


def softmax_backward(y, grad, causal=False, scale=1.0):
    """y = softmax(scale * x): dx = scale * y * (grad - sum(grad * y, last axis)); causal:
    the sum runs over the visible columns, dx is 0 at the masked positions, and neither y
    nor grad is read there (a causal attention leaves grad uncomputed above the diagonal)."""
    causal_t = y.shape[-2] if causal else 0
    read = _visible(y.shape, causal_t)
    dx = _softmax_backward_v2("softmax_backward_v2", y, grad, causal_t, scale, read)
    if dx is None:
        dx = _row_backward("softmax_backward", y, grad, causal_t, float(scale), read=read)
    return dx


def log_softmax(x):
    """log_softmax over the last axis: x - max - log(sum(exp(x - max)))."""
    y = _empty(x.shape)
    rows, k = _rows(x)
    if rows == 0 or k == 0:
        return y
    if _softmax_v2("log_softmax_last_axis_v2", x, y, rows, k, 0, 1.0):
        return y
    fn = _kernel(_SOFT, "log_softmax_last_axis")
    fn(x, y, k, threadgroups=rows, threads_per_threadgroup=_row_threads(k),
       flops=5 * x.size, bytes=2 * x.size * _F32)  # fmt: skip
    return y


def log_softmax_backward(y, grad):
    """dx = grad - exp(y) * sum(grad, last axis)."""
    dx = _softmax_backward_v2("log_softmax_backward_v2", y, grad, 0, 1.0)
    return dx if dx is not None else _row_backward("log_softmax_backward", y, grad)


def _softmax_backward_v2(name, y, grad, causal_t, scale=1.0, read=None):
    """Version 2 or 3 of the softmax / log_softmax backward (y and dy read once and held in
    registers, or read twice) where it applies, as _softmax_v2; returns dx, or None (then
    version 1 runs)."""
    rows, k = _rows(y)
    if rows == 0 or k == 0 or _memory_version(name, y.size) != 2:
        return None
    kernel = _softmax_kernel(name, k, reads=2)
    fn = _kernel(_SOFT, kernel.name)
    if not kernel.fits(fn, k):
        return None
    dx = _empty(y.shape)
    p, groups, tpg = _row_geometry(rows, k, fn, kernel.span, kernel.most)
    vec4 = int(k % 4 == 0 and _aligned(y, grad, dx))
    read = y.size if read is None else read
    fn(y, grad, dx, rows, k, causal_t, p, vec4, float(scale), threadgroups=groups,
       threads_per_threadgroup=tpg, flops=4 * read,
       bytes=(2 * read + y.size) * _F32)  # fmt: skip
    return dx


def _row_backward(name, y, grad, *extra, read=None):
    dx = _empty(y.shape)
    rows, k = _rows(y)
    read = y.size if read is None else read
    if rows and k:
        fn = _kernel(_SOFT, name)
        fn(y, grad, dx, k, *extra, threadgroups=rows, threads_per_threadgroup=_row_threads(k),
           flops=4 * read, bytes=(2 * read + y.size) * _F32)  # fmt: skip
    return dx


def cross_entropy(logits, targets):
    """Mean cross-entropy over N rows; returns (loss shape (), probs (N, C)).

    Two dispatches: cross_entropy_forward (a version of it) writes probs and the loss of
    each row; cross_entropy_mean takes their mean and checks every target, writing a 3-int
    error record (how many are out of range, the first such row, its value). The row kernels
    never read outside a row. metal.check_later reads the record at the next
    synchronisation (the loss's .item(), any .numpy()) and raises an IndexError naming the
    target, C and the line of the call. Why not read it right here: that wait, once per
    loss, stalled the GPU mid-step (the host stops issuing the backward until the forward is
    done); why not validate targets on the host first: targets live on the GPU, and the
    kernel looks at every one of them anyway.
    """
    n, c = logits.shape
    probs = _empty((n, c))
    if n == 0:
        return full((), float("nan"), "float32"), probs  # the mean of nothing, as NumPy
    row_loss = _empty((n,))
    nbytes = (2 * n * c + 2 * n) * _F32
    kernel = _softmax_kernel("cross_entropy_forward_v2", c, held=(8,))
    fn = _kernel(_SOFT, kernel.name)
    if _memory_version("cross_entropy", n * c) == 2 and kernel.fits(fn, c):
        # version 2: the row read once, in registers; version 3: read twice, any width
        p, groups, tpg = _row_geometry(n, c, fn, kernel.span, kernel.most)
        vec4 = int(c % 4 == 0 and _aligned(logits, probs))
        fn(logits, targets, row_loss, probs, n, c, p, vec4, threadgroups=groups,
           threads_per_threadgroup=tpg, flops=5 * n * c, bytes=nbytes)  # fmt: skip
    else:
        fn = _kernel(_SOFT, "cross_entropy_forward")
        fn(logits, targets, row_loss, probs, c, threadgroups=n,
           threads_per_threadgroup=_row_threads(c), flops=5 * n * c, bytes=nbytes)  # fmt: skip
    loss = _empty(())
    error = _empty((3,), np.int32)  # written whole by the kernel: no zeroing, no upload
    fn = _kernel(_SOFT, "cross_entropy_mean")
    fn(row_loss, targets, loss, error, n, c, threadgroups=1,
       threads_per_threadgroup=_row_threads(n), flops=n, bytes=(2 * n + 4) * _F32)  # fmt: skip
    metal.check_later(error, lambda record: _bad_targets(record, n, c))
    return loss, probs


def _bad_targets(record, n, c):
    count, row, value = (int(v) for v in record)
    if count:
        return IndexError(
            f"[cross_entropy] target {value} (row {row}) is out of range for {c} classes: "
            f"targets must be in [0, {c - 1}]; {count} of {n} targets are out of range"
        )
    return None


def cross_entropy_backward(probs, targets, grad):
    """dlogits (N, C) = (probs - onehot(targets)) * grad / N; grad is a shape () storage."""
    n, c = probs.shape
    dx = _empty((n, c))
    if n * c == 0:
        return dx
    nbytes = (2 * n * c + n) * _F32
    if _memory_version("cross_entropy_backward", n * c) == 2 and c % 4 == 0 and _aligned(probs, dx):
        fn = _kernel(_SOFT, "cross_entropy_backward_float4")  # one thread per float4
        _launch_1d(fn, (probs, targets, grad, dx, n, c), n * c // 4, 3 * n * c, nbytes)
    else:
        fn = _kernel(_SOFT, "cross_entropy_backward")
        _launch_1d(fn, (probs, targets, grad, dx, n, c), n * c, 3 * n * c, nbytes)
    return dx


# ---------------------------------------------------------------------------
# normalisation and embedding: Stage 4-5A
# ---------------------------------------------------------------------------


# The LayerNorm forward ladder (ops_layernorm.metal): version -> kernel. Reads of x per
# element: v1 three, v2 two, v3 and v4 one (the row in registers; v4 with a SIMD group per
# row, D <= _LN_V4_MAX_D). Default (None): v4 where it fits, else v2 (with
# CAMEL_MEMORY_KERNELS=1: v3 where it fits, else v2); CAMEL_LAYERNORM=1|2|3|4 forces one
# (docs/stage4.md).
LAYERNORM_FORWARD = {
    1: "layernorm_forward_v1",
    2: "layernorm_forward_v2",
    3: "layernorm_forward_v3",
    4: "layernorm_forward_v4",
}
LAYERNORM_VERSION = None
_LN_V3_MAX_D = 4 * _THREADS  # 4 registers per thread (LN_PER_THREAD) x 256 threads
_LN_V4_MAX_D = _ROW_MAX_P * _ROW_SPAN  # 16 SIMD groups x 1024 floats
_LN_ROWS_PER_BLOCK = 64  # layer_norm_backward: rows per partial sum of dweight and dbias
_LN_BWD_THREADS = 128  # layer_norm_backward v2's threadgroup: 4 SIMD groups (~160 registers each)
# layer_norm_backward: v1 dx in two sweeps then the column sums, v2 one read (a SIMD group
# per row, D <= 1024), v3 one read with a row shared by P SIMD groups (D <= 2048).
# Default (None): v3 where it fits (the fastest measured: 77 % of the copy bandwidth on an
# H200 at 256 MiB, v2 52 %; docs/cuda.md), else v1 (CAMEL_MEMORY_KERNELS=1: v1);
# CAMEL_LAYERNORM_BACKWARD=1|2|3 forces one.
LAYERNORM_BACKWARD_VERSION = None
_LN_BWD_V3_MAX_D = 2048  # 8 SIMD groups x 256 floats
_LN_BWD_V3_SPAN = 256  # floats of a row one SIMD group takes in v3 (32 lanes x 2 float4s)


def layer_norm(x, weight, bias, eps):
    """LayerNorm over the last axis: one threadgroup per row writes out, mean and rstd."""
    d = x.shape[-1]
    rows = x.size // d if d else 0
    out, mean, rstd = _empty(x.shape), _empty(x.shape[:-1]), _empty(x.shape[:-1])
    if rows == 0 or d == 0:
        return out, mean, rstd
    version = config.layernorm()
    version = LAYERNORM_VERSION if version is None else version
    if (
        version is None
        and _memory_version("layer_norm", x.size) == 2
        and d <= _LN_V4_MAX_D
        and _row_fits(_kernel(_LN, LAYERNORM_FORWARD[4]), d)
    ):
        version = 4
    elif version is None:
        version = 3 if d <= _LN_V3_MAX_D else 2
    if str(version) not in {str(v) for v in LAYERNORM_FORWARD}:
        raise ValueError(
            f"[layer_norm] unknown LayerNorm version {version!r} (CAMEL_LAYERNORM or "
            f"LAYERNORM_VERSION); valid: {sorted(LAYERNORM_FORWARD)}"
        )
    version = int(version)
    if version == 3 and d > _LN_V3_MAX_D:
        raise ValueError(
            f"[layer_norm] version 3 keeps a row in registers: D <= {_LN_V3_MAX_D}, got D = {d} "
            f"(shape {x.shape}); use version 2"
        )
    if version == 4 and d > _LN_V4_MAX_D:
        raise ValueError(
            f"[layer_norm] version 4 keeps a row in registers: D <= {_LN_V4_MAX_D}, got D = {d} "
            f"(shape {x.shape}); use version 2"
        )
    sweeps = builtins.max(1, 4 - version)  # reads of x: v1 three, v2 two, v3 and v4 one
    nbytes = ((sweeps + 1) * x.size + 2 * d + 2 * rows) * _F32
    fn = _kernel(_LN, LAYERNORM_FORWARD[version])
    if version == 4:
        _check_32bit_indices("layer_norm", x.size)
        if not _row_fits(fn, d):
            limit = fn.max_total_threads_per_threadgroup
            raise ValueError(
                f"[layer_norm] version 4 holds a row of D = {d} in {-(-d // _ROW_SPAN)} SIMD "
                f"groups of one threadgroup; this kernel allows {limit} threads; use version 2"
            )
        p, groups, tpg = _row_geometry(rows, d, fn)
        vec4 = int(d % 4 == 0 and _aligned(x, weight, bias, out))
        fn(x, weight, bias, out, mean, rstd, d, float(eps), rows, p, vec4, threadgroups=groups,
           threads_per_threadgroup=tpg, flops=8 * x.size, bytes=nbytes)  # fmt: skip
        return out, mean, rstd
    fn(x, weight, bias, out, mean, rstd, d, float(eps), threadgroups=rows,
       threads_per_threadgroup=_row_threads(d), flops=8 * x.size, bytes=nbytes)  # fmt: skip
    return out, mean, rstd


def layer_norm_backward(grad, x, weight, mean, rstd):
    """(dx, dweight, dbias): dx with one threadgroup per row, dweight and dbias as a
    column reduction (one thread per column, rows in order: deterministic)."""
    d = x.shape[-1]
    rows = x.size // d if d else 0
    dx, dweight, dbias = _empty(x.shape), _empty((d,)), _empty((d,))
    if d == 0:
        return dx, dweight, dbias
    if rows == 0:
        return dx, full((d,), 0.0, "float32"), full((d,), 0.0, "float32")
    version = config.layernorm_backward()
    version = LAYERNORM_BACKWARD_VERSION if version is None else version
    if version is None:
        fused = _memory_version("layer_norm_backward", x.size) == 2 and d <= _LN_BWD_V3_MAX_D
        version = 3 if fused else 1
    limits = {"1": None, "2": _LN_V3_MAX_D, "3": _LN_BWD_V3_MAX_D}
    if str(version) not in limits:
        raise ValueError(
            f"[layer_norm_backward] unknown version {version!r} (CAMEL_LAYERNORM_BACKWARD or "
            f"LAYERNORM_BACKWARD_VERSION); valid: 1, 2, 3"
        )
    version, limit = int(version), limits[str(version)]
    if limit is not None and d > limit:
        raise ValueError(
            f"[layer_norm_backward] version {version} keeps a row in registers: D <= {limit}, "
            f"got D = {d} (shape {x.shape}); use version 1"
        )
    if version > 1:
        _check_32bit_indices("layer_norm_backward", x.size)
        fused = _layer_norm_backward_v2 if version == 2 else _layer_norm_backward_v3
        return fused(grad, x, weight, mean, rstd, dx, rows, d)
    fn = _kernel(_LN, "layernorm_backward_dx")
    fn(grad, x, weight, mean, rstd, dx, d, threadgroups=rows,
       threads_per_threadgroup=_row_threads(d), flops=12 * x.size,
       bytes=(5 * x.size + d + 2 * rows) * _F32)  # fmt: skip
    nbytes = (2 * x.size + 2 * rows + 2 * d) * _F32
    if rows <= _LN_ROWS_PER_BLOCK:  # one pass: one thread per column walks every row
        fn = _kernel(_LN, "layernorm_backward_params")
        _launch_1d(fn, (grad, x, mean, rstd, dweight, dbias, rows, d), d, 5 * x.size, nbytes)
        return dx, dweight, dbias
    # two passes: partial sums per block of rows, then the partials summed in block order
    blocks = (rows + _LN_ROWS_PER_BLOCK - 1) // _LN_ROWS_PER_BLOCK
    part_w, part_b = _empty((blocks, d)), _empty((blocks, d))
    fn = _kernel(_LN, "layernorm_backward_params_blocked")
    tx = min(d, 32)
    tpg = (tx, builtins.max(1, min(blocks, _THREADS // tx)), 1)
    fn(grad, x, mean, rstd, part_w, part_b, rows, d, _LN_ROWS_PER_BLOCK,
       threads=(d, blocks, 1), threads_per_threadgroup=tpg,
       flops=5 * x.size, bytes=nbytes + 2 * blocks * d * _F32)  # fmt: skip
    fn = _kernel(_RED, "sum_axis_strided")
    for part, out in ((part_w, dweight), (part_b, dbias)):
        _launch_1d(fn, (part, out, blocks, d, d), d, blocks * d, (blocks + 1) * d * _F32)
    return dx, dweight, dbias


def _ln_backward_blocks(rows):
    """(rows per threadgroup, threadgroups) of the fused backward kernels v2 and v3."""
    per_block = builtins.max(8, builtins.min(64, -(-rows // 512)))
    return per_block, -(-rows // per_block)


def _ln_backward_param_sums(partials, blocks, d):
    """dweight and dbias from the blocks' partials (2, blocks, d), added in block order by
    sum_axis_blocks (deterministic): views of the two rows of one (2, d) buffer, so one
    dispatch sums both."""
    sums = _empty((2, d))
    _sum_axis(partials, sums, 2, blocks, d)
    dweight = DeviceArray((d,), np.float32, sums.buffer, sums.offset)
    dbias = DeviceArray((d,), np.float32, sums.buffer, sums.offset + d * _F32)
    return dweight, dbias


def _layer_norm_backward_v2(grad, x, weight, mean, rstd, dx, rows, d):
    """One kernel reads grad and x once: dx, and per block of rows the partial dweight and
    dbias (2, blocks, d); then the blocks are added in order."""
    per_block, blocks = _ln_backward_blocks(rows)
    partials = _empty((2, blocks, d))
    vec4 = int(d % 4 == 0 and _aligned(grad, x, weight, dx))
    fn = _kernel(_LN, "layernorm_backward_v2")
    fn(grad, x, weight, mean, rstd, dx, partials, rows, d, per_block, vec4,
       threadgroups=blocks, threads_per_threadgroup=_LN_BWD_THREADS, flops=17 * x.size,
       bytes=(3 * x.size + 2 * rows + 2 * blocks * d) * _F32)  # fmt: skip
    return (dx, *_ln_backward_param_sums(partials, blocks, d))


def _layer_norm_backward_v3(grad, x, weight, mean, rstd, dx, rows, d):
    """v2's one read with a row shared by P SIMD groups (P * 256 >= D): a quarter of v2's
    registers a lane; the blocks' partial dweight and dbias added as in v2."""
    p = 1
    while p * _LN_BWD_V3_SPAN < d:
        p *= 2
    simd_groups = builtins.max(p, 4)  # a multiple of P
    per_block, blocks = _ln_backward_blocks(rows)
    partials = _empty((2, blocks, d))
    vec4 = d % 4 == 0 and _aligned(grad, x, weight, dx)
    fn = _kernel(_LN, "layernorm_backward_v3" if vec4 else "layernorm_backward_v3_float")
    fn(grad, x, weight, mean, rstd, dx, partials, rows, d, per_block, p,
       threadgroups=blocks, threads_per_threadgroup=32 * simd_groups, flops=17 * x.size,
       bytes=(3 * x.size + 2 * rows + 2 * blocks * d) * _F32)  # fmt: skip
    return (dx, *_ln_backward_param_sums(partials, blocks, d))


def embedding(idx, weight):
    """Gather rows (ops_embedding.metal): out[..., :] = weight[idx[...], :]."""
    v, d = weight.shape
    out = _empty(tuple(idx.shape) + (d,))
    n = out.size
    if n:
        fn = _kernel(_EMB, "embedding_forward")
        _launch_1d(fn, (idx, weight, out, v, d, n), n, 0, (2 * n + idx.size) * _F32)
    return out


def embedding_backward(grad, idx, num_embeddings):
    """Deterministic scatter-add (ops_embedding.metal): link each token's positions into
    a list in position order, then one thread per (column, token) sums its list."""
    d = grad.shape[-1]
    v, n = num_embeddings, idx.size
    dweight = _empty((v, d))
    if dweight.size == 0:
        return dweight
    if n == 0:
        return full((v, d), 0.0, "float32")
    head, nxt = _empty((v,), np.int32), _empty((n,), np.int32)
    fn = _kernel(_EMB, "embedding_backward_link")
    _launch_1d(fn, (idx, head, nxt, v, n), v, 0, (v * n + v + n) * _F32)
    fn = _kernel(_EMB, "embedding_backward_sum")
    fn(grad, head, nxt, dweight, v, d, threads=(d, v, 1),
       threads_per_threadgroup=(min(d, 32), builtins.max(1, min(v, _THREADS // min(d, 32))), 1),
       flops=n * d, bytes=(n * d + v * d + d * (v + n)) * _F32)  # fmt: skip
    return dweight


# ---------------------------------------------------------------------------
# optimisers: ops_optim.metal, in place on the parameter's buffer
# ---------------------------------------------------------------------------


def sgd_step(param, grad, momentum_buf, lr, momentum, weight_decay, first_step):
    """One torch.optim.SGD step in place (see backend_cpu.sgd_step): one fused kernel."""
    n = param.size
    if n == 0:
        return
    if momentum != 0:
        fn = _kernel(_OPT, "sgd_momentum_step")
        args = (param, grad, momentum_buf, float(lr), float(momentum), float(weight_decay),
                int(bool(first_step)), n)  # fmt: skip
        _launch_1d(fn, args, n, 5 * n, 5 * n * _F32)
    else:
        fn = _kernel(_OPT, "sgd_step")
        args = (param, grad, float(lr), float(weight_decay), n)
        _launch_1d(fn, args, n, 3 * n, 3 * n * _F32)


def adam_step(param, grad, m, v, lr, beta1, beta2, eps, weight_decay, step):
    """One torch.optim.Adam step in place (see backend_cpu.adam_step): one fused kernel.
    The per-step scalars are computed here in double and rounded to float32 once, as
    the CPU reference does."""
    n = param.size
    if n == 0:
        return
    fn = _kernel(_OPT, "adam_step")
    args = (param, grad, m, v, *_adam_scalars(lr, beta1, beta2, eps, weight_decay, step), n)
    _launch_1d(fn, args, n, 12 * n, 7 * n * _F32)


def _adam_scalars(lr, beta1, beta2, eps, weight_decay, step):
    """AdamScalars (ops_optim.metal): the per-step numbers in double, rounded to float32
    once, as the CPU reference rounds them."""
    lr_over_bias1 = lr / (1 - beta1**step)
    bias2_sqrt = math.sqrt(1 - beta2**step)
    return (float(lr_over_bias1), float(1 - beta1), float(beta2), float(1 - beta2),
            float(bias2_sqrt), float(eps), float(weight_decay))  # fmt: skip


ADAM_TENSORS = 7  # tensors per adam_step_tensors dispatch (ops_optim.metal)


def adam_steps(tensors, lr, beta1, beta2, eps, weight_decay, step):
    """adam_step for many parameters at the same step count: a list of (param, grad, m, v),
    ADAM_TENSORS of them per dispatch (adam_step_tensors) instead of one dispatch each."""
    tensors = [t for t in tensors if t[0].size]
    fn = _kernel(_OPT, "adam_step_tensors")
    scalars = np.array(_adam_scalars(lr, beta1, beta2, eps, weight_decay, step), np.float32)
    for start in range(0, len(tensors), ADAM_TENSORS):
        chunk = tensors[start : start + ADAM_TENSORS]
        sizes = [p.size for p, _, _, _ in chunk]
        first = np.cumsum([0] + [-(-n // _THREADS) for n in sizes])  # threadgroups before each
        pad = ADAM_TENSORS - len(chunk)
        # AdamTensors: n[7], first_group[8], then AdamScalars; an unfilled slot has n = 0
        # and the total as its first threadgroup, so no threadgroup picks it
        table = np.concatenate([
            np.array(sizes + [0] * pad, np.uint32),
            np.array(list(first) + [first[-1]] * pad, np.uint32),
            scalars.view(np.uint32),
        ])  # fmt: skip
        buffers = [x for t in chunk for x in t] + [x for _ in range(pad) for x in chunk[0]]
        n = builtins.sum(sizes)
        fn(table, *buffers, threadgroups=int(first[-1]), threads_per_threadgroup=_THREADS,
           flops=12 * n, bytes=7 * n * _F32)  # fmt: skip
