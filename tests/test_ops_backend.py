"""The narrow waist itself: backend functions called directly on storages.

- camel/backend_mps.py implements every function of camel/backend_cpu.py with
  the same parameters (the contract in backend_cpu's docstring);
- the in-place optimiser steps follow torch.optim step for step.
"""

import importlib.util
import inspect

import numpy as np
import pytest

from camel import backend_cpu
from camel.tensor import get_backend


def _public_functions(module):
    return {
        name: fn
        for name, fn in vars(module).items()
        if inspect.isfunction(fn) and not name.startswith("_") and fn.__module__ == module.__name__
    }


def test_backend_cpu_docstring_lists_every_function():
    doc = backend_cpu.__doc__
    for name in _public_functions(backend_cpu):
        assert f"{name}(" in doc, f"backend_cpu.{name} is missing from the module docstring"


@pytest.mark.skipif(
    importlib.util.find_spec("camel.backend_mps") is None, reason="no camel/backend_mps.py yet"
)
def test_backend_mps_has_the_same_functions_and_parameters():
    import camel.backend_mps as mps

    cpu_fns, mps_fns = _public_functions(backend_cpu), _public_functions(mps)
    missing = sorted(set(cpu_fns) - set(mps_fns))
    assert not missing, f"camel.backend_mps lacks {missing}"
    for name, fn in cpu_fns.items():
        want = list(inspect.signature(fn).parameters)
        got = list(inspect.signature(mps_fns[name]).parameters)
        assert got == want, f"backend_mps.{name}{tuple(got)} != backend_cpu.{name}{tuple(want)}"


def _storage(be, arr):
    return be.from_numpy(np.asarray(arr, dtype=np.float32))


@pytest.mark.parametrize(
    "momentum, weight_decay", [(0.0, 0.0), (0.9, 0.0), (0.9, 0.01), (0.0, 0.1)]
)
def test_sgd_step_matches_torch(momentum, weight_decay, device, rng):
    torch = pytest.importorskip("torch")
    be = get_backend(device)
    p0 = rng.standard_normal(33).astype(np.float32)
    grads = [rng.standard_normal(33).astype(np.float32) for _ in range(4)]
    param, buf = _storage(be, p0), _storage(be, np.zeros(33))
    tp = torch.tensor(p0, requires_grad=True)
    opt = torch.optim.SGD([tp], lr=0.1, momentum=momentum, weight_decay=weight_decay)
    for i, g in enumerate(grads):
        be.sgd_step(param, _storage(be, g), buf, 0.1, momentum, weight_decay, i == 0)
        tp.grad = torch.tensor(g)
        opt.step()
        np.testing.assert_allclose(be.to_numpy(param), tp.detach().numpy(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_adam_step_matches_torch(weight_decay, device, rng):
    torch = pytest.importorskip("torch")
    be = get_backend(device)
    p0 = rng.standard_normal((7, 31)).astype(np.float32)
    param, m, v = _storage(be, p0), _storage(be, np.zeros_like(p0)), _storage(be, np.zeros_like(p0))
    tp = torch.tensor(p0, requires_grad=True)
    opt = torch.optim.Adam([tp], lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay)
    for step in range(1, 6):
        g = rng.standard_normal(p0.shape).astype(np.float32)
        be.adam_step(param, _storage(be, g), m, v, 1e-2, 0.9, 0.999, 1e-8, weight_decay, step)
        tp.grad = torch.tensor(g)
        opt.step()
        np.testing.assert_allclose(be.to_numpy(param), tp.detach().numpy(), rtol=1e-6, atol=1e-7)


def test_slice_with_negative_steps_and_its_backward(device, rng):
    be = get_backend(device)
    a = rng.standard_normal((7, 5)).astype(np.float32)
    # a[::-2, 3:0:-1] as (start, step, count) per axis
    out = be.slice(_storage(be, a), (6, 3), (-2, -1), (4, 3))
    np.testing.assert_array_equal(be.to_numpy(out), a[::-2, 3:0:-1])
    g = rng.standard_normal((4, 3)).astype(np.float32)
    dx = be.slice_backward(_storage(be, g), (7, 5), (6, 3), (-2, -1))
    want = np.zeros((7, 5), np.float32)
    want[::-2, 3:0:-1] = g
    np.testing.assert_array_equal(be.to_numpy(dx), want)


def test_sum_to_shape_sums_leading_axes(device, rng):
    be = get_backend(device)
    g = rng.standard_normal((2, 7, 33)).astype(np.float32)
    for shape in [(33,), (7, 33), (2, 7, 33), ()]:
        got = be.to_numpy(be.sum_to_shape(_storage(be, g), shape))
        want = g.reshape(-1, *shape).sum(0)
        assert got.shape == shape
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_full_reductions_return_0d_storages(device):
    be = get_backend(device)
    x = _storage(be, [[1.0, 4.0], [3.0, 2.0]])
    assert be.sum(x, None, False).shape == ()
    values, indices = be.max(x, None, False)
    assert values.shape == () and be.to_numpy(indices).item() == 1
    assert be.mul_scalar(be.sum(x, None, False), 2.0).shape == ()


def test_cpu_outputs_never_alias_their_inputs(rng):
    # The contract: outputs are new storages (only reshape may share memory), so an
    # in-place optimiser step on one storage can never change another.
    be = backend_cpu
    x = rng.standard_normal((3, 4)).astype(np.float32)
    outputs = [
        be.copy(x),
        be.permute(x, (0, 1)),  # the identity permutation still copies
        be.slice(x, (0, 0), (1, 1), (3, 4)),  # the full slice still copies
        be.sum_to_shape(x, (3, 4)),  # nothing to sum still copies
        be.sum_backward(be.sum(x, None, True), (3, 4), None),
        be.add(x, np.zeros(4, np.float32)),
        be.relu(x),
    ]
    for out in outputs:
        assert not np.shares_memory(out, x)
        assert out.flags.c_contiguous and out.flags.writeable
