"""Benchmark whole training steps against PyTorch: ``python -m camel.bench models``.

The examples' models, trained step by step as the examples train them (a fresh batch
uploaded each step, forward, backward, Adam, `loss.item()`), side by side in one run:

    gpt_mini   examples/gpt_mini.py's GPT (--config gpu or long): tokens/s
    mlp        examples/mlp.py's MLP (784-256-256-10, batch 128): samples/s

  camel on "mps"            the example's own model and loop
  PyTorch eager FP32        the same architecture written in torch ops, Adam, TF32 off, on
                            the CUDA GPU when camel runs on the CUDA shim (the same GPU);
                            elsewhere PyTorch on the CPU, and the table says so

Each side runs --warmup steps (kernel compiles, caches), then --steps timed steps (wall
time). "host share" estimates how much of a camel step the GPU is idle: 1 - (GPU time
of the step's dispatches, from camel.profile) / (wall time of an unprofiled step).
--profile prints camel.profile's kernel table of one camel step first. --tune first
records the GEMM shapes of one camel step and autotunes them
(camel/bench/tuner.py: every rung and tuning variant, the winner per shape class cached), so
the timed steps use the fastest rung per shape instead of the one default rung.
The weights start differently on the two sides (only speed is compared here;
tests/test_transformer_gpt.py checks that the two compute the same thing).
On the simulator the camel times are CPU times of the simulator, NOT GPU timings.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import numpy as np

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _example(name: str):
    """examples/<name>.py as a module (the examples live in the checkout, not the package)."""
    path = EXAMPLES / f"{name}.py"
    if not path.exists():
        raise SystemExit(f"[bench] models needs {path} (run it from a clone of camel)")
    spec = importlib.util.spec_from_file_location(f"camel_example_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _torch_device():
    """(torch, "cuda" or "cpu", why) — CUDA only when camel itself is on the CUDA shim."""
    from camel import metal

    try:
        import torch
    except ImportError:
        return None, None, "PyTorch is not installed"
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    if metal.shim() == "cuda" and torch.cuda.is_available():
        return torch, "cuda", None
    why = "camel is not on the CUDA shim" if metal.shim() != "cuda" else "no CUDA PyTorch"
    return torch, "cpu", why


def _timed(step, warmup: int, steps: int, sync) -> float:
    """Seconds per step after warm-up; sync() waits for the device."""
    for _ in range(warmup):
        step()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return (time.perf_counter() - start) / steps


def _camel_gpu_ms(step) -> float:
    """GPU milliseconds of one step's dispatches (camel.profile: one command buffer each)."""
    import camel

    with camel.profile() as prof:
        step()
    return sum(e.ms or 0.0 for e in prof.events)


# ---- GPT-mini --------------------------------------------------------------------------


def gpt_camel(cfg: dict, vocab: int, rng):
    """A step function for examples/gpt_mini.py's model and loop on "mps"."""
    import camel
    from camel import optim

    gm = _example("gpt_mini")
    model = gm.GPT(vocab, cfg["d_model"], cfg["n_layers"], cfg["n_heads"], cfg["max_seq_len"])
    model.to("mps")
    opt = optim.Adam(model.parameters(), lr=cfg["lr"])
    b, t = cfg["batch_size"], cfg["seq_len"]

    def step():
        xb = rng.integers(0, vocab, size=(b, t + 1)).astype(np.int32)
        x, y = camel.tensor(xb[:, :-1], device="mps"), camel.tensor(xb[:, 1:], device="mps")
        loss = gm.lm_loss(model, x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss.item()

    return step


def gpt_torch(torch, device: str, cfg: dict, vocab: int, rng):
    """The same GPT in PyTorch eager FP32: pre-LN blocks, fused QKV, causal SDPA, tanh GELU."""
    nn, tf = torch.nn, torch.nn.functional
    c, h, n_layers, t_max = cfg["d_model"], cfg["n_heads"], cfg["n_layers"], cfg["max_seq_len"]

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln1, self.ln2 = nn.LayerNorm(c), nn.LayerNorm(c)
            self.c_attn, self.c_proj = nn.Linear(c, 3 * c), nn.Linear(c, c)
            self.fc, self.proj = nn.Linear(c, 4 * c), nn.Linear(4 * c, c)

        def forward(self, x):  # (B, T, C)
            b, t, _ = x.shape
            q, k, v = self.c_attn(self.ln1(x)).split(c, dim=2)
            q, k, v = (z.view(b, t, h, c // h).transpose(1, 2) for z in (q, k, v))
            att = tf.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, D)
            x = x + self.c_proj(att.transpose(1, 2).reshape(b, t, c))
            return x + self.proj(tf.gelu(self.fc(self.ln2(x)), approximate="tanh"))

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok, self.pos = nn.Embedding(vocab, c), nn.Embedding(t_max, c)
            self.blocks = nn.ModuleList(Block() for _ in range(n_layers))
            self.ln_f, self.head = nn.LayerNorm(c), nn.Linear(c, vocab)

        def forward(self, idx):  # (B, T) -> (B, T, V)
            x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
            for block in self.blocks:
                x = block(x)
            return self.head(self.ln_f(x))

    model = GPT().to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg["lr"])
    b, t = cfg["batch_size"], cfg["seq_len"]

    def step():
        xb = torch.from_numpy(rng.integers(0, vocab, size=(b, t + 1)).astype(np.int64))
        xb = xb.to(device)
        logits = model(xb[:, :-1])
        loss = tf.cross_entropy(logits.reshape(b * t, vocab), xb[:, 1:].reshape(b * t))
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss.item()

    return step


# ---- MLP -------------------------------------------------------------------------------


def mlp_camel(batch: int, rng):
    import camel
    import camel.functional as F
    from camel import optim

    model = _example("mlp").MLP(784, 256, 10).to("mps")
    opt = optim.Adam(model.parameters(), lr=1e-3)

    def step():
        x = camel.tensor(rng.random((batch, 784), dtype=np.float32), device="mps")
        y = camel.tensor(rng.integers(0, 10, size=batch).astype(np.int32), device="mps")
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss.item()

    return step


def mlp_torch(torch, device: str, batch: int, rng):
    nn = torch.nn
    model = nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                          nn.Linear(256, 10)).to(device)  # fmt: skip
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step():
        x = torch.from_numpy(rng.random((batch, 784), dtype=np.float32)).to(device)
        y = torch.from_numpy(rng.integers(0, 10, size=batch).astype(np.int64)).to(device)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss.item()

    return step


# ---- the run ---------------------------------------------------------------------------


def _tune_step(step, log) -> None:
    """Autotune the GEMM shapes of one camel training step (recorded while it runs) and
    save the winners, so the timed steps use them (gemm.choose_version looks them up)."""
    from camel import gemm
    from camel.bench import tuner

    with gemm.recording() as shapes:
        step()
    log(f"[bench] tuning the {len(set(shapes))} GEMM shapes of a step")
    tuner.tune_shapes(shapes, reps=5, log=log)


def _profile_step(step, log) -> None:
    """camel.profile's table of one camel step: GPU time per kernel (each dispatch in a
    command buffer of its own, so the total exceeds an unprofiled step's GPU time)."""
    import camel

    step()  # compiles and caches first
    with camel.profile() as prof:
        step()
    log(prof.table())


def run(models, config: str, steps: int, warmup: int, tune: bool = False,
        profile: bool = False, log=print) -> list[tuple]:  # fmt: skip
    """Rows (model, side, per-step ms, rate, unit, host share or None); tune: autotune the
    camel side's GEMM shapes first; profile: print the kernels of one camel step."""
    from camel import metal

    gm_configs = _example("gpt_mini").CONFIGS
    if config not in gm_configs:
        raise SystemExit(f"[bench] unknown --config {config!r}; valid: {sorted(gm_configs)}")
    torch, tdev, why = _torch_device()
    if why:
        log(f"[bench] PyTorch on {tdev or 'nothing'}: {why}")
    rows = []
    for name in models:
        if name == "gpt_mini":
            cfg, vocab = gm_configs[config], 84
            per_step, unit = cfg["batch_size"] * cfg["seq_len"], "tokens/s"
            sides = [("camel mps", gpt_camel(cfg, vocab, np.random.default_rng(0)))]
            if torch is not None:
                step = gpt_torch(torch, tdev, cfg, vocab, np.random.default_rng(0))
                sides.append((f"PyTorch {tdev}", step))
        elif name == "mlp":
            per_step, unit = 128, "samples/s"
            sides = [("camel mps", mlp_camel(128, np.random.default_rng(0)))]
            if torch is not None:
                sides.append(
                    (f"PyTorch {tdev}", mlp_torch(torch, tdev, 128, np.random.default_rng(0)))
                )
        else:
            raise SystemExit(f"[bench] unknown model {name!r}; valid: gpt_mini, mlp")
        if tune:
            _tune_step(sides[0][1], log)
        if profile:
            _profile_step(sides[0][1], log)
        for side, step in sides:
            if side.startswith("camel"):
                sec = _timed(step, warmup, steps, metal.synchronize)
                gpu_ms = _camel_gpu_ms(step)
                host = max(0.0, 1.0 - gpu_ms / (1000.0 * sec))
            else:
                sync = torch.cuda.synchronize if tdev == "cuda" else (lambda: None)
                sec, host = _timed(step, warmup, steps, sync), None
            rows.append((name, side, 1000.0 * sec, per_step / sec, unit, host))
            log(f"  {name} {side}: {1000.0 * sec:.1f} ms per step")
    return rows


def table(rows, device: str, simulator: bool, config: str) -> str:
    where = f"{device}" + (" (simulator: CPU times, NOT GPU timings)" if simulator else "")
    lines = [f"Measured on {where}; GPT-mini config {config!r}, MLP batch 128.", "",
             "| model | side | ms per step | rate | x PyTorch | host share |",
             "|---|---|---:|---:|---:|---:|"]  # fmt: skip
    torch_rate = {r[0]: r[3] for r in rows if r[1].startswith("PyTorch")}
    for name, side, ms, rate, unit, host in rows:
        ratio = f"{rate / torch_rate[name]:.2f}" if name in torch_rate else "n/a"
        host_text = f"{host:.0%}" if host is not None else ""
        lines.append(f"| {name} | {side} | {ms:.1f} | {rate:,.0f} {unit} | {ratio} | {host_text} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    from camel import metal

    ap = argparse.ArgumentParser(prog="python -m camel.bench models", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--models", default="gpt_mini,mlp", help="comma-separated: gpt_mini, mlp")
    ap.add_argument("--config", default=None, help="GPT-mini config (default: gpu; tiny on sim)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per side")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    tune_help = "autotune the GEMM shapes of camel's step first (winners cached)"
    ap.add_argument("--tune", action="store_true", help=tune_help)
    ap.add_argument("--profile", action="store_true", help="print one camel step's kernels")
    args = ap.parse_args(argv)
    sim = metal.is_simulator()
    config = args.config or ("tiny" if sim else "gpu")
    steps = args.steps or (3 if sim else 20)
    print(f"[bench] models on {metal.device_name()}")
    rows = run(args.models.split(","), config, steps, args.warmup, args.tune, args.profile)
    print()
    print(table(rows, metal.device_name(), sim, config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
