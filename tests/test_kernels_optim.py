"""Fused optimiser kernels (shaders/ops_optim.metal) against the NumPy reference.

Several steps of SGD (with and without momentum and weight decay) and Adam (with L2
weight decay) on buffers of awkward sizes, in all three simulator schedule orders:
the parameters and the state buffers must equal camel/backend_cpu.py's to float32
rounding (the GPU may fuse a multiply and an add into one FMA).
"""

import numpy as np
import pytest
from conftest import backend_mps_or_skip

from camel import backend_cpu as cpu


def rand(n, seed):
    return np.random.default_rng(seed).standard_normal(n).astype(np.float32)


def close(got, want):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


SIZES = [1, 33, 4097]


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize(
    "momentum, weight_decay", [(0.0, 0.0), (0.0, 0.01), (0.9, 0.0), (0.9, 0.1)]
)
def test_sgd_steps(mps, n, momentum, weight_decay):
    p_cpu = rand(n, 1)
    buf_cpu = np.zeros(n, np.float32) if momentum else None
    p_dev = mps.from_numpy(p_cpu)
    buf_dev = mps.full((n,), 0.0, "float32") if momentum else None
    for step in range(3):
        g = rand(n, 10 + step)
        cpu.sgd_step(p_cpu, g, buf_cpu, 0.1, momentum, weight_decay, step == 0)
        mps.sgd_step(p_dev, mps.from_numpy(g), buf_dev, 0.1, momentum, weight_decay, step == 0)
    close(np.array(mps.to_numpy(p_dev)), p_cpu)
    if momentum:
        close(np.array(mps.to_numpy(buf_dev)), buf_cpu)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_adam_steps(mps, n, weight_decay):
    p_cpu, m_cpu, v_cpu = rand(n, 2), np.zeros(n, np.float32), np.zeros(n, np.float32)
    p_dev = mps.from_numpy(p_cpu)
    m_dev, v_dev = mps.full((n,), 0.0, "float32"), mps.full((n,), 0.0, "float32")
    for step in range(1, 5):
        g = rand(n, 20 + step) * np.float32(10.0 ** (step - 3))  # gradients of varied scale
        cpu.adam_step(p_cpu, g, m_cpu, v_cpu, 1e-3, 0.9, 0.999, 1e-8, weight_decay, step)
        args = (1e-3, 0.9, 0.999, 1e-8, weight_decay, step)
        mps.adam_step(p_dev, mps.from_numpy(g), m_dev, v_dev, *args)
    close(np.array(mps.to_numpy(m_dev)), m_cpu)
    np.testing.assert_allclose(np.array(mps.to_numpy(v_dev)), v_cpu, rtol=1e-5, atol=1e-12)
    close(np.array(mps.to_numpy(p_dev)), p_cpu)


# 16 tensors, one of them empty: three dispatches of adam_step_tensors (7, 7 and 1 + an
# empty one), sizes around its 256-thread threadgroups
MANY_SIZES = [1, 255, 256, 257, 0, 33, 4097, 3, 512, 7, 1000, 64, 65, 2, 300, 129]


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_adam_steps_of_many_tensors_equal_one_tensor_at_a_time(mps, weight_decay):
    """adam_steps (up to 7 tensors a dispatch) gives the same bits as adam_step on each
    tensor alone, and the NumPy reference's values; every tensor's own buffers, none of
    its neighbours'."""
    import camel

    def fresh():
        return [(mps.from_numpy(rand(n, 40 + i)), mps.full((n,), 0.0, "float32"),
                 mps.full((n,), 0.0, "float32")) for i, n in enumerate(MANY_SIZES)]  # fmt: skip

    together, alone = fresh(), fresh()
    cpu_state = [(rand(n, 40 + i), np.zeros(n, np.float32), np.zeros(n, np.float32))
                 for i, n in enumerate(MANY_SIZES)]  # fmt: skip
    for step in range(1, 4):
        grads = [rand(n, 70 + 17 * step + i) for i, n in enumerate(MANY_SIZES)]
        args = (1e-3, 0.9, 0.999, 1e-8, weight_decay, step)
        dev_grads = [mps.from_numpy(g) for g in grads]
        with camel.profile() as prof:
            mps.adam_steps(
                [(p, g, m, v) for (p, m, v), g in zip(together, dev_grads, strict=True)], *args
            )
        assert [e.name for e in prof.events] == ["adam_step_tensors"] * 3
        for (p, m, v), g in zip(alone, dev_grads, strict=True):
            mps.adam_step(p, g, m, v, *args)
        cpu.adam_steps([(p, g, m, v) for (p, m, v), g in zip(cpu_state, grads, strict=True)], *args)
    for i, n in enumerate(MANY_SIZES):
        for what, got, want, ref in zip("pmv", together[i], alone[i], cpu_state[i], strict=True):
            got, want = np.array(mps.to_numpy(got)), np.array(mps.to_numpy(want))
            np.testing.assert_array_equal(got, want, err_msg=f"tensor {i} ({n}): {what}")
            np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-7,
                                       err_msg=f"tensor {i} ({n}): {what}")  # fmt: skip


def test_adam_matches_torch():
    torch = pytest.importorskip("torch")
    mps = backend_mps_or_skip()
    p0 = rand(33, 3)
    p_dev = mps.from_numpy(p0)
    m_dev, v_dev = mps.full((33,), 0.0, "float32"), mps.full((33,), 0.0, "float32")
    tp = torch.tensor(p0, requires_grad=True)
    opt = torch.optim.Adam([tp], lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.05)
    for step in range(1, 4):
        g = rand(33, 30 + step)
        mps.adam_step(p_dev, mps.from_numpy(g), m_dev, v_dev, 1e-2, 0.8, 0.99, 1e-6, 0.05, step)
        tp.grad = torch.tensor(g)
        opt.step()
    np.testing.assert_allclose(np.array(mps.to_numpy(p_dev)), tp.detach().numpy(), rtol=1e-5)
