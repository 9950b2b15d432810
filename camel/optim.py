"""Optimisers: SGD and Adam with PyTorch's semantics.

The update itself is a backend call done in place on the parameters' storages by the
backend of their device: NumPy on "cpu", a fused Metal kernel on "mps". SGD calls
``sgd_step`` per parameter; Adam calls ``adam_steps`` once for all the parameters that
share a device and a step count (on "mps", one dispatch per 7 of them). This file never
touches the numbers.
"""

import math

from camel.devices import device_of
from camel.nn.module import zero_grads
from camel.tensor import Tensor


class Optimizer:
    """Holds a list of parameters; ``step()`` updates those that have a gradient.

    Args:
        params: an iterable of Parameters (e.g. ``model.parameters()``).
    """

    def __init__(self, params, name):
        self.params = list(params)
        if not self.params:
            raise ValueError(f"[{name}] got an empty parameter list")
        seen = {}
        for i, p in enumerate(self.params):
            if not isinstance(p, Tensor):
                raise TypeError(f"[{name}] params[{i}] is a {type(p).__name__}, not a Tensor")
            if not p.requires_grad:
                raise ValueError(f"[{name}] params[{i}] {tuple(p.shape)} has requires_grad=False")
            if id(p) in seen:
                first = seen[id(p)]
                raise ValueError(f"[{name}] params[{i}] is the same tensor as params[{first}]")
            seen[id(p)] = i
        self.name = name
        self.state = {}  # id(param) -> dict of state storages on the param's device

    def __getattr__(self, name):  # a PyTorch name camel lacks: say what to use instead
        from camel import hints

        raise hints.missing("camel.optim.Optimizer", name)

    def zero_grad(self, set_to_none=True):
        """Forget every parameter's gradient: set to None (PyTorch's default), or with
        set_to_none=False fill the existing ones with zeros."""
        zero_grads(self.params, set_to_none)

    def _check_grad(self, name, i, p):
        g = p.grad
        if g.shape != p.shape or g.device != p.device:
            raise ValueError(
                f"[{name}] params[{i}]: grad {tuple(g.shape)} on {g.device} does not match "
                f"param {tuple(p.shape)} on {p.device}"
            )
        return g

    def _check_state_device(self, i, p, storage):
        # State is made on the param's device at its first step; the backend kernels
        # need param, grad and state on one device.
        if storage is not None and device_of(storage) != p.device:
            raise RuntimeError(
                f"[{self.name}] params[{i}] {tuple(p.shape)} is on {p.device} but its optimiser "
                f"state is on {device_of(storage)}: the model was moved after the first step(); "
                "move it before training, or make a new optimiser"
            )


def __getattr__(name):  # a PyTorch name camel lacks: say what to use instead
    from camel import hints

    raise hints.missing("camel.optim", name)


def _check_range(name, what, value, low, high=math.inf):
    if not low <= value < high:
        raise ValueError(f"[{name}] {what} must be in [{low}, {high}), got {value}")


class SGD(Optimizer):
    """Stochastic gradient descent with optional momentum and L2 weight decay.

    Per parameter ``p`` with gradient ``g`` (torch.optim.SGD, dampening 0, no Nesterov)::

        g = g + weight_decay * p
        buf = g                 (first step)   |   buf = momentum * buf + g   (later)
        p = p - lr * buf        (p - lr * g when momentum == 0)

    Args:
        params: iterable of Parameters.
        lr: learning rate.
        momentum: momentum factor (default 0).
        weight_decay: L2 penalty added to the gradient (default 0).
    """

    def __init__(self, params, lr, momentum=0.0, weight_decay=0.0):
        super().__init__(params, "SGD")
        _check_range("SGD", "lr", lr, 0.0)
        _check_range("SGD", "momentum", momentum, 0.0)
        _check_range("SGD", "weight_decay", weight_decay, 0.0)
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay

    def step(self):
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue  # not used in this forward pass: leave it and its state alone
            g = self._check_grad("SGD", i, p)
            backend = p.backend
            state = self.state.get(id(p))
            first = state is None
            if first:
                buf = backend.full(p.shape, 0.0, "float32") if self.momentum != 0 else None
                state = self.state[id(p)] = {"momentum_buf": buf}
            self._check_state_device(i, p, state["momentum_buf"])
            backend.sgd_step(
                p.storage,
                g.storage,
                state["momentum_buf"],
                self.lr,
                self.momentum,
                self.weight_decay,
                first,
            )


class Adam(Optimizer):
    """Adam with bias correction and L2 weight decay (torch.optim.Adam, amsgrad=False).

    Per parameter ``p`` with gradient ``g``, at step t = 1, 2, ...::

        g = g + weight_decay * p
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g^2
        p = p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

    Args:
        params: iterable of Parameters.
        lr: learning rate (default 1e-3).
        betas: (beta1, beta2), decay of the moment averages (default (0.9, 0.999)).
        eps: added to the denominator (default 1e-8).
        weight_decay: L2 penalty added to the gradient (default 0; this is Adam, not AdamW).
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        super().__init__(params, "Adam")
        _check_range("Adam", "lr", lr, 0.0)
        _check_range("Adam", "betas[0]", betas[0], 0.0, 1.0)
        _check_range("Adam", "betas[1]", betas[1], 0.0, 1.0)
        _check_range("Adam", "eps", eps, 0.0)
        _check_range("Adam", "weight_decay", weight_decay, 0.0)
        self.lr, self.betas, self.eps, self.weight_decay = lr, tuple(betas), eps, weight_decay

    def step(self):
        # The parameters that share a device and a step count are updated together: one
        # backend call (on "mps", a few dispatches for all of them: adam_step_tensors).
        together = {}  # (backend, step count) -> [(param, grad, m, v) storages]
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue  # PyTorch skips it too, and its step count does not advance
            g = self._check_grad("Adam", i, p)
            backend = p.backend
            state = self.state.get(id(p))
            if state is None:
                state = self.state[id(p)] = {
                    "step": 0,
                    "m": backend.full(p.shape, 0.0, "float32"),  # first moment
                    "v": backend.full(p.shape, 0.0, "float32"),  # second moment
                }
            self._check_state_device(i, p, state["m"])
            state["step"] += 1
            together.setdefault((backend, state["step"]), []).append(
                (p.storage, g.storage, state["m"], state["v"])
            )
        beta1, beta2 = self.betas
        for (backend, step), tensors in together.items():
            backend.adam_steps(tensors, self.lr, beta1, beta2, self.eps, self.weight_decay, step)
