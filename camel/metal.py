"""camel.metal — the whole GPU host side in one file: the learner's lab bench.

Python talks to the GPU through one small C ABI, shim/camel_shim.h, loaded with
ctypes. Three libraries implement it:

    shim/build/libcamel_metal.dylib   Apple GPUs through Metal (macOS; the default there)
    shim/build/libcamel_sim.so        the Metal simulator: the same .metal files on the CPU
                                      (CAMEL_SHIM=sim; the Linux default without an NVIDIA GPU)
    shim/build/libcamel_cuda.so       NVIDIA GPUs: the .metal files translated to PTX
                                      (CAMEL_SHIM=cuda; the Linux default with a driver and GPU)

CAMEL_SHIM_LIBRARY=/path/to/lib overrides the search (e.g. a sanitizer build).
CAMEL_CAPTURE=run.gputrace captures the whole run for Xcode (Metal only).

This module is the ONE place that declares ctypes argtypes/restype (a missing
restype silently truncates a 64-bit pointer to 32 bits). Everything above it
(tensors, the "mps" backend, examples) calls the Python API below:

    lib = camel.metal.compile(source)              # CompileError carries the log
    fn = lib.function("saxpy")                     # fn.max_total_threads_per_threadgroup, ...
    fn(x, y, 2.0, n, threads=n, threads_per_threadgroup=256)
    camel.metal.synchronize()

Memory: on Metal and the simulator every buffer is shared storage (one address for
CPU and GPU), so DeviceArray.numpy() is a zero-copy NumPy view of the buffer. On the
CUDA shim a buffer is device memory with a host mirror: .numpy() copies the device
contents into the mirror and returns a view of it, and host writes through camel's
API reach the GPU before the next dispatch that uses the buffer (docs/cuda.md). Buffers are
recycled through a cache (see "Buffer cache" below) so a training loop in
steady state allocates no new buffers.
"""

from __future__ import annotations

import atexit
import ctypes
import math
import operator
import os
import struct
import subprocess
import sys
import weakref
from pathlib import Path

import numpy as np

__all__ = [
    "MetalError",
    "CompileError",
    "DispatchError",
    "compile",
    "library",
    "kernel",
    "Library",
    "Function",
    "Buffer",
    "DeviceArray",
    "synchronize",
    "commit",
    "completed_id",
    "command_buffer_time",
    "device_name",
    "device_info",
    "is_simulator",
    "shim",
    "memory_stats",
    "reset_peak_memory_stats",
    "empty_cache",
    "mps_matmul",
    "mpsgraph_attention",
    "capture_begin",
    "capture_end",
]

ABI_VERSION = 3  # must equal CAMEL_SHIM_ABI_VERSION in shim/camel_shim.h
MAX_BUFFER_ARGS = 31  # Metal's limit on [[buffer(i)]] slots
MAX_THREADGROUP_ARGS = 31  # [[threadgroup(i)]] slots we preallocate
MAX_SET_BYTES = 4095  # setBytes takes "smaller than 4 KB" (Apple); larger constants: a buffer

_PACKAGE_DIR = Path(__file__).resolve().parent
_REPO_DIR = _PACKAGE_DIR.parent
# An installed camel (pip install ., a wheel) carries the built shim, the shaders and the
# simulator's headers in camel/_native/ (see setup.py); a checkout uses shim/build/ and shaders/.
_NATIVE_DIR = _PACKAGE_DIR / "_native"
_INSTALLED = (_NATIVE_DIR / "shaders").is_dir()
SHADERS_DIR = _NATIVE_DIR / "shaders" if _INSTALLED else _REPO_DIR / "shaders"
_SHIM_BUILD_DIR = _NATIVE_DIR if _INSTALLED else _REPO_DIR / "shim" / "build"


# ---- errors -------------------------------------------------------------------


class MetalError(RuntimeError):
    """A failed call into the shim; the message is camel_last_error() plus context."""


class CompileError(MetalError):
    """MSL that did not compile. `.log` is the compiler log (lines point into the .metal file)."""

    def __init__(self, message: str, log: str, path: str | None = None):
        super().__init__(message)
        self.log = log
        self.path = path


class DispatchError(MetalError):
    """A dispatch the shim refused: threadgroup too large, too much threadgroup memory,
    wrong argument count or kind. The message names the kernel and the limits."""


# ---- the C ABI: structs mirror shim/camel_shim.h field by field ----------------


class _DeviceInfo(ctypes.Structure):
    _fields_ = [
        ("name", ctypes.c_char * 128),
        ("is_simulator", ctypes.c_int32),
        ("max_threads_per_threadgroup", ctypes.c_uint32),
        ("max_threadgroup_memory", ctypes.c_uint32),
        ("simd_width", ctypes.c_uint32),
        ("recommended_working_set", ctypes.c_uint64),
        ("host_mirrors", ctypes.c_int32),
    ]


class _MemoryInfo(ctypes.Structure):
    _fields_ = [("allocated_bytes", ctypes.c_uint64), ("buffers", ctypes.c_uint64)]


class _PipelineInfo(ctypes.Structure):
    _fields_ = [
        ("max_total_threads_per_threadgroup", ctypes.c_uint32),
        ("thread_execution_width", ctypes.c_uint32),
        ("static_threadgroup_memory", ctypes.c_uint32),
    ]


class _ConstantValue(ctypes.Structure):  # camel_constant_value
    _fields_ = [
        ("index", ctypes.c_uint32),
        ("type", ctypes.c_uint32),
        ("components", ctypes.c_uint32),
        ("bytes", ctypes.c_uint8 * 16),
    ]


class _Arg(ctypes.Structure):
    _fields_ = [
        ("buffer", ctypes.c_void_p),
        ("offset", ctypes.c_uint64),
        ("bytes", ctypes.c_void_p),
        ("length", ctypes.c_uint64),
    ]


class _DispatchDesc(ctypes.Structure):
    _fields_ = [
        ("pipeline", ctypes.c_void_p),
        ("args", ctypes.POINTER(_Arg)),
        ("nargs", ctypes.c_uint32),
        ("threadgroup_memory", ctypes.POINTER(ctypes.c_uint32)),
        ("nthreadgroup_memory", ctypes.c_uint32),
        ("grid", ctypes.c_uint32 * 3),
        ("threads_per_threadgroup", ctypes.c_uint32 * 3),
        ("grid_is_threads", ctypes.c_int32),
    ]


def _declare(lib: ctypes.CDLL) -> None:
    """Every argtypes/restype of the ABI, in header order. Handles are c_void_p (Python int)."""
    vp, u32, u64, i32 = ctypes.c_void_p, ctypes.c_uint32, ctypes.c_uint64, ctypes.c_int
    dbl_p = ctypes.POINTER(ctypes.c_double)
    table = {
        "camel_abi_version": ([], i32),
        "camel_last_error": ([], ctypes.c_char_p),
        "camel_init": ([], i32),
        "camel_device_info_get": ([ctypes.POINTER(_DeviceInfo)], i32),
        "camel_buffer_new": ([u64, ctypes.POINTER(vp)], vp),
        "camel_buffer_release": ([vp], i32),
        "camel_buffer_sync_to_host": ([vp], i32),
        "camel_buffer_did_modify": ([vp, u64, u64], i32),
        "camel_memory_info_get": ([ctypes.POINTER(_MemoryInfo)], i32),
        "camel_library_new": ([ctypes.c_char_p, ctypes.c_char_p], vp),
        "camel_library_release": ([vp], None),
        "camel_library_function_names": ([vp, ctypes.c_char_p, u64], u64),
        "camel_library_function_constants": ([vp, ctypes.c_char_p, u64], u64),
        "camel_pipeline_new_with_constants": (
            [vp, ctypes.c_char_p, ctypes.POINTER(_ConstantValue), u32],
            vp,
        ),
        "camel_pipeline_new": ([vp, ctypes.c_char_p], vp),
        "camel_pipeline_release": ([vp], None),
        "camel_pipeline_info_get": ([vp, ctypes.POINTER(_PipelineInfo)], i32),
        "camel_dispatch": ([ctypes.POINTER(_DispatchDesc)], u64),
        "camel_commit": ([], u64),
        "camel_synchronize": ([], i32),
        "camel_completed_id": ([], u64),
        "camel_command_buffer_time": ([u64, dbl_p, dbl_p], i32),
        "camel_mps_matmul": ([vp, vp, vp, u32, u32, u32], u64),
        "camel_mpsgraph_attention": (
            [vp, vp, vp, vp, u32, u32, u32, ctypes.c_float, ctypes.c_int32],
            u64,
        ),
        "camel_capture_begin": ([ctypes.c_char_p], i32),
        "camel_capture_end": ([], i32),
    }
    for name, (argtypes, restype) in table.items():
        try:
            fn = getattr(lib, name)
        except AttributeError:  # a shim built before this function joined the ABI
            raise MetalError(
                f"[metal] {lib._name} has no {name}: it was built from older sources; "
                f"rebuild it: make -C {_REPO_DIR / 'shim'} clean shim"
            ) from None
        fn.argtypes = argtypes
        fn.restype = restype


# ---- loading the shim -----------------------------------------------------------

_lib: ctypes.CDLL | None = None  # set once by _native()
_is_sim = False
_shim_kind = ""  # "metal", "sim" or "cuda" once loaded
_mirrors = False  # buffers have host mirrors (CUDA shim): copy at sync points
_shutting_down = False


def _cuda_device_present() -> bool:
    """True when libcuda.so.1 loads and sees at least one device (the Linux default)."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    count = ctypes.c_int(0)
    try:
        return (
            cuda.cuInit(0) == 0
            and cuda.cuDeviceGetCount(ctypes.byref(count)) == 0
            and (count.value > 0)
        )
    except AttributeError:
        return False


def _shim_choice() -> str:
    """'metal', 'sim' or 'cuda', from the platform and $CAMEL_SHIM."""
    want = os.environ.get("CAMEL_SHIM", "").strip().lower()
    if want not in ("", "metal", "sim", "cuda"):
        raise MetalError(f"[metal] CAMEL_SHIM must be 'metal', 'sim' or 'cuda', got {want!r}")
    if sys.platform == "darwin":
        if want == "cuda":
            raise MetalError(
                "[metal] CAMEL_SHIM=cuda needs Linux with an NVIDIA GPU; on macOS use "
                "CAMEL_SHIM=metal (the default) or CAMEL_SHIM=sim."
            )
        return want or "metal"
    if want == "metal":
        raise MetalError(
            f"[metal] CAMEL_SHIM=metal needs macOS with an Apple GPU; this is {sys.platform}. "
            "Here use CAMEL_SHIM=cuda (an NVIDIA GPU) or CAMEL_SHIM=sim (the CPU simulator), "
            "or unset CAMEL_SHIM."
        )
    if want:
        return want
    return "cuda" if _cuda_device_present() else "sim"


def _shim_candidates(choice: str) -> list[Path]:
    build = _SHIM_BUILD_DIR
    if choice == "metal":
        return [build / "libcamel_metal.dylib"]
    if choice == "cuda":
        return [build / "libcamel_cuda.so"]
    return [build / "libcamel_sim.so", build / "libcamel_sim.dylib"]


def _build_shim() -> None:
    """Run `make -C <repo>/shim shim` once; raise with the tail of its output if it fails."""
    shim_dir = _REPO_DIR / "shim"
    if not (shim_dir / "Makefile").exists():
        raise MetalError(
            f"[metal] the native shim is not built and there is no {shim_dir}/Makefile to "
            "build it; run camel from a source checkout (pip install -e .)"
        )
    print(f"[camel.metal] building the native shim: make -C {shim_dir} shim", file=sys.stderr)
    try:
        proc = subprocess.run(
            ["make", "-C", str(shim_dir), "shim"],
            capture_output=True,
            text=True,
        )
    except FileNotFoundError as e:
        raise MetalError(f"[metal] cannot build the shim: {e} (is `make` installed?)") from None
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-25:])
        raise MetalError(
            f"[metal] building the shim failed (make -C {shim_dir} shim, exit "
            f"{proc.returncode}):\n{tail}"
        )


def _native() -> ctypes.CDLL:
    """The loaded, initialised shim; loads (and if needed builds) it on first use."""
    global _lib, _is_sim, _shim_kind, _mirrors
    if _lib is not None:
        return _lib
    choice = _shim_choice()
    candidates = _shim_candidates(choice)
    override = os.environ.get("CAMEL_SHIM_LIBRARY")  # an explicit .so/.dylib path
    if override:
        candidates = [Path(override)]
        if not candidates[0].exists():
            raise MetalError(f"[metal] CAMEL_SHIM_LIBRARY={override} does not exist")
    path = next((p for p in candidates if p.exists()), None)
    if path is None:
        _build_shim()
        path = next((p for p in candidates if p.exists()), None)
        if path is None:
            raise MetalError(
                f"[metal] `make shim` succeeded but did not produce {candidates[0]}; "
                + ("try CAMEL_SHIM=sim" if choice == "metal" else "check shim/Makefile")
            )
    _enable_capture(choice, os.environ)
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        raise MetalError(f"[metal] cannot load {path}: {e}") from None
    _declare(lib)
    version = lib.camel_abi_version()
    if version != ABI_VERSION:
        raise MetalError(
            f"[metal] {path.name} speaks ABI version {version}, camel.metal expects "
            f"{ABI_VERSION}; rebuild it: make -C {_REPO_DIR / 'shim'} clean shim"
        )
    if lib.camel_init() != 0:
        msg = _error_text(lib)
        if choice == "cuda":  # no fallback: the user asked for the GPU (or it was probed)
            raise MetalError(f"[metal] no CUDA device ({path.name}): {msg}")
        hint = (
            " Set CAMEL_SHIM=sim to run kernels on the CPU simulator instead."
            if choice == "metal"
            else ""
        )
        raise MetalError(f"[metal] no Metal device ({path.name}): {msg}.{hint}")
    info = _DeviceInfo()
    if lib.camel_device_info_get(ctypes.byref(info)) != 0:
        raise MetalError(f"[metal] camel_device_info_get: {_error_text(lib)}")
    _is_sim = bool(info.is_simulator)
    _mirrors = bool(info.host_mirrors)
    _shim_kind = "sim" if _is_sim else ("cuda" if _mirrors else "metal")
    _lib = lib
    _bind_hot_functions(lib)
    _start_capture_from_env()
    return lib


def _enable_capture(choice: str, environ) -> None:
    """Metal allows a capture to a .gputrace file only when MTL_CAPTURE_ENABLED=1 is in the
    environment as Metal loads, i.e. before the shim is loaded: set it when CAMEL_CAPTURE
    asks for a capture (a value the user set is kept)."""
    if choice == "metal" and environ.get("CAMEL_CAPTURE"):
        environ.setdefault("MTL_CAPTURE_ENABLED", "1")


def _start_capture_from_env() -> None:
    """CAMEL_CAPTURE=run.gputrace: capture the whole run for Xcode's Metal debugger."""
    path = os.environ.get("CAMEL_CAPTURE")
    if not path:
        return
    if _is_sim:
        print("[camel.metal] CAMEL_CAPTURE is ignored: GPU capture needs Metal, and this is "
              "the simulator", file=sys.stderr)  # fmt: skip
        return
    capture_begin(path)
    print(f"[camel.metal] capturing GPU work to {path} (open it in Xcode)", file=sys.stderr)

    def stop() -> None:
        try:
            capture_end()
        except MetalError as e:
            print(f"[camel.metal] {e}", file=sys.stderr)

    atexit.register(stop)


def _error_text(lib: ctypes.CDLL | None = None) -> str:
    raw = (lib or _lib).camel_last_error()
    return raw.decode("utf-8", "replace") if raw else "(the shim gave no message)"


def _fail(what: str, cls: type[MetalError] = MetalError) -> MetalError:
    """An exception for a failed shim call: `[metal] what: <camel_last_error()>`."""
    return cls(f"[metal] {what}: {_error_text()}")


# Hot-path entry points, bound once after loading (saves an attribute lookup per call).
_c_dispatch = None
_c_commit = None
_c_completed = None


def _bind_hot_functions(lib: ctypes.CDLL) -> None:
    global _c_dispatch, _c_commit, _c_completed
    _c_dispatch = lib.camel_dispatch
    _c_commit = lib.camel_commit
    _c_completed = lib.camel_completed_id


@atexit.register
def _at_exit() -> None:
    # Buffers finalised during interpreter shutdown must not call into a shim that may
    # already be tearing down its worker threads; the OS reclaims the memory.
    global _shutting_down
    _shutting_down = True


# ---- device, synchronisation, timing ----------------------------------------------


def device_info() -> dict:
    """The device's name and limits, as a dict."""
    lib = _native()
    info = _DeviceInfo()
    if lib.camel_device_info_get(ctypes.byref(info)) != 0:
        raise _fail("camel_device_info_get")
    return {
        "name": info.name.decode("utf-8", "replace"),
        "is_simulator": bool(info.is_simulator),
        "max_threads_per_threadgroup": info.max_threads_per_threadgroup,
        "max_threadgroup_memory": info.max_threadgroup_memory,
        "simd_width": info.simd_width,
        "recommended_working_set": info.recommended_working_set,
    }


def device_name() -> str:
    """'Apple M1 Max', 'NVIDIA H200 (CUDA shim: MSL translated to PTX)', or the
    simulator's name (it says 'simulator')."""
    return device_info()["name"]


def is_simulator() -> bool:
    """True when kernels run on the CPU simulator (shim/sim), not a GPU."""
    _native()
    return _is_sim


def shim() -> str:
    """Which shim runs the kernels: 'metal' (Apple GPU), 'cuda' (NVIDIA GPU, the MSL
    translated to PTX) or 'sim' (the CPU simulator)."""
    _native()
    return _shim_kind


def commit() -> int:
    """Send the open command buffer to the GPU without waiting. Returns its id (0: none open)."""
    return _native().camel_commit()


def synchronize() -> None:
    """Commit, then wait until every dispatch so far has completed. Raises if one failed.
    On the CUDA shim the NumPy views handed out by .numpy() that are still alive are
    refreshed from the device too, so they read as on shared memory."""
    lib = _native()
    if lib.camel_synchronize() != 0:
        raise _fail("a command buffer failed")
    if _viewed:
        for block in list(_viewed):
            _sync_to_host(block)


def completed_id() -> int:
    """Id of the newest command buffer known to have completed."""
    return _native().camel_completed_id()


def command_buffer_time(cb_id: int) -> tuple[float, float] | None:
    """(start, end) in seconds of a completed command buffer, or None if unknown.
    Metal: GPU timestamps. Simulator: wall time."""
    start, end = ctypes.c_double(), ctypes.c_double()
    if _native().camel_command_buffer_time(cb_id, ctypes.byref(start), ctypes.byref(end)) != 0:
        return None
    return start.value, end.value


def capture_begin(path: str) -> None:
    """Start a programmatic GPU capture to `path` (.gputrace; Metal only). Metal allows it
    only in a process started with MTL_CAPTURE_ENABLED=1 (CAMEL_CAPTURE=path sets that
    before the shim loads and captures the whole run)."""
    if _native().camel_capture_begin(str(path).encode()) != 0:
        raise _fail(f"cannot start a GPU capture to {path}")


def capture_end() -> None:
    """Stop the capture (waits for the captured work first)."""
    if _native().camel_capture_end() != 0:
        raise _fail("cannot end the GPU capture")


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
    if _lib.camel_buffer_sync_to_host(block.handle) != 0:
        raise _fail(f"copying a {block.capacity}-byte buffer to the host")


def _did_modify(block, offset: int, length: int) -> None:
    if _lib.camel_buffer_did_modify(block.handle, offset, length) != 0:
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
    if block.last_use == last_use_then and not _shutting_down:
        try:
            _did_modify(block, 0, block.capacity)
        except MetalError as e:  # a finaliser must not raise
            print(f"[camel.metal] {e}", file=sys.stderr)


def _upload_viewed(blocks) -> None:
    """Before a dispatch: buffers with live host views may hold host writes."""
    for block in blocks:
        if block in _viewed:
            _did_modify(block, 0, block.capacity)


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
            done = _c_completed()
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
    the storage (it stays valid memory, so nothing crashes).

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
        if _mirrors:
            _did_modify(block, offset, length)

    def sync_to_host(self) -> None:
        """Wait for the GPU work using this buffer, then make `contents` show the device's
        data (CUDA shim: a copy into the host mirror; a no-op on shared storage)."""
        block = self._live()
        if _mirrors:
            _sync_to_host(block)

    def release(self) -> None:
        block = self._block
        if block is None:
            raise MetalError(f"[Buffer] buffer of {self.nbytes} bytes released twice")
        self._block = None
        _give_back(block)

    def __del__(self):
        block = getattr(self, "_block", None)
        if block is not None and not _shutting_down:
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
            if _mirrors:
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
            if _mirrors:
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
        if not _mirrors:
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


# ---- libraries, kernels, dispatch -------------------------------------------------------


class _IncludePath:
    """CAMEL_INCLUDE_PATH with `dirs` in front, for the duration of one compile: the
    simulator's and the CUDA shim's compilers read it (the C ABI takes a source and a
    name only). Apple's runtime compiler (newLibraryWithSource:) has no include path."""

    def __init__(self, dirs, shim_compiles=True):
        self.dirs = None if dirs is None else [str(Path(d).resolve()) for d in dirs]
        self.shim_compiles = shim_compiles  # False: camel's CUDA translator, on any machine

    def __enter__(self):
        if self.dirs is None:
            return
        if self.shim_compiles and shim() == "metal":
            raise ValueError(
                "[metal] include_dirs: Metal's runtime compiler (newLibraryWithSource:) has no "
                "include path; include_dirs works on the simulator and the CUDA shim only"
            )
        for d in self.dirs:
            if not Path(d).is_dir():
                raise ValueError(f"[metal] include_dirs: {d!r} is not a directory")
        self.saved = os.environ.get("CAMEL_INCLUDE_PATH")
        os.environ["CAMEL_INCLUDE_PATH"] = os.pathsep.join(
            self.dirs + ([self.saved] if self.saved else [])
        )

    def __exit__(self, *exc):
        if self.dirs is None:
            return
        if self.saved is None:
            os.environ.pop("CAMEL_INCLUDE_PATH", None)
        else:
            os.environ["CAMEL_INCLUDE_PATH"] = self.saved


def compile(  # noqa: A001 (Metal's word)
    source: str, path: str | None = None, include_dirs: list[str] | None = None
) -> Library:
    """Compile MSL source into a Library. `path` names the source in messages; a
    quoted #include is looked for next to it first. `include_dirs` are searched for
    project headers, `#include <mlx/kernels/utils.h>` or `"..."`, as `-I` does for
    Apple's offline compiler (simulator and CUDA shim; CAMEL_INCLUDE_PATH does the same).
    Raises CompileError whose .log is the compiler log (line numbers into the source)."""
    lib = _native()
    with _IncludePath(include_dirs):
        handle = lib.camel_library_new(source.encode("utf-8"), path.encode() if path else None)
    if not handle:
        log = _error_text()
        first = log.split("\n", 1)[0]
        # Both shims open the log with their own header ("[sim] compiling x failed:",
        # "[compile] x: compilation failed:"); a second one on top would only repeat it.
        has_header = first.startswith("[") and "fail" in first
        message = log if has_header else f"[metal] compiling {path or '<source>'} failed:\n{log}"
        raise CompileError(message, log, path)
    return Library(handle, path, include_dirs)


_shader_libraries: dict[str, Library] = {}


def library(filename: str) -> Library:
    """Compile shaders/<filename> once per process (later calls return the same Library).
    An existing path (absolute or relative to the working directory) works too."""
    lib = _shader_libraries.get(filename)
    if lib is None:
        path = SHADERS_DIR / filename
        if not path.exists() and Path(filename).exists():
            path = Path(filename)
        if not path.exists():
            have = sorted(p.name for p in SHADERS_DIR.glob("*.metal"))
            raise FileNotFoundError(
                f"[metal] no shader file {filename!r} in {SHADERS_DIR}; have: {', '.join(have)}"
            )
        shown = f"shaders/{path.name}" if path.parent == SHADERS_DIR else str(path)
        lib = compile(path.read_text(), shown)
        _shader_libraries[filename] = lib
    return lib


def kernel(filename: str, name: str, constants: dict | None = None) -> Function:
    """The kernel `name` from shaders/<filename>, compiled and cached per process:
    camel.metal.kernel("ops_elementwise.metal", "add_float4"). `constants` as for
    Library.function."""
    return library(filename).function(name, constants=constants)


# Function-constant types (camel_constant_type): MSL name -> (code, struct format, bytes)
_CONSTANT_TYPES = {
    "bool": (1, "?", 1),
    "char": (2, "b", 1),
    "uchar": (3, "B", 1),
    "short": (4, "h", 2),
    "ushort": (5, "H", 2),
    "int": (6, "i", 4),
    "uint": (7, "I", 4),
    "half": (8, "e", 2),
    "float": (9, "f", 4),
}
_INT_RANGES = {"b": (-128, 127), "B": (0, 255), "h": (-32768, 32767), "H": (0, 65535)}
_INT_RANGES |= {"i": (-(2**31), 2**31 - 1), "I": (0, 2**32 - 1)}
_FLOAT_MAX = {"e": 65504.0, "f": float(np.finfo(np.float32).max)}


def _constant_type(type_name: str) -> tuple[str, int]:
    """("float", 2) for "float2"; ("int", 1) for "int"; ("", 0) for a type camel has
    no code for (the Metal shim lists it as "unsupported")."""
    if type_name in _CONSTANT_TYPES:
        return type_name, 1
    base, n = type_name[:-1], type_name[-1:]
    if base in _CONSTANT_TYPES and base != "bool" and n in ("2", "3", "4"):
        return base, int(n)
    return "", 0


def _constant_bytes(value, type_name: str, what: str) -> bytes:
    """The little-endian bytes of `value` as the function constant's type, or a
    TypeError/ValueError that names `what` (kernel and constant)."""
    base, n = _constant_type(type_name)
    _, fmt, _ = _CONSTANT_TYPES[base]
    if n == 1:
        items = [value]
    else:
        if isinstance(value, (str, bytes)) or not hasattr(value, "__len__"):
            raise TypeError(f"{what} is {type_name}: give {n} values (a tuple), got {value!r}")
        items = list(value)
        if len(items) != n:
            raise ValueError(f"{what} is {type_name}: give {n} values, got {len(items)}: {value!r}")
    out = b""
    for v in items:
        is_bool = isinstance(v, (bool, np.bool_))
        if fmt == "?":
            if not is_bool:
                raise TypeError(f"{what} is bool: give True or False, got {v!r}")
            out += b"\x01" if v else b"\x00"
        elif fmt in _INT_RANGES:
            if is_bool or not isinstance(v, (int, np.integer)):
                raise TypeError(f"{what} is {type_name}: give an int, got {v!r}")
            lo, hi = _INT_RANGES[fmt]
            if not lo <= int(v) <= hi:
                raise ValueError(f"{what}: {int(v)} is out of range for {base} ({lo} .. {hi})")
            out += struct.pack("<" + fmt, int(v))
        else:
            if is_bool or not isinstance(v, (int, float, np.integer, np.floating)):
                raise TypeError(f"{what} is {type_name}: give a number, got {v!r}")
            x = float(v)
            if math.isfinite(x) and abs(x) > _FLOAT_MAX[fmt]:
                raise ValueError(
                    f"{what}: {x!r} is out of range for {base} (largest finite {_FLOAT_MAX[fmt]:g})"
                )
            out += struct.pack("<" + fmt, x)
    return out


class Library:
    """A compiled MSL library. .path, .function_names, .function_constants
    ({name: (index, MSL type)} of its [[function_constant(i)]] declarations),
    .function(name, constants=...)."""

    def __init__(self, handle: int, path: str | None, include_dirs=None):
        self._handle = handle
        self.path = path
        self._include_dirs = include_dirs  # again for a specialisation (simulator, CUDA)
        self._functions: dict = {}
        self.function_names = self._names()
        self.function_constants = self._constants()

    def _names(self) -> list[str]:
        lib = _native()
        need = lib.camel_library_function_names(self._handle, None, 0)
        out = ctypes.create_string_buffer(need + 1)
        lib.camel_library_function_names(self._handle, out, need + 1)
        return [n for n in out.value.decode().split("\n") if n]

    def _constants(self) -> dict[str, tuple[int, str]]:
        lib = _native()
        need = lib.camel_library_function_constants(self._handle, None, 0)
        out = ctypes.create_string_buffer(need + 1)
        lib.camel_library_function_constants(self._handle, out, need + 1)
        found = {}
        for line in out.value.decode().split("\n"):
            if line:
                index, type_name, name = line.split(" ", 2)
                found[name] = (int(index), type_name)
        return found

    def _constant_values(self, kernel_name: str, constants) -> tuple:
        """((index, code, components, bytes), ...) sorted by index, from a dict keyed by
        constant name or index; errors name the kernel and the constant."""
        if not isinstance(constants, dict):
            raise TypeError(
                f"[{kernel_name}] constants= must be a dict {{name or index: value}}, "
                f"got {type(constants).__name__}"
            )
        by_index = {index: (name, t) for name, (index, t) in self.function_constants.items()}
        declared = (
            ", ".join(f"{n} (index {i}, {t})" for n, (i, t) in self.function_constants.items())
            or "none"
        )
        where = self.path or "this library"
        values = {}
        for key, value in constants.items():
            if isinstance(key, str):
                if key not in self.function_constants:
                    raise ValueError(
                        f"[{kernel_name}] no function constant named {key!r} in {where}; "
                        f"it declares: {declared}"
                    )
                name, (index, type_name) = key, self.function_constants[key]
            elif isinstance(key, (int, np.integer)) and not isinstance(key, bool):
                if int(key) not in by_index:
                    raise ValueError(
                        f"[{kernel_name}] no function constant with index {int(key)} in {where}; "
                        f"it declares: {declared}"
                    )
                index = int(key)
                name, type_name = by_index[index]
            else:
                raise TypeError(
                    f"[{kernel_name}] a function constant is named by a str or an int index, "
                    f"got {key!r}"
                )
            if index in values:
                raise ValueError(
                    f"[{kernel_name}] function constant {name!r} (index {index}) is given twice "
                    f"(by name and by index)"
                )
            what = f"[{kernel_name}] function constant {name!r} (index {index})"
            base, n = _constant_type(type_name)
            if not base:
                raise TypeError(
                    f"{what} has type {type_name}; camel sets bool, char, uchar, short, ushort, "
                    f"int, uint, half, float and their 2-4 vectors"
                )
            data = _constant_bytes(value, type_name, what)
            values[index] = (index, _CONSTANT_TYPES[base][0], n, data)
        return tuple(sorted(values.values()))

    def function(self, name: str, constants: dict | None = None) -> Function:
        """The kernel `name` with its pipeline built (cached per library and values).
        constants={name or index: value} sets its function constants
        (`constant T name [[function_constant(index)]];`), as MTLFunctionConstantValues
        does; a constant left out is undefined (is_function_constant_defined is false)."""
        values = () if not constants else self._constant_values(name, constants)
        fn = self._functions.get((name, values))
        if fn is None:
            if name not in self.function_names:
                where = self.path or "this library"
                raise MetalError(
                    f"[metal] no kernel named {name!r} in {where}; available kernels: "
                    + (", ".join(self.function_names) or "(none)")
                )
            fn = Function(self, name, values)
            self._functions[(name, values)] = fn
        return fn

    def __getitem__(self, name: str) -> Function:
        return self.function(name)

    def __del__(self):
        if getattr(self, "_handle", None) and not _shutting_down and _lib is not None:
            _lib.camel_library_release(self._handle)
            self._handle = None

    def __repr__(self) -> str:
        return f"Library({self.path or '<source>'}: {', '.join(self.function_names)})"


_pack_f32 = struct.Struct("<f").pack
_pack_i32 = struct.Struct("<i").pack
_pack_u32 = struct.Struct("<I").pack
_pack_f32_into = struct.Struct("<f").pack_into
_pack_u32_into = struct.Struct("<I").pack_into
# camel_arg as bytes: buffer handle, offset, bytes pointer, length (4 x 64 bits)
_pack_arg = struct.Struct("<QQQQ").pack_into
_ARG_SIZE = ctypes.sizeof(_Arg)
# camel_dispatch_desc from nthreadgroup_memory on: ntg, grid[3], tpg[3], grid_is_threads
_pack_desc_tail = struct.Struct("<IIIIIIIi").pack_into
_DESC_TAIL_OFFSET = _DispatchDesc.nthreadgroup_memory.offset
_DESC_NARGS_OFFSET = _DispatchDesc.nargs.offset
assert _ARG_SIZE == 32 and _DispatchDesc.grid_is_threads.offset == _DESC_TAIL_OFFSET + 28
_profilers: list = []  # active camel.profile() objects (camel/profiler.py appends here)


_U32_MAX = 0xFFFFFFFF


def _dim3(value, what: str, kernel_name: str) -> tuple[int, int, int]:
    """(x, y, z) from an int or a tuple of 1-3 ints, each in 1 .. 2**32 - 1.
    The slow path: Function.__call__ handles the common spellings itself."""
    items = (value,) if isinstance(value, (int, np.integer)) else value
    try:
        dims = tuple(operator.index(v) for v in items)
    except TypeError:
        raise TypeError(
            f"[{kernel_name}] {what} must be an int or a tuple of 1-3 ints, got {value!r}"
        ) from None
    if not 1 <= len(dims) <= 3:
        raise TypeError(f"[{kernel_name}] {what} must have 1-3 entries, got {value!r}")
    dims += (1,) * (3 - len(dims))
    if all(0 < d <= _U32_MAX for d in dims):
        return dims
    raise ValueError(f"[{kernel_name}] {what} must be >= 1 in every dimension, got {value!r}")


class Function:
    """A kernel ready to dispatch (a compute pipeline).

    Attributes: name, max_total_threads_per_threadgroup, thread_execution_width,
    static_threadgroup_memory.

    fn(*args, threadgroups=(gx, gy, gz) | threads=(nx, ny, nz),
       threads_per_threadgroup=(tx, ty, tz), threadgroup_memory=[nbytes, ...])

    Positional argument i binds [[buffer(i)]]:
      DeviceArray / "mps" Tensor / Buffer   the buffer (at the array's byte offset)
      Python float (np.float64 is one)      4 bytes of float32   (setBytes)
      Python int                            4 bytes: int32 if negative, else uint32
      NumPy scalar or array <= 4095 bytes   its bytes            (setBytes)
      None                                  nothing: an index no parameter of this pipeline
                                            declares (an optional argument it leaves out)
    threadgroups= is dispatchThreadgroups; threads= is dispatchThreads (the last
    threadgroup in each dimension may be partial). An int stands for (n, 1, 1).
    threadgroup_memory[i] is the length of [[threadgroup(i)]] (rounded up to 16 bytes,
    as Metal requires). flops= and bytes= are optional counts for camel.profile().

    Each Function reuses one preallocated descriptor: dispatch from one thread.
    """

    def __init__(self, library: Library, name: str, constants: tuple = ()):
        lib = _native()
        if library.function_constants:
            # a specialisation: the simulator and the CUDA shim compile it now
            array = (_ConstantValue * max(1, len(constants)))()
            for slot, (index, code, components, data) in zip(array, constants, strict=False):
                slot.index, slot.type, slot.components = index, code, components
                ctypes.memmove(slot.bytes, data, len(data))
            with _IncludePath(library._include_dirs):
                handle = lib.camel_pipeline_new_with_constants(
                    library._handle, name.encode(), array, len(constants)
                )
        else:
            handle = lib.camel_pipeline_new(library._handle, name.encode())
        if not handle:
            raise _fail(f"cannot build a pipeline for kernel {name!r} in {library.path}")
        info = _PipelineInfo()
        if lib.camel_pipeline_info_get(handle, ctypes.byref(info)) != 0:
            lib.camel_pipeline_release(handle)
            raise _fail(f"camel_pipeline_info_get for kernel {name!r}")
        self.library = library  # keeps the library alive as long as its pipeline
        self.name = name
        self._handle = handle
        self.max_total_threads_per_threadgroup = info.max_total_threads_per_threadgroup
        self.thread_execution_width = info.thread_execution_width
        self.static_threadgroup_memory = info.static_threadgroup_memory

        # Preallocated once: a dispatch fills these in place and makes ONE native call.
        # We write the C structs' bytes with struct.pack_into (one call per argument)
        # rather than ctypes attribute by attribute: four times fewer Python steps.
        self._args = (_Arg * MAX_BUFFER_ARGS)()
        self._scalars = (ctypes.c_uint64 * MAX_BUFFER_ARGS)()  # 8 bytes per slot for setBytes
        self._scalars_addr = ctypes.addressof(self._scalars)
        self._tg_lengths = (ctypes.c_uint32 * MAX_THREADGROUP_ARGS)()
        desc = _DispatchDesc()
        desc.pipeline = handle
        desc.args = ctypes.cast(self._args, ctypes.POINTER(_Arg))
        desc.threadgroup_memory = ctypes.cast(self._tg_lengths, ctypes.POINTER(ctypes.c_uint32))
        self._desc = desc

    def __call__(
        self,
        *args,
        threadgroups=None,
        threads=None,
        threads_per_threadgroup=None,
        threadgroup_memory=None,
        flops=None,
        bytes=None,  # noqa: A002 (bytes moved, for the profiler's GB/s)
    ) -> None:
        name = self.name
        # The grid: exactly one of threads= / threadgroups=.
        if threads is not None:
            if threadgroups is not None:
                raise TypeError(f"[{name}] pass threads= or threadgroups=, not both")
            grid, grid_is_threads = threads, 1
        elif threadgroups is not None:
            grid, grid_is_threads = threadgroups, 0
        else:
            raise TypeError(
                f"[{name}] missing grid: pass threadgroups=(gx, gy, gz) (dispatchThreadgroups) "
                "or threads=(nx, ny, nz) (dispatchThreads)"
            )
        if threads_per_threadgroup is None:
            raise TypeError(
                f"[{name}] missing threads_per_threadgroup=(tx, ty, tz); at most "
                f"{self.max_total_threads_per_threadgroup} threads in total, "
                f"a multiple of {self.thread_execution_width} is best"
            )
        # (x, y, z) triples; the common spellings skip the helper (struct.pack_into below
        # rejects negative, too large or non-integer entries; _dim3 then explains).
        if type(grid) is int and grid > 0:
            grid3 = (grid, 1, 1)
        elif type(grid) is tuple and len(grid) == 3 and 0 not in grid:
            grid3 = grid
        else:
            grid3 = _dim3(grid, "grid", name)
        tpg3 = threads_per_threadgroup
        if type(tpg3) is int and tpg3 > 0:
            tpg3 = (tpg3, 1, 1)
        elif not (type(tpg3) is tuple and len(tpg3) == 3 and 0 not in tpg3):
            tpg3 = _dim3(tpg3, "threads_per_threadgroup", name)

        ntg = 0
        if threadgroup_memory:
            ntg = len(threadgroup_memory)
            if ntg > MAX_THREADGROUP_ARGS:
                raise ValueError(f"[{name}] at most {MAX_THREADGROUP_ARGS} threadgroup buffers")
            lengths = self._tg_lengths
            for i, n in enumerate(threadgroup_memory):
                n = int(n)
                if n < 0:
                    raise ValueError(f"[{name}] threadgroup_memory[{i}] must be >= 0, got {n}")
                lengths[i] = (n + 15) & ~15  # Metal: a multiple of 16 bytes

        # Arguments: positional i binds [[buffer(i)]].
        nargs = len(args)
        if nargs > MAX_BUFFER_ARGS:
            raise TypeError(f"[{name}] {nargs} arguments; Metal binds at most {MAX_BUFFER_ARGS}")
        mem = self._args
        used = []  # blocks this dispatch touches, to record their last use
        keep = None  # setBytes data larger than 8 bytes, alive until the shim copied it
        for i, a in enumerate(args):
            t = type(a)
            if t is DeviceArray:  # the common case first
                block = a.buffer._block
                if block is None:
                    raise MetalError(
                        f"[{name}] argument {i}: use of a released buffer ({a.buffer.nbytes} bytes)"
                    )
                _pack_arg(mem, i * _ARG_SIZE, block.handle, a.offset, 0, 0)
                used.append(block)
            elif t is float:  # 4 bytes of float32 in this slot's scalar space
                _pack_f32_into(self._scalars, i * 8, a)
                _pack_arg(mem, i * _ARG_SIZE, 0, 0, self._scalars_addr + i * 8, 4)
            elif t is int and 0 <= a <= _U32_MAX:  # 4 bytes of uint32
                _pack_u32_into(self._scalars, i * 8, a)
                _pack_arg(mem, i * _ARG_SIZE, 0, 0, self._scalars_addr + i * 8, 4)
            else:
                keep = self._bind_other(i, a, used, keep)
        try:
            _pack_desc_tail(self._desc, _DESC_TAIL_OFFSET, ntg, *grid3, *tpg3, grid_is_threads)
        except struct.error:
            _dim3(grid3, "grid", name)  # raises the error that explains the bad entry
            _dim3(tpg3, "threads_per_threadgroup", name)
            raise
        _pack_u32_into(self._desc, _DESC_NARGS_OFFSET, nargs)

        if _viewed:  # CUDA shim with live host views: they may hold host writes
            _upload_viewed(used)
        cb = _c_dispatch(self._desc)  # the one native call
        if not cb:
            raise self._dispatch_error(grid3, tpg3, threadgroup_memory, nargs, grid_is_threads)
        for block in used:
            block.last_use = cb
        if _profilers:
            _c_commit()  # each profiled dispatch gets its own command buffer, so its own time
            for p in _profilers:
                p._add(name, grid3, tpg3, grid_is_threads == 1, cb, flops, bytes)

    def _bind_other(self, i: int, a, used: list, keep: list | None) -> list | None:
        """Bind everything that is neither a DeviceArray nor a float (the less common kinds)."""
        offset_in_args = i * _ARG_SIZE
        if a is None:  # binds nothing: an index the pipeline does not declare (an optional
            _pack_arg(self._args, offset_in_args, 0, 0, 0, 0)  # argument left out, a gap)
            return keep
        # A camel Tensor keeps its storage in .storage: a DeviceArray on "mps".
        data = getattr(a, "storage", None)
        if data is None:
            data = getattr(a, "_data", None)
        if isinstance(data, DeviceArray):  # an "mps" camel Tensor
            a = data
        elif data is not None and getattr(a, "device", None) is not None:
            raise TypeError(
                f"[{self.name}] argument {i} is a Tensor on {a.device!r}; kernels only read "
                "'mps' tensors (no silent copies): call .to('mps') first"
            )
        if isinstance(a, DeviceArray):
            buffer, offset = a.buffer, a.offset
        elif isinstance(a, Buffer):
            buffer, offset = a, 0
        else:
            buffer = None
        if buffer is not None:
            block = buffer._block
            if block is None:
                raise MetalError(
                    f"[{self.name}] argument {i}: use of a released buffer ({buffer.nbytes} bytes)"
                )
            _pack_arg(self._args, offset_in_args, block.handle, offset, 0, 0)
            used.append(block)
            return keep

        if isinstance(a, float):  # float subclasses, np.float64 included: float32
            raw = _pack_f32(a)
        elif isinstance(a, int):  # bool too: 0 or 1
            if -(2**31) <= a < 0:
                raw = _pack_i32(a)
            elif 0 <= a <= _U32_MAX:
                raw = _pack_u32(a)
            else:
                raise OverflowError(
                    f"[{self.name}] argument {i} = {a} does not fit in 32 bits; pass "
                    "np.int64(...) for a `long` parameter"
                )
        elif isinstance(a, (np.generic, np.ndarray)):
            if a.dtype == np.float64:
                raise TypeError(
                    f"[{self.name}] argument {i} is float64, which MSL does not have: "
                    "convert it with np.float32(...) / .astype(np.float32)"
                )
            if a.dtype == object or a.nbytes > MAX_SET_BYTES or a.nbytes == 0:
                raise TypeError(
                    f"[{self.name}] argument {i}: a {a.dtype} array of {a.nbytes} bytes cannot "
                    f"be bound as bytes (1..{MAX_SET_BYTES}); put it in a DeviceArray"
                )
            raw = a.tobytes()
        else:
            raise TypeError(
                f"[{self.name}] argument {i} ({type(a).__name__}) cannot bind [[buffer({i})]]: "
                "pass a DeviceArray or 'mps' Tensor, a float, an int, or a NumPy scalar or "
                f"array of at most {MAX_SET_BYTES} bytes"
            )
        if len(raw) <= 8:  # scalars live in this slot's 8 bytes of self._scalars
            ctypes.memmove(self._scalars_addr + i * 8, raw, len(raw))
            address = self._scalars_addr + i * 8
        else:  # a small array: a temporary the shim copies during the dispatch call
            copy = ctypes.create_string_buffer(raw, len(raw))
            keep = (keep or []) + [copy]
            address = ctypes.addressof(copy)
        _pack_arg(self._args, offset_in_args, 0, 0, address, len(raw))
        return keep

    def _dispatch_error(self, grid3, tpg3, threadgroup_memory, nargs, is_threads) -> DispatchError:
        """The shim's message plus what was asked and the limits that apply."""
        kind = "threads" if is_threads else "threadgroups"
        total = tpg3[0] * tpg3[1] * tpg3[2]
        tg = [(int(n) + 15) & ~15 for n in (threadgroup_memory or [])]
        try:
            device_limit = device_info()["max_threadgroup_memory"]
        except MetalError:
            device_limit = "?"
        return DispatchError(
            f"[metal] dispatch of kernel {self.name!r} failed: {_error_text()}\n"
            f"  requested: {kind}={grid3}, threads_per_threadgroup={tpg3} = {total} threads "
            f"(limit {self.max_total_threads_per_threadgroup}), {nargs} arguments, "
            f"threadgroup memory {tg} + static {self.static_threadgroup_memory} = "
            f"{sum(tg) + self.static_threadgroup_memory} bytes (limit {device_limit})"
        )

    def __del__(self):
        if getattr(self, "_handle", None) and not _shutting_down and _lib is not None:
            _lib.camel_pipeline_release(self._handle)
            self._handle = None

    def __repr__(self) -> str:
        return (
            f"Function({self.name!r}, max_total_threads_per_threadgroup="
            f"{self.max_total_threads_per_threadgroup}, thread_execution_width="
            f"{self.thread_execution_width}, static_threadgroup_memory="
            f"{self.static_threadgroup_memory})"
        )


def mps_matmul(a: DeviceArray, b: DeviceArray, c: DeviceArray) -> None:
    """c = a @ b in FP32 through the vendor GEMM the benchmark ladder compares against:
    MPSMatrixMultiplication on Metal, cuBLAS SGEMM (TF32 off) on the CUDA shim; the
    simulator has none. a (M, K), b (K, N), c (M, N), float32, offset 0."""
    for name, x in (("a", a), ("b", b), ("c", c)):
        if x.ndim != 2 or x.dtype != np.float32 or x.offset != 0:
            raise ValueError(
                f"[mps_matmul] {name} must be a 2-D float32 DeviceArray at offset 0, "
                f"got shape {x.shape} {x.dtype.name} offset {x.offset}"
            )
    (m, k), (k2, n) = a.shape, b.shape
    if k != k2 or c.shape != (m, n):
        raise ValueError(f"[mps_matmul] shapes {a.shape} @ {b.shape} -> {c.shape} do not align")
    blocks = [x.buffer._live() for x in (a, b, c)]
    if _viewed:
        _upload_viewed(blocks)
    cb = _native().camel_mps_matmul(blocks[0].handle, blocks[1].handle, blocks[2].handle, m, n, k)
    if not cb:
        raise _fail("the vendor matmul (MPS on Metal, cuBLAS on the CUDA shim)")
    for block in blocks:
        block.last_use = cb
    if _profilers:  # recorded like a dispatch; its "grid" is (M, N, K)
        _c_commit()
        for p in _profilers:
            p._add(
                "mps_matmul",
                (m, n, k),
                (0, 0, 0),
                False,
                cb,
                2.0 * m * n * k,
                4 * (m * k + k * n + m * n),
            )


def mpsgraph_attention(
    q: DeviceArray, k: DeviceArray, v: DeviceArray, out: DeviceArray, scale: float, causal=False
) -> None:
    """out = softmax(q @ kᵀ * scale + mask) @ v through MPSGraph's fused scaled-dot-product
    attention (Metal on macOS 15+ only): the vendor attention the flash ladder compares
    against. q, k, v, out: float32 DeviceArrays of one shape (..., T, D), e.g. (B, H, T, D),
    at offset 0; the leading dimensions are the batch of heads. causal masks key j > query i.
    Elsewhere (the simulator, older macOS) it raises MetalError saying why."""
    for name, x in (("q", q), ("k", k), ("v", v), ("out", out)):
        if not isinstance(x, DeviceArray):
            raise TypeError(
                f"[mpsgraph_attention] {name} must be a DeviceArray, got {type(x).__name__}"
            )
        if x.ndim < 2 or x.dtype != np.float32 or x.offset != 0:
            raise ValueError(
                f"[mpsgraph_attention] {name} must be a float32 DeviceArray of shape (..., T, D) "
                f"at offset 0, got shape {x.shape} {x.dtype.name} offset {x.offset}"
            )
    if not q.shape == k.shape == v.shape == out.shape:
        raise ValueError(
            f"[mpsgraph_attention] q, k, v and out must have one shape (..., T, D), got "
            f"{q.shape}, {k.shape}, {v.shape} and {out.shape}"
        )
    *heads, t, d = q.shape
    bh = int(np.prod(heads, dtype=np.int64)) if heads else 1
    if bh == 0 or t == 0 or d == 0:
        raise ValueError(f"[mpsgraph_attention] empty shape {q.shape}: every size must be > 0")
    if max(bh, t, d) > _U32_MAX:
        raise ValueError(f"[mpsgraph_attention] shape {q.shape} does not fit 32-bit sizes")
    scale = float(scale)
    if not np.isfinite(scale):
        raise ValueError(f"[mpsgraph_attention] scale must be finite, got {scale}")
    blocks = [x.buffer._live() for x in (q, k, v, out)]
    handles = [b.handle for b in blocks]
    if _viewed:
        _upload_viewed(blocks)
    cb = _native().camel_mpsgraph_attention(*handles, bh, t, d, scale, int(bool(causal)))
    if not cb:
        raise _fail(f"MPSGraph attention of shape {q.shape} (causal={bool(causal)})")
    for block in blocks:
        block.last_use = cb
    if _profilers:  # recorded like a dispatch; its "grid" is (B*H, T, D)
        _c_commit()
        keys = t * t / 2 if causal else t * t  # score entries, roughly
        for p in _profilers:
            p._add(
                "mpsgraph_attention",
                (bh, t, d),
                (0, 0, 0),
                False,
                cb,
                4.0 * bh * keys * d,
                4 * 4 * bh * t * d,
            )


# ---- MSL -> CUDA, to read (the CUDA shim's translator, shim/cuda/) ----------------
_cuda_translator: ctypes.CDLL | None = None


def _cuda_translator_lib() -> ctypes.CDLL:
    """shim/build/libcamel_cuda.so (built with `make -C shim cuda` if missing)."""
    global _cuda_translator
    if _cuda_translator is None:
        path = _REPO_DIR / "shim" / "build" / "libcamel_cuda.so"
        if not path.exists():
            proc = subprocess.run(
                ["make", "-C", str(_REPO_DIR / "shim"), "cuda"], capture_output=True, text=True
            )
            if proc.returncode != 0 or not path.exists():
                tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
                raise MetalError(f"[translate] cannot build {path} (make -C shim cuda):\n{tail}")
        lib = ctypes.CDLL(str(path))
        out = ctypes.POINTER(ctypes.c_void_p)
        lib.camel_cuda_translate.argtypes = [ctypes.c_char_p, ctypes.c_char_p, out, out, out]
        lib.camel_cuda_translate.restype = ctypes.c_int
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
        lib.camel_cuda_free.restype = None
        _cuda_translator = lib
    return _cuda_translator


def _take_string(lib: ctypes.CDLL, p: ctypes.c_void_p) -> str:
    if not p.value:
        return ""
    text = ctypes.string_at(p.value).decode("utf-8", "replace")
    lib.camel_cuda_free(p)
    return text


def _cuda_call(name: str, source: str, path: str | None, *extra: int) -> tuple[str, str]:
    lib = _cuda_translator_lib()
    result, kernels, log = ctypes.c_void_p(), ctypes.c_void_p(), ctypes.c_void_p()
    rc = getattr(lib, name)(
        source.encode(),
        (path or "program_source").encode(),
        *extra,
        ctypes.byref(result),
        ctypes.byref(kernels),
        ctypes.byref(log),
    )
    text, desc, message = (_take_string(lib, p) for p in (result, kernels, log))
    if rc != 0:
        message = message.strip() or f"[translate] {name} failed with no message"
        raise CompileError(message, message, path)
    return text, desc


def translate(
    source: str,
    target: str = "cuda",
    path: str | None = None,
    include_dirs: list[str] | None = None,
) -> str:
    """The CUDA that the CUDA shim compiles an MSL source to, to read.

    Args:
        source: MSL, as in shaders/*.metal.
        target: "cuda" (the only one).
        path: the name used in messages and #line markers (default "program_source").
        include_dirs: directories searched for project headers, as for compile().

    Returns the complete, self-contained translation unit: the MSL library for
    CUDA, the kernels as rewritten, and one `extern "C" __global__
    camel_<kernel name>(camel_cuda_args)` wrapper per kernel. It compiles on its own:
        clang++-19 -x cuda --cuda-device-only --cuda-gpu-arch=sm_90 -nocudainc -nocudalib -O3 -S
    (camel adds -mllvm -unroll-threshold=5000 -mllvm -inline-threshold=5000; the header of
    the translation says why). CAMEL_CUDA_MATRIX=fp32 at translation time selects exact FP32
    simdgroup_matrix multiplies instead of the tensor cores (docs/cuda.md).
    """
    if target != "cuda":
        raise ValueError(f"[translate] unknown target {target!r}; the only one is 'cuda'")
    with _IncludePath(include_dirs, shim_compiles=False):
        return _cuda_call("camel_cuda_translate", source, path)[0]
