"""camel.Tensor: an n-dimensional array on a device, with autograd.

A Tensor wraps a *storage*: an `np.ndarray` on "cpu", a
`camel.metal.DeviceArray` (a Metal buffer with a shape and a dtype) on "mps".
It never computes anything itself: every op goes through camel/functional.py,
which calls the backend module of the tensor's device, `camel.backend_cpu`
or `camel.backend_mps` (same functions, same signatures).

Dtypes: float32 for data, int32 for indices. Tensors are dense and
C-contiguous; reshape, transpose and slicing return materialised results
(no aliasing views), so every backend op sees plain contiguous memory.
"""

import numbers
import warnings

import numpy as np

from camel import autograd
from camel import functional as F  # the ops: below the Tensor, they never import this module
from camel.devices import DEVICES, canonical_device, device_of, get_backend  # noqa: F401

float32, int32 = np.dtype("float32"), np.dtype("int32")  # camel's two dtypes
_INT32_MIN, _INT32_MAX = np.iinfo(np.int32).min, np.iinfo(np.int32).max

# ---------------------------------------------------------------------------
# host data -> float32 / int32 arrays
# ---------------------------------------------------------------------------


def _as_array(data, dtype=None, stacklevel=3):
    """Python scalars, (nested) lists and ndarrays -> a float32 or int32 ndarray.
    Floats become float32; ints (and int64 arrays) become int32 after a range check;
    bools become float32 (0. / 1.). float16 and unsigned (uint8 pixel) data convert with
    a warning unless dtype ("float32" or "int32") says what to make."""
    arr = np.asarray(data)
    if dtype is not None:
        dtype = _check_dtype(dtype)
        if dtype == np.float32 and arr.dtype.kind in "fbiu":
            return arr.astype(np.float32)
        if dtype == np.int32 and arr.dtype.kind == "b":
            return arr.astype(np.int32)
        if dtype == np.int32 and arr.dtype.kind == "f":
            if not np.isfinite(arr).all():
                raise ValueError("[tensor] dtype=int32 of data holding inf or NaN")
            arr = np.trunc(arr).astype(np.float64)  # toward zero, as PyTorch converts
            if arr.size and (arr.min() < _INT32_MIN or arr.max() > _INT32_MAX):
                raise ValueError("[tensor] dtype=int32: a value does not fit in int32")
            return arr.astype(np.int32)
    elif arr.dtype == np.float16 or arr.dtype.kind == "u":
        kind = "float32 data" if arr.dtype.kind == "f" else "int32 indices"
        advice = (
            "pass dtype=camel.float32 to say so"
            if arr.dtype.kind == "f"
            else "for pixel values pass dtype=camel.float32 (and scale them), for "
            "indices dtype=camel.int32"
        )
        warnings.warn(
            f"[tensor] {arr.dtype} data is stored as {kind} (camel holds float32 data and "
            f"int32 indices); {advice}",
            stacklevel=stacklevel,
        )
    if arr.dtype == np.float32 or arr.dtype == np.int32:
        return arr
    if arr.dtype.kind == "f" or arr.dtype.kind == "b":
        return arr.astype(np.float32)
    if arr.dtype.kind in "iu":
        if arr.size and (arr.min() < _INT32_MIN or arr.max() > _INT32_MAX):
            bad = arr.max() if arr.max() > _INT32_MAX else arr.min()
            raise ValueError(
                f"[tensor] integer value {bad} does not fit in int32 "
                f"[{_INT32_MIN}, {_INT32_MAX}]: camel stores indices as int32"
            )
        return arr.astype(np.int32)
    raise TypeError(
        f"[tensor] cannot make a tensor from dtype {arr.dtype} (from {type(data).__name__}): "
        "camel supports float data (stored as float32) and integer indices (int32)"
    )


def _shape_arg(shape):
    """zeros(2, 3) and zeros((2, 3)) both mean shape (2, 3)."""
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        shape = tuple(shape[0])
    return tuple(int(n) for n in shape)


# ---------------------------------------------------------------------------
# Tensor
# ---------------------------------------------------------------------------


class Tensor:
    """An array on a device ("cpu" or "mps") that can record how it was computed.

    Tensor(data, requires_grad=False, device="cpu") copies `data` (a scalar, a
    list, an ndarray). Tensor(other_tensor) shares other_tensor's storage
    (like detach(); this is how nn.Parameter wraps a tensor).

    Attributes: storage (np.ndarray or DeviceArray), device, requires_grad,
    grad (a Tensor on the same device, or None), _ctx (the autograd node that
    produced this tensor; None for leaves).
    """

    def __init__(self, data, requires_grad=False, device=None):
        if isinstance(data, Tensor):
            storage, dev = data.storage, data.device
            if device is not None and device != dev:
                storage = get_backend(device).from_numpy(data.numpy())
                dev = device
        else:
            dev = "cpu" if device is None else device
            storage = get_backend(dev).from_numpy(_as_array(data))
        self._init(storage, dev, requires_grad, None)

    def _init(self, storage, device, requires_grad, ctx):
        if requires_grad and storage.dtype != np.float32:
            raise TypeError(
                f"[tensor] only float32 tensors can require gradients, got {storage.dtype}"
            )
        self.storage = storage
        self.device = device if device != "cuda" else canonical_device(device)
        self.requires_grad = requires_grad
        self.grad = None
        self._ctx = ctx
        self._saved_by = []  # weakrefs to graph nodes that saved this storage (autograd.py)

    @staticmethod
    def _make(storage, device, requires_grad=False, ctx=None):
        """Wrap an existing storage without copying (used by autograd and the backends)."""
        t = Tensor.__new__(Tensor)
        t._init(storage, device, requires_grad, ctx)
        return t

    # -- properties -------------------------------------------------------------

    @property
    def shape(self):
        return self.storage.shape  # a tuple of ints

    @property
    def ndim(self):
        return len(self.storage.shape)

    @property
    def dtype(self):
        return self.storage.dtype  # a NumPy dtype: float32 or int32

    @property
    def backend(self):
        return get_backend(self.device)

    @property
    def is_leaf(self):
        return self._ctx is None

    def numel(self):
        n = 1
        for d in self.shape:
            n *= d
        return n

    def size(self, dim=None):
        """PyTorch's name for the shape: size() is the shape tuple, size(d) one entry."""
        if dim is None:
            return self.shape
        return self.shape[F._normalize_axis("size", dim, self.ndim, self.shape)]

    def dim(self):
        """PyTorch's name for ndim."""
        return self.ndim

    def __len__(self):
        if self.ndim == 0:
            raise TypeError("[tensor] len() of a 0-d tensor")
        return self.shape[0]

    # -- host access ------------------------------------------------------------

    def numpy(self):
        """The data as an np.ndarray. On "cpu" this IS the storage (shared memory, like
        PyTorch); on "mps" a zero-copy view of the Metal buffer after synchronising.

        Read-only while the graph depends on the values (the tensor requires grad, or a
        recorded op saved it for its backward): writing would change gradients silently.
        t.detach().numpy().copy() is a private, writable copy."""
        arr = self.backend.to_numpy(self.storage)
        if self.requires_grad or self._is_saved_for_backward():
            arr = arr.view(ReadOnlyArray)
            arr.flags.writeable = False
        return arr

    def _is_saved_for_backward(self):
        alive = [r for r in self._saved_by if r() is not None and not r().freed]
        self._saved_by = alive
        return bool(alive)

    def __array__(self, dtype=None, copy=None):
        """np.asarray(t) is t.numpy() (not an object array of 0-d tensors)."""
        arr = self.numpy()
        if dtype is not None and arr.dtype != np.dtype(dtype):
            return arr.astype(dtype)
        return arr.copy() if copy else arr

    # NumPy's operators defer to Tensor's (ndarray * tensor gives camel's error, not an
    # object array); np.exp(t) and other ufuncs raise TypeError.
    __array_ufunc__ = None

    def __bool__(self):
        if self.numel() != 1:
            raise RuntimeError(
                f"[bool] the truth value of a tensor of shape {self.shape} is ambiguous: "
                "only a one-element tensor converts (use .item() or compare on the host)"
            )
        return bool(self.item())

    def __float__(self):
        return float(self.item())

    def __int__(self):
        return int(self.item())

    def item(self):
        if self.numel() != 1:
            raise ValueError(
                f"[item] only a one-element tensor converts to a Python number, "
                f"got shape {self.shape}"
            )
        return self.numpy().reshape(-1)[0].item()

    def tolist(self):
        return self.numpy().tolist()

    def to(self, device):
        """This tensor on `device` (self when it is already there). Differentiable."""
        device = canonical_device(device)
        if device == self.device:
            return self
        get_backend(device)  # a clear error for unknown / unavailable devices
        return F.to_device(self, device)

    def cpu(self):
        """to("cpu"), as in PyTorch."""
        return self.to("cpu")

    def detach(self):
        """The same storage, cut from the graph (requires_grad=False)."""
        return Tensor._make(self.storage, self.device)

    def requires_grad_(self, flag=True):
        """Set requires_grad in place (float32 only) and return self."""
        if flag and self.dtype != np.float32:
            raise TypeError(
                f"[tensor] only float32 tensors can require gradients, got {self.dtype}"
            )
        self.requires_grad = flag
        return self

    def backward(self, grad=None, *, gradient=None, retain_graph=False, create_graph=False):
        """Compute d(self)/d(leaf) for every leaf with requires_grad and add it to leaf.grad.
        grad (PyTorch: gradient=) defaults to 1 for a one-element tensor; pass it for
        anything else. camel has no retain_graph or create_graph: they raise."""
        if gradient is not None:
            if grad is not None:
                raise TypeError("[backward] got both grad and gradient: pass one")
            grad = gradient
        if retain_graph or create_graph:
            what = "retain_graph" if retain_graph else "create_graph"
            raise NotImplementedError(
                f"[backward] camel has no {what}: a graph's saved tensors are freed by its "
                "first backward and there are no higher-order gradients; recompute the "
                "forward pass for a second backward"
            )
        if not self.requires_grad:
            raise RuntimeError(
                "[backward] this tensor does not require grad: no input of the computation "
                "had requires_grad=True (or it ran under camel.no_grad())"
            )
        if grad is None:
            if self.numel() != 1:
                raise RuntimeError(
                    f"[backward] grad can be created implicitly only for a one-element output, "
                    f"got shape {self.shape}: call backward(grad) with a tensor of that shape"
                )
            g = self.backend.full(self.shape, 1.0, "float32")
        else:
            if not isinstance(grad, Tensor):
                grad = Tensor(grad, device=self.device)
            if grad.shape != self.shape or grad.device != self.device:
                raise ValueError(
                    f"[backward] grad has shape {grad.shape} on {grad.device}, expected "
                    f"shape {self.shape} on {self.device}"
                )
            if grad.dtype != np.float32:
                raise TypeError(f"[backward] grad must be float32, got {grad.dtype}")
            g = grad.storage
        autograd.backward(self, g)

    def __repr__(self):
        body = np.array2string(self.numpy(), separator=", ", precision=4, prefix="tensor(")
        extra = f", device='{self.device}'" if self.device != "cpu" else ""
        if self.dtype != np.float32:
            extra += f", dtype={self.dtype}"
        if self._ctx is not None:
            extra += f", grad_fn=<{self._ctx.fn.name}>"
        elif self.requires_grad:
            extra += ", requires_grad=True"
        return f"tensor({body}{extra})"

    # -- shape ops --------------------------------------------------------------

    def reshape(self, *shape):
        return F.reshape(self, _shape_arg(shape))

    def view(self, *shape):
        """Same as reshape (camel has no views: the result never aliases for writes)."""
        return self.reshape(*shape)

    def contiguous(self):
        """self: camel tensors are always dense and C-contiguous."""
        return self

    def unsqueeze(self, dim):
        """A new axis of size 1 at dim (-ndim-1 <= dim <= ndim), as a reshape."""
        dim = F._normalize_axis("unsqueeze", dim, self.ndim + 1, self.shape)
        return self.reshape(self.shape[:dim] + (1,) + self.shape[dim:])

    def squeeze(self, dim=None):
        """Drop axes of size 1 (all of them, or dim if it has size 1), as a reshape."""
        if dim is None:
            return self.reshape(tuple(n for n in self.shape if n != 1))
        dims = dim if isinstance(dim, (tuple, list)) else (dim,)
        drop = {F._normalize_axis("squeeze", d, self.ndim, self.shape) for d in dims}
        return self.reshape(tuple(n for i, n in enumerate(self.shape) if n != 1 or i not in drop))

    def flatten(self, start_dim=0, end_dim=-1):
        """Axes start_dim..end_dim merged into one, as a reshape."""
        if self.ndim == 0:
            return self.reshape(1)
        start = F._normalize_axis("flatten", start_dim, self.ndim, self.shape)
        end = F._normalize_axis("flatten", end_dim, self.ndim, self.shape)
        if start > end:
            raise ValueError(f"[flatten] start_dim {start_dim} comes after end_dim {end_dim}")
        return self.reshape(self.shape[:start] + (-1,) + self.shape[end + 1 :])

    def transpose(self, dim0, dim1):
        return F.transpose(self, dim0, dim1)

    def t(self):
        """PyTorch's t(): the transpose of a 2-D tensor; 0-D and 1-D come back as they are."""
        if self.ndim > 2:
            raise ValueError(
                f"[t] expects a tensor with at most 2 dims, got shape {self.shape}: "
                "use transpose(dim0, dim1) or permute(...)"
            )
        return self if self.ndim < 2 else F.transpose(self, 0, 1)

    def permute(self, *dims):
        return F.permute(self, _shape_arg(dims))

    @property
    def T(self):
        if self.ndim != 2:
            raise ValueError(
                f"[T] expects a 2-D tensor, got shape {self.shape}: use transpose(d0, d1)"
            )
        return F.transpose(self, 0, 1)

    def __getitem__(self, key):
        return F.getitem(self, key)

    def __getattr__(self, name):  # a PyTorch name camel lacks: say what to use instead
        from camel import hints

        raise hints.missing("camel.Tensor", name)

    # -- arithmetic -------------------------------------------------------------

    def __add__(self, other):
        return F.add(self, other)

    def __radd__(self, other):
        return F.add(self, other)

    def __mul__(self, other):
        return F.mul(self, other)

    def __rmul__(self, other):
        return F.mul(self, other)

    def __neg__(self):
        return F.neg(self)

    def __sub__(self, other):
        return F.add(self, -other)  # a - b = a + (-b)

    def __rsub__(self, other):
        return F.add(-self, other)  # s - a = (-a) + s

    def __truediv__(self, other):
        if isinstance(other, numbers.Number) and not isinstance(other, bool):
            return F.mul(self, 1.0 / float(other))  # a / s = a * (1 / s)
        raise TypeError(
            f"[div] camel divides only by a Python number, got {type(other).__name__}: "
            "there is no elementwise division op (multiply by a reciprocal instead)"
        )

    def __rtruediv__(self, other):
        raise TypeError("[div] camel cannot divide by a tensor (only tensor / number)")

    def __matmul__(self, other):
        return F.matmul(self, other)

    def __pow__(self, other):
        raise TypeError("[pow] camel has no power op: write x * x for x ** 2")

    # -- comparisons: an error, never Python's identity ----------------------------
    # PyTorch compares elementwise; camel has no comparison ops, so == raises instead
    # of silently comparing identity. Hashing stays by identity: tensors still work
    # as dict keys and in sets (autograd keys its dicts by id(), never by ==).

    __hash__ = object.__hash__

    def _compare(self, other, op):
        if other is None:
            return NotImplemented  # t == None is False, as in PyTorch
        raise TypeError(
            f"[{op}] camel tensors have no elementwise comparison ops: compare on the host, "
            f"e.g. (pred.numpy() {op} y.numpy()).mean(); use `a is b` for identity"
        )

    def __eq__(self, other):
        return self._compare(other, "==")

    def __ne__(self, other):
        return self._compare(other, "!=")

    def __lt__(self, other):
        return self._compare(other, "<")

    def __le__(self, other):
        return self._compare(other, "<=")

    def __gt__(self, other):
        return self._compare(other, ">")

    def __ge__(self, other):
        return self._compare(other, ">=")

    # -- reductions and activations -----------------------------------------------

    # dim= / keepdim= (PyTorch) and axis= / keepdims= (NumPy) both work.

    def sum(self, axis=None, keepdims=False, *, dim=None, keepdim=None):
        return F.sum(self, axis, keepdims, dim=dim, keepdim=keepdim)

    def mean(self, axis=None, keepdims=False, *, dim=None, keepdim=None):
        return F.mean(self, axis, keepdims, dim=dim, keepdim=keepdim)

    def max(self, axis=None, keepdims=False, *, dim=None, keepdim=None):
        """As in PyTorch: x.max() is a tensor; x.max(dim) is (values, indices)."""
        return F.max(self, axis, keepdims, dim=dim, keepdim=keepdim)

    def argmax(self, axis=None, keepdims=False, *, dim=None, keepdim=None):
        """int32 indices of the maximum along dim (flat index when dim is None)."""
        return F.argmax(self, axis, keepdims, dim=dim, keepdim=keepdim)

    def relu(self):
        return F.relu(self)

    def gelu(self):
        return F.gelu(self)

    def softmax(self, axis=None, *, dim=None):
        return F.softmax(self, axis, dim=dim)

    def log_softmax(self, axis=None, *, dim=None):
        return F.log_softmax(self, axis, dim=dim)


_READ_ONLY = (
    "[numpy] this array is a read-only view of a tensor that the autograd graph depends "
    "on (it requires grad, or an op saved it for backward): writing into it would change "
    "gradients silently. Use t.detach().numpy().copy() for a writable copy."
)


class ReadOnlyArray(np.ndarray):
    """What Tensor.numpy() returns while the graph needs the values: a plain read-only
    ndarray whose item assignment explains itself. Copies of it are writable."""

    def __setitem__(self, key, value):
        if not self.flags.writeable:
            raise ValueError(_READ_ONLY)
        super().__setitem__(key, value)


# ---------------------------------------------------------------------------
# creation
# ---------------------------------------------------------------------------

_rng = np.random.default_rng(0)


def manual_seed(seed):
    """Seed camel's one global random generator (randn, rand, nn initialisation)."""
    global _rng
    _rng = np.random.default_rng(seed)


def get_rng():
    """The global np.random.Generator that manual_seed resets."""
    return _rng


def tensor(data, requires_grad=False, device="cpu", dtype=None):
    """A new tensor holding a copy of `data` (scalar, nested list, ndarray or Tensor).
    dtype: camel.float32 / "float32" or camel.int32 / "int32"; None keeps float data as
    float32 and integers as int32 (float16 and uint8 data convert with a warning)."""
    if isinstance(data, Tensor):
        data = data.numpy()
    arr = _as_array(data, dtype)
    return Tensor(arr, requires_grad=requires_grad, device=device)


def _new(arr, requires_grad, device):
    return Tensor._make(get_backend(device).from_numpy(arr), device, requires_grad)


def _check_dtype(dtype):
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.int32):
        raise TypeError(f"[tensor] camel supports dtypes float32 and int32, got {dtype}")
    return dtype


def zeros(*shape, requires_grad=False, device="cpu", dtype="float32"):
    dtype = _check_dtype(dtype)
    return Tensor._make(
        get_backend(device).full(_shape_arg(shape), 0, dtype.name), device, requires_grad
    )


def ones(*shape, requires_grad=False, device="cpu", dtype="float32"):
    dtype = _check_dtype(dtype)
    return Tensor._make(
        get_backend(device).full(_shape_arg(shape), 1, dtype.name), device, requires_grad
    )


def randn(*shape, requires_grad=False, device="cpu"):
    """Standard normal float32 samples from the global generator (see manual_seed)."""
    return _new(_rng.standard_normal(_shape_arg(shape), dtype=np.float32), requires_grad, device)


def rand(*shape, requires_grad=False, device="cpu"):
    """Uniform [0, 1) float32 samples from the global generator."""
    return _new(_rng.random(_shape_arg(shape), dtype=np.float32), requires_grad, device)


def arange(start, stop=None, step=1, device="cpu"):
    """int32 tensor [start, start + step, ...) like range(); arange(n) is 0 .. n-1."""
    if stop is None:
        start, stop = 0, start
    return _new(np.arange(start, stop, step, dtype=np.int32), False, device)


# The tape and the ops (autograd.py, functional.py) sit below this module and import
# nothing from it: they wrap their results in this Tensor, handed over here.
autograd.use_tensor(Tensor, device_of)
