"""End to end on "mps": a small MLP (64-32-10, batch 16) trains for a few steps on the
simulator (or a Mac's GPU) with the same losses and weights as the CPU run, to float32
tolerance. Every op of the step runs as Metal kernels: Linear (matmul + bias add),
ReLU, cross-entropy, their backward, gradient accumulation and the optimiser update.
"""

import numpy as np
import pytest

import camel
import camel.functional as F
from camel import nn, optim


def _require_mps():
    try:
        import camel.backend_mps  # noqa: F401
        from camel import metal

        metal.device_name()
    except Exception as e:
        pytest.skip(f"no 'mps' device here: {e}")


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(64, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x):
        return self.fc2(self.fc1(x).relu())  # (N, 10)


def train(device, make_optimizer, steps=4):
    camel.manual_seed(0)
    model = MLP().to(device)
    opt = make_optimizer(model.parameters())
    rng = np.random.default_rng(1)
    # One fixed batch: the loss must fall step after step (the model memorises it).
    x = camel.tensor(rng.standard_normal((16, 64)).astype(np.float32), device=device)
    y = camel.tensor(rng.integers(0, 10, size=16).astype(np.int32), device=device)
    losses = []
    for _ in range(steps):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    weights = {name: p.numpy().copy() for name, p in model.named_parameters()}
    return losses, weights


@pytest.mark.parametrize(
    "make_optimizer",
    [
        lambda ps: optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-4),
        lambda ps: optim.Adam(ps, lr=1e-2, weight_decay=1e-4),
    ],
    ids=["sgd", "adam"],
)
def test_mlp_trains_on_mps_like_on_cpu(make_optimizer):
    _require_mps()
    cpu_losses, cpu_weights = train("cpu", make_optimizer)
    mps_losses, mps_weights = train("mps", make_optimizer)
    np.testing.assert_allclose(mps_losses, cpu_losses, rtol=1e-5, atol=1e-6)
    assert mps_losses[-1] < mps_losses[0]  # it learns
    for name, w in cpu_weights.items():
        np.testing.assert_allclose(mps_weights[name], w, rtol=1e-4, atol=1e-6, err_msg=name)


def test_mlp_step_runs_as_kernels_only():
    """camel.profile() sees the kernels of one training step, named for what they compute."""
    _require_mps()
    if camel.profile is None:
        pytest.skip("camel.profile is not available")
    camel.manual_seed(0)
    model = MLP().to("mps")
    opt = optim.Adam(model.parameters(), lr=1e-3)
    x = camel.tensor(np.ones((16, 64), np.float32), device="mps")
    y = camel.tensor(np.arange(16, dtype=np.int32) % 10, device="mps")
    with camel.profile() as prof:
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
    table = prof.table()
    for name in ["add", "relu_float4", "relu_backward", "cross_entropy_forward",
                 "cross_entropy_backward", "sum_axis_blocks", "adam_step_tensors",
                 "matmul"]:  # fmt: skip
        assert name in table, f"{name} missing from the profile:\n{table}"
