"""camel.profile() — time every kernel dispatch.

    with camel.profile() as prof:
        loss = model(x); loss.backward()
    print(prof.table())

While a profile is active, camel.metal commits after every dispatch, so each
dispatch runs in its own command buffer and that command buffer's start/end
time is the dispatch's time: GPU timestamps on Metal, wall time on the
simulator (the table says which). Committing per dispatch costs a little
throughput; that is the price of per-kernel times.

CAMEL_PROFILE=1 profiles the whole run and prints the table at exit.
"""

from __future__ import annotations

import atexit
import sys
from dataclasses import dataclass

from camel import config, metal

__all__ = ["profile", "DispatchEvent"]


@dataclass
class DispatchEvent:
    """One dispatch: kernel name, grid (threads or threadgroups), threadgroup size, time."""

    name: str
    grid: tuple[int, int, int]
    threads_per_threadgroup: tuple[int, int, int]
    grid_is_threads: bool  # True: grid counts threads (dispatchThreads)
    command_buffer: int
    ms: float | None = None  # None until the command buffer has completed
    flops: float | None = None
    bytes: float | None = None


class profile:  # noqa: N801 (used like a function: `with camel.profile() as prof`)
    """Record every dispatch made inside the `with` block; see the module docstring."""

    def __init__(self):
        self._events: list[DispatchEvent] = []
        self._unresolved = 0  # events[_unresolved:] may still lack a time

    def __enter__(self) -> profile:
        # Dispatches encoded before the block must not share a command buffer with ours.
        if metal.loading._lib is not None:  # (no shim loaded yet: nothing to commit or load)
            metal.commit()
        metal._profilers.append(self)
        return self

    def __exit__(self, *exc) -> None:
        if self in metal._profilers:
            metal._profilers.remove(self)
        if exc[0] is None:
            self._resolve(wait=True)

    # called by camel.metal after each dispatch while this profile is active
    def _add(self, name, grid, tpg, grid_is_threads, cb, flops, nbytes) -> None:
        self._events.append(
            DispatchEvent(name, grid, tpg, grid_is_threads, cb, None, flops, nbytes)
        )
        # The shim keeps the times of the last 65536 command buffers: collect as we go.
        if len(self._events) - self._unresolved >= 4096:
            self._resolve(wait=False)

    def _resolve(self, wait: bool) -> None:
        """Fill in `ms` of events whose command buffers have completed."""
        if not self._events:
            return
        if wait:
            metal.synchronize()
        done = metal.completed_id()
        events = self._events
        i = self._unresolved
        while i < len(events) and events[i].command_buffer <= done:
            times = metal.command_buffer_time(events[i].command_buffer)
            if times is not None:
                events[i].ms = (times[1] - times[0]) * 1e3
            i += 1
        self._unresolved = i

    @property
    def events(self) -> list[DispatchEvent]:
        """Every recorded dispatch, in order (synchronises so all have times)."""
        if self._unresolved < len(self._events):
            self._resolve(wait=True)
        return list(self._events)

    def table(self) -> str:
        """Per kernel: calls, total ms, mean ms, and GFLOP/s or GB/s where the dispatch
        passed flops=/bytes= counts. Sorted by total time."""
        events = self.events
        if not events:
            return "camel.profile: no kernel dispatches"
        rows: dict[str, dict] = {}
        for e in events:
            r = rows.setdefault(
                e.name, dict(calls=0, ms=0.0, flops=0.0, f_ms=0.0, bytes=0.0, b_ms=0.0)
            )
            ms = e.ms or 0.0
            r["calls"] += 1
            r["ms"] += ms
            if e.flops:  # rates only over the dispatches that gave counts
                r["flops"] += e.flops
                r["f_ms"] += ms
            if e.bytes:
                r["bytes"] += e.bytes
                r["b_ms"] += ms
        clock = (
            "wall time per command buffer on the CPU simulator (not GPU time)"
            if metal.is_simulator()
            else "GPU time per command buffer"
        )
        total_ms = sum(r["ms"] for r in rows.values())
        lines = [
            f"camel.profile: {len(events)} dispatches of {len(rows)} kernels, "
            f"{total_ms:.3f} ms ({clock}, device: {metal.device_name()})",
            f"{'kernel':<36} {'calls':>7} {'total ms':>10} {'mean ms':>9} {'GFLOP/s':>9} "
            f"{'GB/s':>8}",
        ]
        for name, r in sorted(rows.items(), key=lambda kv: -kv[1]["ms"]):
            gflops = f"{r['flops'] / r['f_ms'] / 1e6:9.2f}" if r["f_ms"] > 0 else f"{'-':>9}"
            gbs = f"{r['bytes'] / r['b_ms'] / 1e6:8.2f}" if r["b_ms"] > 0 else f"{'-':>8}"
            lines.append(
                f"{name:<36} {r['calls']:>7} {r['ms']:>10.3f} {r['ms'] / r['calls']:>9.4f} "
                f"{gflops} {gbs}"
            )
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"<camel.profile: {len(self._events)} dispatches>"


def _profile_whole_run() -> None:
    """CAMEL_PROFILE=1: profile from import to exit, print the table at exit."""
    prof = profile()
    metal._profilers.append(prof)  # no commit yet: the shim may not be loaded

    def report() -> None:
        if prof in metal._profilers:
            metal._profilers.remove(prof)
        if not prof._events:
            print("camel.profile: no kernel dispatches in this run", file=sys.stderr)
            return
        try:
            print(prof.table(), file=sys.stderr)
        except metal.MetalError as e:
            print(f"camel.profile: cannot print the table: {e}", file=sys.stderr)

    atexit.register(report)


if config.profile():
    _profile_whole_run()
