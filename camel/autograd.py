"""Tape-based reverse-mode autograd, micrograd-style.

Every differentiable op is a `Function` subclass with `forward` and `backward`
side by side (see camel/functional.py):

    class Mul(Function):
        name = "mul"

        @staticmethod
        def forward(ctx, a, b):             # a, b: raw storages (np.ndarray on "cpu")
            ctx.save_for_backward(a, b)
            return ctx.backend.mul(a, b)    # the output storage

        @staticmethod
        def backward(ctx, grad):            # grad: storage shaped like the output
            a, b = ctx.saved_tensors
            return ctx.backend.mul(grad, b), ctx.backend.mul(grad, a)  # one per Tensor input

`Mul.apply(x, y)` unwraps the Tensors, runs `forward` with the backend module
of their device (camel.backend_cpu or camel.backend_mps), wraps the result in
a new Tensor and, when a gradient is needed, records a `Context` as the
output's `_ctx`: the node of the graph, holding the op, its input Tensors and
what forward saved. The graph IS the tape.

`backward(root, grad)` walks that graph from the root in reverse topological
order, calls each node's `backward` once with the sum of the gradients that
reached it, and accumulates into `.grad` of the leaves (tensors created by the
user with requires_grad=True). Gradients of intermediate tensors are dropped as
soon as they are used, and so are the tensors each node saved: a second
backward through the same graph raises.

Not supported, on purpose: higher-order gradients, in-place ops.
"""

import weakref

_grad_enabled = True

# The tape sits below the Tensor and imports nothing from camel: camel/tensor.py imports
# this module and, once Tensor exists, hands the class over with use_tensor(). Function.apply
# needs it to tell Tensor arguments from the rest and to wrap its results; the ops in
# camel/functional.py (also below the Tensor) check their arguments against it.
Tensor = None  # camel.tensor.Tensor
device_of = None  # camel.devices.device_of: a storage's device, "cpu" or "mps"


def use_tensor(tensor_class, device_of_storage):
    """Called once, by camel/tensor.py right after it defines Tensor."""
    global Tensor, device_of
    Tensor, device_of = tensor_class, device_of_storage


def is_grad_enabled():
    """True unless inside `with camel.no_grad():`."""
    return _grad_enabled


class no_grad:
    """Context manager (and decorator) that stops recording the graph:

    with camel.no_grad():
        y = model(x)        # y.requires_grad is False, nothing is saved
    """

    def __enter__(self):
        global _grad_enabled
        self._previous = _grad_enabled
        _grad_enabled = False

    def __exit__(self, *exc):
        global _grad_enabled
        _grad_enabled = self._previous
        return False

    def __call__(self, fn):
        def wrapper(*args, **kwargs):
            with no_grad():
                return fn(*args, **kwargs)

        return wrapper


class Context:
    """One node of the graph: which op made a tensor, from which inputs, and
    what its forward saved for its backward."""

    def __init__(self, fn, inputs, backend):
        self.fn = fn  # the Function subclass
        self.inputs = inputs  # the Tensor arguments of forward, in order
        self.backend = backend  # camel.backend_cpu or camel.backend_mps
        self._saved = ()
        self.freed = False  # True once backward has run through this node

    def save_for_backward(self, *storages):
        self._saved = storages

    @property
    def saved_tensors(self):
        if self.freed:
            raise RuntimeError(_SECOND_BACKWARD.format(name=self.fn.name))
        return self._saved

    def free(self):
        self._saved = ()
        self.freed = True


_SECOND_BACKWARD = (
    "[autograd] backward through a graph a second time: its saved tensors were freed "
    "after the first backward (op '{name}'). Recompute the forward pass before calling "
    "backward() again."
)


class Function:
    """Base class of every differentiable op. Subclasses define `name` (for error
    messages) and two static methods, `forward(ctx, *args)` and
    `backward(ctx, grad)`. Tensor arguments reach `forward` as raw storages;
    anything else (axes, flags, scalars) is passed through unchanged.
    `backward` returns one gradient storage (or None) per Tensor argument."""

    name = "op"

    @staticmethod
    def forward(ctx, *args):
        raise NotImplementedError

    @staticmethod
    def backward(ctx, grad):
        raise NotImplementedError

    @classmethod
    def apply(cls, *args, **kwargs):
        tensors = [a for a in args if isinstance(a, Tensor)]
        device = tensors[0].device
        needs_grad = False
        for t in tensors:
            if t.device != device:
                raise RuntimeError(
                    f"[{cls.name}] tensors on different devices: {device} and {t.device}; "
                    "move them with .to(device) first"
                )
            needs_grad = needs_grad or t.requires_grad
        needs_grad = needs_grad and _grad_enabled
        ctx = Context(cls, tensors, tensors[0].backend)
        raw = [a.storage if isinstance(a, Tensor) else a for a in args]
        out = cls.forward(ctx, *raw, **kwargs)  # a storage on the same backend
        if not needs_grad:
            return Tensor._make(out, device_of(out))  # no graph: ctx is dropped here
        for t in tensors:  # an input this node saved: its numpy() turns read-only
            if not t.requires_grad and any(s is t.storage for s in ctx._saved):
                t._saved_by.append(weakref.ref(ctx))
        return Tensor._make(out, device_of(out), requires_grad=True, ctx=ctx)


def _topological_order(root):
    """Tensors of the graph below root that need a gradient, each after all of its
    inputs (post-order DFS, iterative so deep graphs do not hit Python's recursion limit)."""
    order, visited = [], set()
    stack = [(root, False)]
    while stack:
        t, inputs_done = stack.pop()
        if inputs_done:
            order.append(t)
            continue
        if id(t) in visited:
            continue
        visited.add(id(t))
        stack.append((t, True))
        if t._ctx is not None:
            for inp in t._ctx.inputs:
                if inp.requires_grad and id(inp) not in visited:
                    stack.append((inp, False))
    return order


def backward(root, grad):
    """Reverse-mode sweep: d(root)/d(leaf) for every leaf that requires grad.
    grad is the storage of d(loss)/d(root), shaped like root."""
    grads = {id(root): grad}  # id(tensor) -> gradient storage reached so far
    for t in reversed(_topological_order(root)):
        g = grads.pop(id(t), None)  # popped: an intermediate grad is freed once used
        if g is None:
            continue  # no path from root carries a gradient here
        ctx = t._ctx
        if ctx is None:  # a leaf: accumulate into .grad
            if t.grad is None:
                t.grad = Tensor._make(g, t.device)
            else:
                t.grad = Tensor._make(t.backend.add(t.grad.storage, g), t.device)
            continue
        if ctx.freed:
            raise RuntimeError(_SECOND_BACKWARD.format(name=ctx.fn.name))
        input_grads = ctx.fn.backward(ctx, g)
        if not isinstance(input_grads, tuple):
            input_grads = (input_grads,)
        ctx.free()
        for inp, ig in zip(ctx.inputs, input_grads, strict=True):
            if ig is None or not inp.requires_grad:
                continue
            if tuple(ig.shape) != inp.shape:
                raise RuntimeError(
                    f"[autograd] {ctx.fn.name}.backward returned a gradient of shape "
                    f"{tuple(ig.shape)} for an input of shape {inp.shape}"
                )
            prev = grads.get(id(inp))
            grads[id(inp)] = ig if prev is None else ctx.backend.add(prev, ig)
