"""camel.metal — the whole GPU host side: the learner's lab bench.

Python talks to the GPU through one small C ABI, shim/camel_shim.h, loaded with
ctypes. Three libraries implement it:

    shim/build/libcamel_metal.dylib   Apple GPUs through Metal (macOS; the default there)
    shim/build/libcamel_sim.so        the Metal simulator: the same .metal files on the CPU
                                      (CAMEL_SHIM=sim; the Linux default without an NVIDIA GPU)
    shim/build/libcamel_cuda.so       NVIDIA GPUs: the .metal files translated to PTX
                                      (CAMEL_SHIM=cuda; the Linux default with a driver and GPU)

CAMEL_SHIM_LIBRARY=/path/to/lib overrides the search (e.g. a sanitizer build).
CAMEL_CAPTURE=run.gputrace captures the whole run for Xcode (Metal only).

Everything above this package (tensors, the "mps" backend, examples) calls the API
re-exported here:

    lib = camel.metal.compile(source)              # CompileError carries the log
    fn = lib.function("saxpy")                     # fn.max_total_threads_per_threadgroup, ...
    fn(x, y, 2.0, n, threads=n, threads_per_threadgroup=256)
    camel.metal.synchronize()

One concern a file, each importing only those above it in this list:

    abi.py          the C ABI: limits, ctypes structs mirroring camel_shim.h, argtypes and
                    restype of every function (the ONE place), the dispatch's byte
                    layouts, the errors
    loading.py      choosing, building and loading the shim; the device, command buffers,
                    timing, capture
    buffers.py      the buffer cache, Buffer, DeviceArray, the CUDA shim's host mirrors,
                    synchronize()
    kernels.py      compile, library, kernel, function constants, Library, Function and
                    its dispatch
    vendor.py       mps_matmul, mpsgraph_attention: the vendors' kernels, for reference
    translation.py  translate(): the CUDA the CUDA shim makes of an MSL source, to read

The loaded shim's state lives in camel.metal.loading (`loading._lib`, `._mirrors`, ...)
and the test hook `poison_byte` in camel.metal.buffers. Reading camel.metal.<name> reads
it there; setting it here is an error that says where to set it (a name set on this
package would not reach the code that reads it).
"""

# ruff: noqa: F401 (a facade: every import here is a re-export)
from __future__ import annotations

import sys
import types

from camel.metal import abi, buffers, kernels, loading, translation, vendor
from camel.metal.abi import (
    ABI_VERSION,
    MAX_BUFFER_ARGS,
    MAX_SET_BYTES,
    MAX_THREADGROUP_ARGS,
    CompileError,
    DispatchError,
    MetalError,
)
from camel.metal.buffers import (
    Buffer,
    DeviceArray,
    _free,
    _size_class,
    check_later,
    empty_cache,
    memory_stats,
    reset_peak_memory_stats,
    synchronize,
)
from camel.metal.kernels import Function, Library, _profilers, compile, kernel, library
from camel.metal.loading import (
    _INSTALLED,
    SHADERS_DIR,
    _enable_capture,
    _error_text,
    _native,
    _shim_choice,
    capture_begin,
    capture_end,
    command_buffer_time,
    commit,
    completed_id,
    device_info,
    device_name,
    is_simulator,
    shim,
)
from camel.metal.translation import _cuda_call, translate
from camel.metal.vendor import mps_matmul, mpsgraph_attention

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
    "check_later",
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

# State that its own module sets: a copy here would not follow it (see the docstring).
_STATE = {"_lib": loading, "_is_sim": loading, "_shim_kind": loading, "_mirrors": loading}
_STATE["poison_byte"] = buffers


def __getattr__(name: str):
    owner = _STATE.get(name)
    if owner is None:
        raise AttributeError(f"module 'camel.metal' has no attribute {name!r}")
    return getattr(owner, name)


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value) -> None:
        owner = _STATE.get(name)
        if owner is not None:
            raise AttributeError(
                f"[metal] camel.metal.{name} is the state of {owner.__name__}: set "
                f"{owner.__name__}.{name} (a name set on camel.metal would reach no code)"
            )
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
