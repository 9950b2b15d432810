"""Plot the measured tables of docs/cuda.md (NVIDIA H200 through the CUDA shim) as PNGs.

    python tools/plot_measured.py            # writes docs/img/h200_*.png (needs matplotlib)
    python tools/plot_measured.py --check    # parse only: what would be plotted

docs/cuda.md is the one place the measured figures live; the lessons show these plots, so
after editing a table there, rerun this script and commit the PNGs. Every plot says what
it is: an NVIDIA H200 through camel's CUDA shim, not an Apple GPU.
"""

from __future__ import annotations

import argparse
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
CUDA_MD = ROOT / "docs" / "cuda.md"
OUT = ROOT / "docs" / "img"
LABEL = "NVIDIA H200 through camel's CUDA shim — not an Apple GPU (source: docs/cuda.md)"


def _number(cell: str) -> float | None:
    """The first number in a table cell: '**27,211**' -> 27211, '4.6 (18 % of SDPA)' -> 4.6."""
    m = re.search(r"\d[\d,]*(?:\.\d+)?", cell)
    return float(m.group(0).replace(",", "")) if m else None


def table_after(text: str, header_start: str) -> tuple[list[str], list[list[str]]]:
    """The Markdown table whose header line starts with `header_start`: (header, rows)."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith(header_start):
            header = [c.strip() for c in line.strip("|").split("|")]
            rows = []
            for row in lines[i + 2 :]:
                if not row.startswith("|"):
                    break
                rows.append([c.strip() for c in row.strip("|").split("|")])
            return header, rows
    raise SystemExit(f"[plot_measured] no table starting {header_start!r} in {CUDA_MD}")


def gemm(text: str):
    """(sizes, [(rung label, [GFLOP/s per size])], cuBLAS per size or None)."""
    header, rows = table_after(text, "| rung | 1024³")
    series = [(r[0].replace("**", ""), [_number(c) for c in r[1:]]) for r in rows]
    cublas_text = (
        r"cuBLAS FP32.*?([\d,]+) GFLOP/s at 1024³, ([\d,]+) at 2048³ and \**([\d,]+) at 4096³"
    )
    m = re.search(cublas_text, text, re.S)
    cublas = [float(g.replace(",", "")) for g in m.groups()] if m else None
    return header[1:], series, cublas


def attention(text: str):
    """(columns, [(path, [TFLOP/s per column])])."""
    header, rows = table_after(text, "| path | T = 1024")
    return header[1:], [(r[0].replace("**", ""), [_number(c) for c in r[1:]]) for r in rows]


def memory(text: str):
    """[(kernel, % of copy)], 'a / b' cells split into two bars."""
    _, rows = table_after(text, "| kernel | shape | GB/s | % of copy |")
    bars = []
    for kernel, _shape, _gbs, pct in rows:
        names, pcts = kernel.split(" / "), pct.split(" / ")
        stem = names[0].rsplit(" ", 1)[0]  # "LayerNorm v1 / v2 / v3": v2 is LayerNorm v2
        names = [f"{stem} {n}" if re.fullmatch(r"v\d+", n) else n for n in names]
        bars += [(n, _number(p)) for n, p in zip(names, pcts, strict=True)]
    return bars


def plot_all(text: str) -> list[pathlib.Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    OUT.mkdir(parents=True, exist_ok=True)
    written = []

    sizes, series, cublas = gemm(text)
    fig, ax = plt.subplots(figsize=(9, 5))
    width = 0.8 / len(sizes)
    for j, size in enumerate(sizes):
        xs = [i + (j - (len(sizes) - 1) / 2) * width for i in range(len(series))]
        ax.bar(xs, [s[1][j] for s in series], width, label=size)
        if cublas:
            ax.axhline(cublas[j], color=f"C{j}", linestyle="--", linewidth=1)
    ax.set_xticks(range(len(series)), [s[0] for s in series], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("GFLOP/s (FP32)")
    ax.set_title(
        "camel GEMM ladder" + (" (dashed: cuBLAS FP32)" if cublas else "") + "\n" + LABEL,
        fontsize=9,
    )
    ax.legend(title="M = N = K", fontsize=8)
    written.append(_save(fig, "h200_gemm_ladder.png"))

    cols, paths = attention(text)
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.8 / len(paths)
    for k, (name, values) in enumerate(paths):
        xs = [i + (k - (len(paths) - 1) / 2) * width for i in range(len(cols))]
        ax.bar(xs, values, width, label=name)
    ax.set_xticks(range(len(cols)), cols, fontsize=8)
    ax.set_ylabel("TFLOP/s (FP32)")
    ax.set_title(
        "Attention forward, B = 1, H = 16, D = 64 (*: see docs/cuda.md)\n" + LABEL, fontsize=9
    )
    ax.legend(fontsize=8)
    written.append(_save(fig, "h200_attention.png"))

    bars = memory(text)
    fig, ax = plt.subplots(figsize=(8, 0.3 * len(bars) + 1.2))
    ax.barh([b[0] for b in bars][::-1], [b[1] for b in bars][::-1])
    ax.axvline(100, color="k", linewidth=1)
    ax.set_xlabel("% of copy_uint4's bandwidth in the same run")
    ax.set_title("Memory-bound kernels at 256 MiB\n" + LABEL, fontsize=9)
    ax.tick_params(axis="y", labelsize=8)
    written.append(_save(fig, "h200_memory_bound.png"))
    return written


def _save(fig, name: str) -> pathlib.Path:
    path = OUT / name
    fig.savefig(path, dpi=90, bbox_inches="tight", metadata={"Software": None})
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python tools/plot_measured.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--check", action="store_true", help="parse docs/cuda.md, plot nothing")
    args = ap.parse_args(argv)
    text = CUDA_MD.read_text()
    if args.check:
        sizes, series, cublas = gemm(text)
        print(f"GEMM: {len(series)} rungs at {', '.join(sizes)}; cuBLAS {cublas}")
        cols, paths = attention(text)
        print(f"attention: {len(paths)} paths at {len(cols)} sizes")
        print(f"memory-bound: {len(memory(text))} bars")
        return 0
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("[plot_measured] needs matplotlib (pip install matplotlib)", file=sys.stderr)
        return 2
    for path in plot_all(text):
        print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
