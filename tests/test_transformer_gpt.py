"""GPT-mini (examples/gpt_mini.py) on "mps": Stage 5A's milestone, end to end.

The same weights on "cpu" (NumPy) and "mps" (Metal kernels; the simulator here) give
the same logits, loss and gradient for every parameter, and so does PyTorch where it is
installed; a few Adam steps on "mps" lower the loss; a training step runs entirely as
kernels (no backend_cpu op is called); bad input names the offending values.
"""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

import camel
import camel.functional as F
from camel import backend_cpu, config, nn

ROOT = Path(__file__).resolve().parent.parent
V, C, L, H, T, B = 65, 32, 2, 4, 17, 2  # the tiny config's shape at an awkward T


def _require_mps():
    try:
        from camel import backend_mps, metal  # noqa: F401

        metal.device_name()
    except Exception as e:
        pytest.skip(f"no 'mps' device here: {e}")


def load_gpt():
    spec = importlib.util.spec_from_file_location("gpt_mini_t", ROOT / "examples" / "gpt_mini.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def batch(seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, V, size=(B, T + 1)).astype(np.int32)
    return tokens[:, :-1], tokens[:, 1:]


def run_step(gpt, model, x, y, device):
    """logits, loss and {name: grad} for one forward and backward on `device`."""
    model.to(device)
    model.zero_grad()
    xt, yt = camel.tensor(x, device=device), camel.tensor(y, device=device)
    logits = model(xt)
    loss = F.cross_entropy(logits.reshape(B * T, V), yt.reshape(B * T))
    loss.backward()
    grads = {n: p.grad.numpy().copy() for n, p in model.named_parameters()}
    return logits.numpy().copy(), float(loss.item()), grads


@pytest.fixture(scope="module")
def gpt():
    return load_gpt()


@pytest.fixture(autouse=True)
def naive_attention(monkeypatch):
    """This file tests Stage 5A's path; the tests of the selection itself change it."""
    config.set_choices(attention="naive")


def test_gpt_mini_mps_matches_cpu(gpt):
    _require_mps()
    camel.manual_seed(0)
    model = gpt.GPT(V, C, L, H, max_seq_len=32)
    x, y = batch()
    c_logits, c_loss, c_grads = run_step(gpt, model, x, y, "cpu")
    m_logits, m_loss, m_grads = run_step(gpt, model, x, y, "mps")
    np.testing.assert_allclose(m_logits, c_logits, rtol=1e-4, atol=1e-5)
    assert abs(m_loss - c_loss) < 1e-5, (m_loss, c_loss)
    assert list(m_grads) == list(c_grads) and len(m_grads) == 6 + 12 * L
    for name in c_grads:
        scale = np.abs(c_grads[name]).max()
        np.testing.assert_allclose(
            m_grads[name], c_grads[name], rtol=1e-3, atol=1e-5 * scale + 1e-7, err_msg=name
        )


def _torch_reference(torch, params, x, y):
    """GPT-mini written directly in PyTorch ops over the same weights: (logits, loss, grads)."""
    p = {n: torch.tensor(v, requires_grad=True) for n, v in params.items()}
    tf = torch.nn.functional

    def ln(h, name):
        return tf.layer_norm(h, (C,), p[name + ".weight"], p[name + ".bias"], eps=1e-5)

    def lin(h, name):
        return tf.linear(h, p[name + ".weight"], p[name + ".bias"])

    tx = torch.from_numpy(x.astype(np.int64))
    h = p["token_emb.weight"][tx] + p["pos_emb.weight"][:T]  # (B, T, C)
    for i in range(L):
        pre = f"blocks.{i}."
        q, k, v = lin(ln(h, pre + "ln1"), pre + "attn.c_attn").split(C, dim=2)
        q, k, v = (t.view(B, T, H, C // H).transpose(1, 2) for t in (q, k, v))
        att = tf.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, D)
        h = h + lin(att.transpose(1, 2).reshape(B, T, C), pre + "attn.c_proj")
        m = tf.gelu(lin(ln(h, pre + "ln2"), pre + "mlp.0"), approximate="tanh")
        h = h + lin(m, pre + "mlp.2")
    logits = lin(ln(h, "ln_f"), "head")
    loss = tf.cross_entropy(logits.reshape(-1, V), torch.from_numpy(y.astype(np.int64)).reshape(-1))
    loss.backward()
    grads = {n: t.grad.numpy() for n, t in p.items()}
    return logits.detach().numpy(), float(loss.item()), grads


def test_gpt_mini_mps_matches_pytorch(gpt):
    _require_mps()
    torch = pytest.importorskip("torch")
    camel.manual_seed(1)
    model = gpt.GPT(V, C, L, H, max_seq_len=32)
    params = {n: p.numpy().copy() for n, p in model.named_parameters()}
    x, y = batch(seed=1)
    m_logits, m_loss, m_grads = run_step(gpt, model, x, y, "mps")
    t_logits, t_loss, t_grads = _torch_reference(torch, params, x, y)
    np.testing.assert_allclose(m_logits, t_logits, rtol=1e-4, atol=1e-5)
    assert abs(m_loss - t_loss) < 1e-5, (m_loss, t_loss)
    for name, want in t_grads.items():
        scale = np.abs(want).max()
        np.testing.assert_allclose(
            m_grads[name], want, rtol=1e-3, atol=1e-5 * scale + 1e-7, err_msg=name
        )


def test_training_step_on_mps_runs_only_kernels(gpt, monkeypatch):
    """No backend_cpu op may run during an "mps" step (a silent NumPy round trip would), and
    camel.profile() shows the Stage 4-5A kernels."""
    _require_mps()
    camel.manual_seed(2)
    model = gpt.GPT(V, C, L, H, max_seq_len=32)
    model.to("mps")
    opt = camel.optim.Adam(model.parameters(), lr=1e-3)
    x, y = batch(seed=2)
    xt, yt = camel.tensor(x, device="mps"), camel.tensor(y, device="mps")

    def forbidden(name):
        def fail(*args, **kwargs):
            raise AssertionError(f"backend_cpu.{name} called during an 'mps' training step")

        return fail

    for name in dir(backend_cpu):
        fn = getattr(backend_cpu, name)
        if callable(fn) and not name.startswith("_") and fn.__module__ == backend_cpu.__name__:
            monkeypatch.setattr(backend_cpu, name, forbidden(name))

    with camel.profile() as prof:
        loss = gpt.lm_loss(model, xt, yt)
        opt.zero_grad()
        loss.backward()
        opt.step()
        loss.item()
    table = prof.table()
    for kernel in ["layernorm_forward_v4", "layernorm_backward_v3", "sum_axis_blocks",
                   "gelu_forward", "gelu_backward", "embedding_forward", "embedding_backward_link",
                   "embedding_backward_sum", "softmax_last_axis", "softmax_backward",
                   "slice_backward_float", "permute_uint", "adam_step_tensors"]:  # fmt: skip
        assert kernel in table, f"{kernel} missing from the profile:\n{table}"


def test_gpt_mini_trains_on_mps(gpt, tmp_path, capsys):
    _require_mps()
    data = tmp_path / "text.txt"
    data.write_text("To be, or not to be, that is the question.\n" * 40)
    ckpt = tmp_path / "tiny.npz"
    args = ["--device", "mps", "--config", "tiny", "--data", str(data), "--steps", "12",
            "--batch-size", "4", "--seq-len", "16", "--lr", "1e-2", "--log-every", "4",
            "--sample-chars", "8", "--top-k", "3", "--temperature", "0.7",
            "--save", str(ckpt), "--profile"]  # fmt: skip
    result = gpt.main(args)
    out = capsys.readouterr().out
    losses = result["losses"]
    assert np.mean(losses[-3:]) < losses[0] - 0.5, losses
    assert "config: tiny" in out and "tokens/s" in out and "---- sample ----" in out
    shares = out.split("time shares of one training step:")[1].split("saved")[0]
    percents = [float(line.split("%")[0]) for line in shares.strip().splitlines()]
    assert abs(sum(percents) - 100.0) < 0.5 and "LayerNorm" in shares, shares
    # the checkpoint reloads and gives the same logits on "mps"
    model, cfg, vocab = gpt.load_checkpoint(ckpt)
    assert cfg == result["config"]
    model.to("mps")
    x = camel.tensor(vocab.encode("To be, or not")[None, :], device="mps")
    with camel.no_grad():
        np.testing.assert_array_equal(model(x).numpy(), result["model"](x).numpy())


def test_embedding_gradient_is_deterministic_in_the_model(gpt):
    _require_mps()
    camel.manual_seed(3)
    model = gpt.GPT(V, C, L, H, max_seq_len=32)
    x, y = batch(seed=3)
    first = run_step(gpt, model, x, y, "mps")[2]
    again = run_step(gpt, model, x, y, "mps")[2]
    for name in ("token_emb.weight", "pos_emb.weight"):
        assert first[name].tobytes() == again[name].tobytes(), name


def test_attention_selection(gpt, monkeypatch):
    _require_mps()
    camel.manual_seed(4)
    model = gpt.GPT(V, C, 1, H, max_seq_len=32)
    x, y = batch(seed=4)
    naive = run_step(gpt, model, x, y, "mps")[1]
    config.set_choices(attention=None)  # unset: flash where built, else (D = 8 here) naive
    assert run_step(gpt, model, x, y, "mps")[1] == naive
    config.set_choices(attention="bogus")
    with pytest.raises(ValueError, match=r"CAMEL_ATTENTION='bogus'.*'naive', 'flash'"):
        run_step(gpt, model, x, y, "mps")


def test_flash_selection_and_fallback(gpt, monkeypatch):
    """CAMEL_ATTENTION=flash runs Stage 5B's kernels where they exist (head dim 32 here) and
    equals the naive path; for a head dim without flash kernels (8) it falls back to naive."""
    _require_mps()
    pytest.importorskip("camel.flash")
    x, y = batch(seed=5)
    for d_model, heads, expect_flash in [(64, 2, True), (C, H, False)]:  # D = 32, D = 8
        camel.manual_seed(5)
        model = gpt.GPT(V, d_model, 1, heads, max_seq_len=32)
        config.set_choices(attention="naive")
        _, naive_loss, naive_grads = run_step(gpt, model, x, y, "mps")
        config.set_choices(attention="flash")
        with camel.profile() as prof:
            _, loss, grads = run_step(gpt, model, x, y, "mps")
        names = {e.name for e in prof.events}
        assert any(n.startswith("flash") for n in names) == expect_flash, sorted(names)
        softmax = any(n.startswith("softmax_last_axis") for n in names)  # v1 or v2
        assert softmax == (not expect_flash), sorted(names)
        assert abs(loss - naive_loss) < 1e-5
        for name, want in naive_grads.items():
            scale = np.abs(want).max()
            np.testing.assert_allclose(grads[name], want, rtol=1e-3, atol=1e-5 * scale + 1e-7)


@pytest.mark.parametrize("device", ["cpu", "mps"])
def test_bad_input_names_the_values(gpt, device):
    if device == "mps":
        _require_mps()
    model = gpt.GPT(V, C, 1, H, max_seq_len=8)
    model.to(device)
    bad = np.zeros((2, 5), np.int32)
    bad[1, 3] = V + 7
    pattern = rf"\[embedding\] index .*{V + 7} at flat position 8 .*for {V}"
    with pytest.raises(IndexError, match=pattern):
        model(camel.tensor(bad, device=device))
    with pytest.raises(ValueError, match=r"sequence length 9 .* max_seq_len=8"):
        model(camel.tensor(np.zeros((1, 9), np.int32), device=device))
    with pytest.raises(ValueError, match=r"d_model=30 is not divisible by n_heads=4"):
        nn.MultiHeadAttention(30, 4)
    with pytest.raises(ValueError, match=r"d_model=30 is not divisible by n_heads=4"):
        gpt.GPT(V, 30, 1, 4, max_seq_len=8)


def test_documented_config_sizes(gpt):
    # the parameter counts in the gpt_mini.py docstring and docs/stage5a.md (vocabulary 84)
    documented = {"gpu": 10_810_452, "cpu": 426_580, "tiny": 31_956}
    for name, want in documented.items():
        c = gpt.CONFIGS[name]
        model = gpt.GPT(84, c["d_model"], c["n_layers"], c["n_heads"], c["max_seq_len"])
        assert sum(p.numpy().size for p in model.parameters()) == want, name
        assert c["seq_len"] <= c["max_seq_len"]


@pytest.mark.parametrize("b, t, d_model, heads", [(1, 130, 33, 3), (2, 1, 12, 4), (3, 17, 16, 2)])
def test_multi_head_attention_mps_matches_cpu(b, t, d_model, heads):
    _require_mps()
    camel.manual_seed(6)
    mha = nn.MultiHeadAttention(d_model, heads)
    x_np = np.random.default_rng(6).standard_normal((b, t, d_model)).astype(np.float32)
    results = {}
    for device in ("cpu", "mps"):
        mha.to(device)
        mha.zero_grad()
        x = camel.tensor(x_np, requires_grad=True, device=device)
        y = mha(x)
        (y * y).sum().backward()
        grads = {n: p.grad.numpy().copy() for n, p in mha.named_parameters()}
        results[device] = (y.numpy().copy(), x.grad.numpy().copy(), grads)
    (cy, cdx, cg), (my, mdx, mg) = results["cpu"], results["mps"]
    np.testing.assert_allclose(my, cy, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(mdx, cdx, rtol=1e-3, atol=1e-5 * np.abs(cdx).max())
    for name in cg:
        atol = 1e-5 * np.abs(cg[name]).max() + 1e-7
        np.testing.assert_allclose(mg[name], cg[name], rtol=1e-3, atol=atol, err_msg=name)
