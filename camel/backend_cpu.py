"""The CPU backend: the narrow waist of camel, in NumPy.

Every differentiable op in camel (camel/functional.py) is written in terms of
the functions in this file, forward and backward. `camel/backend_mps.py`
implements the SAME functions with the SAME signatures over
`camel.metal.DeviceArray`, each as one or more Metal kernels. Nothing above
the backends knows which one runs: `Tensor` picks the module by device.

Rules of the contract (both backends)
- "storage" below is an `np.ndarray` here and a `camel.metal.DeviceArray` on
  "mps". Data is float32, indices are int32 (the docstrings say which). The
  layout functions (from_numpy, to_numpy, full, copy, reshape, permute, slice)
  take int32 storages too: index tensors get sliced and reshaped
  (`tokens[:, :-1]`, `targets.reshape(-1)`). Shapes may be () (0-d), e.g. a
  loss or a full sum: a 0-d result is still a storage, never a Python scalar.
- Inputs are C-contiguous and never modified, except the optimiser steps
  (`sgd_step`, `adam_step`), which update their buffers in place.
- Outputs are new, C-contiguous storages (never a view of an input), except
  `reshape` and `view`, which share the input's memory (camel never writes into a
  storage after creating it, so sharing is safe; `view` only ever sees an
  intermediate no user holds: functional.packed_part).
- Arguments are explicit: shapes, axes (already normalised to be >= 0),
  flags and Python scalars. No callbacks, no NumPy-only types.
- No validation here: camel/functional.py checks shapes, dtypes and devices
  once, for both backends, and raises errors that teach.

Broadcasting is the minimal "trailing suffix" rule: in `add(a, b)` and
`mul(a, b)`, b.shape is a trailing suffix of a.shape (e.g. a (B, T, C) and
b (C,) or (T, C)), so element i of a pairs with element i % b.size of b.
The gradient of b is `sum_to_shape(grad, b.shape)`.

The functions, grouped (shapes use ... for any leading dims)

  transfer and creation
    from_numpy(arr) -> storage                 copy of a contiguous array
    to_numpy(x) -> np.ndarray                  host view/copy for reading
    full(shape, value, dtype) -> storage       fill; zeros = full(shape, 0, ...)
    copy(x) -> storage
    reshape(x, shape) -> storage               same data, new shape
    view(x, start, shape) -> storage           x's elements start .. start + size(shape) - 1
  elementwise
    add(a, b), mul(a, b)                       b.shape a trailing suffix of a.shape
    add_scalar(a, s), mul_scalar(a, s)         s: Python float
    neg(a)
    relu(x), relu_backward(x, grad)
    gelu(x), gelu_backward(x, grad)            tanh approximation
  reductions
    sum(x, axis, keepdims), sum_backward(grad, in_shape, axis)
    max(x, axis, keepdims) -> (values, indices), max_backward(grad, indices, in_shape, axis)
    sum_to_shape(grad, shape)                  sum over leading axes
  layout
    permute(x, dims)                           materialised transpose
    slice(x, starts, steps, counts), slice_backward(grad, in_shape, starts, steps)
  matmul
    matmul(a, b, transpose_a=False, transpose_b=False)
  softmax family (always over the last axis)
    softmax(x, causal=False, scale=1.0), softmax_backward(y, grad, causal=False, scale=1.0)
    log_softmax(x), log_softmax_backward(y, grad)
    cross_entropy(logits, targets) -> (loss, probs)
    cross_entropy_backward(probs, targets, grad)
  normalisation and embedding
    layer_norm(x, weight, bias, eps) -> (out, mean, rstd)
    layer_norm_backward(grad, x, weight, mean, rstd) -> (dx, dweight, dbias)
    embedding(idx, weight), embedding_backward(grad, idx, num_embeddings)
  optimisers (in place; camel/optim.py calls these)
    sgd_step(param, grad, momentum_buf, lr, momentum, weight_decay, first_step)
    adam_step(param, grad, m, v, lr, beta1, beta2, eps, weight_decay, step)
    adam_steps(tensors, lr, beta1, beta2, eps, weight_decay, step)
                                               adam_step for each (param, grad, m, v)
"""

import builtins
import math

import numpy as np

DEVICE = "cpu"


def _new(x):
    """A fresh C-contiguous ndarray copy of x (a 0-d result stays 0-d, unlike
    np.ascontiguousarray, which turns it into shape (1,))."""
    return np.array(x, order="C", copy=True)


def _c(x):
    """x (a freshly computed result) as a C-contiguous ndarray, copying only if needed.
    NumPy turns 0-d results into scalars (np.float32); storages must stay arrays."""
    return np.asarray(x, order="C")


# ---------------------------------------------------------------------------
# transfer and creation
# ---------------------------------------------------------------------------


def from_numpy(arr):
    """A storage holding a copy of `arr` (float32 or int32, any shape)."""
    return np.array(arr, copy=True, order="C")


def to_numpy(x):
    """The storage as an np.ndarray for reading on the host. On the CPU the
    storage already is one, so this returns it (no copy)."""
    return x


def full(shape, value, dtype):
    """A new storage of `shape` and `dtype` ("float32" or "int32") filled with `value`."""
    return np.full(shape, value, dtype=dtype)


def copy(x):
    """A new storage with the same shape, dtype and values as x."""
    return x.copy()


def reshape(x, shape):
    """x with a new shape of the same size (shape has no -1). May share memory."""
    return x.reshape(shape)


def view(x, start, shape):
    """The run of x's elements (C order) from flat index `start`, seen with `shape`:
    shares x's memory (a contiguous slice, e.g. one of the q, k, v of a packed tensor)."""
    return x.reshape(-1)[start : start + math.prod(shape)].reshape(shape)


# ---------------------------------------------------------------------------
# elementwise
# ---------------------------------------------------------------------------


def _suffix_view(a, b):
    # b.shape is a trailing suffix of a.shape: view a as (rows, b.size) so the
    # pairing a[i] <-> b[i % b.size] is plain NumPy row broadcasting.
    return a.reshape(-1, b.size), b.reshape(1, b.size)


def add(a, b):
    """out = a + b, out.shape = a.shape. b.shape is a trailing suffix of a.shape."""
    if a.shape == b.shape:
        return _c(a + b)
    a2, b2 = _suffix_view(a, b)
    return (a2 + b2).reshape(a.shape)


def mul(a, b):
    """out = a * b, out.shape = a.shape. b.shape is a trailing suffix of a.shape."""
    if a.shape == b.shape:
        return _c(a * b)
    a2, b2 = _suffix_view(a, b)
    return (a2 * b2).reshape(a.shape)


def add_scalar(a, s):
    """out = a + s for a Python float s."""
    return _c(a + np.float32(s))


def mul_scalar(a, s):
    """out = a * s for a Python float s."""
    return _c(a * np.float32(s))


def neg(a):
    """out = -a."""
    return _c(np.negative(a))


def relu(x):
    """out = max(x, 0)."""
    return _c(np.maximum(x, np.float32(0)))


def relu_backward(x, grad):
    """dx = 0 where x <= 0, else grad (the gradient at exactly 0 is 0, and at NaN it is
    grad, like PyTorch's threshold_backward)."""
    return _c(np.where(x <= 0, np.float32(0), grad))


_GELU_C = math.sqrt(2.0 / math.pi)  # sqrt(2/pi)
_GELU_A = 0.044715


def gelu(x):
    """GELU, tanh approximation (PyTorch's approximate="tanh"):
    out = 0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3)))."""
    inner = np.float32(_GELU_C) * (x + np.float32(_GELU_A) * x * x * x)
    return _c(np.float32(0.5) * x * (np.float32(1) + np.tanh(inner)))


def gelu_backward(x, grad):
    """dx = grad * d/dx gelu(x). With u = sqrt(2/pi) * (x + 0.044715 x^3), t = tanh(u):
    d/dx = 0.5 * (1 + t) + 0.5 * x * (1 - t^2) * sqrt(2/pi) * (1 + 3 * 0.044715 * x^2)."""
    c, a = np.float32(_GELU_C), np.float32(_GELU_A)
    x2 = x * x
    t = np.tanh(c * x * (np.float32(1) + a * x2))  # tanh(u)
    dudx = c * (np.float32(1) + np.float32(3) * a * x2)  # du/dx
    d = np.float32(0.5) * (np.float32(1) + t + x * (np.float32(1) - t * t) * dudx)
    return _c(grad * d)


# ---------------------------------------------------------------------------
# reductions
# ---------------------------------------------------------------------------


def sum(x, axis, keepdims):
    """Sum over one axis (an int >= 0) or over everything (axis None, out shape () or
    all-ones with keepdims)."""
    return _c(np.sum(x, axis=axis, keepdims=keepdims, dtype=np.float32))


def sum_backward(grad, in_shape, axis):
    """Gradient of sum: copy grad along the reduced axis back to in_shape.
    grad has the shape of sum's output, with or without keepdims (the same data:
    in_shape with the reduced axis removed or set to 1; all of it for axis None)."""
    keep = tuple(1 if axis is None or i == axis else n for i, n in enumerate(in_shape))
    return _new(np.broadcast_to(grad.reshape(keep), in_shape))


def max(x, axis, keepdims):
    """Maximum over one axis (int >= 0) or everything (axis None).
    Returns (values, indices): indices (int32, same shape as values) is the
    position of the maximum along `axis` (for axis None: the flat index).
    Ties: the FIRST maximum wins, like np.argmax. NaN is larger than every number: a
    line with a NaN gives NaN and the index of its first NaN (np.argmax, torch.max)."""
    if axis is None:
        idx = int(np.argmax(x.reshape(-1)))
        shape = (1,) * x.ndim if keepdims else ()
        values = np.array(x.reshape(-1)[idx], dtype=np.float32).reshape(shape)
        return values, np.array(idx, dtype=np.int32).reshape(shape)
    idx = np.argmax(x, axis=axis, keepdims=True)
    values = np.take_along_axis(x, idx, axis=axis)
    if not keepdims:
        values, idx = values.squeeze(axis), idx.squeeze(axis)
    return _new(values), _new(idx.astype(np.int32))


def max_backward(grad, indices, in_shape, axis):
    """Gradient of max: grad goes to the argmax (the first one on ties), zero elsewhere.
    grad and indices have the values' shape (keepdims or not)."""
    dx = np.zeros(in_shape, dtype=np.float32)
    if axis is None:
        dx.reshape(-1)[int(indices.reshape(-1)[0])] = grad.reshape(-1)[0]
        return dx
    keep = tuple(1 if i == axis else n for i, n in enumerate(in_shape))
    np.put_along_axis(dx, indices.reshape(keep).astype(np.intp), grad.reshape(keep), axis=axis)
    return dx


def sum_to_shape(grad, shape):
    """Sum grad (..., *shape) over its leading axes down to `shape` (a trailing
    suffix of grad.shape): the gradient of a broadcast operand."""
    lead = grad.ndim - len(shape)
    return _new(grad.reshape(-1, *shape).sum(axis=0) if lead else grad)


# ---------------------------------------------------------------------------
# layout
# ---------------------------------------------------------------------------


def permute(x, dims):
    """Materialised transpose: out = x.transpose(dims), C-contiguous."""
    return _new(np.transpose(x, dims))


def _slices(starts, steps, counts):
    # (start, step, count) per axis -> Python slices. A negative step can end
    # "before index 0", which a slice spells as stop=None.
    out = []
    for start, step, count in zip(starts, steps, counts, strict=True):
        stop = start + step * count
        out.append(builtins.slice(start, None if stop < 0 else stop, step))
    return tuple(out)


def slice(x, starts, steps, counts):
    """Strided copy: out[i0, i1, ...] = x[starts[0] + i0 * steps[0], ...], out.shape =
    counts. One (start, step, count) per axis of x; steps may be negative, never 0."""
    return _new(x[_slices(starts, steps, counts)])


def slice_backward(grad, in_shape, starts, steps):
    """Gradient of slice: zeros of in_shape with grad written at the sliced positions
    (a basic slice never repeats a position, so writing is enough)."""
    dx = np.zeros(in_shape, dtype=np.float32)
    dx[_slices(starts, steps, grad.shape)] = grad
    return dx


# ---------------------------------------------------------------------------
# matmul
# ---------------------------------------------------------------------------


def matmul(a, b, transpose_a=False, transpose_b=False, triangle=None):
    """out = op(a) @ op(b), op(x) = x with its last two axes swapped when transpose_x.
    Supported (after op): (M, K) @ (K, N) -> (M, N);
    batched (..., M, K) @ (..., K, N) -> (..., M, N) with equal batch dims (3-D, 4-D);
    (..., M, K) @ (K, N) -> (..., M, N) (a shared right operand, e.g. x @ W).
    triangle (the causal attention products, camel/gemm.py): "lower": only C[i, j] with
    j <= i is wanted, and here everything above the diagonal is NaN (on the GPU whole tiles
    there are left unwritten), so a caller that reads it fails loudly; "a_lower" / "a_upper":
    op(a) is promised zero above / below the diagonal, and here the whole of it is used
    (the GPU skips K tiles there): the same for finite inputs, and with a NaN row of P
    (whose masked entries are NaN too) the full composition, as PyTorch's masked_fill then
    softmax then matmul."""
    if transpose_a:
        a = np.swapaxes(a, -1, -2)
    if transpose_b:
        b = np.swapaxes(b, -1, -2)
    if triangle not in (None, "lower", "a_lower", "a_upper"):
        raise ValueError(f"[matmul] triangle must be None, 'lower', 'a_lower' or 'a_upper', "
                         f"got {triangle!r}")  # fmt: skip
    out = _c(np.matmul(a, b))
    if triangle == "lower":
        m, n = out.shape[-2:]
        out[..., np.triu(np.ones((m, n), dtype=bool), k=1)] = np.nan
    return out


# ---------------------------------------------------------------------------
# softmax family: always over the last axis
# ---------------------------------------------------------------------------


def softmax(x, causal=False, scale=1.0):
    """softmax(scale * x) over the last axis, numerically stable (subtract the row max);
    scale * x is rounded to float32 first, as a separate scaling op would store it.
    causal=True: x is (..., T, S) attention scores and row i only sees columns
    j <= i (top-left aligned mask, like PyTorch's is_causal): masked_fill(-inf),
    then softmax, so masked entries are 0 (NaN only in a row whose visible part
    gives NaN, as in PyTorch) and whatever x holds there is never used."""
    if scale != 1.0:
        x = (x * np.float32(scale)).astype(np.float32)
    if causal:
        t, s = x.shape[-2], x.shape[-1]
        mask = np.triu(np.ones((t, s), dtype=bool), k=1)  # True where j > i
        x = np.where(mask, np.float32(-np.inf), x)
    e = np.exp(x - np.max(x, axis=-1, keepdims=True))
    return (e / np.sum(e, axis=-1, keepdims=True)).astype(np.float32)


def softmax_backward(y, grad, causal=False, scale=1.0):
    """y = softmax(scale * x, causal). dx = scale * y * (grad - sum(grad * y, last axis));
    with causal, the sum runs over the visible columns only (grad there is never used:
    a causal attention does not compute it) and dx is exactly 0 at the masked positions
    (masked_fill's gradient), even in a NaN row."""
    gy = grad * y
    if causal:
        t, s = y.shape[-2], y.shape[-1]
        mask = np.triu(np.ones((t, s), dtype=bool), k=1)
        gy = np.where(mask, np.float32(0), gy)
    dot = np.sum(gy, axis=-1, keepdims=True)
    dx = (y * (grad - dot)).astype(np.float32)
    if scale != 1.0:
        dx = (dx * np.float32(scale)).astype(np.float32)
    if causal:
        dx[..., mask] = 0
    return dx


def log_softmax(x):
    """log_softmax over the last axis: x - max - log(sum(exp(x - max)))."""
    shifted = x - np.max(x, axis=-1, keepdims=True)
    return (shifted - np.log(np.sum(np.exp(shifted), axis=-1, keepdims=True))).astype(np.float32)


def log_softmax_backward(y, grad):
    """y = log_softmax(x). dx = grad - exp(y) * sum(grad, last axis)."""
    return (grad - np.exp(y) * np.sum(grad, axis=-1, keepdims=True)).astype(np.float32)


def cross_entropy(logits, targets):
    """Mean cross-entropy over N rows. logits (N, C) float32, targets (N,) int32 in [0, C).
    loss = mean_n( logsumexp(logits[n]) - logits[n, targets[n]] ), a shape () storage.
    Returns (loss, probs): probs (N, C) = softmax(logits), all the backward needs."""
    n = logits.shape[0]
    m = np.max(logits, axis=1, keepdims=True)  # (N, 1)
    e = np.exp(logits - m)  # (N, C), every entry <= 1: no overflow
    s = np.sum(e, axis=1, keepdims=True)  # (N, 1)
    logsumexp = (m + np.log(s))[:, 0]  # (N,)
    picked = logits[np.arange(n), targets]  # (N,)
    loss = np.float32(np.mean(logsumexp - picked, dtype=np.float32))
    return np.array(loss, dtype=np.float32), (e / s).astype(np.float32)


def cross_entropy_backward(probs, targets, grad):
    """dlogits (N, C) = (probs - onehot(targets)) * grad / N, grad a shape () storage."""
    n = probs.shape[0]
    d = probs.copy()
    d[np.arange(n), targets] -= np.float32(1)
    return (d * (grad.reshape(()) / np.float32(n))).astype(np.float32)


# ---------------------------------------------------------------------------
# normalisation and embedding
# ---------------------------------------------------------------------------


def layer_norm(x, weight, bias, eps):
    """LayerNorm over the last axis. x (..., D), weight (D,), bias (D,).
    out = (x - mean) * rstd * weight + bias with rstd = 1 / sqrt(var + eps), var biased.
    Returns (out (..., D), mean (...), rstd (...))."""
    mean = np.mean(x, axis=-1, keepdims=True)  # (..., 1)
    xc = x - mean
    var = np.mean(xc * xc, axis=-1, keepdims=True)
    rstd = (np.float32(1) / np.sqrt(var + np.float32(eps))).astype(np.float32)
    out = (xc * rstd * weight + bias).astype(np.float32)
    return out, _new(mean[..., 0]), _new(rstd[..., 0])


def layer_norm_backward(grad, x, weight, mean, rstd):
    """Gradients of layer_norm. grad and x (..., D), weight (D,), mean and rstd (...).
    With xhat = (x - mean) * rstd and g = grad * weight:
      dx = rstd * (g - mean_D(g) - xhat * mean_D(g * xhat))
      dweight = sum over rows of grad * xhat, dbias = sum over rows of grad."""
    d = x.shape[-1]
    xhat = (x - mean[..., None]) * rstd[..., None]  # (..., D)
    g = grad * weight  # (..., D)
    mg = np.mean(g, axis=-1, keepdims=True)
    mgx = np.mean(g * xhat, axis=-1, keepdims=True)
    dx = (rstd[..., None] * (g - mg - xhat * mgx)).astype(np.float32)
    dweight = np.sum((grad * xhat).reshape(-1, d), axis=0, dtype=np.float32)
    dbias = np.sum(grad.reshape(-1, d), axis=0, dtype=np.float32)
    return dx, dweight, dbias


def embedding(idx, weight):
    """Gather rows: out[..., :] = weight[idx[...], :]. idx int32 (...) in [0, V),
    weight (V, D) -> out (..., D)."""
    return weight[idx]


def embedding_backward(grad, idx, num_embeddings):
    """Scatter-add: dweight (V, D) with dweight[v] = sum of grad rows whose idx == v.
    Deterministic: rows are added in index order (np.add.at)."""
    d = grad.shape[-1]
    dweight = np.zeros((num_embeddings, d), dtype=np.float32)
    np.add.at(dweight, idx.reshape(-1), grad.reshape(-1, d))
    return dweight


# ---------------------------------------------------------------------------
# optimisers: update param (and state buffers) IN PLACE, PyTorch's formulas
# ---------------------------------------------------------------------------


def sgd_step(param, grad, momentum_buf, lr, momentum, weight_decay, first_step):
    """One SGD step, in place, as torch.optim.SGD (dampening=0, nesterov=False):
      g = grad + weight_decay * param
      if momentum != 0: buf = g if first_step else momentum * buf + g; g = buf
      param -= lr * g
    momentum_buf (same shape) is updated in place; it may be None when momentum == 0."""
    g = grad + np.float32(weight_decay) * param if weight_decay != 0 else grad
    if momentum != 0:
        if first_step:
            momentum_buf[...] = g
        else:
            momentum_buf *= np.float32(momentum)
            momentum_buf += g
        g = momentum_buf
    param -= np.float32(lr) * g


def adam_step(param, grad, m, v, lr, beta1, beta2, eps, weight_decay, step):
    """One Adam step, in place, as torch.optim.Adam (L2 weight decay, amsgrad=False).
    step counts from 1.
      g = grad + weight_decay * param
      m = m + (1 - beta1) * (g - m)      (= beta1 * m + (1 - beta1) * g)
      v = beta2 * v + (1 - beta2) * g^2
      param -= lr / (1 - beta1^step) * m / (sqrt(v) / sqrt(1 - beta2^step) + eps)"""
    g = grad + np.float32(weight_decay) * param if weight_decay != 0 else grad
    bias1 = 1 - beta1**step
    bias2_sqrt = math.sqrt(1 - beta2**step)
    # One scratch array `t` serves every intermediate: the step is memory-bound and a
    # temporary per operation would double its cost.
    t = np.subtract(g, m)
    t *= np.float32(1 - beta1)
    m += t  # torch: m.lerp_(g, 1 - beta1)
    np.multiply(g, np.float32(1 - beta2), out=t)
    t *= g
    v *= np.float32(beta2)
    v += t  # beta2 * v + (1 - beta2) * g^2
    np.sqrt(v, out=t)
    t /= np.float32(bias2_sqrt)
    t += np.float32(eps)  # denom
    np.divide(m, t, out=t)
    t *= np.float32(lr / bias1)
    param -= t


def adam_steps(tensors, lr, beta1, beta2, eps, weight_decay, step):
    """adam_step for each (param, grad, m, v) of a list (the GPU backend updates several
    in one dispatch)."""
    for param, grad, m, v in tensors:
        adam_step(param, grad, m, v, lr, beta1, beta2, eps, weight_decay, step)
