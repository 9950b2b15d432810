"""Every differentiable op, forward and backward, on every available device:

1. forward against a NumPy formula written out here (independent of camel's backend),
2. backward against camel.gradcheck (central differences),
3. forward and backward against PyTorch, when it is installed,

at awkward sizes (1, 7, 31, 33, 257). The cases are one table, so adding an op
is one line.
"""

import math

import numpy as np
import pytest
from conftest import DEVICES

import camel
import camel.functional as F

# ---------------------------------------------------------------------------
# NumPy references (float64 where it matters, written for clarity not speed)
# ---------------------------------------------------------------------------


def np_gelu(x):
    x = x.astype(np.float64)
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def np_softmax(x, axis=-1):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def np_log_softmax(x, axis=-1):
    m = x.max(axis=axis, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=axis, keepdims=True))


def np_cross_entropy(logits, targets):
    lp = np_log_softmax(logits.astype(np.float64))
    return -lp[np.arange(len(targets)), targets].mean()


def np_layer_norm(x, w, b, eps=1e-5):
    x = x.astype(np.float64)
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def np_attention(q, k, v, causal):
    s = q.astype(np.float64) @ np.swapaxes(k, -1, -2) / math.sqrt(q.shape[-1])
    if causal:
        t, n = s.shape[-2:]
        s = np.where(np.triu(np.ones((t, n), bool), 1), -np.inf, s)
    return np_softmax(s) @ v


# ---------------------------------------------------------------------------
# the table: name -> (camel fn, numpy fn, torch fn name-or-fn, input shapes)
# Inputs are float32 normal samples unless the case says otherwise.
# ---------------------------------------------------------------------------


def _torch():
    return pytest.importorskip("torch")


def _tgelu(x):
    return _torch().nn.functional.gelu(x, approximate="tanh")


def _tsdpa(causal):
    def fn(q, k, v):
        return _torch().nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)

    return fn


CASES = {
    # elementwise
    "add": (F.add, np.add, lambda a, b: a + b, [(7, 33), (7, 33)]),
    "add_suffix_1d": (F.add, np.add, lambda a, b: a + b, [(2, 7, 33), (33,)]),
    "add_suffix_2d": (F.add, np.add, lambda a, b: a + b, [(2, 7, 31), (7, 31)]),
    "add_suffix_left": (F.add, np.add, lambda a, b: a + b, [(31,), (3, 31)]),
    "add_scalar_shape": (F.add, np.add, lambda a, b: a + b, [(7, 5), ()]),
    "add_1": (F.add, np.add, lambda a, b: a + b, [(1,), (1,)]),
    "mul": (F.mul, np.multiply, lambda a, b: a * b, [(257,), (257,)]),
    "mul_suffix": (F.mul, np.multiply, lambda a, b: a * b, [(3, 7, 33), (33,)]),
    "sub": (lambda a, b: a - b, np.subtract, lambda a, b: a - b, [(7, 31), (31,)]),
    "neg": (lambda a: -a, np.negative, lambda a: -a, [(33,)]),
    "add_py": (lambda a: a + 2.5, lambda a: a + 2.5, lambda a: a + 2.5, [(7, 3)]),
    "radd_py": (lambda a: 2.5 + a, lambda a: a + 2.5, lambda a: 2.5 + a, [(7,)]),
    "rsub_py": (lambda a: 1.0 - a, lambda a: 1.0 - a, lambda a: 1.0 - a, [(7,)]),
    "mul_py": (lambda a: a * -3.0, lambda a: a * -3.0, lambda a: a * -3.0, [(31,)]),
    "rmul_py": (lambda a: 3 * a, lambda a: 3 * a, lambda a: 3 * a, [(31,)]),
    "div_py": (lambda a: a / 4.0, lambda a: a / 4.0, lambda a: a / 4.0, [(2, 33)]),
    "relu": (F.relu, lambda x: np.maximum(x, 0), lambda x: x.relu(), [(257,)]),
    "relu_2d": (lambda x: x.relu(), lambda x: np.maximum(x, 0), lambda x: x.relu(), [(7, 33)]),
    "gelu": (F.gelu, np_gelu, _tgelu, [(7, 33)]),
    "gelu_1": (lambda x: x.gelu(), np_gelu, _tgelu, [(1,)]),
    # reductions
    "sum_all": (F.sum, np.sum, lambda x: x.sum(), [(7, 33)]),
    "sum_axis0": (lambda x: F.sum(x, 0), lambda x: x.sum(0), lambda x: x.sum(0), [(31, 7)]),
    "sum_last_keep": (
        lambda x: x.sum(-1, keepdims=True),
        lambda x: x.sum(-1, keepdims=True),
        lambda x: x.sum(-1, keepdim=True),
        [(2, 7, 33)],
    ),
    "sum_tuple": (
        lambda x: x.sum((0, 2)),
        lambda x: x.sum((0, 2)),
        lambda x: x.sum((0, 2)),
        [(3, 7, 5)],
    ),
    "sum_all_keep": (
        lambda x: x.sum(keepdims=True),
        lambda x: x.sum(keepdims=True),
        lambda x: x.sum((0, 1), keepdim=True),
        [(3, 7)],
    ),
    "mean_all": (F.mean, np.mean, lambda x: x.mean(), [(257,)]),
    "mean_axis": (lambda x: x.mean(1), lambda x: x.mean(1), lambda x: x.mean(1), [(3, 31, 2)]),
    "max_all": (F.max, np.max, lambda x: x.max(), [(7, 33)]),
    "max_last": (
        lambda x: x.max(-1).values,
        lambda x: x.max(-1),
        lambda x: x.max(-1).values,
        [(31, 7)],
    ),
    "max_axis0_keep": (
        lambda x: F.max(x, 0, keepdims=True).values,
        lambda x: x.max(0, keepdims=True),
        lambda x: x.max(0, keepdim=True).values,
        [(7, 3, 5)],
    ),
    # softmax family
    "softmax": (F.softmax, np_softmax, lambda x: x.softmax(-1), [(7, 33)]),
    "softmax_axis0": (
        lambda x: x.softmax(0),
        lambda x: np_softmax(x, 0),
        lambda x: x.softmax(0),
        [(7, 5)],
    ),
    "softmax_1": (F.softmax, np_softmax, lambda x: x.softmax(-1), [(3, 1)]),
    "log_softmax": (F.log_softmax, np_log_softmax, lambda x: x.log_softmax(-1), [(2, 7, 31)]),
    "log_softmax_axis1": (
        lambda x: x.log_softmax(1),
        lambda x: np_log_softmax(x, 1),
        lambda x: x.log_softmax(1),
        [(2, 7, 3)],
    ),
    # matmul
    "matmul": (F.matmul, np.matmul, lambda a, b: a @ b, [(7, 33), (33, 31)]),
    "matmul_1": (F.matmul, np.matmul, lambda a, b: a @ b, [(1, 1), (1, 1)]),
    "matmul_k257": (lambda a, b: a @ b, np.matmul, lambda a, b: a @ b, [(3, 257), (257, 2)]),
    "matmul_3d": (F.matmul, np.matmul, lambda a, b: a @ b, [(2, 7, 33), (2, 33, 5)]),
    "matmul_4d": (F.matmul, np.matmul, lambda a, b: a @ b, [(2, 3, 7, 5), (2, 3, 5, 31)]),
    "matmul_3d_2d": (F.matmul, np.matmul, lambda a, b: a @ b, [(2, 7, 33), (33, 31)]),
    "matmul_4d_2d": (F.matmul, np.matmul, lambda a, b: a @ b, [(2, 2, 3, 7), (7, 5)]),
    "linear": (
        lambda x, w, b: x @ w.T + b,
        lambda x, w, b: x @ w.T + b,
        lambda x, w, b: x @ w.T + b,
        [(2, 7, 33), (31, 33), (31,)],
    ),
    # F.linear itself: one node of the tape (functional.Linear), 3-D and 4-D inputs
    "linear_fn": (
        F.linear,
        lambda x, w, b: x @ w.T + b,
        lambda x, w, b: x @ w.T + b,
        [(2, 7, 33), (31, 33), (31,)],
    ),
    "linear_fn_no_bias": (
        F.linear,
        lambda x, w: x @ w.T,
        lambda x, w: x @ w.T,
        [(2, 3, 5, 9), (4, 9)],
    ),
    # layout
    "reshape": (
        lambda x: x.reshape(7, -1) * 2.0,
        lambda x: x.reshape(7, -1) * 2.0,
        lambda x: x.reshape(7, -1) * 2.0,
        [(7, 3, 11)],
    ),
    "transpose": (
        lambda x: x.transpose(0, 2),
        lambda x: x.transpose(2, 1, 0),
        lambda x: x.transpose(0, 2),
        [(2, 7, 33)],
    ),
    "T": (lambda x: x.T, lambda x: x.T, lambda x: x.T, [(7, 33)]),
    "permute": (
        lambda x: x.permute(1, 3, 0, 2),
        lambda x: x.transpose(1, 3, 0, 2),
        lambda x: x.permute(1, 3, 0, 2),
        [(2, 3, 7, 5)],
    ),
    "getitem_int": (lambda x: x[3], lambda x: x[3], lambda x: x[3], [(7, 33)]),
    # a view at byte offset 2 * 35 * 4 = 280: not 16-aligned, so float4 kernels after it
    # must take their one-element path
    "packed_part": (lambda x: F.packed_part(x, 2), lambda x: x[2], lambda x: x[2], [(3, 5, 7)]),
    "getitem_neg": (lambda x: x[-1, 2:], lambda x: x[-1, 2:], lambda x: x[-1, 2:], [(7, 33)]),
    "getitem_step": (
        lambda x: x[1::2, ::3],
        lambda x: x[1::2, ::3],
        lambda x: x[1::2, ::3],
        [(7, 33)],
    ),
    "getitem_ellipsis": (
        lambda x: x[..., :-1],
        lambda x: x[..., :-1],
        lambda x: x[..., :-1],
        [(2, 3, 31)],
    ),
    "getitem_reverse": (
        lambda x: x[::-2],
        lambda x: x[::-2],
        lambda x: x.flip(0)[::2],
        [(7, 5)],
    ),
    # normalisation, attention
    "layer_norm": (F.layer_norm, np_layer_norm, None, [(2, 7, 33), (33,), (33,)]),
    "layer_norm_1": (F.layer_norm, np_layer_norm, None, [(5, 1), (1,), (1,)]),
    "sdpa": (
        lambda q, k, v: F.scaled_dot_product_attention(q, k, v),
        lambda q, k, v: np_attention(q, k, v, False),
        _tsdpa(False),
        [(2, 3, 7, 5), (2, 3, 7, 5), (2, 3, 7, 4)],
    ),
    "sdpa_causal": (
        lambda q, k, v: F.scaled_dot_product_attention(q, k, v, causal=True),
        lambda q, k, v: np_attention(q, k, v, True),
        _tsdpa(True),
        [(1, 2, 9, 4), (1, 2, 9, 4), (1, 2, 9, 3)],
    ),
}


def _inputs(name, rng):
    arrays = [rng.standard_normal(s).astype(np.float32) for s in CASES[name][3]]
    if name.startswith("relu"):  # keep away from the kink at 0, where differences lie
        arrays = [np.sign(a) * (0.1 + np.abs(a)) for a in arrays]
    if name.startswith("layer_norm") and arrays[0].shape[-1] > 1:
        arrays[1] = 1 + 0.5 * arrays[1]  # a weight around 1, as after init
    return [a.astype(np.float32) for a in arrays]


def _torch_fn(name):
    fn = CASES[name][2]
    if name.startswith("layer_norm"):

        def fn(x, w, b):
            return _torch().nn.functional.layer_norm(x, (x.shape[-1],), w, b, 1e-5)

    return fn


@pytest.mark.parametrize("name", sorted(CASES))
def test_forward_matches_numpy(name, device, rng):
    fn, np_fn, _, _ = CASES[name]
    arrays = _inputs(name, rng)
    out = fn(*[camel.tensor(a, device=device) for a in arrays])
    want = np.asarray(np_fn(*arrays))
    assert out.shape == want.shape
    assert out.dtype == np.float32
    np.testing.assert_allclose(out.numpy(), want, rtol=1e-5, atol=1e-5)


def _numel(name):
    return sum(math.prod(shape) for shape in CASES[name][3])


# Finite differences cost two forward passes per input element: cheap in NumPy,
# slow on the simulator. On "mps" gradcheck runs the small cases only; every case
# is compared with the CPU result by test_mps_matches_cpu.
GRADCHECK_PARAMS = [
    (device, name)
    for device in DEVICES
    for name in sorted(CASES)
    if device == "cpu" or _numel(name) <= 300
]


@pytest.mark.parametrize("device, name", GRADCHECK_PARAMS)
def test_backward_gradcheck(name, device, rng):
    fn = CASES[name][0]
    inputs = [camel.tensor(a, requires_grad=True, device=device) for a in _inputs(name, rng)]
    assert camel.gradcheck(fn, inputs)


@pytest.mark.parametrize("name", sorted(CASES))
def test_forward_backward_match_torch(name, device, rng):
    torch = _torch()
    if name == "layer_norm_1":
        pytest.skip("D = 1: x - mean is exactly 0 here, torch's dweight is rounding noise")
    fn = CASES[name][0]
    arrays = _inputs(name, rng)
    xs = [camel.tensor(a, requires_grad=True, device=device) for a in arrays]
    out = fn(*xs)
    g = rng.standard_normal(out.shape).astype(np.float32)
    out.backward(camel.tensor(g, device=device))

    ts = [torch.tensor(a, requires_grad=True) for a in arrays]
    t_out = _torch_fn(name)(*ts)
    t_out.backward(torch.tensor(g))
    np.testing.assert_allclose(out.numpy(), t_out.detach().numpy(), rtol=1e-5, atol=1e-5)
    for x, t in zip(xs, ts, strict=True):
        np.testing.assert_allclose(x.grad.numpy(), t.grad.numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", sorted(CASES) if "mps" in DEVICES else [])
def test_mps_matches_cpu(name, rng):
    # The contract of the narrow waist: both backends agree op by op, forward and backward.
    fn = CASES[name][0]
    arrays = _inputs(name, rng)
    results = {}
    for device in ("cpu", "mps"):
        xs = [camel.tensor(a, requires_grad=True, device=device) for a in arrays]
        out = fn(*xs)
        g = np.linspace(-1, 1, out.numel(), dtype=np.float32).reshape(out.shape)
        out.backward(camel.tensor(g, device=device))
        results[device] = [out.numpy()] + [x.grad.numpy() for x in xs]
    for cpu, mps in zip(results["cpu"], results["mps"], strict=True):
        np.testing.assert_allclose(mps, cpu, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------
# ops with integer inputs: cross_entropy and embedding
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("n, c", [(1, 1), (31, 7), (33, 257)])
def test_cross_entropy(n, c, device, rng):
    logits = rng.standard_normal((n, c)).astype(np.float32) * 3
    targets = rng.integers(0, c, size=n).astype(np.int32)
    x = camel.tensor(logits, requires_grad=True, device=device)
    y = camel.tensor(targets, device=device)
    loss = F.cross_entropy(x, y)
    assert loss.shape == ()
    np.testing.assert_allclose(loss.item(), np_cross_entropy(logits, targets), rtol=1e-5)
    loss.backward()
    onehot = np.eye(c)[targets]
    np.testing.assert_allclose(
        x.grad.numpy(), (np_softmax(logits.astype(np.float64)) - onehot) / n, atol=1e-6
    )
    if n * c <= 300:
        assert camel.gradcheck(F.cross_entropy, [x, y])


def test_cross_entropy_is_stable_for_huge_logits(device):
    logits = camel.tensor([[1000.0, 0.0, -1000.0], [0.0, 1e4, 0.0]], device=device)
    loss = F.cross_entropy(logits, camel.tensor([0, 1], device=device))
    assert np.isfinite(loss.item()) and abs(loss.item()) < 1e-6


def test_cross_entropy_matches_torch(device, rng):
    torch = _torch()
    logits = rng.standard_normal((31, 33)).astype(np.float32)
    targets = rng.integers(0, 33, size=31)
    x = camel.tensor(logits, requires_grad=True, device=device)
    loss = F.cross_entropy(x, camel.tensor(targets, device=device))
    loss.backward()
    tx = torch.tensor(logits, requires_grad=True)
    tl = torch.nn.functional.cross_entropy(tx, torch.tensor(targets))
    tl.backward()
    np.testing.assert_allclose(loss.item(), tl.item(), rtol=1e-5)
    np.testing.assert_allclose(x.grad.numpy(), tx.grad.numpy(), atol=1e-6)


@pytest.mark.parametrize("idx_shape, v, d", [((1,), 1, 1), ((33,), 7, 31), ((2, 33), 31, 7)])
def test_embedding(idx_shape, v, d, device, rng):
    idx = rng.integers(0, v, size=idx_shape).astype(np.int32)
    weight = rng.standard_normal((v, d)).astype(np.float32)
    w = camel.tensor(weight, requires_grad=True, device=device)
    out = F.embedding(camel.tensor(idx, device=device), w)
    np.testing.assert_array_equal(out.numpy(), weight[idx])
    g = rng.standard_normal(out.shape).astype(np.float32)
    out.backward(camel.tensor(g, device=device))
    want = np.zeros((v, d))
    for i, row in zip(idx.reshape(-1), g.reshape(-1, d), strict=True):
        want[i] += row  # repeated indices accumulate
    np.testing.assert_allclose(w.grad.numpy(), want, rtol=1e-5, atol=1e-6)
    if w.numel() <= 300:
        assert camel.gradcheck(F.embedding, [camel.tensor(idx, device=device), w])


def test_embedding_matches_torch(device, rng):
    torch = _torch()
    idx = rng.integers(0, 31, size=(2, 33))
    weight = rng.standard_normal((31, 7)).astype(np.float32)
    w = camel.tensor(weight, requires_grad=True, device=device)
    out = F.embedding(camel.tensor(idx, device=device), w)
    out.sum().backward()
    tw = torch.tensor(weight, requires_grad=True)
    torch.nn.functional.embedding(torch.tensor(idx), tw).sum().backward()
    np.testing.assert_allclose(w.grad.numpy(), tw.grad.numpy(), atol=1e-6)


# ---------------------------------------------------------------------------
# semantics worth a test of their own
# ---------------------------------------------------------------------------


def test_max_gradient_goes_to_first_of_tied_maxima(device):
    x = camel.tensor([[1.0, 3.0, 3.0], [2.0, 2.0, 0.0]], requires_grad=True, device=device)
    x.max(-1).values.sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), [[0, 1, 0], [1, 0, 0]])
    y = camel.tensor([5.0, 1.0, 5.0], requires_grad=True, device=device)
    y.max().backward()
    np.testing.assert_array_equal(y.grad.numpy(), [1, 0, 0])


def test_causal_softmax_masks_the_future(device, rng):
    q = camel.tensor(rng.standard_normal((1, 1, 4, 3)).astype(np.float32), device=device)
    v = camel.tensor(np.eye(4, dtype=np.float32).reshape(1, 1, 4, 4), device=device)
    out = F.scaled_dot_product_attention(q, q, v, causal=True).numpy()[0, 0]  # = attention
    np.testing.assert_array_equal(np.triu(out, 1), 0)
    np.testing.assert_allclose(out.sum(-1), 1, rtol=1e-6)
    assert out[0, 0] == 1  # the first query sees only itself


def test_gelu_is_the_tanh_approximation(device):
    x = camel.tensor([-3.0, -1.0, 0.0, 0.5, 2.0], device=device)
    np.testing.assert_allclose(F.gelu(x).numpy(), np_gelu(x.numpy()), rtol=1e-6, atol=1e-7)
    exact = 0.5 * 2.0 * (1 + math.erf(2.0 / math.sqrt(2)))
    assert abs(F.gelu(x).numpy()[-1] - exact) > 1e-5  # not the erf form


def test_slicing_an_int_tensor_keeps_int32(device):
    tokens = camel.arange(10, device=device).reshape(2, 5)
    x, y = tokens[:, :-1], tokens[:, 1:]
    assert x.dtype == np.int32 and x.tolist() == [[0, 1, 2, 3], [5, 6, 7, 8]]
    assert y.reshape(-1).tolist() == [1, 2, 3, 4, 6, 7, 8, 9]


def test_layer_norm_matches_torch_at_gpt_shape(device, rng):
    torch = _torch()
    x = rng.standard_normal((4, 33, 64)).astype(np.float32) * 3 + 1
    w = rng.standard_normal(64).astype(np.float32)
    b = rng.standard_normal(64).astype(np.float32)
    xs = [camel.tensor(a, requires_grad=True, device=device) for a in (x, w, b)]
    out = F.layer_norm(*xs)
    g = rng.standard_normal(out.shape).astype(np.float32)
    out.backward(camel.tensor(g, device=device))
    ts = [torch.tensor(a, requires_grad=True) for a in (x, w, b)]
    t_out = torch.nn.functional.layer_norm(ts[0], (64,), ts[1], ts[2], 1e-5)
    t_out.backward(torch.tensor(g))
    np.testing.assert_allclose(out.numpy(), t_out.detach().numpy(), atol=1e-5)
    for c, t in zip(xs, ts, strict=True):
        np.testing.assert_allclose(c.grad.numpy(), t.grad.numpy(), rtol=1e-4, atol=1e-4)


def test_packed_part_is_a_view_and_runs_no_kernel(device):
    """F.packed_part(x, i) is x[i] without a copy: x's storage at an offset, no dispatch;
    ops after it read the right elements at any offset (here 4 * 37 bytes: float4 kernels
    must notice the misalignment)."""
    a = np.arange(3 * 37, dtype=np.float32).reshape(3, 37)
    x = camel.tensor(a, device=device)
    with camel.profile() as prof:
        parts = [F.packed_part(x, i) for i in range(3)]
    assert prof.events == []
    for i, part in enumerate(parts):
        np.testing.assert_array_equal(part.numpy(), a[i])
        np.testing.assert_array_equal((part + part).numpy(), 2 * a[i])
        assert np.shares_memory(part.numpy(), x.numpy())
    with pytest.raises(IndexError, match=r"part 3 of a tensor of shape \(3, 37\)"):
        F.packed_part(x, 3)
