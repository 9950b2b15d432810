"""camel.metal.translation — MSL to CUDA, to read: `translate()` returns the CUDA that the
CUDA shim compiles a .metal source to, through the CUDA shim's translator (shim/cuda/,
libcamel_cuda.so, built with `make -C shim cuda` when missing). `_cuda_call` also reaches
camel_cuda_compile (the PTX), which the tests use. Needs no GPU.
"""

from __future__ import annotations

import ctypes
import subprocess

from camel.metal.abi import CompileError, MetalError
from camel.metal.kernels import _IncludePath
from camel.metal.loading import _REPO_DIR

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
