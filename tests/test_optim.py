"""camel.optim: SGD and Adam step for step against torch.optim and against a NumPy reference."""

import numpy as np
import pytest

import camel
from camel import nn, optim

SHAPES = [(31, 33), (7,), (1, 1), (257,)]


def make_params(seed):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(np.float32) for s in SHAPES]


def grads_for(step, seed=100):
    """A different, deterministic gradient per step (same for camel and torch)."""
    rng = np.random.default_rng(seed + step)
    return [rng.standard_normal(s).astype(np.float32) for s in SHAPES]


def run_camel(make_opt, n_steps, skip=None, device="cpu"):
    params = [nn.Parameter(camel.tensor(a, device=device)) for a in make_params(0)]
    opt = make_opt(params)
    for step in range(n_steps):
        opt.zero_grad()
        for i, (p, g) in enumerate(zip(params, grads_for(step), strict=True)):
            if skip is None or not skip(step, i):
                p.grad = camel.tensor(g, device=device)
        opt.step()
    assert all(p.device == device for p in params)
    return [p.numpy().copy() for p in params]


def run_torch(torch, make_opt, n_steps, skip=None):
    params = [torch.tensor(a, requires_grad=True) for a in make_params(0)]
    opt = make_opt(params)
    for step in range(n_steps):
        opt.zero_grad()  # set_to_none=True: an unset grad stays None
        for i, (p, g) in enumerate(zip(params, grads_for(step), strict=True)):
            if skip is None or not skip(step, i):
                p.grad = torch.from_numpy(g)
        opt.step()
    return [p.detach().numpy() for p in params]


def assert_params_close(ours, theirs, atol=1e-6, rtol=1e-5):
    for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        np.testing.assert_allclose(a, b, atol=atol, rtol=rtol, err_msg=f"param {i} {a.shape}")


SGD_CONFIGS = [
    dict(lr=0.1),
    dict(lr=0.05, momentum=0.9),
    dict(lr=0.05, weight_decay=0.01),
    dict(lr=0.02, momentum=0.5, weight_decay=0.1),
]
ADAM_CONFIGS = [
    dict(),
    dict(lr=1e-2),
    dict(lr=3e-3, betas=(0.8, 0.99), eps=1e-6),
    dict(lr=1e-2, weight_decay=0.05),
]


@pytest.mark.parametrize("cfg", SGD_CONFIGS, ids=str)
def test_sgd_matches_torch(cfg, device):
    torch = pytest.importorskip("torch")
    ours = run_camel(lambda ps: optim.SGD(ps, **cfg), 6, device=device)
    theirs = run_torch(torch, lambda ps: torch.optim.SGD(ps, **cfg), 6)
    assert_params_close(ours, theirs)


@pytest.mark.parametrize("cfg", ADAM_CONFIGS, ids=str)
def test_adam_matches_torch(cfg, device):
    torch = pytest.importorskip("torch")
    ours = run_camel(lambda ps: optim.Adam(ps, **cfg), 6, device=device)
    theirs = run_torch(torch, lambda ps: torch.optim.Adam(ps, **cfg), 6)
    assert_params_close(ours, theirs)


def skip_some(step, i):
    # param 1 gets no gradient on steps 0 and 3, param 2 never gets one
    return (i == 1 and step in (0, 3)) or i == 2


@pytest.mark.parametrize(
    "name,cfg",
    [("SGD", dict(lr=0.1, momentum=0.9, weight_decay=0.01)), ("Adam", dict(lr=1e-2))],
)
def test_params_without_grad_are_skipped_like_torch(name, cfg, device):
    torch = pytest.importorskip("torch")
    ours = run_camel(lambda ps: getattr(optim, name)(ps, **cfg), 6, skip_some, device)
    theirs = run_torch(torch, lambda ps: getattr(torch.optim, name)(ps, **cfg), 6, skip_some)
    assert_params_close(ours, theirs)
    np.testing.assert_array_equal(ours[2], make_params(0)[2])  # never touched


def test_adam_matches_numpy_reference(device):
    """The textbook formulas in float64, independent of PyTorch."""
    lr, b1, b2, eps, wd = 1e-2, 0.9, 0.999, 1e-8, 0.01
    ours = run_camel(lambda ps: optim.Adam(ps, lr, (b1, b2), eps, wd), 5, device=device)
    ref = [a.astype(np.float64) for a in make_params(0)]
    m = [np.zeros_like(a) for a in ref]
    v = [np.zeros_like(a) for a in ref]
    for step in range(5):
        t = step + 1
        for i, g in enumerate(grads_for(step)):
            g = g + wd * ref[i]
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            mhat, vhat = m[i] / (1 - b1**t), v[i] / (1 - b2**t)
            ref[i] = ref[i] - lr * mhat / (np.sqrt(vhat) + eps)
    assert_params_close(ours, ref, atol=1e-5, rtol=1e-4)


def test_sgd_matches_numpy_reference(device):
    lr, mom, wd = 0.05, 0.9, 0.01
    ours = run_camel(lambda ps: optim.SGD(ps, lr, mom, wd), 4, device=device)
    ref = [a.astype(np.float64) for a in make_params(0)]
    buf = [None] * len(ref)
    for step in range(4):
        for i, g in enumerate(grads_for(step)):
            g = g + wd * ref[i]
            buf[i] = g if buf[i] is None else mom * buf[i] + g
            ref[i] = ref[i] - lr * buf[i]
    assert_params_close(ours, ref, atol=1e-5, rtol=1e-4)


def test_model_trained_with_adam_matches_torch_for_several_steps():
    """End to end: forward, cross-entropy, backward and Adam step, three steps in a row."""
    torch = pytest.importorskip("torch")
    import camel.functional as F

    camel.manual_seed(3)
    model = nn.Sequential(nn.Linear(13, 31), nn.ReLU(), nn.Linear(31, 5))
    tmodel = torch.nn.Sequential(torch.nn.Linear(13, 31), torch.nn.ReLU(), torch.nn.Linear(31, 5))
    with torch.no_grad():
        for p, tp in zip(model.parameters(), tmodel.parameters(), strict=True):
            tp.copy_(torch.from_numpy(p.numpy().copy()))
    opt = optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-3)
    topt = torch.optim.Adam(tmodel.parameters(), lr=1e-2, weight_decay=1e-3)
    rng = np.random.default_rng(0)
    for _ in range(3):
        x = rng.standard_normal((9, 13)).astype(np.float32)
        y = rng.integers(0, 5, 9)
        loss = F.cross_entropy(model(camel.tensor(x)), camel.tensor(y))
        tloss = torch.nn.functional.cross_entropy(tmodel(torch.from_numpy(x)), torch.from_numpy(y))
        assert abs(loss.item() - tloss.item()) < 1e-5
        opt.zero_grad()
        loss.backward()
        opt.step()
        topt.zero_grad()
        tloss.backward()
        topt.step()
    for (name, p), (_, tp) in zip(model.named_parameters(), tmodel.named_parameters(), strict=True):
        np.testing.assert_allclose(p.numpy(), tp.detach().numpy(), atol=1e-5, err_msg=name)


def test_zero_grad_and_bad_arguments():
    p = nn.Parameter(np.ones(3, np.float32))
    opt = optim.SGD([p], lr=0.1)
    p.grad = camel.tensor(np.ones(3, np.float32))
    opt.zero_grad()
    assert p.grad is None
    opt.step()  # no gradient: nothing happens
    np.testing.assert_array_equal(p.numpy(), np.ones(3))
    with pytest.raises(ValueError, match=r"\[SGD\] lr must be in \[0.0, inf\), got -1"):
        optim.SGD([p], lr=-1)
    with pytest.raises(ValueError, match=r"\[Adam\] betas\[1\] must be in \[0.0, 1.0\), got 1.0"):
        optim.Adam([p], betas=(0.9, 1.0))
    with pytest.raises(ValueError, match=r"\[Adam\] got an empty parameter list"):
        optim.Adam([])
    with pytest.raises(ValueError, match=r"requires_grad=False"):
        optim.Adam([camel.tensor([1.0, 2.0])])
    p.grad = camel.tensor(np.ones(4, np.float32))
    with pytest.raises(ValueError, match=r"grad \(4,\) on cpu does not match param \(3,\) on cpu"):
        opt.step()


def test_duplicate_params_and_moving_after_the_first_step_are_errors(devices):
    p = nn.Parameter(np.ones(3, np.float32))
    with pytest.raises(ValueError, match=r"params\[1\] is the same tensor as params\[0\]"):
        optim.SGD([p, p], lr=0.1)
    if "mps" not in devices:
        pytest.skip("needs a second device")
    lin = nn.Linear(3, 2)
    opt = optim.Adam(lin.parameters())
    lin(camel.tensor(np.ones((1, 3), np.float32))).sum().backward()
    opt.step()
    lin.to("mps")
    lin(camel.tensor(np.ones((1, 3), np.float32), device="mps")).sum().backward()
    with pytest.raises(RuntimeError, match=r"is on mps but its optimiser state is on cpu"):
        opt.step()
