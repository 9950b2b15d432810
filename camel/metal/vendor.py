"""camel.metal.vendor — the vendors' own kernels, the references the benchmark ladders
compare against: `mps_matmul` (MPSMatrixMultiplication on Metal, cuBLAS on the CUDA shim)
and `mpsgraph_attention` (MPSGraph's fused attention, Metal on macOS 15+). Each is recorded
by camel.profile() like a dispatch.
"""

from __future__ import annotations

import numpy as np

from camel.metal import loading
from camel.metal.buffers import DeviceArray, _upload_viewed, _viewed
from camel.metal.kernels import _U32_MAX, _profilers
from camel.metal.loading import _fail, _native


def mps_matmul(a: DeviceArray, b: DeviceArray, c: DeviceArray) -> None:
    """c = a @ b in FP32 through the vendor GEMM the benchmark ladder compares against:
    MPSMatrixMultiplication on Metal, cuBLAS SGEMM (TF32 off) on the CUDA shim; the
    simulator has none. a (M, K), b (K, N), c (M, N), float32, offset 0."""
    for name, x in (("a", a), ("b", b), ("c", c)):
        if x.ndim != 2 or x.dtype != np.float32 or x.offset != 0:
            raise ValueError(
                f"[mps_matmul] {name} must be a 2-D float32 DeviceArray at offset 0, "
                f"got shape {x.shape} {x.dtype.name} offset {x.offset}"
            )
    (m, k), (k2, n) = a.shape, b.shape
    if k != k2 or c.shape != (m, n):
        raise ValueError(f"[mps_matmul] shapes {a.shape} @ {b.shape} -> {c.shape} do not align")
    blocks = [x.buffer._live() for x in (a, b, c)]
    if _viewed:
        _upload_viewed(blocks)
    cb = _native().camel_mps_matmul(blocks[0].handle, blocks[1].handle, blocks[2].handle, m, n, k)
    if not cb:
        raise _fail("the vendor matmul (MPS on Metal, cuBLAS on the CUDA shim)")
    for block in blocks:
        block.last_use = cb
    if _profilers:  # recorded like a dispatch; its "grid" is (M, N, K)
        loading._c_commit()
        for p in _profilers:
            p._add(
                "mps_matmul",
                (m, n, k),
                (0, 0, 0),
                False,
                cb,
                2.0 * m * n * k,
                4 * (m * k + k * n + m * n),
            )


def mpsgraph_attention(
    q: DeviceArray, k: DeviceArray, v: DeviceArray, out: DeviceArray, scale: float, causal=False
) -> None:
    """out = softmax(q @ kᵀ * scale + mask) @ v through MPSGraph's fused scaled-dot-product
    attention (Metal on macOS 15+ only): the vendor attention the flash ladder compares
    against. q, k, v, out: float32 DeviceArrays of one shape (..., T, D), e.g. (B, H, T, D),
    at offset 0; the leading dimensions are the batch of heads. causal masks key j > query i.
    Elsewhere (the simulator, older macOS) it raises MetalError saying why."""
    for name, x in (("q", q), ("k", k), ("v", v), ("out", out)):
        if not isinstance(x, DeviceArray):
            raise TypeError(
                f"[mpsgraph_attention] {name} must be a DeviceArray, got {type(x).__name__}"
            )
        if x.ndim < 2 or x.dtype != np.float32 or x.offset != 0:
            raise ValueError(
                f"[mpsgraph_attention] {name} must be a float32 DeviceArray of shape (..., T, D) "
                f"at offset 0, got shape {x.shape} {x.dtype.name} offset {x.offset}"
            )
    if not q.shape == k.shape == v.shape == out.shape:
        raise ValueError(
            f"[mpsgraph_attention] q, k, v and out must have one shape (..., T, D), got "
            f"{q.shape}, {k.shape}, {v.shape} and {out.shape}"
        )
    *heads, t, d = q.shape
    bh = int(np.prod(heads, dtype=np.int64)) if heads else 1
    if bh == 0 or t == 0 or d == 0:
        raise ValueError(f"[mpsgraph_attention] empty shape {q.shape}: every size must be > 0")
    if max(bh, t, d) > _U32_MAX:
        raise ValueError(f"[mpsgraph_attention] shape {q.shape} does not fit 32-bit sizes")
    scale = float(scale)
    if not np.isfinite(scale):
        raise ValueError(f"[mpsgraph_attention] scale must be finite, got {scale}")
    blocks = [x.buffer._live() for x in (q, k, v, out)]
    handles = [b.handle for b in blocks]
    if _viewed:
        _upload_viewed(blocks)
    cb = _native().camel_mpsgraph_attention(*handles, bh, t, d, scale, int(bool(causal)))
    if not cb:
        raise _fail(f"MPSGraph attention of shape {q.shape} (causal={bool(causal)})")
    for block in blocks:
        block.last_use = cb
    if _profilers:  # recorded like a dispatch; its "grid" is (B*H, T, D)
        loading._c_commit()
        keys = t * t / 2 if causal else t * t  # score entries, roughly
        for p in _profilers:
            p._add(
                "mpsgraph_attention",
                (bh, t, d),
                (0, 0, 0),
                False,
                cb,
                4.0 * bh * keys * d,
                4 * 4 * bh * t * d,
            )
