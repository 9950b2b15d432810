"""Multi-head self-attention, laid out like GPT-2 / nanoGPT (c_attn, c_proj)."""

from camel import functional as F

from .linear import Linear
from .module import Module


class MultiHeadAttention(Module):
    """Multi-head self-attention with one fused q, k, v projection.

    ::

        q, k, v = split(x @ c_attn)                       # each (B, T, C)
        q, k, v -> (B, H, T, D)                           # H heads of D = C / H
                                                          # (one permute for the three)
        out = softmax(q @ k^T / sqrt(D) + mask) @ v       # (B, H, T, D); mask hides the future
        y = merge_heads(out) @ c_proj                     # (B, T, C)

    Args:
        d_model: model width C.
        n_heads: number of heads H; must divide d_model.
        causal: if True (default) position t attends only to positions <= t.

    Shapes:
        x: ``(B, T, d_model)`` -> y: ``(B, T, d_model)``.
        c_attn: ``Linear(d_model, 3 * d_model)``, output columns are q, k, v in that order.
        c_proj: ``Linear(d_model, d_model)``.
    """

    def __init__(self, d_model: int, n_heads: int, causal: bool = True):
        super().__init__()
        if n_heads <= 0 or d_model % n_heads != 0:
            raise ValueError(
                f"[MultiHeadAttention] d_model={d_model} is not divisible by n_heads={n_heads}"
            )
        self.d_model = d_model
        self.n_heads = n_heads
        self.causal = causal
        self.c_attn = Linear(d_model, 3 * d_model)
        self.c_proj = Linear(d_model, d_model)

    def forward(self, x):
        if x.ndim != 3 or x.shape[-1] != self.d_model:
            raise ValueError(
                f"[MultiHeadAttention] expected input (B, T, {self.d_model}), got {tuple(x.shape)}"
            )
        B, T, C = x.shape
        H, D = self.n_heads, C // self.n_heads
        qkv = self.c_attn(x).reshape(B, T, 3, H, D)  # columns: q, k, v, each H heads of D
        # One permute splits the heads of all three (a copy), and each of q, k, v is then a
        # third of it (a view): 1 dispatch where 3 slices and 3 transposes took 6.
        qkv = qkv.permute(2, 0, 3, 1, 4)  # (3, B, H, T, D)
        q, k, v = (F.packed_part(qkv, i) for i in range(3))  # (B, H, T, D) each
        y = F.scaled_dot_product_attention(q, k, v, causal=self.causal)  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C): heads side by side again
        return self.c_proj(y)

    def extra_repr(self) -> str:
        return f"{self.d_model}, n_heads={self.n_heads}, causal={self.causal}"
