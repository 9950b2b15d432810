"""Activation layers: thin Module wrappers over the functional ops, for use in Sequential."""

import camel.functional as F

from .module import Module


class ReLU(Module):
    """``relu(x) = max(x, 0)`` elementwise. Shapes: any -> same."""

    def forward(self, x):
        return F.relu(x)


class GELU(Module):
    """GELU with the tanh approximation (PyTorch's ``GELU(approximate="tanh")``), elementwise.

    ``gelu(x) = 0.5 * x * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 * x^3)))``. Shapes: any -> same.
    """

    def forward(self, x):
        return F.gelu(x)
