"""Rooflines: what the hardware allows, per device, and what each rung's counts predict.

    python -m camel.bench roofline              # every ladder's model as Markdown tables
    python -m camel.bench roofline gemm         # one of: gemm, flash, memory
    python -m camel.bench roofline --size 2048  # GEMM at M = N = K = 2048

A kernel that does F floating-point operations and moves B bytes of device memory cannot
take less than max(F / peak FLOP/s, B / peak bandwidth): the roofline. The benches print
"% of roofline" = that bound / the measured time (100 % is the ceiling), with the peaks of
`PEAKS` below, chosen by the device's name. The simulator has no peaks ("n/a"); so has a
device not in the table, unless CAMEL_PEAKS="<FP32 TFLOP/s>,<GB/s>" gives them.

Where each peak comes from (open them):
  NVIDIA H200   FP32 ~67 TFLOP/s (docs/cuda.md); bandwidth: copy_uint4 measured through the
                CUDA shim, 4,142 GB/s read + write at 256 MiB (docs/cuda.md), below the
                data-sheet 4.8 TB/s, so 100 % means "as fast as camel's own copy".
  Apple M1      2.6 TFLOP/s FP32 (philipturner/metal-benchmarks: 2617 GOPS32 for 8 cores),
                ~68 GB/s (Apple: the M1 Max's 400 GB/s is "nearly 6x that of M1")
  Apple M1 Max  10.6 TFLOP/s (metal-benchmarks: 10617 GOPS32 for 32 cores), 400 GB/s
                (https://www.apple.com/newsroom/2021/10/introducing-m1-pro-and-m1-max-the-
                most-powerful-chips-apple-has-ever-built/)
No Apple GPU was measured for camel: the Apple rows of the tables below are predictions
from counts and peaks, not measurements.

The per-rung counts (`gemm_rows`, `flash_rows`, `memory_rows`) are computed from the tile
sizes in camel/gemm.py and camel/flash.py, so `python -m camel.bench roofline` regenerates
the tables the lessons (docs/stage*.md) quote.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from camel import config

F32 = 4  # bytes per float


@dataclass(frozen=True)
class Peaks:
    """One device's ceilings: FP32 TFLOP/s and device-memory GB/s, and where they come from."""

    name: str
    tflops: float
    gbs: float
    source: str


PEAKS: dict[str, Peaks] = {
    "h200": Peaks("NVIDIA H200", 67.0, 4142.0,
                  "docs/cuda.md: FP32 peak ~67 TFLOP/s; copy_uint4 measured 4,142 GB/s"),
    "m1": Peaks("Apple M1", 2.6, 68.0, "metal-benchmarks (2617 GOPS32); Apple: 68 GB/s"),
    "m1max": Peaks("Apple M1 Max", 10.6, 400.0,
                   "metal-benchmarks (10617 GOPS32); Apple: 400 GB/s"),
}  # fmt: skip

# Per Apple-GPU core (philipturner/metal-benchmarks, "On-Chip Memory", Apple 7/8):
# ~60 KB threadgroup memory, at most 3072 resident threads. Registers (~208 KB) can limit
# first; how many a kernel uses only Xcode's pipeline statistics say.
APPLE_TG_MEMORY_PER_CORE = 60_000
APPLE_THREADS_PER_CORE = 3072


def peaks_for(device: str) -> Peaks | None:
    """The peaks for a device name (as metal.device_name() gives it), or None."""
    d = device.lower()
    if "simulator" in d:
        return None
    if "h200" in d:
        return PEAKS["h200"]
    if "m1 max" in d:
        return PEAKS["m1max"]
    if "apple m1" in d and not any(w in d for w in ("pro", "ultra")):
        return PEAKS["m1"]
    return None


def device_peaks() -> Peaks | None:
    """This process's device (see `peaks`)."""
    from camel import metal

    return peaks(metal.device_name(), metal.is_simulator())


def peaks(device: str, simulator: bool) -> Peaks | None:
    """CAMEL_PEAKS="<TFLOP/s>,<GB/s>" if set, else `peaks_for(device)`; None on the
    simulator (its times are CPU times: no roofline)."""
    if simulator:
        return None
    given = config.peaks()
    if given:
        try:
            tflops, gbs = (float(x) for x in given.split(","))
        except ValueError:
            raise SystemExit(
                f'[bench] CAMEL_PEAKS must be "<FP32 TFLOP/s>,<GB/s>", e.g. "2.6,68"; got {given!r}'
            ) from None
        return Peaks(device, tflops, gbs, "CAMEL_PEAKS")
    return peaks_for(device)


def bound_ms(flops: float, nbytes: float, peaks: Peaks) -> float:
    """The roofline: the least time F FLOPs and B bytes can take on this device, in ms."""
    return max(flops / (peaks.tflops * 1e9), nbytes / (peaks.gbs * 1e6))


def percent(flops: float, nbytes: float, ms: float, peaks: Peaks | None) -> str:
    """The "% of roofline" cell as the benches print it: "37%", or "n/a" without peaks."""
    if peaks is None or ms <= 0:
        return "n/a"
    return f"{100.0 * bound_ms(flops, nbytes, peaks) / ms:.0f}%"


def note(peaks: Peaks | None) -> str:
    """One line under a bench table: which peaks the roofline column used."""
    if peaks is None:
        return ("% of roofline: n/a (the simulator, or a device without peaks in "
                'camel/bench/roofline.py; CAMEL_PEAKS="<TFLOP/s>,<GB/s>" gives them)')  # fmt: skip
    return (f"% of roofline: max(FLOPs / {peaks.tflops:g} TFLOP/s, bytes / {peaks.gbs:g} GB/s)"
            f" / measured time ({peaks.name}; {peaks.source})")  # fmt: skip


# ---- the per-rung models ------------------------------------------------------------------


def _predict(flops: float, nbytes: float) -> tuple[float, float]:
    """GFLOP/s the roofline allows on M1 and on M1 Max."""
    return tuple(flops / bound_ms(flops, nbytes, PEAKS[k]) / 1e6 for k in ("m1", "m1max"))


def _tg_per_core(tg_bytes: int, threads: int) -> int:
    """Threadgroups one Apple core can hold by threadgroup memory and threads (registers
    may allow fewer: not counted)."""
    by_mem = APPLE_TG_MEMORY_PER_CORE // tg_bytes if tg_bytes else APPLE_THREADS_PER_CORE
    return min(by_mem, APPLE_THREADS_PER_CORE // threads)


# Threadgroup-memory traffic of one K step of each GEMM rung, per threadgroup:
# (bytes read from threadgroup memory, bytes written to it). Reads: what the threads load
# per FMA as the code is written; writes: the A and B tiles, once per K step.
def _gemm_tg_traffic(v: str, rung) -> tuple[float, float]:
    """(tg bytes read, tg bytes written) per FMA for rung v (None entries: no tg memory)."""
    if v in ("1", "2"):
        return 0.0, 0.0
    bm, bn = rung.bm, rung.bn
    write = F32 * (bm + bn) / (bm * bn)  # (BM + BN)·BK floats stored per BM·BN·BK FMAs
    if v == "3":
        return 2.0 * F32, write  # As and Bs: 2 loads per FMA
    if v == "4":
        return (8 + 1) / 8 * F32, write  # 8 As + 1 Bs loads per 8 FMAs (TM = 8)
    if v in ("10", "11"):
        # per K step of 8 a SIMD group loads 8 fragments of 64 floats for 16 × 512 FMAs
        return 8 * 64 * F32 / (16 * 512), write
    if v == "12" or v.startswith("sg_"):  # FM + FN fragments for FM·FN multiplies
        fm, fn = (4, 4) if v == "12" else map(int, v.rsplit("_", 1)[-1].split("x"))
        return (fm + fn) * 64 * F32 / (fm * fn * 512), write
    tm, tn = _tmtn(v, rung)
    return F32 * (tm + tn) / (tm * tn), write  # an outer product: TM + TN loads, TM·TN FMAs


def _tmtn(v: str, rung) -> tuple[int, int]:
    if v == "5":
        return 8, 8
    if "warptile" in rung.kernel or "wtile" in rung.kernel:
        # v15 and its variants end in the SIMD-group tile WM x WN; a thread owns
        # (WM/32) x (WN/16) blocks of 4 x 4 (camel/gemm.py, _wtile)
        wm, wn = map(int, rung.kernel.rsplit("_", 1)[-1].split("x"))
        return wm // 8, wn // 4
    # v6-v9 and variants: (BM/TM)·(BN/TN) = threads; the name says TMxTN last
    tm, tn = rung.kernel.rsplit("_", 1)[-1].split("x") if v != "6" else ("8", "8")
    return int(tm), int(tn)


def gemm_rows(n: int = 4096) -> list[dict]:
    """One dict per GEMM rung at M = N = K = n: FLOPs, device bytes the loads request
    (each threadgroup reads its BM×K strip of A and K×BN strip of B; v1/v2: every thread
    reads its row and column, caches aside), tg bytes per FMA, threadgroups per Apple core,
    and the roofline GFLOP/s on M1 and M1 Max."""
    from camel import gemm

    rows = []
    flops = 2.0 * n**3
    compulsory = F32 * 3 * n * n
    for v, rung in gemm.RUNGS.items():
        if v in ("1", "2"):
            dev = F32 * (2.0 * n**3 + n * n)  # 2 loads per FMA, no reuse but the cache's
        else:
            dev = F32 * (n**3 / rung.bn + n**3 / rung.bm + n * n)
        rd, wr = _gemm_tg_traffic(v, rung)
        m1, m1max = _predict(flops, dev)
        rows.append(dict(version=v, kernel=rung.kernel, tile=f"{rung.bm}x{rung.bn}",
                         threads=rung.nthreads, tg_bytes=rung.tg_bytes, flops=flops,
                         dev_bytes=dev, compulsory=compulsory, tg_read=rd, tg_write=wr,
                         tg_per_core=_tg_per_core(rung.tg_bytes, rung.nthreads),
                         m1=m1, m1max=m1max))  # fmt: skip
    return rows


def flash_rows(t: int = 4096, d: int = 64, heads: int = 16) -> list[dict]:
    """One dict per flash rung (full attention, B = 1): FLOPs 4·T²·D per head (the benches'
    count); executed matrix FMAs add the diag(alpha) rescale (ND per key block and SIMD
    group; none in v7, which scales in registers); device bytes: Q read and O, lse
    written once, K and V read once per query block; tg bytes per FMA from fragment loads,
    the softmax's trip through threadgroup memory (not in v7) and the K/V chunk stores.
    Also the naive path (Stage 5A) at the same size."""
    from camel import flash

    rows = []
    flops = heads * 4.0 * t * t * d
    for name, rung in flash.RUNGS.items():
        br, bc = rung.tile(d)
        threads = rung.threads(d)
        if rung.simt:
            fma_exec, rescale, tg = _simt_counts(br, bc, d, threads, flops)
        else:
            fma_exec, rescale, tg = _matrix_counts(rung, br, bc, t, d, heads)
        dev = F32 * heads * (2 * t * d + t + (t // br) * 2 * t * d)
        m1, m1max = _predict(flops, dev)
        tg_bytes = rung.tg_bytes(d)
        rows.append(dict(name=name, tile=f"{br}x{bc}", threads=threads, flops=flops,
                         fma_exec=fma_exec, rescale=rescale, dev_bytes=dev, tg_per_fma=tg,
                         tg_bytes=tg_bytes, tg_per_core=_tg_per_core(tg_bytes, threads), m1=m1,
                         m1max=m1max))  # fmt: skip
    # naive: q·kᵀ and P·V as GEMMs (v9 tiles), the (T, T) scores written, softmaxed (read +
    # write; the 1/sqrt(D) scale applied inside the softmax) and read by P·V
    tt = heads * t * t * F32
    dev = 4 * tt + F32 * heads * (4 * t * d) + 2 * heads * F32 * t * t * d * (1 / 64 + 1 / 128)
    m1, m1max = _predict(flops, dev)
    rows.append(dict(name="naive", tile="-", threads=0, flops=flops, fma_exec=flops / 2,
                     rescale=0.0, dev_bytes=dev, tg_per_fma=float("nan"), tg_bytes=0,
                     tg_per_core=0, m1=m1, m1max=m1max))  # fmt: skip
    return rows


def _matrix_counts(rung, br: int, bc: int, t: int, d: int, heads: int):
    """(executed FMAs, rescale share of P·V, threadgroup bytes per FMA) of a
    simdgroup_matrix rung (v1-v9), per SIMD group and key block: S (NC·ND) + P·V (NC·ND) +
    rescale (ND) multiplies; v7 rescales in registers (no multiply) and keeps S and P
    there (no tile trips)."""
    nc, nd, sgs = bc // 8, d // 8, br // 8
    reg = rung.reg_softmax
    mma = 2 * nc * nd + (0 if reg else nd)
    fma_exec = heads * (t // br) * (t // bc) * sgs * mma * 512
    frag_loads = 2 * nc * nd * 64 * F32  # K and V fragments
    softmax = 0 if reg else 4 * 8 * bc * F32  # store S, lanes read/write P, load P back
    chunk_stores = 2 * bc * d * F32  # K and V of one block into threadgroup memory
    tg = (sgs * (frag_loads + softmax) + chunk_stores) / (sgs * mma * 512)
    return fma_exec, 0.0 if reg else 1 / nc, tg


def _simt_counts(br: int, bc: int, d: int, threads: int, flops: float):
    """The same for v10-v12 (flash_forward_simt): scalar FMAs, exactly the useful ones (the O
    rescale is a multiply per element, as v7's: no matrix work); threadgroup bytes per FMA
    from a lane's float4 reads (S: 4 of Q and B_c / 8 of K per float4 of D; P·V: 1 of P and
    D / 32 of V per key; its P written once) and the K/V block stores."""
    lane_reads = 16 * (d // 4 * (4 + bc // 8) + bc * (1 + d // 32) + bc // 8)
    block_tg = threads * lane_reads + 2 * bc * d * F32
    return flops / 2, 0.0, block_tg / (2 * br * bc * d)  # S and P·V: br·bc·d FMAs each


def launch_makespan(rung, t: int, heads: int, d: int, causal: bool, slots: int) -> int:
    """Key blocks until the last threadgroup of one attention call ends, if `slots`
    threadgroups run at once (SMs x resident threadgroups each), each takes the first free
    slot in launch order, and a threadgroup's time is its number of key blocks (causal:
    tile x of B_r rows reads the keys up to its last row)."""
    import heapq

    br, bc = rung.tile(d)
    free = [0] * slots
    end = 0
    for _, tile in rung.launch_order(t, heads, d):
        keys = min(t, (tile + 1) * br) if causal else t
        done = heapq.heappop(free) + -(-keys // bc)  # the block count, rounded up
        heapq.heappush(free, done)
        end = max(end, done)
    return end


# (rung, threadgroups an H100/H200 SM holds, where that figure comes from)
SCHEDULE_CASES = [
    ("flash_v7", 1, "ncu: one threadgroup an SM (docs/cuda.md)"),
    ("flash_v9", 1, "ncu: one threadgroup an SM"),
    ("flash_v11", 4, "ptxas: 128 registers, 128 threads"),
    ("flash_v12", 4, "ptxas: 128 registers, 128 threads"),
]


def schedule_table(t: int = 4096, heads: int = 16, d: int = 64, sms: int = 132) -> str:
    """Causal against full attention under the launch model (launch_makespan) on an
    H100/H200's SMs: the time a causal call takes, as a share of the full call's. Half
    the key blocks is the least (0.50 plus the diagonal)."""
    from camel import flash

    lines = [
        f"Launch order, causal against full, B = 1, H = {heads}, T = {t}, D = {d}, {sms} SMs "
        "(a model: each threadgroup's time its key blocks; not measured).",
        "",
        "| rung | launch order | threadgroups an SM | causal / full | residency from |",
        "|---|---|---:|---:|---|",
    ]
    for name, per_sm, source in SCHEDULE_CASES:
        rung = flash.RUNGS[name]
        causal, full = (launch_makespan(rung, t, heads, d, c, sms * per_sm) for c in (True, False))
        order = "heaviest tiles first" if rung.heavy_first else "tile index, head by head"
        lines.append(f"| {name} | {order} | {per_sm} | {causal / full:.2f} | {source} |")
    return "\n".join(lines)


# (kernel, FLOPs per element, device bytes per element the bench counts, what)
MEMORY_KERNELS = [
    ("copy_uint4", 0, 8, "Stage 1: read 4 B, write 4 B"),
    ("add_float / add_float4", 1, 12, "Stage 1: read a, b; write out"),
    ("relu_float4", 1, 8, "Stage 1"),
    ("sum last axis", 1, 4, "Stage 2: read x (the row sums are negligible)"),
    ("softmax", 5, 8, "Stage 2: compulsory read + write; the 3 sweeps read x 3 times"),
    ("softmax_backward", 4, 12, "Stage 2: read y, dy; write dx"),
    ("layer_norm v1", 8, 16, "Stage 4: x read 3 times + out (the bench counts 8 B)"),
    ("layer_norm v2", 8, 12, "Stage 4: x read twice + out (the bench counts 8 B)"),
    ("layer_norm v3", 8, 8, "Stage 4: x read once + out"),
    ("gelu", 10, 8, "Stage 4"),
]


def memory_rows(elements: int = 1 << 26) -> list[dict]:
    """The memory-bound kernels at `elements` floats (64 M: 256 MiB, the benches' largest):
    the roofline time on M1, M1 Max and the H200."""
    rows = []
    for name, fpe, bpe, what in MEMORY_KERNELS:
        f, b = fpe * elements, bpe * elements
        ms = {k: bound_ms(f, b, p) for k, p in PEAKS.items()}
        rows.append(dict(name=name, bytes_per_element=bpe, flops_per_byte=fpe / bpe,
                         m1_ms=ms["m1"], m1max_ms=ms["m1max"], h200_ms=ms["h200"],
                         what=what))  # fmt: skip
    return rows


# ---- Markdown ------------------------------------------------------------------------------


def _gb(x: float) -> str:
    return f"{x / 1e9:,.2f}"


def _g(x: float) -> str:
    """Giga-units for a sentence: 137, 2.15, 0.268."""
    v = x / 1e9
    return f"{v:,.0f}" if v >= 100 else f"{v:.3g}"


def gemm_table(n: int = 4096) -> str:
    lines = [
        f"GEMM at M = N = K = {n}: {_g(2 * n**3)} GFLOP; compulsory device bytes "
        f"{_gb(F32 * 3 * n * n)} GB (A, B read once, C written once). Predicted = "
        "roofline GFLOP/s from these counts (not measured).",
        "",
        "| rung | tile | threads | tg KiB | device GB requested | tg B/FMA (read + write)"
        " | ≤ TGs per Apple core | M1 bound GFLOP/s | M1 Max bound GFLOP/s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in gemm_rows(n):
        tg = f"{r['tg_read']:.2f} + {r['tg_write']:.3f}" if r["tg_bytes"] else "0 (none)"
        lines.append(
            f"| {r['version']} | {r['tile']} | {r['threads']} | {r['tg_bytes'] / 1024:g} | "
            f"{_gb(r['dev_bytes'])} | {tg} | {r['tg_per_core']} | {r['m1']:,.0f} | "
            f"{r['m1max']:,.0f} |"
        )
    return "\n".join(lines)


def flash_table(t: int = 4096, d: int = 64, heads: int = 16) -> str:
    rows = flash_rows(t, d, heads)
    lines = [
        f"Attention forward, B = 1, H = {heads}, T = {t}, D = {d}, full (not causal): "
        f"{_g(rows[0]['flops'])} GFLOP (4·T²·D per head). Predicted = roofline "
        "TFLOP/s from these counts (not measured).",
        "",
        "| path | tile | threads | tg KiB | device GB | tg B/FMA | rescale work (of P·V)"
        " | ≤ TGs per Apple core | M1 bound TFLOP/s | M1 Max bound TFLOP/s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r["name"] == "naive":
            tg_kib = tg_fma = rescale = "-"
        else:
            tg_kib = f"{r['tg_bytes'] / 1024:.3g}"
            tg_fma = f"{r['tg_per_fma']:.2f}"
            rescale = f"+{100 * r['rescale']:.1f} %"
        lines.append(
            f"| {r['name']} | {r['tile']} | {r['threads'] or '-'} | {tg_kib} | "
            f"{_gb(r['dev_bytes'])} | {tg_fma} | {rescale} | {r['tg_per_core'] or '-'} | "
            f"{r['m1'] / 1e3:.2f} | {r['m1max'] / 1e3:.2f} |"
        )
    return "\n".join(lines)


def memory_table(elements: int = 1 << 26) -> str:
    lines = [
        f"Memory-bound kernels at {elements:,} floats ({elements * F32 / 2**20:,.0f} MiB per "
        "array): the least time the bytes allow (roofline), ms.",
        "",
        "| kernel | bytes / element | FLOP / byte | M1 (68 GB/s) | M1 Max (400 GB/s) |"
        " H200 (4,142 GB/s copy) | |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in memory_rows(elements):
        lines.append(
            f"| {r['name']} | {r['bytes_per_element']} | {r['flops_per_byte']:.2f} | "
            f"{r['m1_ms']:.2f} | {r['m1max_ms']:.2f} | {r['h200_ms']:.3f} | {r['what']} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m camel.bench roofline", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("what", nargs="?", default="all", choices=["all", "gemm", "flash", "memory"])
    ap.add_argument("--size", type=int, default=4096, help="GEMM M = N = K (default 4096)")
    ap.add_argument("--seq", type=int, default=4096, help="attention T (default 4096)")
    ap.add_argument("--dim", type=int, default=64, help="attention head dim D (default 64)")
    args = ap.parse_args(argv)
    parts = []
    if args.what in ("all", "gemm"):
        parts.append(gemm_table(args.size))
    if args.what in ("all", "flash"):
        parts.append(flash_table(args.seq, args.dim))
        parts.append(schedule_table(args.seq, d=args.dim))
    if args.what in ("all", "memory"):
        parts.append(memory_table())
    print("\n\n".join(parts))
    return 0
