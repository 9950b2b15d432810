"""Errors that teach a PyTorch user: what camel has instead of a PyTorch name it lacks,
and the way out of a broadcast camel cannot do.

camel's op set is small on purpose (docs/api.md lists all of it). When code written for
PyTorch reaches for something camel does not have, the AttributeError says so and names
what to use; it never guesses a different meaning.
"""

_API = "docs/api.md lists camel's whole API"

_IN_PLACE = (
    "camel has no in-place ops (the tape records new tensors only): write x = x + y "
    "instead of x.add_(y); an optimiser updates parameters with step()"
)
_ELEMENTWISE = "camel has no elementwise {name!r} op (its op set is small on purpose; " + _API + ")"
_DTYPE = (
    "camel holds float32 data and int32 indices and has no dtype conversion op: "
    "make a new tensor, e.g. camel.tensor(t.numpy().astype('float32'))"
)
_DEVICES = (
    "camel's devices are the strings 'cpu' and 'mps' ('cuda' is another name for 'mps' "
    "on the CUDA shim): use .to(device)"
)
_NO_CONV = (
    "camel has no convolutions or pooling: flatten the images and use Linear layers "
    "(examples/mlp.py)"
)

# camel.Tensor: name -> what to use
TENSOR = {
    "data": "use t.detach() (the same storage, cut from the graph)",
    "clone": "camel.tensor(t) copies the data (without the graph); camel never changes a "
    "tensor in place, so keeping t itself is safe",
    "cuda": _DEVICES,
    "is_cuda": "compare t.device with 'mps' or 'cpu'",
    "float": _DTYPE,
    "double": _DTYPE,
    "half": _DTYPE,
    "long": _DTYPE,
    "int": _DTYPE,
    "bool": _DTYPE,
    "type": _DTYPE,
    "add": "use a + b (or camel.functional.add)",
    "sub": "use a - b",
    "mul": "use a * b (or camel.functional.mul)",
    "div": "use a / number (camel divides by Python numbers only)",
    "matmul": "use a @ b (or camel.functional.matmul)",
    "min": "negate twice: m = (-x).max(dim) gives -m.values and m.indices; -(-x).max() without dim",
    "argmin": "use (-x).argmax(dim)",
    "var": "no var/std op: F.layer_norm normalises over the last axis; for statistics use "
    "t.detach().numpy().var(axis)",
    "std": "no var/std op: F.layer_norm normalises over the last axis; for statistics use "
    "t.detach().numpy().std(axis)",
    "expand": "+ and * broadcast a trailing suffix by themselves; for a full-size copy "
    "multiply by camel.ones(shape)",
    "expand_as": "+ and * broadcast a trailing suffix by themselves",
    "repeat": "+ and * broadcast a trailing suffix by themselves",
    "view_as": "use x.reshape(other.shape)",
    "reshape_as": "use x.reshape(other.shape)",
    "split": "slice it: x[..., a:b]",
    "chunk": "slice it: x[..., a:b]",
    "masked_fill": "the causal mask lives in F.scaled_dot_product_attention(q, k, v, causal=True)",
    "grad_fn": "camel calls it t._ctx (t._ctx.fn.name is the op)",
    "register_hook": "camel has no hooks; it keeps the gradients of leaves only",
    "retain_grad": "camel keeps the gradients of leaves only (tensors made with "
    "requires_grad=True)",
    "new_zeros": "use camel.zeros(shape, device=t.device)",
    "new_ones": "use camel.ones(shape, device=t.device)",
    "ndimension": "use t.dim() or t.ndim",
    "nelement": "use t.numel()",
    "mT": "use t.transpose(-2, -1)",
}
for _name in ("exp", "log", "sqrt", "rsqrt", "tanh", "sigmoid", "abs", "pow", "square",
              "clamp", "clip", "sin", "cos", "sign", "floor", "round", "reciprocal",
              "prod", "cumsum", "sort", "topk", "norm", "where"):  # fmt: skip
    TENSOR.setdefault(_name, _ELEMENTWISE)

FUNCTIONAL = {
    "sigmoid": _ELEMENTWISE,
    "tanh": _ELEMENTWISE,
    "silu": _ELEMENTWISE,
    "leaky_relu": "camel has relu and gelu only",
    "elu": "camel has relu and gelu only",
    "softplus": "camel has relu and gelu only",
    "dropout": "camel has no dropout; train without it",
    "mse_loss": "write it: d = a - b; (d * d).mean()",
    "nll_loss": "F.cross_entropy(log_probs, targets) equals nll_loss when log_probs are "
    "log-probabilities (their log_softmax is themselves)",
    "conv1d": _NO_CONV,
    "conv2d": _NO_CONV,
    "max_pool2d": _NO_CONV,
    "avg_pool2d": _NO_CONV,
    "batch_norm": "camel has F.layer_norm (over the last axis) only",
    "one_hot": "make it on the host: camel.tensor(np.eye(C, dtype='float32')[targets])",
    "pad": "camel has no pad; make the padded array in NumPy",
}

NN = {
    "CrossEntropyLoss": "use camel.functional.cross_entropy(logits, targets)",
    "MSELoss": "write it: d = a - b; (d * d).mean()",
    "NLLLoss": FUNCTIONAL["nll_loss"],
    "Dropout": FUNCTIONAL["dropout"],
    "Conv1d": _NO_CONV,
    "Conv2d": _NO_CONV,
    "MaxPool2d": _NO_CONV,
    "BatchNorm1d": "camel has nn.LayerNorm only",
    "BatchNorm2d": "camel has nn.LayerNorm only",
    "Softmax": "call F.softmax(x, dim) in forward",
    "LogSoftmax": "call F.log_softmax(x, dim) in forward",
    "Tanh": _ELEMENTWISE.replace("{name!r}", "'tanh'"),
    "Sigmoid": _ELEMENTWISE.replace("{name!r}", "'sigmoid'"),
    "Flatten": "call x.flatten(1) in forward",
    "Identity": "write a Module whose forward returns x",
    "MultiheadAttention": "use camel.nn.MultiHeadAttention(d_model, n_heads) (GPT-2 "
    "layout, batch first: (B, T, C))",
    "ModuleDict": "use attributes, or a ModuleList",
    "ParameterList": "use a list attribute of Parameters (it is searched)",
    "functional": "use camel.functional (import camel.functional as F)",
    "init": "Parameter(array) takes any initial values; camel.nn.module has uniform, "
    "normal and constant",
    "utils": "camel has no torch.nn.utils (no clip_grad_norm_)",
}
for _name in ("RNN", "LSTM", "GRU", "Transformer", "TransformerEncoderLayer"):
    NN[_name] = f"camel has no {_name}; examples/gpt_mini.py builds a transformer from layers"

MODULE = {
    "cuda": _DEVICES,
    "half": _DTYPE,
    "float": _DTYPE,
    "double": _DTYPE,
    "children": "use named_modules() (every module below, not only the direct children)",
    "named_children": "use named_modules() (every module below, not only the direct children)",
    "apply": "loop over model.modules()",
    "register_parameter": "assign a Parameter as an attribute",
    "add_module": "assign the module as an attribute",
}

OPTIMIZER = {
    "param_groups": "camel has one group: read and set opt.lr (and the other settings) directly",
}

OPTIM = {
    "AdamW": "camel.optim.Adam(weight_decay=...) is Adam with L2 decay, not AdamW's "
    "decoupled decay",
    "lr_scheduler": "set opt.lr between steps",
}

CAMEL = {
    "cat": "camel has no concatenation op: build the array in NumPy and camel.tensor(...) it",
    "stack": "camel has no stacking op: build the array in NumPy and camel.tensor(...) it",
    "zeros_like": "use camel.zeros(t.shape, device=t.device)",
    "ones_like": "use camel.ones(t.shape, device=t.device)",
    "from_numpy": "use camel.tensor(array) (a copy)",
    "empty": "use camel.zeros(*shape)",
    "full": "use camel.ones(*shape) * value",
    "randint": "make the integers in NumPy: camel.tensor(rng.integers(low, high, size))",
    "randn_like": "use camel.randn(*t.shape, device=t.device)",
    "as_tensor": "use camel.tensor(data)",
    "device": _DEVICES.replace("use .to(device)", "camel.tensor(x, device='mps')"),
    "cuda": _DEVICES,
    "backends": "camel.metal.device_name() names the 'mps' device or raises MetalError",
    "save": "np.savez(path, **model.state_dict())",
    "load": "model.load_state_dict(dict(np.load(path)))",
    "float16": "camel holds float32 data and int32 indices: use camel.float32",
    "float64": "camel holds float32 data and int32 indices: use camel.float32",
    "half": "camel holds float32 data and int32 indices: use camel.float32",
    "double": "camel holds float32 data and int32 indices: use camel.float32",
    "int64": "camel stores indices as int32: use camel.int32",
    "long": "camel stores indices as int32: use camel.int32",
    "bool": "camel holds float32 data and int32 indices (a mask is float 0. / 1.)",
    "uint8": "camel holds float32 data and int32 indices",
    "inference_mode": "use camel.no_grad()",
    "enable_grad": "camel has camel.no_grad() only (gradients are on outside it)",
    "set_grad_enabled": "camel has camel.no_grad() only (gradients are on outside it)",
    "min": TENSOR["min"],
    "argmin": TENSOR["argmin"],
    "where": TENSOR["where"],
}

_TABLES = {
    "camel": CAMEL,
    "camel.Tensor": TENSOR,
    "camel.functional": FUNCTIONAL,
    "camel.nn": NN,
    "camel.optim": OPTIM,
    "camel.nn.Module": MODULE,
    "camel.optim.Optimizer": OPTIMIZER,
}


def missing(where, name, ops=None):
    """The AttributeError for `where.name`, saying what camel has instead. `ops` (camel's
    __getattr__ passes camel.functional) is a module whose own functions are named as the
    way out: camel.softmax -> camel.functional.softmax."""
    if name.startswith("_"):  # Python's own lookups (__array_interface__, ...): plain
        return AttributeError(f"{where} has no attribute {name!r}")
    hint = _TABLES[where].get(name)
    if hint is None and where == "camel.Tensor" and name.endswith("_"):
        hint = _IN_PLACE
    if hint is None and ops is not None:
        if getattr(vars(ops).get(name), "__module__", None) == ops.__name__:
            hint = f"use {ops.__name__}.{name} (or the Tensor method)"
    if hint is None:
        return AttributeError(f"{where} has no attribute {name!r} ({_API})")
    return AttributeError(f"{where} has no {name!r}: {hint.format(name=name)}")


# ---------------------------------------------------------------------------
# broadcasting: camel's rule is "one shape is a trailing suffix of the other"
# ---------------------------------------------------------------------------


def _permute_hint(x_shape, kept, sym):
    """x's axes `kept` (sorted) moved last, y reshaped to those sizes, and back."""
    rest = [i for i in range(len(x_shape)) if i not in kept]
    perm = tuple(rest + list(kept))
    inverse = tuple(perm.index(i) for i in range(len(perm)))
    target = tuple(x_shape[i] for i in kept)
    if perm == (1, 0):
        return f"(x.T {sym} y.reshape{target}).T"
    return f"(x.permute{perm} {sym} y.reshape{target}).permute{inverse}"


def broadcast(op, a_shape, b_shape):
    """The message for add / mul of shapes camel cannot broadcast: what PyTorch would do,
    and the reshape or transpose that makes the shapes suffix-compatible."""
    sym = {"add": "+", "mul": "*"}.get(op, op)
    a_shape, b_shape = tuple(a_shape), tuple(b_shape)
    head = (
        f"[{op}] cannot broadcast shapes {a_shape} and {b_shape}: camel broadcasts only a "
        "trailing suffix (one shape must end with the other, e.g. (B, T, C) and (C,) or (T, C))"
    )
    a_first = (len(a_shape), _numel(a_shape)) >= (len(b_shape), _numel(b_shape))
    x, y = (a_shape, b_shape) if a_first else (b_shape, a_shape)
    where = f"; x is the {x} operand, y the {y} one"
    yp = (1,) * (len(x) - len(y)) + y  # y right-aligned against x, as PyTorch aligns
    kept, x_stretches = [], False
    for i, (nx, ny) in enumerate(zip(x, yp, strict=True)):
        if nx == ny:
            kept.append(i)
        elif ny == 1:
            pass  # y stretches along this axis
        elif nx == 1:
            x_stretches = True
        else:
            hint = _block_hint(x, y, sym)
            return f"{head}. Even PyTorch cannot: sizes {nx} and {ny} meet at axis {i} of {x}" + (
                f". If y runs along other axes of x: {hint}{where}" if hint else ""
            )
    if x_stretches:
        outer = (
            "; for mul, (N, 1) times (1, M) is the matmul (N, 1) @ (1, M)" if op == "mul" else ""
        )
        result = tuple(max(nx, ny) for nx, ny in zip(x, yp, strict=True))
        return (
            f"{head}. PyTorch would stretch both operands to {result}; camel stretches one{outer}"
        )
    if kept == list(range(len(x) - len(kept), len(x))):  # size-1 axes only in front
        return f"{head}. Drop y's size-1 axes: x {sym} y.reshape{tuple(x[i] for i in kept)}{where}"
    return f"{head}. Move the axes y stretches over first: {_permute_hint(x, kept, sym)}{where}"


def _block_hint(x, y, sym):
    """y (its size-1 axes dropped) matching a run of x's axes that is not at the end."""
    s = tuple(n for n in y if n != 1)
    for j in range(len(x) - len(s)):
        if s and tuple(x[j : j + len(s)]) == s:
            return _permute_hint(x, list(range(j, j + len(s))), sym)
    return ""


def _numel(shape):
    n = 1
    for d in shape:
        n *= d
    return n
