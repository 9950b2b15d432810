"""Autotuner for the GEMM ladder: time every rung that fits on this device, keep the fastest.

    python -m camel.bench matmul --tune      # tunes the benchmark sizes and saves the winners

Winners are cached per device name and shape class in a JSON file,
$CAMEL_CACHE_DIR or $XDG_CACHE_HOME/camel or ~/.cache/camel, file matmul_autotune.json:

    {"Apple M1 Max": {"1024x1024x1024": "11", ...}}

A shape class rounds each of M, N, K up to a power of two (16 ... 4096), so one tuning run
covers the shapes near it. camel.gemm.choose_version() looks the class up here; a rung
whose threadgroup size or threadgroup memory exceeds the device's limits is never a
candidate, and a rung that fails the NumPy check is never picked.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

CACHE_NAME = "matmul_autotune.json"

_cache: dict | None = None  # the file's contents, loaded once per process
_device: str | None = None


def cache_dir() -> Path:
    if os.environ.get("CAMEL_CACHE_DIR"):
        return Path(os.environ["CAMEL_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "camel"


def cache_path() -> Path:
    return cache_dir() / CACHE_NAME


def _bucket(x: int) -> int:
    b = 16
    while b < x and b < 4096:
        b *= 2
    return b


def shape_class(m: int, n: int, k: int) -> str:
    """'256x256x64': M, N, K each rounded up to a power of two in 16 ... 4096."""
    return f"{_bucket(m)}x{_bucket(n)}x{_bucket(k)}"


def _load() -> dict:
    global _cache
    if _cache is None:
        try:
            _cache = json.loads(cache_path().read_text())
            if not isinstance(_cache, dict):
                _cache = {}
        except (OSError, ValueError):
            _cache = {}
    return _cache


def _device_name() -> str:
    global _device
    if _device is None:
        from camel import metal

        _device = metal.device_name()
    return _device


def reset() -> None:
    """Forget the in-memory copy (tests point CAMEL_CACHE_DIR elsewhere, then call this)."""
    global _cache, _device
    _cache, _device = None, None


def lookup(m: int, n: int, k: int) -> str | None:
    """The tuned version for this device and shape class, or None."""
    return _load().get(_device_name(), {}).get(shape_class(m, n, k))


def store(m: int, n: int, k: int, version: str) -> None:
    """Record a winner and write the cache file."""
    cache = _load()
    cache.setdefault(_device_name(), {})[shape_class(m, n, k)] = str(version)
    path = cache_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(cache, indent=1, sort_keys=True))
    tmp.replace(path)


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


def check(version: str, a: np.ndarray, b: np.ndarray, **kw) -> float:
    """Max relative error of rung `version` against NumPy on a @ b (with transposes in kw)."""
    from camel import gemm, metal

    da, db = metal.DeviceArray.from_numpy(a), metal.DeviceArray.from_numpy(b)
    got = gemm.matmul(da, db, version=version, **kw).numpy()
    x = np.swapaxes(a, -1, -2) if kw.get("transpose_a") else a
    y = np.swapaxes(b, -1, -2) if kw.get("transpose_b") else b
    want = np.matmul(x.astype(np.float64), y.astype(np.float64))
    scale = max(1.0, float(np.abs(want).max(initial=0.0)))
    return float(np.abs(got - want).max(initial=0.0)) / scale


def candidates() -> list[str]:
    """Rungs and tuning variants whose threadgroup size and memory fit this device
    (the others are skipped)."""
    from camel import gemm

    return [v for v in gemm.all_versions() if gemm.fits(gemm.get_rung(v))]


def tune(sizes, reps: int = 10, versions=None, save: bool = True, log=print) -> dict:
    """Time every candidate on square M = N = K = s for each s in sizes; save the winners.

    Returns {size: (winner, {version: ms})}. Rungs that fail the NumPy check are skipped."""
    from camel import gemm, metal

    rng = np.random.default_rng(0)
    results = {}
    pool = [gemm.get_rung(v).version for v in versions] if versions else candidates()
    for s in sizes:
        a = rng.standard_normal((s, s), dtype=np.float32)
        b = rng.standard_normal((s, s), dtype=np.float32)
        da, db = metal.DeviceArray.from_numpy(a), metal.DeviceArray.from_numpy(b)
        out = metal.DeviceArray.empty((s, s), np.float32)
        times = {}
        for v in pool:
            if check(v, a[:33, :31], b[:31, :17]) > 1e-4:
                log(f"[autotune] version {v} fails the NumPy check; skipped")
                continue

            def run(v=v, da=da, db=db, out=out):
                gemm.matmul(da, db, out=out, version=v)

            times[v] = time_ms(run, reps)
        winner = min(times, key=times.get)
        results[s] = (winner, times)
        log(f"[autotune] {s}^3 on {metal.device_name()}: version {winner} "
            f"({times[winner]:.3f} ms)")  # fmt: skip
        if save:
            store(s, s, s, winner)
    return results
