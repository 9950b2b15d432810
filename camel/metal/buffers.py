"""camel.metal.buffers — GPU memory: the buffer cache that recycles shim buffers, `Buffer`,
`DeviceArray` (the storage of an "mps" tensor), the host mirrors of the CUDA shim, and
`synchronize()` (which refreshes those mirrors' live views).

Memory: on Metal and the simulator every buffer is shared storage (one address for CPU
and GPU), so DeviceArray.numpy() is a zero-copy NumPy view of the buffer. On the CUDA shim
a buffer is device memory with a host mirror: .numpy() copies the device contents into the
mirror and returns a view of it, and host writes through camel's API reach the GPU before
the next dispatch that uses the buffer (docs/cuda.md, "Host mirrors" below). Buffers are
recycled through a cache ("Buffer cache" below) so a training loop in steady state
allocates no new buffers.
"""

from __future__ import annotations

import ctypes
import math
import sys
import weakref

import numpy as np

from camel.metal import loading
from camel.metal.abi import MetalError, _MemoryInfo
from camel.metal.loading import _fail, _native

# ---- Host mirrors (the CUDA shim) ---------------------------------------------------
#
# On a discrete GPU a buffer is device memory plus a host mirror at `contents`. The rule
# (docs/cuda.md): every host READ goes through DeviceArray.numpy() (which synchronises and
# copies device -> mirror) and every host WRITE through camel's API (from_numpy, zeros,
# writes through a .numpy() view, Buffer.did_modify) marks the range, which the shim
# uploads before the next dispatch that binds the buffer. A .numpy() view may be written
# at any time, so while one is alive its buffer is uploaded before every dispatch that
# uses it and refreshed by every synchronize(), and when it dies its writes are marked
# (unless a dispatch bound the buffer meanwhile). _viewed counts the live views per block.
# On shared storage (Metal, simulator) none of this runs.

_viewed: dict = {}  # _Block -> number of live .numpy() views of it


def _sync_to_host(block) -> None:
    if loading._lib.camel_buffer_sync_to_host(block.handle) != 0:
        raise _fail(f"copying a {block.capacity}-byte buffer to the host")


def _did_modify(block, offset: int, length: int) -> None:
    if loading._lib.camel_buffer_did_modify(block.handle, offset, length) != 0:
        raise _fail(f"marking {length} bytes at offset {offset} of a buffer as host-written")


def _view_gone(block, last_use_then: int) -> None:
    """The last array derived from a .numpy() view is gone. It may have been written
    (`x.numpy()[...] = a` is the common spelling), so unless a dispatch has bound the
    buffer since the view was made (then the device holds the newer data, as it would
    on Metal), its contents go to the device before the next dispatch that uses it."""
    if block not in _viewed:  # released by empty_cache() meanwhile
        return
    n = _viewed[block] - 1
    if n > 0:
        _viewed[block] = n
    else:
        del _viewed[block]
    if block.last_use == last_use_then and not loading._shutting_down:
        try:
            _did_modify(block, 0, block.capacity)
        except MetalError as e:  # a finaliser must not raise
            print(f"[camel.metal] {e}", file=sys.stderr)


def _upload_viewed(blocks) -> None:
    """Before a dispatch: buffers with live host views may hold host writes."""
    for block in blocks:
        if block in _viewed:
            _did_modify(block, 0, block.capacity)


def synchronize() -> None:
    """Commit, then wait until every dispatch so far has completed. Raises if one failed,
    or if a check made on the GPU since the last synchronize() failed (check_later below).
    On the CUDA shim the NumPy views handed out by .numpy() that are still alive are
    refreshed from the device too, so they read as on shared memory."""
    lib = _native()
    if lib.camel_synchronize() != 0:
        raise _fail("a command buffer failed")
    if _viewed:
        for block in list(_viewed):
            _sync_to_host(block)
    if _checks:
        _raise_failed_checks()


# ---- Checks made on the GPU ---------------------------------------------------------
#
# An op whose input can only be validated where it lives (cross_entropy's targets, on the
# GPU) has its kernel write an error record into a small buffer, and hands the record to
# check_later() instead of making the host wait for the kernel. synchronize() reads every
# pending record and raises the first error. Every host read of a value goes through
# synchronize() (.numpy(), .item(), printing a tensor), so no value computed from bad input
# is ever seen; the error names the op and the line that called it. (PyTorch on CUDA
# reports a device-side assert the same way, at the next synchronisation.)

_checks: list = []  # (record DeviceArray, explain(values) -> Exception | None, call site)
MAX_PENDING_CHECKS = 256  # check_later synchronises past this many (bounds what they hold)
_CAMEL_DIR = __file__.rsplit("/", 2)[0] + "/"  # .../camel/: frames inside are not the caller


def check_later(record: DeviceArray, explain) -> None:
    """After the dispatches so far complete, explain(record's values as NumPy) returns the
    error to raise, or None. Raised by the next synchronize()."""
    frame = sys._getframe(1)
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_CAMEL_DIR):
        frame = frame.f_back  # the first frame outside camel/: the user's call
    _checks.append((record, explain, (frame.f_code.co_filename, frame.f_lineno)))
    if len(_checks) >= MAX_PENDING_CHECKS:
        synchronize()


def _raise_failed_checks() -> None:
    checks = _checks[:]
    _checks.clear()
    for record, explain, (file, line) in checks:
        if loading._mirrors:
            _sync_to_host(record.buffer._live())
        error = explain(record._host_view())
        if error is not None:
            raise type(error)(
                f"{error}. Found on the GPU by the call at {file}:{line} and raised at the "
                "next synchronisation: values computed from that call since (gradients, "
                "optimizer steps) are not valid"
            ) from None


# ---- Buffer cache -------------------------------------------------------------------
#
# Freed buffers are not handed back to the shim; they wait on a free list keyed by
# size class and are reused by the next allocation of that class, so a training
# loop that allocates the same shapes every step allocates no new shim buffers.
#
# Size classes: requests round up to at least 256 bytes, then to the next of the
# four steps per power of two (2^k, 1.25*2^k, 1.5*2^k, 1.75*2^k); waste is < 25%.
# Every capacity is a multiple of 64 bytes, so a float4 kernel may round a length up
# to a multiple of 4 elements without leaving the buffer.
#
# The hazard: dispatches are committed lazily, so a kernel already encoded may still
# READ a buffer that Python has dropped. Reusing it for a GPU write is safe (the queue
# runs in order), but writing it from the host (from_numpy, zeros) before that command
# buffer completes would change the kernel's input. Each block remembers the command
# buffer of its last use; host writes only take blocks whose last use has completed.


class _Block:
    """One shim buffer: handle, capacity in bytes, CPU address, last command buffer using it."""

    __slots__ = ("handle", "capacity", "contents", "last_use")

    def __init__(self, handle: int, capacity: int, contents: int):
        self.handle = handle
        self.capacity = capacity
        self.contents = contents
        self.last_use = 0


_free: dict[int, list[_Block]] = {}  # size class -> idle blocks
# Test hook: a byte every new block is filled with (0xFF makes each float32 a NaN and each
# int32 -1), so a kernel that reads past its data or skips an output element changes a
# number instead of meeting the shim's zeros. None: leave the shim's zeros.
poison_byte: int | None = None
_stats = {"live_bytes": 0, "peak_bytes": 0, "cached_bytes": 0, "cached_buffers": 0}


def _size_class(nbytes: int) -> int:
    if nbytes <= 256:
        return 256
    step = 1 << max(nbytes.bit_length() - 3, 0)  # a quarter of the power of two below
    return (nbytes + step - 1) // step * step


def _new_block(capacity: int) -> _Block:
    lib = _native()
    contents = ctypes.c_void_p()
    handle = lib.camel_buffer_new(capacity, ctypes.byref(contents))
    if not handle:
        # Perhaps the cache holds the memory we need: give it back and try once more.
        if _stats["cached_buffers"]:
            empty_cache()
            handle = lib.camel_buffer_new(capacity, ctypes.byref(contents))
        if not handle:
            raise _fail(f"cannot allocate a buffer of {capacity} bytes")
    if poison_byte is not None:
        ctypes.memset(contents.value, poison_byte, capacity)
    _stats["live_bytes"] += capacity
    _stats["peak_bytes"] = max(_stats["peak_bytes"], _stats["live_bytes"])
    return _Block(handle, capacity, contents.value)


def _take_block(nbytes: int, host_write: bool) -> _Block:
    """A block of at least nbytes: from the cache if possible, else new from the shim.
    host_write=True only accepts blocks no pending command buffer still uses."""
    capacity = _size_class(nbytes)
    blocks = _free.get(capacity)
    if blocks:
        index = len(blocks) - 1  # newest first: most likely still in the CPU cache
        if host_write:
            done = loading._c_completed()
            while index >= 0 and blocks[index].last_use > done:
                index -= 1
        if index >= 0:
            block = blocks.pop(index)
            _stats["cached_bytes"] -= capacity
            _stats["cached_buffers"] -= 1
            return block
    return _new_block(capacity)


def _guard_slack(block: _Block, nbytes: int) -> None:
    """On the simulator, tell the shim how much of the block is used, so a kernel writing
    into the rest (ASan: touching it) is reported. Rounded up to 16 bytes: float4 kernels
    may round a length up to 4 elements (see the size classes above)."""
    global _set_length
    if _set_length is None:
        _set_length = getattr(_native(), "camel_sim_buffer_set_length", False)
        if _set_length:
            _set_length.restype = ctypes.c_int
            _set_length.argtypes = [ctypes.c_void_p, ctypes.c_uint64]
    if _set_length and _set_length(block.handle, min(-(-nbytes // 16) * 16, block.capacity)):
        raise _fail("camel_sim_buffer_set_length")


_set_length = None  # the simulator's camel_sim_buffer_set_length; False on Metal


def _give_back(block: _Block) -> None:
    _free.setdefault(block.capacity, []).append(block)
    _stats["cached_bytes"] += block.capacity
    _stats["cached_buffers"] += 1


def empty_cache() -> None:
    """Release every cached idle buffer to the shim (which frees each once no pending
    command buffer uses it)."""
    lib = _native()
    for blocks in _free.values():
        while blocks:
            block = blocks.pop()
            _stats["cached_bytes"] -= block.capacity
            _stats["cached_buffers"] -= 1
            _stats["live_bytes"] -= block.capacity
            _viewed.pop(block, None)  # a view outliving an explicit release() aliases it
            if lib.camel_buffer_release(block.handle) != 0:
                raise _fail("camel_buffer_release")


def memory_stats() -> dict:
    """Buffer memory, in bytes:
    allocated_bytes  what the shim holds (live buffers plus the cache; buffers released
                     while a command buffer still uses them count until it completes)
    peak_bytes       the most camel.metal held at once since reset_peak_memory_stats()
    buffers          the shim's count of live buffers (cached ones included)
    cached_bytes, cached_buffers   idle buffers waiting in the cache for reuse
    """
    info = _MemoryInfo()
    if _native().camel_memory_info_get(ctypes.byref(info)) != 0:
        raise _fail("camel_memory_info_get")
    return {
        "allocated_bytes": info.allocated_bytes,
        "peak_bytes": _stats["peak_bytes"],
        "buffers": info.buffers,
        "cached_bytes": _stats["cached_bytes"],
        "cached_buffers": _stats["cached_buffers"],
    }


def reset_peak_memory_stats() -> None:
    _stats["peak_bytes"] = _stats["live_bytes"]


class Buffer:
    """A shared-storage GPU buffer of `nbytes` (its storage may be larger: a size class).

    `handle` is the shim's opaque pointer, `contents` the CPU address of the storage.
    `release()` returns the storage (to the cache) exactly once; any use afterwards
    raises MetalError. Dropping the last reference releases it too, and is the safe
    way: NumPy views made before an explicit release() would alias whatever reuses
    the storage (it stays valid memory, so nothing crashes on Metal; on the simulator
    the pages of a large buffer past its new owner's length fault, so touching them
    through such a view kills Python with SIGSEGV).

    A recycled buffer may still be read by a queued kernel: write it from the host
    only through DeviceArray.numpy() (which synchronises first), or ask for
    Buffer(n, host_write=True), which only takes idle storage.
    """

    __slots__ = ("_block", "nbytes", "__weakref__")

    def __init__(self, nbytes: int, *, host_write: bool = False):
        nbytes = int(nbytes)
        if nbytes < 0:
            raise ValueError(f"[Buffer] nbytes must be >= 0, got {nbytes}")
        _native()
        self.nbytes = nbytes
        self._block = _take_block(max(nbytes, 1), host_write)
        _guard_slack(self._block, nbytes)

    def _live(self) -> _Block:
        block = self._block
        if block is None:
            raise MetalError(f"[Buffer] use of a released buffer ({self.nbytes} bytes)")
        return block

    @property
    def handle(self) -> int:
        return self._live().handle

    @property
    def contents(self) -> int:
        return self._live().contents

    @property
    def capacity(self) -> int:
        return self._live().capacity

    @property
    def last_use(self) -> int:
        """Id of the last command buffer a dispatch using this buffer was encoded into."""
        return self._live().last_use

    @property
    def released(self) -> bool:
        return self._block is None

    def did_modify(self, offset: int = 0, length: int | None = None) -> None:
        """Say the host wrote bytes [offset, offset + length) through `contents` (ctypes):
        on the CUDA shim they reach the GPU before the next dispatch using the buffer.
        A no-op on shared storage. DeviceArray.from_numpy/zeros/.numpy() do this for you."""
        block = self._live()
        length = self.nbytes - offset if length is None else length
        if loading._mirrors:
            _did_modify(block, offset, length)

    def sync_to_host(self) -> None:
        """Wait for the GPU work using this buffer, then make `contents` show the device's
        data (CUDA shim: a copy into the host mirror; a no-op on shared storage)."""
        block = self._live()
        if loading._mirrors:
            _sync_to_host(block)

    def release(self) -> None:
        block = self._block
        if block is None:
            raise MetalError(f"[Buffer] buffer of {self.nbytes} bytes released twice")
        self._block = None
        _give_back(block)

    def __del__(self):
        block = getattr(self, "_block", None)
        if block is not None and not loading._shutting_down:
            self._block = None
            _give_back(block)

    def __repr__(self) -> str:
        if self._block is None:
            return f"Buffer(nbytes={self.nbytes}, released)"
        return f"Buffer(nbytes={self.nbytes}, handle=0x{self._block.handle:x})"


# ---- DeviceArray: the storage of an "mps" tensor ------------------------------------

_DTYPES = (np.dtype(np.float32), np.dtype(np.int32), np.dtype(np.uint32), np.dtype(np.float16))


def _check_dtype(dtype) -> np.dtype:
    if dtype in _DTYPES and isinstance(dtype, np.dtype):  # the common case, no conversion
        return dtype
    dt = np.dtype(dtype)
    if dt not in _DTYPES:
        names = ", ".join(d.name for d in _DTYPES)
        raise TypeError(f"[DeviceArray] dtype {dt.name} is not supported on the GPU; use {names}")
    return dt


def _shape_tuple(shape) -> tuple[int, ...]:
    if type(shape) is tuple and all(type(s) is int and s >= 0 for s in shape):
        return shape  # the common case: already a tuple of Python ints
    if isinstance(shape, (int, np.integer)):
        shape = (shape,)
    shape = tuple(int(s) for s in shape)
    if any(s < 0 for s in shape):
        raise ValueError(f"[DeviceArray] negative dimension in shape {shape}")
    return shape


class DeviceArray:
    """An n-d array of float32 or int32 in a GPU buffer, C-contiguous, `offset` bytes in.

    .shape .dtype .size .nbytes .buffer .offset
    DeviceArray.empty(shape, dtype)    uninitialised (GPU writes fill it)
    DeviceArray.zeros(shape, dtype)
    DeviceArray.from_numpy(arr)        copies arr into a buffer
    a.numpy()                          synchronises, then a zero-copy view of the buffer
    a.reshape(shape)                   same buffer, new shape (no copy)
    """

    __slots__ = ("shape", "dtype", "size", "nbytes", "buffer", "offset")

    def __init__(self, shape, dtype, buffer: Buffer, offset: int = 0):
        self.shape = _shape_tuple(shape)
        self.dtype = _check_dtype(dtype)
        self.size = math.prod(self.shape)
        self.nbytes = self.size * self.dtype.itemsize
        if offset < 0 or offset + self.nbytes > buffer.nbytes:
            raise ValueError(
                f"[DeviceArray] {self.nbytes} bytes at offset {offset} do not fit in a "
                f"buffer of {buffer.nbytes} bytes"
            )
        self.buffer = buffer
        self.offset = offset

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize

    @classmethod
    def empty(cls, shape, dtype=np.float32) -> DeviceArray:
        # The hot path of every op's output: validate once, then fill the slots directly.
        shape, dt = _shape_tuple(shape), _check_dtype(dtype)
        out = cls.__new__(cls)
        out.shape, out.dtype, out.size = shape, dt, math.prod(shape)
        out.nbytes = out.size * dt.itemsize
        out.buffer, out.offset = Buffer(out.nbytes), 0
        return out

    @classmethod
    def zeros(cls, shape, dtype=np.float32) -> DeviceArray:
        shape, dt = _shape_tuple(shape), _check_dtype(dtype)
        nbytes = math.prod(shape) * dt.itemsize
        out = cls(shape, dt, Buffer(nbytes, host_write=True))
        if nbytes:
            ctypes.memset(out.buffer.contents, 0, nbytes)
            if loading._mirrors:
                _did_modify(out.buffer._block, 0, nbytes)
        return out

    @classmethod
    def from_numpy(cls, arr) -> DeviceArray:
        """Copy a float32/int32 array (any layout) into a new buffer."""
        arr = np.asarray(arr)
        dt = _check_dtype(arr.dtype)
        out = cls(arr.shape, dt, Buffer(arr.nbytes, host_write=True))
        if arr.nbytes:
            # Host write: the block is idle (see the hazard note above the cache).
            np.copyto(out._host_view(), arr)
            if loading._mirrors:
                _did_modify(out.buffer._block, 0, arr.nbytes)
        return out

    def _host_view(self, track: bool = False) -> np.ndarray:
        """A NumPy view of the storage without synchronising (internal). track=True
        counts it in _viewed while any array derived from it is alive (CUDA shim)."""
        buffer = self.buffer
        block = buffer._live()
        raw = (ctypes.c_byte * block.capacity).from_address(block.contents)
        raw._camel_buffer = buffer  # the view's .base chain keeps the Buffer alive
        if track:
            _viewed[block] = _viewed.get(block, 0) + 1
            weakref.finalize(raw, _view_gone, block, block.last_use)
        flat = np.frombuffer(raw, dtype=self.dtype, count=self.size, offset=self.offset)
        return flat.reshape(self.shape)

    def numpy(self) -> np.ndarray:
        """Synchronise, then return a zero-copy NumPy view of the buffer (writable).
        The view keeps the buffer alive; writes through it are seen by later kernels.
        (CUDA shim: a view of the host mirror, refreshed from the device here and by
        every synchronize() while the view lives; docs/cuda.md.)"""
        synchronize()
        if not loading._mirrors:
            return self._host_view()
        block = self.buffer._live()
        _sync_to_host(block)
        return self._host_view(track=True)

    def reshape(self, *shape) -> DeviceArray:
        """The same buffer seen with a new shape (one dimension may be -1). No copy."""
        if len(shape) == 1 and not isinstance(shape[0], (int, np.integer)):
            shape = shape[0]
        dims = [int(s) for s in shape]
        if dims.count(-1) > 1 or any(s < -1 for s in dims):
            raise ValueError(f"[DeviceArray] invalid shape {tuple(dims)} for reshape")
        if -1 in dims:
            known = math.prod(s for s in dims if s != -1)
            dims[dims.index(-1)] = self.size // known if known else 0
        new_shape = tuple(dims)
        if math.prod(new_shape) != self.size:
            raise ValueError(
                f"[DeviceArray] cannot reshape {self.shape} ({self.size} elements) to {new_shape}"
            )
        return DeviceArray(new_shape, self.dtype, self.buffer, self.offset)

    def __repr__(self) -> str:
        return f"DeviceArray(shape={self.shape}, dtype={self.dtype.name}, offset={self.offset})"
