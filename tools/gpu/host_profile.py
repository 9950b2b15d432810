"""Where a GPT-mini training step's host time goes (run on a GPU machine, camel on "mps").

    python3 tools/gpu/host_profile.py [--config long] [--steps 20] [--cprofile 40]

Prints the step's dispatches by kernel (camel.profile), then the host time of each phase of
the step (batch, forward, zero_grad, backward, optimizer step, loss.item()) with the time
spent waiting in synchronize() taken out and shown on its own, and optionally cProfile's
top functions by own time. Host time that exceeds the GPU's work is what makes a step
host-bound (docs/cuda.md, GPT-mini).
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import pstats
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import camel  # noqa: E402
from camel import optim  # noqa: E402
from camel.bench import models  # noqa: E402
from camel.metal import buffers  # noqa: E402

PHASES = ("batch", "forward", "zero_grad", "backward", "step", "item")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--config", default="long")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--cprofile", type=int, default=0, help="print this many functions")
    args = ap.parse_args(argv)

    gm = models._example("gpt_mini")
    cfg = gm.CONFIGS[args.config]
    model = gm.GPT(65, cfg["d_model"], cfg["n_layers"], cfg["n_heads"], cfg["max_seq_len"])
    model.to("mps")
    opt = optim.Adam(model.parameters(), lr=cfg["lr"])
    b, t = cfg["batch_size"], cfg["seq_len"]
    rng = np.random.default_rng(0)

    waited = [0.0]  # seconds inside synchronize(), the host waiting for the GPU
    synchronize = buffers.synchronize

    def timed_synchronize(*a, **k):
        start = time.perf_counter()
        try:
            return synchronize(*a, **k)
        finally:
            waited[0] += time.perf_counter() - start

    buffers.synchronize = timed_synchronize
    host = collections.Counter()
    wait = collections.Counter()

    def step():
        marks = [(time.perf_counter(), waited[0])]
        xb = rng.integers(0, 65, size=(b, t + 1)).astype(np.int32)
        x, y = camel.tensor(xb[:, :-1], device="mps"), camel.tensor(xb[:, 1:], device="mps")
        marks.append((time.perf_counter(), waited[0]))
        loss = gm.lm_loss(model, x, y)
        marks.append((time.perf_counter(), waited[0]))
        opt.zero_grad()
        marks.append((time.perf_counter(), waited[0]))
        loss.backward()
        marks.append((time.perf_counter(), waited[0]))
        opt.step()
        marks.append((time.perf_counter(), waited[0]))
        loss.item()
        marks.append((time.perf_counter(), waited[0]))
        for name, (t0, w0), (t1, w1) in zip(PHASES, marks, marks[1:], strict=False):
            wait[name] += w1 - w0
            host[name] += (t1 - t0) - (w1 - w0)

    for _ in range(5):
        step()
    with camel.profile() as prof:
        step()
    kernels = collections.Counter(e.name for e in prof.events)
    gpu_ms = sum(e.ms or 0.0 for e in prof.events)
    print(f"{len(prof.events)} dispatches a step, {gpu_ms:.2f} GPU ms (profiled, one each)")
    for name, n in kernels.most_common():
        print(f"  {n:4d}  {name}")
    host.clear()
    wait.clear()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    wall = (time.perf_counter() - start) / args.steps * 1e3
    n = args.steps
    print(f"\nstep {wall:.2f} ms wall ({args.config}); per phase, ms: host (waiting)")
    for name in PHASES:
        print(f"  {name:>10} {host[name] / n * 1e3:7.3f}  ({wait[name] / n * 1e3:.3f})")
    total = sum(host.values()) / n * 1e3
    print(f"  {'host':>10} {total:7.3f} = {total * 1e3 / len(prof.events):.1f} us a dispatch")
    if args.cprofile:
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(args.steps):
            step()
        pr.disable()
        stats = pstats.Stats(pr)
        stats.sort_stats("tottime").print_stats(args.cprofile)
        stats.sort_stats("cumulative").print_stats(args.cprofile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
