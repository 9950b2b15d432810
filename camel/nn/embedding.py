"""Embedding: a lookup table from integer ids to learned vectors."""

from camel import functional as F

from .module import Module, Parameter, normal


class Embedding(Module):
    """Looks up row ``idx`` of a ``(n, d)`` table: ``y[..., :] = weight[idx[...], :]``.

    The backward pass scatter-adds the output gradient into the rows that were used.

    Args:
        n: number of ids (``num_embeddings``); valid ids are 0 .. n-1.
        d: size of each vector (``embedding_dim``).

    Shapes:
        idx: any shape of int32 ids, e.g. ``(B, T)`` -> y: ``idx.shape + (d,)``.
        weight: ``(n, d)``, initialised N(0, 1) as in PyTorch.
    """

    def __init__(self, n: int, d: int):
        super().__init__()
        if n <= 0 or d <= 0:
            raise ValueError(f"[Embedding] sizes must be positive, got n={n}, d={d}")
        self.n = n
        self.d = d
        self.weight = Parameter(normal((n, d), std=1.0))

    def forward(self, idx):
        return F.embedding(idx, self.weight)

    def extra_repr(self) -> str:
        return f"{self.n}, {self.d}"
