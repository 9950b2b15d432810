"""camel.nn: module tree (names, state_dict, modes, devices) and layers against PyTorch."""

import math

import numpy as np
import pytest
from conftest import DEVICES

import camel
from camel import nn

RNG = np.random.default_rng(1234)


def randn(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def assert_close(actual, expected, atol=1e-5, rtol=1e-4, what=""):
    actual = actual.numpy() if isinstance(actual, camel.Tensor) else np.asarray(actual)
    if hasattr(expected, "detach"):
        expected = expected.detach().numpy()
    np.testing.assert_allclose(actual, expected, atol=atol, rtol=rtol, err_msg=what)


# ----------------------------------------------------------------------------- module tree


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = nn.MultiHeadAttention(d, 2)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))


class Net(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.emb = nn.Embedding(5, d)
        self.blocks = nn.ModuleList([Block(d) for _ in range(2)])
        self.extra = [nn.Linear(d, 3, bias=False)]  # a plain list is searched too
        self.head = nn.Linear(d, 5)
        self.scale = 3.0  # not a parameter


def test_named_parameters_use_pytorch_dotted_names():
    names = [n for n, _ in Net().named_parameters()]
    block = [
        "ln1.weight", "ln1.bias",
        "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight", "attn.c_proj.bias",
        "mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias",
    ]  # fmt: skip
    expected = (
        ["emb.weight"]
        + [f"blocks.{i}.{n}" for i in range(2) for n in block]
        + ["extra.0.weight", "head.weight", "head.bias"]
    )
    assert names == expected


def test_named_parameters_match_torch_module_names():
    torch = pytest.importorskip("torch")

    class TBlock(torch.nn.Module):
        def __init__(self, d):
            super().__init__()
            self.ln1 = torch.nn.LayerNorm(d)
            self.mlp = torch.nn.Sequential(
                torch.nn.Linear(d, 2 * d), torch.nn.GELU(), torch.nn.Linear(2 * d, d)
            )

    class CBlock(nn.Module):
        def __init__(self, d):
            super().__init__()
            self.ln1 = nn.LayerNorm(d)
            self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    t = torch.nn.ModuleList([TBlock(4) for _ in range(3)])
    c = nn.ModuleList([CBlock(4) for _ in range(3)])
    t_names = [(n, tuple(p.shape)) for n, p in t.named_parameters()]
    c_names = [(n, p.shape) for n, p in c.named_parameters()]
    assert c_names == t_names


def test_parameters_are_unique_and_in_order():
    net = Net()
    shared = nn.Linear(3, 3)
    net.a, net.b = shared, shared  # the same layer twice: its parameters appear once
    params = net.parameters()
    assert len(params) == len({id(p) for p in params})
    assert all(isinstance(p, nn.Parameter) and p.requires_grad for p in params)
    assert [n for n, _ in net.named_parameters()][-2:] == ["a.weight", "a.bias"]


def test_train_eval_reach_every_submodule():
    net = Net()
    assert all(m.training for m in net.modules())
    net.eval()
    assert not any(m.training for m in net.modules())
    assert not net.blocks[1].mlp[2].training and not net.extra[0].training
    net.train()
    assert all(m.training for m in net.modules())


def test_zero_grad_clears_every_gradient():
    lin = nn.Linear(4, 3)
    lin(camel.tensor(randn(2, 4))).sum().backward()
    assert lin.weight.grad is not None and lin.bias.grad is not None
    lin.zero_grad()
    assert lin.weight.grad is None and lin.bias.grad is None


def test_state_dict_round_trip_gives_identical_outputs():
    camel.manual_seed(1)
    a = Net()
    camel.manual_seed(2)
    b = Net()
    x = camel.tensor(randn(2, 7, 8))
    fa = a.blocks[0].attn(x).numpy().copy()
    assert not np.allclose(b.blocks[0].attn(x).numpy(), fa)
    state = a.state_dict()
    assert list(state) == [n for n, _ in a.named_parameters()]
    assert all(isinstance(v, np.ndarray) and v.dtype == np.float32 for v in state.values())
    ids = [id(p) for p in b.parameters()]
    b.load_state_dict(state)
    assert [id(p) for p in b.parameters()] == ids  # same Parameter objects, new values
    np.testing.assert_array_equal(b.blocks[0].attn(x).numpy(), fa)
    # the state dict is a copy: changing it later does not change either model
    state["head.weight"][:] = 123.0
    assert not np.any(a.head.weight.numpy() == 123.0)
    assert not np.any(b.head.weight.numpy() == 123.0)


def test_state_dict_round_trip_through_npz(tmp_path):
    a, b = nn.Linear(5, 3), nn.Linear(5, 3)
    np.savez(tmp_path / "m.npz", **a.state_dict())
    with np.load(tmp_path / "m.npz") as f:
        b.load_state_dict(dict(f))
    np.testing.assert_array_equal(b.weight.numpy(), a.weight.numpy())
    np.testing.assert_array_equal(b.bias.numpy(), a.bias.numpy())


def test_load_state_dict_errors_name_keys_and_shapes():
    lin = nn.Linear(4, 3)
    state = lin.state_dict()
    before = lin.weight.numpy().copy()
    with pytest.raises(KeyError, match=r"missing keys \['bias'\]"):
        lin.load_state_dict({"weight": state["weight"]})
    with pytest.raises(KeyError, match=r"unexpected keys \['extra'\]"):
        lin.load_state_dict({**state, "extra": np.zeros(2, np.float32)})
    bad = {"weight": np.zeros((3, 5), np.float32), "bias": state["bias"] + 1}
    with pytest.raises(ValueError, match=r"weight: shape \(3, 5\) in the state dict, \(3, 4\)"):
        lin.load_state_dict(bad)
    np.testing.assert_array_equal(lin.weight.numpy(), before)  # nothing half-loaded
    assert not np.any(lin.bias.numpy() == state["bias"] + 1)


def test_to_device_moves_in_place_and_back(devices):
    lin = nn.Linear(3, 2)
    values = [p.numpy().copy() for p in lin.parameters()]
    ids = [id(p) for p in lin.parameters()]
    for device in devices + ["cpu"]:
        assert lin.to(device) is lin
        assert [id(p) for p in lin.parameters()] == ids
        assert all(p.device == device and p.requires_grad for p in lin.parameters())
        for p, v in zip(lin.parameters(), values, strict=True):
            np.testing.assert_array_equal(p.numpy(), v)
        sd = lin.state_dict()  # always host NumPy copies
        assert all(isinstance(a, np.ndarray) for a in sd.values())


def test_to_cpu_keeps_parameter_identity_and_unknown_device_fails():
    lin = nn.Linear(3, 2)
    ids = [id(p) for p in lin.parameters()]
    assert lin.to("cpu") is lin
    assert [id(p) for p in lin.parameters()] == ids
    with pytest.raises(ValueError, match="unknown device 'gpu'"):
        lin.to("gpu")


def test_sequential_applies_in_order_and_modulelist_is_not_a_layer():
    seq = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    x = camel.tensor(randn(5, 3))
    manual = seq[2](seq[0](x).relu())
    np.testing.assert_array_equal(seq(x).numpy(), manual.numpy())
    assert len(seq) == 3
    ml = nn.ModuleList([nn.ReLU()])
    with pytest.raises(TypeError, match="ModuleList"):
        ml(x)
    with pytest.raises(TypeError, match="must be Modules"):
        ml.append(3)


def test_repr_shows_the_tree():
    text = repr(Block(4))
    attn = "(attn): MultiHeadAttention(\n    4, n_heads=2, causal=True\n    (c_attn): Linear(4, 12"
    assert attn in text
    assert "(0): Linear(4, 8, bias=True)" in text


# ----------------------------------------------------------------------------- layers


def test_linear_init_is_pytorch_default_uniform():
    camel.manual_seed(0)
    lin = nn.Linear(400, 300)
    bound = 1 / math.sqrt(400)
    w, b = lin.weight.numpy(), lin.bias.numpy()
    assert w.shape == (300, 400) and b.shape == (300,)
    assert np.abs(w).max() <= bound and np.abs(b).max() <= bound
    # uniform on [-bound, bound]: mean 0, std bound / sqrt(3)
    assert abs(w.mean()) < 0.02 * bound
    assert abs(w.std() - bound / math.sqrt(3)) < 0.02 * bound
    assert np.abs(w).max() > 0.99 * bound


def test_embedding_init_is_standard_normal():
    camel.manual_seed(0)
    w = nn.Embedding(1000, 64).weight.numpy()
    assert abs(w.mean()) < 0.02 and abs(w.std() - 1) < 0.02


def test_layer_errors_teach():
    with pytest.raises(ValueError, match=r"d_model=10 is not divisible by n_heads=3"):
        nn.MultiHeadAttention(10, 3)
    with pytest.raises(
        ValueError, match=r"\[linear\] .* got shapes \(2, 5\) and \(3, 4\): x must end in in = 4"
    ):
        nn.Linear(4, 3)(camel.tensor(randn(2, 5)))
    with pytest.raises(ValueError, match=r"\[LayerNorm\] eps must be positive, got 0"):
        nn.LayerNorm(4, eps=0)
    with pytest.raises(ValueError, match=r"expected input \(B, T, 8\), got \(2, 8\)"):
        nn.MultiHeadAttention(8, 2)(camel.tensor(randn(2, 8)))


def _params_to_torch(torch, camel_module, torch_module):
    for (cn, cp), (tn, tp) in zip(
        camel_module.named_parameters(), torch_module.named_parameters(), strict=True
    ):
        assert cn == tn and cp.shape == tuple(tp.shape)
        with torch.no_grad():
            tp.copy_(torch.from_numpy(cp.numpy().copy()))


def _check_grads(camel_module, torch_module, atol=1e-4, rtol=1e-3):
    for (name, cp), (_, tp) in zip(
        camel_module.named_parameters(), torch_module.named_parameters(), strict=True
    ):
        assert_close(cp.grad, tp.grad, atol=atol, rtol=rtol, what=f"grad of {name}")


@pytest.mark.parametrize("shape", [(31, 33), (2, 7, 33), (1, 1)])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_matches_torch(shape, bias, device):
    torch = pytest.importorskip("torch")
    out = 7
    lin = nn.Linear(shape[-1], out, bias=bias).to(device)
    tlin = torch.nn.Linear(shape[-1], out, bias=bias)
    _params_to_torch(torch, lin, tlin)
    x_np, g_np = randn(*shape), randn(*shape[:-1], out)
    x = camel.tensor(x_np, requires_grad=True, device=device)
    tx = torch.tensor(x_np, requires_grad=True)
    y, ty = lin(x), tlin(tx)
    assert y.device == device
    assert_close(y, ty, what="forward")
    y.backward(camel.tensor(g_np, device=device))
    ty.backward(torch.from_numpy(g_np))
    assert_close(x.grad, tx.grad, what="grad x")
    _check_grads(lin, tlin)


def test_linear_on_mps_reads_the_weight_transposed_without_copying_it():
    if "mps" not in DEVICES:
        pytest.skip("no mps device")
    lin = nn.Linear(33, 7).to("mps")
    x = camel.tensor(randn(5, 3, 33), requires_grad=True, device="mps")
    with camel.profile() as prof:
        lin(x).sum().backward()
    names = [e.name for e in prof.events]
    assert any(n.startswith("matmul") for n in names), names
    assert not any("permute" in n or "transpose" in n for n in names), names


@pytest.mark.parametrize("shape", [(3, 33), (2, 5, 31), (4, 1)])
def test_layernorm_matches_torch(shape, device):
    torch = pytest.importorskip("torch")
    d = shape[-1]
    ln = nn.LayerNorm(d).to(device)
    tln = torch.nn.LayerNorm(d)
    # non-trivial weight and bias so their gradients matter
    ln.load_state_dict({"weight": randn(d), "bias": randn(d)})
    _params_to_torch(torch, ln, tln)
    x_np, g_np = randn(*shape) * 3 + 1, randn(*shape)
    x = camel.tensor(x_np, requires_grad=True, device=device)
    tx = torch.tensor(x_np, requires_grad=True)
    y, ty = ln(x), tln(tx)
    assert_close(y, ty, what="forward")
    y.backward(camel.tensor(g_np, device=device))
    ty.backward(torch.from_numpy(g_np))
    if d == 1:  # x - mean is exactly 0: dx and dweight are exactly 0, torch's rounding noise
        # (times 1/sqrt(eps) = 316: 1.2e-4 in a CUDA build of PyTorch on an H100 host)
        assert not x.grad.numpy().any()
        assert not ln.weight.grad.numpy().any()
        assert_close(ln.bias.grad, tln.bias.grad, atol=1e-4, rtol=1e-3, what="grad of bias")
    else:
        assert_close(x.grad, tx.grad, atol=1e-4, what="grad x")
        _check_grads(ln, tln)


def test_embedding_matches_torch_with_repeated_ids(device):
    torch = pytest.importorskip("torch")
    emb = nn.Embedding(11, 7).to(device)
    temb = torch.nn.Embedding(11, 7)
    _params_to_torch(torch, emb, temb)
    idx_np = np.array([[0, 3, 3, 10], [3, 1, 0, 0], [9, 9, 9, 2]], dtype=np.int32)
    g_np = randn(3, 4, 7)
    y = emb(camel.tensor(idx_np, device=device))
    ty = temb(torch.from_numpy(idx_np.astype(np.int64)))
    assert_close(y, ty, what="forward")
    y.backward(camel.tensor(g_np, device=device))
    ty.backward(torch.from_numpy(g_np))
    _check_grads(emb, temb)
    assert np.all(emb.weight.grad.numpy()[[4, 5, 6, 7, 8]] == 0)  # unused rows


@pytest.mark.parametrize("act", ["relu", "gelu"])
def test_activations_match_torch(act, device):
    torch = pytest.importorskip("torch")
    x_np = randn(3, 33) * 3
    x_np[0, 0] = 0.0
    layer = nn.ReLU() if act == "relu" else nn.GELU()
    tlayer = torch.nn.ReLU() if act == "relu" else torch.nn.GELU(approximate="tanh")
    x = camel.tensor(x_np, requires_grad=True, device=device)
    tx = torch.tensor(x_np, requires_grad=True)
    y, ty = layer(x), tlayer(tx)
    assert_close(y, ty)
    y.sum().backward()
    ty.sum().backward()
    assert_close(x.grad, tx.grad)


def torch_mha(torch, x, c_attn, c_proj, n_heads, causal):
    """nanoGPT's CausalSelfAttention in PyTorch: the reference camel's layer must match."""
    B, T, C = x.shape
    q, k, v = c_attn(x).split(C, dim=2)
    q, k, v = (t.view(B, T, n_heads, C // n_heads).transpose(1, 2) for t in (q, k, v))
    y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return c_proj(y.transpose(1, 2).reshape(B, T, C))


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("B,T,C,H", [(2, 7, 12, 3), (1, 33, 16, 4), (3, 1, 8, 8)])
def test_multihead_attention_matches_torch(causal, B, T, C, H, device):
    torch = pytest.importorskip("torch")
    mha = nn.MultiHeadAttention(C, H, causal=causal).to(device)
    t_attn, t_proj = torch.nn.Linear(C, 3 * C), torch.nn.Linear(C, C)
    tmods = torch.nn.ModuleDict({"c_attn": t_attn, "c_proj": t_proj})
    _params_to_torch(torch, mha, tmods)
    x_np, g_np = randn(B, T, C), randn(B, T, C)
    x = camel.tensor(x_np, requires_grad=True, device=device)
    tx = torch.tensor(x_np, requires_grad=True)
    y = mha(x)
    ty = torch_mha(torch, tx, t_attn, t_proj, H, causal)
    assert_close(y, ty, atol=1e-5, what="forward")
    y.backward(camel.tensor(g_np, device=device))
    ty.backward(torch.from_numpy(g_np))
    assert_close(x.grad, tx.grad, atol=1e-4, what="grad x")
    _check_grads(mha, tmods)


def test_causal_attention_ignores_the_future():
    mha = nn.MultiHeadAttention(8, 2, causal=True)
    x_np = randn(1, 6, 8)
    y1 = mha(camel.tensor(x_np)).numpy().copy()
    x_np[0, 4:] = randn(2, 8)  # change the last two positions
    y2 = mha(camel.tensor(x_np)).numpy()
    np.testing.assert_allclose(y2[0, :4], y1[0, :4], atol=1e-6)
    assert not np.allclose(y2[0, 4:], y1[0, 4:])
