"""GPT-mini: a character-level GPT trained on Shakespeare, then sampled.

    python examples/gpt_mini.py                          # "cpu" config, a few minutes on a CPU
    python examples/gpt_mini.py --device mps             # "gpu" config on an Apple GPU,
                                                         # "tiny" on the Metal simulator
    CAMEL_ATTENTION=naive python examples/gpt_mini.py --device mps   # Stage 5A attention
                                                         # (unset: flash where it is built)
    python examples/gpt_mini.py --steps 200 --save ckpt.npz
    python examples/gpt_mini.py --load ckpt.npz --steps 0 --prompt "ROMEO:"   # sample only
    python examples/gpt_mini.py --data my_text.txt       # any plain-text file

The model is a GPT in miniature: token and position embeddings, n_layers pre-LayerNorm
blocks (causal multi-head attention, then an MLP, each with a residual), a final
LayerNorm and a linear head to vocabulary logits. Tokens are characters.

Configs (--config; the default picks one for the device, any flag below overrides a value):

    name   d_model layers heads  max_seq_len  batch  parameters (vocabulary 84)
    gpu        384      6     6          256     16  10.8 M   an Apple GPU ("mps" on a Mac)
    cpu        128      2     4           64     16  0.43 M   NumPy on the CPU
    tiny        32      2     4           32      4  0.03 M   the Metal simulator (CI, Linux)
    long       256      4     4         1024      4  3.46 M   long context on an Apple GPU:
                                                    head dim 64, so FlashAttention (Stage 5B)

Every step prints the loss and the tokens per second (batch * seq_len per step).
"""

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
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


@dataclass
class GPTConfig:
    vocab_size: int = 84
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    max_seq_len: int = 64


class GPTBlock(nn.Module):
    """x + attn(ln1(x)), then x + mlp(ln2(x)). Shapes: (B, T, C) -> (B, T, C)."""

    def __init__(self, d_model, n_heads):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = nn.MultiHeadAttention(d_model, n_heads)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, 4 * d_model),
            nn.GELU(),
            nn.Linear(4 * d_model, d_model),
        )

    def forward(self, x):
        x = x + self.attn(self.ln1(x))  # (B, T, C): attention with residual
        x = x + self.mlp(self.ln2(x))  # (B, T, C): MLP with residual
        return x


class GPT(nn.Module):
    """Token ids (B, T) -> next-token logits (B, T, vocab_size)."""

    def __init__(self, vocab_size, d_model, n_layers, n_heads, max_seq_len):
        super().__init__()
        self.max_seq_len = max_seq_len
        self.token_emb = nn.Embedding(vocab_size, d_model)
        self.pos_emb = nn.Embedding(max_seq_len, d_model)
        self.blocks = nn.ModuleList([GPTBlock(d_model, n_heads) for _ in range(n_layers)])
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size)

    @classmethod
    def from_config(cls, cfg: GPTConfig):
        return cls(cfg.vocab_size, cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.max_seq_len)

    def forward(self, idx):
        B, T = idx.shape
        if T > self.max_seq_len:
            raise ValueError(
                f"[GPT] sequence length {T} (input {tuple(idx.shape)}) exceeds "
                f"max_seq_len={self.max_seq_len}"
            )
        tok_emb = self.token_emb(idx)  # (B, T, C)
        pos = camel.arange(T, device=idx.device)  # (T,)
        pos_emb = self.pos_emb(pos)  # (T, C)
        x = tok_emb + pos_emb  # (B, T, C): (T, C) broadcasts over B
        for block in self.blocks:
            x = block(x)
        x = self.ln_f(x)
        return self.head(x)  # (B, T, vocab_size)


def lm_loss(model, x, y):
    """Mean next-character cross-entropy. x, y: (B, T) int32 Tensors."""
    logits = model(x)  # (B, T, V)
    B, T, V = logits.shape
    return F.cross_entropy(logits.reshape(B * T, V), y.reshape(B * T))


def get_batch(ids, batch_size, seq_len, rng):
    """Random windows of the token stream: x (B, T) and y = x shifted by one (B, T)."""
    starts = rng.integers(0, len(ids) - seq_len - 1, size=batch_size)
    window = np.stack([ids[s : s + seq_len + 1] for s in starts])  # (B, T + 1)
    return window[:, :-1], window[:, 1:]


def generate(model, vocab, prompt, n_chars, temperature=0.8, top_k=20, rng=None, device="cpu"):
    """Sample n_chars characters after prompt, one at a time (no cache: the whole window
    is recomputed each time, at most max_seq_len characters)."""
    rng = rng or np.random.default_rng()
    ids = list(vocab.encode(prompt)) if prompt else [int(rng.integers(len(vocab)))]
    model.eval()
    with camel.no_grad():
        for _ in range(n_chars):
            context = np.array(ids[-model.max_seq_len :], dtype=np.int32)[None, :]  # (1, T)
            logits = model(camel.tensor(context, device=device)).numpy()[0, -1]  # (V,)
            logits = logits.astype(np.float64) / max(temperature, 1e-6)
            if top_k is not None and top_k < len(logits):
                cutoff = np.sort(logits)[-top_k]
                logits = np.where(logits < cutoff, -np.inf, logits)
            probs = np.exp(logits - logits.max())
            ids.append(int(rng.choice(len(probs), p=probs / probs.sum())))
    model.train()
    return vocab.decode(ids)


# Kernel families for the time shares of --profile: the first matching prefix wins.
FAMILIES = [
    ("matmul", "matmul (Linear, attention scores and P @ V)"),
    ("softmax", "attention softmax (fused causal mask) and its backward"),
    ("flash", "flash attention (Stage 5B), forward and backward"),
    ("cross_entropy", "loss"),
    ("layernorm", "LayerNorm"),
    ("gelu", "GELU"),
    ("embedding", "embedding"),
    ("permute", "layout: head permutes"),
    ("slice", "layout: q/k/v slices"),
    ("adam", "optimiser"),
]


def kernel_shares(prof):
    """[(family, ms, share of the total)] of a camel.profile(), largest first."""
    totals = {}
    for e in prof.events:
        family = next((label for prefix, label in FAMILIES if e.name.startswith(prefix)), None)
        family = family or "elementwise and reductions (add, sum, fill, ...)"
        totals[family] = totals.get(family, 0.0) + (e.ms or 0.0)
    grand = sum(totals.values()) or 1.0
    return sorted(((f, ms, ms / grand) for f, ms in totals.items()), key=lambda r: -r[1])


def save_checkpoint(path, model, cfg, vocab):
    arrays = {"param/" + k: v for k, v in model.state_dict().items()}
    np.savez(path, config=json.dumps(asdict(cfg)), vocab="".join(vocab.chars), **arrays)


def load_checkpoint(path):
    """(model, config, vocab) from a file written by save_checkpoint."""
    with np.load(path) as f:
        cfg = GPTConfig(**json.loads(str(f["config"])))
        vocab = CharVocab(str(f["vocab"]))
        state = {k[len("param/") :]: f[k] for k in f.files if k.startswith("param/")}
    model = GPT.from_config(cfg)
    model.load_state_dict(state)
    return model, cfg, vocab


# Model shape and training defaults per config (see the table in the docstring).
CONFIGS = {
    "gpu": dict(d_model=384, n_layers=6, n_heads=6, max_seq_len=256,
                batch_size=16, seq_len=256, steps=2000, lr=1e-3),
    "cpu": dict(d_model=128, n_layers=2, n_heads=4, max_seq_len=64,
                batch_size=16, seq_len=64, steps=1500, lr=3e-3),
    "tiny": dict(d_model=32, n_layers=2, n_heads=4, max_seq_len=32,
                 batch_size=4, seq_len=32, steps=200, lr=3e-3),
    "long": dict(d_model=256, n_layers=4, n_heads=4, max_seq_len=1024,
                 batch_size=4, seq_len=1024, steps=1000, lr=1e-3),
}  # fmt: skip


def default_config(device):
    """The config for a device: "gpu" on an Apple GPU, "tiny" on the Metal simulator."""
    if device != "mps":
        return "cpu"
    return "tiny" if camel.metal.is_simulator() else "gpu"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cpu", help='"cpu" or "mps"')
    p.add_argument("--config", default=None, choices=sorted(CONFIGS),
                   help="model and training defaults (default: by device)")  # fmt: skip
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--data", default=None, help="plain-text file (default: Shakespeare)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--seq-len", type=int, default=None, help="training window, <= max_seq_len")
    p.add_argument("--d-model", type=int, default=None)
    p.add_argument("--n-layers", type=int, default=None)
    p.add_argument("--n-heads", type=int, default=None)
    p.add_argument("--max-seq-len", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--save", default=None, help="write a checkpoint (.npz) after training")
    p.add_argument("--load", default=None, help="start from a checkpoint (.npz)")
    p.add_argument("--prompt", default="\n")
    p.add_argument("--sample-chars", type=int, default=300)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", action="store_true", help="profile one step after training")
    args = p.parse_args(argv)

    device = args.device
    config = args.config or default_config(device)
    for key, value in CONFIGS[config].items():  # a flag given on the command line wins
        if getattr(args, key) is None:
            setattr(args, key, value)
    where = camel.metal.device_name() if device == "mps" else "NumPy"
    print(f"device: {device} ({where}), config: {config}")
    camel.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)

    text, source = load_text(args.data)
    if args.load:
        model, cfg, vocab = load_checkpoint(args.load)
        print(f"loaded {args.load}: {cfg}")
    else:
        vocab = CharVocab(text)
        cfg = GPTConfig(len(vocab), args.d_model, args.n_layers, args.n_heads, args.max_seq_len)
        model = GPT.from_config(cfg)
    model.to(device)
    ids = vocab.encode(text)
    seq_len = min(args.seq_len, cfg.max_seq_len)
    if len(ids) < seq_len + 2:
        raise ValueError(f"[gpt_mini] text has {len(ids)} characters, need > {seq_len + 1}")
    n_params = sum(int(np.prod(q.shape)) for q in model.parameters())
    print(f"data: {source}, {len(ids):,} characters, vocabulary {len(vocab)}")
    print(f"model: {cfg}, {n_params:,} parameters")

    optimizer = optim.Adam(model.parameters(), lr=args.lr)
    losses = []
    tokens_per_step = args.batch_size * seq_len
    start = last_time = time.perf_counter()
    last_step = 0
    for step in range(1, args.steps + 1):
        xb, yb = get_batch(ids, args.batch_size, seq_len, rng)
        x = camel.tensor(xb, device=device)  # (B, T)
        y = camel.tensor(yb, device=device)  # (B, T)
        loss = lm_loss(model, x, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if step == 1 or step % args.log_every == 0 or step == args.steps:
            recent = np.mean(losses[-args.log_every :])
            now = time.perf_counter()
            window = min(step, args.log_every)
            # tokens/s over the steps since the last line (step 1 includes compiling kernels)
            rate = (step - last_step) * tokens_per_step / (now - last_time)
            last_step, last_time = step, now
            print(
                f"step {step:5d}  loss {losses[-1]:.4f}  (mean of last {window}: {recent:.4f})"
                f"  {now - start:6.1f} s  {rate:8.0f} tokens/s"
            )

    if args.profile and device != "mps":
        print("--profile times Metal kernel dispatches: run with --device mps")
    elif args.profile:
        xb, yb = get_batch(ids, args.batch_size, seq_len, rng)
        x, y = camel.tensor(xb, device=device), camel.tensor(yb, device=device)
        with camel.profile() as prof:  # one whole training step
            loss = lm_loss(model, x, y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            loss.item()
        print(prof.table())
        print("time shares of one training step:")
        for family, ms, share in kernel_shares(prof):
            print(f"  {share:6.1%}  {ms:9.3f} ms  {family}")

    if args.save:
        save_checkpoint(args.save, model, cfg, vocab)
        print(f"saved {args.save}")
    if args.sample_chars > 0:
        sample = generate(
            model, vocab, args.prompt, args.sample_chars, args.temperature, args.top_k, rng, device
        )
        print("---- sample ----")
        print(sample)
    return {"losses": losses, "model": model, "vocab": vocab, "config": cfg}


if __name__ == "__main__":
    main()
    sys.exit(0)
