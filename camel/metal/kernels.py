"""camel.metal.kernels — from MSL source to a dispatch: compiling (`compile`, with
include_dirs through `_IncludePath`), the per-process shader cache (`library`, `kernel`),
function constants, `Library`, and `Function`, whose call is one dispatch:

    lib = camel.metal.compile(source)              # CompileError carries the log
    fn = lib.function("saxpy")                     # fn.max_total_threads_per_threadgroup, ...
    fn(x, y, 2.0, n, threads=n, threads_per_threadgroup=256)
    camel.metal.synchronize()

A dispatch reads as the steps of Metal's compute encoder (Function.__call__): the grid
(dispatchThreads / dispatchThreadgroups sizes), the threadgroup memory lengths
(setThreadgroupMemoryLength), the arguments (setBuffer / setBytes), then the descriptor
is packed and submitted in ONE native call (camel_dispatch).
"""

from __future__ import annotations

import ctypes
import math
import operator
import os
import struct
from pathlib import Path

import numpy as np

from camel import config
from camel.metal import loading
from camel.metal.abi import (
    _ARG_SIZE,
    _DESC_OFFSET,
    MAX_BUFFER_ARGS,
    MAX_SET_BYTES,
    MAX_THREADGROUP_ARGS,
    CompileError,
    DispatchError,
    MetalError,
    _Arg,
    _ConstantValue,
    _DispatchDesc,
    _pack_arg,
    _pack_desc,
    _PipelineInfo,
)
from camel.metal.buffers import Buffer, DeviceArray, _upload_viewed, _viewed
from camel.metal.loading import SHADERS_DIR, _error_text, _fail, _native, device_info, shim


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
        self.saved = config.include_path()
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
        lib = loading._lib
        if getattr(self, "_handle", None) and not loading._shutting_down and lib is not None:
            lib.camel_library_release(self._handle)
            self._handle = None

    def __repr__(self) -> str:
        return f"Library({self.path or '<source>'}: {', '.join(self.function_names)})"


_pack_f32 = struct.Struct("<f").pack
_pack_i32 = struct.Struct("<i").pack
_pack_u32 = struct.Struct("<I").pack
_pack_f32_into = struct.Struct("<f").pack_into
_pack_u32_into = struct.Struct("<I").pack_into
_profilers: list = []  # active camel.profile() objects (camel/profiler.py appends here)


_U32_MAX = 0xFFFFFFFF


def _dim3(value, what: str, kernel_name: str) -> tuple[int, int, int]:
    """(x, y, z) from an int or a tuple of 1-3 ints, each in 1 .. 2**32 - 1.
    The slow path: Function._grid handles the common spellings itself."""
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

        # Preallocated once: a dispatch fills these in place and makes ONE native call
        # (the byte layouts: camel/metal/abi.py).
        self._args = (_Arg * MAX_BUFFER_ARGS)()
        self._scalars = (ctypes.c_uint64 * MAX_BUFFER_ARGS)()  # 8 bytes per slot for setBytes
        self._scalars_addr = ctypes.addressof(self._scalars)
        self._tg_lengths = (ctypes.c_uint32 * MAX_THREADGROUP_ARGS)()
        desc = _DispatchDesc()
        desc.pipeline = handle
        desc.args = ctypes.cast(self._args, ctypes.POINTER(_Arg))
        self._tg = ctypes.addressof(self._tg_lengths)  # desc.threadgroup_memory, packed each time
        self._desc = desc
        # the same memory as bytes: struct.pack_into writes a memoryview a little faster
        self._arg_bytes = memoryview(self._args).cast("B")
        self._scalar_bytes = memoryview(self._scalars).cast("B")
        self._desc_bytes = memoryview(desc).cast("B")
        # camel_arg i already points at slot i's 4 scalar bytes (written by an earlier
        # dispatch): a float or uint32 there then only writes its value
        self._scalar_slot = [False] * MAX_BUFFER_ARGS
        self._native_dispatch = lib.camel_dispatch

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
        """One dispatch, in the order of Metal's compute command encoder."""
        # 1. the grid and the threadgroup size (dispatchThreads / dispatchThreadgroups)
        grid3, tpg3, is_threads = self._grid(threads, threadgroups, threads_per_threadgroup)
        # 2. the length of each [[threadgroup(i)]] (setThreadgroupMemoryLength)
        ntg = self._threadgroup_memory(threadgroup_memory) if threadgroup_memory else 0
        # 3. the arguments: [[buffer(i)]] is positional argument i (setBuffer / setBytes);
        #    `keep` holds the bytes of small arrays until the native call has copied them
        used, keep = self._bind(args)
        # 4. the descriptor, then the one native call: the command buffer's id
        cb = self._submit(len(args), ntg, grid3, tpg3, is_threads, used)
        if not cb:
            raise self._dispatch_error(grid3, tpg3, threadgroup_memory, len(args), is_threads)
        del keep
        if _profilers:
            self._record(cb, grid3, tpg3, is_threads, flops, bytes)

    def _grid(self, threads, threadgroups, threads_per_threadgroup) -> tuple:
        """(grid, threads_per_threadgroup, grid_is_threads): exactly one of threads= or
        threadgroups=, each size an (x, y, z) triple."""
        if threads is not None:
            if threadgroups is not None:
                raise TypeError(f"[{self.name}] pass threads= or threadgroups=, not both")
            grid, is_threads = threads, 1
        elif threadgroups is not None:
            grid, is_threads = threadgroups, 0
        else:
            raise TypeError(
                f"[{self.name}] missing grid: pass threadgroups=(gx, gy, gz) "
                "(dispatchThreadgroups) or threads=(nx, ny, nz) (dispatchThreads)"
            )
        tpg = threads_per_threadgroup
        if tpg is None:
            raise TypeError(
                f"[{self.name}] missing threads_per_threadgroup=(tx, ty, tz); at most "
                f"{self.max_total_threads_per_threadgroup} threads in total, "
                f"a multiple of {self.thread_execution_width} is best"
            )
        # The common spellings skip the helper (struct.pack_into in _submit
        # rejects negative, too large or non-integer entries; _dim3 then explains).
        if type(grid) is int and grid > 0:
            grid = (grid, 1, 1)
        elif not (type(grid) is tuple and len(grid) == 3 and 0 not in grid):
            grid = _dim3(grid, "grid", self.name)
        if type(tpg) is int and tpg > 0:
            tpg = (tpg, 1, 1)
        elif not (type(tpg) is tuple and len(tpg) == 3 and 0 not in tpg):
            tpg = _dim3(tpg, "threads_per_threadgroup", self.name)
        return grid, tpg, is_threads

    def _threadgroup_memory(self, lengths) -> int:
        """Write the [[threadgroup(i)]] lengths, each rounded up to 16 bytes; their count."""
        ntg = len(lengths)
        if ntg > MAX_THREADGROUP_ARGS:
            raise ValueError(f"[{self.name}] at most {MAX_THREADGROUP_ARGS} threadgroup buffers")
        out = self._tg_lengths
        for i, n in enumerate(lengths):
            n = int(n)
            if n < 0:
                raise ValueError(f"[{self.name}] threadgroup_memory[{i}] must be >= 0, got {n}")
            out[i] = (n + 15) & ~15  # Metal: a multiple of 16 bytes
        return ntg

    def _bind(self, args) -> tuple[list, list | None]:
        """Fill camel_arg i for positional argument i: a buffer and its offset, or the
        address and length of bytes. Returns (the blocks bound, temporaries to keep alive).
        The common kinds first, inline (a DeviceArray, a float, a uint32); the rest in
        _bind_other."""
        if len(args) > MAX_BUFFER_ARGS:
            raise TypeError(
                f"[{self.name}] {len(args)} arguments; Metal binds at most {MAX_BUFFER_ARGS}"
            )
        mem, scalars, scalars_addr = self._arg_bytes, self._scalar_bytes, self._scalars_addr
        scalar_slot = self._scalar_slot
        used = []  # blocks this dispatch touches, to record their last use
        keep = None  # setBytes data larger than 8 bytes, alive until the shim copied it
        for i, a in enumerate(args):  # camel_arg i at i * 32 bytes, its scalar at i * 8
            t = type(a)
            if t is DeviceArray:
                block = a.buffer._block
                if block is None:
                    raise MetalError(
                        f"[{self.name}] argument {i}: use of a released buffer "
                        f"({a.buffer.nbytes} bytes)"
                    )
                _pack_arg(mem, i * 32, block.handle, a.offset, 0, 0)
                scalar_slot[i] = False
                used.append(block)
            elif t is float:  # 4 bytes of float32 in this slot's scalar space
                _pack_f32_into(scalars, i * 8, a)
                if not scalar_slot[i]:
                    _pack_arg(mem, i * 32, 0, 0, scalars_addr + i * 8, 4)
                    scalar_slot[i] = True
            elif t is int and 0 <= a <= _U32_MAX:  # 4 bytes of uint32
                _pack_u32_into(scalars, i * 8, a)
                if not scalar_slot[i]:
                    _pack_arg(mem, i * 32, 0, 0, scalars_addr + i * 8, 4)
                    scalar_slot[i] = True
            else:
                scalar_slot[i] = False
                keep = self._bind_other(i, a, used, keep)
        return used, keep

    def _submit(self, nargs: int, ntg: int, grid3, tpg3, is_threads: int, used: list) -> int:
        """Pack camel_dispatch_desc's counts and sizes (one pack: the pipeline and the args
        pointer were set once, in __init__), then encode the dispatch (camel_dispatch).
        Each bound buffer remembers the command buffer as its last use. Returns its id,
        0 if the shim refused."""
        try:
            desc = self._desc_bytes
            _pack_desc(desc, _DESC_OFFSET, nargs, self._tg, ntg, *grid3, *tpg3, is_threads)
        except struct.error:
            _dim3(grid3, "grid", self.name)  # raises the error that explains the bad entry
            _dim3(tpg3, "threads_per_threadgroup", self.name)
            raise
        if _viewed:  # CUDA shim with live host views: they may hold host writes
            _upload_viewed(used)
        cb = self._native_dispatch(self._desc)
        if cb:
            for block in used:
                block.last_use = cb
        return cb

    def _record(self, cb: int, grid3, tpg3, is_threads: int, flops, nbytes) -> None:
        """camel.profile(): each profiled dispatch gets its own command buffer, so its own
        time."""
        loading._c_commit()
        for p in _profilers:
            p._add(self.name, grid3, tpg3, is_threads == 1, cb, flops, nbytes)

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
        lib = loading._lib
        if getattr(self, "_handle", None) and not loading._shutting_down and lib is not None:
            lib.camel_pipeline_release(self._handle)
            self._handle = None

    def __repr__(self) -> str:
        return (
            f"Function({self.name!r}, max_total_threads_per_threadgroup="
            f"{self.max_total_threads_per_threadgroup}, thread_execution_width="
            f"{self.thread_execution_width}, static_threadgroup_memory="
            f"{self.static_threadgroup_memory})"
        )
