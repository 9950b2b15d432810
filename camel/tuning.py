"""Tuning state: the cache of the autotuners' winners, and the GPU timer they use.

    lookup(m, n, k) / store(m, n, k, version)   the GEMM winner for this device and shape class
    flash_lookup(d, t, causal) / flash_store    flash attention's v6 tile shape
    cache_dir()                                 where every tuning cache lives
    time_ms(run, reps)                          milliseconds per call of run(), GPU-timed

Winners are cached per device name and shape class in a JSON file,
$CAMEL_CACHE_DIR or $XDG_CACHE_HOME/camel or ~/.cache/camel, file matmul_autotune.json:

    {"Apple M1 Max": {"1024x1024x1024": "11", ...}}

A shape class rounds each of M, N, K up to a power of two (16 ... 4096), so one tuning run
covers the shapes near it. camel.gemm.choose_version() looks the class up here. Flash
attention's v6 tile shapes sit beside it in flash_autotune.json, keyed
"<device>|d<D>|t<T class>|causal" (or "full"); camel/flash.py's "flash" rung reads them.

This module imports only camel.metal and camel.config. The tuners, which time the
candidates and write the winners here, are in camel/bench/tuner.py
(`python -m camel.bench matmul --tune`, `... attention --tune`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from camel import config

CACHE_NAME = "matmul_autotune.json"

_cache: dict | None = None  # the file's contents, loaded once per process
generation = 0  # counts the changes to the winners this process sees (gemm caches by it)
_device: str | None = None


def cache_dir() -> Path:
    """$CAMEL_CACHE_DIR, else $XDG_CACHE_HOME/camel, else ~/.cache/camel (camel/config.py)."""
    return config.cache_dir()


def cache_path() -> Path:
    return cache_dir() / CACHE_NAME


def bucket(x: int) -> int:
    """x rounded up to a power of two in 16 ... 4096."""
    b = 16
    while b < x and b < 4096:
        b *= 2
    return b


def shape_class(m: int, n: int, k: int) -> str:
    """'256x256x64': M, N, K each rounded up to a power of two in 16 ... 4096."""
    return f"{bucket(m)}x{bucket(n)}x{bucket(k)}"


def _read(path: Path) -> dict:
    """A cache file's contents; {} when it is missing, unreadable or not a JSON object."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write(path: Path, data: dict) -> None:
    """Write a cache file whole: to a temporary name, then renamed over the old one, so a
    reader in another process never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    tmp.replace(path)


def _load() -> dict:
    global _cache
    if _cache is None:
        _cache = _read(cache_path())
    return _cache


def _device_name() -> str:
    global _device
    if _device is None:
        from camel import metal

        _device = metal.device_name()
    return _device


def reset() -> None:
    """Forget the in-memory copy (tests point CAMEL_CACHE_DIR elsewhere, then call this)."""
    global _cache, _device, generation
    _cache, _device = None, None
    generation += 1


def lookup(m: int, n: int, k: int) -> str | None:
    """The tuned version for this device and shape class, or None."""
    return _load().get(_device_name(), {}).get(shape_class(m, n, k))


def store(m: int, n: int, k: int, version: str) -> None:
    """Record a winner and write the cache file."""
    global generation
    cache = _load()
    cache.setdefault(_device_name(), {})[shape_class(m, n, k)] = str(version)
    generation += 1
    _write(cache_path(), cache)


# ---- flash attention: v6's tile shape per device, head dim, T class and mask -------------

FLASH_CACHE_NAME = "flash_autotune.json"

_flash_cache: dict | None = None  # the file's contents, loaded once per process


def flash_path() -> Path:
    return cache_dir() / FLASH_CACHE_NAME


def _flash_key(d: int, t: int, causal: bool) -> str:
    from camel import metal

    mask = "causal" if causal else "full"
    return f"{metal.device_name()}|d{d}|t{bucket(max(t, 1))}|{mask}"


def flash_lookup(d: int, t: int, causal: bool) -> str | None:
    """The tuned v6 rung name for head dim d, T's class and the mask, or None."""
    global _flash_cache
    if _flash_cache is None:
        _flash_cache = _read(flash_path())
    return _flash_cache.get(_flash_key(d, t, causal))


def flash_store(d: int, t: int, causal: bool, name: str, save: bool = True) -> None:
    """Record a v6 winner for this process; with save, write the cache file too."""
    flash_lookup(d, t, causal)  # loads the file once
    _flash_cache[_flash_key(d, t, causal)] = name
    if save:
        _write(flash_path(), _flash_cache)


# ---- the timer ----------------------------------------------------------------------------


def time_ms(run, reps: int = 10, warmup: int = 2) -> float:
    """Milliseconds per call of run() (which encodes GPU work), after warm-up.

    The reps are encoded back to back and timed from the start of their first command
    buffer to the end of their last: GPU timestamps on a Mac, CUDA events on the CUDA shim
    (which may commit early, so the reps can span several command buffers), wall time on
    the simulator (see camel_command_buffer_time)."""
    from camel import metal

    def timed(n: int) -> float:  # seconds for n calls, first command buffer to last
        metal.synchronize()
        first = metal.completed_id() + 1  # ids count up by one per command buffer
        t0 = time.perf_counter()
        for _ in range(n):
            run()
        last = metal.commit() or metal.completed_id()
        metal.synchronize()
        wall = time.perf_counter() - t0
        start = metal.command_buffer_time(first) if last >= first else None
        end = metal.command_buffer_time(last) if start else None
        return (end[1] - start[0]) if end and end[1] > start[0] else wall

    one = max(timed(1) for _ in range(max(1, warmup)))  # warm-up, one call per command buffer
    # Keep each command buffer well under the GPU watchdog (a naive rung at 4096^3 takes
    # seconds) and within the 256 dispatches a command buffer holds.
    reps = max(1, min(reps, 200, int(0.5 / max(one, 1e-9))))
    return 1000.0 * timed(reps) / reps
