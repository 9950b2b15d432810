"""The tape: topological backward, accumulation, no_grad, freeing, misuse errors."""

import numpy as np
import pytest

import camel
import camel.functional as F
from camel.autograd import Function


def test_micrograd_example_matches_hand_derivative(device):
    # y = relu(a * b + a), dy/da = b + 1, dy/db = a where the relu is active
    a = camel.tensor([2.0, -3.0], requires_grad=True, device=device)
    b = camel.tensor([0.5, 4.0], requires_grad=True, device=device)
    (a * b + a).relu().sum().backward()
    np.testing.assert_allclose(a.grad.numpy(), [1.5, 0.0])
    np.testing.assert_allclose(b.grad.numpy(), [2.0, 0.0])
    assert a.grad.device == device


def test_diamond_graph_sums_both_paths(device):
    # x feeds two branches that meet again: dy/dx = 2x + 3
    x = camel.tensor([1.0, 2.0, -1.0], requires_grad=True, device=device)
    y = x * x + x * 3.0
    y.sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), 2 * x.numpy() + 3)


def test_tensor_used_twice_in_one_op(device):
    x = camel.tensor([3.0], requires_grad=True, device=device)
    (x * x).backward()
    assert x.grad.item() == 6.0


def test_grads_accumulate_across_backward_calls_until_reset(device):
    w = camel.tensor([1.0, 2.0], requires_grad=True, device=device)
    for _ in range(3):
        (w * 2.0).sum().backward()  # a fresh graph each time
    np.testing.assert_allclose(w.grad.numpy(), [6.0, 6.0])
    w.grad = None
    (w * 2.0).sum().backward()
    np.testing.assert_allclose(w.grad.numpy(), [2.0, 2.0])


def test_only_leaves_keep_grad(device):
    x = camel.tensor([1.0, 2.0], requires_grad=True, device=device)
    h = x * 2.0
    h.sum().backward()
    assert h.grad is None and x.grad is not None
    assert x.is_leaf and not h.is_leaf


def test_inputs_without_requires_grad_get_no_grad(device):
    x = camel.tensor([1.0, 2.0], device=device)
    w = camel.tensor([3.0, 4.0], requires_grad=True, device=device)
    (x * w).sum().backward()
    assert x.grad is None
    np.testing.assert_allclose(w.grad.numpy(), [1.0, 2.0])


def test_no_grad_records_nothing(device):
    w = camel.tensor([1.0], requires_grad=True, device=device)
    with camel.no_grad():
        y = w * 2.0
        assert not camel.is_grad_enabled()
    assert camel.is_grad_enabled()
    assert not y.requires_grad and y._ctx is None
    with pytest.raises(RuntimeError, match=r"\[backward\] this tensor does not require grad"):
        y.backward()


def test_no_grad_as_decorator_and_nested():
    @camel.no_grad()
    def f(t):
        return t * 2.0

    w = camel.tensor([1.0], requires_grad=True)
    assert not f(w).requires_grad
    with camel.no_grad():
        with camel.no_grad():
            pass
        assert not camel.is_grad_enabled()
    assert camel.is_grad_enabled()


def test_second_backward_through_freed_graph_raises(device):
    x = camel.tensor([1.0, 2.0], requires_grad=True, device=device)
    loss = (x * x).sum()
    loss.backward()
    with pytest.raises(RuntimeError, match="backward through a graph a second time"):
        loss.backward()


def test_saved_tensors_are_freed_after_backward(device):
    x = camel.tensor([1.0, 2.0], requires_grad=True, device=device)
    h = x * x
    h.sum().backward()
    assert h._ctx.freed and h._ctx._saved == ()


def test_backward_on_non_scalar_needs_grad(device):
    x = camel.tensor(np.ones((2, 3), np.float32), requires_grad=True, device=device)
    y = x * 2.0
    with pytest.raises(RuntimeError, match=r"only for a one-element output, got shape \(2, 3\)"):
        y.backward()
    y.backward(camel.ones(2, 3, device=device))
    np.testing.assert_allclose(x.grad.numpy(), 2 * np.ones((2, 3)))


def test_backward_grad_of_wrong_shape_raises(device):
    x = camel.tensor([1.0, 2.0], requires_grad=True, device=device)
    with pytest.raises(ValueError, match=r"grad has shape \(3,\)"):
        (x * 2.0).backward(camel.ones(3, device=device))


def test_deep_chain_does_not_hit_recursion_limit():
    x = camel.tensor([1.0], requires_grad=True)
    y = x
    for _ in range(3000):
        y = y + 1.0
    y.backward()
    assert x.grad.item() == 1.0


def test_int_tensors_cannot_require_grad():
    with pytest.raises(TypeError, match="only float32 tensors can require gradients, got int32"):
        camel.tensor([1, 2], requires_grad=True)


# A learner's own op: the Function API in five lines, and what happens when its
# backward is wrong.


class Square(Function):
    name = "square"

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return ctx.backend.mul(x, x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return ctx.backend.mul_scalar(ctx.backend.mul(grad, x), 2.0)


class WrongSquare(Square):
    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return ctx.backend.mul(grad, x)  # forgot the factor 2


class BadShape(Square):
    @staticmethod
    def backward(ctx, grad):
        return ctx.backend.sum(grad, None, False)


def test_custom_function_passes_gradcheck(device):
    x = camel.tensor([0.5, -1.5, 2.0], requires_grad=True, device=device)
    assert camel.gradcheck(Square.apply, [x])


def test_gradcheck_catches_a_wrong_backward_and_names_the_element(device):
    x = camel.tensor([0.5, -1.5, 2.0], requires_grad=True, device=device)
    with pytest.raises(camel.GradcheckError, match=r"input 0 \(shape \(3,\)\).*index \(2,\)"):
        camel.gradcheck(WrongSquare.apply, [x])


def test_backward_returning_a_wrong_shape_is_reported(device):
    x = camel.tensor([0.5, -1.5], requires_grad=True, device=device)
    with pytest.raises(RuntimeError, match=r"square.backward returned a gradient of shape \(\)"):
        BadShape.apply(x).sum().backward()


def test_gradcheck_leaves_callers_grad_alone():
    x = camel.tensor([1.0, 2.0], requires_grad=True)
    camel.gradcheck(F.relu, [x])
    assert x.grad is None


def test_gradcheck_needs_an_input_with_requires_grad():
    with pytest.raises(ValueError, match="no input has requires_grad"):
        camel.gradcheck(F.relu, [camel.tensor([1.0])])


def test_to_device_is_differentiable(devices):
    x = camel.tensor([1.0, -2.0], requires_grad=True)
    for d in devices:
        y = x.to(d)
        assert y.device == d
        (y * 3.0).sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), [3.0 * len(devices)] * 2)
    assert x.grad.device == "cpu"


@pytest.mark.parametrize("batch", [(), (2,)])
@pytest.mark.parametrize("ta,tb", [(False, False), (False, True), (True, False), (True, True)])
def test_matmul_backward_every_transpose(ta, tb, batch, device, rng):
    """op(A) @ op(B) with either operand stored transposed: the output and both gradients
    (in the stored layouts) against NumPy. Every branch of MatMul.backward."""
    m, k, n = 5, 3, 4  # all different: a wrong transpose cannot pass by shape luck
    a = rng.standard_normal((*batch, k, m) if ta else (*batch, m, k)).astype(np.float32)
    b = rng.standard_normal((*batch, n, k) if tb else (*batch, k, n)).astype(np.float32)
    g = rng.standard_normal((*batch, m, n)).astype(np.float32)
    ta_t, tb_t = (camel.tensor(x, requires_grad=True, device=device) for x in (a, b))
    out = F._matmul_checked(ta_t, tb_t, transpose_a=ta, transpose_b=tb)
    out.backward(camel.tensor(g, device=device))
    op_a = np.swapaxes(a, -1, -2) if ta else a  # (..., M, K)
    op_b = np.swapaxes(b, -1, -2) if tb else b  # (..., K, N)
    d_op_a = g @ np.swapaxes(op_b, -1, -2)  # dL/d op(A)
    d_op_b = np.swapaxes(op_a, -1, -2) @ g
    np.testing.assert_allclose(out.numpy(), op_a @ op_b, rtol=1e-5, atol=1e-5)
    want_da = np.swapaxes(d_op_a, -1, -2) if ta else d_op_a
    want_db = np.swapaxes(d_op_b, -1, -2) if tb else d_op_b
    np.testing.assert_allclose(ta_t.grad.numpy(), want_da, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(tb_t.grad.numpy(), want_db, rtol=1e-5, atol=1e-5)


def test_gradcheck_checks_every_input(device):
    """A wrong gradient in the second or third input is caught and named, not only the
    first input's."""

    def wrong_in(position):
        def fn(*xs):
            parts = [(WrongSquare if i == position else Square).apply(x) for i, x in enumerate(xs)]
            return parts[0].sum() + parts[1].sum() + parts[2].sum()

        return fn

    x, y, z = (camel.tensor(v, requires_grad=True, device=device) for v in
               ([0.5, -1.5], [1.0, 2.0, 3.0], [0.25, -2.0, 1.5, 1.0]))  # fmt: skip
    for position, shape in ((1, r"\(3,\)"), (2, r"\(4,\)")):
        with pytest.raises(camel.GradcheckError, match=rf"input {position} \(shape {shape}\)"):
            camel.gradcheck(wrong_in(position), [x, y, z])
