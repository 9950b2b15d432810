"""camel.gradcheck: check autograd against finite differences.

For a function `fn(*inputs) -> Tensor`, every float input with
requires_grad=True is checked element by element:

    analytic  dL/dx[i]  from one backward() through camel's autograd
    numeric   (L(x[i] + eps) - L(x[i] - eps)) / (2 eps)     central differences

A non-scalar output is reduced to one number with a fixed random projection,
L = sum(out * r), so a single backward (with grad=r) checks every output
element at once. The ops themselves run in float32 on the inputs' device; the
projection and the differences are computed in float64 on the CPU, and the
step actually taken (x + eps rounded to float32) is used as the denominator.

Why the loose default tolerances (atol 5e-3, rtol 1e-2): the function itself runs
in float32, so each evaluation carries rounding noise of about 1e-7 * |out|, and
dividing a difference by 2 eps = 2e-3 magnifies it ~500 times. That is enough to
catch a wrong gradient (they are off by O(1)), not to certify the last digits;
the op tests compare with PyTorch for those.
"""

import numpy as np

from camel.autograd import no_grad
from camel.tensor import Tensor


class GradcheckError(AssertionError):
    """Raised when an analytic gradient disagrees with the numeric one."""


def _leaf_copy(x):
    # A fresh leaf so gradcheck never touches the caller's .grad.
    if not isinstance(x, Tensor):
        return x
    return Tensor._make(x.backend.copy(x.storage), x.device, x.requires_grad)


def gradcheck(fn, inputs, eps=1e-3, atol=5e-3, rtol=1e-2, seed=0):
    """Raise GradcheckError naming the input, the worst element, and the analytic and
    numeric values when autograd and central differences disagree by more than
    atol + rtol * |numeric|. Returns True otherwise.

    inputs: a list of arguments for fn; Tensors with requires_grad=True are checked,
    anything else (int32 targets, Python numbers) is passed through unchanged."""
    inputs = list(inputs)
    checked = [i for i, x in enumerate(inputs) if isinstance(x, Tensor) and x.requires_grad]
    if not checked:
        raise ValueError("[gradcheck] no input has requires_grad=True: nothing to check")

    # Analytic gradients: one forward and one backward with grad = r.
    leaves = [_leaf_copy(x) for x in inputs]
    out = fn(*leaves)
    if not isinstance(out, Tensor) or out.dtype != np.float32:
        raise TypeError("[gradcheck] fn must return a float32 camel Tensor")
    rng = np.random.default_rng(seed)
    r = rng.standard_normal(out.shape).astype(np.float32)  # the projection
    r64 = r.astype(np.float64)
    out.backward(Tensor(r, device=out.device))

    def projected(args):  # L = sum(fn(*args) * r) in float64
        with no_grad():
            return float(np.sum(fn(*args).numpy().astype(np.float64) * r64))

    for i in checked:
        x = inputs[i]
        g = leaves[i].grad
        analytic = np.zeros(x.shape) if g is None else g.numpy().astype(np.float64)
        base = x.numpy().astype(np.float32).copy()
        numeric = np.zeros(x.shape, dtype=np.float64)
        args = list(leaves)
        for j in range(base.size):
            plus, minus = base.copy(), base.copy()
            plus.flat[j] += np.float32(eps)
            minus.flat[j] -= np.float32(eps)
            args[i] = Tensor(plus, device=x.device)
            f_plus = projected(args)
            args[i] = Tensor(minus, device=x.device)
            f_minus = projected(args)
            step = float(plus.flat[j]) - float(minus.flat[j])  # the step float32 allowed
            numeric.flat[j] = (f_plus - f_minus) / step
        err = np.abs(analytic - numeric)
        allowed = atol + rtol * np.abs(numeric)
        bad = err > allowed
        if bad.any():
            worst = np.unravel_index(int(np.argmax(err - allowed)), x.shape)
            raise GradcheckError(
                f"[gradcheck] input {i} (shape {x.shape}): gradient mismatch at index "
                f"{tuple(int(w) for w in worst)}: analytic {analytic[worst]:.6g} vs numeric "
                f"{numeric[worst]:.6g} (|diff| {err[worst]:.3g} > atol + rtol * |numeric| = "
                f"{allowed[worst]:.3g}); {int(bad.sum())} of {x.numel()} elements differ"
            )
    return True
