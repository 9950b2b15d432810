"""NaN and ±inf through every op, forward and backward, on every device, against PyTorch.

Metal's `max`, `fmax` and `simd_max` return the non-NaN operand, so a kernel written
with them silently drops a NaN that NumPy and PyTorch propagate (relu of NaN gave 0,
the max of a row with a NaN gave its largest number). Each case here puts NaN, +inf or
-inf at a few positions of an input of an awkward size (the first element, one in the
middle, the last one: the float4 kernels' scalar tail) and compares the outputs and
the gradients with torch on the CPU: the same NaN positions, the same infinities (with
their signs), the same finite values to float32 tolerance.

Where camel's meaning differs from one torch function on purpose, the test says so:
the full max() gives its whole gradient to the first maximum (torch's max() splits it
among ties; camel follows max(dim)), and a causal softmax is torch's masked_fill(-inf)
followed by softmax.
"""

import math

import numpy as np
import pytest
from conftest import DEVICES

import camel
import camel.functional as F
from camel import config, optim

torch = pytest.importorskip("torch")

# NumPy warns on inf * 0 and inf - inf; here those are the point.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")

SPECIALS = {"nan": math.nan, "+inf": math.inf, "-inf": -math.inf}


def with_specials(shape, value, positions, seed=0):
    """Normal float32 samples of `shape` with `value` at the given flat positions."""
    a = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    flat = a.reshape(-1)
    for p in positions:
        flat[p % flat.size] = value
    return a


def assert_same(got, want, what):
    """Equal NaN positions, equal infinities, close finite values."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5, equal_nan=True, err_msg=what)


def run_case(device, camel_fn, torch_fn, arrays, grad_seed=1, check_grads=True):
    """camel_fn and torch_fn on the same inputs: compare the output, then the gradient
    of every input for one finite upstream gradient."""
    xs = [camel.tensor(a, requires_grad=True, device=device) for a in arrays]
    ts = [torch.tensor(a, requires_grad=True) for a in arrays]
    out, tout = camel_fn(*xs), torch_fn(*ts)
    assert_same(out.numpy(), tout.detach().numpy(), f"forward on {device}")
    if not check_grads:
        return
    g = np.random.default_rng(grad_seed).standard_normal(tout.shape).astype(np.float32)
    out.backward(camel.tensor(g, device=device))
    tout.backward(torch.tensor(g))
    for i, (x, t) in enumerate(zip(xs, ts, strict=True)):
        assert_same(x.grad.numpy(), t.grad.numpy(), f"gradient of input {i} on {device}")


def positions(shape):
    """First element, one in the middle, the last one (the float4 tail)."""
    n = math.prod(shape)
    return [0, n // 2, n - 1]


# ---------------------------------------------------------------------------
# elementwise: relu, gelu
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("special", SPECIALS)
@pytest.mark.parametrize("shape", [(1,), (7,), (33,), (3, 257)])
def test_relu(device, special, shape):
    a = with_specials(shape, SPECIALS[special], positions(shape))
    run_case(device, F.relu, torch.relu, [a])


@pytest.mark.parametrize("special", SPECIALS)
def test_relu_unaligned_kernel(special):
    # An operand that is not 16-byte aligned takes the one-element-per-thread kernels.
    if "mps" not in DEVICES:
        pytest.skip("no 'mps' device")
    from camel import backend_mps
    from camel.metal import DeviceArray

    a = with_specials((34,), SPECIALS[special], [1, 17, 33])
    g = np.random.default_rng(2).standard_normal(33).astype(np.float32)
    x = DeviceArray.from_numpy(a)
    x = DeviceArray((33,), np.float32, x.buffer, 4)  # elements 1..33, 4 bytes in
    gd = DeviceArray.from_numpy(np.concatenate([[0], g]).astype(np.float32))
    gd = DeviceArray((33,), np.float32, gd.buffer, 4)
    t = torch.tensor(a[1:], requires_grad=True)
    y = torch.relu(t)
    y.backward(torch.tensor(g))
    assert_same(backend_mps.relu(x).numpy(), y.detach().numpy(), "relu_float")
    assert_same(backend_mps.relu_backward(x, gd).numpy(), t.grad.numpy(), "relu_backward_float")


@pytest.mark.parametrize("special", SPECIALS)
@pytest.mark.parametrize("shape", [(7,), (3, 33)])
def test_gelu(device, special, shape):
    a = with_specials(shape, SPECIALS[special], positions(shape))
    run_case(device, F.gelu, lambda t: torch.nn.functional.gelu(t, approximate="tanh"), [a])


# ---------------------------------------------------------------------------
# reductions: sum, mean, max (values, indices, gradient)
# ---------------------------------------------------------------------------

# (shape, axis): the last axis (one threadgroup per row, rows of 33 and 300), a leading
# axis (one thread per column), and everything (one pass, and two passes past 4096).
REDUCTIONS = [((5, 33), 1), ((3, 300), 1), ((33, 5), 0), ((4, 7, 3), 1), ((7, 33), None),
              ((5000,), None)]  # fmt: skip


@pytest.mark.parametrize("special", SPECIALS)
@pytest.mark.parametrize("shape,axis", REDUCTIONS)
def test_sum_and_mean(device, special, shape, axis):
    a = with_specials(shape, SPECIALS[special], positions(shape))
    dim = {} if axis is None else {"dim": axis}
    run_case(device, lambda x: F.sum(x, axis), lambda t: t.sum(**dim), [a])
    run_case(device, lambda x: F.mean(x, axis), lambda t: t.mean(**dim), [a])


def _max_inputs(shape, axis, case):
    """Inputs for max: two specials in one row/column (the first must win, and the two are
    far apart so different threads see them), a row with one at its last element, the
    rest finite. case "nan+inf": NaN after +inf in the same row (NaN still wins)."""
    a = np.random.default_rng(3).standard_normal(shape).astype(np.float32)
    moved = np.moveaxis(a, 0 if axis is None else axis, -1)  # a view: writes go to a
    lines = moved.reshape(-1, moved.shape[-1]) if axis is not None else a.reshape(1, -1)
    k = lines.shape[-1]
    first, second = (math.inf, math.nan) if case == "nan+inf" else (SPECIALS[case],) * 2
    if axis is None:
        flat = a.reshape(-1)
        flat[k // 3], flat[k - 2] = first, second
        return a
    idx = np.ndindex(*moved.shape[:-1])
    for n, pos in enumerate(idx):
        line = moved[pos]
        if n == 0:
            line[k // 3], line[k - 1] = first, second
        elif n == 1:
            line[k - 1] = second
    return a


@pytest.mark.parametrize("case", ["nan", "+inf", "-inf", "nan+inf"])
@pytest.mark.parametrize("shape,axis", REDUCTIONS)
def test_max_values_indices_and_gradient(device, case, shape, axis):
    a = _max_inputs(shape, axis, case)
    be = camel.tensor(a, device=device).backend
    values, indices = be.max(be.from_numpy(a), axis, False)
    t = torch.tensor(a, requires_grad=True)
    if axis is None:  # torch.max() splits the gradient among ties: follow max(dim) instead
        want_v, want_i = t.max(), torch.argmax(t)
        flat_t = t.reshape(-1)
        chosen = flat_t[want_i]
    else:
        want_v, want_i = t.max(dim=axis)
        chosen = want_v
    assert_same(be.to_numpy(values), want_v.detach().numpy(), f"max values on {device}")
    np.testing.assert_array_equal(be.to_numpy(indices), want_i.numpy(), f"argmax on {device}")

    x = camel.tensor(a, requires_grad=True, device=device)
    out = F.Max.apply(x, axis, False)  # the values only, whatever F.max returns
    g = np.random.default_rng(4).standard_normal(tuple(chosen.shape)).astype(np.float32)
    out.backward(camel.tensor(g, device=device))
    chosen.backward(torch.tensor(g))
    assert_same(x.grad.numpy(), t.grad.numpy(), f"max gradient on {device}")


def test_max_all_minus_inf_rows(device):
    # A row that is -inf everywhere: the value is -inf and the index 0, as torch.
    a = np.full((3, 40), -math.inf, np.float32)
    a[1, 5] = 2.0
    be = camel.tensor(a, device=device).backend
    for axis in (1, 0, None):
        values, indices = be.max(be.from_numpy(a), axis, False)
        t = torch.tensor(a)
        want_v, want_i = (t.max(), torch.argmax(t)) if axis is None else t.max(dim=axis)
        assert_same(be.to_numpy(values), want_v.numpy(), f"axis {axis}")
        np.testing.assert_array_equal(be.to_numpy(indices), want_i.numpy(), f"axis {axis}")


# ---------------------------------------------------------------------------
# softmax family: softmax (plain and causal), log_softmax, cross_entropy
# ---------------------------------------------------------------------------


def _rows_with_specials(shape, value, seed=5):
    """(rows, K): row 0 one special in the middle, row 1 two (first and last), row 2 all
    special, the rest finite."""
    a = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    k = shape[-1]
    a[0, k // 2] = value
    a[1, 0] = a[1, k - 1] = value
    a[2, :] = value
    return a


@pytest.mark.parametrize("special", SPECIALS)
@pytest.mark.parametrize("shape", [(4, 1), (4, 33), (5, 300)])
def test_softmax_and_log_softmax(device, special, shape):
    a = _rows_with_specials(shape, SPECIALS[special])
    run_case(device, F.softmax, lambda t: torch.softmax(t, -1), [a])
    run_case(device, F.log_softmax, lambda t: torch.log_softmax(t, -1), [a])


def _torch_causal_softmax(t):
    rows, cols = t.shape[-2:]
    mask = torch.triu(torch.ones(rows, cols, dtype=torch.bool), 1)
    return torch.softmax(t.masked_fill(mask, -math.inf), -1)


@pytest.mark.parametrize("special", SPECIALS)
@pytest.mark.parametrize("where", ["visible", "masked"])
@pytest.mark.parametrize("shape", [(2, 5, 5), (1, 37, 37), (2, 3, 40)])
def test_causal_softmax(device, special, where, shape):
    # The causal softmax is masked_fill(-inf) then softmax: a special at a masked position
    # changes nothing, one at a visible position acts as in a plain softmax; the gradient
    # at every masked position is exactly 0 (masked_fill's backward).
    a = np.random.default_rng(6).standard_normal(shape).astype(np.float32)
    t_rows = shape[-2]
    for r in range(t_rows):
        col = r // 2 if where == "visible" else r + 1 + r % 3
        if col < shape[-1]:
            a[0, r, col] = SPECIALS[special]
    run_case(device, lambda x: F.Softmax.apply(x, True), _torch_causal_softmax, [a])


@pytest.mark.parametrize("special", SPECIALS)
@pytest.mark.parametrize("where", ["target", "other", "all"])
@pytest.mark.parametrize("shape", [(3, 5), (4, 300)])
def test_cross_entropy(device, special, where, shape):
    n, c = shape
    targets = (np.arange(n) * 7 % c).astype(np.int32)
    a = np.random.default_rng(7).standard_normal(shape).astype(np.float32)
    if where == "target":
        a[0, targets[0]] = SPECIALS[special]
    elif where == "other":
        a[0, (targets[0] + 1) % c] = SPECIALS[special]
        a[n - 1, (targets[n - 1] + c - 1) % c] = SPECIALS[special]
    else:
        a[1, :] = SPECIALS[special]
    tt = torch.tensor(targets.astype(np.int64))
    run_case(device,
             lambda x: F.cross_entropy(x, camel.tensor(targets, device=device)),
             lambda t: torch.nn.functional.cross_entropy(t, tt), [a])  # fmt: skip


# ---------------------------------------------------------------------------
# layer_norm, matmul
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("special", SPECIALS)
@pytest.mark.parametrize("version", [1, 2, 3, 4])
@pytest.mark.parametrize("shape", [(4, 33), (70, 5), (3, 1100)])
def test_layer_norm(device, special, version, shape, monkeypatch):
    # versions: CAMEL_LAYERNORM picks the forward kernel on "mps" (v3 keeps a row in
    # registers: D <= 1024); 70 rows take the blocked dweight / dbias reduction.
    if version == 3 and shape[-1] > 1024:
        pytest.skip("v3 needs D <= 1024")
    config.set_choices(layernorm=str(version))
    d = shape[-1]
    a = _rows_with_specials(shape, SPECIALS[special])
    w = np.random.default_rng(8).standard_normal(d).astype(np.float32)
    b = np.random.default_rng(9).standard_normal(d).astype(np.float32)
    run_case(device, lambda x, w, b: F.layer_norm(x, w, b, 1e-5),
             lambda x, w, b: torch.nn.functional.layer_norm(x, (d,), w, b, 1e-5),
             [a, w, b])  # fmt: skip


@pytest.mark.parametrize("special", SPECIALS)
@pytest.mark.parametrize("where", ["a", "b"])
@pytest.mark.parametrize("shapes", [((7, 33), (33, 31)), ((3, 257), (257, 2)),
                                    ((2, 7, 33), (2, 33, 5)), ((2, 7, 33), (33, 31))])  # fmt: skip
def test_matmul(device, special, where, shapes):
    a = np.random.default_rng(10).standard_normal(shapes[0]).astype(np.float32)
    b = np.random.default_rng(11).standard_normal(shapes[1]).astype(np.float32)
    target = a if where == "a" else b
    target.reshape(-1)[[1, target.size - 1]] = SPECIALS[special]
    run_case(device, F.matmul, torch.matmul, [a, b])


def _rungs():
    from camel import gemm

    return list(gemm.RUNGS)


@pytest.mark.parametrize("special", SPECIALS)
@pytest.mark.parametrize("version", _rungs())
def test_matmul_every_rung(special, version, monkeypatch):
    # Every rung of the GEMM ladder, tiles partly outside the matrix included (67 x 33 x 70).
    if "mps" not in DEVICES:
        pytest.skip("no 'mps' device")
    config.set_choices(matmul=version)
    a = np.random.default_rng(12).standard_normal((67, 33)).astype(np.float32)
    b = np.random.default_rng(13).standard_normal((33, 70)).astype(np.float32)
    a[3, 5], a[66, 32], b[0, 69] = SPECIALS[special], SPECIALS[special], SPECIALS[special]
    run_case("mps", F.matmul, torch.matmul, [a, b])


# ---------------------------------------------------------------------------
# attention: the naive path (four ops) and flash (fused kernels), forward and backward
# ---------------------------------------------------------------------------


def _torch_attention(causal):
    # PyTorch's attention written out (masked_fill(-inf), softmax, matmul): what camel's
    # naive path computes. (torch's own CPU SDPA kernel drops a NaN in q.) Causal, camel
    # never computes dP = dO v^T above the diagonal (camel/gemm.py triangle), so its softmax
    # backward sums the visible pairs only: the torch.where passes no gradient to the
    # masked P (where NaN or inf in v would make torch's whole row NaN). At T = 37 every
    # product is one tile, so P @ v and the other products still read the masked zeros
    # (0 * NaN is NaN there, as in torch); past a tile the GPU skips them.
    def fn(q, k, v):
        s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        if not causal:
            return torch.softmax(s, -1) @ v
        t, n = s.shape[-2:]
        masked = torch.triu(torch.ones(t, n, dtype=torch.bool), 1)
        p = torch.softmax(s.masked_fill(masked, -math.inf), -1)
        return torch.where(~masked, p, p.detach()) @ v

    return fn


def _attention_inputs(shape, which, special, pos):
    q, k, v = (np.random.default_rng(20 + i).standard_normal(shape).astype(np.float32) * 0.5
               for i in range(3))  # fmt: skip
    dict(q=q, k=k, v=v)[which][0, 0, pos, 1] = SPECIALS[special]
    return q, k, v


def _visible_pairs_attention(q, k, v, dout):
    """Causal attention in float64 NumPy where a masked (query, key) pair contributes
    nothing at all, forward and backward: what the mask means, and what camel's flash
    kernels compute, whatever the block size (they skip fully masked key blocks, and add
    P @ V pair by pair once a NaN or inf is about). The naive composition (camel's naive
    path, torch's math path) differs only through 0 * NaN and 0 * inf: a masked zero of P
    meeting a NaN of V in P @ V, or a masked zero of dS meeting a NaN of q or k; torch's
    fused SDPA kernels land in between. Returns out, dq, dk, dv."""
    q, k, v, dout = (x.astype(np.float64) for x in (q, k, v, dout))
    t, n = q.shape[-2], k.shape[-2]
    vis = ~np.triu(np.ones((t, n), bool), 1)  # (T, S)
    scale = 1 / math.sqrt(q.shape[-1])

    def pairsum(w, x):  # sum over visible s of w[..., t, s] * x[..., s, :]
        return np.where(vis[..., None], w[..., None] * x[..., None, :, :], 0).sum(-2)

    def pairsum_t(w, x):  # sum over visible t of w[..., t, s] * x[..., t, :]
        return np.where(vis[..., None], w[..., None] * x[..., :, None, :], 0).sum(-3)

    s = np.where(vis, q @ np.swapaxes(k, -1, -2) * scale, -np.inf)
    e = np.where(vis, np.exp(s - s.max(-1, keepdims=True)), 0)
    p = np.where(vis, e / e.sum(-1, keepdims=True), 0)
    out = pairsum(p, v)
    dp = dout @ np.swapaxes(v, -1, -2)
    ds = np.where(vis, p * (dp - (dout * out).sum(-1, keepdims=True)), 0)
    return out, pairsum(ds, k) * scale, pairsum_t(ds, q) * scale, pairsum_t(p, dout)


@pytest.mark.parametrize("special", SPECIALS)
@pytest.mark.parametrize("which", ["q", "k", "v"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mode", ["naive", "flash"])
def test_attention(device, special, which, causal, mode, monkeypatch):
    # naive: the four ops, against the same composition in torch. flash, not causal: the
    # same reference (no masked pairs). flash, causal: see _visible_pairs_attention.
    if mode == "flash" and device != "mps":
        pytest.skip("flash attention runs on 'mps'")
    config.set_choices(attention=mode)
    shape = (1, 2, 37, 32)  # T = 37: one partial block of queries and keys
    q, k, v = _attention_inputs(shape, which, special, pos=20)
    if not (mode == "flash" and causal):
        run_case(device, lambda q, k, v: F.scaled_dot_product_attention(q, k, v, causal=causal),
                 _torch_attention(causal), [q, k, v])  # fmt: skip
        return
    xs = [camel.tensor(a, requires_grad=True, device=device) for a in (q, k, v)]
    out = F.scaled_dot_product_attention(*xs, causal=True)
    g = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    out.backward(camel.tensor(g, device=device))
    want = _visible_pairs_attention(q, k, v, g)
    assert_same(out.numpy(), want[0], "flash forward")
    for name, x, w in zip("qkv", xs, want[1:], strict=True):
        assert_same(x.grad.numpy(), w, f"flash d{name}")


# ---------------------------------------------------------------------------
# optimisers
# ---------------------------------------------------------------------------

OPTIMISERS = {
    "sgd": (lambda p: optim.SGD(p, lr=0.1), lambda p: torch.optim.SGD(p, lr=0.1)),
    "sgd_wd": (lambda p: optim.SGD(p, lr=0.1, weight_decay=0.01),
               lambda p: torch.optim.SGD(p, lr=0.1, weight_decay=0.01)),
    "sgd_momentum": (lambda p: optim.SGD(p, lr=0.1, momentum=0.9),
                     lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9)),
    "sgd_momentum_wd": (lambda p: optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.01),
                        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.01)),
    "adam": (lambda p: optim.Adam(p, lr=0.01), lambda p: torch.optim.Adam(p, lr=0.01)),
    "adam_wd": (lambda p: optim.Adam(p, lr=0.01, weight_decay=0.01),
                lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=0.01)),
}  # fmt: skip


@pytest.mark.parametrize("special", SPECIALS)
@pytest.mark.parametrize("where", ["param", "grad"])
@pytest.mark.parametrize("name", OPTIMISERS)
def test_optimisers(device, special, where, name):
    # Two steps; the special sits in the parameter (an inf parameter with weight decay 0
    # must stay inf: PyTorch skips the decay term, so inf * 0 never appears) or in the
    # first step's gradient.
    make, make_torch = OPTIMISERS[name]
    p0 = np.random.default_rng(30).standard_normal(37).astype(np.float32)
    grads = [np.random.default_rng(31 + s).standard_normal(37).astype(np.float32)
             for s in range(2)]  # fmt: skip
    target = p0 if where == "param" else grads[0]
    target[[0, 18, 36]] = SPECIALS[special]
    p = camel.nn.Parameter(camel.tensor(p0, device=device))
    tp = torch.nn.Parameter(torch.tensor(p0))
    opt, topt = make([p]), make_torch([tp])
    for s, g in enumerate(grads):
        p.grad = camel.tensor(g, device=device)
        tp.grad = torch.tensor(g)
        opt.step()
        topt.step()
        assert_same(p.numpy(), tp.detach().numpy(), f"{name} step {s + 1} on {device}")


def test_visible_pairs_reference_is_torch_without_specials():
    # The causal reference above equals torch's attention (forward and backward) on finite
    # inputs, where 0 * x is always 0.
    q, k, v = (np.random.default_rng(40 + i).standard_normal((2, 2, 9, 8)).astype(np.float32)
               for i in range(3))  # fmt: skip
    g = np.random.default_rng(44).standard_normal((2, 2, 9, 8)).astype(np.float32)
    ts = [torch.tensor(a, requires_grad=True) for a in (q, k, v)]
    out = _torch_attention(True)(*ts)
    out.backward(torch.tensor(g))
    want = [out.detach().numpy()] + [t.grad.numpy() for t in ts]
    for got, w in zip(_visible_pairs_attention(q, k, v, g), want, strict=True):
        assert_same(got, w, "reference")


def _flash_rungs():
    from camel import flash

    return [n for n in flash.names() if n != "flash_v6"]


@pytest.mark.parametrize("rung", _flash_rungs())
@pytest.mark.parametrize("case", [("k", "nan", False), ("v", "+inf", False), ("q", "-inf", True),
                                  ("v", "nan", True), ("k", "+inf", True)])  # fmt: skip
def test_flash_every_rung(rung, case):
    # Every rung of the flash ladder (each one changes one idea of the same kernel), at
    # head dim 64 and T = 70: two query tiles, a partial key block; causal against the
    # visible-pairs reference (the first query tile skips the key block holding row 41,
    # and in the partly masked block a masked pair must add nothing).
    if "mps" not in DEVICES:
        pytest.skip("no 'mps' device")
    from camel import flash

    which, special, causal = case
    q, k, v = _attention_inputs((1, 1, 70, 64), which, special, pos=41)
    qd, kd, vd = (camel.tensor(a, device="mps") for a in (q, k, v))
    out, _ = flash.forward(qd.storage, kd.storage, vd.storage, causal, rung=rung)
    if causal:
        want = _visible_pairs_attention(q, k, v, np.zeros_like(q))[0]
    else:
        want = _torch_attention(False)(*(torch.tensor(a) for a in (q, k, v))).numpy()
    assert_same(out.numpy(), want, f"{rung} forward")


@pytest.mark.parametrize("kind", ["rows", "tiled"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("which", ["q", "k", "v"])
@pytest.mark.parametrize("special", SPECIALS)
def test_flash_backward_kinds(kind, causal, which, special):
    # Both backward kernels (one thread per row; rows shared through threadgroup memory),
    # T = 70 (two threadgroups of 64 rows, the second partial), against the reference that
    # the attention test uses (non-causal: no masked pairs, so it is torch's formula).
    if "mps" not in DEVICES:
        pytest.skip("no 'mps' device")
    from camel import flash

    shape = (1, 1, 70, 32)
    q, k, v = _attention_inputs(shape, which, special, pos=41)
    g = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    qd, kd, vd, gd = (camel.tensor(a, device="mps").storage for a in (q, k, v, g))
    if causal:
        want = _visible_pairs_attention(q, k, v, g)
    else:
        ts = [torch.tensor(a, requires_grad=True) for a in (q, k, v)]
        out = _torch_attention(False)(*ts)
        out.backward(torch.tensor(g))
        want = [out.detach().numpy()] + [t.grad.numpy() for t in ts]
    out, lse = flash.forward(qd, kd, vd, causal)
    assert_same(out.numpy(), want[0], "forward")
    grads = flash.backward(qd, kd, vd, out, lse, gd, causal, kind=kind)
    for name, got, w in zip("qkv", grads, want[1:], strict=True):
        assert_same(got.numpy(), w, f"{kind} d{name}")


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mode", ["naive", "flash"])
def test_attention_row_of_minus_inf_scores(device, mode, causal, monkeypatch):
    # Query row 5 scores -inf against every key: its softmax is NaN (PyTorch's softmax of
    # all -inf), and only that row: flash's 1 / l is 1 / 0 there, not a padding row's 0.
    if mode == "flash" and device != "mps":
        pytest.skip("flash attention runs on 'mps'")
    config.set_choices(attention=mode)
    q, k, v = _attention_inputs((1, 1, 37, 32), "q", "nan", pos=0)
    q[0, 0, 0, 1] = 0.5
    k[..., 0] = np.abs(k[..., 0]) + 0.1
    q[0, 0, 5, :] = 0.0
    q[0, 0, 5, 0] = -math.inf
    x = [camel.tensor(a, device=device) for a in (q, k, v)]
    out = F.scaled_dot_product_attention(*x, causal=causal).numpy()
    want = _torch_attention(causal)(*(torch.tensor(a) for a in (q, k, v))).numpy()
    assert np.isnan(want[0, 0, 5]).all() and not np.isnan(np.delete(want, 5, axis=2)).any()
    assert_same(out, want, f"{mode} forward")
