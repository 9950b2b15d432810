"""camel (FlamingCamel): a minimal, PyTorch-like deep-learning library for learning
Metal GPU programming on Apple Silicon.

    import camel
    x = camel.randn(4, 3, requires_grad=True)
    loss = (x @ camel.ones(3, 2)).relu().sum()
    loss.backward()          # x.grad is a (4, 3) Tensor

Read in this order: tensor.py (the Tensor), autograd.py (the tape),
functional.py (every op, forward and backward side by side), backend_cpu.py
(the narrow waist every backend implements).
"""

import importlib

from camel import functional, metal, nn, optim
from camel.autograd import is_grad_enabled, no_grad
from camel.gradcheck import GradcheckError, gradcheck
from camel.profiler import profile
from camel.tensor import (
    Tensor,
    arange,
    float32,
    get_rng,
    int32,
    manual_seed,
    ones,
    rand,
    randn,
    tensor,
    zeros,
)


def __getattr__(name):  # a PyTorch name camel lacks: say what to use instead
    hints = importlib.import_module("camel.hints")  # not `from camel import`: that recurses here
    raise hints.missing("camel", name, ops=functional)


__all__ = [
    "GradcheckError",
    "Tensor",
    "arange",
    "float32",
    "functional",
    "get_rng",
    "gradcheck",
    "int32",
    "is_grad_enabled",
    "manual_seed",
    "metal",
    "nn",
    "no_grad",
    "ones",
    "optim",
    "profile",
    "rand",
    "randn",
    "tensor",
    "zeros",
]
