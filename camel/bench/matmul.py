"""Benchmark the GEMM ladder: ``python -m camel.bench matmul [--list] [--tune] [--plot PNG]``.

1. Validate every version against NumPy at awkward sizes (1, 31, 33, 257, transposed,
   batched). A version that fails is reported and not timed.
2. Time each version at M = N = K in --sizes (default 256 ... 4096 on a GPU) after warm-up,
   synchronised, and print   version | M=N=K | ms | GFLOP/s | % of MPS | % of roofline
   with MPS (MPSMatrixMultiplication) as kernel 0 on a Mac, and cuBLAS (FP32 SGEMM,
   TF32 off) on the CUDA shim. "% of roofline" is the product's own bound, max(2 M N K
   FLOPs / peak, 12 M N bytes (A, B read once, C written once) / bandwidth), over the
   measured time, with camel/bench/roofline.py's peaks (n/a where it has none).

On the simulator (Linux) the times are CPU times of the simulator, NOT GPU timings, and
the default sizes are small; the table says so. `--markdown FILE` rewrites the results
table in FILE between the `<!-- bench:matmul -->` markers (`make bench` does this for
docs/stage3.md).

`--source 6` prints one rung's kernel on its own, specialised (template parameters
substituted, constant branches removed: camel/bench/source.py); `--diff 5 6` prints what
changed from one rung to the next. Neither needs a GPU.
"""

from __future__ import annotations

import argparse
import re
import sys

import numpy as np

GPU_SIZES = [256, 512, 1024, 2048, 4096]
SIM_SIZES = [64, 128, 256]

# Validation cases: (A stored, B stored, transpose_a, transpose_b)
CASES = [
    ((1, 1), (1, 1), False, False),
    ((31, 33), (33, 257), False, False),
    ((257, 31), (31, 33), False, False),
    ((33, 31), (33, 65), True, False),  # dW = Xᵀ·dY
    ((31, 33), (65, 33), False, True),  # dX = dY·Wᵀ
    ((2, 3, 17, 8), (2, 3, 19, 8), False, True),  # batched q·kᵀ
    ((4, 33, 20), (20, 31), False, False),  # 3-D @ 2-D
]

MARK_BEGIN = "<!-- bench:matmul begin -->"
MARK_END = "<!-- bench:matmul end -->"


def validate(versions, log=print) -> list[str]:
    """Check each version on CASES; return the versions that pass."""
    from camel.bench import tuner

    rng = np.random.default_rng(0)
    passed = []
    for v in versions:
        worst = 0.0
        for a_shape, b_shape, ta, tb in CASES:
            a = rng.standard_normal(a_shape, dtype=np.float32)
            b = rng.standard_normal(b_shape, dtype=np.float32)
            worst = max(worst, tuner.check(v, a, b, transpose_a=ta, transpose_b=tb))
        ok = worst < 1e-5
        log(f"  validate version {v:>2}: {'ok  ' if ok else 'FAIL'} (max rel. error {worst:.1e})")
        if ok:
            passed.append(v)
    return passed


def vendor() -> str:
    """The name of kernel 0, the vendor's matmul behind metal.mps_matmul on this shim."""
    from camel import metal

    return "cuBLAS" if metal.shim() == "cuda" else "MPS"


def time_mps(s: int, reps: int) -> float | None:
    """ms per MPS matmul at s^3, or None where MPS does not exist (the simulator)."""
    from camel import metal, tuning

    if metal.is_simulator():
        return None
    rng = np.random.default_rng(1)
    a = rng.standard_normal((s, s), dtype=np.float32)
    b = rng.standard_normal((s, s), dtype=np.float32)
    da, db = metal.DeviceArray.from_numpy(a), metal.DeviceArray.from_numpy(b)
    dc = metal.DeviceArray.empty((s, s), np.float32)
    try:
        metal.mps_matmul(da, db, dc)  # cuBLAS on the CUDA shim
    except metal.MetalError as e:  # e.g. no libcublas: say so, time the rungs anyway
        print(f"  no vendor GEMM row: {e}", file=sys.stderr)
        return None
    got = dc.numpy()
    want = a.astype(np.float64) @ b
    bad = np.abs(got - want).max() > 1e-3 * max(1.0, np.abs(want).max())
    del got  # a live view of c makes a discrete-GPU shim upload c before every call
    if bad:
        print(f"  {vendor()} result does not match NumPy; not the reference", file=sys.stderr)
        return None
    return tuning.time_ms(lambda: metal.mps_matmul(da, db, dc), reps)


def time_version(v: str, s: int, reps: int) -> float:
    from camel import gemm, metal, tuning

    rng = np.random.default_rng(2)
    da = metal.DeviceArray.from_numpy(rng.standard_normal((s, s), dtype=np.float32))
    db = metal.DeviceArray.from_numpy(rng.standard_normal((s, s), dtype=np.float32))
    dc = metal.DeviceArray.empty((s, s), np.float32)
    return tuning.time_ms(lambda: gemm.matmul(da, db, out=dc, version=v), reps)


def run(versions, sizes, reps) -> tuple[list[tuple], bool]:
    """Rows (version, size, ms, gflops, pct_of_mps or None) and whether MPS was timed."""
    from camel import gemm

    rows, have_mps = [], False
    for s in sizes:
        flops = 2.0 * s**3
        mps_ms = time_mps(s, reps)
        if mps_ms is not None:
            have_mps = True
            rows.append((f"0 ({vendor()})", s, mps_ms, flops / mps_ms / 1e6, 100.0))
        for v in versions:
            rung = gemm.get_rung(v)
            if not gemm.fits(rung):
                print(f"  version {v} does not fit this device's limits; skipped")
                continue
            ms = time_version(v, s, reps)
            pct = 100.0 * mps_ms / ms if mps_ms else None
            rows.append((v, s, ms, flops / ms / 1e6, pct))
    return rows, have_mps


def table(rows, simulator: bool, device: str) -> str:
    """The results as a Markdown table, with what ran it."""
    where = (
        f"{device}: simulator CPU time on this machine, NOT GPU timings"
        if simulator
        else f"{device}: GPU time per matmul (command-buffer timestamps)"
    )
    from camel.bench import roofline

    label = "sim GFLOP/s" if simulator else "GFLOP/s"
    ref = "MPS" if simulator else vendor()
    peaks = roofline.peaks(device, simulator)
    lines = [f"Measured on {where}.", "",
             f"| version | M=N=K | ms | {label} | % of {ref} | % of roofline |"]  # fmt: skip
    lines.append("|---|---:|---:|---:|---:|---:|")
    for v, s, ms, gflops, pct in rows:
        pct_text = f"{pct:.0f}%" if pct is not None else "n/a"
        roof = roofline.percent(2.0 * s**3, 12.0 * s * s, ms, peaks)  # A, B read; C written
        lines.append(f"| {v} | {s} | {ms:.3f} | {gflops:.2f} | {pct_text} | {roof} |")
    return "\n".join(lines + ["", roofline.note(peaks)])


def write_markdown(path: str, text: str) -> None:
    with open(path) as f:
        doc = f.read()
    block = f"{MARK_BEGIN}\n{text}\n{MARK_END}"
    pattern = re.compile(re.escape(MARK_BEGIN) + ".*?" + re.escape(MARK_END), re.S)
    if not pattern.search(doc):
        raise SystemExit(f"[bench] {path} has no {MARK_BEGIN} ... {MARK_END} markers")
    with open(path, "w") as f:
        f.write(pattern.sub(lambda _: block, doc))
    print(f"[bench] wrote the table into {path}")


def plot(rows, path: str, simulator: bool) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[bench] --plot needs matplotlib (pip install matplotlib); no chart written")
        return
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, v in enumerate(dict.fromkeys(r[0] for r in rows)):
        pts = [(s, g) for (vv, s, _, g, _) in rows if vv == v]
        style = "-" if i < 10 else "--"  # the colour cycle has 10 colours: dash the rest
        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", label=f"v{v}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("M = N = K")
    ax.set_ylabel("simulated GFLOP/s (CPU, not GPU)" if simulator else "GFLOP/s")
    ax.set_title("camel GEMM ladder" + (" — simulator, not GPU timings" if simulator else ""))
    ax.legend(ncol=2, fontsize=8)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    print(f"[bench] wrote {path}")


def rung_source(version) -> str:
    """The specialised MSL of one rung (or tuning variant), as `--source` prints it."""
    from camel import gemm
    from camel.bench import source

    rung = gemm.get_rung(version)
    header = f"// python -m camel.bench matmul --source {rung.version}: {rung.what}"
    return source.specialise(gemm.SHADER, rung.kernel, header)


def print_source(version, pair) -> int:
    from camel.bench import source

    try:
        if pair:
            a, b = (rung_source(v) for v in pair)
            print(source.diff(a, b, f"v{pair[0]}", f"v{pair[1]}"), end="")
        else:
            print(rung_source(version), end="")
    except ValueError as e:
        print(e, file=sys.stderr)
        return 2
    return 0


def main(argv=None) -> int:
    from camel import gemm, metal, tuning
    from camel.bench import tuner

    ap = argparse.ArgumentParser(prog="python -m camel.bench matmul", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--list", action="store_true", help="print the version names and exit")
    ap.add_argument("--list-variants", action="store_true", help="print the tuning variants")
    ap.add_argument("--tune", action="store_true", help="autotune rungs and variants; cache")
    ap.add_argument("--plot", metavar="PNG", help="write the ladder as a chart (matplotlib)")
    ap.add_argument("--sizes", help="comma-separated M=N=K sizes (default depends on device)")
    ap.add_argument("--versions", help="comma-separated versions (default: all)")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions per size")
    ap.add_argument("--markdown", metavar="FILE", help="rewrite the table in FILE (make bench)")
    ap.add_argument("--source", metavar="V", help="print rung V's kernel, specialised, and exit")
    ap.add_argument("--diff", nargs=2, metavar=("V1", "V2"), help="diff two rungs' kernels")
    args = ap.parse_args(argv)
    if args.source or args.diff:
        return print_source(args.source, args.diff)
    if args.plot:  # before the run, not after minutes of timing
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("[bench] --plot needs matplotlib, which is not installed: pip install "
                  "matplotlib, or run without --plot", file=sys.stderr)  # fmt: skip
            return 2

    if args.list:
        for rung in gemm.RUNGS.values():
            print(f"{rung.version:>2} {rung.kernel}")
        return 0
    if args.list_variants:
        for rung in gemm.VARIANTS.values():
            print(f"{rung.version} {rung.kernel}")
        return 0

    sim = metal.is_simulator()
    device = metal.device_name()
    versions = (
        [gemm.get_rung(v).version for v in args.versions.split(",")]
        if args.versions
        else gemm.versions()
    )
    sizes = (
        [int(s) for s in args.sizes.split(",")] if args.sizes else (SIM_SIZES if sim else GPU_SIZES)
    )
    reps = args.reps or (3 if sim else 20)
    print(f"[bench] matmul on {device}")
    if sim:
        print("[bench] SIMULATOR: kernels run on the CPU; times below are NOT GPU timings")

    print("[bench] validating against NumPy")
    passed = validate(versions)
    failed = [v for v in versions if v not in passed]

    if args.tune:
        variants = [] if args.versions else validate(list(gemm.VARIANTS))
        tuner.tune(sizes, reps=reps, versions=passed + variants)
        print(f"[bench] winners saved in {tuning.cache_path()}")
        return 1 if failed else 0

    rows, _ = run(passed, sizes, reps)
    text = table(rows, sim, device)
    print(text)
    if args.markdown:
        write_markdown(args.markdown, text)
    if args.plot:
        plot(rows, args.plot, sim)
    if failed:
        print(f"[bench] versions that failed validation: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
