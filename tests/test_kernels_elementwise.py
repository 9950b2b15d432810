"""Stage 1 kernels (shaders/ops_elementwise.metal) against the NumPy reference.

Each kernel runs through camel/backend_mps.py at awkward sizes (1, 3, 31, 32, 33, 1000,
4097) in all three simulator schedule orders, and is compared with camel/backend_cpu.py.
add, mul and relu are exact in IEEE float32, so those comparisons are exact.
The op tests at the end go through the Tensor API on "cpu" and "mps" alike.
"""

import numpy as np
import pytest
from conftest import backend_mps_or_skip

import camel
import camel.functional as F
from camel import backend_cpu as cpu

SIZES = [1, 3, 31, 32, 33, 1000, 4097]


def rand(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def host(mps, x):
    return np.array(mps.to_numpy(x))  # a copy, so later kernels cannot change it


def unaligned(mps, arr):
    """A DeviceArray holding arr at byte offset 4 of its buffer: not 16-byte aligned,
    so the backend must take the one-element-per-thread kernels."""
    from camel.metal import DeviceArray

    base = mps.from_numpy(np.zeros(arr.size + 1, dtype=arr.dtype))
    view = DeviceArray(arr.shape, arr.dtype, base.buffer, offset=4)
    view.numpy()[...] = arr
    return view


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("op", ["add", "mul"])
def test_binary_same_shape(mps, op, n):
    a, b = rand(n, seed=1), rand(n, seed=2)
    got = host(mps, getattr(mps, op)(mps.from_numpy(a), mps.from_numpy(b)))
    np.testing.assert_array_equal(got, getattr(cpu, op)(a, b))


@pytest.mark.parametrize(
    "shape_a, shape_b",
    [
        ((33, 10), (10,)),  # bias add, m % 4 != 0: one element per thread
        ((5, 4), (4,)),  # m % 4 == 0: float4 kernel
        ((7, 1), (1,)),
        ((4, 3, 8), (3, 8)),  # position embedding (T, C)
        ((3, 4097), (4097,)),
        ((2, 3), (2, 3)),  # equal shapes
    ],
)
@pytest.mark.parametrize("op", ["add", "mul"])
def test_binary_broadcast_suffix(mps, op, shape_a, shape_b):
    a, b = rand(*shape_a, seed=3), rand(*shape_b, seed=4)
    got = host(mps, getattr(mps, op)(mps.from_numpy(a), mps.from_numpy(b)))
    np.testing.assert_array_equal(got, getattr(cpu, op)(a, b))


@pytest.mark.parametrize("n", SIZES)
def test_scalar_ops_and_neg(mps, n):
    a = rand(n, seed=5)
    da = mps.from_numpy(a)
    np.testing.assert_array_equal(host(mps, mps.add_scalar(da, 0.1)), cpu.add_scalar(a, 0.1))
    np.testing.assert_array_equal(host(mps, mps.mul_scalar(da, -2.5)), cpu.mul_scalar(a, -2.5))
    np.testing.assert_array_equal(host(mps, mps.neg(da)), cpu.neg(a))


@pytest.mark.parametrize("n", SIZES)
def test_relu_and_backward(mps, n):
    x = rand(n, seed=6)
    x[::5] = 0.0  # the gradient at exactly 0 is 0
    g = rand(n, seed=7)
    dx = mps.from_numpy(x)
    np.testing.assert_array_equal(host(mps, mps.relu(dx)), cpu.relu(x))
    got = host(mps, mps.relu_backward(dx, mps.from_numpy(g)))
    np.testing.assert_array_equal(got, cpu.relu_backward(x, g))


@pytest.mark.parametrize("n", SIZES)
def test_fill_and_copy(mps, n):
    np.testing.assert_array_equal(host(mps, mps.full((n,), 1.5, "float32")), np.full(n, 1.5))
    ints = host(mps, mps.full((n, 1), -7, "int32"))
    assert ints.dtype == np.int32 and ints.shape == (n, 1)
    np.testing.assert_array_equal(ints, np.full((n, 1), -7))
    x = rand(n, seed=8)
    np.testing.assert_array_equal(host(mps, mps.copy(mps.from_numpy(x))), x)
    i = np.arange(-n, n, 2, dtype=np.int32)
    np.testing.assert_array_equal(host(mps, mps.copy(mps.from_numpy(i))), i)


@pytest.mark.parametrize("n", [1, 3, 33, 4097])
def test_unaligned_operands_take_the_scalar_kernels(mps, n):
    a, b = rand(n, seed=9), rand(n, seed=10)
    ua, ub = unaligned(mps, a), unaligned(mps, b)
    assert ua.offset % 16 != 0
    np.testing.assert_array_equal(host(mps, mps.add(ua, ub)), a + b)
    np.testing.assert_array_equal(host(mps, mps.mul(ua, ub)), a * b)
    np.testing.assert_array_equal(host(mps, mps.relu(ua)), np.maximum(a, 0))
    np.testing.assert_array_equal(host(mps, mps.relu_backward(ua, ub)), cpu.relu_backward(a, b))
    np.testing.assert_array_equal(host(mps, mps.mul_scalar(ua, 3.0)), a * np.float32(3))
    np.testing.assert_array_equal(host(mps, mps.copy(ua)), a)


@pytest.mark.parametrize(
    "shape, dims",
    [((3, 5), (1, 0)), ((1, 7), (1, 0)), ((2, 3, 4), (2, 0, 1)), ((2, 3, 4, 5), (0, 2, 1, 3))],
)
def test_permute(mps, shape, dims):
    x = rand(*shape, seed=11)
    np.testing.assert_array_equal(
        host(mps, mps.permute(mps.from_numpy(x), dims)), x.transpose(dims)
    )
    i = np.arange(x.size, dtype=np.int32).reshape(shape)
    np.testing.assert_array_equal(
        host(mps, mps.permute(mps.from_numpy(i), dims)), i.transpose(dims)
    )


def test_zero_size_is_fine(mps):
    empty = mps.from_numpy(np.zeros((0, 3), dtype=np.float32))
    assert host(mps, mps.add(empty, mps.from_numpy(np.zeros(3, np.float32)))).shape == (0, 3)
    assert host(mps, mps.relu(empty)).shape == (0, 3)


# ---------------------------------------------------------------------------
# op tests through the Tensor API: the same checks on "cpu" and "mps"
# ---------------------------------------------------------------------------


@pytest.fixture(params=["cpu", "mps"])
def device(request):
    if request.param == "mps":
        backend_mps_or_skip()
    return request.param


def test_op_add_mul_relu_forward_backward(device):
    x_np, b_np, w_np = rand(33, 10, seed=12), rand(10, seed=13), rand(33, 10, seed=14)
    x = camel.tensor(x_np, requires_grad=True, device=device)
    b = camel.tensor(b_np, requires_grad=True, device=device)
    w = camel.tensor(w_np, device=device)
    y = F.relu(x + b) * w  # (33, 10)
    loss = y.sum()
    loss.backward()
    mask = (x_np + b_np) > 0
    np.testing.assert_allclose(y.numpy(), np.maximum(x_np + b_np, 0) * w_np, rtol=1e-6)
    np.testing.assert_allclose(x.grad.numpy(), np.where(mask, w_np, 0), rtol=1e-6)
    np.testing.assert_allclose(b.grad.numpy(), np.where(mask, w_np, 0).sum(0), rtol=1e-5, atol=1e-5)
    assert x.grad.device == device and b.grad.device == device


def test_op_sub_neg_div_by_composition(device):
    a_np, b_np = rand(4097, seed=15), rand(4097, seed=16)
    a = camel.tensor(a_np, requires_grad=True, device=device)
    b = camel.tensor(b_np, requires_grad=True, device=device)
    y = (a - b) / 4.0 + (-a)
    y.sum().backward()
    np.testing.assert_allclose(y.numpy(), (a_np - b_np) / 4 - a_np, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(a.grad.numpy(), np.full(4097, 0.25 - 1), rtol=1e-6)
    np.testing.assert_allclose(b.grad.numpy(), np.full(4097, -0.25), rtol=1e-6)


def test_op_transpose(device):
    x_np = rand(3, 5, seed=17)
    x = camel.tensor(x_np, requires_grad=True, device=device)
    (x.T * camel.tensor(x_np.T, device=device)).sum().backward()
    np.testing.assert_array_equal(x.T.numpy(), x_np.T)
    np.testing.assert_allclose(x.grad.numpy(), x_np, rtol=1e-6)


def test_mixed_devices_is_a_clear_error():
    backend_mps_or_skip()
    a = camel.tensor(rand(3), device="cpu")
    b = camel.tensor(rand(3), device="mps")
    with pytest.raises(RuntimeError, match="different devices"):
        F.add(a, b)
