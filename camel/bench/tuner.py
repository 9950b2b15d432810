"""The autotuners: time every candidate that fits on this device, keep the fastest.

    python -m camel.bench matmul --tune      # GEMM: the benchmark sizes
    python -m camel.bench models --tune      # GEMM: the shapes of a model's step
    python -m camel.bench attention --tune   # flash attention: v6's tile shape

GEMM: `tune` times square sizes, `tune_shapes` the shapes a model records
(gemm.recording()); the winner of each shape class goes to camel/tuning.py's cache, where
camel.gemm.choose_version() finds it. Flash attention: `tune_flash` times v6's tile shapes
for one head dim, T class and mask; "flash" then runs the winner (camel/flash.py). A
candidate whose threadgroup size or threadgroup memory exceeds the device's limits is never
tried, and one that fails the NumPy check is never picked.
"""

from __future__ import annotations

import math
import time

import numpy as np

from camel import flash, gemm, metal, tuning


def check(version: str, a: np.ndarray, b: np.ndarray, **kw) -> float:
    """Max relative error of rung `version` against NumPy on a @ b (with transposes in kw)."""
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
        classes.setdefault(tuning.shape_class(*shape[:3]), []).append(shape)
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

            total += tuning.time_ms(run, reps)
        times[v] = total
    winner = min(times, key=times.get)
    m, n, k = group[0][:3]
    shapes = ", ".join(f"{s[0]}x{s[1]}x{s[2]}" + ("" if s[5] == 1 else f" x{s[5]}") for s in group)
    log(f"[autotune] {shapes} on {metal.device_name()}: version {winner} "
        f"({times[winner]:.3f} ms)")  # fmt: skip
    if save:
        tuning.store(m, n, k, winner)
    return winner, times


# ---- flash attention: v6's tile shape -----------------------------------------------------


def tune_flash(b: int, h: int, t: int, d: int, causal: bool, reps: int = 3, save: bool = True,
               log=print) -> str:  # fmt: skip
    """Time every v6 tile shape that fits on (b, h, t, d) inputs; remember the fastest
    (checked against NumPy first) for this device, head dim, T class and mask."""
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((b, h, t, d), dtype=np.float32) for _ in range(3))
    ref = flash.reference_numpy(q, k, v, causal)[0]
    qd, kd, vd = (metal.DeviceArray.from_numpy(x) for x in (q, k, v))
    best, best_ms = None, math.inf
    for rung in flash.v6_candidates(d):
        out, _ = flash.forward(qd, kd, vd, causal, rung=rung.name)
        if not np.allclose(out.numpy(), ref, atol=2e-4, rtol=2e-3):
            log(f"[flash] {rung.name} d{d} fails the NumPy check; not a candidate")
            continue
        metal.synchronize()
        start = time.perf_counter()
        for _ in range(reps):
            flash.forward(qd, kd, vd, causal, rung=rung.name)
        metal.synchronize()
        ms = (time.perf_counter() - start) * 1e3 / reps
        log(f"[flash] tune d{d} T{t} {'causal' if causal else 'full'}: {rung.name} {ms:.2f} ms")
        if ms < best_ms:
            best, best_ms = rung.name, ms
    if best is not None:
        tuning.flash_store(d, t, causal, best, save)
    return best
