"""The GEMM ladder (shaders/ops_matmul.metal via camel/gemm.py) against NumPy.

Every rung, forward and with the transposed operands backward needs (dW = Xᵀ·dY,
dX = dY·Wᵀ), at awkward sizes, batched (3-D, 4-D, a broadcast 2-D operand), in the
simulator's three schedule orders; plus the errors a learner will hit.
"""

import numpy as np
import pytest
from conftest import in_nan_slack, require_shim, run_under_asan

import camel
from camel import config, gemm, tuning
from camel.bench import tuner

metal = pytest.importorskip("camel.metal")


require_shim()

VERSIONS = gemm.versions()

# (M, N, K) from the issue: 1, odd, just over a tile, non-multiples of every tile, a mat-vec.
SHAPES = [(1, 1, 1), (3, 7, 5), (33, 31, 17), (64, 65, 63), (130, 257, 66), (1000, 1, 1000)]


def _operands(rng, a_shape, b_shape):
    a = rng.standard_normal(a_shape, dtype=np.float32)
    b = rng.standard_normal(b_shape, dtype=np.float32)
    return a, b


def _reference(a, b, transpose_a=False, transpose_b=False):
    x = np.swapaxes(a, -1, -2) if transpose_a else a
    y = np.swapaxes(b, -1, -2) if transpose_b else b
    return np.matmul(x.astype(np.float64), y.astype(np.float64))


def _run(version, a, b, transpose_a=False, transpose_b=False):
    da, db = metal.DeviceArray.from_numpy(a), metal.DeviceArray.from_numpy(b)
    out = gemm.matmul(da, db, transpose_a=transpose_a, transpose_b=transpose_b, version=version)
    return out.numpy().copy()


def _check(version, a, b, transpose_a=False, transpose_b=False):
    got = _run(version, a, b, transpose_a, transpose_b)
    want = _reference(a, b, transpose_a, transpose_b)
    assert got.shape == want.shape, f"v{version}: shape {got.shape} != {want.shape}"
    k = a.shape[-2] if transpose_a else a.shape[-1]
    tol = 1e-4 * max(1.0, np.sqrt(k))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=tol, err_msg=f"version {version}")


def _stored(m, n, k, transpose_a, transpose_b, batch=()):
    """Stored shapes of A and B for op(A) (M, K), op(B) (K, N)."""
    a_shape = (*batch, k, m) if transpose_a else (*batch, m, k)
    b_shape = (*batch, n, k) if transpose_b else (*batch, k, n)
    return a_shape, b_shape


# ---- forward, every rung, every issue size ---------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_forward(version, m, n, k, rng):
    a, b = _operands(rng, (m, k), (k, n))
    _check(version, a, b)


# ---- the transposed operands backward needs -------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("m,n,k", [(1, 1, 1), (33, 31, 17), (64, 65, 63), (130, 257, 66)])
@pytest.mark.parametrize("ta,tb", [(True, False), (False, True), (True, True)])
def test_transposed(version, m, n, k, ta, tb, rng):
    a, b = _operands(rng, *_stored(m, n, k, ta, tb))
    _check(version, a, b, ta, tb)


@pytest.mark.parametrize("version", VERSIONS)
def test_linear_backward_shapes(version, rng):
    """nn.Linear: y = x·Wᵀ; dX = dY·W; dW = dYᵀ·X — with the ladder's transpose flags."""
    x = rng.standard_normal((37, 20), dtype=np.float32)  # (N, in)
    w = rng.standard_normal((12, 20), dtype=np.float32)  # (out, in)
    dy = rng.standard_normal((37, 12), dtype=np.float32)  # (N, out)
    _check(version, x, w, transpose_b=True)  # y  (N, out)
    _check(version, dy, w)  # dX (N, in)
    _check(version, dy, x, transpose_a=True)  # dW (out, in)


# ---- batches ------------------------------------------------------------------------------

BATCHED = [
    # (A stored, B stored, transpose_a, transpose_b)
    ((3, 9, 12), (3, 12, 20), False, False),  # 3-D
    ((2, 3, 17, 8), (2, 3, 8, 19), False, False),  # 4-D (B, H, T, D) style
    ((2, 3, 17, 8), (2, 3, 19, 8), False, True),  # q · kᵀ
    ((2, 3, 8, 17), (2, 3, 8, 19), True, False),  # dV-style  pᵀ · dy
    ((4, 33, 20), (20, 31), False, False),  # 3-D @ 2-D: B broadcast (batch stride 0)
    ((4, 33, 20), (31, 20), False, True),  # x · Wᵀ over a batch
    ((33, 20), (4, 20, 31), False, False),  # 2-D @ 3-D: A broadcast
    ((2, 1, 9, 12), (3, 12, 10), False, False),  # broadcast batch dims (2, 1) x (3,)
    ((2, 64, 68), (2, 68, 36), False, False),  # float4-aligned strides
]


# ---- split-K: a rung on slices of K as a batch, then the sum of the partial products ------


@pytest.mark.parametrize("version", ["9/k2", "7/k4", "64x64x16_4x4/k8", "2/k3"])
@pytest.mark.parametrize("m,n,k", [(1, 1, 96), (33, 31, 96), (130, 67, 192)])
@pytest.mark.parametrize("ta,tb", [(False, False), (True, False), (False, True), (True, True)])
def test_split_k(version, m, n, k, ta, tb, rng):
    a, b = _operands(rng, *_stored(m, n, k, ta, tb))
    _check(version, a, b, ta, tb)


def test_split_k_runs_one_batch_and_one_sum(rng):
    """A split version dispatches its rung once, with S threadgroups along z, and one sum."""
    a, b = _operands(rng, (40, 256), (256, 24))
    with camel.profile() as prof:
        _check("9/k4", a, b)
    names = [e.name for e in prof.events]
    assert names == [gemm.get_rung("9").kernel, "sum_axis_blocks_float4"], names
    assert prof.events[0].grid[2] == 4


def test_split_k_bad_input_and_fallback(rng, tmp_path, monkeypatch):
    da, db = (metal.DeviceArray.from_numpy(x) for x in _operands(rng, (8, 30), (30, 8)))
    with pytest.raises(
        ValueError, match=r"9/k4 splits K: .* K a multiple of 16; got M, N, K = 8, 8, 30"
    ):
        gemm.matmul(da, db, version="9/k4")
    with pytest.raises(ValueError, match=r"split-K suffix is /k<S>"):
        gemm.matmul(da, db, version="9/kx")
    # a tuned split for a shape class whose shape cannot split: the default rung instead
    monkeypatch.setenv("CAMEL_CACHE_DIR", str(tmp_path))
    config.set_choices(matmul=None)
    tuning.reset()
    try:
        tuning.store(8, 8, 30, "9/k4")
        assert gemm.choose_version(8, 8, 30) == gemm.default_version(8, 8, 30)
        assert gemm.choose_version(8, 8, 32) == "9/k4"  # same class, K splits
    finally:
        tuning.reset()


def test_split_candidates_only_for_long_k():
    assert gemm.split_candidates(384, 1152, 4096, 1) == [
        f"{v}/k{s}" for v in gemm.SPLIT_RUNGS for s in (2, 4, 8)
    ]
    assert gemm.split_candidates(384, 1152, 512, 1) == [f"{v}/k2" for v in gemm.SPLIT_RUNGS]
    assert gemm.split_candidates(384, 1152, 4096, 3) == []  # batched: no split
    assert gemm.split_candidates(384, 1152, 4094, 1) == []  # K % 8 != 0


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("a_shape,b_shape,ta,tb", BATCHED)
def test_batched(version, a_shape, b_shape, ta, tb, rng):
    a, b = _operands(rng, a_shape, b_shape)
    _check(version, a, b, ta, tb)


# ---- tuning variants (the autotuner's extra template instantiations) ---------------------


@pytest.mark.parametrize("variant", list(gemm.VARIANTS))
def test_tuning_variants(variant, monkeypatch, rng):
    for order in ("forward", "random"):
        monkeypatch.setenv("CAMEL_SIM_ORDER", order)
        for m, n, k in [(1, 1, 1), (33, 31, 17), (130, 257, 66)]:
            for ta, tb in [(False, False), (True, True)]:
                a, b = _operands(rng, *_stored(m, n, k, ta, tb))
                _check(variant, a, b, ta, tb)
        a, b = _operands(rng, (2, 3, 17, 8), (2, 3, 19, 8))
        _check(variant, a, b, False, True)
    a, b = _operands(rng, (4, 64, 68), (68, 36))  # float4 paths, broadcast B
    _check(variant, a, b)


# ---- v15's warp tiles: edges inside a SIMD group's part, swizzled tiles ------------------

WARPTILE = ["15"] + [v for v in gemm.VARIANTS if v.startswith("wt_")]
# M and N end inside a SIMD group's part and inside a 4 x 4 block (not a multiple of 4);
# K ends inside a group of 4 k (the swizzle's unit) after more than one K step
WARPTILE_SHAPES = [(129, 130, 37), (70, 45, 18), (5, 131, 9), (200, 3, 50)]


@pytest.mark.parametrize("version", WARPTILE)
@pytest.mark.parametrize("order", ["forward", "reverse", "random"])
def test_warptile_edges(version, order, monkeypatch, rng):
    monkeypatch.setenv("CAMEL_SIM_ORDER", order)
    for m, n, k in WARPTILE_SHAPES:
        for ta, tb in [(False, False), (True, False), (False, True), (True, True)]:
            a, b = _operands(rng, *_stored(m, n, k, ta, tb))
            _check(version, a, b, ta, tb)
    a, b = _operands(rng, (3, 1, 66, 36), (2, 36, 68))  # batched: broadcast both ways
    _check(version, a, b)


# ---- the simulator's schedule orders (exposes missing barriers) -------------------------


@pytest.mark.parametrize("order", ["forward", "reverse", "random"])
@pytest.mark.parametrize("version", VERSIONS)
def test_schedule_orders(version, order, monkeypatch, rng):
    monkeypatch.setenv("CAMEL_SIM_ORDER", order)  # the runtime reads it per dispatch
    for m, n, k in SHAPES[:-1]:  # the 1000x1x1000 mat-vec is in test_forward (forward order)
        for ta, tb in [(False, False), (True, False), (False, True)]:
            a, b = _operands(rng, *_stored(m, n, k, ta, tb))
            _check(version, a, b, ta, tb)
    for a_shape, b_shape, ta, tb in BATCHED[:3]:
        a, b = _operands(rng, a_shape, b_shape)
        _check(version, a, b, ta, tb)


# ---- misaligned storage: float4 paths must fall back ------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
def test_unaligned_offsets(version, rng):
    """Operands 4 bytes into their buffers (not 16-byte aligned) with rows of 64 floats."""
    m, n, k = 40, 64, 64
    a, b = _operands(rng, (m, k), (k, n))
    buf_a, buf_b = metal.Buffer(4 + a.nbytes), metal.Buffer(4 + b.nbytes)
    da = metal.DeviceArray(a.shape, np.float32, buf_a, offset=4)
    db = metal.DeviceArray(b.shape, np.float32, buf_b, offset=4)
    da.numpy()[...] = a
    db.numpy()[...] = b
    out = metal.DeviceArray((m, n), np.float32, metal.Buffer(4 + 4 * m * n), offset=4)
    gemm.matmul(da, db, out=out, version=version)
    np.testing.assert_allclose(out.numpy(), _reference(a, b), rtol=1e-4, atol=1e-3)


# ---- edges that do not rely on zero-filled memory ------------------------------------
#
# A fresh simulator buffer is zero-filled, so a kernel that reads one element past a
# matrix edge often multiplies it by a zero and nobody notices. Here every operand sits
# inside a buffer whose slack before and after it is NaN: a stray read turns a result
# into NaN, and a stray write changes the slack.

NAN_CASES = [
    # (A stored, B stored, transpose_a, transpose_b): edges in M, N and K, both layouts
    ((33, 17), (17, 31), False, False),
    ((17, 33), (31, 17), True, True),
    ((65, 63), (63, 66), False, False),
    ((63, 65), (63, 66), True, False),
    ((65, 63), (66, 63), False, True),
    ((130, 9), (9, 130), False, False),
    ((2, 3, 9, 8), (2, 3, 10, 8), False, True),
]


@pytest.mark.parametrize("version", gemm.all_versions())
def test_edges_with_nan_slack(version, rng, poisoned_memory):
    """Every rung and variant: operands and output surrounded by NaN give NumPy's result
    (no NaN read in) and leave the output's slack alone (no write outside C)."""
    for a_shape, b_shape, ta, tb in NAN_CASES:
        a, b = _operands(rng, a_shape, b_shape)
        want = _reference(a, b, ta, tb)
        da, slack_a = in_nan_slack(a)
        db, slack_b = in_nan_slack(b)
        out, slack_c = in_nan_slack(np.full(want.shape, np.nan, np.float32))  # all written?
        gemm.matmul(da, db, transpose_a=ta, transpose_b=tb, out=out, version=version)
        case = f"version {version}, {a_shape} x {b_shape}, ta={ta}, tb={tb}"
        np.testing.assert_allclose(out.numpy(), want, rtol=1e-4, atol=1e-4, err_msg=case)
        assert slack_c.intact(), f"{case}: wrote outside C"
        assert slack_a.intact() and slack_b.intact(), case


# ---- selection: CAMEL_MATMUL, defaults, autotuner cache ---------------------------------


def test_camel_matmul_env_selects_rung(monkeypatch, rng):
    used = []
    real = gemm.dispatch
    monkeypatch.setattr(
        gemm, "dispatch", lambda rung, *a: (used.append(rung.version), real(rung, *a))
    )
    a, b = _operands(rng, (5, 6), (6, 7))
    for v in ("3", "v7", "10", "64x64x16_4x4"):
        config.set_choices(matmul=v)
        np.testing.assert_allclose(_run(None, a, b), _reference(a, b), rtol=1e-4, atol=1e-4)
    assert used == ["3", "7", "10", "64x64x16_4x4"]


def test_camel_matmul_unknown_version(monkeypatch, rng):
    config.set_choices(matmul="16")
    a, b = _operands(rng, (2, 3), (3, 4))
    with pytest.raises(ValueError, match=r"unknown version '16'.*1, 2, 3.*15"):
        _run(None, a, b)


def test_get_rung_lists_valid_versions():
    with pytest.raises(ValueError, match="valid versions: 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12"):
        gemm.get_rung("fast")
    assert gemm.get_rung(8).kernel == "matmul_v8_128x128x16_8x8"


def test_table_fits_apple_limits():
    """Every rung fits Apple GPU limits: 1024 threads, 32 KiB threadgroup memory."""
    for v in gemm.all_versions():
        rung = gemm.get_rung(v)
        assert rung.nthreads <= 1024 and rung.tg_bytes <= 32768, rung


def test_table_names_exist_in_shader():
    names = set(metal.library(gemm.SHADER).function_names)
    for rung in [gemm.get_rung(v) for v in gemm.all_versions()]:
        assert rung.kernel in names
        static = metal.kernel(gemm.SHADER, rung.kernel).static_threadgroup_memory
        if static:  # Metal reports it (the simulator says 0): the table must agree
            assert rung.tg_bytes <= static <= rung.tg_bytes + 64, (rung, static)


def test_autotune_cache(tmp_path, monkeypatch):
    """tune() times the candidates that pass the NumPy check, never one that fails it (even
    the fastest), saves the winner, and choose_version() reads it back from the file."""
    monkeypatch.setenv("CAMEL_CACHE_DIR", str(tmp_path))
    config.set_choices(matmul=None)
    real_check = tuner.check
    # Version 2 "computes wrong numbers" (its check error is 1), and is the fastest by far.
    monkeypatch.setattr(tuner, "check", lambda v, *a, **kw: real_check(v, *a, **kw) + (v == "2"))
    used = []
    real_dispatch = gemm.dispatch
    monkeypatch.setattr(
        gemm, "dispatch", lambda rung, *a: (used.append(rung.version), real_dispatch(rung, *a))
    )

    def fake_time_ms(run, reps):  # the rung run() dispatches decides its time
        used.clear()
        run()
        return {"2": 0.1, "5": 2.0, "7": 1.0}[used[-1]]

    monkeypatch.setattr(tuning, "time_ms", fake_time_ms)
    lines = []
    tuning.reset()
    try:
        results = tuner.tune([48], reps=1, versions=["2", "5", "7"], log=lines.append)
        winner, times = results[48]
        assert times == {"5": 2.0, "7": 1.0} and winner == "7"
        assert any("version 2 fails the NumPy check" in line for line in lines), lines
        assert (tmp_path / tuning.CACHE_NAME).exists()
        tuning.reset()  # read back from the file
        assert tuning.lookup(40, 33, 64) == "7"  # same shape class 64x64x64
        assert gemm.choose_version(40, 33, 64) == "7" != gemm.default_version(40, 33, 64)
        assert tuning.lookup(300, 300, 300) is None
    finally:
        tuning.reset()


def test_recording_sees_a_linear_layers_three_gemms(rng):
    """gemm.recording() lists each matmul() call's (m, n, k, transpose_a, transpose_b,
    batches): a Linear's forward and backward give three shapes (x Wᵀ, dy W, dyᵀ x)."""
    import camel
    from camel import nn

    layer = nn.Linear(24, 40).to("mps")
    x = camel.tensor(rng.standard_normal((2, 7, 24), dtype=np.float32), device="mps",
                     requires_grad=True)  # fmt: skip
    with gemm.recording() as shapes:
        layer(x).sum().backward()
    assert sorted(shapes) == sorted([(14, 40, 24, False, True, 1), (14, 24, 40, False, False, 1),
                                     (40, 24, 14, True, False, 1)]), shapes  # fmt: skip
    with gemm.recording() as outside:
        pass
    layer(x)
    assert outside == []  # nothing recorded after the block


def test_autotune_shapes_sums_a_class(tmp_path, monkeypatch):
    """tune_shapes() gives the shapes of one class one winner: the version with the least
    time summed over them (not the fastest on one), saved for the class."""
    monkeypatch.setenv("CAMEL_CACHE_DIR", str(tmp_path))
    config.set_choices(matmul=None)
    used = []
    real_dispatch = gemm.dispatch
    monkeypatch.setattr(
        gemm,
        "dispatch",
        lambda rung, *a: (used.append((rung.version, a[-1].m)), real_dispatch(rung, *a)),
    )
    # at m = 40 version 5 wins by 0.5; at m = 48 version 7 wins by 2: 7 has the smaller sum
    cost = {("5", 40): 1.0, ("7", 40): 1.5, ("5", 48): 4.0, ("7", 48): 2.0}

    def fake_time_ms(run, reps):
        used.clear()
        run()
        return cost[used[-1]]

    monkeypatch.setattr(tuning, "time_ms", fake_time_ms)
    tuning.reset()
    try:
        shapes = [(40, 33, 64, False, True, 1), (48, 60, 50, True, False, 1)] * 2
        results = tuner.tune_shapes(shapes, reps=1, versions=["5", "7"], log=lambda _: None)
        assert results == {"64x64x64": ("7", {"5": 5.0, "7": 3.5})}
        tuning.reset()
        assert tuning.lookup(40, 33, 64) == "7"
    finally:
        tuning.reset()


def test_autotune_check_sees_a_wrong_rung(monkeypatch, rng):
    """check() measures a real error: a rung whose output is off fails it."""
    for ta, tb in [(False, False), (True, False), (False, True), (True, True)]:
        a, b = _operands(rng, *_stored(33, 17, 31, ta, tb))  # bench matmul checks these
        assert tuner.check("7", a, b, transpose_a=ta, transpose_b=tb) < 1e-5, (ta, tb)
    real_dispatch = gemm.dispatch

    def off_by_one(rung, x, y, out, p):
        real_dispatch(rung, x, y, out, p)
        out.numpy()[0, 0] += 1.0

    monkeypatch.setattr(gemm, "dispatch", off_by_one)
    a, b = _operands(rng, (33, 31), (31, 17))
    assert tuner.check("7", a, b) > 1e-4


# ---- bad input ------------------------------------------------------------------------------


def test_shapes_do_not_align():
    a = metal.DeviceArray.from_numpy(np.zeros((3, 4), np.float32))
    b = metal.DeviceArray.from_numpy(np.zeros((5, 6), np.float32))
    with pytest.raises(
        ValueError, match=r"\[matmul\] shapes \(3, 4\) and \(5, 6\) do not align: 4 != 5"
    ):
        gemm.matmul(a, b)
    with pytest.raises(ValueError, match="transposed"):
        gemm.matmul(a, b, transpose_a=True)


def test_batch_dims_do_not_broadcast():
    with pytest.raises(ValueError, match="do not broadcast"):
        gemm.plan((2, 3, 4), (3, 4, 5))
    with pytest.raises(ValueError, match="2 to 4 dims"):
        gemm.plan((2, 2, 2, 3, 4), (4, 5))


@pytest.mark.parametrize("bad", ["first", "second"])
def test_integer_operands(bad):
    """Either operand int32 is refused, naming which (the kernels would read its bits as
    floats)."""
    a = metal.DeviceArray.from_numpy(np.ones((3, 4), np.int32 if bad == "first" else np.float32))
    b = metal.DeviceArray.from_numpy(np.ones((4, 2), np.int32 if bad == "second" else np.float32))
    with pytest.raises(TypeError, match=rf"the {bad} operand must be float32, got int32"):
        gemm.matmul(a, b)


def test_forced_rung_over_device_limits(monkeypatch):
    """A device smaller than the rung: the error gives both sets of numbers."""
    monkeypatch.setattr(gemm, "device_limits", lambda: (256, 8192))
    a = metal.DeviceArray.from_numpy(np.ones((8, 8), np.float32))
    with pytest.raises(
        RuntimeError, match=r"version 8 .* 256 threads and 16384 bytes.*256 threads and 8192 bytes"
    ):
        gemm.matmul(a, a, version="8")
    assert not gemm.fits(gemm.get_rung("8")) and gemm.fits(gemm.get_rung("2"))
    assert not gemm.fits(gemm.get_rung("3"))  # 1024 threads
    assert tuner.candidates() == [
        "1", "2", "5", "6", "7", "32x32x8_4x4", "64x64x8_8x8", "64x64x16_4x4"
    ]  # fmt: skip


@pytest.mark.parametrize("version", ["1", "3", "5", "6", "10", "11"])
def test_k_zero_gives_zeros(version):
    """K = 0: no K step runs and every rung writes zeros (like NumPy)."""
    x = metal.DeviceArray.zeros((4, 0))
    y = metal.DeviceArray.zeros((0, 5))
    out = metal.DeviceArray.from_numpy(np.full((4, 5), np.nan, np.float32))
    gemm.matmul(x, y, out=out, version=version)
    np.testing.assert_array_equal(out.numpy(), np.zeros((4, 5), np.float32))


# ---- a missing barrier is caught (the schedule-order tests have teeth) -----------------


def test_missing_barrier_is_caught(rng):
    """v3 without its first barrier reads tiles before they are written: wrong results."""
    from camel.bench import matmul as bench_matmul

    # v3 alone, as `camel.bench matmul --source 3` prints it from the shader file (the
    # same kernel text: test_bench_source runs it against NumPy), compiles in a fraction
    # of the whole file's time
    barrier = "threadgroup_barrier(mem_flags::mem_threadgroup);  // tiles complete before use"
    assert barrier in (metal.SHADERS_DIR / gemm.SHADER).read_text()
    src = bench_matmul.rung_source("3")
    assert src.count(barrier) == 1
    lib = metal.compile(src.replace(barrier, ""), "matmul_v3_no_barrier.metal")
    a, b = _operands(rng, (64, 64), (64, 64))
    p = gemm.plan(a.shape, b.shape)
    out = metal.DeviceArray.empty((64, 64))
    rung = gemm.get_rung("3")
    lib.function(rung.kernel)(
        metal.DeviceArray.from_numpy(a), metal.DeviceArray.from_numpy(b), out, p.params,
        threadgroups=rung.grid(64, 64, 1), threads_per_threadgroup=rung.threads,
    )  # fmt: skip
    assert not np.allclose(out.numpy(), _reference(a, b), rtol=1e-3, atol=1e-3)


# ---- the address sanitizer (a subprocess: ASan must be loaded before Python) ------------

ASAN_SCRIPT = r"""
import numpy as np
from camel import gemm, metal

def place(arr, at_end):
    # copy arr into a buffer so its last byte is the storage's last byte (at_end), or at 0:
    # a read or write just outside the matrix then lands in ASan's red zone
    capacity = metal.Buffer(arr.nbytes + 64).capacity  # storage comes in size classes
    buf = metal.Buffer(capacity)
    assert buf.capacity == capacity
    offset = capacity - arr.nbytes if at_end else 0
    d = metal.DeviceArray(arr.shape, np.float32, buf, offset=offset)
    d.numpy()[...] = arr
    return d

rng = np.random.default_rng(0)
worst = 0.0
cases = [((33, 17), (17, 31), 0, 0), ((17, 33), (31, 17), 1, 1), ((64, 68), (68, 36), 0, 0),
         ((2, 3, 9, 8), (2, 3, 10, 8), 0, 1), ((4, 33, 20), (20, 31), 0, 0)]
for v in gemm.all_versions():
    for a_shape, b_shape, ta, tb in cases:
        for at_end in (False, True):
            a = rng.standard_normal(a_shape, dtype=np.float32)
            b = rng.standard_normal(b_shape, dtype=np.float32)
            want = np.matmul(np.swapaxes(a, -1, -2) if ta else a,
                             np.swapaxes(b, -1, -2) if tb else b)
            out = place(np.zeros(want.shape, np.float32), at_end)
            gemm.matmul(place(a, at_end), place(b, at_end), transpose_a=bool(ta),
                        transpose_b=bool(tb), out=out, version=v)
            worst = max(worst, float(np.abs(out.numpy() - want).max()))
print("max error", worst)
print("ALL OK" if worst < 1e-3 else "MISMATCH")
"""


@pytest.mark.skipif(not metal.is_simulator(), reason="the sanitizer runs on the simulator")
def test_every_rung_under_address_sanitizer():
    r = run_under_asan(ASAN_SCRIPT)
    assert "AddressSanitizer" not in r.stderr, r.stderr[-3000:]
    assert r.returncode == 0 and "ALL OK" in r.stdout, (r.stdout, r.stderr[-3000:])


# ---- through autograd: every rung in forward and backward of x @ W^T ---------------------


@pytest.mark.parametrize("version", VERSIONS)
def test_autograd_matmul_every_rung(version, monkeypatch, rng):
    """CAMEL_MATMUL=<v> drives forward and backward of a batched x·Wᵀ + a 4-D q·kᵀ on "mps"."""
    camel = pytest.importorskip("camel")
    pytest.importorskip("camel.backend_mps")
    config.set_choices(matmul=version)
    x = rng.standard_normal((3, 7, 20), dtype=np.float32)  # (B, T, in)
    w = rng.standard_normal((12, 20), dtype=np.float32)  # (out, in)
    q = rng.standard_normal((2, 2, 9, 8), dtype=np.float32)  # (B, H, T, hs)
    k = rng.standard_normal((2, 2, 9, 8), dtype=np.float32)
    grads = {}
    for device in ("cpu", "mps"):
        ts = [camel.tensor(v, requires_grad=True, device=device) for v in (x, w, q, k)]
        tx, tw, tq, tk = ts
        y = tx @ tw.transpose(0, 1)  # (B, T, out)
        att = tq @ tk.transpose(2, 3)  # (B, H, T, T)
        (y.sum() + (att * att).sum()).backward()
        grads[device] = [y.numpy(), att.numpy()] + [t.grad.numpy() for t in ts]
    for got, want in zip(grads["mps"], grads["cpu"], strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3)


# (device limits, the default rung) -> the highest rung at or below it that fits
FALLBACKS = [
    ((1024, 16384), "11", "10"),  # 11 needs 19968 bytes, 10 needs 10496: the next one down
    ((512, 4096), "5", "4"),  # 5 needs 8192 bytes; 4 needs 512 threads and 4096 bytes
    ((1024, 4096), "3", "2"),  # 3 needs 8192 bytes; 2 none
    ((256, 8192), "11", "7"),  # 10 needs 10496 bytes, 9 12288, 8 16384; 7 needs 4096
    ((256, 4096), "6", "2"),  # 6 and 5 need 8192 bytes, 4 512 threads, 3 1024 threads
    ((1024, 32768), "9", "9"),  # fits: no fallback
]


@pytest.mark.parametrize("limits,default,expected", FALLBACKS)
def test_default_rung_gives_way_on_a_small_device(limits, default, expected, monkeypatch, rng):
    """Not forced: a default over the limits falls back to the highest rung that fits."""
    config.set_choices(matmul=None)
    monkeypatch.setattr(gemm, "device_limits", lambda: limits)
    monkeypatch.setattr(gemm, "_fit_cache", {})
    monkeypatch.setattr(gemm, "choose_version", lambda *shape: default)
    used = []
    real = gemm.dispatch
    monkeypatch.setattr(gemm, "dispatch", lambda r, *a: (used.append(r.version), real(r, *a)))
    a, b = _operands(rng, (9, 10), (10, 11))
    np.testing.assert_allclose(_run(None, a, b), _reference(a, b), rtol=1e-4, atol=1e-4)
    assert used == [expected]


@pytest.mark.parametrize("shim, expected", [("metal", gemm.DEFAULT_GPU),
                                            ("cuda", gemm.DEFAULT_CUDA),
                                            ("sim", gemm.DEFAULT_SIM)])  # fmt: skip
def test_default_rung_per_shim(shim, expected, monkeypatch):
    """Each shim has its own default rung (the CUDA one, for big products, measured)."""
    monkeypatch.setattr(metal, "shim", lambda: shim)
    assert gemm.default_version(4096, 4096, 512) == expected


def test_apple_default_gives_causal_products_a_skipping_rung(monkeypatch, rng):
    """The Apple default (DEFAULT_GPU, v10) computes every tile; a causal product left to
    the default runs a rung that skips the triangle's empty tiles, and its wanted part is
    right (q k^T at T = 130: 3 tiles of 64 a side, 3 of the 9 above the diagonal)."""
    config.set_choices(matmul=None)
    monkeypatch.setattr(metal, "shim", lambda: "metal")
    monkeypatch.setattr(tuning, "lookup", lambda *shape: None)
    gemm.forget()
    used = []
    real = gemm.dispatch
    monkeypatch.setattr(gemm, "dispatch", lambda r, *a: (used.append(r), real(r, *a)))
    q, k = _operands(rng, (2, 130, 24), (2, 130, 24))
    da, db = metal.DeviceArray.from_numpy(q), metal.DeviceArray.from_numpy(k)
    got = gemm.matmul(da, db, transpose_b=True, triangle="lower").numpy()
    gemm.forget()
    assert gemm.default_version(130, 130, 24, 2) == gemm.DEFAULT_GPU
    assert len(used) == 1 and used[0].triangle and used[0].bm * used[0].bn <= 64 * 64
    want = _reference(q, k, transpose_b=True)
    lower = np.tril(np.ones((130, 130), dtype=bool))
    np.testing.assert_allclose(got[:, lower], want[:, lower], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape, expected", [
    ((4096, 4096, 4096, 1), gemm.DEFAULT_CUDA),  # 2048 big tiles: the big tile
    ((4096, 2304, 384, 1), gemm.DEFAULT_CUDA),  # 576 big tiles (128x128)
    ((4096, 1152, 384, 1), gemm.CUDA_SMALL_TILE),  # 288 tiles of 128x128: too few
    ((8192, 64, 4096, 16), gemm.CUDA_SMALL_TILE),  # 1024 big tiles, but 128 wide for N = 64
    ((2048, 2048, 128, 1), gemm.CUDA_SMALL_TILE),  # K too short to amortise a big tile
    ((4096, 384, 1536, 1), gemm.CUDA_SMALL_TILE),  # 192 of v14's tiles, 384 small ones
    ((4096, 84, 384, 1), gemm.CUDA_SMALL_TILE),  # few tiles, but K too short to split
    ((1024, 64, 1024, 16), gemm.CUDA_SMALL_TILE),  # a batch does not split
    ((384, 1536, 4096, 1), gemm.CUDA_SPLIT_TILE + "/k8"),  # 144 tiles x 8 >= 1056
    ((384, 1536, 1024, 1), gemm.CUDA_SPLIT_TILE + "/k4"),  # slices of K >= 256: 4 at most
    ((84, 384, 4096, 1), gemm.CUDA_SPLIT_TILE + "/k8"),  # 12 tiles: the largest split
    ((84, 384, 4100, 1), gemm.CUDA_SMALL_TILE),  # K % (4 S) != 0 for every S
])  # fmt: skip
def test_cuda_default_fills_the_gpu(shape, expected, monkeypatch):
    """Untuned on the CUDA shim: big tiles where there are enough of them, else small tiles,
    split K where few tiles have a long K (the autotuner's winners on an H100)."""
    monkeypatch.setattr(metal, "shim", lambda: "cuda")
    assert gemm.default_version(*shape) == expected


def test_a_split_default_gives_the_product(rng, monkeypatch):
    """The CUDA rule's split-K choice runs through matmul() (one batch of slices, one sum) and
    matches NumPy, here on whatever shim runs the tests with the rule in force."""
    monkeypatch.setattr(metal, "shim", lambda: "cuda")
    monkeypatch.setattr(tuning, "lookup", lambda *shape: None)
    config.set_choices(matmul=None)
    assert gemm.default_version(40, 36, 2048) == gemm.CUDA_SPLIT_TILE + "/k8"
    a, b = _operands(rng, (40, 2048), (2048, 36))
    with camel.profile() as prof:
        _check(None, a, b)
    names = [e.name for e in prof.events]
    assert names == [gemm.get_rung(gemm.CUDA_SPLIT_TILE).kernel, "sum_axis_blocks_float4"], names
    assert prof.events[0].grid[2] == 8


def test_matmul_decides_each_call_signature_once(rng, monkeypatch):
    """matmul() works a call out (plan, rung, split) once per distinct signature: a training
    step repeats its products, and the host pays for every decision (docs/cuda.md)."""
    planned = []
    real_plan = gemm.plan

    def counted_plan(*args, **kwargs):
        planned.append(args[:2])
        return real_plan(*args, **kwargs)

    monkeypatch.setattr(gemm, "plan", counted_plan)
    a, b = _operands(rng, (9, 10), (10, 11))
    for _ in range(3):
        np.testing.assert_allclose(_run(None, a, b), _reference(a, b), rtol=1e-4, atol=1e-4)
    assert planned == [((9, 10), (10, 11))]
    _run(None, a, b.T.copy(), transpose_b=True)  # another signature: decided again
    _run(None, a[:, :8].copy(), b[:8])
    assert planned == [((9, 10), (10, 11)), ((9, 10), (11, 10)), ((9, 8), (8, 11))]


def test_matmul_decisions_follow_camel_matmul_and_the_tuner(rng, tmp_path, monkeypatch):
    """A decision kept for a shape never outlives what it was made from: CAMEL_MATMUL set
    or changed, and a winner the autotuner stores, take effect at the next call."""
    monkeypatch.setenv("CAMEL_CACHE_DIR", str(tmp_path))
    config.set_choices(matmul=None)
    tuning.reset()
    a, b = _operands(rng, (40, 64), (64, 33))

    def kernel_used():
        with camel.profile() as prof:
            np.testing.assert_allclose(_run(None, a, b), _reference(a, b), rtol=1e-4, atol=1e-3)
        return [e.name for e in prof.events]

    try:
        default = kernel_used()
        assert default == [gemm.get_rung(gemm.default_version(40, 33, 64)).kernel]
        config.set_choices(matmul="2")
        assert kernel_used() == [gemm.get_rung("2").kernel]
        config.set_choices(matmul="5")
        assert kernel_used() == [gemm.get_rung("5").kernel]
        config.set_choices(matmul=None)
        assert kernel_used() == default
        tuning.store(40, 33, 64, "7")
        assert kernel_used() == [gemm.get_rung("7").kernel]
    finally:
        tuning.reset()
