"""Linear layer: y = x @ W^T + b, with PyTorch's weight layout and default initialisation."""

import math

from .. import functional as F
from .module import Module, Parameter, uniform


class Linear(Module):
    """Applies an affine map to the last axis: ``y = x @ weight.T + bias``.

    Args:
        in_features: size of the last axis of the input.
        out_features: size of the last axis of the output.
        bias: add a learned bias (default True).

    Shapes:
        x: ``(..., in_features)`` (2-D ``(N, in)`` or 3-D ``(B, T, in)``)
        y: ``(..., out_features)``
        weight: ``(out_features, in_features)``, bias: ``(out_features,)``, as in PyTorch.

    Initialisation (PyTorch's default, kaiming-uniform with a = sqrt(5)): weight and bias
    both ~ U(-1/sqrt(in_features), 1/sqrt(in_features)).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        if in_features <= 0 or out_features <= 0:
            raise ValueError(
                f"[Linear] sizes must be positive, got in_features={in_features}, "
                f"out_features={out_features}"
            )
        self.in_features = in_features
        self.out_features = out_features
        bound = 1.0 / math.sqrt(in_features)
        self.weight = Parameter(uniform((out_features, in_features), bound))
        self.bias = Parameter(uniform((out_features,), bound)) if bias else None

    def forward(self, x):
        # (..., in) @ (in, out) -> (..., out); the bias (out,) broadcasts over the leading axes.
        # F.linear checks the shapes (x must end in in_features) and says what it got.
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, bias={self.bias is not None}"
