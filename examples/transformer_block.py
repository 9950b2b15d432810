"""Stage 4's milestone: Transformer blocks without attention (LayerNorm + GELU MLP) train.

    python examples/transformer_block.py --device mps           # the Metal kernels
    python examples/transformer_block.py --device cpu           # the NumPy reference
    python examples/transformer_block.py --device mps --profile # kernel time shares of a step

The task: predict the next character of Shakespeare from the previous `--context`
characters. Without attention a position cannot look at its neighbours, so the context
is handed in as features: the one-hot codes of the previous characters side by side,
(N, context * V), built on the host (data, not an op). The model:

    h = x @ W_in                          # (N, C)   the input projection
    n_blocks times:
        h = h + mlp(ln(h))                # (N, C)   pre-LayerNorm residual MLP block,
                                          #          mlp = Linear(C, 4C), GELU, Linear(4C, C)
    logits = head(ln_f(h))                # (N, V)

so every family of Stage 4 runs: LayerNorm forward (layernorm_forward_v4 by default;
CAMEL_LAYERNORM=1..4 picks one), its backward (layernorm_backward_v3; layernorm_backward_dx
and layernorm_backward_params, or _params_blocked past 64 rows, with
CAMEL_LAYERNORM_BACKWARD=1 or CAMEL_MEMORY_KERNELS=1), GELU (gelu_forward_float4 /
gelu_backward_float4; gelu_forward / gelu_backward with CAMEL_MEMORY_KERNELS=1), plus the
GEMMs, adds and the fused cross-entropy. Expected: the loss falls from ln(V) ~ 4.4 to
below 2.5 in a few hundred steps.
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np

try:
    import camel
except ImportError:  # running from a clone without `pip install -e .`: use the repo's camel/
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import camel
import camel.functional as F
from camel import nn, optim
from camel.data import CharVocab, load_text


class Block(nn.Module):
    """h + mlp(ln(h)): a Transformer block with the attention taken out. (N, C) -> (N, C)."""

    def __init__(self, d_model):
        super().__init__()
        self.ln = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, 4 * d_model),
            nn.GELU(),
            nn.Linear(4 * d_model, d_model),
        )

    def forward(self, h):
        return h + self.mlp(self.ln(h))  # (N, C)


class BlockModel(nn.Module):
    """One-hot context features (N, context * V) -> next-character logits (N, V)."""

    def __init__(self, n_features, vocab_size, d_model, n_blocks):
        super().__init__()
        self.proj = nn.Linear(n_features, d_model)
        self.blocks = nn.ModuleList([Block(d_model) for _ in range(n_blocks)])
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size)

    def forward(self, x):
        h = self.proj(x)  # (N, C)
        for block in self.blocks:
            h = block(h)
        return self.head(self.ln_f(h))  # (N, V)


def get_batch(ids, vocab_size, context, n, rng):
    """x (n, context * V) one-hot features of `context` characters, y (n,) the next one."""
    starts = rng.integers(0, len(ids) - context - 1, size=n)
    window = np.stack([ids[s : s + context + 1] for s in starts])  # (n, context + 1)
    x = np.zeros((n, context, vocab_size), dtype=np.float32)
    x[np.arange(n)[:, None], np.arange(context)[None, :], window[:, :-1]] = 1.0
    return x.reshape(n, context * vocab_size), window[:, -1].astype(np.int32)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="mps", help='"mps" (default) or "cpu"')
    p.add_argument("--data", default=None, help="plain-text file (default: Shakespeare)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--context", type=int, default=3, help="characters of context")
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--n-blocks", type=int, default=2)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--profile", action="store_true", help="print camel.profile() of one step")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    device = args.device
    where = camel.metal.device_name() if device == "mps" else "NumPy"
    print(f"device: {device} ({where})")
    camel.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    text, source = load_text(args.data)
    vocab = CharVocab(text)
    ids = vocab.encode(text)
    V = len(vocab)
    model = BlockModel(args.context * V, V, args.d_model, args.n_blocks)
    model.to(device)
    n_params = sum(int(np.prod(q.shape)) for q in model.parameters())
    print(f"data: {source}, vocabulary {V}; model: {args.n_blocks} blocks of width "
          f"{args.d_model}, {n_params:,} parameters")  # fmt: skip

    optimizer = optim.Adam(model.parameters(), lr=args.lr)

    def step():
        xb, yb = get_batch(ids, V, args.context, args.batch_size, rng)
        loss = F.cross_entropy(
            model(camel.tensor(xb, device=device)), camel.tensor(yb, device=device)
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return loss.item()

    losses = []
    last_time = time.perf_counter()
    last_step = 0
    for i in range(1, args.steps + 1):
        losses.append(step())
        if i == 1 or i % args.log_every == 0 or i == args.steps:
            now = time.perf_counter()
            ms = (now - last_time) / (i - last_step) * 1e3
            last_time, last_step = now, i
            recent = np.mean(losses[-args.log_every :])
            print(f"step {i:5d}  loss {losses[-1]:.4f}  (recent mean {recent:.4f})  "
                  f"{ms:7.1f} ms/step")  # fmt: skip
    if args.profile:
        with camel.profile() as prof:
            step()
        print(prof.table())
    return {"losses": losses, "model": model}


if __name__ == "__main__":
    main()
    sys.exit(0)
