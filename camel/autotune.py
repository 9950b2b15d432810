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
    return {s: _tune_class([(s, s, s, False, False, 1)], reps, versions, save, log) for s in sizes}


def tune_shapes(shapes, reps: int = 10, versions=None, save: bool = True, log=print) -> dict:
    """Tune the shapes a model uses: shapes are (m, n, k, transpose_a, transpose_b, batches)
    as gemm.recording() collects them. The shapes of one shape class share one winner, the
    candidate with the least time summed over them. Returns {class: (winner, {version: ms})}."""
    classes: dict[str, list] = {}
    for shape in dict.fromkeys(tuple(s) for s in shapes):  # each distinct shape once, in order
        classes.setdefault(shape_class(*shape[:3]), []).append(shape)
    return {c: _tune_class(group, reps, versions, save, log) for c, group in classes.items()}


def _operands(rng, m, n, k, transpose_a, transpose_b, batches):
    """Random stored operands for one GEMM shape (batch dims only when batches > 1)."""
    lead = (batches,) if batches > 1 else ()
    a = rng.standard_normal((*lead, *((k, m) if transpose_a else (m, k))), dtype=np.float32)
    b = rng.standard_normal((*lead, *((n, k) if transpose_b else (k, n))), dtype=np.float32)
    return a, b


def _passes(version: str, flags) -> bool:
    """The version matches NumPy at an awkward size with each pair of transpose flags
    (K = 64 for a split-K version, which needs K % (4 S) == 0; else 31)."""
    rng = np.random.default_rng(1)
    k = 64 if "/k" in version else 31
    return all(
        check(version, *_operands(rng, 33, 17, k, ta, tb, 1), transpose_a=ta, transpose_b=tb)
        <= 1e-4
        for ta, tb in flags
    )


def _tune_class(group, reps, versions, save, log) -> tuple[str, dict]:
    """Winner and {version: ms} (summed over the group's shapes) for shapes of one class."""
    from camel import gemm, metal

    rng = np.random.default_rng(0)
    runs = []
    for m, n, k, ta, tb, batches in group:
        a, b = _operands(rng, m, n, k, ta, tb, batches)
        da, db = metal.DeviceArray.from_numpy(a), metal.DeviceArray.from_numpy(b)
        out = metal.DeviceArray.empty((*a.shape[:-2], m, n), np.float32)
        runs.append((da, db, ta, tb, out))
    if versions:
        pool = [str(v) for v in versions]
    else:  # the rungs, then the split-K versions every shape of the group allows
        splits = [set(gemm.split_candidates(m, n, k, bt)) for m, n, k, _, _, bt in group]
        pool = candidates() + [v for v in gemm.split_candidates(*group[0][:3], group[0][5])
                               if all(v in ok for ok in splits)]  # fmt: skip
    flags = sorted({(ta, tb) for _, _, _, ta, tb, _ in group})
    times = {}
    for v in pool:
        if not _passes(v, flags):
            log(f"[autotune] version {v} fails the NumPy check; skipped")
            continue
        total = 0.0
        for da, db, ta, tb, out in runs:

            def run(v=v, da=da, db=db, ta=ta, tb=tb, out=out):
                gemm.matmul(da, db, ta, tb, out=out, version=v)

            total += time_ms(run, reps)
        times[v] = total
    winner = min(times, key=times.get)
    m, n, k = group[0][:3]
    shapes = ", ".join(f"{s[0]}x{s[1]}x{s[2]}" + ("" if s[5] == 1 else f" x{s[5]}") for s in group)
    log(f"[autotune] {shapes} on {metal.device_name()}: version {winner} "
        f"({times[winner]:.3f} ms)")  # fmt: skip
    if save:
        store(m, n, k, winner)
    return winner, times
