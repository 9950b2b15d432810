"""Stage 2 softmax family (shaders/ops_softmax.metal) against the NumPy reference.

softmax, log_softmax and their backward over rows of 1 .. 10 000, causal softmax,
the fused cross-entropy forward and backward, extreme logits (+-1e4, -inf entries),
out-of-range targets, in all three simulator schedule orders; op tests on "cpu"
and "mps" against PyTorch where it is installed.
"""

import numpy as np
import pytest
from conftest import backend_mps_or_skip

import camel
import camel.functional as F
from camel import backend_cpu as cpu
from camel import config


def rand(*shape, seed=0, scale=1.0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def host(mps, x):
    return np.array(mps.to_numpy(x))


def close(got, want):
    assert not np.isnan(got).any(), "NaN in the kernel's output"
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)


ROWS = [(1, 1), (3, 1), (2, 3), (4, 31), (5, 32), (3, 33), (2, 1000), (1, 4097), (2, 10000)]
# Version 2's geometry: a SIMD group per row (8 rows per threadgroup: 17 leaves a partial
# one), P = 2, 4, 8, 16 SIMD groups past 1024, 2048, 4096, 8192 floats (16: a threadgroup of
# 512 for one row), float4s when K % 4 == 0; past 16384 floats version 1 runs.
ROWS_V2 = [(17, 1024), (9, 1028), (5, 2048), (3, 3001), (7, 4096), (2, 8192), (2, 8193),
           (1, 16384), (2, 16385)]  # fmt: skip
# With 4 float4s a lane (ROW_FLOAT4S = 4): P doubles past 512 floats, up to 32 SIMD groups
# (a threadgroup of 1024) past 8192. Version 3 (ROW_FLOAT4S = 0, "2-r0" below) has the
# geometry of 4 and loops over wider rows (16385 floats here).


@pytest.fixture(params=["1", "2", "2-r4", "2-r0"])
def version(request, monkeypatch, poisoned_memory):
    """CAMEL_MEMORY_KERNELS: 1 the lesson kernels, 2 the row held in registers, 8 float4s a
    lane, "2-r4" with 4 (the softmax kernels' _r4 twins, ROW_FLOAT4S; the rest as 2) and
    "2-r0" with none (version 3: the row read twice; the cross-entropy too), on
    poisoned memory: an output a kernel forgets to write is NaN, not a recycled answer."""
    kernels, _, float4s = request.param.partition("-r")
    config.set_choices(memory_kernels=kernels)
    monkeypatch.setattr(backend_mps_or_skip(), "ROW_FLOAT4S", int(float4s or 8))
    return request.param


def extreme(shape, seed=0):
    """Logits of +-1e4 and -inf entries (never a whole row of -inf)."""
    x = rand(*shape, seed=seed, scale=1e4)
    x.reshape(-1)[1::7] = -np.inf
    x[..., 0] = np.where(np.isinf(x[..., 0]), 0.0, x[..., 0])
    return x


@pytest.mark.parametrize("shape", ROWS + ROWS_V2)
def test_softmax_and_backward(mps, version, shape):
    x, g = rand(*shape, seed=1, scale=3.0), rand(*shape, seed=2)
    y = mps.softmax(mps.from_numpy(x))
    close(host(mps, y), cpu.softmax(x))
    dx = mps.softmax_backward(y, mps.from_numpy(g))
    close(host(mps, dx), cpu.softmax_backward(cpu.softmax(x), g))


@pytest.mark.parametrize("shape", ROWS + ROWS_V2)
def test_log_softmax_and_backward(mps, version, shape):
    x, g = rand(*shape, seed=3, scale=3.0), rand(*shape, seed=4)
    y = mps.log_softmax(mps.from_numpy(x))
    close(host(mps, y), cpu.log_softmax(x))
    dx = mps.log_softmax_backward(y, mps.from_numpy(g))
    close(host(mps, dx), cpu.log_softmax_backward(cpu.log_softmax(x), g))


@pytest.mark.parametrize("shape", [(3, 1000), (4, 33), (2, 3, 7), (3, 1024), (2, 5000)])
def test_softmax_family_extreme_logits(mps, version, shape):
    x = extreme(shape, seed=5)
    with np.errstate(invalid="ignore", over="ignore"):
        want_p, want_l = cpu.softmax(x), cpu.log_softmax(x)
    got_p = host(mps, mps.softmax(mps.from_numpy(x)))
    close(got_p, want_p)
    got_l = host(mps, mps.log_softmax(mps.from_numpy(x)))
    assert not np.isnan(got_l).any()
    finite = np.isfinite(want_l)
    np.testing.assert_array_equal(np.isfinite(got_l), finite)  # -inf stays -inf
    np.testing.assert_allclose(got_l[finite], want_l[finite], rtol=2e-5, atol=1e-3)


def mostly_minus_inf(rows, k, seed=0):
    """Rows of -inf but for a few columns, as a padding mask written into the logits: row r
    keeps r + 1 finite columns at random places (the last row keeps only its last column)."""
    x = np.full((rows, k), -np.inf, np.float32)
    rng = np.random.default_rng(seed)
    for r in range(rows):
        keep = rng.choice(k, size=min(k, r + 1), replace=False) if r < rows - 1 else [k - 1]
        x[r, keep] = rng.standard_normal(len(keep)) * 3
    return x


@pytest.mark.parametrize("shape", [(3, 40), (4, 1000), (3, 5000), (2, 20000)])
def test_softmax_family_mostly_minus_inf(mps, version, shape):
    """A lane that has seen only -inf so far has max -inf, and exp(-inf - -inf) is NaN: a
    -inf must add 0 to the row sum however many of them a lane meets first."""
    x = mostly_minus_inf(*shape, seed=41)
    g = rand(*shape, seed=42)
    t = np.array([np.flatnonzero(np.isfinite(row))[0] for row in x], np.int32)
    with np.errstate(invalid="ignore", over="ignore"):
        want_y, want_l = cpu.softmax(x), cpu.log_softmax(x)
        want_loss, _ = cpu.cross_entropy(x, t)
    y = mps.softmax(mps.from_numpy(x))
    close(host(mps, y), want_y)
    close(host(mps, mps.softmax_backward(y, mps.from_numpy(g))), cpu.softmax_backward(want_y, g))
    got_l = host(mps, mps.log_softmax(mps.from_numpy(x)))
    np.testing.assert_array_equal(got_l == -np.inf, want_l == -np.inf)
    finite = np.isfinite(want_l)
    np.testing.assert_allclose(got_l[finite], want_l[finite], rtol=2e-5, atol=1e-6)
    loss, probs = mps.cross_entropy(mps.from_numpy(x), mps.from_numpy(t))
    close(host(mps, probs), want_y)
    np.testing.assert_allclose(float(host(mps, loss)), want_loss, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "shape", [(2, 5, 5), (3, 4, 6), (1, 1), (2, 33, 33), (1, 9, 1028), (1, 11, 2052), (3, 8)]
)
def test_causal_softmax(mps, version, shape):
    x = rand(*shape, seed=6)
    got = host(mps, mps.softmax(mps.from_numpy(x), causal=True))
    close(got, cpu.softmax(x, causal=True))
    masked = np.triu(np.ones(shape[-2:], dtype=bool), k=1)  # column j > row i
    assert np.all(got[..., masked] == 0.0)
    g = rand(*shape, seed=17)
    dx = host(mps, mps.softmax_backward(mps.from_numpy(got), mps.from_numpy(g), causal=True))
    close(dx, cpu.softmax_backward(got, g, causal=True))
    assert np.all(dx[..., masked] == 0.0)


@pytest.mark.parametrize("k", [40, 1024, 3000, 5000, 12000])
def test_softmax_backward_nan_and_inf(mps, version, k):
    # The row sum reaches every column: a NaN or inf in y or dy makes that row's dx NaN
    # (as NumPy), wherever the SIMD group holding it is.
    y = cpu.softmax(rand(5, k, seed=18))
    g = rand(5, k, seed=19)
    g[0, k - 1] = np.nan
    g[1, k // 2] = np.inf
    y[2, 0] = np.nan
    with np.errstate(invalid="ignore"):
        want = cpu.softmax_backward(y, g)
        want_log = cpu.log_softmax_backward(y, g)
    dy, dg = mps.from_numpy(y), mps.from_numpy(g)
    got = host(mps, mps.softmax_backward(dy, dg))
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6, equal_nan=True)
    got = host(mps, mps.log_softmax_backward(dy, dg))
    np.testing.assert_allclose(got, want_log, rtol=2e-5, atol=1e-6, equal_nan=True)


@pytest.mark.parametrize("k", [40, 1024, 3000, 5000, 12000])
def test_softmax_family_nan_and_inf_rows(mps, version, k):
    # NaN / +inf in one row make it NaN (as NumPy and PyTorch), -inf entries give 0 (or -inf),
    # a row of -inf is NaN; in wide rows the specials sit in different SIMD groups.
    x = rand(6, k, seed=14)
    x[0, k // 2] = np.nan
    x[1, k - 1] = np.inf
    x[2, ::5] = -np.inf
    x[3, :] = -np.inf
    x[4, 0], x[4, k - 1] = np.nan, np.inf
    dx = mps.from_numpy(x)
    with np.errstate(invalid="ignore", over="ignore"):
        for got, want in [
            (mps.softmax(dx), cpu.softmax(x)),
            (mps.log_softmax(dx), cpu.log_softmax(x)),
        ]:
            np.testing.assert_allclose(host(mps, got), want, rtol=2e-5, atol=1e-6, equal_nan=True)


def test_softmax_unaligned_rows(mps, version):
    # K % 4 == 0 but x starts 4 bytes into its buffer: version 2 reads floats, not float4s.
    from camel.metal import DeviceArray

    x = rand(9, 1024, seed=15, scale=3.0)
    whole = mps.from_numpy(np.concatenate([[0.0], x.reshape(-1)]).astype(np.float32))
    dx = DeviceArray(x.shape, np.float32, whole.buffer, 4)
    close(host(mps, mps.softmax(dx)), cpu.softmax(x))
    close(host(mps, mps.log_softmax(dx)), cpu.log_softmax(x))


@pytest.mark.parametrize(
    "n, c",
    [(1, 1), (16, 10), (33, 3), (5, 1000), (3, 10000), (1, 4097), (7, 4), (9, 1024), (17, 65),
     (2, 16384), (2, 16385), (600, 5)],
)  # fmt: skip
def test_cross_entropy_forward_backward(mps, version, n, c):
    x = rand(n, c, seed=7, scale=2.0)
    t = np.random.default_rng(8).integers(0, c, size=n).astype(np.int32)
    dt = mps.from_numpy(t)
    loss, probs = mps.cross_entropy(mps.from_numpy(x), dt)
    want_loss, want_probs = cpu.cross_entropy(x, t)
    assert host(mps, loss).shape == ()
    np.testing.assert_allclose(host(mps, loss), want_loss, rtol=2e-5, atol=1e-6)
    close(host(mps, probs), want_probs)
    g = np.array(2.5, dtype=np.float32)
    dx = mps.cross_entropy_backward(probs, dt, mps.from_numpy(g))
    close(host(mps, dx), cpu.cross_entropy_backward(want_probs, t, g))


@pytest.mark.parametrize("n, c", [(9, 8), (12, 4), (5, 36)])
def test_cross_entropy_backward_every_target_position(mps, version, n, c):
    # targets at every column, so at each of a float4's four lanes and at the row's edges
    probs = cpu.softmax(rand(n, c, seed=16))
    t = (np.arange(n) * 5 % c).astype(np.int32)
    t[0], t[-1] = 0, c - 1
    g = np.array(-1.5, dtype=np.float32)
    args = (mps.from_numpy(probs), mps.from_numpy(t), mps.from_numpy(g))
    close(host(mps, mps.cross_entropy_backward(*args)), cpu.cross_entropy_backward(probs, t, g))


def test_cross_entropy_extreme_logits(mps, version):
    x = extreme((6, 50), seed=9)
    t = np.array([0, 3, 10, 49, 22, 0], dtype=np.int32)  # targets at finite logits
    x[np.arange(6), t] = np.where(np.isinf(x[np.arange(6), t]), 1.0, x[np.arange(6), t])
    loss, probs = mps.cross_entropy(mps.from_numpy(x), mps.from_numpy(t))
    with np.errstate(invalid="ignore", over="ignore"):
        want_loss, want_probs = cpu.cross_entropy(x, t)
    got = float(host(mps, loss))
    assert np.isfinite(got)
    np.testing.assert_allclose(got, want_loss, rtol=2e-5)
    close(host(mps, probs), want_probs)


@pytest.mark.parametrize("bad", [10, 12, -1])
def test_cross_entropy_out_of_range_target_is_a_clear_error(mps, version, bad):
    # Found by the kernel on the GPU; raised at the next synchronisation, which any read
    # of the loss makes, with the line of the call (this file).
    x = rand(4, 10, seed=10)
    t = np.array([0, bad, 3, bad], dtype=np.int32)
    loss, _ = mps.cross_entropy(mps.from_numpy(x), mps.from_numpy(t))
    # the first bad row is row 1, on every schedule (CAMEL_SIM_ORDER): no race to record it
    want = rf"target {bad} \(row 1\).*10 classes.*2 of 4 targets.*test_kernels_softmax.py"
    with pytest.raises(IndexError, match=want):
        host(mps, loss)
    host(mps, loss)  # raised once: the pending check is gone


def test_cross_entropy_reports_the_first_bad_row(mps, version):
    # 600 rows: the mean's threads each check several rows, in several SIMD groups; the
    # record names the lowest bad row whichever thread found it. With 256 threads, rows 37
    # and 293 are thread 37's (SIMD group 1), 260 is thread 4's (group 0), 590 thread 78's.
    x = rand(600, 5, seed=11)
    t = np.random.default_rng(12).integers(0, 5, size=600).astype(np.int32)
    t[[590, 293, 37, 260]] = [9, -4, 5, 70]
    loss, _ = mps.cross_entropy(mps.from_numpy(x), mps.from_numpy(t))
    with pytest.raises(IndexError, match=r"target 5 \(row 37\).*4 of 600 targets"):
        host(mps, loss)


def test_cross_entropy_error_record_needs_no_zeroing(mps, version):
    # The record comes from recycled storage, not zeroed: the kernel writes every field. A
    # stale record (an error's) left in the cache must not raise for good targets.
    stale = [mps.from_numpy(np.array([2, 1, 9], np.int32)) for _ in range(16)]
    del stale  # their storage goes back to the cache, still holding (2, 1, 9)
    x = rand(3, 10, seed=5)
    t = np.array([4, 0, 9], np.int32)
    loss, _ = mps.cross_entropy(mps.from_numpy(x), mps.from_numpy(t))
    np.testing.assert_allclose(float(host(mps, loss)), cpu.cross_entropy(x, t)[0], rtol=2e-5)


def test_cross_entropy_waits_for_nothing(mps, monkeypatch):
    # The target check must not make the host wait for the GPU: no synchronize() inside
    # the op, for valid and invalid targets alike; the first read raises.
    from camel.metal import buffers

    calls = []
    real = buffers.synchronize
    monkeypatch.setattr(buffers, "synchronize", lambda: calls.append(1) or real())
    x = mps.from_numpy(rand(5, 7, seed=3))
    good = mps.cross_entropy(x, mps.from_numpy(np.array([0, 6, 1, 2, 3], np.int32)))[0]
    bad = mps.cross_entropy(x, mps.from_numpy(np.array([0, 1, 7, 2, 3], np.int32)))[0]
    assert calls == []
    with pytest.raises(IndexError, match=r"target 7 \(row 2\) is out of range for 7 classes"):
        buffers.synchronize()
    assert np.isfinite(host(mps, good)) and np.isfinite(host(mps, bad))


def test_cross_entropy_pending_checks_are_bounded(mps, monkeypatch):
    # Past MAX_PENDING_CHECKS losses that nobody reads, check_later synchronises: the
    # records held stay bounded, and an error among them is raised there.
    from camel.metal import buffers

    monkeypatch.setattr(buffers, "MAX_PENDING_CHECKS", 3)
    x = mps.from_numpy(rand(2, 4, seed=4))
    t = mps.from_numpy(np.array([1, 2], np.int32))
    for _ in range(6):
        mps.cross_entropy(x, t)
        assert len(buffers._checks) < 3
    assert buffers._checks == []  # the third and the sixth synchronised
    mps.cross_entropy(x, mps.from_numpy(np.array([1, 4], np.int32)))
    mps.cross_entropy(x, t)
    with pytest.raises(IndexError, match=r"target 4 \(row 1\)"):
        mps.cross_entropy(x, t)


# ---------------------------------------------------------------------------
# op tests through the Tensor API: "cpu" and "mps", against PyTorch when installed
# ---------------------------------------------------------------------------


@pytest.fixture(params=["cpu", "mps"])
def device(request):
    if request.param == "mps":
        backend_mps_or_skip()
    return request.param


def test_op_softmax_log_softmax_cross_entropy_match_torch(device):
    torch = pytest.importorskip("torch")
    x_np, w_np = rand(16, 10, seed=11, scale=3.0), rand(16, 10, seed=12)
    t_np = np.random.default_rng(13).integers(0, 10, size=16).astype(np.int32)

    x = camel.tensor(x_np, requires_grad=True, device=device)
    w = camel.tensor(w_np, device=device)
    targets = camel.tensor(t_np, device=device)
    loss = (F.softmax(x) * w).sum() + (F.log_softmax(x) * w).sum() + F.cross_entropy(x, targets)
    loss.backward()

    tx = torch.tensor(x_np, requires_grad=True)
    tw = torch.tensor(w_np)
    tloss = (torch.softmax(tx, -1) * tw).sum() + (torch.log_softmax(tx, -1) * tw).sum()
    tloss = tloss + torch.nn.functional.cross_entropy(tx, torch.tensor(t_np, dtype=torch.long))
    tloss.backward()
    np.testing.assert_allclose(loss.item(), tloss.item(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(x.grad.numpy(), tx.grad.numpy(), rtol=1e-4, atol=1e-6)


def test_op_cross_entropy_bad_target(device):
    x = camel.tensor(rand(3, 5), device=device)
    t = camel.tensor(np.array([1, 5, 0], dtype=np.int32), device=device)
    with pytest.raises(IndexError, match=r"target 5 .*for 5 classes|5 at flat position 1"):
        F.cross_entropy(x, t).item()  # "mps": raised by the read, the next synchronisation


@pytest.mark.parametrize("shape", [(2, 5, 7), (1, 33, 30), (2, 9, 1028), (1, 70, 70)])
@pytest.mark.parametrize("scale", [1.0, 0.125, -0.7])
def test_softmax_scale(mps, version, shape, scale):
    """softmax(scale * x) and its gradient scale * y (dy - sum dy y), causal and not:
    the scale the naive attention folds in (no separate pass)."""
    x, g = rand(*shape, seed=21, scale=4.0), rand(*shape, seed=22)
    for causal in (False, True):
        y = mps.softmax(mps.from_numpy(x), causal=causal, scale=scale)
        want = cpu.softmax((x * np.float32(scale)).astype(np.float32), causal=causal)
        close(host(mps, y), want)
        dx = host(mps, mps.softmax_backward(y, mps.from_numpy(g), causal=causal, scale=scale))
        close(dx, scale * cpu.softmax_backward(want, g, causal=causal))
    close(cpu.softmax(x, scale=scale), cpu.softmax((x * np.float32(scale)).astype(np.float32)))


@pytest.mark.parametrize("shape", [(2, 5, 7), (1, 33, 30), (2, 9, 1028), (1, 131, 131)])
def test_causal_softmax_never_reads_above_the_diagonal(mps, version, shape):
    """A causal attention leaves the scores and their gradient uncomputed above the
    diagonal (camel/gemm.py triangle): NaN there changes nothing, forward or backward."""
    x, g = rand(*shape, seed=23), rand(*shape, seed=24)
    masked = np.triu(np.ones(shape[-2:], dtype=bool), k=1)
    want = cpu.softmax(x, causal=True)
    want_dx = cpu.softmax_backward(want, g, causal=True)
    x[..., masked] = np.nan
    g[..., masked] = np.nan
    y = mps.softmax(mps.from_numpy(x), causal=True)
    close(host(mps, y), want)
    assert np.all(host(mps, y)[..., masked] == 0.0)
    dx = host(mps, mps.softmax_backward(y, mps.from_numpy(g), causal=True))
    close(dx, want_dx)
    assert np.all(dx[..., masked] == 0.0)
    close(cpu.softmax_backward(want, g, causal=True), want_dx)  # the reference alike


@pytest.mark.parametrize("shape", [(3, 40), (2, 9, 1028)])
@pytest.mark.parametrize("scale", [0.5, -1.0])
def test_softmax_scale_subtracts_the_scaled_max(mps, version, shape, scale):
    """Logits near -200: the max must be that of scale * x (the max of x itself would
    leave exp(scale x - m) overflowing to inf, and the row NaN)."""
    x = rand(*shape, seed=25) - np.float32(200.0)
    want = cpu.softmax((x * np.float32(scale)).astype(np.float32))
    close(host(mps, mps.softmax(mps.from_numpy(x), scale=scale)), want)


@pytest.mark.parametrize(
    "float4s, kernel, threads",
    [(8, "softmax_last_axis_v2", 512), (4, "softmax_last_axis_v2_r4", 1024),
     (0, "softmax_last_axis_v3", 512), (None, "softmax_last_axis_v3", 512)],
)  # fmt: skip
def test_row_float4s_picks_the_kernel_and_its_geometry(monkeypatch, float4s, kernel, threads):
    """ROW_FLOAT4S chooses the softmax kernels' float4s a lane: a row of 8193 floats takes
    16 SIMD groups of 8 float4s a lane or 32 of 4 (a threadgroup each), 16 of version 3's
    (which holds none: two steps of 4 float4s a lane), by default version 3 (wider than
    _STREAM_ROWS_PAST), and 3 is an error; version 3's backward takes 32 (one step a lane:
    it reads twice the bytes a row)."""
    mps = backend_mps_or_skip()
    config.set_choices(memory_kernels=None)
    monkeypatch.setattr(mps, "ROW_FLOAT4S", float4s)
    x = rand(2, 8193)
    with camel.profile() as prof:
        got = host(mps, mps.softmax(mps.from_numpy(x)))
    assert [(e.name, e.threads_per_threadgroup) for e in prof.events] == [(kernel, (threads, 1, 1))]
    close(got, cpu.softmax(x))
    if kernel.endswith("_v3"):
        with camel.profile() as prof:
            dx = host(mps, mps.softmax_backward(mps.from_numpy(got), mps.from_numpy(x)))
        assert [(e.name, e.threads_per_threadgroup) for e in prof.events] == [
            ("softmax_backward_v3", (1024, 1, 1))
        ]
        close(dx, cpu.softmax_backward(got, x))
    monkeypatch.setattr(mps, "ROW_FLOAT4S", 3)
    with pytest.raises(ValueError, match="ROW_FLOAT4S must be 0, 4, 8 or None, got 3"):
        mps.softmax(mps.from_numpy(x))


@pytest.mark.parametrize(
    "k, kernel",
    [
        (8192, "softmax_last_axis_v2"),
        (8193, "softmax_last_axis_v3"),
        (40000, "softmax_last_axis_v3"),
    ],
)
def test_rows_wider_than_the_registers_take_version_3(monkeypatch, k, kernel):
    """By default rows up to _STREAM_ROWS_PAST floats are held in registers (8 float4s a lane
    on the simulator), wider ones read twice; past 16384 floats, which no version-2 kernel
    holds, version 3 runs too (it was version 1)."""
    mps = backend_mps_or_skip()
    config.set_choices(memory_kernels=None)
    monkeypatch.setattr(mps, "ROW_FLOAT4S", None)
    monkeypatch.setattr(mps.metal, "is_simulator", lambda: True)
    x, g = rand(2, k, seed=30, scale=3.0), rand(2, k, seed=31)
    t = np.array([k - 1, 0], np.int32)
    with camel.profile() as prof:
        y = mps.softmax(mps.from_numpy(x))
        dx = mps.softmax_backward(y, mps.from_numpy(g))
        loss, probs = mps.cross_entropy(mps.from_numpy(x), mps.from_numpy(t))
        got = host(mps, y), host(mps, dx), host(mps, probs), float(host(mps, loss))
    backward, forward = (
        kernel.replace("last_axis", "backward"),
        kernel.replace("softmax_last_axis", "cross_entropy_forward"),
    )
    names = [e.name for e in prof.events]
    assert names[:3] == [kernel, backward, forward], names
    close(got[0], cpu.softmax(x))
    close(got[1], cpu.softmax_backward(cpu.softmax(x), g))
    want_loss, want_probs = cpu.cross_entropy(x, t)
    close(got[2], want_probs)
    np.testing.assert_allclose(got[3], want_loss, rtol=1e-5)
