"""camel.metal.abi — the C ABI of shim/camel_shim.h as Python sees it: its limits, the
ctypes structs that mirror its structs field by field, the argtypes/restype of every
function (`_declare`), the byte layouts the dispatch packs, and the errors.

This is the ONE place that declares ctypes argtypes/restype (a missing restype silently
truncates a 64-bit pointer to 32 bits). Imports nothing from camel.
"""

from __future__ import annotations

import ctypes
import struct

ABI_VERSION = 3  # must equal CAMEL_SHIM_ABI_VERSION in shim/camel_shim.h
MAX_BUFFER_ARGS = 31  # Metal's limit on [[buffer(i)]] slots
MAX_THREADGROUP_ARGS = 31  # [[threadgroup(i)]] slots we preallocate
MAX_SET_BYTES = 4095  # setBytes takes "smaller than 4 KB" (Apple); larger constants: a buffer


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


def _declare(lib: ctypes.CDLL, rebuild: str) -> None:
    """Every argtypes/restype of the ABI, in header order. Handles are c_void_p (Python int).
    `rebuild` is the command that rebuilds the shim, for the message of a missing function."""
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
                f"rebuild it: {rebuild}"
            ) from None
        fn.argtypes = argtypes
        fn.restype = restype


# ---- the dispatch's byte layouts --------------------------------------------------------
#
# A dispatch writes the C structs' bytes with struct.pack_into (one call per argument and
# one for the descriptor) rather than ctypes attribute by attribute: four times fewer
# Python steps. These formats must match the structs above; the asserts check the offsets.

# camel_arg as bytes: buffer handle, offset, bytes pointer, length (4 x 64 bits)
_pack_arg = struct.Struct("<QQQQ").pack_into
_ARG_SIZE = ctypes.sizeof(_Arg)
# camel_dispatch_desc from nargs on: nargs, (padding), threadgroup_memory pointer,
# nthreadgroup_memory, grid[3], threads_per_threadgroup[3], grid_is_threads
_pack_desc = struct.Struct("<I4xQIIIIIIIi").pack_into
_DESC_OFFSET = _DispatchDesc.nargs.offset
assert _ARG_SIZE == 32 and _DESC_OFFSET + 8 == _DispatchDesc.threadgroup_memory.offset
assert _DispatchDesc.grid_is_threads.offset == _DESC_OFFSET + 44
assert ctypes.sizeof(_DispatchDesc) == _DESC_OFFSET + 48
