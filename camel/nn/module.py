"""Module, Parameter and the containers Sequential and ModuleList.

A Module is a plain Python object. Its parameters are found by walking its
attributes: a Parameter is a parameter, a Module is searched recursively, and a
list or tuple is searched element by element. Names are PyTorch's dotted names,
``blocks.0.attn.c_attn.weight``, so a camel state_dict lines up with a PyTorch one.
"""

from collections import OrderedDict

import numpy as np

from camel.devices import canonical_device, get_backend
from camel.tensor import Tensor, get_rng

# ----------------------------------------------------------------------------- Parameter


class Parameter(Tensor):
    """A Tensor that a Module learns: ``requires_grad=True`` and found by ``parameters()``.

    Args:
        data: a Tensor (its storage is shared, not copied), NumPy array or nested list.
    """

    def __init__(self, data):
        if not isinstance(data, Tensor):
            data = Tensor(np.asarray(data, dtype=np.float32))
        super().__init__(data, requires_grad=True)

    def _replace_storage(self, array, device):
        """Point this Parameter at a new storage on ``device`` holding a copy of ``array``.
        The Python object stays the same, so optimisers and models keep referring to it."""
        self.storage = get_backend(device).from_numpy(np.ascontiguousarray(array, np.float32))
        self.device = device


def zero_grads(params, set_to_none=True):
    """The body of Module.zero_grad and Optimizer.zero_grad."""
    for p in params:
        if set_to_none or p.grad is None:
            p.grad = None
        else:
            p.grad = Tensor._make(p.backend.full(p.shape, 0.0, "float32"), p.device)


def uniform(shape, bound):
    """float32 array of ``shape`` ~ U(-bound, bound), from camel's seeded generator."""
    return get_rng().uniform(-bound, bound, size=shape).astype(np.float32)


def normal(shape, std=1.0):
    """float32 array of ``shape`` ~ N(0, std^2), from camel's seeded generator."""
    return get_rng().standard_normal(size=shape, dtype=np.float32) * np.float32(std)


def constant(shape, value):
    """float32 array of ``shape`` filled with value."""
    return np.full(shape, value, dtype=np.float32)


# ----------------------------------------------------------------------------- Module


class Module:
    """Base class of every layer and model: subclass it, set attributes, write ``forward``.

    ``model(x)`` calls ``model.forward(x)``. Parameters, sub-modules and lists of them
    assigned as attributes are found automatically, in assignment order.
    """

    def __init__(self):
        self.training = True

    def forward(self, *args, **kwargs):
        raise NotImplementedError(f"[{type(self).__name__}] subclasses must define forward()")

    def __getattr__(self, name):  # a PyTorch name camel lacks: say what to use instead
        from camel import hints

        raise hints.missing("camel.nn.Module", name)

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    # --- walking the tree -------------------------------------------------------------

    def _members(self):
        """(name, value) pairs to search: the attributes, in assignment order.
        ModuleList and Sequential override this to name their items 0, 1, 2, ..."""
        return vars(self).items()

    def _walk(self, prefix=""):
        """Yield (dotted name, object) for every Parameter and Module below self."""
        for name, value in self._members():
            yield from _walk_value(prefix + str(name), value)

    def named_parameters(self, prefix=""):
        """Iterator of (dotted name, Parameter); a parameter shared by two layers appears once."""
        seen = set()
        for name, obj in self._walk(prefix + "." if prefix else ""):
            if isinstance(obj, Parameter) and id(obj) not in seen:
                seen.add(id(obj))
                yield name, obj

    def parameters(self):
        """List of the Parameters (each once), in the order of ``named_parameters``."""
        return [p for _, p in self.named_parameters()]

    def named_modules(self, prefix=""):
        """Iterator of (dotted name, Module), starting with ("", self)."""
        yield prefix, self
        for name, obj in self._walk(prefix + "." if prefix else ""):
            if isinstance(obj, Module):
                yield name, obj

    def modules(self):
        return [m for _, m in self.named_modules()]

    # --- buffers: tensors a module keeps but does not learn -----------------------------

    def register_buffer(self, name, tensor, persistent=True):
        """Keep ``tensor`` (a Tensor or None) as attribute ``name``: not a Parameter (no
        gradient, the optimiser never sees it), but moved by ``to()`` and, when
        ``persistent``, saved and loaded by ``state_dict()`` / ``load_state_dict()``.
        Assigning ``self.name = t`` later keeps it a buffer, as in PyTorch."""
        where = f"[register_buffer] {type(self).__name__}"
        if not isinstance(name, str) or not name or "." in name:
            raise KeyError(f"{where}: name must be a non-empty string without '.', got {name!r}")
        buffers = vars(self).setdefault("_buffers", {})
        if name not in buffers and name in vars(self):
            raise KeyError(f"{where}: attribute {name!r} already exists and is not a buffer")
        if isinstance(tensor, Parameter):
            raise TypeError(f"{where}: {name!r} is a Parameter; assign it as an attribute")
        if tensor is not None and not isinstance(tensor, Tensor):
            raise TypeError(
                f"{where}: {name!r} must be a camel Tensor or None, got {type(tensor).__name__}"
            )
        buffers[name] = bool(persistent)
        setattr(self, name, tensor)

    def named_buffers(self, prefix="", persistent_only=False):
        """Iterator of (dotted name, Tensor) for every buffer below self (None ones skipped)."""
        seen = set()
        for mod_name, m in self.named_modules(prefix):
            for name, persistent in vars(m).get("_buffers", {}).items():
                value = getattr(m, name)
                if value is None or id(value) in seen or (persistent_only and not persistent):
                    continue
                seen.add(id(value))
                yield (f"{mod_name}.{name}" if mod_name else name), value

    def buffers(self):
        """List of the buffers, in the order of ``named_buffers``."""
        return [b for _, b in self.named_buffers()]

    # --- modes and gradients -----------------------------------------------------------

    def train(self, mode: bool = True):
        """Set training mode on this module and every sub-module; returns self."""
        for m in self.modules():
            m.training = mode
        return self

    def eval(self):
        """Evaluation mode (``train(False)``); returns self."""
        return self.train(False)

    def zero_grad(self, set_to_none=True):
        """Forget every parameter's gradient: set to None (PyTorch's default), or with
        set_to_none=False fill the existing ones with zeros."""
        zero_grads(self.parameters(), set_to_none)

    # --- devices ------------------------------------------------------------------------

    def to(self, device):
        """Move every parameter to ``device`` ("cpu" or "mps") IN PLACE; returns self.

        Each Parameter stays the same Python object (only its storage moves), so an
        optimiser made before ``to()`` still holds the right parameters: make it before
        or after. Optimiser state (momentum, Adam moments) is created on the parameter's
        device at the first ``step()`` and does not move, so move the model before the
        first step, not in the middle of training.
        """
        device = canonical_device(device)  # "cuda": an alias of "mps" on the CUDA shim
        get_backend(device)  # a clear error for an unknown or unavailable device
        for p in self.parameters():
            if p.device != device:
                grad = p.grad
                p._replace_storage(p.numpy(), device)
                if grad is not None:  # the gradient moves with its parameter
                    p.grad = Tensor(grad.numpy(), device=device)
        moved = {}  # id(old buffer) -> its copy, so a buffer two modules share stays shared
        for m in self.modules():  # buffers are replaced by copies, as in PyTorch
            for name in vars(m).get("_buffers", {}):
                b = getattr(m, name)
                if b is not None and b.device != device:
                    if id(b) not in moved:
                        moved[id(b)] = Tensor(b.detach(), device=device)
                    setattr(m, name, moved[id(b)])
        return self

    def cpu(self):
        """to("cpu"), as in PyTorch."""
        return self.to("cpu")

    # --- saving and loading -------------------------------------------------------------

    def state_dict(self):
        """OrderedDict of dotted name -> NumPy array (a copy) for every parameter, then
        every persistent buffer."""
        state = OrderedDict((name, p.numpy().copy()) for name, p in self.named_parameters())
        for name, b in self.named_buffers(persistent_only=True):
            state[name] = b.numpy().copy()
        return state

    def load_state_dict(self, state):
        """Copy arrays from ``state`` (name -> array) into the parameters, in place.

        Every parameter must be present with its exact shape, and ``state`` must hold no
        other keys; otherwise nothing is loaded and the error names the keys and shapes.
        """
        own = OrderedDict(self.named_parameters())
        buffers = OrderedDict(self.named_buffers(persistent_only=True))
        own.update(buffers)
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        if missing or unexpected:
            raise KeyError(
                f"[load_state_dict] {type(self).__name__}: missing keys {missing}, "
                f"unexpected keys {unexpected}"
            )
        arrays = {}
        for name, p in own.items():
            value = np.asarray(state[name])
            if tuple(value.shape) != tuple(p.shape):
                raise ValueError(
                    f"[load_state_dict] {name}: shape {tuple(value.shape)} in the state dict, "
                    f"{tuple(p.shape)} in the model"
                )
            arrays[name] = value.astype(p.dtype)
        for name, p in own.items():
            if name in buffers:  # new storage, same Tensor: every module sharing it sees it
                p.storage = get_backend(p.device).from_numpy(np.ascontiguousarray(arrays[name]))
            else:
                p._replace_storage(arrays[name], p.device)  # the same Parameter, new values
        return self

    # --- printing -----------------------------------------------------------------------

    def extra_repr(self) -> str:
        return ""

    def __repr__(self) -> str:
        """PyTorch-style: ``Name(extra)`` for a leaf, else one indented line per child."""
        children = [(n, v) for n, v in self._members() if isinstance(v, Module)]
        extra = self.extra_repr()
        if not children:
            return f"{type(self).__name__}({extra})"
        lines = [f"{type(self).__name__}("] + ([f"  {extra}"] if extra else [])
        for name, child in children:
            body = repr(child).replace("\n", "\n  ")
            lines.append(f"  ({name}): {body}")
        return "\n".join(lines) + "\n)"


def _walk_value(name, value):
    if isinstance(value, Parameter):
        yield name, value
    elif isinstance(value, Module):
        yield name, value
        yield from value._walk(name + ".")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from _walk_value(f"{name}.{i}", item)


# ----------------------------------------------------------------------------- containers


class ModuleList(Module):
    """A list of modules, indexed and iterated like a list; names are ``0``, ``1``, ...

    Args:
        modules: an iterable of Modules.
    """

    def __init__(self, modules=()):
        super().__init__()
        self._items = []
        for m in modules:
            self.append(m)

    def append(self, module):
        if not isinstance(module, Module):
            raise TypeError(f"[ModuleList] items must be Modules, got {type(module).__name__}")
        self._items.append(module)
        return self

    def _members(self):
        return [(str(i), m) for i, m in enumerate(self._items)]

    def __getitem__(self, i):
        return self._items[i]

    def __len__(self):
        return len(self._items)

    def __iter__(self):
        return iter(self._items)

    def forward(self, *args, **kwargs):
        raise TypeError("[ModuleList] is a container, not a layer: iterate over it instead")


class Sequential(ModuleList):
    """Modules applied one after another: ``Sequential(a, b, c)(x) == c(b(a(x)))``.

    Args:
        *modules: the Modules, in order; names are ``0``, ``1``, ...
    """

    def __init__(self, *modules):
        super().__init__(modules)

    def forward(self, x):
        for m in self._items:
            x = m(x)
        return x
