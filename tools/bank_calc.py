"""Threadgroup-memory bank conflicts of camel's kernels, computed on any machine.

    python tools/bank_calc.py                  # every kernel's threadgroup accesses
    python tools/bank_calc.py gemm flash       # some families: gemm, flash, reduce
                                               # (flash: the score tile, then v6 64x32
                                               # against v8, its padded-row twin, then
                                               # v9's staged chunk stores, then v10's
                                               # float4 tiles)
    python tools/bank_calc.py --stride 33      # one SIMD group reading a float column
    python tools/bank_calc.py gemm --pad 4     # what if v6-v9's tiles had padded rows

For each threadgroup-memory access of a kernel (one instruction of one SIMD group, 32
lanes), it prints the n-way conflict: how many times the access is replayed because lanes
hit different words of one bank (n = 1: conflict-free). The addresses come from the same
index arithmetic as the kernels in shaders/*.metal (the comment on each pattern says
which line); nothing runs on a GPU.

The bank model, and how far to trust it:
  * NVIDIA documents it: 32 banks of 4 bytes; word w is in bank w % 32; lanes reading the
    same word share it (broadcast); 8- and 16-byte accesses are served in phases of 16 and
    8 lanes. `ncu` counts the extra replays as l1tex__data_bank_conflicts_pipe_lsu_mem_
    shared_op_ld / _st (the columns in docs/cuda.md).
  * Wavefronts (the last column): shared memory returns 128 bytes a cycle, one wavefront,
    so a conflict-free 16-byte read of 32 lanes takes 4 (one a phase). A read whose lanes
    pair up (every active lane reads what lane l ^ 1 reads, or every one what lane l ^ 2
    reads) has two lanes share each returned word, and a phase serves twice the lanes: 2
    wavefronts. That rule is an NVIDIA engineer's answer on NVIDIA's forum for compute
    capability 7.x, and an H100 user's ncu counts there fit it (16 lanes of one address,
    16 of another: 2 wavefronts; lanes l and l + 16 sharing: no fewer); it is not in
    NVIDIA's documentation. ncu's l1tex__data_pipe_lsu_wavefronts_mem_shared_op_ld counts
    them (flash v10 against v11 in docs/stage5b.md).
  * For Apple GPUs it is an ASSUMPTION. Apple documents no bank layout
    (philipturner/metal-benchmarks lists Apple's bank size and count as "TBD"); the
    indirect evidence is that MLX pads its threadgroup tiles by 16 bytes a row, which only
    helps if rows a power of two apart collide. Read the Apple column as "what happens if
    Apple's threadgroup memory is banked like NVIDIA's".
  * simdgroup_load / simdgroup_store: which lane touches which element is not in the Metal
    specification. The patterns here use the CUDA shim's layout (lane l holds row l / 4,
    columns 2 (l % 4) and +1, docs/cuda.md), i.e. they are right for the H200 runs and an
    illustration for Apple GPUs, where one simdgroup_load may be one wide access. The
    shim's default tf32x3 multiply reads a B operand through its transposed pair (the
    flash rows list both patterns). Every access is taken as 4 bytes a lane, as the PTX
    has them; ptxas merges some adjacent pairs into 8-byte LDS.64/STS.64, not followed.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

LANES = 32
BANKS = 32
BANK_BYTES = 4


def _phase_passes(words, width: int, lanes_per_phase: int, banks: int = BANKS,
                  bank_bytes: int = BANK_BYTES) -> list[int]:  # fmt: skip
    """Passes of each phase that has an active lane: a bank holding k different touched
    words costs k (lanes reading one word share it: broadcast)."""
    per_word = width // bank_bytes
    out = []
    for p0 in range(0, len(words), lanes_per_phase):
        touched: dict[int, set[int]] = {}
        for w in words[p0 : p0 + lanes_per_phase]:
            if w is None:
                continue
            for i in range(per_word):
                touched.setdefault((w + i) % banks, set()).add(w + i)
        if touched:
            out.append(max(len(s) for s in touched.values()))
    return out


def conflict(words, width: int = 4, banks: int = BANKS, bank_bytes: int = BANK_BYTES):
    """(n-way, replays / phases) of one access: `words` = the first 4-byte word each lane
    touches (None: an inactive lane), `width` = bytes per lane (4, 8 or 16).
    A phase serves 128 bytes' worth of lanes (32 at 4 B, 16 at 8 B, 8 at 16 B); within a
    phase a bank holding k different touched words costs k passes (same word: broadcast)."""
    lanes_per_phase = max(1, min(len(words), banks * bank_bytes // width))
    passes = _phase_passes(words, width, lanes_per_phase, banks, bank_bytes)
    return max(passes, default=1), (sum(passes) / len(passes) if passes else 1.0)


def paired(words) -> bool:
    """Every active lane reads what lane l ^ 1 reads, or every one what lane l ^ 2 reads."""

    def pairs(x):
        return all(words[lane] == words[lane ^ x] for lane in range(len(words))
                   if words[lane] is not None and lane ^ x < len(words))  # fmt: skip

    return pairs(1) or pairs(2)


def wavefronts(words, width: int = 4, op: str = "ld") -> int:
    """128-byte wavefronts of one access (the module's docstring): the passes of every
    phase, a read of paired lanes in phases of twice the lanes."""
    lanes_per_phase = max(1, min(len(words), BANKS * BANK_BYTES // width))
    if op == "ld" and paired(words):
        lanes_per_phase = min(len(words), 2 * lanes_per_phase)
    return sum(_phase_passes(words, width, lanes_per_phase))


@dataclass
class Access:
    kernel: str
    what: str  # which access, in the kernel's words
    op: str  # "ld" or "st"
    words: list  # per lane: the first word index it touches (None: inactive)
    width: int = 4  # bytes per lane
    note: str = ""

    @property
    def degree(self) -> int:
        return conflict(self.words, self.width)[0]

    @property
    def wavefronts(self) -> int:
        return wavefronts(self.words, self.width, self.op)


def lanes(sg: int = 0) -> range:
    """Thread indices in the threadgroup of SIMD group sg's 32 lanes."""
    return range(sg * LANES, (sg + 1) * LANES)


def worst_over_simd_groups(make, threads: int, *args):
    """make(t_list, *args) -> words; the worst n-way over all SIMD groups of a threadgroup."""
    best = None
    for sg in range(max(1, threads // LANES)):
        words = make(list(lanes(sg)), *args)
        best = words if best is None or conflict(words)[0] > conflict(best)[0] else best
    return best


# ---- patterns every lesson uses -------------------------------------------------------------


def column(stride: int) -> list[int]:
    """32 lanes reading one float each down a column of a row-major tile: word lane·stride."""
    return [lane * stride for lane in range(LANES)]


def row() -> list[int]:
    """32 lanes reading 32 consecutive floats."""
    return list(range(LANES))


def broadcast() -> list[int]:
    """32 lanes reading the same float."""
    return [0] * LANES


# ---- GEMM (shaders/ops_matmul.metal) --------------------------------------------------------


def _load_tile_scalar(t_list, R, S, T, dr, ds, contiguous_s=True):
    """load_tile<R, S, T>: element e = t (first iteration) goes to dst[r·dr + s·ds]."""
    out = []
    for e in t_list:
        r, s = (e // S, e % S) if contiguous_s else (e % R, e // R)
        out.append(r * dr + s * ds)
    return out


def _load_tile_vec4(t_list, R, S, dr, ds, q=0):
    """load_tile_vec4<R, S, T>: float4 e = t lands as 4 scalar stores d[q·ds], d = r·dr + s·ds."""
    out = []
    for e in t_list:
        r, s = e // (S // 4), (e % (S // 4)) * 4
        out.append(r * dr + s * ds + q * ds)
    return out


def gemm_v3():
    # matmul_v3_tiled: thread t = ty·32 + tx; As[row·32 + k], Bs[k·32 + col], k = 0
    t = list(lanes(0))
    return [
        Access("matmul_v3", "store As / Bs (A not transposed)", "st",
               _load_tile_scalar(t, 32, 32, 1024, 32, 1)),
        Access("matmul_v3", "store As, A transposed (trans_a: r = e % 32)", "st",
               _load_tile_scalar(t, 32, 32, 1024, 32, 1, contiguous_s=False),
               note="a column write at stride 32"),
        Access("matmul_v3", "read As[row·32 + k] (row = t / 32: one per SIMD group)", "ld",
               [(e // 32) * 32 for e in t]),
        Access("matmul_v3", "read Bs[k·32 + col]", "ld", [e % 32 for e in t]),
    ]  # fmt: skip


def gemm_v4():
    # matmul_v4_blocktile1d: BM = BN = 64, BK = 8, TM = 8, 512 threads; c = t % 64, r = t / 64
    t = list(lanes(0))
    return [
        Access("matmul_v4", "store As[m·8 + k]", "st", _load_tile_scalar(t, 64, 8, 512, 8, 1)),
        Access("matmul_v4", "store Bs[k·64 + n]", "st", _load_tile_scalar(t, 8, 64, 512, 64, 1)),
        Access("matmul_v4", "read As[(r·8 + i)·8 + k]", "ld", [((e // 64) * 8) * 8 for e in t]),
        Access("matmul_v4", "read Bs[k·64 + c]", "ld", [e % 64 for e in t]),
    ]  # fmt: skip


def gemm_v5():
    # matmul_v5_blocktile2d: 128x128x8, 8x8 per thread; tc = t % 16, tr = t / 16
    t = list(lanes(0))
    return [
        Access("matmul_v5", "store As[m·8 + k]", "st", _load_tile_scalar(t, 128, 8, 256, 8, 1)),
        Access("matmul_v5", "store Bs[k·128 + n]", "st",
               _load_tile_scalar(t, 8, 128, 256, 128, 1)),
        Access("matmul_v5", "read As[(tr·8 + i)·8 + k]", "ld", [(e // 16) * 64 for e in t]),
        Access("matmul_v5", "read Bs[k·128 + tc·8 + j]", "ld", [(e % 16) * 8 for e in t],
               note="8 floats apart: 4 lanes per bank"),
    ]  # fmt: skip


def gemm_blocktile(version: str, bm: int, bn: int, bk: int, tm: int, tn: int, pad: int = 0):
    # matmul_blocktile_vec4<BM, BN, BK, TM, TN> (v6-v9): As[k][m] (A transposed on the way
    # in), Bs[k][n]; float4 reads reg_m = As4[(k·BM + tr·TM)/4 + i], reg_n likewise.
    # pad > 0: what-if row strides BM + pad and BN + pad (v6-v9 are not built so; v13
    # stores v9's tiles with pad 4, so "matmul_v9 pad 4" is v13's stores; the reads at one
    # k shift all lanes alike, so only the stores change)
    threads = (bm // tm) * (bn // tn)
    name = f"matmul_v{version}" + (f" pad {pad}" if pad else "")
    lda, ldb = bm + pad, bn + pad
    cols = bn // tn

    def st_a(t_list):
        return max((_load_tile_vec4(t_list, bm, bk, 1, lda, q) for q in range(4)),
                   key=lambda w: conflict(w)[0])  # fmt: skip

    def st_b(t_list):
        return max((_load_tile_vec4(t_list, bk, bn, ldb, 1, q) for q in range(4)),
                   key=lambda w: conflict(w)[0])  # fmt: skip

    return [
        Access(name, f"store As[k·{lda} + m] (transposing A; 4 scalar stores)", "st",
               worst_over_simd_groups(st_a, threads)),
        Access(name, f"store Bs[k·{ldb} + n] (4 scalar stores)", "st",
               worst_over_simd_groups(st_b, threads)),
        Access(name, f"store Bs[k·{ldb} + n] if merged into one float4 store", "st",
               worst_over_simd_groups(lambda ts: _load_tile_vec4(ts, bk, bn, ldb, 1), threads),
               16, note="the compiler may merge"),
        Access(name, f"read As4: float4 at tr·{tm}", "ld",
               worst_over_simd_groups(lambda ts: [(e // cols) * tm for e in ts], threads), 16),
        Access(name, f"read Bs4: float4 at tc·{tn}", "ld",
               worst_over_simd_groups(lambda ts: [(e % cols) * tn for e in ts], threads), 16),
    ]  # fmt: skip


def _swz(k: int, bk: int, swizzle: bool = True) -> int:
    """swz<BK>(k) of ops_matmul.metal (v15): float4 slot c of row k is stored at c ^ swz."""
    return ((k // 4) * (32 // bk)) % 8 if swizzle else 0


def gemm_warptile(version: str, bm: int, bn: int, bk: int, wm: int, wn: int,
                  swizzle: bool = True):  # fmt: skip
    # matmul_warptile<BM, BN, BK, WM, WN> (v15): As[k][m] and Bs[k][n], float4 slot c of
    # row k at c ^ swz(k) (stash_swizzled); reads a[i] = As4[k·BM/4 + ((am4 + 8i) ^ swz(k))]
    # with am4 = wm/4 + lane % 8, b[j] = Bs4[k·BN/4 + ((bn4 + 4j) ^ swz(k))], bn4 = wn/4 +
    # lane / 8. swizzle=False: the what-if of the same tiles unswizzled (not built).
    threads = 32 * (bm // wm) * (bn // wn)
    name = (f"matmul_v{version}" if version.isdigit() else f"matmul_{version}") + (
        "" if swizzle else " unswizzled"
    )
    gn = bn // wn

    def rows_c(t_list, cols, q):  # a (C, BK) tile, rows c: element q of float4 e
        out = []
        for e in t_list:
            c, k = e // (bk // 4), (e % (bk // 4)) * 4
            out.append((k + q) * cols + 4 * ((c // 4) ^ _swz(k, bk, swizzle)) + c % 4)
        return out

    def rows_k(t_list, cols):  # a (BK, C) tile, rows k: float4 e
        out = []
        for e in t_list:
            k, c4 = e // (cols // 4), e % (cols // 4)
            out.append(k * cols + 4 * (c4 ^ _swz(k, bk, swizzle)))
        return out

    def transposing(cols):
        return lambda ts: max((rows_c(ts, cols, q) for q in range(4)),
                              key=lambda w: conflict(w)[0])  # fmt: skip

    def read(cols, base, step, count):  # base(t) in float4 slots; worst over k and i
        def make(t_list):
            cands = [[k * cols + 4 * ((base(t) + step * i) ^ _swz(k, bk, swizzle)) for t in t_list]
                     for k in range(bk) for i in range(count)]  # fmt: skip
            return max(cands, key=lambda w: conflict(w, 16)[0])

        return make

    a_base = lambda t: ((t // 32) // gn) * wm // 4 + (t % 32) % 8  # noqa: E731
    b_base = lambda t: ((t // 32) % gn) * wn // 4 + (t % 32) // 8  # noqa: E731
    return [
        Access(name, "store As (A stored (M, K): 4 scalar stores into 4 rows k)", "st",
               worst_over_simd_groups(transposing(bm), threads)),
        Access(name, "store As (A stored (K, M), trans_a: float4)", "st",
               worst_over_simd_groups(lambda ts: rows_k(ts, bm), threads), 16),
        Access(name, "store Bs (B stored (K, N): float4)", "st",
               worst_over_simd_groups(lambda ts: rows_k(ts, bn), threads), 16),
        Access(name, "store Bs (B stored (N, K), trans_b: 4 scalar stores)", "st",
               worst_over_simd_groups(transposing(bn), threads)),
        Access(name, "read As4: float4 at slot wm/4 + lane % 8 + 8i", "ld",
               worst_over_simd_groups(read(bm // 4 * 4, a_base, 8, wm // 32), threads), 16),
        Access(name, "read Bs4: float4 at slot wn/4 + lane / 8 + 4j", "ld",
               worst_over_simd_groups(read(bn // 4 * 4, b_base, 4, wn // 16), threads), 16),
    ]  # fmt: skip


WARPTILE_RUNGS = {
    "15": (128, 128, 16, 64, 32),
    "wt_128x128x8_64x32": (128, 128, 8, 64, 32),
    "wt_128x64x16_64x32": (128, 64, 16, 64, 32),
    "wt_128x64x8_32x32": (128, 64, 8, 32, 32),
    "wt_64x64x16_32x32": (64, 64, 16, 32, 32),
}  # fmt: skip


def _sg_frag(base: int, ld: int, j: int, transpose: bool = False) -> list[int]:
    """simdgroup_load/store of an 8x8 fragment at `base`, row stride ld, element j of 2, in
    the CUDA shim's layout: lane l has row l / 4, column 2 (l % 4) + j."""
    out = []
    for lane in range(LANES):
        r, c = lane // 4, 2 * (lane % 4) + j
        out.append(base + (c * ld + r if transpose else r * ld + c))
    return out


def _worst(*word_lists, width: int = 4, op: str = "ld"):
    """The access of the most passes (then wavefronts) among word_lists."""
    return max(word_lists, key=lambda w: (conflict(w, width)[0], wavefronts(w, width, op)))


def gemm_simdgroup(version: str = "10", lda: int = 20, ldb: int = 68, buffer: int = 0):
    # matmul_v10_simdgroup / v11: As[m·SG_LDA + k] (BK = 16), Bs[k·SG_LDB + n] (BN = 64);
    # SG_LDA = 20, SG_LDB = 68 are the padded strides (16 and 64 unpadded). v11's second
    # buffer starts SG_BM·SG_LDA and SG_BK·SG_LDB floats on: a shift all lanes share.
    name = f"matmul_v{version}" + (f" (buffer {buffer})" if buffer else "")
    padded = "padded" if (lda, ldb) == (20, 68) else "unpadded"
    a0, b0 = buffer * 64 * lda, buffer * 16 * ldb
    t = list(lanes(0))

    def shift(words, by):
        return [w + by for w in words]

    return [
        Access(name, f"store As, row stride {lda} ({padded})", "st",
               _worst(*(shift(_load_tile_vec4(t, 64, 16, lda, 1, q), a0) for q in range(4)))),
        Access(name, f"store Bs, row stride {ldb} ({padded})", "st",
               _worst(*(shift(_load_tile_vec4(t, 16, 64, ldb, 1, q), b0) for q in range(4)))),
        Access(name, f"store As, stride {lda}, if merged into one float4 store", "st",
               shift(_load_tile_vec4(t, 64, 16, lda, 1), a0), 16, note="the compiler may merge"),
        Access(name, f"store Bs, stride {ldb}, if merged into one float4 store", "st",
               shift(_load_tile_vec4(t, 16, 64, ldb, 1), b0), 16, note="the compiler may merge"),
        Access(name, f"simdgroup_load A fragment, stride {lda}", "ld",
               _worst(_sg_frag(a0, lda, 0), _sg_frag(a0, lda, 1)), note="CUDA shim layout"),
        Access(name, f"simdgroup_load B fragment, stride {ldb}", "ld",
               _worst(_sg_frag(b0, ldb, 0), _sg_frag(b0, ldb, 1)), note="CUDA shim layout"),
    ]  # fmt: skip


BLOCKTILE_RUNGS = {"6": (128, 128, 8, 8, 8), "7": (64, 64, 8, 4, 4),
                   "8": (128, 128, 16, 8, 8), "9": (128, 64, 16, 8, 4)}  # fmt: skip


def gemm_accesses(pad: int = 0):
    out = gemm_v3() + gemm_v4() + gemm_v5()
    for v, sizes in BLOCKTILE_RUNGS.items():
        out += gemm_blocktile(v, *sizes)
        if pad:
            out += gemm_blocktile(v, *sizes, pad=pad)
    return (
        out
        + gemm_simdgroup("10", 20, 68)
        + gemm_simdgroup("11", 20, 68, buffer=1)
        + gemm_simdgroup("10 unpadded", 16, 64)
        + [a for v, sizes in WARPTILE_RUNGS.items() for a in gemm_warptile(v, *sizes)]
        + gemm_warptile("15", *WARPTILE_RUNGS["15"], swizzle=False)
    )


# ---- flash attention (shaders/ops_attention.metal) ------------------------------------------


def flash_walk(
    ld: int, bc: int, swizzle: bool, n: int | None = None, row_mask: int = 7
) -> list[int]:
    """The softmax's lanes on the score tile: lane 4r + qd reads s_sg[r·ld + c] with
    c = 4n + qd (v1) or 4 (n ^ (r & row_mask)) + qd (v2+: row_mask 7; the Stage 5B
    exercise breaks it with row_mask 1); the worst step n unless n is given."""
    steps = range(bc // 4) if n is None else [n]
    lists = []
    for step in steps:
        words = []
        for lane in range(LANES):
            r, qd = lane // 4, lane % 4
            c = 4 * (step ^ (r & row_mask)) + qd if swizzle else 4 * step + qd
            words.append(r * ld + c)
        lists.append(words)
    return _worst(*lists)


def flash_accesses(bc: int = 64):
    tag = f"flash (B_c = {bc})"
    return [
        Access(tag, "softmax walk, stride B_c, no swizzle (v1)", "ld",
               flash_walk(bc, bc, False)),
        Access(tag, "softmax walk, stride B_c, XOR swizzle (v2-v6)", "ld",
               flash_walk(bc, bc, True)),
        Access(tag, "softmax walk, stride B_c, broken swizzle 4 (n ^ (r & 1)) + qd", "ld",
               flash_walk(bc, bc, True, row_mask=1), note="Stage 5B's exercise: 2 groups"),
        Access(tag, f"softmax walk, padded stride {bc + 4}, no swizzle", "ld",
               flash_walk(bc + 4, bc, False), note="v8 does this at B_c = 32"),
        Access(tag, f"simdgroup_store of scores, stride {bc}", "st",
               _worst(_sg_frag(0, bc, 0), _sg_frag(0, bc, 1)), note="CUDA shim layout"),
        Access(tag, f"simdgroup_store of scores, padded stride {bc + 4}", "st",
               _worst(_sg_frag(0, bc + 4, 0), _sg_frag(0, bc + 4, 1)), note="CUDA shim layout"),
        Access(tag, "K chunk: simdgroup_load transposed, DK = 32 (v1, v2)", "ld",
               _worst(_sg_frag(0, 32, 0, True), _sg_frag(0, 32, 1, True)),
               note="CUDA shim layout"),
        Access(tag, "K chunk: simdgroup_load transposed, DK = 16 (v3-v5)", "ld",
               _worst(_sg_frag(0, 16, 0, True), _sg_frag(0, 16, 1, True)),
               note="CUDA shim layout"),
        Access(tag, "V chunk: simdgroup_load, DK = 32 (v1, v2)", "ld",
               _worst(_sg_frag(0, 32, 0), _sg_frag(0, 32, 1)), note="CUDA shim layout"),
        Access(tag, "V chunk: simdgroup_load, DK = 16 (v3-v5)", "ld",
               _worst(_sg_frag(0, 16, 0), _sg_frag(0, 16, 1)), note="CUDA shim layout"),
        Access(tag, "K/V chunk store tile4[e] (float4, consecutive e)", "st",
               [4 * lane for lane in range(LANES)], 16),
    ]  # fmt: skip


def _chunk_store(dk: int, ld: int, buffer: int = 0) -> list[int]:
    """load_kv_chunk: float4 e = t lands at row e / (DK/4), float column 4 (e % (DK/4)),
    row stride ld; the second chunk buffer starts 32 ld floats on (B_c = 32)."""
    return [(e // (dk // 4)) * ld + (e % (dk // 4)) * 4 + buffer * 32 * ld for e in lanes(0)]


def flash_rung_accesses(name: str, bc: int = 32, pad: int = 0, swizzle: bool = True,
                        dks=(32, 64)):  # fmt: skip
    """One 64 x B_c rung's threadgroup accesses: the score tile at row stride B_c + pad, the
    K/V chunks at DK + pad (DK = 32 for D = 32, 64 for D = 64 and 128), diag(alpha) at 8.
    K (in S = Q·Kᵀ) and V (in O += P·V) are B operands. The CUDA shim's simdgroup_load
    fetches a fragment's elements and their transposed pair (shim/front/include/
    camel_cuda_simd.h); its default tf32x3 multiply reads a B operand only through that
    pair, the fp32 mode (CAMEL_CUDA_MATRIX=fp32) only through the elements, and the
    compiler drops the loads nobody reads. So each K and V fragment is listed twice, once
    per mode; P and diag(alpha) are A operands, read as their elements in both."""
    sld = bc + pad
    walk = "XOR swizzle" if swizzle else "no swizzle"
    out = [
        Access(name, f"softmax walk, stride {sld}, {walk}", "ld", flash_walk(sld, bc, swizzle),
               note="the lanes' writes of P: the same words"),
        Access(name, f"simdgroup_store of scores, stride {sld}", "st",
               _worst(_sg_frag(0, sld, 0), _sg_frag(0, sld, 1)), note="CUDA shim layout"),
        Access(name, f"simdgroup_load of P, stride {sld}", "ld",
               _worst(_sg_frag(0, sld, 0), _sg_frag(0, sld, 1)), note="CUDA shim layout"),
        Access(name, "simdgroup_load of diag(alpha), stride 8", "ld",
               _worst(_sg_frag(0, 8, 0), _sg_frag(0, 8, 1)), note="CUDA shim layout"),
    ]  # fmt: skip
    for dk in dks:
        ld = dk + pad
        out += [
            Access(name, f"K chunk: simdgroup_load transposed, DK = {dk}, stride {ld}", "ld",
                   _worst(_sg_frag(0, ld, 0, True), _sg_frag(0, ld, 1, True)),
                   note="CUDA shim layout; what fp32 mode reads"),
            Access(name, f"K chunk: the B operand's pair, DK = {dk}, stride {ld}", "ld",
                   _worst(_sg_frag(0, ld, 0), _sg_frag(0, ld, 1)),
                   note="what the default tf32x3 multiply reads"),
            Access(name, f"V chunk: simdgroup_load, DK = {dk}, stride {ld}", "ld",
                   _worst(_sg_frag(0, ld, 0), _sg_frag(0, ld, 1)),
                   note="CUDA shim layout; what fp32 mode reads"),
            Access(name, f"V chunk: the B operand's pair, DK = {dk}, stride {ld}", "ld",
                   _worst(_sg_frag(0, ld, 0, True), _sg_frag(0, ld, 1, True)),
                   note="what the default tf32x3 multiply reads"),
            Access(name, f"K/V chunk store (float4), DK = {dk}, stride {ld}", "st",
                   _chunk_store(dk, ld), 16),
            Access(name, f"K/V chunk store (float4), DK = {dk}, stride {ld}, second buffer", "st",
                   _chunk_store(dk, ld, buffer=1), 16, note=f"starts 32·{ld} floats on"),
        ]  # fmt: skip
    return out


def flash_v8_accesses():
    """v8 against the rung it pads (v6 64x32), and the two paddings v8 does not do: the
    swizzle on top of the padded stride, and diag(alpha) at a padded stride of 12."""
    what_if = [
        Access("flash_v8 what-if", "softmax walk, stride 36, XOR swizzle as well", "ld",
               flash_walk(36, 32, True), note="why v8 drops the swizzle"),
        Access("flash_v8 what-if", "simdgroup_load of diag(alpha), stride 12", "ld",
               _worst(_sg_frag(0, 12, 0), _sg_frag(0, 12, 1)), note="why diag stays at 8"),
    ]  # fmt: skip
    return (flash_rung_accesses("flash_v6_64x32") + flash_rung_accesses("flash_v8", pad=4,
            swizzle=False) + what_if)  # fmt: skip


def _stash(dk: int, ld: int, i: int = 0, threads: int = 256, n: int = 2, buffer: int = 0,
           adjacent: bool = False) -> list[int]:  # fmt: skip
    """stash_kv_chunk (v9): lane t writes float4 i of its share, e = t + i·threads (the
    float4s load_kv_chunk copies), at row e / (DK/4), column 4 (e % (DK/4)), row stride ld.
    adjacent: the what-if e = n·t + i (a thread's float4s side by side in the chunk)."""
    out = []
    for t in lanes(0):
        e = n * t + i if adjacent else t + i * threads
        out.append((e // (dk // 4)) * ld + (e % (dk // 4)) * 4 + buffer * 32 * ld)
    return out


def flash_v9_accesses():
    """v9: v7's threadgroup accesses (no score tile, no diag(alpha): the K and V fragments
    at row stride DK, as v6 64x32) with the chunk written by stash_kv_chunk: one float4 store
    a lane per staged float4 (1 at D = 32, 2 at D = 64 and 128), into either buffer; and the
    share layout v9 does not use (a thread's float4s adjacent)."""
    out = []
    for dk in (32, 64):
        n = 32 * dk // 4 // 256  # float4s a thread stages (B_c = 32, 256 threads)
        out += [
            Access("flash_v9", f"K chunk: simdgroup_load transposed, DK = {dk}, stride {dk}", "ld",
                   _worst(_sg_frag(0, dk, 0, True), _sg_frag(0, dk, 1, True)),
                   note="as v7 and v6 64x32; what fp32 mode reads"),
            Access("flash_v9", f"K chunk: the B operand's pair, DK = {dk}, stride {dk}", "ld",
                   _worst(_sg_frag(0, dk, 0), _sg_frag(0, dk, 1)),
                   note="what the default tf32x3 multiply reads"),
            Access("flash_v9", f"V chunk: simdgroup_load, DK = {dk}, stride {dk}", "ld",
                   _worst(_sg_frag(0, dk, 0), _sg_frag(0, dk, 1)),
                   note="as v7 and v6 64x32; what fp32 mode reads"),
            Access("flash_v9", f"V chunk: the B operand's pair, DK = {dk}, stride {dk}", "ld",
                   _worst(_sg_frag(0, dk, 0, True), _sg_frag(0, dk, 1, True)),
                   note="what the default tf32x3 multiply reads"),
        ]  # fmt: skip
        for i in range(n):
            for buffer in (0, 1):
                out.append(Access("flash_v9", f"stash_kv_chunk store {i} (float4), DK = {dk}, "
                                  f"buffer {buffer}", "st", _stash(dk, dk, i, n=n, buffer=buffer),
                                  16, note="the words v7's load_kv_chunk stores"))  # fmt: skip
        if n > 1:
            out.append(Access("flash_v9 what-if", f"stash with a thread's float4s adjacent "
                              f"(e = {n} t + i), DK = {dk}", "st",
                              _stash(dk, dk, 0, n=n, adjacent=True), 16,
                              note="why the share is strided by the thread count"))  # fmt: skip
    return out


def _v10_tile(r: int, d4: int, n4: int, swizzle: bool = True) -> int:
    """flash_forward_simt's q_tile / k_tile: word of float4 d4 of row r, rows of n4
    float4s, stored at d4 ^ (r % 8) (swizzle) or d4."""
    return 4 * (r * n4 + (d4 ^ (r % 8) if swizzle else d4))


def simt_lanes(version: int) -> list[tuple[int, int]]:
    """(ri, ci) of lanes 0..31 in flash_forward_simt: v10 lane = 8 ri + ci; v11, v12 (PAIRED)
    ri from lane bits 1 and 4, ci from bits 0, 2 and 3."""
    if version == 10:
        return [(lane // 8, lane % 8) for lane in range(LANES)]
    return [(((lane >> 1) & 1) | ((lane >> 4) << 1), (lane & 1) | (((lane >> 2) & 3) << 1))
            for lane in range(LANES)]  # fmt: skip


def flash_simt_accesses(d: int = 64, bc: int = 32, version: int = 10):
    """v10 and v11 (flash_forward_simt) in SIMD group 0 (the other SIMD groups' rows and P
    start a multiple of 32 words on: the same banks), lanes as simt_lanes(version). Every
    access is a float4 (16 bytes: phases of 8 lanes). The S loop reads rows ri + 4 i of Q
    and keys ci + 8 j of K at one float4 d4 of D; P·V reads one key's float4 of P (its 4
    rows) and float4 columns ci + 8 u of V; P is written [ri][key] (v10) or [key][ri]
    (v11; v12 is v11's kernel with another grid). v10's what-ifs: K and Q unswizzled,
    and P written key-major ([key][ri], the layout v10 replaced). The K, Q and V block
    stores follow the thread index, not the lane layout: listed for v10."""
    n4 = d // 4
    sg_lanes = simt_lanes(version)
    kernel = f"flash_v{version}"
    out = []
    variants = [("", True, f"as v{version} reads it")]
    if version == 10:
        variants.append((" unswizzled", False, "what the XOR swizzle avoids"))
    for what, swz, note in variants:
        label = kernel if swz else f"{kernel} what-if"
        k_reads = [[_v10_tile(ci + 8 * j, d4, n4, swz) for ri, ci in sg_lanes]
                   for j in range(bc // 8) for d4 in range(n4)]  # fmt: skip
        q_reads = [[_v10_tile(ri + 4 * i, d4, n4, swz) for ri, ci in sg_lanes]
                   for i in range(4) for d4 in range(n4)]  # fmt: skip
        out.append(Access(label, f"S loop: K keys ci + 8 j{what}, D = {d}", "ld",
                          _worst(*k_reads, width=16), 16, note=note))  # fmt: skip
        out.append(Access(label, f"S loop: Q rows ri + 4 i{what}, D = {d}", "ld",
                          _worst(*q_reads, width=16), 16,
                          note="the 8 lanes of a phase read one float4: no swizzle needed"
                          if not swz else note))  # fmt: skip
    if version == 10:
        for name, swizzled in (("K, Q block store (float4 e = t + n · threads)", True),
                               ("V block store", False)):  # fmt: skip
            words = [_v10_tile(t // n4, t % n4, n4, swizzled) for t in lanes(0)]
            out.append(Access(kernel, f"{name}, D = {d}", "st", words, 16,
                              note="consecutive threads along a row"))  # fmt: skip
    p_ri, p_key = (bc, 1) if version == 10 else (1, 4)  # float4 strides: P_RI, P_KEY
    layout = "[ri][key]" if version == 10 else "[key][ri]"
    p_store = _worst(*([4 * (ri * p_ri + (ci + 8 * j) * p_key) for ri, ci in sg_lanes]
                       for j in range(bc // 8)), width=16, op="st")  # fmt: skip
    p_load = _worst(*([4 * (ri * p_ri + c * p_key) for ri, ci in sg_lanes] for c in range(bc)),
                    width=16)  # fmt: skip
    v_load = _worst(*([4 * (c * n4 + ci + 8 * u) for ri, ci in sg_lanes]
                      for c in range(bc) for u in range(d // 32)), width=16)  # fmt: skip
    notes = (("8 consecutive float4s a phase", "a paired phase's rows ri, ri + 1: one bank")
             if version == 10 else
             ("rows ri, ri + 1 and ci < 4 a phase: keys 4 float4s apart",
              "a paired phase's rows ri, ri + 1: side by side"))  # fmt: skip
    out += [
        Access(kernel, f"P store, {layout}", "st", p_store, 16, note=notes[0]),
        Access(kernel, f"P load, {layout}", "ld", p_load, 16, note=notes[1]),
        Access(kernel, f"V load, float4 columns ci + 8 u, D = {d}", "ld", v_load, 16,
               note="8 consecutive float4s a phase"),
    ]  # fmt: skip
    if version == 10:
        old_store = _worst(*([4 * ((ci + 8 * j) * 4 + ri) for ri, ci in sg_lanes]
                             for j in range(bc // 8)), width=16, op="st")  # fmt: skip
        out.append(Access("flash_v10 what-if", "P store, [key][ri]", "st", old_store, 16,
                          note="keys 16 words apart: 4-way"))  # fmt: skip
    return out


def simt_block_wavefronts(d: int = 64, bc: int = 32, version: int = 10) -> dict[str, int]:
    """Wavefronts of one SIMD group's threadgroup reads in one key block of flash v10 / v11
    (the S loop: D / 4 steps of 4 Q and B_c / 8 K float4s; P·V: B_c keys of 1 P and D / 32
    V float4s), against its warp FMAs (16 rows x B_c keys x D, twice: S and P·V)."""
    acc = {a.what.split(",")[0]: a.wavefronts for a in flash_simt_accesses(d, bc, version)
           if a.kernel == f"flash_v{version}"}  # fmt: skip
    q, k = acc["S loop: Q rows ri + 4 i"], acc["S loop: K keys ci + 8 j"]
    s_loop = d // 4 * (4 * q + bc // 8 * k)
    pv = bc * (acc["P load"] + d // 32 * acc["V load"])
    return dict(s_loop=s_loop, pv=pv, reads=s_loop + pv, warp_fmas=2 * 16 * bc * d // 32)


def flash_block_passes(pad: int, swizzle: bool, d: int = 64, bc: int = 32, dk: int = 0,
                       br: int = 64, mode: str = "tf32x3"):  # fmt: skip
    """Per SIMD group and key block of a B_r x B_c rung at head dim d (v6 64x32: pad 0,
    swizzle; v8: pad 4, no swizzle; dk 0: v6 64x32's and v8's, 32 / 64 / 64): {"ld":
    (passes, conflicts), "st": (...)}, conflicts being the passes beyond one per access
    (what ncu's bank-conflict counters add up). Counted: the score store, the lanes' walk
    (read, then write P), the load of P, diag(alpha) (its diagonal written, the tile
    loaded), every K and V fragment as `mode` reads it (see flash_rung_accesses: tf32x3,
    the CUDA shim's default, or fp32) and this SIMD group's share of the float4 chunk
    stores. Not counted: Q's one-time load, the NaN/inf path. Every access is 4 bytes a
    lane, as the translation's PTX has them; ptxas may merge pairs into 8-byte ones."""
    dk = dk or (32 if d == 32 else 64)
    sld, kld, nc = bc + pad, dk + pad, bc // 8
    frags = nc * d // 8  # K fragments per block; as many V fragments
    diag_write = [9 * (lane // 4) if lane % 4 == 0 else None for lane in range(LANES)]
    stores_per_thread = 2 * bc * d // 4 // (br // 8 * LANES)  # K and V, float4 each
    k_tr = mode == "fp32"  # tf32x3 reads K's B pair: row-wise; V's: column-wise

    def frag(ld, tr=False):
        return _worst(_sg_frag(0, ld, 0, tr), _sg_frag(0, ld, 1, tr))

    ops = [  # (ld/st, accesses, words, bytes per lane)
        ("st", 2 * nc, frag(sld), 4),
        ("ld", bc // 4, flash_walk(sld, bc, swizzle), 4),
        ("st", bc // 4, flash_walk(sld, bc, swizzle), 4),
        ("ld", 2 * nc, frag(sld), 4),
        ("st", 1, diag_write, 4),
        ("ld", 2, frag(8), 4),
        ("st", stores_per_thread, _chunk_store(dk, kld), 16),
        ("ld", 2 * frags, frag(kld, k_tr), 4),  # K
        ("ld", 2 * frags, frag(kld, not k_tr), 4),  # V
    ]
    out = {"ld": [0, 0], "st": [0, 0]}
    for op, count, words, width in ops:
        n = conflict(words, width)[0]
        out[op][0] += count * n
        out[op][1] += count * (n - 1)
    return {k: tuple(v) for k, v in out.items()}


def flash_pairs(t: int, br: int, bc: int, heads: int, causal: bool) -> int:
    """(SIMD group, key block) pairs of one forward call, B = 1, T = S = t: a causal
    threadgroup stops at the block holding its last query row."""
    blocks = 0
    for q0 in range(0, t, br):
        kend = min(t, q0 + br) if causal else t
        blocks += (kend + bc - 1) // bc
    return heads * blocks * (br // 8)


def flash_passes_table() -> str:
    pairs = flash_pairs(4096, 64, 32, 16, True)
    lines = ["Per SIMD group and key block (B_c = 32), the model above, K and V as the CUDA "
             "shim's default tf32x3 multiply reads them: passes (conflicts); and the "
             f"conflicts of T = 4096 causal, H = 16 ({pairs:,} such pairs).",
             "", "| rung | D | loads | stores | load / store conflicts at T = 4096 |",
             "|---|---:|---:|---:|---:|"]  # fmt: skip
    for name, pad, swizzle in (("flash_v6_64x32", 0, True), ("flash_v8", 4, False)):
        for d in (32, 64, 128):
            c = flash_block_passes(pad, swizzle, d)
            lines.append(f"| {name} | {d} | {c['ld'][0]} ({c['ld'][1]}) | "
                         f"{c['st'][0]} ({c['st'][1]}) | {c['ld'][1] * pairs / 1e6:.0f} M / "
                         f"{c['st'][1] * pairs / 1e6:.0f} M |")  # fmt: skip
    return "\n".join(lines)


def fragment_floor(strides=range(8, 129)) -> int:
    """The fewest passes any row stride gives one simdgroup_load element of a fragment in
    the CUDA shim's layout (32 words: rows 0-7 one stride apart, columns 0, 2, 4, 6 + j):
    2, because for an even stride all 32 words are even (16 banks) and for an odd one the
    four even rows cannot spread over the 16 even banks."""
    return min(conflict(_worst(_sg_frag(0, ld, 0), _sg_frag(0, ld, 1)))[0] for ld in strides)


# ---- reductions (ops_reduce, ops_softmax, ops_layernorm: threadgroup_sum / _max) ------------


def reduce_accesses(threads: int = 256):
    nsg = threads // LANES
    return [
        Access("threadgroup_sum/_max", "lane 0 of each SIMD group: partial[simd_group] = v", "st",
               [0] + [None] * (LANES - 1), note="one lane per SIMD group"),
        Access("threadgroup_sum/_max", "partial[lane] for lane < SIMD groups", "ld",
               [lane if lane < nsg else None for lane in range(LANES)]),
        Access("tree (textbook)", "buf[t] += buf[t + s]", "ld",
               [lane + threads // 2 for lane in range(LANES)]),
    ]  # fmt: skip


FAMILIES = {
    "gemm": gemm_accesses,
    "flash": lambda: (
        flash_accesses()
        + flash_v8_accesses()
        + flash_v9_accesses()
        + flash_simt_accesses()
        + flash_simt_accesses(version=11)
    ),
    "reduce": reduce_accesses,
}


def table(accesses) -> str:
    lines = ["| kernel | access | ld/st | bytes/lane | n-way | passes/phase | wavefronts | note |",
             "|---|---|---|---:|---:|---:|---:|---|"]  # fmt: skip
    for a in accesses:
        n, passes = conflict(a.words, a.width)
        lines.append(f"| {a.kernel} | {a.what} | {a.op} | {a.width} | {n} | {passes:.2f} | "
                     f"{a.wavefronts} | {a.note} |")  # fmt: skip
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python tools/bank_calc.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("families", nargs="*", help=f"any of {', '.join(FAMILIES)} (default: all)")
    ap.add_argument("--stride", type=int, help="one SIMD group reading a column at this stride")
    ap.add_argument("--pad", type=int, default=0,
                    help="also show v6-v9 with tile rows padded by PAD floats")  # fmt: skip
    args = ap.parse_args(argv)
    if args.stride is not None:
        n, _ = conflict(column(args.stride))
        print(f"32 lanes reading floats {args.stride} apart: {n}-way "
              f"({'conflict-free' if n == 1 else f'{n} passes instead of 1'})")  # fmt: skip
        return 0
    unknown = [f for f in args.families if f not in FAMILIES]
    if unknown:
        print(f"[bank_calc] unknown family {unknown[0]!r}; valid: {', '.join(FAMILIES)}",
              file=sys.stderr)  # fmt: skip
        return 2
    print("Bank model: 32 banks of 4 bytes (NVIDIA's, documented; for Apple GPUs an assumption).")
    accesses = []
    for f in args.families or list(FAMILIES):
        accesses += FAMILIES[f](args.pad) if f == "gemm" else FAMILIES[f]()
    print(table(accesses))
    if "flash" in (args.families or list(FAMILIES)):
        print()
        print(flash_passes_table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
