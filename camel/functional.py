"""camel.functional: every differentiable op, forward and backward side by side.

Each op is a `Function` (camel/autograd.py) whose forward and backward call the
backend of the tensors' device (`ctx.backend`: camel.backend_cpu or
camel.backend_mps), so the same code runs in NumPy and as Metal kernels. The
public functions below (F.add, F.matmul, ...) check their arguments once, for
both backends, and raise errors that name the op and the offending shapes,
dtypes, devices or values; then they call `SomeOp.apply(...)`.

Broadcasting is the minimal "trailing suffix" rule: in add and mul, one
operand's shape must end the other's ((B, T, C) + (C,), (B, T, C) + (T, C));
the smaller operand's gradient is summed back to its shape.
"""

import collections
import math
import numbers

import numpy as np

from camel import autograd, config
from camel.autograd import Function
from camel.devices import device_of, get_backend

# The ops sit below the Tensor: camel/tensor.py imports this module (its methods are these
# ops) and hands its class to the tape (autograd.use_tensor) once it is defined. The ops
# reach it there, as Function.apply does: autograd.Tensor is camel.Tensor.

# ---------------------------------------------------------------------------
# argument checks shared by the ops
# ---------------------------------------------------------------------------


def _check_tensor(op, x, what="input"):
    if not isinstance(x, autograd.Tensor):
        raise TypeError(
            f"[{op}] {what} must be a camel Tensor, got {type(x).__name__}: "
            "wrap it with camel.tensor(...)"
        )


def _check_float(op, x, what="input"):
    _check_tensor(op, x, what)
    if x.dtype != np.float32:
        raise TypeError(
            f"[{op}] {what} must be float32, got {x.dtype} (shape {x.shape}); "
            "integer tensors hold indices, not data"
        )


def _check_int(op, x, what):
    _check_tensor(op, x, what)
    if x.dtype != np.int32:
        raise TypeError(
            f"[{op}] {what} must be int32 indices, got {x.dtype} (shape {x.shape}); "
            "make them with camel.tensor(list_of_ints) or camel.arange"
        )


def _check_same_device(op, *tensors):
    for t in tensors[1:]:
        if t.device != tensors[0].device:
            raise RuntimeError(
                f"[{op}] tensors on different devices: {tensors[0].device} and {t.device}; "
                "move them with .to(device) first"
            )


def _check_index_range(op, idx, n, what):
    # Reads the indices on the host: on "mps" this synchronises, which is cheap
    # because indices usually were just copied from the host.
    values = idx.numpy()
    if values.size == 0:
        return
    lo, hi = int(values.min()), int(values.max())
    if lo < 0 or hi >= n:
        bad = lo if lo < 0 else hi
        pos = int(np.argmax(values.reshape(-1) == bad))
        raise IndexError(
            f"[{op}] {what} {bad} at flat position {pos} is out of range for {n} "
            f"(valid: 0..{n - 1})"
        )


def _normalize_axis(op, axis, ndim, shape):
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)):
        raise TypeError(f"[{op}] axis must be an int, got {axis!r}")
    if not -ndim <= axis < ndim:
        raise ValueError(
            f"[{op}] axis {axis} does not exist for a tensor of shape {shape} (ndim {ndim})"
        )
    return int(axis) % ndim


def _pick(op, axis, dim, keepdims=False, keepdim=None):
    """PyTorch's spelling (dim=, keepdim=) or NumPy's (axis=, keepdims=), not both."""
    if dim is not None:
        if axis is not None:
            raise TypeError(f"[{op}] got both axis={axis!r} and dim={dim!r}: pass one")
        axis = dim
    if keepdim is not None:
        if keepdims:
            raise TypeError(f"[{op}] got both keepdims and keepdim: pass one")
        keepdims = keepdim
    return axis, bool(keepdims)


def _is_number(x):
    return isinstance(x, numbers.Number) and not isinstance(x, bool)


def _is_suffix(small, big):
    """True when shape `small` is a trailing suffix of shape `big`."""
    return len(small) <= len(big) and tuple(big[len(big) - len(small) :]) == tuple(small)


def _broadcast_order(op, a, b):
    """(big, small) for the trailing-suffix rule, or a teaching error."""
    if _is_suffix(b.shape, a.shape):
        return a, b
    if _is_suffix(a.shape, b.shape):
        return b, a
    from camel import hints

    raise ValueError(hints.broadcast(op, a.shape, b.shape))


# ---------------------------------------------------------------------------
# elementwise: add, mul, neg, scalars
# ---------------------------------------------------------------------------


class Add(Function):
    name = "add"

    @staticmethod
    def forward(ctx, a, b):  # a (...), b a trailing suffix of a.shape
        ctx.b_shape = b.shape
        return ctx.backend.add(a, b)

    @staticmethod
    def backward(ctx, grad):
        db = grad if grad.shape == ctx.b_shape else ctx.backend.sum_to_shape(grad, ctx.b_shape)
        return grad, db


class Mul(Function):
    name = "mul"

    @staticmethod
    def forward(ctx, a, b):  # a (...), b a trailing suffix of a.shape
        ctx.save_for_backward(a, b)
        return ctx.backend.mul(a, b)

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        be = ctx.backend
        da = be.mul(grad, b)
        db = be.mul(grad, a)  # grad and a have the same shape: no broadcast here
        if db.shape != b.shape:
            db = be.sum_to_shape(db, b.shape)
        return da, db


class AddScalar(Function):
    name = "add"

    @staticmethod
    def forward(ctx, a, s):
        return ctx.backend.add_scalar(a, s)

    @staticmethod
    def backward(ctx, grad):
        return grad


class MulScalar(Function):
    name = "mul"

    @staticmethod
    def forward(ctx, a, s):
        ctx.s = s
        return ctx.backend.mul_scalar(a, s)

    @staticmethod
    def backward(ctx, grad):
        return ctx.backend.mul_scalar(grad, ctx.s)


class Neg(Function):
    name = "neg"

    @staticmethod
    def forward(ctx, a):
        return ctx.backend.neg(a)

    @staticmethod
    def backward(ctx, grad):
        return ctx.backend.neg(grad)


def add(a, b):
    """a + b. b may be a Python number, or a tensor whose shape is a trailing suffix of
    a's (or the other way round)."""
    _check_float("add", a, "a")
    if _is_number(b):
        return AddScalar.apply(a, float(b))
    _check_float("add", b, "b")
    _check_same_device("add", a, b)
    return Add.apply(*_broadcast_order("add", a, b))


def mul(a, b):
    """a * b elementwise, with the same broadcasting as add; b may be a Python number."""
    _check_float("mul", a, "a")
    if _is_number(b):
        return MulScalar.apply(a, float(b))
    _check_float("mul", b, "b")
    _check_same_device("mul", a, b)
    return Mul.apply(*_broadcast_order("mul", a, b))


def neg(a):
    """-a."""
    _check_float("neg", a)
    return Neg.apply(a)


# ---------------------------------------------------------------------------
# activations
# ---------------------------------------------------------------------------


class ReLU(Function):
    name = "relu"

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return ctx.backend.relu(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return ctx.backend.relu_backward(x, grad)


class GELU(Function):
    name = "gelu"

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return ctx.backend.gelu(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return ctx.backend.gelu_backward(x, grad)


def relu(x):
    """max(x, 0) elementwise."""
    _check_float("relu", x)
    return ReLU.apply(x)


def gelu(x):
    """GELU with the tanh approximation (PyTorch's gelu(x, approximate="tanh"))."""
    _check_float("gelu", x)
    return GELU.apply(x)


# ---------------------------------------------------------------------------
# reductions: sum, mean, max
# ---------------------------------------------------------------------------


class Sum(Function):
    name = "sum"

    @staticmethod
    def forward(ctx, x, axis, keepdims):  # axis: int >= 0 or None
        ctx.in_shape, ctx.axis = x.shape, axis
        return ctx.backend.sum(x, axis, keepdims)

    @staticmethod
    def backward(ctx, grad):  # grad has the output's shape
        return ctx.backend.sum_backward(grad, ctx.in_shape, ctx.axis)


class Max(Function):
    name = "max"

    @staticmethod
    def forward(ctx, x, axis, keepdims, indices_out=None):  # axis: int >= 0 or None
        values, indices = ctx.backend.max(x, axis, keepdims)
        ctx.save_for_backward(indices)
        if indices_out is not None:  # max(x, dim) returns the indices too
            indices_out.append(indices)
        ctx.in_shape, ctx.axis = x.shape, axis
        return values

    @staticmethod
    def backward(ctx, grad):
        (indices,) = ctx.saved_tensors
        return ctx.backend.max_backward(grad, indices, ctx.in_shape, ctx.axis)


def _axes(op, x, axis):
    """None -> None; an int or a tuple of ints -> sorted tuple of axes >= 0."""
    if axis is None:
        return None
    axes = axis if isinstance(axis, (tuple, list)) else (axis,)
    axes = sorted({_normalize_axis(op, a, x.ndim, x.shape) for a in axes})
    if len(axes) != len(axis if isinstance(axis, (tuple, list)) else (axis,)):
        raise ValueError(f"[{op}] repeated axis in {axis}")
    return tuple(axes)


def sum(x, axis=None, keepdims=False, *, dim=None, keepdim=None):
    """Sum over all elements (axis None), one axis or a tuple of axes.
    dim= / keepdim= are PyTorch's names for axis= / keepdims=."""
    _check_float("sum", x)
    axis, keepdims = _pick("sum", axis, dim, keepdims, keepdim)
    axes = _axes("sum", x, axis)
    if axes is None or len(axes) == x.ndim:
        return Sum.apply(x, None, keepdims)
    for a in reversed(axes):  # highest axis first, so the lower ones keep their index
        x = Sum.apply(x, a, keepdims)
    return x


def mean(x, axis=None, keepdims=False, *, dim=None, keepdim=None):
    """sum(x, axis) / (number of elements reduced). dim= / keepdim= as in sum."""
    _check_float("mean", x)
    axis, keepdims = _pick("mean", axis, dim, keepdims, keepdim)
    axes = _axes("mean", x, axis)
    count = 1
    for a in range(x.ndim) if axes is None else axes:
        count *= x.shape[a]
    return MulScalar.apply(sum(x, axes, keepdims), 1.0 / count)


class MaxResult(collections.namedtuple("MaxResult", ["values", "indices"])):
    """What max(x, dim) returns, as in PyTorch: `values, indices = x.max(1)`.
    values is float32 and differentiable; indices is int32 (PyTorch: int64)."""

    __slots__ = ()

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        raise AttributeError(
            f"[max] MaxResult has no {name!r}: x.max(dim) returns (values, indices) as in "
            f"PyTorch; use x.max(dim).values.{name} (or x.argmax(dim) for the indices)"
        )


def max(x, axis=None, keepdims=False, *, dim=None, keepdim=None):
    """PyTorch's meaning: max(x) is the largest element (a tensor); max(x, dim) is a
    MaxResult(values, indices) along dim (dim= / axis=, keepdim= / keepdims=).
    The gradient flows to the first maximum when several are equal."""
    _check_float("max", x)
    if isinstance(axis, autograd.Tensor) or isinstance(dim, autograd.Tensor):
        raise TypeError(
            "[max] camel has no elementwise max(a, b) of two tensors: use (a - b).relu() + b"
        )
    axis, keepdims = _pick("max", axis, dim, keepdims, keepdim)
    if axis is not None:
        axis = _normalize_axis("max", axis, x.ndim, x.shape)
    if x.numel() == 0:
        raise ValueError(f"[max] of an empty tensor (shape {x.shape})")
    if axis is None:
        return Max.apply(x, None, keepdims)
    indices = []  # Max.forward appends its indices storage here
    values = Max.apply(x, axis, keepdims, indices)
    return MaxResult(values, autograd.Tensor._make(indices[0], x.device))


def argmax(x, axis=None, keepdims=False, *, dim=None, keepdim=None):
    """int32 index of the maximum along dim (the first one on ties), as in PyTorch;
    dim None: the index into the flattened tensor. Not differentiable."""
    _check_float("argmax", x)
    axis, keepdims = _pick("argmax", axis, dim, keepdims, keepdim)
    if axis is not None:
        axis = _normalize_axis("argmax", axis, x.ndim, x.shape)
    if x.numel() == 0:
        raise ValueError(f"[argmax] of an empty tensor (shape {x.shape})")
    _, indices = x.backend.max(x.storage, axis, keepdims)
    return autograd.Tensor._make(indices, x.device)


# ---------------------------------------------------------------------------
# softmax family and the loss
# ---------------------------------------------------------------------------


class Softmax(Function):
    name = "softmax"

    @staticmethod
    def forward(ctx, x, causal=False, scale=1.0):  # softmax(scale * x) over the last axis;
        y = ctx.backend.softmax(x, causal, scale)  # causal: x is (..., T, S)
        ctx.save_for_backward(y)
        ctx.causal = causal  # the backward zeroes the masked positions, NaN rows included
        ctx.scale = scale
        return y

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return ctx.backend.softmax_backward(y, grad, ctx.causal, ctx.scale)


class LogSoftmax(Function):
    name = "log_softmax"

    @staticmethod
    def forward(ctx, x):  # over the last axis
        y = ctx.backend.log_softmax(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return ctx.backend.log_softmax_backward(y, grad)


class CrossEntropy(Function):
    name = "cross_entropy"

    @staticmethod
    def forward(ctx, logits, targets):  # logits (N, C) float32, targets (N,) int32
        loss, probs = ctx.backend.cross_entropy(logits, targets)
        ctx.save_for_backward(probs, targets)
        return loss  # shape ()

    @staticmethod
    def backward(ctx, grad):
        probs, targets = ctx.saved_tensors
        return ctx.backend.cross_entropy_backward(probs, targets, grad), None


def _last_axis_op(op, fn, x, axis):
    # The backends work over the last axis; another axis is moved there and back.
    axis = _normalize_axis(op, axis, x.ndim, x.shape) if x.ndim else 0
    if x.ndim == 0:
        raise ValueError(f"[{op}] needs at least one dimension, got a 0-d tensor")
    if axis == x.ndim - 1:
        return fn(x)
    return transpose(fn(transpose(x, axis, -1)), axis, -1)


def softmax(x, axis=None, *, dim=None):
    """exp(x) / sum(exp(x)) along axis (default -1; dim= is PyTorch's name), computed
    stably (the max is subtracted first)."""
    _check_float("softmax", x)
    axis = _pick("softmax", axis, dim)[0]
    axis = -1 if axis is None else axis
    return _last_axis_op("softmax", Softmax.apply, x, axis)


def log_softmax(x, axis=None, *, dim=None):
    """x - logsumexp(x) along axis (default -1; dim= is PyTorch's name), computed stably."""
    _check_float("log_softmax", x)
    axis = _pick("log_softmax", axis, dim)[0]
    axis = -1 if axis is None else axis
    return _last_axis_op("log_softmax", LogSoftmax.apply, x, axis)


def cross_entropy(logits, targets, reduction="mean"):
    """Mean over N of -log softmax(logits)[n, targets[n]].
    logits (N, C) float32, targets (N,) int32 class indices in [0, C). Returns shape ().
    reduction (PyTorch's): "mean" (one fused op), "sum", or "none" for the (N,) losses."""
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(
            f"[cross_entropy] reduction must be 'mean', 'sum' or 'none', got {reduction!r}"
        )
    _check_float("cross_entropy", logits, "logits")
    _check_int("cross_entropy", targets, "targets")
    _check_same_device("cross_entropy", logits, targets)
    if logits.ndim != 2 or targets.ndim != 1 or targets.shape[0] != logits.shape[0]:
        raise ValueError(
            f"[cross_entropy] expects logits (N, C) and targets (N,), got shapes "
            f"{logits.shape} and {targets.shape}"
        )
    if logits.shape[0] == 0:
        raise ValueError("[cross_entropy] the mean over N = 0 rows is undefined")
    n_classes = logits.shape[1]
    if targets.device == "cpu":  # on "mps" the fused kernel checks each target as it reads it
        _check_index_range("cross_entropy", targets, n_classes, f"target (C = {n_classes} classes)")
    if reduction == "none":
        return _cross_entropy_rows(logits, targets)
    loss = CrossEntropy.apply(logits, targets)
    return loss if reduction == "mean" else MulScalar.apply(loss, float(logits.shape[0]))


def _cross_entropy_rows(logits, targets):
    # -log_softmax(logits)[n, targets[n]] for each n, from ops camel has: the (N, C)
    # log-probabilities seen as a table of N * C one-element rows, and an embedding
    # lookup of rows n * C + targets[n]. Reads the targets on the host.
    n, c = logits.shape
    t = targets.numpy()
    if targets.device != "cpu":
        _check_index_range("cross_entropy", targets, c, f"target (C = {c} classes)")
    if n * c > np.iinfo(np.int32).max:
        raise ValueError(f"[cross_entropy] reduction='none' needs N * C < 2**31, got {n} * {c}")
    flat = np.arange(n, dtype=np.int32) * np.int32(c) + t
    table = reshape(log_softmax(logits), (n * c, 1))
    picked = embedding(autograd.Tensor(flat, device=logits.device), table)  # (N, 1)
    return neg(reshape(picked, (n,)))


# ---------------------------------------------------------------------------
# matmul
# ---------------------------------------------------------------------------


class MatMul(Function):
    """out = op(a) @ op(b) where op swaps the last two axes when transpose_a / transpose_b.
    Shapes: 2-D @ 2-D, batched (..., M, K) @ (..., K, N) with equal batch dims, and
    (..., M, K) @ (K, N) (a shared right operand; then no transposes).
    triangle (causal attention only, camel/gemm.py): "lower" for scores = q @ k^T (only
    j <= i is computed; the causal softmax reads nothing else and its gradient is 0 above
    the diagonal) or "a_lower" for P @ v (P is 0 above the diagonal)."""

    name = "matmul"

    @staticmethod
    def forward(ctx, a, b, transpose_a=False, transpose_b=False, triangle=None):
        if triangle is not None and (transpose_a, transpose_b, triangle) not in _TRIANGLE_GRADS:
            raise ValueError(
                f"[matmul] triangle={triangle!r} is for the causal attention products q @ k^T "
                f"('lower', transpose_b) and P @ v ('a_lower'); got transpose_a={transpose_a}, "
                f"transpose_b={transpose_b}"
            )
        ctx.save_for_backward(a, b)
        ctx.ta, ctx.tb, ctx.triangle = transpose_a, transpose_b, triangle
        return ctx.backend.matmul(a, b, transpose_a, transpose_b, triangle)

    @staticmethod
    def backward(ctx, grad):  # grad (..., M, N)
        a, b = ctx.saved_tensors
        be, ta, tb = ctx.backend, ctx.ta, ctx.tb
        if ctx.triangle is not None:  # the same products as below, on their triangles
            tri_a, tri_b = _TRIANGLE_GRADS[(ta, tb, ctx.triangle)]
            if tb:  # S = q k^T: dq = dS k (dS is 0 above the diagonal), dk = dS^T q
                da = be.matmul(grad, b, False, False, tri_a)
                return da, be.matmul(grad, a, True, False, tri_b)
            # O = P v: dP = dO v^T (wanted on the triangle only), dv = P^T dO
            da = be.matmul(grad, b, False, True, tri_a)
            return da, be.matmul(a, grad, True, False, tri_b)
        if b.ndim == 2 and a.ndim > 2:  # shared B: its gradient sums over the batch
            k, n = a.shape[-1], grad.shape[-1]
            da = be.matmul(grad, b, False, True)  # (..., M, N) @ (N, K)
            db = be.matmul(be.reshape(a, (-1, k)), be.reshape(grad, (-1, n)), True, False)
            return da, db
        # C = A @ B gives dA = G @ B^T and dB = A^T @ G; with a stored transposed
        # operand the same products appear transposed (read off C^T = B^T A^T).
        if not ta and not tb:
            return be.matmul(grad, b, False, True), be.matmul(a, grad, True, False)
        if not ta and tb:  # C = A @ B^T, b stored (N, K)
            return be.matmul(grad, b, False, False), be.matmul(grad, a, True, False)
        if ta and not tb:  # C = A^T @ B, a stored (K, M)
            return be.matmul(b, grad, False, True), be.matmul(a, grad, False, False)
        # C = A^T @ B^T
        return be.matmul(b, grad, True, True), be.matmul(grad, a, True, True)


# (transpose_a, transpose_b, triangle) of a causal attention product -> the triangles of
# its two gradient products (dA, dB): see MatMul.backward
_TRIANGLE_GRADS = {
    (False, True, "lower"): ("a_lower", "a_upper"),
    (False, False, "a_lower"): ("lower", "a_upper"),
}


def _matmul_checked(a, b, transpose_a=False, transpose_b=False):
    for name, t in (("a", a), ("b", b)):
        _check_float("matmul", t, name)
        if t.ndim < 2:
            raise ValueError(
                f"[matmul] expects tensors with at least 2 dims, got shapes {a.shape} and "
                f"{b.shape} ({name} is {t.ndim}-D; reshape a vector to (1, n) or (n, 1))"
            )
    _check_same_device("matmul", a, b)
    a_mk = a.shape[:-2] + ((a.shape[-1], a.shape[-2]) if transpose_a else a.shape[-2:])
    b_kn = b.shape[:-2] + ((b.shape[-1], b.shape[-2]) if transpose_b else b.shape[-2:])
    if a_mk[-1] != b_kn[-2]:
        raise ValueError(
            f"[matmul] shapes {a_mk} and {b_kn} do not align: {a_mk[-1]} != {b_kn[-2]}"
        )
    shared_b = b.ndim == 2 and a.ndim > 2
    if shared_b and (transpose_a or transpose_b):
        raise ValueError("[matmul] transposed operands need equal batch dims")
    if not shared_b and a.shape[:-2] != b.shape[:-2]:
        raise ValueError(
            f"[matmul] batch dims {a.shape[:-2]} and {b.shape[:-2]} differ (shapes {a.shape} "
            f"and {b.shape}): camel supports equal batch dims or a 2-D right operand"
        )
    return MatMul.apply(a, b, transpose_a=transpose_a, transpose_b=transpose_b)


def matmul(a, b):
    """a @ b: (M, K) @ (K, N), batched (..., M, K) @ (..., K, N) with equal batch dims
    (3-D, 4-D), or (..., M, K) @ (K, N)."""
    return _matmul_checked(a, b)


class Linear(Function):
    """y = x @ weight^T + bias: one node of the tape for the product and the bias (matmul,
    two reshapes and an add would make four; each node costs the host time on every step).
    The weight is read transposed by the matmul itself (transpose_b), so no transposed copy
    of it is made, forward or backward."""

    name = "linear"

    @staticmethod
    def forward(ctx, x, weight, bias):  # x (..., in), weight (out, in), bias (out,) or None
        be = ctx.backend
        n_in, n_out = weight.shape[1], weight.shape[0]
        x2 = be.reshape(x, (math.prod(x.shape[:-1]), n_in))  # (N, in)
        ctx.save_for_backward(x2, weight)
        ctx.x_shape, ctx.has_bias = x.shape, bias is not None
        y = be.matmul(x2, weight, False, True)  # (N, out)
        if bias is not None:
            y = be.add(y, bias)
        return be.reshape(y, x.shape[:-1] + (n_out,))

    @staticmethod
    def backward(ctx, grad):  # grad (..., out)
        x2, weight = ctx.saved_tensors
        be = ctx.backend
        g2 = be.reshape(grad, (x2.shape[0], weight.shape[0]))  # (N, out)
        dx = be.reshape(be.matmul(g2, weight, False, False), ctx.x_shape)  # dy W
        dw = be.matmul(g2, x2, True, False)  # dyᵀ x  (out, in)
        if not ctx.has_bias:
            return dx, dw
        return dx, dw, be.sum_to_shape(g2, (weight.shape[0],))  # the bias: sum over rows


def linear(x, weight, bias=None):
    """x @ weight^T + bias, PyTorch's layout: x (..., in), weight (out, in), bias (out,)."""
    _check_float("linear", x, "x")
    _check_float("linear", weight, "weight")
    if x.ndim < 1 or weight.ndim != 2 or x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"[linear] expects x (..., in) and weight (out, in), got shapes {x.shape} and "
            f"{weight.shape}: x must end in in = {weight.shape[1] if weight.ndim == 2 else '?'}"
        )
    tensors = (x, weight)
    if bias is not None:
        _check_float("linear", bias, "bias")
        if bias.shape != (weight.shape[0],):
            raise ValueError(
                f"[linear] bias must have shape ({weight.shape[0]},) for weight "
                f"{weight.shape}, got {bias.shape}"
            )
        tensors += (bias,)
    _check_same_device("linear", *tensors)
    return Linear.apply(x, weight, bias)


# ---------------------------------------------------------------------------
# layer norm and embedding
# ---------------------------------------------------------------------------


class LayerNorm(Function):
    name = "layer_norm"

    @staticmethod
    def forward(ctx, x, weight, bias, eps):  # x (..., D), weight (D,), bias (D,)
        out, mean, rstd = ctx.backend.layer_norm(x, weight, bias, eps)
        ctx.save_for_backward(x, weight, mean, rstd)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight, mean, rstd = ctx.saved_tensors
        return ctx.backend.layer_norm_backward(grad, x, weight, mean, rstd)


def layer_norm(x, weight, bias, eps=1e-5):
    """(x - mean) / sqrt(var + eps) * weight + bias over the last axis (biased variance).
    x (..., D), weight (D,), bias (D,)."""
    _check_float("layer_norm", x, "x")
    _check_float("layer_norm", weight, "weight")
    _check_float("layer_norm", bias, "bias")
    _check_same_device("layer_norm", x, weight, bias)
    if x.ndim < 1 or weight.shape != (x.shape[-1],) or bias.shape != (x.shape[-1],):
        raise ValueError(
            f"[layer_norm] expects x (..., D) with weight (D,) and bias (D,), got shapes "
            f"{x.shape}, {weight.shape} and {bias.shape}"
        )
    if not eps > 0:
        raise ValueError(f"[layer_norm] eps must be positive, got {eps}")
    return LayerNorm.apply(x, weight, bias, float(eps))


class Embedding(Function):
    name = "embedding"

    @staticmethod
    def forward(ctx, idx, weight):  # idx int32 (...), weight (V, D) -> (..., D)
        ctx.save_for_backward(idx)
        ctx.num_embeddings = weight.shape[0]
        return ctx.backend.embedding(idx, weight)

    @staticmethod
    def backward(ctx, grad):
        (idx,) = ctx.saved_tensors
        return None, ctx.backend.embedding_backward(grad, idx, ctx.num_embeddings)


def embedding(idx, weight):
    """Rows of weight (V, D) picked by int32 indices idx (...) -> (..., D)."""
    _check_int("embedding", idx, "indices")
    _check_float("embedding", weight, "weight")
    _check_same_device("embedding", idx, weight)
    if weight.ndim != 2:
        raise ValueError(f"[embedding] weight must be (V, D), got shape {weight.shape}")
    _check_index_range("embedding", idx, weight.shape[0], f"index (V = {weight.shape[0]} rows)")
    return Embedding.apply(idx, weight)


# ---------------------------------------------------------------------------
# attention: the naive path (four ops, each with its own backward) or flash
# ---------------------------------------------------------------------------


class FlashAttention(Function):
    """Flash attention (Stage 5B): camel/flash.py's fused kernels on the device arrays. The
    forward keeps lse (B, H, T), never a (T, S) matrix; the backward recomputes P from it."""

    name = "flash_attention"

    @staticmethod
    def forward(ctx, q, k, v, causal, rung):  # (B, H, T, D), (B, H, S, D) x2
        from camel import flash

        out, lse = flash.forward(q, k, v, causal, rung)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.causal = causal
        return out

    @staticmethod
    def backward(ctx, grad):
        from camel import flash

        q, k, v, out, lse = ctx.saved_tensors
        return flash.backward(q, k, v, out, lse, flash.contiguous16(grad), ctx.causal)


def _flash_attention(q, k, v, causal, rung):
    """Flash attention on "mps" Tensors q (B, H, T, D), k, v (B, H, S, D) -> (B, H, T, D),
    differentiable. rung: a name from camel.flash.names(), or "flash"."""
    from camel import flash

    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.device != "mps":
            raise ValueError(
                f"[flash] flash attention runs on 'mps'; {name} is on {x.device!r} "
                f"(shape {x.shape}); move it with .to('mps') or use CAMEL_ATTENTION=naive"
            )
    flash.check_shapes(q.shape, k.shape, v.shape)
    return FlashAttention.apply(q, k, v, bool(causal), rung)


def scaled_dot_product_attention(q, k, v, causal=False):
    """softmax(q @ k^T / sqrt(D) [+ causal mask]) @ v.
    q (B, H, T, D), k (B, H, S, D), v (B, H, S, Dv) -> (B, H, T, Dv).
    causal: query t sees keys s <= t (top-left aligned, like PyTorch's is_causal)."""
    op = "scaled_dot_product_attention"
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_float(op, t, name)
    _check_same_device(op, q, k, v)
    ok = (
        q.ndim == k.ndim == v.ndim
        and q.ndim >= 2
        and q.shape[:-2] == k.shape[:-2] == v.shape[:-2]
        and q.shape[-1] == k.shape[-1]
        and k.shape[-2] == v.shape[-2]
    )
    if not ok:
        raise ValueError(
            f"[{op}] expects q (B, H, T, D), k (B, H, S, D), v (B, H, S, Dv), got shapes "
            f"{q.shape}, {k.shape} and {v.shape}"
        )
    # CAMEL_ATTENTION picks the path: "naive" (the four ops below, Stage 5A), "flash" or one
    # flash rung such as "flash_v3" (camel/flash.py, Stage 5B: fused kernels, no (T, S) matrix
    # in memory). Unset: flash on "mps" where the head dim has flash kernels, else naive.
    mode = config.attention()
    if mode != "naive":
        from camel import flash  # imported here: Stage 5B is optional

        rung = flash.select(op, mode, q, k, v)  # None: naive; ValueError: unknown mode
        if rung is not None:
            return _flash_attention(q, k, v, causal, rung)
    # causal: each product computes only its triangle (camel/gemm.py: the scores on and
    # below the diagonal; P @ v stops its K loop there, P being 0 above it; the backward's
    # products likewise), about half the work at T = S.
    scores = MatMul.apply(q, k, transpose_b=True, triangle="lower" if causal else None)
    scale = 1.0 / math.sqrt(q.shape[-1])  # applied inside the softmax: no pass of its own
    att = Softmax.apply(scores, causal, scale)  # (B, H, T, S) = softmax(scale * scores)
    return MatMul.apply(att, v, triangle="a_lower" if causal else None)  # (B, H, T, Dv)


# ---------------------------------------------------------------------------
# layout: reshape, permute / transpose, slicing, device transfer
# ---------------------------------------------------------------------------


class Reshape(Function):
    name = "reshape"

    @staticmethod
    def forward(ctx, x, shape):
        ctx.in_shape = x.shape
        return ctx.backend.reshape(x, shape)

    @staticmethod
    def backward(ctx, grad):
        return ctx.backend.reshape(grad, ctx.in_shape)


class Permute(Function):
    name = "permute"

    @staticmethod
    def forward(ctx, x, dims):
        ctx.dims = dims
        return ctx.backend.permute(x, dims)

    @staticmethod
    def backward(ctx, grad):
        inverse = tuple(np.argsort(ctx.dims).tolist())  # undo the permutation
        return ctx.backend.permute(grad, inverse)


class GetItem(Function):
    name = "getitem"

    @staticmethod
    def forward(ctx, x, starts, steps, counts, out_shape):
        ctx.in_shape, ctx.starts, ctx.steps, ctx.counts = x.shape, starts, steps, counts
        out = ctx.backend.slice(x, starts, steps, counts)  # (counts...)
        return out if out_shape == counts else ctx.backend.reshape(out, out_shape)

    @staticmethod
    def backward(ctx, grad):
        be = ctx.backend
        grad = be.reshape(grad, ctx.counts)  # put integer-indexed axes back as size 1
        return be.slice_backward(grad, ctx.in_shape, ctx.starts, ctx.steps)


class ToDevice(Function):
    name = "to"

    @staticmethod
    def forward(ctx, x, device):
        return get_backend(device).from_numpy(ctx.backend.to_numpy(x))

    @staticmethod
    def backward(ctx, grad):  # grad lives on the target device: bring it back
        return ctx.backend.from_numpy(get_backend(device_of(grad)).to_numpy(grad))


def reshape(x, shape):
    """x with a new shape of the same size; one entry may be -1 (inferred)."""
    _check_tensor("reshape", x)
    shape = tuple(int(n) for n in shape)
    size = x.numel()
    known = 1
    for n in shape:
        known *= n if n != -1 else 1
    bad = shape.count(-1) > 1 or any(n < -1 for n in shape)
    if not bad and -1 in shape:
        bad = known == 0 or size % known != 0
        if not bad:
            shape = tuple(size // known if n == -1 else n for n in shape)
    if bad or math.prod(shape) != size:
        raise ValueError(f"[reshape] cannot reshape {x.shape} ({size} elements) into {shape}")
    if shape == x.shape:
        return x
    return Reshape.apply(x, shape)


def permute(x, dims):
    """Materialised permutation of the axes (a copy, not a view)."""
    _check_tensor("permute", x)
    dims = tuple(_normalize_axis("permute", d, x.ndim, x.shape) for d in dims)
    if sorted(dims) != list(range(x.ndim)):
        raise ValueError(f"[permute] {dims} is not a permutation of the axes of shape {x.shape}")
    return Permute.apply(x, dims)


def transpose(x, d0, d1):
    """Swap axes d0 and d1 (materialised)."""
    _check_tensor("transpose", x)
    d0 = _normalize_axis("transpose", d0, x.ndim, x.shape)
    d1 = _normalize_axis("transpose", d1, x.ndim, x.shape)
    dims = list(range(x.ndim))
    dims[d0], dims[d1] = dims[d1], dims[d0]
    return Permute.apply(x, tuple(dims))


def _normalize_key(shape, key):
    """A basic index (ints, slices, one Ellipsis) -> per-axis (start, step, count) and
    the output shape (integer-indexed axes dropped)."""
    if not isinstance(key, tuple):
        key = (key,)
    for k in key:
        ok = k is Ellipsis or isinstance(k, slice) or isinstance(k, (int, np.integer))
        if not ok or isinstance(k, bool):
            raise TypeError(
                f"[getitem] camel supports basic indexing only (ints, slices, ...), got "
                f"{type(k).__name__}; to gather rows by index tensor use F.embedding"
            )
    if key.count(Ellipsis) > 1:
        raise IndexError("[getitem] an index can only have a single Ellipsis (...)")
    n_index = len(key) - key.count(Ellipsis)
    if n_index > len(shape):
        raise IndexError(f"[getitem] too many indices ({n_index}) for a tensor of shape {shape}")
    fill = (slice(None),) * (len(shape) - n_index)
    if Ellipsis in key:
        i = key.index(Ellipsis)
        key = key[:i] + fill + key[i + 1 :]
    else:
        key = key + fill
    starts, steps, counts, out_shape = [], [], [], []
    for axis, (k, n) in enumerate(zip(key, shape, strict=True)):
        if isinstance(k, slice):
            start, stop, step = k.indices(n)
            count = len(range(start, stop, step))
            out_shape.append(count)
        else:
            if not -n <= k < n:
                raise IndexError(
                    f"[getitem] index {k} is out of range for axis {axis} of size {n} "
                    f"(shape {shape})"
                )
            start, step, count = int(k) % n, 1, 1
        starts.append(start)
        steps.append(step)
        counts.append(count)
    return tuple(starts), tuple(steps), tuple(counts), tuple(out_shape)


class PackedPart(Function):
    name = "packed_part"

    @staticmethod
    def forward(ctx, x, i):
        ctx.in_shape, ctx.i = x.shape, i
        part = math.prod(x.shape[1:])
        return ctx.backend.view(x, i * part, x.shape[1:])

    @staticmethod
    def backward(ctx, grad):
        be = ctx.backend
        grad = be.reshape(grad, (1, *ctx.in_shape[1:]))
        return be.slice_backward(grad, ctx.in_shape, (ctx.i,) + (0,) * (len(ctx.in_shape) - 1),
                                 (1,) * len(ctx.in_shape))  # fmt: skip


def packed_part(x, i):
    """x[i] for a packed intermediate (x of shape (P, ...), e.g. attention's q, k, v as
    (3, B, H, T, D)) as a view of x's memory: no kernel, where x[i] copies. Only for
    tensors no user holds (MultiHeadAttention's own): the contract's indexing makes no
    aliasing views; nothing writes into an intermediate, so this one cannot be told apart."""
    _check_tensor("packed_part", x)
    if x.ndim < 1 or not 0 <= i < x.shape[0]:
        raise IndexError(f"[packed_part] part {i} of a tensor of shape {x.shape}")
    return PackedPart.apply(x, int(i))


def getitem(x, key):
    """x[key] for basic keys: ints, slices (any step), Ellipsis. Returns a copy."""
    _check_tensor("getitem", x)
    starts, steps, counts, out_shape = _normalize_key(x.shape, key)
    return GetItem.apply(x, starts, steps, counts, out_shape)


def to_device(x, device):
    """x copied to device ("cpu" or "mps"); the gradient is copied back."""
    _check_tensor("to", x)
    return ToDevice.apply(x, device)


def __getattr__(name):  # a PyTorch name camel lacks: say what to use instead
    if name == "Tensor":  # F.Tensor, as when this module imported the class from tensor.py
        return autograd.Tensor
    from camel import hints

    raise hints.missing("camel.functional", name)
