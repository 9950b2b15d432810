"""camel's configuration: the environment variables the Python side reads, in one place.

    variable                  read by             what it chooses
    CAMEL_MATMUL              gemm                the GEMM rung of every matmul ("11", "9/k4")
    CAMEL_ATTENTION           functional, flash   "naive", "flash" or one rung ("flash_v3")
    CAMEL_MEMORY_KERNELS      backend_mps         memory-bound kernels: 1 (the lessons'), 2
    CAMEL_LAYERNORM           backend_mps         the layer_norm kernel version
    CAMEL_LAYERNORM_BACKWARD  backend_mps         the layer_norm_backward kernel version
    CAMEL_PROFILE             profiler            1: profile the whole run, table at exit
    CAMEL_CACHE_DIR           tuning              where the tuners' winners are cached
    XDG_CACHE_HOME            tuning              (else $XDG_CACHE_HOME/camel, ~/.cache/camel)
    CAMEL_DATA                data                a directory of MNIST-format idx files
    CAMEL_PEAKS               bench.roofline      "<TFLOP/s>,<GB/s>": the roofline's peaks
    CAMEL_SHIM                metal.loading       "metal", "sim" or "cuda": which shim to load
    CAMEL_SHIM_LIBRARY        metal.loading       a shim library's path (a sanitizer build)
    CAMEL_CAPTURE             metal.loading       a .gputrace file: capture the run (Metal)
    CAMEL_INCLUDE_PATH        metal.kernels       the shims' include path (metal.kernels sets
                                                  it for one compile's include_dirs)

The shims read their own (CAMEL_SIM_*, docs/simulator.md; CAMEL_CUDA_*, docs/cuda.md;
CAMEL_INCLUDE_PATH too) and camel.metal sets MTL_CAPTURE_ENABLED for Metal
(docs/metal_shim.md): writes, not reads.

The per-op choices (CAMEL_MATMUL, CAMEL_ATTENTION, CAMEL_MEMORY_KERNELS, CAMEL_LAYERNORM,
CAMEL_LAYERNORM_BACKWARD) are read once, when camel is imported: an op asks for its choice
with no look at the environment (a GPU step is host-bound, and every microsecond of
Python per op shows). A program changes them with set_choices(matmul="11") for the rest
of the run, or for a block:

    with config.choices(attention="naive"):   # None: back to the default
        ...

(the tests and the benchmarks do both; read_environment() reads the variables again).
The others are read when asked, each about once a run (CAMEL_SHIM, CAMEL_SHIM_LIBRARY,
CAMEL_CAPTURE: at the shim's load). Imports nothing from camel.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

_CHOICES = {  # a per-op choice -> its variable
    "matmul": "CAMEL_MATMUL",
    "attention": "CAMEL_ATTENTION",
    "memory_kernels": "CAMEL_MEMORY_KERNELS",
    "layernorm": "CAMEL_LAYERNORM",
    "layernorm_backward": "CAMEL_LAYERNORM_BACKWARD",
}
# Worked out once, as a choice is set, not at every op that asks: matmul and attention are
# kept stripped (attention lower-cased; "" when unset); the kernel versions stay as written
# (None when unset, "" when set empty).
_NORMALISE = {
    "matmul": lambda v: (v or "").strip(),
    "attention": lambda v: (v or "").strip().lower(),
}
_choices: dict[str, str | None] = {}


def read_environment() -> None:
    """Take every per-op choice from the environment (camel does this once, at import)."""
    set_choices(**{name: os.environ.get(variable) for name, variable in _CHOICES.items()})


def set_choices(**choices) -> None:
    """Change per-op choices for the rest of the run: set_choices(matmul="11",
    attention=None); a value as its variable would hold it, None for unset."""
    unknown = sorted(set(choices) - set(_CHOICES))
    if unknown:
        raise TypeError(
            f"[config] unknown choice {', '.join(unknown)}; the choices: {', '.join(_CHOICES)}"
        )
    for name, value in choices.items():
        value = None if value is None else str(value)
        _choices[name] = _NORMALISE[name](value) if name in _NORMALISE else value


@contextmanager
def choices(**changes):
    """set_choices(**changes) for a block; every choice is as it was after it."""
    saved = dict(_choices)
    try:
        set_choices(**changes)
        yield
    finally:
        _choices.clear()
        _choices.update(saved)


def matmul() -> str:
    """CAMEL_MATMUL, stripped: a GEMM version forced for every matmul; "" when unset."""
    return _choices["matmul"]


def attention() -> str:
    """CAMEL_ATTENTION, stripped and lower-cased: "naive", "flash", a flash rung name; ""
    when unset (flash where the head dim has kernels, else naive)."""
    return _choices["attention"]


def memory_kernels() -> str | None:
    """CAMEL_MEMORY_KERNELS as written, or None when unset (backend_mps's default)."""
    return _choices["memory_kernels"]


def layernorm() -> str | None:
    """CAMEL_LAYERNORM as written, or None when unset (backend_mps picks by shape)."""
    return _choices["layernorm"]


def layernorm_backward() -> str | None:
    """CAMEL_LAYERNORM_BACKWARD as written, or None when unset (backend_mps picks)."""
    return _choices["layernorm_backward"]


def profile() -> bool:
    """CAMEL_PROFILE set to anything but "" or "0": profile the whole run."""
    return os.environ.get("CAMEL_PROFILE", "") not in ("", "0")


def cache_dir() -> Path:
    """$CAMEL_CACHE_DIR, else $XDG_CACHE_HOME/camel, else ~/.cache/camel."""
    if os.environ.get("CAMEL_CACHE_DIR"):
        return Path(os.environ["CAMEL_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "camel"


def data_dir() -> Path | None:
    """$CAMEL_DATA (with ~ expanded), or None when unset or empty."""
    given = os.environ.get("CAMEL_DATA")
    return Path(given).expanduser() if given else None


def peaks() -> str:
    """CAMEL_PEAKS, stripped: "<TFLOP/s>,<GB/s>"; "" when unset."""
    return os.environ.get("CAMEL_PEAKS", "").strip()


def shim() -> str:
    """CAMEL_SHIM, stripped and lower-cased: "metal", "sim", "cuda"; "" when unset (the
    platform's default). camel.metal.loading checks the value."""
    return os.environ.get("CAMEL_SHIM", "").strip().lower()


def shim_library() -> str | None:
    """CAMEL_SHIM_LIBRARY: the path of a shim library to load instead of shim/build/'s;
    None when unset or empty."""
    return os.environ.get("CAMEL_SHIM_LIBRARY") or None


def capture() -> str:
    """CAMEL_CAPTURE: a .gputrace path to capture the whole run to (Metal only); "" when
    unset."""
    return os.environ.get("CAMEL_CAPTURE", "")


def include_path() -> str | None:
    """CAMEL_INCLUDE_PATH as written (the shims' header search path), or None when unset."""
    return os.environ.get("CAMEL_INCLUDE_PATH")


read_environment()
