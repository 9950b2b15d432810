"""Flash attention (Stage 5B): every rung of shaders/ops_attention.metal equals NumPy and
the naive "mps" path, forward (out and log-sum-exp) and backward, at awkward T, for
D = 32, 64, 128, causal and not, in the simulator's three schedule orders; a long
sequence runs without a (T, T) buffer; bad input names the shapes.

Simulating simdgroup_matrix code is slow (~10 µs per 8x8 operation), so the grid is:
every rung x T in {1, 17, 64, 130} x D x causal in the forward order, T in {17, 130} in
the reverse and random orders, and T = 1000 for a few (rung, D, causal, order) picks.
"""

import math
import shutil
import subprocess
import types
from pathlib import Path

import numpy as np
import pytest
from conftest import in_nan_slack, require_shim, run_under_asan

import camel
import camel.functional as F
from camel import config, flash, metal, tuning
from camel.bench import tuner

require_shim()

ORDERS = ["forward", "reverse", "random"]
DIMS = [32, 64, 128]
RUNGS = list(flash.RUNGS)


def inputs(t, d, b=1, h=2, s=None, seed=0):
    rng = np.random.default_rng(seed + 7 * t + d)
    q = rng.standard_normal((b, h, t, d), dtype=np.float32)
    k = rng.standard_normal((b, h, s or t, d), dtype=np.float32)
    v = rng.standard_normal((b, h, s or t, d), dtype=np.float32)
    return q, k, v


_naive = {}


def naive_mps(q, k, v, causal, monkeypatch):
    """The Stage 5A path on "mps" (four ops with a (T, S) matrix), cached per input."""
    key = (q.shape, k.shape, causal, q[0, 0, 0, 0])
    if key not in _naive:
        config.set_choices(attention="naive")
        qt, kt, vt = (camel.tensor(x, device="mps") for x in (q, k, v))
        _naive[key] = F.scaled_dot_product_attention(qt, kt, vt, causal=causal).numpy().copy()
    return _naive[key]


def check_forward(rung, t, d, causal, order, monkeypatch, b=1, h=2):
    monkeypatch.setenv("CAMEL_SIM_ORDER", order)
    q, k, v = inputs(t, d, b, h)
    want, want_lse = flash.reference_numpy(q, k, v, causal)
    qd, kd, vd = (metal.DeviceArray.from_numpy(x) for x in (q, k, v))
    out, lse = flash.forward(qd, kd, vd, causal, rung=rung)
    got = out.numpy()
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4, err_msg=f"{rung} out")
    np.testing.assert_allclose(lse.numpy(), want_lse, atol=2e-5, rtol=1e-5, err_msg="lse")
    naive = naive_mps(q, k, v, causal, monkeypatch)
    np.testing.assert_allclose(got, naive, atol=2e-5, rtol=1e-4, err_msg=f"{rung} vs naive")


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("d", DIMS)
@pytest.mark.parametrize("t", [1, 17, 64, 130])
@pytest.mark.parametrize("rung", RUNGS)
def test_forward_every_rung(rung, t, d, causal, monkeypatch):
    check_forward(rung, t, d, causal, "forward", monkeypatch)


@pytest.mark.parametrize("order", ["reverse", "random"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("d", DIMS)
@pytest.mark.parametrize("t", [17, 130])
@pytest.mark.parametrize("rung", RUNGS)
def test_forward_schedule_orders(rung, t, d, causal, order, monkeypatch):
    check_forward(rung, t, d, causal, order, monkeypatch)


@pytest.mark.parametrize(
    "rung, d, causal, order",
    [
        ("flash_v1", 32, True, "forward"),
        ("flash_v2", 64, True, "reverse"),
        ("flash_v5", 32, False, "random"),
        ("flash_v6_64x32", 128, True, "forward"),
        ("flash_v6_128x32", 64, True, "random"),
        ("flash_v7", 128, True, "reverse"),
        ("flash_v7", 32, False, "random"),
        ("flash_v8", 64, True, "random"),
        ("flash_v8", 128, False, "reverse"),
        ("flash_v9", 64, True, "reverse"),
        ("flash_v9", 128, False, "random"),
        ("flash_v10", 64, True, "random"),
        ("flash_v10", 128, False, "reverse"),
        ("flash_v10_32x32", 64, False, "forward"),
        ("flash_v11", 64, True, "reverse"),
        ("flash_v11", 128, True, "random"),
        ("flash_v11", 32, False, "forward"),
        ("flash_v12", 64, True, "random"),
        ("flash_v12", 128, True, "forward"),
        ("flash_v12", 32, False, "reverse"),
    ],
)
def test_forward_t1000(rung, d, causal, order, monkeypatch):
    check_forward(rung, 1000, d, causal, order, monkeypatch, h=1)


def test_keys_not_equal_queries(monkeypatch):
    """S != T (cross attention), with edge tiles on both sides, causal top-left aligned."""
    for causal in (False, True):
        q, k, v = inputs(70, 64, s=33)
        want, want_lse = flash.reference_numpy(q, k, v, causal)
        qd, kd, vd = (metal.DeviceArray.from_numpy(x) for x in (q, k, v))
        out, lse = flash.forward(qd, kd, vd, causal, rung="flash_v5")
        np.testing.assert_allclose(out.numpy(), want, atol=2e-5, rtol=1e-4)
        np.testing.assert_allclose(lse.numpy(), want_lse, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("rung", RUNGS)
def test_edges_with_nan_slack(rung, causal, poisoned_memory):
    """q, k, v surrounded by NaN and every fresh buffer (out, lse, the backward's delta,
    dq, dk, dv) starting as NaN: a read past the last query or key row, or a row left
    unwritten, turns a number into NaN. Forward with every rung, both backward kinds."""
    d = 32
    for t, s in ((17, 33), (33, 40), (70, 9)):  # T = 33: the last query starts a key block
        q, k, v = inputs(t, d, b=1, h=2, s=s)
        placed = [in_nan_slack(x) for x in (q, k, v)]
        qd, kd, vd = (x for x, _ in placed)
        want, want_lse = flash.reference_numpy(q, k, v, causal)
        out, lse = flash.forward(qd, kd, vd, causal, rung=rung)
        case = f"{rung} T={t} S={s} causal={causal}"
        np.testing.assert_allclose(out.numpy(), want, atol=2e-5, rtol=1e-4, err_msg=case)
        np.testing.assert_allclose(lse.numpy(), want_lse, atol=2e-5, rtol=1e-5, err_msg=case)
        if rung != "flash_v1":
            continue  # the backward kernels do not depend on the forward rung
        dout = np.random.default_rng(t).standard_normal(q.shape, dtype=np.float32)
        gd, _ = in_nan_slack(dout)
        for kind in flash.BACKWARD_KINDS:
            grads = flash.backward(qd, kd, vd, out, lse, gd, causal, kind=kind)
            want_grads = numpy_grads(q, k, v, causal, dout)
            for name, got, ref in zip("qkv", grads, want_grads, strict=True):
                tol = 1e-4 * max(1.0, np.abs(ref).max())
                np.testing.assert_allclose(got.numpy(), ref, atol=tol, rtol=1e-3,
                                           err_msg=f"{case} {kind} d{name}")  # fmt: skip
        assert all(slack.intact() for _, slack in placed), case


def torch_grads(q, k, v, causal, dout):
    torch = pytest.importorskip("torch")
    tq, tk, tv = (torch.tensor(x, requires_grad=True) for x in (q, k, v))
    out = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=causal)
    out.backward(torch.tensor(dout))
    return [x.grad.numpy() for x in (tq, tk, tv)]


def numpy_grads(q, k, v, causal, dout):
    """dq, dk, dv of softmax(q kᵀ / sqrt(D)) v in float64 NumPy."""
    q64, k64, v64, g = (np.asarray(x, np.float64) for x in (q, k, v, dout))
    scale = 1.0 / math.sqrt(q.shape[-1])
    s = q64 @ np.swapaxes(k64, -1, -2) * scale
    if causal:
        s = np.where(np.tril(np.ones(s.shape[-2:], bool)), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    dv = np.swapaxes(p, -1, -2) @ g
    dp = g @ np.swapaxes(v64, -1, -2)
    ds = p * (dp - (dp * p).sum(-1, keepdims=True))
    return ds @ k64 * scale, np.swapaxes(ds, -1, -2) @ q64 * scale, dv


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("d", DIMS)
@pytest.mark.parametrize("t", [1, 17, 130])
@pytest.mark.parametrize("rung", ["flash_v6_64x32", "flash_v7", "flash_v9"])
def test_backward(rung, t, d, causal, order, monkeypatch):
    """Autograd through the flash path of F.scaled_dot_product_attention equals NumPy, the
    naive path on "mps" and (when installed) PyTorch; the backward reads the forward rung's out and
    lse (v7 writes lse from another lane of each row than v1-v6)."""
    monkeypatch.setenv("CAMEL_SIM_ORDER", order)
    q, k, v = inputs(t, d, b=2, h=1)
    dout = np.random.default_rng(t + d).standard_normal(q.shape, dtype=np.float32)

    def run(mode):
        config.set_choices(attention=mode)
        ts = [camel.tensor(x, device="mps", requires_grad=True) for x in (q, k, v)]
        out = F.scaled_dot_product_attention(*ts, causal=causal)
        out.backward(camel.tensor(dout, device="mps"))
        return out.numpy(), [x.grad.numpy() for x in ts]

    out, grads = run(rung)
    naive_out, naive_grads = run("naive")
    np.testing.assert_allclose(out, naive_out, atol=2e-5, rtol=1e-4)
    refs = [numpy_grads(q, k, v, causal, dout), naive_grads]
    try:
        refs.append(torch_grads(q, k, v, causal, dout))
    except pytest.skip.Exception:
        pass
    for ref in refs:
        for name, got, want in zip("qkv", grads, ref, strict=True):
            tol = 1e-4 * max(1.0, np.abs(want).max())
            np.testing.assert_allclose(got, want, atol=tol, rtol=1e-3, err_msg=f"d{name}")


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("d", DIMS)
@pytest.mark.parametrize("t, s", [(1, 1), (17, 17), (130, 70), (70, 130)])
def test_backward_kinds_agree(t, s, d, causal, order, monkeypatch):
    """The row-per-thread and the threadgroup-shared backward kernels equal NumPy."""
    monkeypatch.setenv("CAMEL_SIM_ORDER", order)
    q, k, v = inputs(t, d, b=1, h=2, s=s)
    dout = np.random.default_rng(t * s + d).standard_normal(q.shape, dtype=np.float32)
    want = numpy_grads(q, k, v, causal, dout)
    qd, kd, vd, gd = (metal.DeviceArray.from_numpy(x) for x in (q, k, v, dout))
    out, lse = flash.forward(qd, kd, vd, causal, rung="flash_v1")
    for kind in flash.BACKWARD_KINDS:
        grads = flash.backward(qd, kd, vd, out, lse, gd, causal, kind=kind)
        for name, got, ref in zip("qkv", grads, want, strict=True):
            tol = 1e-4 * max(1.0, np.abs(ref).max())
            np.testing.assert_allclose(got.numpy(), ref, atol=tol, rtol=1e-3, err_msg=kind + name)


def test_gradcheck_small(monkeypatch):
    """Finite differences through the flash kernels for dK (the gradient through dS, the
    longest path), T = 5, D = 32, causal; dQ and dV are checked against NumPy above."""
    q, k, v = (x * 0.5 for x in inputs(5, 32, b=1, h=1))
    ts = [camel.tensor(x, device="mps", requires_grad=(i == 1)) for i, x in enumerate((q, k, v))]
    config.set_choices(attention="flash_v2")

    def fn(a, b, c):
        return F.scaled_dot_product_attention(a, b, c, causal=True)

    camel.gradcheck(fn, ts, eps=1e-2, atol=2e-3, rtol=2e-2)


def test_long_sequence_memory():
    """T = 2048: the forward allocates less than T·T·4 bytes beyond inputs and outputs
    (the naive path would need 16 MiB for the scores of one head)."""
    t, d = 2048, 32
    q, k, v = inputs(t, d, b=1, h=1)
    qd, kd, vd = (metal.DeviceArray.from_numpy(x) for x in (q, k, v))
    metal.synchronize()
    metal.empty_cache()
    metal.reset_peak_memory_stats()
    base = metal.memory_stats()["peak_bytes"]
    out, lse = flash.forward(qd, kd, vd, True, rung="flash_v6_64x32")
    got = out.numpy()
    extra = metal.memory_stats()["peak_bytes"] - base - out.size * 4 - lse.size * 4
    assert extra < t * t * 4, f"flash forward used {extra} extra bytes at T = {t}"
    rows = np.r_[0:3, 1000:1003, t - 3 : t]  # spot-check rows against NumPy (causal)
    mask = np.arange(t)[None, :] <= rows[:, None]
    s = q[0, 0, rows] @ k[0, 0].T / math.sqrt(d)
    s = np.where(mask, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    want = (p / p.sum(-1, keepdims=True)) @ v[0, 0]
    np.testing.assert_allclose(got[0, 0, rows], want, atol=2e-5, rtol=1e-4)


def test_tune_picks_a_checked_v6_shape(monkeypatch, tmp_path):
    """tuner.tune_flash times the v6 shapes that pass the NumPy check, never one that fails it
    (even the fastest), and "flash" then uses the winner (not the untuned default)."""
    monkeypatch.setenv("CAMEL_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tuning, "_flash_cache", None)
    assert [r.name for r in flash.v6_candidates(32)] == [
        "flash_v6_64x32", "flash_v6_64x64", "flash_v6_128x32"
    ]  # fmt: skip
    # 64x64 computes wrong numbers and would be the fastest; 128x32 is the fastest good one.
    cost = {"flash_v6_64x32": 2.0, "flash_v6_64x64": 0.1, "flash_v6_128x32": 1.0}
    clock = [0.0]
    real_forward = flash.forward

    def forward(q, k, v, causal=False, rung=None):
        clock[0] += cost[rung]
        out, lse = real_forward(q, k, v, causal, rung)
        if rung == "flash_v6_64x64":
            out = metal.DeviceArray.from_numpy(out.numpy() + 1.0)
        return out, lse

    monkeypatch.setattr(flash, "forward", forward)
    monkeypatch.setattr(tuner, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    lines = []
    best = tuner.tune_flash(1, 1, 40, 32, causal=True, reps=1, log=lines.append)
    assert best == "flash_v6_128x32" != flash.DEFAULT_V6
    assert any("flash_v6_64x64 d32 fails the NumPy check" in line for line in lines), lines
    assert sum("tune d32" in line for line in lines) == 2  # the two good shapes were timed
    monkeypatch.setattr(tuning, "_flash_cache", None)  # read back from the file
    assert flash.get_rung("flash", 32, 40, True).name == best
    assert flash.get_rung("flash", 32, 40, False).name == flash.DEFAULT_V6  # not tuned


def test_rung_table():
    """Every rung fits 32 KiB and exists in the shader; v6's 128x64 is over the limit and
    not a candidate; unknown names list the valid ones."""
    lib = metal.library(flash.SHADER)
    for rung in flash.RUNGS.values():
        for d in DIMS:
            assert rung.tg_bytes(d) <= 32 * 1024, (rung.name, d)
            assert rung.kernel(d) in lib.function_names
    assert flash.V6_TOO_BIG.tg_bytes(64) > 32 * 1024
    assert all(r.br * r.bc < 128 * 64 for r in flash.v6_candidates(64))
    with pytest.raises(ValueError, match=r"unknown rung 'flash_v13'.*flash_v1.*flash_v12"):
        flash.get_rung("flash_v13")


@pytest.mark.skipif(shutil.which("clang++-19") is None, reason="clang++-19 is not installed")
def test_rung_table_bytes_are_the_shaders_arrays():
    """Each rung's tg_bytes is what its kernel declares (K/V chunks, score tile, diag), read
    from the CUDA translation's PTX: one .shared array each, named after the instance of
    flash_forward (the simulator reports no static threadgroup memory). v8's padded rows
    are there: 20 / 28 / 28 KiB for D = 32 / 64 / 128 against v6 64x32's 18 / 26 / 26."""
    import re

    src = (Path(__file__).resolve().parents[1] / "shaders" / flash.SHADER).read_text()
    ptx, _ = metal._cuda_call("camel_cuda_compile", src, f"shaders/{flash.SHADER}", 90)
    arrays = {}  # mangled flash_forward(_simt) instance -> {array: bytes}
    for inst, name, size in re.findall(
        r"\.shared \.align \d+ \.b8 (_ZZ\d+flash_forward\w+?E)\d+(\w+)\[(\d+)\]", ptx
    ):
        arrays.setdefault(inst, {})[name] = int(size)
    entries = re.split(r"\n(?=\.visible \.entry)", ptx)[1:]
    for rung in flash.RUNGS.values():
        # v10 and v11 are flash_forward_simt: Q, K (or P) and V tiles
        names = ("q_tile", "k_tile", "v_tile") if rung.simt else ("kv4", "s_all", "diag_all")
        for d in DIMS:
            head = f".visible .entry camel_{rung.kernel(d)}("
            body = next(e for e in entries if e.startswith(head))
            inst = re.search(rf"_ZZ\d+flash_forward\w+?E(?=\d+{names[0]})", body).group(0)
            got = arrays[inst]
            # v7's two placeholders of 4 floats are never used: the compiler drops them
            unused = 32 if rung.reg_softmax else 0
            declared = sum(got.get(a, 0) for a in names)
            assert declared == rung.tg_bytes(d) - unused, (rung.name, d, got)
    v6, v8 = flash.RUNGS["flash_v6_64x32"], flash.RUNGS["flash_v8"]
    assert [v8.tg_bytes(d) for d in DIMS] == [20480, 28672, 28672]
    assert [v6.tg_bytes(d) for d in DIMS] == [18432, 26624, 26624]
    assert [flash.RUNGS["flash_v10"].tg_bytes(d) for d in DIMS] == [20480, 32768, 32768]
    assert [flash.RUNGS["flash_v10_32x32"].tg_bytes(d) for d in DIMS] == [12288, 24576, 32768]
    assert [flash.RUNGS["flash_v11"].tg_bytes(d) for d in DIMS] == [20480, 32768, 32768]
    assert [flash.RUNGS["flash_v12"].tg_bytes(d) for d in DIMS] == [20480, 32768, 32768]


def test_v6_candidates_fit_the_limit(monkeypatch):
    """A shape needing exactly the device's threadgroup memory is a candidate; one byte
    less and it is not (at D = 128, 64x32 and 64x64 need 26 KiB, 128x32 28 KiB)."""
    assert [flash.RUNGS[n].tg_bytes(128) for n in ("flash_v6_64x32", "flash_v6_128x32")] == [
        26624, 28672
    ]  # fmt: skip
    for limit, names in ((28672, ["flash_v6_64x32", "flash_v6_64x64", "flash_v6_128x32"]),
                         (28671, ["flash_v6_64x32", "flash_v6_64x64"])):  # fmt: skip
        monkeypatch.setattr(flash, "_limits", limit)
        assert [r.name for r in flash.v6_candidates(128)] == names, limit


def test_bad_input_names_the_shapes(monkeypatch):
    qd = metal.DeviceArray.from_numpy(np.zeros((1, 2, 5, 32), np.float32))
    kd = metal.DeviceArray.from_numpy(np.zeros((1, 2, 6, 32), np.float32))
    vd = metal.DeviceArray.from_numpy(np.zeros((1, 2, 7, 32), np.float32))
    with pytest.raises(ValueError, match=r"\(1, 2, 5, 32\), \(1, 2, 6, 32\) and \(1, 2, 7, 32\)"):
        flash.forward(qd, kd, vd)
    odd = metal.DeviceArray.from_numpy(np.zeros((1, 1, 4, 48), np.float32))
    with pytest.raises(ValueError, match=r"head dim D = 48 is not built"):
        flash.forward(odd, odd, odd)


def test_selection(monkeypatch, capsys):
    """Unset: flash on mps for built head dims; unsupported D: naive with a one-time notice;
    a forced rung with an unsupported D: an error; unknown names: an error listing rungs."""
    q, k, v = inputs(9, 32, b=1, h=1)
    ts = [camel.tensor(x, device="mps") for x in (q, k, v)]
    config.set_choices(attention=None)
    monkeypatch.setattr(flash, "CUDA_NAIVE_MAX_SCORES", -1)  # the CUDA shim's naive default off
    with camel.profile() as prof:
        F.scaled_dot_product_attention(*ts, causal=True).numpy()
    assert any(e.name.startswith("flash_v6") for e in prof.events)
    odd = [camel.tensor(np.ones((1, 1, 4, 8), np.float32), device="mps") for _ in range(3)]
    for _ in range(2):
        with camel.profile() as prof:
            F.scaled_dot_product_attention(*odd).numpy()
        assert not any(e.name.startswith("flash") for e in prof.events)
    assert capsys.readouterr().err.count("head dim D = 8 has no flash kernel") == 1
    config.set_choices(attention="flash_v3")
    with pytest.raises(ValueError, match=r"flash_v3 cannot run: head dim D = 8"):
        F.scaled_dot_product_attention(*odd)
    with camel.profile() as prof:
        F.scaled_dot_product_attention(*ts).numpy()
    assert {e.name for e in prof.events} == {"flash_v3_64x64_d32"}
    config.set_choices(attention="flash_v13")
    with pytest.raises(ValueError, match=r"CAMEL_ATTENTION='flash_v13' is unknown.*'flash_v12'"):
        F.scaled_dot_product_attention(*ts)


def test_cuda_shim_takes_the_naive_path_while_the_scores_fit(monkeypatch, capsys):
    """On the CUDA shim (faked here: only the choice is tested) an unset CAMEL_ATTENTION
    gives the naive path up to CUDA_NAIVE_MAX_SCORES bytes of scores, flash above; "flash"
    and a rung still force flash; other shims keep flash."""
    q, k, v = inputs(9, 32, b=1, h=2)
    ts = [camel.tensor(x, device="mps") for x in (q, k, v)]
    config.set_choices(attention=None)
    monkeypatch.setattr(metal, "shim", lambda: "cuda")
    with camel.profile() as prof:
        F.scaled_dot_product_attention(*ts, causal=True).numpy()
    assert not any(e.name.startswith("flash") for e in prof.events)
    assert "naive path on the CUDA shim" in capsys.readouterr().err
    # 2 heads x 9 x 9 scores x 4 bytes = 648 bytes: a budget just below sends it to flash
    monkeypatch.setattr(flash, "CUDA_NAIVE_MAX_SCORES", 647)
    with camel.profile() as prof:
        F.scaled_dot_product_attention(*ts, causal=True).numpy()
    assert any(e.name.startswith("flash_v6") for e in prof.events)
    monkeypatch.setattr(flash, "CUDA_NAIVE_MAX_SCORES", 648)
    for mode in ("flash", "flash_v7"):
        config.set_choices(attention=mode)
        with camel.profile() as prof:
            F.scaled_dot_product_attention(*ts, causal=True).numpy()
        assert any(e.name.startswith("flash") for e in prof.events), mode
    config.set_choices(attention=None)
    monkeypatch.setattr(metal, "shim", lambda: "sim")
    with camel.profile() as prof:
        F.scaled_dot_product_attention(*ts, causal=True).numpy()
    assert any(e.name.startswith("flash_v6") for e in prof.events)


# ---- the address sanitizer (a subprocess: ASan must be loaded before Python) ------------

ASAN_SCRIPT = r"""
import numpy as np
from camel import flash, metal

def at_end(arr):
    # arr at the very end of its storage: a read one row past it lands in ASan's red zone
    # (one head, so "the next head" does not exist either)
    capacity = metal.Buffer(arr.nbytes + 64).capacity
    buf = metal.Buffer(capacity)
    d = metal.DeviceArray(arr.shape, np.float32, buf, offset=capacity - arr.nbytes)
    d.numpy()[...] = arr
    return d

rng = np.random.default_rng(0)
worst = 0.0
for name in flash.RUNGS:
    for t, s, d in ((17, 33, 32), (33, 17, 64), (70, 9, 32)):
        for causal in (False, True):
            q = rng.standard_normal((1, 1, t, d), dtype=np.float32)
            k, v = (rng.standard_normal((1, 1, s, d), dtype=np.float32) for _ in "kv")
            want = flash.reference_numpy(q, k, v, causal)[0]
            out, _ = flash.forward(at_end(q), at_end(k), at_end(v), causal, rung=name)
            worst = max(worst, float(np.nanmax(np.abs(out.numpy() - want))))
print("max error", worst)
print("ALL OK" if worst < 1e-4 else "MISMATCH")
"""


@pytest.mark.skipif(not metal.is_simulator(), reason="the sanitizer runs on the simulator")
def test_every_forward_rung_under_address_sanitizer():
    """No rung reads a key past S or a query past T: inputs end where their storage ends."""
    r = run_under_asan(ASAN_SCRIPT)
    assert "AddressSanitizer" not in r.stderr, r.stderr[-3000:]
    assert r.returncode == 0 and "ALL OK" in r.stdout, (r.stdout, r.stderr[-3000:])


# ---- v7's frag_lane: where a lane's thread_elements() sit, on each shim -----------------
#
# v7 does its softmax on the two elements each lane holds of a score fragment, so it must
# know their (row, column): shaders/ops_attention.metal's frag_lane says, with one branch
# for Apple GPUs and the simulator and one (#ifdef __CAMEL_CUDA__) for the CUDA shim,
# whose simdgroup_matrix keeps the tensor cores' layout. Both branches are checked against
# the shim that implements them: the simulator's (or a Mac's, or a GPU's) by running a
# kernel, the CUDA header's by compiling it for this CPU.


def _frag_lane_source() -> str:
    """FragLane and frag_lane, exactly as shaders/ops_attention.metal has them."""
    from camel.bench import source

    items = source.parse((source.SHADERS / flash.SHADER).read_text())
    return "\n\n".join(it.text for it in items if it.name in ("FragLane", "frag_lane"))


FRAG_PROBE = r"""
#include <metal_stdlib>
using namespace metal;

%s

// Per lane: its elements of a loaded fragment, of a product, where frag_lane puts them,
// and frag_lane's masks; and a fragment that each lane fills where frag_lane says, stored.
kernel void frag_lane_probe(device const float* src [[buffer(0)]],
                            device float* out [[buffer(1)]],
                            device float* stored [[buffer(2)]],
                            ushort lane [[thread_index_in_simdgroup]]) {
    const FragLane f = frag_lane(lane);
    simdgroup_float8x8 m, prod, w;
    simdgroup_float8x8 eye = simdgroup_float8x8(1.0f);
    simdgroup_load(m, src, 8);
    simdgroup_multiply(prod, eye, m);
    for (uint i = 0; i < 2; i++) {
        out[lane * 8 + i] = m.thread_elements()[i];
        out[lane * 8 + 2 + i] = prod.thread_elements()[i];
        out[lane * 8 + 4 + i] = float(8 * f.row + f.col + i);
        w.thread_elements()[i] = float(8 * f.row + f.col + i);
    }
    out[lane * 8 + 6] = float(f.x1);
    out[lane * 8 + 7] = float(f.x2);
    simdgroup_store(w, stored, 8);
}
"""


def _check_frag_positions(pos, x1, x2):
    """pos[lane] = 8 row + col of the lane's first element: the 32 lanes cover the 64
    elements in pairs, and lane ^ m (m in 0, x1, x2, x1 ^ x2) are the 4 lanes of its row."""
    assert sorted(pos) == list(range(0, 64, 2)), pos
    for lane in range(32):
        row = [pos[lane ^ m] // 8 for m in (0, x1[lane], x2[lane], x1[lane] ^ x2[lane])]
        cols = sorted(pos[lane ^ m] % 8 for m in (0, x1[lane], x2[lane], x1[lane] ^ x2[lane]))
        assert len(set(row)) == 1 and cols == [0, 2, 4, 6], (lane, row, cols)


def test_frag_lane_is_this_shims_layout():
    """On the shim in use (the simulator here, the CUDA shim on an NVIDIA GPU, Metal on a
    Mac): frag_lane names the elements simdgroup_load gives a lane, a multiply leaves in
    it, and simdgroup_store writes from it."""
    lib = metal.compile(FRAG_PROBE % _frag_lane_source(), "frag_lane_probe.metal")
    src = np.arange(64, dtype=np.float32)
    out = metal.DeviceArray.zeros((32, 8), np.float32)
    stored = metal.DeviceArray.zeros((64,), np.float32)
    lib.function("frag_lane_probe")(metal.DeviceArray.from_numpy(src), out, stored,
                                    threadgroups=1, threads_per_threadgroup=32)  # fmt: skip
    got = out.numpy()
    np.testing.assert_array_equal(got[:, 0:2], got[:, 4:6], err_msg="simdgroup_load")
    np.testing.assert_array_equal(got[:, 2:4], got[:, 4:6], err_msg="simdgroup_multiply")
    np.testing.assert_array_equal(stored.numpy(), src, err_msg="simdgroup_store")
    _check_frag_positions(got[:, 4].astype(int), got[:, 6].astype(int), got[:, 7].astype(int))


CLANG = shutil.which("clang++-19")
CUDA_INCLUDE = Path(__file__).resolve().parents[1] / "shim" / "cuda" / "include"

# The CUDA shim's headers compiled for this CPU: the NVPTX builtins they call become
# stubs (one lane at a time: g_lane; the loads and stores need no other lane), so the
# header's own simdgroup_load and simdgroup_store run here, lane by lane.
CUDA_HOST_PROBE = r"""
static unsigned g_lane;
inline unsigned __nvvm_read_ptx_sreg_laneid() { return g_lane; }
inline unsigned __nvvm_activemask() { return ~0u; }
inline void __syncthreads() {}
inline void __nvvm_bar_warp_sync(unsigned) {}
inline void __nvvm_membar_gl() {}
inline void __nvvm_membar_cta() {}
inline unsigned __nvvm_vote_ballot_sync(unsigned, bool) { return 0; }
inline int __nvvm_shfl_sync_idx_i32(unsigned, int, int, int) { return 0; }
#define SREG(n) inline unsigned __nvvm_read_ptx_sreg_##n() { return 0; }
SREG(tid_x) SREG(tid_y) SREG(tid_z) SREG(ctaid_x) SREG(ctaid_y) SREG(ctaid_z)
SREG(ntid_x) SREG(ntid_y) SREG(ntid_z)
#include "camel_cuda_msl.h"
using namespace metal;

%s

int main() {
    float src[64], stored[64];
    for (int i = 0; i < 64; i++) src[i] = i, stored[i] = -1;
    for (g_lane = 0; g_lane < 32; g_lane++) {
        const FragLane f = frag_lane(g_lane);
        simdgroup_float8x8 m, w;
        simdgroup_load(m, src, 8);
        for (unsigned i = 0; i < 2; i++) w.thread_elements()[i] = 8 * f.row + f.col + i;
        simdgroup_store(w, stored, 8);
        __builtin_printf("lane %%u loaded %%g %%g at %%u %%u masks %%u %%u\n", g_lane,
                         m.thread_elements()[0], m.thread_elements()[1],
                         8 * f.row + f.col, 8 * f.row + f.col + 1, f.x1, f.x2);
    }
    for (int i = 0; i < 64; i++) __builtin_printf("stored %%d %%g\n", i, stored[i]);
}
"""


@pytest.mark.skipif(CLANG is None, reason="clang++-19 is not installed")
def test_frag_lane_cuda_branch_is_the_cuda_headers_layout(tmp_path):
    """frag_lane's __CAMEL_CUDA__ branch against shim/cuda/include/camel_cuda_simd.h's own
    simdgroup_load and simdgroup_store, compiled for the host (no GPU needed)."""
    probe = tmp_path / "frag_lane_cuda.cpp"
    probe.write_text(CUDA_HOST_PROBE % _frag_lane_source())
    exe = tmp_path / "frag_lane_cuda"
    build = subprocess.run([CLANG, "-std=c++17", "-w", "-I", str(CUDA_INCLUDE), str(probe),
                            "-o", str(exe)], capture_output=True, text=True)  # fmt: skip
    assert build.returncode == 0, build.stderr[-3000:]
    lines = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout
    lanes = [ln.split() for ln in lines.splitlines() if ln.startswith("lane ")]
    stored = [float(ln.split()[2]) for ln in lines.splitlines() if ln.startswith("stored ")]
    assert len(lanes) == 32 and stored == list(range(64)), lines
    for w in lanes:
        assert (float(w[3]), float(w[4])) == (float(w[6]), float(w[7])), w  # load
    pos = [int(w[6]) for w in lanes]
    _check_frag_positions(pos, [int(w[9]) for w in lanes], [int(w[10]) for w in lanes])
