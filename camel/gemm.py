"""The GEMM ladder, host side: which kernel of shaders/ops_matmul.metal runs a matmul, and how.

    C = op(A) · op(B)     op(A) is (..., M, K), op(B) is (..., K, N), C is (..., M, N), float32

`RUNGS` is the ladder table: version -> kernel name, output tile of one threadgroup (which
gives the grid), threads per threadgroup, and threadgroup memory. `matmul()` checks the
operands, packs sizes/strides/transpose flags into one small constant struct (bound with
setBytes) and dispatches the chosen rung:

    CAMEL_MATMUL=<version>   every matmul (forward and backward) uses that rung
    otherwise                the autotuner's winner for this device and shape class
                             (camel/tuning.py, ~/.cache/camel/), else `default_version()`

Split-K: a version "<rung>/k<S>" (e.g. "9/k4", chosen by the autotuner or CAMEL_MATMUL)
runs the rung on S slices of K as a batch of S products into an (S, M, N) buffer, then sums
the S partial products (sum_axis_blocks, ops_reduce.metal): S times the threadgroups for a
small M x N with a long K (a weight gradient dW = Xᵀ·dY over many tokens), which alone
would leave most of a large GPU idle. 2-D products with K % (4 S) == 0 only.

Causal attention (`triangle`, shaders/ops_matmul.metal tile_k_range): softmax(q·kᵀ) with
query t seeing keys s <= t needs only a triangle of its products, per batch matrix:
    "lower"    only C[i, j] with j <= i is wanted (scores q·kᵀ, dP = dO·vᵀ): tiles wholly
               above the diagonal are skipped, and C there is left unwritten (unspecified)
    "a_lower"  op(A)[i, k] = 0 for k > i is promised (P·v, dS·k): the K loop stops at the
               tile's last row; those zeros are never read
    "a_upper"  op(A)[i, k] = 0 for k < i is promised (Pᵀ·dO, dSᵀ·q): the K loop starts at
               the tile's first row
At T = S that is about half of each product's work. Versions 6-9, 11 and 15 (and their
variants) honour it (Rung.triangle); the others compute everything, which gives the same wanted
part. A triangle runs without split-K (its slices would need their own K ranges). With
NaN or inf about, the promise can fail (a NaN row of P is NaN at its masked entries too,
and 0 · NaN is NaN): a skipping rung then keeps such a NaN inside the diagonal tile band,
where the whole product would spread it to every row (tests/test_nan_inf.py, attention).

Transposed operands (backward: dW = Xᵀ·dY, dX = dY·Wᵀ) are read in place by every rung;
no transpose pass. Batches: up to 2 batch dimensions (3-D and 4-D matmul); a batch
dimension of size 1 or missing (a 2-D operand) is broadcast with stride 0.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from camel import config, metal, tuning

SHADER = "ops_matmul.metal"


@dataclass(frozen=True)
class Rung:
    """One rung of the ladder: a kernel and how to launch it."""

    version: str
    kernel: str  # [[host_name]] / function name in shaders/ops_matmul.metal
    what: str  # one line for --list and the lesson
    bm: int  # rows of C one threadgroup computes
    bn: int  # columns of C one threadgroup computes
    threads: tuple[int, int, int]  # threads per threadgroup
    tg_bytes: int  # static threadgroup memory the kernel declares
    x_walks_rows: bool = False  # v1: grid x runs over rows of C (the uncoalesced mapping)
    triangle: bool = False  # the kernel honours MatmulParams.triangle (causal attention)

    @property
    def nthreads(self) -> int:
        return self.threads[0] * self.threads[1] * self.threads[2]

    def grid(self, m: int, n: int, batches: int) -> tuple[int, int, int]:
        """Threadgroups to dispatch for a (batches, m, n) output."""
        if self.x_walks_rows:
            return (_cdiv(m, self.bm), _cdiv(n, self.bn), batches)
        return (_cdiv(n, self.bn), _cdiv(m, self.bm), batches)


def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def _blocktile(version: str, bm: int, bn: int, bk: int, tm: int, tn: int, what: str) -> Rung:
    config = f"{bm}x{bn}x{bk}_{tm}x{tn}"
    if version == "6":
        name = "matmul_v6_vec4"
    elif version == config:  # a tuning variant, not a rung
        name = f"matmul_tile_{config}"
    else:
        name = f"matmul_v{version}_{config}"
    threads = (bm // tm) * (bn // tn)
    return Rung(version, name, what, bm, bn, (threads, 1, 1), (bm + bn) * bk * 4, triangle=True)


def _pftile(version: str, bm: int, bn: int, bk: int, tm: int, tn: int, what: str) -> Rung:
    """v13's template (matmul_blocktile_prefetch): v6-v9's thread tiles, two tile buffers
    with rows padded by 4 floats, the next tile staged in registers."""
    config = f"{bm}x{bn}x{bk}_{tm}x{tn}"
    name = f"matmul_v13_prefetch_{config}" if version == "13" else f"matmul_pftile_{config}"
    threads = (bm // tm) * (bn // tn)
    return Rung(version, name, what, bm, bn, (threads, 1, 1), 2 * bk * (bm + 4 + bn + 4) * 4)


def _sgtile(version: str, bm: int, bn: int, fm: int, fn: int, what: str) -> Rung:
    """v12's template (matmul_sg_prefetch): BM x BN tiles, BK = 16, SIMD groups of
    (8 FM) x (8 FN); two padded tile buffers and 64 floats of scratch a SIMD group."""
    name = (
        "matmul_v12_register_prefetch" if version == "12" else f"matmul_sgtile_{bm}x{bn}_{fm}x{fn}"
    )
    simdgroups = (bm // (8 * fm)) * (bn // (8 * fn))
    tg_bytes = (2 * (bm * 20 + 16 * (bn + 4)) + 64 * simdgroups) * 4
    return Rung(version, name, what, bm, bn, (32 * simdgroups, 1, 1), tg_bytes)


def _wtile(version: str, bm: int, bn: int, bk: int, wm: int, wn: int, what: str) -> Rung:
    """v15's template (matmul_warptile): BM x BN x BK tiles, SIMD groups of WM x WN, each
    thread (WM/32) x (WN/16) blocks of 4 x 4; two k-major swizzled tile buffers."""
    config = f"{bm}x{bn}x{bk}_{wm}x{wn}"
    name = f"matmul_v15_warptile_{config}" if version == "15" else f"matmul_wtile_{config}"
    threads = 32 * (bm // wm) * (bn // wn)
    return Rung(version, name, what, bm, bn, (threads, 1, 1), 2 * bk * (bm + bn) * 4, triangle=True)


# The ladder. Keep every rung: the ladder is the lesson (docs/stage3.md).
RUNGS: dict[str, Rung] = {
    r.version: r
    for r in [
        Rung("1", "matmul_v1_naive", "naive: one thread per C element, x walks rows",
             32, 8, (32, 8, 1), 0, x_walks_rows=True),
        Rung("2", "matmul_v2_coalesced", "coalesced: x walks columns of B and C",
             8, 32, (32, 8, 1), 0),
        Rung("3", "matmul_v3_tiled", "32x32 tiles in threadgroup memory",
             32, 32, (32, 32, 1), 2 * 32 * 32 * 4),
        Rung("4", "matmul_v4_blocktile1d", "1-D blocktiling: 8 outputs per thread",
             64, 64, (512, 1, 1), (64 + 64) * 8 * 4),
        Rung("5", "matmul_v5_blocktile2d", "2-D blocktiling: 8x8 outputs per thread",
             128, 128, (256, 1, 1), (128 + 128) * 8 * 4),
        _blocktile("6", 128, 128, 8, 8, 8, "float4 loads, A transposed in threadgroup memory"),
        _blocktile("7", 64, 64, 8, 4, 4, "v6 as a template: 64x64x8 tiles, 4x4 per thread"),
        _blocktile("8", 128, 128, 16, 8, 8, "v6 as a template: 128x128x16 tiles, 8x8"),
        _blocktile("9", 128, 64, 16, 8, 4, "v6 as a template: 128x64x16 tiles, 8x4"),
        Rung("10", "matmul_v10_simdgroup", "simdgroup_matrix 8x8 tiles, 4 SIMD groups",
             64, 64, (128, 1, 1), (64 * 20 + 16 * 68) * 4 + 4 * 64 * 4),
        Rung("11", "matmul_v11_double_buffer", "v10, two tile buffers: one barrier a K step",
             64, 64, (128, 1, 1), 2 * (64 * 20 + 16 * 68) * 4 + 4 * 64 * 4, triangle=True),
        _sgtile("12", 64, 64, 4, 4, "v11 with the next tile staged in registers"),
        _pftile("13", 128, 64, 16, 8, 4, "v9 with the next tile staged in registers"),
        Rung("14", "matmul_v14_fetch_128x64x16_8x4", "v9 with a K step's reads issued together",
             128, 64, (256, 1, 1), (128 + 64) * 16 * 4),
        _wtile("15", 128, 128, 16, 64, 32, "warp tiling: SIMD groups of 64x32, 8x8 per thread, "
               "swizzled k-major tiles"),
    ]
}  # fmt: skip

# Tuning variants: more instantiations of the v6-v9 template for the autotuner's grid search
# (BM, BN in 32/64/128, BK in 8/16/32, TM, TN in 4/8), of v12's (sg_BMxBN_FMxFN), of
# v13's (pf_BMxBNxBK_TMxTN) and of v15's (wt_BMxBNxBK_WMxWN: SIMD-group tile WM x WN).
# Their version is the config string: CAMEL_MATMUL=64x64x16_4x4.
# Not part of the ladder (`bench matmul --list-variants` lists them).
VARIANTS: dict[str, Rung] = {
    r.version: r
    for r in [
        _blocktile(c, *map(int, c.replace("_", "x").split("x")), "tuning variant of v6-v9")
        for c in ["32x32x8_4x4", "64x64x8_8x8", "64x64x16_4x4", "64x128x16_8x8",
                  "128x128x8_8x4", "128x128x32_8x8"]
    ] + [
        _sgtile("sg_128x64_4x4", 128, 64, 4, 4, "tuning variant of v12: 8 SIMD groups of 32x32"),
        _sgtile("sg_128x64_8x4", 128, 64, 8, 4, "tuning variant of v12: 4 SIMD groups of 64x32"),
        _sgtile("sg_64x128_4x8", 64, 128, 4, 8, "tuning variant of v12: 4 SIMD groups of 32x64"),
    ] + [
        _pftile(f"pf_{c}", *map(int, c.replace("_", "x").split("x")), "tuning variant of v13")
        for c in ["128x128x8_8x8", "128x64x8_8x4", "64x64x16_4x4"]
    ] + [
        _wtile(f"wt_{c}", *map(int, c.replace("_", "x").split("x")), "tuning variant of v15")
        for c in ["128x128x8_64x32", "128x64x16_64x32", "128x64x8_32x32", "64x64x16_32x32"]
    ]
}  # fmt: skip

# Defaults when the autotuner has no entry (`bench matmul --tune` replaces them per device
# and shape class).
# Apple GPU: v10, chosen from evidence, NOT measured: no Apple GPU has timed this ladder.
# What it rests on (docs/stage3.md, "Which rung is the default"):
#   1. LaurentMazare/gemm-metal's README (FP32, M3, M2 Pro, M3 Max): at 2048 and 4096 its
#      TiledSimd kernel is the fastest, 2.1-2.5x its 2-D tiling (64x64x8, 4x4 a thread: v7's
#      tile) at 4096. TiledSimd does v10's SIMD-group work (a 32x32 tile of C as 4x4
#      simdgroup_float8x8, K steps of 8) with fragments read straight from device memory;
#      it has no threadgroup tiles, let alone two buffers.
#   2. ml-explore/mlx's FP32 GEMM (mlx/backend/metal/matmul.cpp, GEMM_TPARAM_MACRO;
#      kernels/steel/gemm/gemm.h) is v10's design: 64x64x16 tiles, 2x2 SIMD groups of 32x32
#      on simdgroup_matrix, tile rows padded by 16 bytes, one buffer, two barriers a K step
#      (a design choice of Apple's library, not a published measurement).
#   3. v11's second buffer overlaps no load with math (no asynchronous copy) and doubles the
#      threadgroup memory, 19.5 against 10.25 KiB: <= 3 threadgroups per Apple core against
#      5 (`bench roofline gemm`). On an H200 through the CUDA shim, simdgroup_matrix
#      emulated (3xTF32 on the tensor cores), v10 was ahead of v11 at every size, by 1-2 %
#      in one run (14,785 against 14,511 GFLOP/s at 4096^3), and 1.6x ahead with the first
#      translation (FMAs and shuffles: 2,824 against 4,625 us at 2048^3; docs/cuda.md).
# What it does not rest on: any timing of v10 against v9, v12 or v15 on an Apple GPU (on
# NVIDIA, where simdgroup_matrix is emulated, the scalar rungs win: no evidence for Apple).
# v10 skips no causal triangle, so the attention products run on v15's template at 64x64
# instead (triangle_rung).
# CUDA shim: the measured fastest rung for big products (v15: 37.3 TFLOP/s at 4096^3 on an
# H100, 72 % of cuBLAS; v14 28.4, v9 27.3 in the same run: docs/cuda.md), smaller tiles or
# split-K for products with few tiles (cuda_default below).
# Simulator: the rung that is quickest to simulate (few threads per group, few barriers;
# measured in docs/stage3.md).
DEFAULT_GPU = "10"
DEFAULT_CUDA = "15"
DEFAULT_SIM = "9"


def versions() -> list[str]:
    """Every rung of the ladder, in order."""
    return list(RUNGS)


def all_versions() -> list[str]:
    """The ladder, then the tuning variants (the autotuner's candidates)."""
    return list(RUNGS) + list(VARIANTS)


def get_rung(version) -> Rung:
    """The rung for a version ("7", 7, "v7" or a variant "64x64x16_4x4"); ValueError listing
    the valid ones."""
    key = str(version).strip().lower().removeprefix("v")
    rung = RUNGS.get(key) or VARIANTS.get(key)
    if rung is None:
        raise ValueError(
            f"[matmul] unknown version {version!r}; valid versions: {', '.join(RUNGS)} "
            f"(tuning variants: {', '.join(VARIANTS)})"
        )
    return rung


# Split-K (see the top of this file): the rungs the autotuner tries with K split S ways.
SPLIT_RUNGS = ["9", "7", "64x64x16_4x4", "wt_64x64x16_32x32"]
SPLITS = [2, 4, 8]
_MIN_SLICE = 256  # the autotuner splits no slice of K shorter than this


def parse_version(version) -> tuple[Rung, int]:
    """(rung, S) for a version with an optional split-K suffix: "9" -> (v9, 1),
    "9/k4" -> (v9, 4). ValueError naming the valid forms."""
    text = str(version).strip().lower()
    base, sep, split = text.partition("/k")
    if sep and not (split.isdigit() and int(split) >= 1):
        raise ValueError(
            f"[matmul] version {version!r}: a split-K suffix is /k<S> with S >= 1, e.g. '9/k4'"
        )
    return get_rung(base), int(split) if sep else 1


def can_split(m: int, n: int, k: int, batches: int, split: int) -> bool:
    """True if a 2-D product's K divides into `split` slices of a multiple of 4 floats."""
    return split == 1 or (batches == 1 and k % (4 * split) == 0)


def split_candidates(m: int, n: int, k: int, batches: int) -> list[str]:
    """The split-K versions the autotuner tries for this shape (slices >= _MIN_SLICE)."""
    return [
        f"{v}/k{s}"
        for v in SPLIT_RUNGS
        for s in SPLITS
        if can_split(m, n, k, batches, s) and k // s >= _MIN_SLICE
    ]


def default_version(m: int, n: int, k: int, batches: int = 1) -> str:
    """The rung used when neither CAMEL_MATMUL nor the autotuner's cache says otherwise."""
    shim = metal.shim()
    if shim == "cuda":
        return cuda_default(m, n, k, batches)
    return DEFAULT_SIM if shim == "sim" else DEFAULT_GPU


# The CUDA shim's untuned choice by shape, from the autotuner's timings of GPT-mini's GEMMs
# and the attention products on an H100 (2026-12-07: tools/gpu/model_shapes.py and
# tools/gpu/triangle_products.py; docs/cuda.md). A big tile (DEFAULT_CUDA, v15's 128x128)
# is the fastest per FMA, but an H100/H200 has 132 SMs, and a product with fewer big tiles
# than a few waves of them leaves SMs idle or the last wave half empty: so v15 where it
# gives at least 528 threadgroups and is no wider than the product (on N = 64 it would
# compute half its tile for nothing), else v15's template at 64x64 (CUDA_SMALL_TILE: it beat
# v14's 128x64 and v13's 64x64 on every shape class of a GPT-mini step, and every
# skipping rung on the attention products). A long K over few tiles is split (split-K, the
# same 64x64 tile) until the grid holds at least 1056 threadgroups (K cut 8 ways beat 4
# ways on GPT-mini's weight gradients, 144 tiles of 64x64 over K = 4096).
# `bench models --tune` measures a model's own shapes instead.
CUDA_BIG_TILES = [DEFAULT_CUDA]
CUDA_SMALL_TILE = "wt_64x64x16_32x32"
CUDA_SPLIT_TILE = CUDA_SMALL_TILE
CUDA_FULL_GRID = 2 * 132  # threadgroups that keep every SM of an H100/H200 busy


def _tiles(version: str, m: int, n: int, batches: int) -> int:
    gx, gy, gz = get_rung(version).grid(m, n, batches)
    return gx * gy * gz


def cuda_default(m: int, n: int, k: int, batches: int = 1) -> str:
    """The CUDA shim's default version for an (M, N, K) product (see above)."""
    if k >= _MIN_SLICE:  # a K long enough to amortise a big tile: the biggest with enough tiles
        for big in CUDA_BIG_TILES:
            if get_rung(big).bn <= n and _tiles(big, m, n, batches) >= 2 * CUDA_FULL_GRID:
                return big
    tiles = _tiles(CUDA_SPLIT_TILE, m, n, batches)
    if tiles < CUDA_FULL_GRID:
        splits = [s for s in SPLITS if can_split(m, n, k, batches, s) and k // s >= _MIN_SLICE]
        for s in splits:
            if tiles * s >= 4 * CUDA_FULL_GRID:
                return f"{CUDA_SPLIT_TILE}/k{s}"
        if splits:
            return f"{CUDA_SPLIT_TILE}/k{splits[-1]}"
    return CUDA_SMALL_TILE


def choose_version(m: int, n: int, k: int, batches: int = 1) -> str:
    """CAMEL_MATMUL if set, else the tuned winner for this device and shape, else the default."""
    forced = config.matmul()
    if forced:
        rung, split = parse_version(forced)
        return rung.version if split == 1 else f"{rung.version}/k{split}"
    tuned = tuning.lookup(m, n, k)
    if tuned is not None:
        try:
            _, split = parse_version(tuned)
        except ValueError:  # a cache entry from another camel version
            split = 0
        if split and can_split(m, n, k, batches, split):  # a shape of the class may not split
            return tuned
    return default_version(m, n, k, batches)


_limits: tuple[int, int] | None = None


def device_limits() -> tuple[int, int]:
    """(max threads per threadgroup, max threadgroup memory in bytes) of the device."""
    global _limits
    if _limits is None:
        info = metal.device_info()
        _limits = (info["max_threads_per_threadgroup"], info["max_threadgroup_memory"])
    return _limits


def check_limits(rung: Rung, fn=None) -> None:
    """RuntimeError with the numbers if the rung does not fit this device (or pipeline)."""
    max_threads, max_tg = device_limits()
    where = "device"
    if fn is not None and fn.max_total_threads_per_threadgroup < max_threads:
        max_threads, where = fn.max_total_threads_per_threadgroup, "pipeline"
    if rung.nthreads > max_threads or rung.tg_bytes > max_tg:
        raise RuntimeError(
            f"[matmul] version {rung.version} ({rung.kernel}) needs {rung.nthreads} threads and "
            f"{rung.tg_bytes} bytes of threadgroup memory per threadgroup; this {where} allows "
            f"{max_threads} threads and {max_tg} bytes. Choose another version "
            f"(CAMEL_MATMUL; valid: {', '.join(RUNGS)})"
        )


def fits(rung: Rung) -> bool:
    """True if the rung fits this device's limits and its pipeline builds."""
    try:
        check_limits(rung, metal.kernel(SHADER, rung.kernel))
    except (RuntimeError, metal.MetalError):
        return False
    return True


# ---- operands ---------------------------------------------------------------------------


@dataclass
class Plan:
    """Everything one dispatch needs, worked out from the operand shapes."""

    m: int
    n: int
    k: int
    batch_shape: tuple[int, ...]  # output batch dims (0, 1 or 2 of them)
    params: np.ndarray  # the MatmulParams struct: 17 uint32 (the last: triangle, set later)

    @property
    def batches(self) -> int:  # math.prod: a NumPy reduction costs microseconds a call
        return math.prod(self.batch_shape)

    @property
    def out_shape(self) -> tuple[int, ...]:
        return (*self.batch_shape, self.m, self.n)


def _describe(shape, transposed: bool) -> str:
    return f"{tuple(shape)}{' transposed' if transposed else ''}"


def _batch_strides(batch: tuple, out_batch: tuple, matrix_elems: int) -> list[int]:
    """Element strides of a contiguous operand's batch dims, aligned to the output's batch dims
    (right-aligned, as NumPy broadcasts); 0 where the operand has size 1 or lacks the dim."""
    strides = [0] * len(out_batch)
    step = matrix_elems
    for d in range(1, len(batch) + 1):
        size = batch[-d]
        strides[-d] = step if size != 1 else 0
        step *= size
    return strides


def plan(a_shape, b_shape, transpose_a=False, transpose_b=False, a_offset=0, b_offset=0,
         c_offset=0) -> Plan:  # fmt: skip
    """Check shapes and work out sizes, strides and flags (ValueError on bad shapes)."""
    a_shape, b_shape = tuple(a_shape), tuple(b_shape)
    desc = f"{_describe(a_shape, transpose_a)} and {_describe(b_shape, transpose_b)}"
    for name, shape in (("first", a_shape), ("second", b_shape)):
        if not 2 <= len(shape) <= 4:
            raise ValueError(
                f"[matmul] the {name} operand must have 2 to 4 dims (at most 2 batch dims), "
                f"got shape {shape}; operands {desc}"
            )
    m, k = (a_shape[-1], a_shape[-2]) if transpose_a else (a_shape[-2], a_shape[-1])
    k2, n = (b_shape[-1], b_shape[-2]) if transpose_b else (b_shape[-2], b_shape[-1])
    if k != k2:
        raise ValueError(f"[matmul] shapes {desc} do not align: {k} != {k2}")
    a_batch, b_batch = a_shape[:-2], b_shape[:-2]
    nb = max(len(a_batch), len(b_batch))
    out_batch = []
    for d in range(nb, 0, -1):
        sa = a_batch[-d] if d <= len(a_batch) else 1
        sb = b_batch[-d] if d <= len(b_batch) else 1
        if sa != sb and sa != 1 and sb != 1:
            raise ValueError(
                f"[matmul] batch dims of {desc} do not broadcast: {a_batch} vs {b_batch}"
            )
        out_batch.append(max(sa, sb) if min(sa, sb) != 0 else 0)
    out_batch = tuple(out_batch)
    a_str = _batch_strides(a_batch, out_batch, a_shape[-2] * a_shape[-1])
    b_str = _batch_strides(b_batch, out_batch, b_shape[-2] * b_shape[-1])
    c_str = _batch_strides(out_batch, out_batch, m * n)
    # (outer, inner) batch dims as the kernel sees them
    if nb == 0:
        inner, a_s, b_s, c_s = 1, (0, 0), (0, 0), (0, 0)
    elif nb == 1:
        inner, a_s, b_s, c_s = 1, (a_str[0], 0), (b_str[0], 0), (c_str[0], 0)
    else:
        inner = out_batch[1]
        a_s, b_s, c_s = tuple(a_str), tuple(b_str), tuple(c_str)
    lda, ldb, ldc = a_shape[-1], b_shape[-1], n
    aligned = (
        all(x % 4 == 0 for x in (lda, ldb, ldc, *a_s, *b_s, *c_s))
        and a_offset % 16 == 0 and b_offset % 16 == 0 and c_offset % 16 == 0
    )  # fmt: skip
    fields = [m, n, k, lda, ldb, ldc, int(transpose_a), int(transpose_b), max(inner, 1),
              *a_s, *b_s, *c_s, int(aligned), 0]  # fmt: skip
    for v in fields:
        if v >= 2**32:
            raise ValueError(f"[matmul] operands {desc} are too large for 32-bit indexing")
    return Plan(m, n, k, out_batch, np.array(fields, dtype=np.uint32))


def _flops(p: Plan) -> int:
    return 2 * p.m * p.n * p.k * p.batches


def _triangle_share(rows: int, cols: int) -> float:
    """Share of a (rows, cols) matrix on and below its diagonal (j <= i)."""
    d = min(rows, cols)
    return (d * (d + 1) // 2 + (rows - d) * cols) / (rows * cols) if rows * cols else 0.0


# MatmulParams.triangle for each `triangle` (see the top of this file)
TRIANGLES = {None: 0, "lower": 1, "a_lower": 2, "a_upper": 3}


def triangle_rung(rung: Rung) -> Rung:
    """A rung that honours `triangle` in place of a chosen one that does not (v10, v12-v14
    and their variants compute everything): v15's template, at 64x64 for a rung of 64x64
    tiles or smaller, else at v14's 128x64 (the fastest of each size on the attention
    products on an H100: tools/gpu/triangle_products.py)."""
    if rung.triangle:
        return rung
    return get_rung("wt_64x64x16_32x32" if rung.bm * rung.bn <= 64 * 64 else "wt_128x64x16_64x32")


def matmul(a, b, transpose_a=False, transpose_b=False, out=None, version=None, triangle=None):
    """C = op(A) · op(B) on the GPU, with op(X) = Xᵀ (of the last two dims) when transposed.

    Args:
        a: DeviceArray float32 (..., M, K), or (..., K, M) if transpose_a.
        b: DeviceArray float32 (..., K, N), or (..., N, K) if transpose_b.
        out: optional DeviceArray float32 of the output shape (..., M, N) to write into.
        version: a ladder version; default: CAMEL_MATMUL, the autotuner, or the default rung.
        triangle: None, or the causal attention product "lower", "a_lower" or "a_upper"
            (the top of this file): a rung that honours it skips the work outside it.
    Returns the output DeviceArray (..., M, N); batch dims broadcast like NumPy's matmul.
    """
    if triangle not in TRIANGLES:
        raise ValueError(
            f"[matmul] triangle must be one of {', '.join(map(repr, TRIANGLES))}, got {triangle!r}"
        )
    for name, x in (("first", a), ("second", b)):
        if not isinstance(x, metal.DeviceArray):
            raise TypeError(
                f"[matmul] the {name} operand must be a DeviceArray (an 'mps' tensor's storage), "
                f"got {type(x).__name__}"
            )
        if x.dtype != np.float32:  # each operand: the kernels read both as float
            raise TypeError(
                f"[matmul] the {name} operand must be float32, got {x.dtype.name} (operands "
                f"{a.dtype.name} {a.shape} and {b.dtype.name} {b.shape})"
            )
    out_aligned = out is None or out.offset % 16 == 0
    key = (a.shape, b.shape, transpose_a, transpose_b, a.offset % 16 == 0, b.offset % 16 == 0,
           out_aligned, triangle, version, config.matmul(), tuning.generation,
           metal.shim())  # fmt: skip
    decision = _decisions.get(key)
    if decision is None:
        c_offset = out.offset if out is not None else 0
        decision = _decide(a, b, transpose_a, transpose_b, c_offset, triangle, version)
        if len(_decisions) >= _MAX_DECISIONS:  # shapes that keep changing: start over
            _decisions.clear()
        _decisions[key] = decision
    p, rung, split = decision
    if out is None:
        out = metal.DeviceArray.empty(p.out_shape, np.float32)
    elif out.shape != p.out_shape or out.dtype != np.float32:
        raise ValueError(
            f"[matmul] out has shape {out.shape} {out.dtype.name}; expected {p.out_shape} float32"
        )
    if p.m == 0 or p.n == 0 or p.batches == 0:
        return out
    if _recorded is not None:
        _recorded.append((p.m, p.n, p.k, bool(transpose_a), bool(transpose_b), p.batches))
    if split > 1:
        dispatch_split_k(rung, a, b, out, p, split)
    else:
        dispatch(rung, a, b, out, p)
    return out


# What matmul() works out for a call (the plan, the rung and the split) depends only on the
# operands' shapes and offsets' alignment, the arguments and the configuration below, and a
# training step repeats the same few products every step: so each distinct call is worked out
# once. (That costs some 10-20 us of Python a product, and a GPT-mini step on a GPU is
# host-bound: docs/cuda.md.) The key holds everything the outcome depends on: shapes,
# alignment, transposes, triangle and version, CAMEL_MATMUL, the autotuner's cache
# (tuning.generation) and the shim; forget() empties it for code that changes the rules
# themselves (the constants above, device_limits, choose_version).
_decisions: dict[tuple, tuple] = {}
_MAX_DECISIONS = 4096


def forget() -> None:
    """Empty matmul()'s decision cache (after changing the rules it follows)."""
    _decisions.clear()
    _fit_cache.clear()


def _decide(a, b, transpose_a, transpose_b, c_offset, triangle, version) -> tuple:
    """(plan, rung, split) for a matmul() call: the shapes checked, the rung chosen."""
    p = plan(a.shape, b.shape, transpose_a, transpose_b, a.offset, b.offset, c_offset)
    forced = version if version is not None else config.matmul()
    if forced is None or forced == "":
        # not forced: the chosen rung (for a triangle, one of its tile size that skips it),
        # and one that does not fit this device gives way to the next rung down
        rung, split = parse_version(choose_version(p.m, p.n, p.k, p.batches))
        if triangle is not None:
            rung = triangle_rung(rung)
        rung = _fitting(rung.version)
    else:
        rung, split = parse_version(forced)
        if not can_split(p.m, p.n, p.k, p.batches, split):
            raise ValueError(
                f"[matmul] version {rung.version}/k{split} splits K: it needs a 2-D product "
                f"with K a multiple of {4 * split}; got M, N, K = {p.m}, {p.n}, {p.k} with "
                f"{p.batches} batches"
            )
    if triangle is not None:  # no split-K: the K range is the tile's (tile_k_range)
        split = 1
        p.params[16] = TRIANGLES[triangle] if rung.triangle else 0
    return p, rung, split


_recorded: list | None = None  # the shapes matmul() sees inside recording()


@contextmanager
def recording():
    """Collect the shape of every matmul() call made inside the block: a list of
    (m, n, k, transpose_a, transpose_b, batches), one per call, for the autotuner
    (camel.bench.tuner.tune_shapes) to tune a model's own shapes."""
    global _recorded
    outer, _recorded = _recorded, []
    try:
        yield _recorded
    finally:
        _recorded = outer


_fit_cache: dict[str, Rung] = {}


def _fitting(version: str) -> Rung:
    """The rung for `version`, or if it exceeds this device's limits the highest lower rung
    that fits (only for defaults and tuned choices; a forced rung errors instead)."""
    rung = _fit_cache.get(version)
    if rung is None:
        order = list(RUNGS)
        top = order.index(version) if version in RUNGS else len(order) - 1
        below = [version] + order[:top][::-1]
        rung = next((get_rung(v) for v in below if fits(get_rung(v))), get_rung(version))
        _fit_cache[version] = rung
    return rung


def dispatch_split_k(rung: Rung, a, b, out, p: Plan, split: int) -> None:
    """out = the sum over s of op(A)[:, slice s] · op(B)[slice s, :], K cut into `split`
    slices: the rung runs once as a batch of `split` products (the batch strides step from
    one slice of K to the next), then one column sum adds the partial products in order."""
    m, n, ks = p.m, p.n, p.k // split
    transpose_a, transpose_b = bool(p.params[6]), bool(p.params[7])
    params = p.params.copy()
    params[2] = ks
    params[8] = 1  # one batch dimension: the slices
    params[9:15] = [ks * m if transpose_a else ks, 0,  # A's slice: rows of Aᵀ, or columns
                    ks if transpose_b else ks * n, 0,  # B's slice: columns of Bᵀ, or rows
                    m * n, 0]  # fmt: skip
    partial = metal.DeviceArray.empty((split, m, n), np.float32)
    dispatch(rung, a, b, partial, Plan(m, n, ks, (split,), params))
    # out (m n) = partial (split, m n) summed over the split: one threadgroup per 32 float4s
    # (or floats) of a row, each adding the `split` rows in order (deterministic)
    width = 4 if (m * n) % 4 == 0 and out.offset % 16 == 0 else 1
    fn = metal.kernel(
        "ops_reduce.metal", "sum_axis_blocks_float4" if width == 4 else "sum_axis_blocks_float"
    )
    inner = m * n // width
    fn(partial, out, split, inner, split, threadgroups=(_cdiv(inner, 32), 1, 1),
       threads_per_threadgroup=(32, 8, 1), flops=split * m * n,
       bytes=(split + 1) * m * n * 4)  # fmt: skip


def dispatch(rung: Rung, a, b, out, p: Plan) -> None:
    """Encode one matmul with the given rung (no shape checks: use matmul())."""
    fn = metal.kernel(SHADER, rung.kernel)
    check_limits(rung, fn)  # a forced rung over the limits errors with the numbers
    a_bytes = 4 * p.m * p.k * p.batches
    b_bytes = 4 * p.k * p.n * p.batches
    c_bytes = 4 * p.m * p.n * p.batches
    flops = _flops(p)
    # the profiler's counts: a triangle's useful work (the tiles' rounding not counted)
    if p.params[16] == 1:
        share = _triangle_share(p.m, p.n)
        flops, c_bytes = int(flops * share), int(c_bytes * share)
    elif p.params[16] in (2, 3):
        # op(A) nonzero where k <= i ("a_lower") or k >= i ("a_upper", the transposed count)
        share = _triangle_share(p.m, p.k) if p.params[16] == 2 else _triangle_share(p.k, p.m)
        flops, a_bytes = int(flops * share), int(a_bytes * share)
    fn(a, b, out, p.params,
       threadgroups=rung.grid(p.m, p.n, p.batches), threads_per_threadgroup=rung.threads,
       flops=flops, bytes=a_bytes + b_bytes + c_bytes)  # fmt: skip
