"""Layer normalisation over the last axis."""

from camel import functional as F

from .module import Module, Parameter, constant


class LayerNorm(Module):
    """Normalises the last axis to zero mean and unit variance, then scales and shifts.

    ``y = (x - mean(x)) / sqrt(var(x) + eps) * weight + bias``, with mean and the biased
    variance taken over the last axis (as in PyTorch).

    Args:
        d: size of the last axis (``normalized_shape`` in PyTorch).
        eps: added to the variance for stability, must be positive (default 1e-5).

    Shapes:
        x: ``(..., d)`` -> y: ``(..., d)``; weight (init 1) and bias (init 0): ``(d,)``.
    """

    def __init__(self, d: int, eps: float = 1e-5):
        super().__init__()
        if d <= 0:
            raise ValueError(f"[LayerNorm] d must be positive, got {d}")
        if not eps > 0:
            raise ValueError(f"[LayerNorm] eps must be positive, got {eps}")
        self.d = d
        self.eps = eps
        self.weight = Parameter(constant((d,), 1.0))
        self.bias = Parameter(constant((d,), 0.0))

    def forward(self, x):
        if x.shape[-1] != self.d:
            raise ValueError(f"[LayerNorm] input shape {tuple(x.shape)} does not end in d={self.d}")
        return F.layer_norm(x, self.weight, self.bias, eps=self.eps)

    def extra_repr(self) -> str:
        return f"{self.d}, eps={self.eps}"
