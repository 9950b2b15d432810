"""PyTorch's names with PyTorch's meaning (issue 10, part 5), on every device:

- dim= / keepdim= wherever axis= / keepdims= work; x.max(dim) is (values, indices);
  argmax; size(), dim(), t(), numel(), unsqueeze / squeeze / flatten;
- never a silently different meaning: == is an error (not identity), .numpy() of a
  tensor the graph depends on is read-only;
- where camel lacks a PyTorch name, the error says so and names what to use.

Each case is checked against PyTorch (CPU) and NumPy.
"""

import operator
import re

import numpy as np
import pytest

import camel
import camel.functional as F

torch = pytest.importorskip("torch")


def _pair(rng, shape, device, requires_grad=False):
    x = rng.standard_normal(shape).astype(np.float32)
    return x, camel.tensor(x, requires_grad=requires_grad, device=device)


def _close(got, want, atol=1e-5):
    want = want.detach().numpy() if isinstance(want, torch.Tensor) else np.asarray(want)
    got = got.numpy() if isinstance(got, camel.Tensor) else np.asarray(got)
    assert got.shape == want.shape, (got.shape, want.shape)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=atol)


# ---------------------------------------------------------------------------
# dim= / keepdim=
# ---------------------------------------------------------------------------

REDUCTIONS = [
    ("sum", dict(dim=1), dict(dim=1)),
    ("sum", dict(dim=-1, keepdim=True), dict(dim=-1, keepdim=True)),
    ("sum", dict(dim=(0, 2)), dict(dim=(0, 2))),
    ("mean", dict(dim=0, keepdim=True), dict(dim=0, keepdim=True)),
    ("mean", dict(dim=(1, 2)), dict(dim=(1, 2))),
    ("softmax", dict(dim=1), dict(dim=1)),
    ("log_softmax", dict(dim=0), dict(dim=0)),
]


@pytest.mark.parametrize("op, kw, tkw", REDUCTIONS)
def test_dim_keepdim_tensor_methods(device, rng, op, kw, tkw):
    x, t = _pair(rng, (3, 7, 33), device, requires_grad=True)
    tx = torch.tensor(x, requires_grad=True)
    got, want = getattr(t, op)(**kw), getattr(tx, op)(**tkw)
    _close(got, want)
    g = rng.standard_normal(want.shape).astype(np.float32)
    got.backward(camel.tensor(g, device=device))
    want.backward(torch.tensor(g))
    _close(t.grad, tx.grad)


@pytest.mark.parametrize("op, kw, tkw", REDUCTIONS)
def test_dim_keepdim_functional(device, rng, op, kw, tkw):
    x, t = _pair(rng, (3, 7, 33), device)
    _close(getattr(F, op)(t, **kw), getattr(torch, op)(torch.tensor(x), **tkw))


def test_axis_and_dim_together_is_an_error(device, rng):
    _, t = _pair(rng, (2, 3), device)
    with pytest.raises(TypeError, match=r"\[sum\] got both axis=0 and dim=1"):
        t.sum(0, dim=1)
    with pytest.raises(TypeError, match=r"\[mean\] got both keepdims and keepdim"):
        t.mean(1, keepdims=True, keepdim=True)


def test_numpy_names_still_work(device, rng):
    x, t = _pair(rng, (4, 5), device)
    _close(t.sum(axis=1, keepdims=True), x.sum(axis=1, keepdims=True))
    _close(t.mean(axis=0), x.mean(axis=0))
    _close(t.softmax(axis=0), torch.tensor(x).softmax(0))


# ---------------------------------------------------------------------------
# max(dim) -> (values, indices), argmax
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape, dim, keepdim",
    [((31, 7), 1, False), ((7, 3, 33), 0, True), ((2, 5, 257), -1, False), ((1,), 0, True)],
)
def test_max_dim_returns_values_and_indices(device, rng, shape, dim, keepdim):
    x, t = _pair(rng, shape, device, requires_grad=True)
    tx = torch.tensor(x, requires_grad=True)
    got, want = t.max(dim, keepdim=keepdim), tx.max(dim, keepdim=keepdim)
    values, indices = got  # unpacks like PyTorch's
    assert type(got).__name__ == "MaxResult" and got.values is values
    _close(values, want.values)
    assert indices.dtype == np.int32
    np.testing.assert_array_equal(indices.numpy(), want.indices.numpy())
    values.sum().backward()
    want.values.sum().backward()
    _close(t.grad, tx.grad)


def test_max_forms(device, rng):
    x, t = _pair(rng, (6, 9), device)
    tx = torch.tensor(x)
    _close(t.max(), tx.max())  # no dim: one value, a tensor
    _close(F.max(t, dim=0).values, torch.max(tx, dim=0).values)
    _close(t.max(axis=1).values, tx.max(axis=1).values)  # torch takes axis= too
    _, pred = t.max(1)  # the PyTorch idiom that silently unpacked values before
    np.testing.assert_array_equal(pred.numpy(), tx.max(1).indices.numpy())


def test_max_result_teaches(device, rng):
    _, t = _pair(rng, (3, 4), device)
    with pytest.raises(AttributeError, match=r"MaxResult has no 'sum'.*\.values\.sum"):
        t.max(1).sum()
    with pytest.raises(TypeError, match=r"\[max\] camel has no elementwise max\(a, b\)"):
        t.max(t)


@pytest.mark.parametrize("dim, keepdim", [(None, False), (None, True), (0, False), (-1, True)])
def test_argmax(device, rng, dim, keepdim):
    x, t = _pair(rng, (7, 33), device)
    want = torch.tensor(x).argmax(dim=dim, keepdim=keepdim)
    got = t.argmax(dim=dim, keepdim=keepdim)
    assert got.dtype == np.int32 and got.shape == tuple(want.shape)
    np.testing.assert_array_equal(got.numpy(), want.numpy())
    np.testing.assert_array_equal(F.argmax(t, 1).numpy(), np.argmax(x, 1))


# ---------------------------------------------------------------------------
# shape names: size, dim, t, numel, unsqueeze / squeeze / flatten, contiguous, cpu
# ---------------------------------------------------------------------------

SHAPE_CASES = [
    ("unsqueeze", (0,), (3, 5)),
    ("unsqueeze", (-1,), (3, 5)),
    ("unsqueeze", (2,), (3, 5)),
    ("squeeze", (), (1, 3, 1, 5)),
    ("squeeze", (0,), (1, 3, 1, 5)),
    ("squeeze", (1,), (1, 3, 1, 5)),  # not size 1: unchanged, as in PyTorch
    ("squeeze", (-2,), (1, 3, 1, 5)),
    ("flatten", (), (2, 3, 5)),
    ("flatten", (1,), (2, 3, 5, 7)),
    ("flatten", (1, 2), (2, 3, 5, 7)),
    ("flatten", (), ()),
    ("t", (), (3, 5)),
    ("t", (), (7,)),
    ("contiguous", (), (3, 5)),
]


@pytest.mark.parametrize("op, args, shape", SHAPE_CASES)
def test_shape_methods_match_torch(device, rng, op, args, shape):
    x, t = _pair(rng, shape, device, requires_grad=True)
    tx = torch.tensor(x, requires_grad=True)
    got, want = getattr(t, op)(*args), getattr(tx, op)(*args)
    _close(got, want)
    g = rng.standard_normal(want.shape).astype(np.float32)
    (got * camel.tensor(g, device=device)).sum().backward()
    (want * torch.tensor(g)).sum().backward()
    _close(t.grad, tx.grad)


def test_size_dim_numel(device, rng):
    x, t = _pair(rng, (2, 3, 5), device)
    tx = torch.tensor(x)
    assert t.size() == tuple(tx.size()) and t.size(1) == tx.size(1) == 3
    assert t.size(-1) == tx.size(-1) and t.dim() == tx.dim() == 3
    assert t.numel() == tx.numel() == 30
    with pytest.raises(ValueError, match=r"\[size\] axis 3 does not exist"):
        t.size(3)
    with pytest.raises(ValueError, match=r"\[t\] expects a tensor with at most 2 dims"):
        t.t()
    assert t.cpu().device == "cpu" and np.array_equal(t.cpu().numpy(), x)


# ---------------------------------------------------------------------------
# never a silently different meaning
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("op", ["eq", "ne", "lt", "le", "gt", "ge"])
def test_comparisons_raise_not_identity(device, rng, op):
    _, a = _pair(rng, (3,), device)
    _, b = _pair(rng, (3,), device)
    compare = getattr(operator, op)
    for other in (b, a, 0.5, np.zeros(3, np.float32)):
        with pytest.raises(TypeError, match=r"no elementwise comparison.*\.numpy\(\)"):
            compare(a, other)
        with pytest.raises(TypeError, match=r"no elementwise comparison"):
            compare(other, a)  # reflected: NumPy and Python defer to the tensor
    assert (a == None) is False and (a != None) is True  # noqa: E711 (PyTorch's answer)


def test_tensors_stay_hashable_by_identity(device, rng):
    _, a = _pair(rng, (2,), device)
    _, b = _pair(rng, (2,), device)
    d = {a: 1, b: 2}
    assert d[a] == 1 and d[b] == 2 and len({a, b, a}) == 2
    assert hash(a) == object.__hash__(a)


def test_bool_float_int_of_one_element(device):
    assert bool(camel.tensor([0.0], device=device)) is False
    assert bool(camel.tensor(2.0, device=device)) is True
    assert float(camel.tensor([[2.5]], device=device)) == 2.5
    assert int(camel.tensor([3], device=device)) == 3
    with pytest.raises(RuntimeError, match=r"\[bool\] .*shape \(2,\) is ambiguous"):
        bool(camel.tensor([1.0, 2.0], device=device))


def test_numpy_interop_is_array_valued(device, rng):
    x, t = _pair(rng, (2, 3), device)
    a = np.asarray(t)
    assert a.dtype == np.float32 and np.array_equal(a, x)
    with pytest.raises(TypeError, match=r"\[mul\] b must be a camel Tensor"):
        np.ones(3, np.float32) * t


def test_numpy_of_a_tensor_that_requires_grad_is_read_only(device):
    # the case: writing into w.numpy() changed a gradient from 2 to 20 silently
    w = camel.tensor([3.0], requires_grad=True, device=device)
    x = camel.tensor([2.0], device=device)
    loss = (w * x).sum()
    for t in (w, x, loss):  # w requires grad; x is saved by mul for its backward
        with pytest.raises(ValueError, match=r"read-only .*\.detach\(\)\.numpy\(\)\.copy\(\)"):
            t.numpy()[0] = 10.0
        with pytest.raises(ValueError):
            t.numpy()[...] += 1.0
    loss.backward()
    assert w.grad.item() == 2.0
    x.numpy()[0] = 10.0  # the graph is gone: x is writable again, like any tensor
    copy = w.detach().numpy().copy()
    copy[0] = 5.0  # a private copy
    assert w.item() == 3.0
    assert np.array_equal(w.numpy() + 1, [4.0])  # results of arithmetic are ordinary arrays


def test_numpy_of_a_tensor_outside_the_graph_is_writable(device):
    x = camel.tensor([1.0, 2.0], device=device)
    with camel.no_grad():
        (x * x).sum()
    x.numpy()[0] = 5.0
    assert x.tolist() == [5.0, 2.0]


# ---------------------------------------------------------------------------
# nn and optim habits: register_buffer, zero_grad(set_to_none=...), reduction=
# ---------------------------------------------------------------------------


class _Scaled(camel.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = camel.nn.Linear(3, 2)
        self.register_buffer("scale", camel.tensor([2.0, 3.0]))
        self.register_buffer("steps", camel.tensor([0]))  # an int32 buffer
        self.register_buffer("cache", camel.tensor([1.0]), persistent=False)

    def forward(self, x):
        return self.lin(x) * self.scale


def test_register_buffer_like_torch(devices):
    model = _Scaled()
    outer = camel.nn.Sequential(model)
    assert [n for n, _ in outer.named_buffers()] == ["0.scale", "0.steps", "0.cache"]
    assert len(outer.buffers()) == 3
    assert [n for n, _ in outer.named_parameters()] == ["0.lin.weight", "0.lin.bias"]
    sd = outer.state_dict()
    assert list(sd) == ["0.lin.weight", "0.lin.bias", "0.scale", "0.steps"]  # cache: not saved
    # the same module in PyTorch has the same keys
    tm = torch.nn.Sequential(torch.nn.Module())
    tm[0].lin = torch.nn.Linear(3, 2)
    tm[0].register_buffer("scale", torch.tensor([2.0, 3.0]))
    tm[0].register_buffer("steps", torch.tensor([0]))
    tm[0].register_buffer("cache", torch.tensor([1.0]), persistent=False)
    assert sorted(sd) == sorted(tm.state_dict())
    sd["0.scale"] = np.array([5.0, 7.0])
    sd["0.steps"] = np.array([4])
    outer.load_state_dict(sd)
    assert model.scale.tolist() == [5.0, 7.0] and model.steps.dtype == np.int32
    assert model.steps.tolist() == [4]
    for device in devices:
        outer.to(device)
        assert {b.device for b in outer.buffers()} == {device}
        x = camel.tensor(np.ones((4, 3), np.float32), device=device)
        y = outer(x)
        assert y.shape == (4, 2)
        np.testing.assert_allclose(y.numpy(), (outer[0].lin(x) * model.scale).numpy())
    assert not any(b.requires_grad for b in outer.buffers())


def test_register_buffer_errors():
    m = camel.nn.Linear(2, 2)
    with pytest.raises(KeyError, match=r"\[register_buffer\] Linear: attribute 'weight'"):
        m.register_buffer("weight", camel.tensor([1.0]))
    with pytest.raises(TypeError, match=r"must be a camel Tensor or None, got ndarray"):
        m.register_buffer("b", np.ones(2))
    with pytest.raises(KeyError, match=r"without '\.'"):
        m.register_buffer("a.b", camel.tensor([1.0]))
    m.register_buffer("nothing", None)
    assert m.buffers() == [] and "nothing" not in m.state_dict()


@pytest.mark.parametrize("where", ["module", "optimizer"])
def test_zero_grad_set_to_none(device, where):
    model = camel.nn.Linear(3, 2)
    model.to(device)
    opt = camel.optim.SGD(model.parameters(), lr=0.1)
    target = model if where == "module" else opt
    model(camel.tensor(np.ones((2, 3), np.float32), device=device)).sum().backward()
    target.zero_grad(set_to_none=False)
    for p in model.parameters():
        assert p.grad is not None and p.grad.device == device
        assert np.array_equal(p.grad.numpy(), np.zeros(p.shape))
    target.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    target.zero_grad(set_to_none=False)  # None stays None, as in PyTorch
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("n, c", [(1, 1), (7, 33), (33, 5)])
def test_cross_entropy_reduction(device, rng, reduction, n, c):
    x, logits = _pair(rng, (n, c), device, requires_grad=True)
    y = rng.integers(0, c, size=n)
    tx = torch.tensor(x, requires_grad=True)
    got = F.cross_entropy(logits, camel.tensor(y, device=device), reduction=reduction)
    want = torch.nn.functional.cross_entropy(tx, torch.tensor(y), reduction=reduction)
    _close(got, want)
    g = rng.standard_normal(want.shape).astype(np.float32)
    got.backward(camel.tensor(g, device=device))
    want.backward(torch.tensor(g))
    _close(logits.grad, tx.grad)


def test_cross_entropy_reduction_errors(device):
    logits = camel.tensor(np.zeros((2, 3), np.float32), device=device)
    with pytest.raises(ValueError, match=r"reduction must be 'mean', 'sum' or 'none', got 'avg'"):
        F.cross_entropy(logits, camel.tensor([0, 1], device=device), reduction="avg")
    with pytest.raises(IndexError, match=r"\[cross_entropy\] target .* 3 at flat position 1"):
        F.cross_entropy(logits, camel.tensor([0, 3], device=device), reduction="none")


# ---------------------------------------------------------------------------
# what camel lacks: the error says so and names what to use
# ---------------------------------------------------------------------------

MISSING = [
    (lambda t: t.exp(), r"camel.Tensor has no 'exp': camel has no elementwise 'exp' op"),
    (lambda t: t.add_(1.0), r"no in-place ops .* x = x \+ y"),
    (lambda t: t.zero_(), r"no in-place ops"),
    (lambda t: t.min(1), r"m = \(-x\)\.max\(dim\) gives -m\.values and m\.indices"),
    (lambda t: t.data, r"t\.detach\(\)"),
    (lambda t: t.cuda(), r"'cpu' and 'mps' .*: use \.to\(device\)"),
    (lambda t: t.float(), r"float32 data and int32 indices"),
    (lambda t: t.masked_fill, r"causal=True"),
    (lambda t: t.no_such_thing, r"camel.Tensor has no attribute 'no_such_thing' \(docs/api.md"),
    (lambda t: F.mse_loss, r"camel.functional has no 'mse_loss': write it"),
    (lambda t: F.dropout, r"no dropout"),
    (lambda t: camel.nn.CrossEntropyLoss, r"camel.functional.cross_entropy"),
    (lambda t: camel.nn.Conv2d, r"no convolutions"),
    (lambda t: camel.nn.MultiheadAttention, r"camel.nn.MultiHeadAttention\(d_model, n_heads\)"),
    (lambda t: camel.optim.AdamW, r"not AdamW's decoupled decay"),
    (lambda t: camel.cat, r"no concatenation op"),
    (lambda t: camel.nn.Linear(2, 2).cuda(), r"camel.nn.Module has no 'cuda'.*\.to\(device\)"),
    (lambda t: camel.nn.Linear(2, 2).children(), r"named_modules\(\)"),
    (lambda t: camel.nn.Linear(2, 2).nothing, r"camel.nn.Module has no attribute 'nothing'"),
    (lambda t: camel.optim.SGD([camel.nn.Parameter([1.0])], lr=0.1).param_groups, r"opt\.lr"),
    (lambda t: camel.softmax, r"camel.functional.softmax"),
    (lambda t: camel.long, r"camel.int32"),
    (lambda t: camel.inference_mode, r"camel.no_grad\(\)"),
]


@pytest.mark.parametrize("case", range(len(MISSING)))
def test_missing_pytorch_names_say_what_to_use(device, case):
    fn, pattern = MISSING[case]
    t = camel.tensor([[1.0, 2.0]], device=device)
    with pytest.raises(AttributeError, match=pattern):
        fn(t)


def test_missing_names_do_not_break_python_lookups():
    t = camel.tensor([1.0])
    assert not hasattr(t, "__array_interface__") and not hasattr(t, "_nothing")
    assert hasattr(t, "size") and camel.float32 == np.float32 and camel.int32 == np.int32
    from camel import bench  # a submodule import through the package's __getattr__

    assert bench.__name__ == "camel.bench"


# Shapes camel's trailing-suffix rule refuses; the message shows a way out that works.
BROADCASTS = [
    ((3, 4), (3, 1)),  # PyTorch stretches axis 1 of y
    ((2, 5, 3), (2, 1, 3)),  # a middle axis
    ((2, 5, 3), (1, 5, 3)),  # leading size-1 axes only
    ((7, 1, 5), (7, 4, 5)),  # the bigger operand second
    ((4, 5, 6), (4, 1, 1)),
]


def _run_hint(message, x, y):
    expr = message.split(": ")[-1].split("; x is")[0]
    return eval(expr, {}, {"x": x, "y": y})


@pytest.mark.parametrize("a_shape, b_shape", BROADCASTS)
@pytest.mark.parametrize("op", ["add", "mul"])
def test_broadcast_error_shows_a_way_out_that_matches_torch(device, rng, a_shape, b_shape, op):
    a, ta = _pair(rng, a_shape, device)
    b, tb = _pair(rng, b_shape, device)
    fn = getattr(F, op)
    with pytest.raises(ValueError, match=rf"\[{op}\] cannot broadcast shapes") as err:
        fn(ta, tb)
    message = str(err.value)
    assert "x is the" in message
    big_first = (len(a_shape), np.prod(a_shape)) >= (len(b_shape), np.prod(b_shape))
    x, y = (ta, tb) if big_first else (tb, ta)
    want = getattr(torch, op)(torch.tensor(a), torch.tensor(b))
    _close(_run_hint(message, x, y), want)


def test_broadcast_error_when_even_torch_cannot(device, rng):
    a, ta = _pair(rng, (3, 4), device)
    b, tb = _pair(rng, (3,), device)
    with pytest.raises(ValueError, match=r"Even PyTorch cannot: sizes 4 and 3") as err:
        ta + tb
    # the hint reads y as running along axis 0: x + y[:, None] in PyTorch
    _close(_run_hint(str(err.value), ta, tb), torch.tensor(a) + torch.tensor(b)[:, None])
    with pytest.raises(ValueError, match=r"PyTorch would stretch both operands to \(3, 4\)"):
        camel.zeros(3, 1, device=device) * camel.zeros(1, 4, device=device)


# ---------------------------------------------------------------------------
# camel.tensor of float16 / uint8 data, and dtype=
# ---------------------------------------------------------------------------


def test_tensor_of_float16_or_uint8_warns_that_it_converts(device):
    with pytest.warns(UserWarning, match=r"float16 data is stored as float32 .*dtype=camel"):
        t = camel.tensor(np.array([0.5, 2.0], np.float16), device=device)
    assert t.dtype == np.float32 and t.tolist() == [0.5, 2.0]
    with pytest.warns(UserWarning, match=r"uint8 data is stored as int32 .*dtype=camel.float32"):
        t = camel.tensor(np.array([0, 255], np.uint8), device=device)
    assert t.dtype == np.int32 and t.tolist() == [0, 255]


@pytest.mark.parametrize(
    "data, dtype, want",
    [
        (np.array([0, 255], np.uint8), camel.float32, torch.float32),
        (np.array([0.5, 2.0], np.float16), "float32", torch.float32),
        ([1.7, -1.7, 0.2], camel.int32, torch.int32),
        ([3, 4], np.float32, torch.float32),
        ([True, False], "int32", torch.int32),
    ],
)
def test_tensor_dtype_argument_converts_like_torch(device, data, dtype, want, recwarn):
    t = camel.tensor(data, dtype=dtype, device=device)
    expected = torch.tensor(np.asarray(data), dtype=want).numpy()
    assert t.dtype == expected.dtype and np.array_equal(t.numpy(), expected)
    assert not [w for w in recwarn if "[tensor]" in str(w.message)]  # said so: no warning


def test_tensor_dtype_errors():
    with pytest.raises(TypeError, match=r"camel supports dtypes float32 and int32, got float16"):
        camel.tensor([1.0], dtype="float16")
    with pytest.raises(ValueError, match=r"dtype=int32 of data holding inf or NaN"):
        camel.tensor([np.nan], dtype=camel.int32)


# ---------------------------------------------------------------------------
# docs/api.md lists the whole public API
# ---------------------------------------------------------------------------


def _public(obj, module=None):
    names = []
    for name, value in vars(obj).items():
        if name.startswith("_"):
            continue
        owner = getattr(value, "__module__", None) or ""
        if module is not None and owner != module and not owner.startswith(module + "."):
            continue  # imported helpers (np, math, ...); a package's own submodules count
        if isinstance(value, type) and issubclass(value, camel.autograd.Function):
            continue  # the ops' Function classes are internal: F.add is the API
        if callable(value) or isinstance(value, property):
            names.append(name)
    return names


def test_api_doc_lists_every_public_name():
    from pathlib import Path

    import camel.metal

    doc = (Path(__file__).parent.parent / "docs" / "api.md").read_text()
    names = list(camel.__all__) + _public(camel.Tensor)
    names += _public(F, "camel.functional") + list(camel.nn.__all__)
    names += _public(camel.nn.Module) + ["SGD", "Adam", "step", "zero_grad"]
    names += _public(camel.metal, "camel.metal")
    missing = sorted({n for n in names if not re.search(rf"[`. ]{n}[`(]", doc)})
    assert not missing, f"docs/api.md does not list {missing}"


def test_module_cpu_and_min_hint_is_right(devices, rng):
    x, t = _pair(rng, (4, 6), devices[-1])
    m = (-t).max(1)  # what the 'min' hint says to write
    want = torch.tensor(x).min(1)
    _close(-m.values, want.values)
    np.testing.assert_array_equal(m.indices.numpy(), want.indices.numpy())
    lin = camel.nn.Linear(2, 2).to(devices[-1])
    assert lin.cpu() is lin and lin.weight.device == "cpu"


def test_backward_takes_torch_keywords(device):
    w = camel.tensor([1.0, 2.0], requires_grad=True, device=device)
    (w * 3.0).backward(gradient=camel.tensor([1.0, 1.0], device=device))
    assert w.grad.tolist() == [3.0, 3.0]
    with pytest.raises(NotImplementedError, match=r"\[backward\] camel has no retain_graph"):
        (w * 3.0).sum().backward(retain_graph=True)
    with pytest.raises(NotImplementedError, match=r"no create_graph"):
        (w * 3.0).sum().backward(create_graph=True)


def test_a_shared_buffer_stays_shared_through_to(devices):
    shared = camel.tensor([1.0, 2.0])
    a, b = camel.nn.Module(), camel.nn.Module()
    a.register_buffer("s", shared)
    b.register_buffer("s", shared)
    outer = camel.nn.Sequential(a, b)
    outer.to(devices[-1])
    assert a.s is b.s and a.s.device == devices[-1]
    assert len(outer.buffers()) == 1 and outer.buffers()[0] is a.s


def test_load_state_dict_reaches_every_owner_of_a_shared_buffer(device):
    shared = camel.tensor([1.0, 2.0], device=device)
    a, b = camel.nn.Module(), camel.nn.Module()
    a.register_buffer("s", shared)
    b.register_buffer("s", shared)
    outer = camel.nn.Sequential(a, b)
    outer.load_state_dict({"0.s": np.array([3.0, 4.0])})
    assert a.s.tolist() == b.s.tolist() == [3.0, 4.0] and a.s.device == device


def test_to_a_dtype_says_devices_are_strings(device):
    t = camel.tensor([1.0], device=device)
    with pytest.raises(TypeError, match=r"a device is a string .* no dtype conversion"):
        t.to(camel.float32)
    with pytest.raises(TypeError, match=r"a device is a string"):
        camel.nn.Linear(2, 2).to(camel.int32)
