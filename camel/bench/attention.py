"""Benchmark the flash-attention ladder: ``python -m camel.bench attention [--list] [--tune]``.

1. Validate every rung against NumPy (out and log-sum-exp) at awkward T (1, 17, 130),
   D = 32, 64, 128, causal and not. A rung that fails is reported and not timed.
2. For T in --seqs (512 ... 8192 on a GPU), D in --dims (64, 128), causal and not: time
   the naive camel attention (Stage 5A: Q·Kᵀ, softmax, P·V with a (T, T) matrix) and each
   rung after warm-up, synchronised, and print
       rung | T | D | causal | ms | TFLOP/s | alloc MiB | % of <reference>
   where % of reference = reference ms / rung ms (over 100%: faster than the reference) and
   alloc MiB is the GPU memory one call allocates at its peak beyond the inputs (outputs,
   temporaries: the naive path's (T, T) scores and probabilities show up here).

The reference ("kernel 0"): on a Mac with macOS 15+, MPSGraph's fused scaled-dot-product
attention (camel.metal.mpsgraph_attention), validated like a rung first; its alloc counts
only the output, as MPSGraph keeps its temporaries in its own heap. On the CUDA shim it is
PyTorch's scaled_dot_product_attention in FP32 (TF32 off) on the same GPU, when a CUDA
PyTorch is importable, validated the same way and timed with CUDA events. Where neither is
there (older macOS, no CUDA PyTorch, a failed validation, the simulator) the bench says why
and naive camel attention is the reference.

FLOPs count 4·T·T·D per (batch, head) (two matmuls), halved when causal, for every path;
--heads H (default 16 on a GPU, 1 on the simulator) runs B = 1 with H heads per call.
On the simulator (Linux) the times are CPU times of the simulator, NOT GPU timings; the
default sizes are small (T = 256, 512, 1024, D = 64) and the table says so.

`--source flash_v3` prints one rung's kernel on its own, specialised for D (the first of
--dims, default 64): the template's bool flags and sizes substituted, the branches they
switch off removed (camel/bench/source.py). `--diff flash_v2 flash_v3` prints what changed
from one rung to the next. Neither needs a GPU.
"""

from __future__ import annotations

import argparse
import sys
import time
from functools import partial

import numpy as np

GPU_SEQS = [512, 1024, 2048, 4096, 8192]
SIM_SEQS = [256, 512, 1024]
GPU_DIMS = [64, 128]
SIM_DIMS = [64]


def validate(rungs, log=print) -> list[str]:
    """Check each rung against NumPy; return those that pass."""
    from camel import flash, metal

    rng = np.random.default_rng(0)
    passed = []
    for name in rungs:
        worst = 0.0
        for t in (1, 17, 130):
            for d in flash.HEAD_DIMS:
                for causal in (False, True):
                    q, k, v = (rng.standard_normal((1, 2, t, d), dtype=np.float32) for _ in "qkv")
                    want, want_lse = flash.reference_numpy(q, k, v, causal)
                    dq, dk, dv = (metal.DeviceArray.from_numpy(x) for x in (q, k, v))
                    out, lse = flash.forward(dq, dk, dv, causal, rung=name)
                    err = np.abs(out.numpy() - want).max() / max(1.0, np.abs(want).max())
                    worst = max(worst, err, np.abs(lse.numpy() - want_lse).max())
        ok = worst < 1e-4
        log(f"  validate {name:<16} {'ok  ' if ok else 'FAIL'} (max error {worst:.1e})")
        if ok:
            passed.append(name)
    return passed


def validate_mpsgraph(log=print) -> str | None:
    """Check MPSGraph attention against NumPy like a rung. None if it can be the reference,
    else the reason it cannot (the simulator, macOS before 15, a wrong result)."""
    from camel import flash, metal

    if metal.is_simulator():
        return "MPSGraph needs Metal on macOS 15+; this is the simulator"
    rng = np.random.default_rng(0)
    worst = 0.0
    for t in (1, 17, 130):
        for d in flash.HEAD_DIMS:
            for causal in (False, True):
                q, k, v = (rng.standard_normal((1, 2, t, d), dtype=np.float32) for _ in "qkv")
                want = flash.reference_numpy(q, k, v, causal)[0]
                dq, dk, dv = (metal.DeviceArray.from_numpy(x) for x in (q, k, v))
                out = metal.DeviceArray.empty(q.shape, np.float32)
                try:
                    metal.mpsgraph_attention(dq, dk, dv, out, 1.0 / np.sqrt(d), causal)
                except metal.MetalError as e:
                    return str(e)
                err = np.abs(out.numpy() - want).max() / max(1.0, np.abs(want).max())
                worst = max(worst, float(err))
    ok = worst < 1e-3  # a vendor kernel may round differently; still far below any bug
    log(f"  validate {'mpsgraph':<16} {'ok  ' if ok else 'FAIL'} (max error {worst:.1e})")
    return None if ok else f"MPSGraph attention FAILED validation (max error {worst:.1e})"


def _mpsgraph(q, k, v, causal):
    """MPSGraph's fused attention on DeviceArrays (B, H, T, D); a new output per call."""
    from camel import metal

    out = metal.DeviceArray.empty(q.shape, np.float32)
    metal.mpsgraph_attention(q, k, v, out, 1.0 / np.sqrt(q.shape[-1]), causal)
    return out


def _time_mpsgraph(run, reps: int) -> float:
    """ms per MPSGraph call. Each call runs in a command buffer of its own (MPSGraph encodes
    into its own), so this is the mean GPU time of those command buffers (camel.profile);
    wall time per call where the shim has no timestamps."""
    import camel
    from camel import metal

    run()  # warm-up: builds and compiles the graph for this shape
    metal.synchronize()
    start = time.perf_counter()
    with camel.profile() as prof:
        for _ in range(reps):
            run()
    wall_ms = 1000.0 * (time.perf_counter() - start) / reps
    times = [e.ms for e in prof.events if e.name == "mpsgraph_attention" and e.ms]
    return sum(times) / len(times) if len(times) == reps else wall_ms


def torch_cuda():
    """PyTorch with a CUDA GPU when camel itself runs on the CUDA shim, else (None, why)."""
    from camel import metal

    if metal.shim() != "cuda":
        return None, f"PyTorch SDPA is the reference on the CUDA shim; this is {metal.shim()}"
    try:
        import torch
    except ImportError:
        return None, "PyTorch is not installed (pip install torch, a CUDA build)"
    if not torch.cuda.is_available():
        return None, f"PyTorch {torch.__version__} sees no CUDA GPU (a CPU-only build?)"
    torch.backends.cuda.matmul.allow_tf32 = False  # FP32 like camel, no TF32 shortcuts
    torch.backends.cudnn.allow_tf32 = False
    return torch, None


def validate_sdpa(torch, log=print) -> str | None:
    """Check PyTorch's SDPA (FP32, CUDA) against NumPy like a rung; None if it is usable."""
    from camel import flash

    rng = np.random.default_rng(0)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    worst = 0.0
    for t in (1, 17, 130):
        for d in flash.HEAD_DIMS:
            for causal in (False, True):
                q, k, v = (rng.standard_normal((1, 2, t, d), dtype=np.float32) for _ in "qkv")
                want = flash.reference_numpy(q, k, v, causal)[0]
                tq, tk, tv = (torch.from_numpy(x).cuda() for x in (q, k, v))
                got = sdpa(tq, tk, tv, is_causal=causal).cpu().numpy()
                worst = max(worst, float(np.abs(got - want).max() / max(1.0, np.abs(want).max())))
    ok = worst < 1e-3
    log(f"  validate {'torch_sdpa':<16} {'ok  ' if ok else 'FAIL'} (max error {worst:.1e})")
    return None if ok else f"PyTorch SDPA FAILED validation (max error {worst:.1e})"


def _time_sdpa(torch, q, k, v, causal, reps: int) -> tuple[float, int]:
    """(ms per call, peak bytes one call allocates) of PyTorch's SDPA, by CUDA events."""
    sdpa = torch.nn.functional.scaled_dot_product_attention
    tq, tk, tv = (torch.from_numpy(x).cuda() for x in (q, k, v))
    sdpa(tq, tk, tv, is_causal=causal)  # warm-up: picks and loads the kernel
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = sdpa(tq, tk, tv, is_causal=causal)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        sdpa(tq, tk, tv, is_causal=causal)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps, peak


def _naive(q, k, v, causal):
    """The Stage 5A path (CAMEL_ATTENTION=naive) on "mps" Tensors."""
    import camel.functional as F
    from camel import config

    with config.choices(attention="naive"):
        return F.scaled_dot_product_attention(q, k, v, causal=causal)


def _time_and_peak(run, reps: int, timer=None) -> tuple[float, int]:
    """(ms per call, bytes one call allocates at its peak: outputs and temporaries).
    timer(run, reps) -> ms; default tuning.time_ms (all reps in one command buffer)."""
    from camel import metal, tuning

    metal.synchronize()
    metal.empty_cache()
    metal.reset_peak_memory_stats()
    base = metal.memory_stats()["peak_bytes"]
    out = run()
    metal.synchronize()
    peak = metal.memory_stats()["peak_bytes"] - base
    del out
    if timer is not None:
        return timer(run, reps), peak
    return tuning.time_ms(run, reps, warmup=1), peak


def run(rungs, seqs, dims, reps, log=print, reference="naive", heads=1) -> list[tuple]:
    """Rows (rung, T, D, causal, ms, tflops, peak_bytes, pct_of_reference); reference is
    "naive", "mpsgraph" or "torch_sdpa" (then its row comes first in each case)."""
    import camel
    from camel import flash, metal

    rows = []
    rng = np.random.default_rng(1)
    for d in dims:
        for t in seqs:
            for causal in (False, True):
                shape = (1, heads, t, d)
                q, k, v = (rng.standard_normal(shape, dtype=np.float32) for _ in "qkv")
                qd, kd, vd = (metal.DeviceArray.from_numpy(x) for x in (q, k, v))
                qt, kt, vt = (camel.Tensor._make(x, "mps") for x in (qd, kd, vd))
                flops = heads * 4.0 * t * t * d / (2 if causal else 1)

                start = time.perf_counter()
                ref_ms = None
                if reference == "mpsgraph":
                    call = partial(_mpsgraph, qd, kd, vd, causal)
                    ref_ms, ms_peak = _time_and_peak(call, reps, timer=_time_mpsgraph)
                    rows.append(("mpsgraph", t, d, causal, ref_ms, flops / ref_ms / 1e9,
                                 ms_peak, 100.0))  # fmt: skip
                elif reference == "torch_sdpa":
                    torch, _ = torch_cuda()
                    ref_ms, ref_peak = _time_sdpa(torch, q, k, v, causal, reps)
                    rows.append(("torch_sdpa", t, d, causal, ref_ms, flops / ref_ms / 1e9,
                                 ref_peak, 100.0))  # fmt: skip
                naive_ms, naive_peak = _time_and_peak(partial(_naive, qt, kt, vt, causal), reps)
                ref_ms = ref_ms or naive_ms
                rows.append(("naive", t, d, causal, naive_ms, flops / naive_ms / 1e9,
                             naive_peak, 100.0 * ref_ms / naive_ms))  # fmt: skip
                for name in rungs:
                    if name == "flash_v6":
                        name = flash.get_rung("flash", d, t, causal).name  # the tuned shape
                    call = partial(flash.forward, qd, kd, vd, causal, rung=name)
                    ms, peak = _time_and_peak(call, reps)
                    rows.append((name, t, d, causal, ms, flops / ms / 1e9, peak,
                                 100.0 * ref_ms / ms))  # fmt: skip
                log(f"  T={t} D={d} {'causal' if causal else 'full'}: "
                    f"{time.perf_counter() - start:.1f} s")  # fmt: skip
    return rows


def table(rows, simulator: bool, device: str, reference: str = "naive", heads: int = 1) -> str:
    where = (
        f"{device}: simulator CPU time on this machine, NOT GPU timings"
        if simulator
        else f"{device}: GPU time per call (command-buffer timestamps)"
    )
    from camel.bench import roofline

    label = "sim TFLOP/s" if simulator else "TFLOP/s"
    peaks = roofline.peaks(device, simulator)
    lines = [f"Measured on {where}. Batch 1, {heads} head{'s' if heads > 1 else ''}; alloc = GPU "
             "memory one call allocates at its peak (outputs and temporaries).",
             "", f"| rung | T | D | causal | ms | {label} | alloc MiB | % of {reference} "
             "| % of roofline |", "|---|---:|---:|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for name, t, d, causal, ms, tflops, peak, pct in rows:
        roof = roofline.percent(tflops * 1e9 * ms, 16.0 * heads * t * d, ms, peaks)  # q,k,v,o
        lines.append(f"| {name} | {t} | {d} | {'yes' if causal else 'no'} | {ms:.2f} | "
                     f"{tflops:.5f} | {peak / 2**20:.2f} | {pct:.0f}% | {roof} |")  # fmt: skip
    return "\n".join(lines + ["", roofline.note(peaks)])


def rung_source(name: str, d: int = 64) -> str:
    """The specialised MSL of one flash rung at head dim d, as `--source` prints it
    ("flash_v6" is v6's default tile shape: the tuned one depends on the device)."""
    from camel import flash
    from camel.bench import source

    key = name.strip().lower()
    key = flash.DEFAULT_V6 if key in ("flash", "flash_v6") else key
    if key not in flash.RUNGS:
        raise ValueError(f"[attention] unknown rung {name!r}; valid: {', '.join(flash.names())}")
    if d not in flash.HEAD_DIMS:
        raise ValueError(f"[attention] head dim {d} has no kernel; built: {flash.HEAD_DIMS}")
    rung = flash.RUNGS[key]
    header = f"// python -m camel.bench attention --source {key} --dims {d}: {rung.what}"
    return source.specialise(flash.SHADER, rung.kernel(d), header)


def print_source(name, pair, d: int) -> int:
    from camel.bench import source

    try:
        if pair:
            a, b = (rung_source(n, d) for n in pair)
            print(source.diff(a, b, pair[0], pair[1]), end="")
        else:
            print(rung_source(name, d), end="")
    except ValueError as e:
        print(e, file=sys.stderr)
        return 2
    return 0


def main(argv=None) -> int:
    from camel import flash, metal
    from camel.bench import tuner

    ap = argparse.ArgumentParser(prog="python -m camel.bench attention", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--list", action="store_true", help="print the rungs and exit")
    ap.add_argument("--tune", action="store_true", help="autotune v6's tile shape first")
    ap.add_argument("--seqs", help="comma-separated T (default depends on the device)")
    ap.add_argument("--dims", help="comma-separated head dims D (default depends on the device)")
    ap.add_argument("--rungs", help="comma-separated rung names (default: all)")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions per case")
    ap.add_argument("--heads", type=int, default=None, help="heads per call (batch is 1)")
    ap.add_argument("--source", metavar="RUNG", help="print RUNG's kernel, specialised, and exit")
    ap.add_argument("--diff", nargs=2, metavar=("R1", "R2"), help="diff two rungs' kernels")
    args = ap.parse_args(argv)
    if args.source or args.diff:
        d = int(args.dims.split(",")[0]) if args.dims else 64
        return print_source(args.source, args.diff, d)

    if args.list:
        for rung in flash.RUNGS.values():
            print(f"{rung.name:<16} B_r={rung.br:<3} B_c={rung.bc:<3} {rung.what}")
        print(f"{flash.V6_TOO_BIG.name:<16} {flash.V6_TOO_BIG.what}")
        return 0
    sim = metal.is_simulator()
    device = metal.device_name()
    rungs = args.rungs.split(",") if args.rungs else list(flash.RUNGS)
    for name in rungs:
        flash.get_rung(name)  # unknown names fail here, listing the valid ones
    seqs = [int(s) for s in args.seqs.split(",")] if args.seqs else (SIM_SEQS if sim else GPU_SEQS)
    dims = [int(s) for s in args.dims.split(",")] if args.dims else (SIM_DIMS if sim else GPU_DIMS)
    reps = args.reps or (1 if sim else 10)
    heads = args.heads or (1 if sim else 16)
    if heads < 1:
        raise SystemExit(f"[bench] --heads must be at least 1, got {heads}")
    print(f"[bench] attention on {device}")
    if sim:
        print("[bench] SIMULATOR: kernels run on the CPU; times below are NOT GPU timings")
    print("[bench] validating against NumPy")
    passed = validate(rungs)
    torch, absent = torch_cuda()
    if torch is not None:
        absent = validate_sdpa(torch)
        reference = "naive" if absent else "torch_sdpa"
        what = "PyTorch scaled_dot_product_attention, FP32 (TF32 off), on the same GPU"
    else:
        absent = validate_mpsgraph() if metal.shim() != "cuda" else absent
        reference = "naive" if absent else "mpsgraph"
        what = "MPSGraph scaled-dot-product attention (macOS 15+)"
    if absent:
        print(f"[bench] no reference row: {absent}; the reference is naive camel attention")
    else:
        print(f"[bench] reference: {what}")
    if args.tune:
        for d in dims:
            for t in seqs:
                for causal in (False, True):
                    tuner.tune_flash(1, 1, t, d, causal)
    rows = run(passed, seqs, dims, reps, reference=reference, heads=heads)
    print()
    print(table(rows, sim, device, reference, heads))
    if len(passed) < len(rungs):
        print(f"[bench] FAILED validation: {', '.join(r for r in rungs if r not in passed)}")
        return 1
    return 0
