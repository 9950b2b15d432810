"""Flash attention, host side: which kernel of shaders/ops_attention.metal runs, and how.

    out = softmax(q · kᵀ / sqrt(D) [+ causal mask]) · v
    q (B, H, T, D), k and v (B, H, S, D), out (B, H, T, D), lse (B, H, T); float32, "mps"

`RUNGS` is the ladder table: rung -> kernel name, query rows per threadgroup (B_r), keys
per block (B_c), columns of D per K/V chunk (DK), threads and threadgroup memory. v1-v9
are one template (flash_forward, simdgroup_matrix); v10-v12 are another
(flash_forward_simt).
`forward()` returns (out, lse) without ever allocating a (T, S) matrix; `backward()`
recomputes P from lse, one thread per row (see shaders/ops_attention.metal). Both work on
camel.metal.DeviceArrays, like camel/gemm.py; the autograd op over them, FlashAttention,
is in camel/functional.py beside the naive path. v6's tile shape is tuned by
camel/bench/tuner.py (tune_flash) and cached by camel/tuning.py.

Selection (F.scaled_dot_product_attention on "mps"):
    CAMEL_ATTENTION=flash        the default rung: v6 with the autotuner's tile shape
    CAMEL_ATTENTION=flash_v3     one rung by name (flash_v1 ... flash_v12, or flash_v6_64x32)
    CAMEL_ATTENTION=naive        the Stage 5A path (four ops, a (T, S) matrix)
Head dims 32, 64 and 128 are built; camel.functional falls back to naive for others.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field

import numpy as np

from camel import config

SHADER = "ops_attention.metal"
HEAD_DIMS = (32, 64, 128)
_F32 = 4


@dataclass(frozen=True)
class Rung:
    """One rung (or one tile shape of v6): a kernel family and how to launch it."""

    name: str  # "flash_v3" or "flash_v6_64x32"
    version: int
    what: str  # one line for --list and the lesson
    br: int  # query rows per threadgroup (B_r): B_r / 8 SIMD groups
    bc: int  # keys per block (B_c)
    dk: dict = field(default_factory=dict)  # head dim -> columns of D per K/V chunk (v1-v9)
    buffers: int = 1  # K/V chunk buffers (2, v3+: one filled while one is read; no async copy)
    reg_softmax: bool = False  # v7: softmax in registers, no score or diag(alpha) tile
    pad: int = 0  # v8: floats added to each row of the score tile and of the K/V chunks
    prefetch: bool = False  # v9: the next K/V chunk staged in registers (device reads early)
    simt: bool = False  # v10: flash_forward_simt, scalar FMAs, 16 query rows a SIMD group
    d128: tuple = ()  # v10: (B_r, B_c) at D = 128, where (br, bc) would not fit 32 KiB
    heavy_first: bool = False  # v12: grid (B·H, tiles), the tiles with the most keys first

    def tile(self, d: int) -> tuple[int, int]:
        """(B_r, B_c) at head dim d."""
        return self.d128 if d == 128 and self.d128 else (self.br, self.bc)

    def threads(self, d: int) -> int:
        return self.tile(d)[0] // (16 if self.simt else 8) * 32

    def kernel(self, d: int) -> str:
        br, bc = self.tile(d)
        return f"flash_v{self.version}_{br}x{bc}_d{d}"

    def tg_bytes(self, d: int) -> int:
        """Threadgroup memory of flash_forward's arrays: the K/V chunk buffers (kv4), the
        score tile (s_all), the diag(alpha) tiles (diag_all) (v7: no tiles, but 4-float
        placeholders, as Metal has no empty arrays; v8: rows of the chunks and the score
        tile `pad` floats longer). The 4-byte kv_bad flag is not counted: no rung is
        within 4 bytes of 32 KiB (the largest declares 28 KiB). v10 (flash_forward_simt):
        Q's B_r rows, K's block (or the block's P, whichever is larger) and V's block."""
        if self.simt:
            br, bc = self.tile(d)
            return _F32 * (br * d + max(bc * d, br * bc) + bc * d)
        dk = self.dk.get(d, 32) + self.pad
        sld = self.bc + self.pad
        tiles = 4 + 4 if self.reg_softmax else self.br * sld + self.br * 8
        return _F32 * (self.buffers * self.bc * dk + tiles)

    def grid(self, t: int, bh: int, d: int) -> tuple[int, int, int]:
        br = self.tile(d)[0]
        tiles = (t + br - 1) // br
        return (bh, tiles, 1) if self.heavy_first else (tiles, bh, 1)

    def launch_order(self, t: int, bh: int, d: int) -> list[tuple[int, int]]:
        """(head, query tile) of each threadgroup in index order (x fastest), the order GPUs
        start them in, as the kernels map group (x, y): v12 head x and tile tiles - 1 - y,
        the others tile x of head y."""
        gx, gy, _ = self.grid(t, bh, d)
        if self.heavy_first:
            return [(x, gy - 1 - y) for y in range(gy) for x in range(gx)]
        return [(y, x) for y in range(gy) for x in range(gx)]


def _dk(d32, d64, d128):
    return {32: d32, 64: d64, 128: d128}


# The ladder. Keep every rung: the ladder is the lesson (docs/stage5b.md).
RUNGS: dict[str, Rung] = {
    r.name: r
    for r in [
        Rung("flash_v1", 1, "baseline: 64x64 tiles, K/V chunks of 32 columns, simdgroup_matrix",
             64, 64, _dk(32, 32, 32)),
        Rung("flash_v2", 2, "v1 + XOR-swizzled score-tile walk (no conflict if banked like NVIDIA)",
             64, 64, _dk(32, 32, 32)),
        Rung("flash_v3", 3, "v2 + two K/V chunk buffers of half the width: 1 barrier a chunk, "
             "8 a key block at D=64 as v1 (no async copy)",
             64, 64, _dk(16, 16, 16), 2),
        Rung("flash_v4", 4, "v3 + fragments interleaved in source order (the compiler schedules)",
             64, 64, _dk(16, 16, 16), 2),
        Rung("flash_v5", 5, "v4 + next fragment's load written before each multiply (source order)",
             64, 64, _dk(16, 16, 16), 2),
        Rung("flash_v6_64x32", 6, "v5 + FMA-fused exp2 softmax, 64x32 tiles",
             64, 32, _dk(32, 64, 64), 2),
        Rung("flash_v6_64x64", 6, "v5 + FMA-fused exp2 softmax, 64x64 tiles",
             64, 64, _dk(16, 16, 16), 2),
        Rung("flash_v6_128x32", 6, "v5 + FMA-fused exp2 softmax, 128x32 tiles",
             128, 32, _dk(32, 32, 32), 2),
        Rung("flash_v7", 7, "v6_64x32 + softmax in registers (thread_elements), no score tile",
             64, 32, _dk(32, 64, 64), 2, reg_softmax=True),
        Rung("flash_v8", 8, "v6_64x32 with padded rows (+4 floats) instead of the swizzle",
             64, 32, _dk(32, 64, 64), 2, pad=4),
        Rung("flash_v9", 9, "v7 + the next K/V chunk staged in registers (device reads in flight)",
             64, 32, _dk(32, 64, 64), 2, reg_softmax=True, prefetch=True),
        Rung("flash_v10", 10, "no simdgroup_matrix: scalar FMAs on 4 x 4 register tiles, "
             "v6's softmax in registers (32 x 16 tiles at D=128)",
             64, 32, simt=True, d128=(32, 16)),  # no chunks of D: whole rows
        Rung("flash_v10_32x32", 10, "v10 with 32 query rows a threadgroup (two SIMD groups): "
             "twice the K/V reads per FLOP, half the threads",
             32, 32, simt=True, d128=(32, 16)),
        Rung("flash_v11", 11, "v10 with its lanes paired: lanes l, l^1 read one row of Q or P, "
             "l, l^2 one key of K or V (2 wavefronts a float4 read, not 4)",
             64, 32, simt=True, d128=(32, 16)),  # v10's launch; only the kernel differs
        Rung("flash_v12", 12, "v11 with the heaviest query tiles first (grid B*H x tiles): "
             "causal calls do not end waiting on the last heads' longest tiles",
             64, 32, simt=True, d128=(32, 16), heavy_first=True),
    ]
}  # fmt: skip

# v6's tile shapes, for the autotuner. (128, 64) is listed but never built: its score
# tile alone is 128 * 64 * 4 = 32 KiB, the whole threadgroup memory. With the kernel's
# other arrays (flash_forward's kv4: 2 chunk buffers of 64 x 16 floats, 8 KiB; diag_all:
# 128 x 8 floats, 4 KiB) it would declare 44 KiB (tg_bytes: 45,056 bytes), plus the
# 4-byte kv_bad flag.
V6_SHAPES = [(64, 32), (64, 64), (128, 32), (128, 64)]
V6_TOO_BIG = Rung("flash_v6_128x64", 6, "not built: over 32 KiB", 128, 64, _dk(16, 16, 16), 2)

DEFAULT_V6 = "flash_v6_64x32"  # when the autotuner has no entry


def names() -> list[str]:
    """Every selectable name: the rungs, plus "flash_v6" (the tuned v6 shape)."""
    return (
        ["flash_v1", "flash_v2", "flash_v3", "flash_v4", "flash_v5", "flash_v6"]
        + [n for n in RUNGS if n.startswith("flash_v6_")]
        + [n for n, rung in RUNGS.items() if rung.version >= 7]
    )


def v6_candidates(d: int) -> list[Rung]:
    """v6 tile shapes that fit this device's threadgroup memory for head dim d."""
    out = []
    for br, bc in V6_SHAPES:
        rung = RUNGS.get(f"flash_v6_{br}x{bc}", V6_TOO_BIG)
        if rung.name in RUNGS and rung.tg_bytes(d) <= _max_tg():
            out.append(rung)
    return out


def get_rung(name: str, d: int = 64, t: int = 0, causal: bool = False) -> Rung:
    """The rung for a name ("flash" and "flash_v6" mean v6 with the tuned shape);
    ValueError listing the valid names."""
    key = str(name).strip().lower()
    if key in ("flash", "flash_v6"):
        return RUNGS[_tuned(d, t, causal) or DEFAULT_V6]
    if key in RUNGS:
        return RUNGS[key]
    raise ValueError(f"[flash] unknown rung {name!r}; valid: 'flash', {', '.join(names())}")


_limits: int | None = None


def _max_tg() -> int:
    global _limits
    if _limits is None:
        from camel import metal

        _limits = metal.device_info()["max_threadgroup_memory"]
    return _limits


# ---- v6's tuned tile shape (tuned by camel/bench/tuner.py, cached by camel/tuning.py) ----


def _tuned(d: int, t: int, causal: bool) -> str | None:
    from camel import tuning

    name = tuning.flash_lookup(d, t, causal)
    return name if name in RUNGS else None


# ---- forward and backward -----------------------------------------------------------------


def _params(t: int, s: int, causal: bool, d: int) -> np.ndarray:
    """The FlashParams struct: T, S, causal (uint32) and scale (float32)."""
    p = np.zeros(4, dtype=np.uint32)
    p[0], p[1], p[2] = t, s, int(bool(causal))
    p[3:4] = np.array([1.0 / math.sqrt(d)], dtype=np.float32).view(np.uint32)
    return p


def check_shapes(q_shape, k_shape, v_shape) -> None:
    """ValueError naming the shapes unless q (B, H, T, D), k and v (B, H, S, D) with a
    supported D."""
    ok = (
        len(q_shape) == len(k_shape) == len(v_shape) == 4
        and q_shape[:2] == k_shape[:2] == v_shape[:2]
        and q_shape[3] == k_shape[3] == v_shape[3]
        and k_shape[2] == v_shape[2]
    )
    if not ok:
        raise ValueError(
            f"[flash] expects q (B, H, T, D), k (B, H, S, D) and v (B, H, S, D), got shapes "
            f"{tuple(q_shape)}, {tuple(k_shape)} and {tuple(v_shape)}"
        )
    if q_shape[3] not in HEAD_DIMS:
        raise ValueError(
            f"[flash] head dim D = {q_shape[3]} is not built; flash kernels exist for "
            f"D in {HEAD_DIMS} (shapes {tuple(q_shape)}); use CAMEL_ATTENTION=naive"
        )
    if k_shape[2] == 0:
        raise ValueError(f"[flash] no keys: k has shape {tuple(k_shape)}")
    b, h, t, d = q_shape
    if b * h * max(t, k_shape[2]) * d >= 2**32:
        raise ValueError(
            f"[flash] shapes {tuple(q_shape)} and {tuple(k_shape)} are too large for the "
            "kernels' 32-bit indexing (B*H*T*D must stay below 2**32)"
        )


def contiguous16(x):
    """x itself, or a copy if its byte offset is not 16-aligned (the kernels read float4)."""
    if x.offset % 16 == 0:
        return x
    from camel import backend_mps

    return backend_mps.copy(x)


def forward(q, k, v, causal: bool = False, rung: str | None = None):
    """(out, lse) for DeviceArrays q (B, H, T, D), k, v (B, H, S, D). rung: a name from
    names() or "flash"; default: CAMEL_ATTENTION if it names a rung, else "flash"."""
    from camel import metal

    check_shapes(q.shape, k.shape, v.shape)
    b, h, t, d = q.shape
    s = k.shape[2]
    if rung is None:
        env = config.attention()  # "" when unset
        rung = env if env.startswith("flash") else "flash"
    r = get_rung(rung, d, t, causal)
    out = metal.DeviceArray.empty((b, h, t, d), np.float32)
    lse = metal.DeviceArray.empty((b, h, t), np.float32)
    if t == 0 or b * h == 0:
        return out, lse
    if r.tg_bytes(d) > _max_tg():
        raise RuntimeError(
            f"[flash] {r.kernel(d)} needs {r.tg_bytes(d)} bytes of threadgroup memory; this "
            f"device allows {_max_tg()}"
        )
    q, k, v = (contiguous16(x) for x in (q, k, v))
    fn = metal.kernel(SHADER, r.kernel(d))
    keys = t * s / 2 if causal else t * s  # score entries computed, roughly
    nbytes = _F32 * b * h * (2 * t * d + 2 * s * d + t)
    fn(q, k, v, out, lse, _params(t, s, causal, d),
       threadgroups=r.grid(t, b * h, d), threads_per_threadgroup=(r.threads(d), 1, 1),
       flops=int(4 * b * h * keys * d), bytes=nbytes)  # fmt: skip
    return out, lse


BACKWARD_KINDS = ("tiled", "rows")


def backward(q, k, v, out, lse, dout, causal: bool = False, kind: str = "tiled"):
    """(dq, dk, dv) recomputed from lse, one thread per row; no (T, S) buffer.
    kind "rows": each thread reads the other side's rows from device memory itself;
    "tiled" (default): 64 threads share those rows through threadgroup memory."""
    if kind not in BACKWARD_KINDS:
        raise ValueError(f"[flash] unknown backward kind {kind!r}; valid: {BACKWARD_KINDS}")
    from camel import metal

    b, h, t, d = q.shape
    s = k.shape[2]
    if b * h == 0 or t == 0:  # no queries: no gradient reaches k and v
        from camel import backend_mps

        zeros = (backend_mps.full(x.shape, 0.0, "float32") for x in (k, v))
        return (metal.DeviceArray.empty(q.shape, np.float32), *zeros)
    dq = metal.DeviceArray.empty(q.shape, np.float32)
    dk = metal.DeviceArray.empty(k.shape, np.float32)
    dv = metal.DeviceArray.empty(v.shape, np.float32)
    rows = b * h * t
    delta = metal.DeviceArray.empty((b, h, t), np.float32)
    p = _params(t, s, causal, d)
    metal.kernel(SHADER, "flash_backward_delta")(
        out, dout, delta, rows, d, threads=rows, threads_per_threadgroup=min(256, rows),
        flops=2 * rows * d, bytes=_F32 * rows * (2 * d + 1))  # fmt: skip
    work = (t * s // 2 if causal else t * s) * b * h
    if kind == "rows":  # exactly t (s) threads per (batch, head), one per row
        reads, suffix = work, ""  # rows of the other side read from device memory
        dq_grid = {"threads": (t, b * h, 1), "threads_per_threadgroup": (min(64, t), 1, 1)}
        dkv_grid = {"threads": (s, b * h, 1), "threads_per_threadgroup": (min(64, s), 1, 1)}
    else:  # whole threadgroups of 64 (the kernels guard the tail)
        reads, suffix = work // 64 + 1, "_tiled"
        dq_grid = {"threadgroups": ((t + 63) // 64, b * h, 1), "threads_per_threadgroup": 64}
        dkv_grid = {"threadgroups": ((s + 63) // 64, b * h, 1), "threads_per_threadgroup": 64}
    metal.kernel(SHADER, f"flash_backward_dq{suffix}_d{d}")(
        q, k, v, dout, lse, delta, dq, p, flops=6 * work * d,
        bytes=_F32 * (b * h * t * 3 * d + reads * 2 * d), **dq_grid)  # fmt: skip
    metal.kernel(SHADER, f"flash_backward_dkv{suffix}_d{d}")(
        q, k, v, dout, lse, delta, dk, dv, p, flops=8 * work * d,
        bytes=_F32 * (b * h * s * 4 * d + reads * 2 * d), **dkv_grid)  # fmt: skip
    return dq, dk, dv


def reference_numpy(q, k, v, causal=False):
    """(out, lse) in NumPy (float64 inside), the CPU reference for the tests."""
    q64, k64, v64 = (np.asarray(x, np.float64) for x in (q, k, v))
    scores = q64 @ np.swapaxes(k64, -1, -2) / math.sqrt(q.shape[-1])  # (B, H, T, S)
    if causal:
        t, s = scores.shape[-2:]
        scores = np.where(np.tril(np.ones((t, s), bool)), scores, -np.inf)
    m = scores.max(axis=-1, keepdims=True)
    e = np.exp(scores - m)
    total = e.sum(axis=-1, keepdims=True)
    out = (e / total) @ v64
    lse = (m + np.log(total))[..., 0]
    return out.astype(np.float32), lse.astype(np.float32)


# ---- selection (called by F.scaled_dot_product_attention) ---------------------------------

_noticed: set = set()


def _notice(key: str, message: str) -> None:
    """Print a message once per process (per key)."""
    if key not in _noticed:
        _noticed.add(key)
        print(message, file=sys.stderr)


# The CUDA shim's default path: naive attention while its (B, H, T, S) scores take at most
# this many bytes. On an H200 the naive path (GEMM and softmax kernels) beat every flash
# rung at every T measured (T = 256 in GPT-mini's step, 1024 and 4096 causal or not:
# docs/cuda.md); flash keeps its point where the scores (and their copy for the backward)
# would not fit comfortably, which is where it was built to go.
CUDA_NAIVE_MAX_SCORES = 256 << 20


def _naive_is_faster(q, k) -> bool:
    """True on the CUDA shim when the naive path's scores fit CUDA_NAIVE_MAX_SCORES."""
    from camel import metal

    b_h = q.shape[0] * q.shape[1]
    return metal.shim() == "cuda" and 4 * b_h * q.shape[2] * k.shape[2] <= CUDA_NAIVE_MAX_SCORES


def select(op: str, mode: str, q, k, v) -> str | None:
    """Which flash rung F.scaled_dot_product_attention runs, or None for the naive path.

    mode is CAMEL_ATTENTION, lower-cased ("" when unset):
        ""        flash on "mps" where the head dim is built (32, 64, 128), else naive;
                  on the CUDA shim naive while the scores fit CUDA_NAIVE_MAX_SCORES
        "flash"   the same, with a one-time notice when it falls back to naive
        a rung    ("flash_v3", "flash_v6_64x32", ...): forced; an error where it cannot run
    ValueError for an unknown mode, listing the valid ones.
    """
    valid = ["naive", "flash", *names()]
    if mode not in ("", "flash") and mode not in names():
        listed = ", ".join(repr(n) for n in valid)
        raise ValueError(f"[{op}] CAMEL_ATTENTION={mode!r} is unknown; valid: {listed}")
    d = q.shape[-1]
    shapes = f"q {q.shape}, k {k.shape}, v {v.shape}"
    reason = None
    if q.device != "mps":
        reason = f"flash kernels run on 'mps'; the tensors are on {q.device!r}"
    elif q.ndim != 4 or v.shape[-1] != d:
        reason = f"flash needs q, k, v (B, H, T|S, D) with one D; got {shapes}"
    elif k.shape[-2] == 0:
        reason = f"there are no keys; {shapes}"
    elif d not in HEAD_DIMS:
        reason = f"head dim D = {d} has no flash kernel (built: {HEAD_DIMS}); {shapes}"
    if reason is None and mode == "" and _naive_is_faster(q, k):
        _notice("cuda-naive", f"[{op}] note: using the naive path on the CUDA shim, where it "
                f"is faster than every flash rung measured (docs/cuda.md), while the scores "
                f"fit {CUDA_NAIVE_MAX_SCORES >> 20} MiB; {shapes} (shown once)")  # fmt: skip
        return None
    if reason is None:
        return mode or "flash"
    if mode.startswith("flash_"):
        raise ValueError(f"[{op}] CAMEL_ATTENTION={mode} cannot run: {reason}")
    if mode == "flash" or q.device == "mps":
        # Once per process, not per shape: generation grows T on every step.
        _notice("naive", f"[{op}] note: using the naive path: {reason} (shown once)")
    return None
