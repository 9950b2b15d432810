"""The naive attention path's causal work skipping (camel/gemm.py `triangle`, the softmax
scale) against NumPy and, where installed, PyTorch.

- gemm.matmul(triangle=...): "lower" leaves the tiles wholly above the diagonal unwritten
  (a sentinel survives there) and is right on and below it; "a_lower" / "a_upper" never
  read op(A)'s promised zeros beyond the tile's K range (NaN there would show); every rung
  gives the wanted part (the rungs that do not skip compute everything); T != S, batched,
  M past K, in the simulator's three schedule orders for the rungs that skip.
- F.scaled_dot_product_attention on the naive path, forward and gradients, causal and not,
  T != S, batched, on "cpu" and "mps"; no separate scaling pass on "mps".
"""

import math

import numpy as np
import pytest
from conftest import require_shim

import camel
import camel.functional as F
from camel import backend_cpu, config, gemm, tuning

metal = pytest.importorskip("camel.metal")

require_shim()

ORDERS = ["forward", "reverse", "random"]
SKIPPING = [v for v in gemm.versions() if gemm.get_rung(v).triangle]  # 6-9, 11, 15
WARPTILE_VARIANTS = [v for v in gemm.VARIANTS if v.startswith("wt_")]  # v15's other tiles
SENTINEL = np.float32(12345.0)


def _device(x):
    return metal.DeviceArray.from_numpy(np.ascontiguousarray(x, dtype=np.float32))


def _tol(k):
    return 1e-4 * max(1.0, math.sqrt(k))


def _skipped_tiles(m, n, bm, bn):
    """(M, N) mask of the elements of C in tiles wholly above the diagonal (n0 >= m0 + bm)."""
    rows, cols = np.arange(m)[:, None], np.arange(n)[None, :]
    return (cols // bn) * bn >= (rows // bm) * bm + bm


@pytest.mark.parametrize("version", gemm.versions())
@pytest.mark.parametrize("batch, m, n, k", [((), 200, 200, 24), ((2,), 150, 67, 33),
                                            ((2, 3), 67, 201, 16), ((), 330, 140, 5)])  # fmt: skip
def test_lower_computes_the_triangle(version, batch, m, n, k, rng, order="forward"):
    """scores = q k^T ("lower", B stored transposed): C[i, j] for j <= i is q_i . k_j; the
    tiles above the diagonal keep what the buffer held (rungs that skip) or hold the
    product (the others)."""
    q = rng.standard_normal((*batch, m, k), dtype=np.float32)
    kk = rng.standard_normal((*batch, n, k), dtype=np.float32)
    out = _device(np.full((*batch, m, n), SENTINEL, dtype=np.float32))
    gemm.matmul(_device(q), _device(kk), transpose_b=True, out=out, version=version,
                triangle="lower")  # fmt: skip
    got = out.numpy().copy()
    want = np.matmul(q.astype(np.float64), np.swapaxes(kk, -1, -2).astype(np.float64))
    wanted = np.tril(np.ones((m, n), dtype=bool))
    np.testing.assert_allclose(got[..., wanted], want[..., wanted], rtol=1e-4, atol=_tol(k),
                               err_msg=f"version {version}: on and below the diagonal")  # fmt: skip
    rung = gemm.get_rung(version)
    if rung.triangle:
        skipped = _skipped_tiles(m, n, rung.bm, rung.bn)
        assert np.all(got[..., skipped] == SENTINEL), f"version {version} wrote a skipped tile"
        computed = ~skipped & ~wanted  # above the diagonal in a tile that straddles it
        np.testing.assert_allclose(got[..., computed], want[..., computed], rtol=1e-4,
                                   atol=_tol(k))  # fmt: skip


def _triangular(rng, batch, m, k, upper, bm):
    """op(A) (M, K) with exact zeros on its promised side of the diagonal, and NaN where a
    rung whose tiles have `bm` rows must not read (bm None: zeros there too)."""
    a = rng.standard_normal((*batch, m, k), dtype=np.float32)
    a = np.triu(a) if upper else np.tril(a)
    if bm is not None:
        rows, cols = np.arange(m)[:, None], np.arange(k)[None, :]
        m0 = (rows // bm) * bm
        outside = cols < m0 if upper else cols >= m0 + bm
        a = np.where(outside, np.float32(np.nan), a)
    return a


@pytest.mark.parametrize("version", gemm.versions())
@pytest.mark.parametrize("upper", [False, True])
@pytest.mark.parametrize("stored_t", [False, True])
@pytest.mark.parametrize("batch, m, k, n", [((), 200, 200, 40), ((2,), 150, 137, 9),
                                            ((), 300, 150, 20), ((2, 2), 70, 260, 17)])  # fmt: skip
def test_triangular_a_is_read_on_its_triangle(version, upper, stored_t, batch, m, k, n, rng,
                                              order="forward"):  # fmt: skip
    """P v ("a_lower") and P^T dO ("a_upper"), op(A) stored plain or transposed: the
    product of the triangular op(A), without reading past the tile's K range."""
    rung = gemm.get_rung(version)
    a = _triangular(rng, batch, m, k, upper, rung.bm if rung.triangle else None)
    b = rng.standard_normal((*batch, k, n), dtype=np.float32)
    stored = np.ascontiguousarray(np.swapaxes(a, -1, -2)) if stored_t else a
    out = gemm.matmul(_device(stored), _device(b), transpose_a=stored_t, version=version,
                      triangle="a_upper" if upper else "a_lower")  # fmt: skip
    clean = np.nan_to_num(a, nan=0.0).astype(np.float64)
    want = np.matmul(clean, b.astype(np.float64))
    got = out.numpy()
    assert not np.isnan(got).any(), f"version {version} read past its K range"
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=_tol(k), err_msg=f"version {version}")


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("version", SKIPPING)
def test_triangles_in_schedule_orders(version, order, monkeypatch, rng):
    monkeypatch.setenv("CAMEL_SIM_ORDER", order)
    test_lower_computes_the_triangle(version, (2,), 150, 140, 20, rng)
    for upper in (False, True):
        test_triangular_a_is_read_on_its_triangle(version, upper, upper, (), 150, 137, 9, rng)


@pytest.mark.parametrize("version", WARPTILE_VARIANTS)
def test_warptile_variants_skip_like_v15(version, rng):
    """v15's tuning variants share its kernel template, and so its triangles; the CUDA shim's
    triangle products may pick any of them (gemm.triangle_rung)."""
    assert gemm.get_rung(version).triangle
    test_lower_computes_the_triangle(version, (2,), 300, 270, 20, rng)
    for upper in (False, True):
        test_triangular_a_is_read_on_its_triangle(version, upper, upper, (), 300, 290, 9, rng)


def test_triangle_skips_split_k_and_rejects_a_bad_name(rng):
    a = np.tril(rng.standard_normal((200, 256), dtype=np.float32))
    b = rng.standard_normal((256, 8), dtype=np.float32)
    got = gemm.matmul(_device(a), _device(b), version="9/k4", triangle="a_lower").numpy()
    np.testing.assert_allclose(got, a.astype(np.float64) @ b, rtol=1e-4, atol=_tol(256))
    with pytest.raises(ValueError, match="triangle must be one of"):
        gemm.matmul(_device(a), _device(b), triangle="upper")


def test_numpy_backend_triangles(rng):
    """The "cpu" reference: "lower" is NaN above the diagonal (a reader fails loudly),
    "a_lower" / "a_upper" the whole product (equal when the promised zeros are zeros)."""
    a = rng.standard_normal((2, 5, 7), dtype=np.float32)
    b = rng.standard_normal((2, 6, 7), dtype=np.float32)
    got = backend_cpu.matmul(a, b, False, True, "lower")
    upper = np.triu(np.ones((5, 6), dtype=bool), k=1)
    assert np.isnan(got[..., upper]).all()
    np.testing.assert_allclose(got[..., ~upper], (a @ np.swapaxes(b, -1, -2))[..., ~upper],
                               rtol=1e-5)  # fmt: skip
    c = rng.standard_normal((2, 7, 3), dtype=np.float32)
    for tri in ("a_lower", "a_upper"):
        np.testing.assert_allclose(backend_cpu.matmul(a, c, triangle=tri), a @ c, rtol=1e-5)


# ---- the naive attention path ------------------------------------------------------------


def numpy_attention(q, k, v, causal, dout):
    """out and (dq, dk, dv) of softmax(q k^T / sqrt(D) [+ mask]) v in float64."""
    q, k, v, dout = (x.astype(np.float64) for x in (q, k, v, dout))
    c = 1.0 / math.sqrt(q.shape[-1])
    s = q @ np.swapaxes(k, -1, -2) * c
    if causal:
        s = np.where(np.triu(np.ones(s.shape[-2:], dtype=bool), k=1), -np.inf, s)
    p = np.exp(s - s.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    dp = dout @ np.swapaxes(v, -1, -2)
    ds = p * (dp - (dp * p).sum(axis=-1, keepdims=True))
    return p @ v, (c * ds @ k, c * np.swapaxes(ds, -1, -2) @ q, np.swapaxes(p, -1, -2) @ dout)


def torch_attention(q, k, v, causal, dout):
    torch = pytest.importorskip("torch")
    ts = [torch.tensor(x, dtype=torch.float64, requires_grad=True) for x in (q, k, v)]
    out = torch.nn.functional.scaled_dot_product_attention(*ts, is_causal=causal)
    out.backward(torch.tensor(dout, dtype=torch.float64))
    return out.detach().numpy(), tuple(x.grad.numpy() for x in ts)


def run_attention(device, q, k, v, causal, dout):
    ts = [camel.tensor(x, device=device, requires_grad=True) for x in (q, k, v)]
    out = F.scaled_dot_product_attention(*ts, causal=causal)
    out.backward(camel.tensor(dout, device=device))
    return out.numpy().copy(), tuple(x.grad.numpy().copy() for x in ts)


# (B, H, T, S, D, Dv): T and S past v9's 128 rows and v11's 64, not multiples of any tile
ATTENTION = [(1, 2, 150, 150, 16, 16), (2, 1, 137, 70, 8, 12), (1, 2, 70, 201, 16, 8),
             (1, 1, 1, 1, 4, 4)]  # fmt: skip


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", ATTENTION)
def test_naive_attention_forward_and_gradients(device, shape, causal, monkeypatch, rng):
    config.set_choices(attention="naive")
    b, h, t, s, d, dv = shape
    q = rng.standard_normal((b, h, t, d), dtype=np.float32)
    k = rng.standard_normal((b, h, s, d), dtype=np.float32)
    v = rng.standard_normal((b, h, s, dv), dtype=np.float32)
    dout = rng.standard_normal((b, h, t, dv), dtype=np.float32)
    out, grads = run_attention(device, q, k, v, causal, dout)
    refs = [numpy_attention(q, k, v, causal, dout)]
    try:
        refs.append(torch_attention(q, k, v, causal, dout))
    except pytest.skip.Exception:
        pass
    for want_out, want_grads in refs:
        assert not np.isnan(out).any() and not any(np.isnan(g).any() for g in grads)
        np.testing.assert_allclose(out, want_out, rtol=1e-4, atol=2e-5)
        for name, got, want in zip("qkv", grads, want_grads, strict=True):
            tol = 1e-4 * max(1.0, np.abs(want).max())
            np.testing.assert_allclose(got, want, rtol=1e-3, atol=tol, err_msg=f"d{name}")


@pytest.mark.parametrize("order", ORDERS)
def test_naive_attention_in_schedule_orders(order, monkeypatch, rng):
    monkeypatch.setenv("CAMEL_SIM_ORDER", order)
    test_naive_attention_forward_and_gradients("mps", ATTENTION[1], True, monkeypatch, rng)


def test_naive_attention_has_no_scaling_pass(monkeypatch, rng):
    """The 1/sqrt(D) scale is applied inside the softmax kernels, forward and backward."""
    config.set_choices(attention="naive")
    x = rng.standard_normal((1, 2, 40, 8), dtype=np.float32)
    with camel.profile() as prof:
        run_attention("mps", x, x, x, True, x)
    names = {e.name for e in prof.events}
    assert any(n.startswith("softmax_last_axis") for n in names), sorted(names)
    assert not any("mul_scalar" in n for n in names), sorted(names)


@pytest.mark.parametrize(
    "triangle, want",
    [(None, 384), ("lower", 2 * 18 * 8), ("a_lower", 2 * 21 * 4), ("a_upper", 2 * 33 * 4)],
)
def test_profile_counts_a_triangles_work(triangle, want, rng):
    """The profiler's FLOPs of a triangle product: the useful part, (M, K) = (6, 8) op(A)
    with 21 entries k <= i and 33 with k >= i; (M, N) = (6, 4) C with 18 entries j <= i."""
    a = _device(rng.standard_normal((6, 8), dtype=np.float32))
    b = _device(rng.standard_normal((8, 4), dtype=np.float32))
    with camel.profile() as prof:
        gemm.matmul(a, b, version="9", triangle=triangle)
    (event,) = [e for e in prof.events if e.name.startswith("matmul")]
    assert event.flops == want


def test_matmul_triangle_only_for_the_attention_products(rng):
    """MatMul's backward knows the gradient triangles of q @ k^T and P @ v only."""
    a = camel.tensor(rng.standard_normal((3, 3), dtype=np.float32), requires_grad=True)
    with pytest.raises(ValueError, match="triangle='lower' is for the causal attention"):
        F.MatMul.apply(a, a, triangle="lower")  # q @ k^T has k transposed
    with pytest.raises(ValueError, match="triangle='a_upper'"):
        F.MatMul.apply(a, a, triangle="a_upper")


def test_cuda_defaults_give_way_to_a_skipping_rung(monkeypatch, rng):
    """A chosen rung that computes every tile (v14, a tuned pf_64x64x16_4x4) gives way, for a
    triangle product, to v15's template at its tile size; the CUDA shim's untuned small tile
    is that template already and skips."""
    monkeypatch.setattr(metal, "shim", lambda: "cuda")
    monkeypatch.setattr(tuning, "lookup", lambda *shape: None)
    config.set_choices(matmul=None)
    assert gemm.triangle_rung(gemm.get_rung("14")).version == "wt_128x64x16_64x32"
    assert gemm.triangle_rung(gemm.get_rung("pf_64x64x16_4x4")).version == "wt_64x64x16_32x32"
    for skipping in ("9", "15", gemm.CUDA_SMALL_TILE):
        assert gemm.triangle_rung(gemm.get_rung(skipping)).version == skipping
    q = rng.standard_normal((3, 200, 16), dtype=np.float32)
    k = rng.standard_normal((3, 200, 16), dtype=np.float32)
    assert gemm.default_version(200, 200, 16, 3) == gemm.CUDA_SMALL_TILE
    with camel.profile() as prof:
        got = gemm.matmul(_device(q), _device(k), transpose_b=True, triangle="lower").numpy()
    assert [e.name for e in prof.events] == [gemm.get_rung(gemm.CUDA_SMALL_TILE).kernel]
    want = np.matmul(q.astype(np.float64), np.swapaxes(k, -1, -2))
    keep = ~_skipped_tiles(200, 200, 64, 64)
    np.testing.assert_allclose(got[:, keep], want[:, keep], rtol=1e-4, atol=_tol(16))
