"""camel.metal.mpsgraph_attention: MPSGraph's fused attention, the attention benchmark's
reference on a Mac (macOS 15+).

Here (Linux) the simulator must refuse it with a message that says why, and the Python
side must reject bad arguments before calling the shim. On a Mac the result is checked
against NumPy, including its order with the dispatches around it.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import require_shim

from camel import flash, metal

require_shim()


def _arrays(shape, seed=0):
    rng = np.random.default_rng(seed)
    host = [rng.standard_normal(shape, dtype=np.float32) for _ in "qkv"]
    return host, [metal.DeviceArray.from_numpy(x) for x in host]


def _run_or_skip(q, k, v, out, scale, causal):
    """Call it on the Metal shim; skip where this macOS has no MPSGraph attention."""
    try:
        metal.mpsgraph_attention(q, k, v, out, scale, causal)
    except metal.MetalError as e:
        if "needs macOS 15" in str(e):
            pytest.skip(str(e))
        raise


@pytest.mark.skipif(not metal.is_simulator(), reason="the simulator's refusal")
def test_simulator_says_mpsgraph_is_unavailable():
    _, (q, k, v) = _arrays((2, 5, 8))
    out = metal.DeviceArray.empty((2, 5, 8), np.float32)
    with pytest.raises(metal.MetalError, match=r"MPSGraph.*simulator") as info:
        metal.mpsgraph_attention(q, k, v, out, 0.5, causal=True)
    assert "(2, 5, 8)" in str(info.value)  # the shape asked for is in the message
    metal.synchronize()  # the refused call left nothing broken behind


@pytest.mark.skipif(metal.shim() != "cuda", reason="the CUDA shim's refusal")
def test_cuda_shim_says_mpsgraph_is_unavailable():
    _, (q, k, v) = _arrays((2, 5, 8))
    out = metal.DeviceArray.empty((2, 5, 8), np.float32)
    with pytest.raises(metal.MetalError, match=r"MPSGraph attention is not available on the CUDA"):
        metal.mpsgraph_attention(q, k, v, out, 0.5, causal=True)
    metal.synchronize()


def test_bad_arguments_are_rejected_with_their_shapes():
    _, (q, k, v) = _arrays((3, 4))
    out = metal.DeviceArray.empty((3, 4), np.float32)
    with pytest.raises(ValueError, match=r"one shape.*\(3, 4\), \(3, 4\), \(3, 4\) and \(4, 3\)"):
        metal.mpsgraph_attention(q, k, v, metal.DeviceArray.empty((4, 3), np.float32), 1.0)
    with pytest.raises(ValueError, match=r"out must be a float32.*shape \(3, 4\) int32"):
        metal.mpsgraph_attention(q, k, v, metal.DeviceArray.empty((3, 4), np.int32), 1.0)
    with pytest.raises(ValueError, match=r"q must be .*\(\.\.\., T, D\).*shape \(12,\)"):
        metal.mpsgraph_attention(q.reshape(12), k, v, out, 1.0)
    with pytest.raises(TypeError, match=r"k must be a DeviceArray, got ndarray"):
        metal.mpsgraph_attention(q, np.ones((3, 4), np.float32), v, out, 1.0)
    with pytest.raises(ValueError, match=r"scale must be finite, got nan"):
        metal.mpsgraph_attention(q, k, v, out, float("nan"))
    shifted = metal.DeviceArray((3, 4), np.float32, metal.Buffer(64), offset=16)
    with pytest.raises(ValueError, match=r"v must be .*offset 0, got .*offset 16"):
        metal.mpsgraph_attention(q, k, shifted, out, 1.0)
    empty = metal.DeviceArray.empty((0, 4), np.float32)
    with pytest.raises(ValueError, match=r"empty shape \(0, 4\)"):
        metal.mpsgraph_attention(empty, empty, empty, empty, 1.0)


@pytest.mark.skipif(metal.shim() != "metal", reason="MPSGraph needs Metal (macOS 15+)")
@pytest.mark.parametrize("shape", [(1, 1, 1, 32), (2, 3, 17, 64), (1, 2, 130, 128)])
@pytest.mark.parametrize("causal", [False, True])
def test_matches_numpy_in_order_with_dispatches(shape, causal):
    from camel import backend_mps

    (q, k, v), (dq, dk, dv) = _arrays(shape, seed=shape[2])
    want = flash.reference_numpy(q, k, v, causal)[0]
    # The inputs are written by a dispatch still in the open command buffer, and the
    # output is read by a dispatch after: MPSGraph must run between the two.
    dq = backend_mps.copy(dq)
    out = metal.DeviceArray.empty(shape, np.float32)
    _run_or_skip(dq, dk, dv, out, 1.0 / math.sqrt(shape[-1]), causal)
    got = backend_mps.copy(out).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4)


@pytest.mark.skipif(metal.shim() != "metal", reason="MPSGraph needs Metal (macOS 15+)")
def test_profile_records_mpsgraph_attention():
    import camel

    _, (q, k, v) = _arrays((4, 64, 32))
    out = metal.DeviceArray.empty((4, 64, 32), np.float32)
    with camel.profile() as prof:
        _run_or_skip(q, k, v, out, 0.25, True)
    (event,) = prof.events
    assert event.name == "mpsgraph_attention" and event.grid == (4, 64, 32)
    assert event.ms is not None and event.ms > 0


def test_bench_uses_mpsgraph_as_the_reference_where_it_works(monkeypatch):
    """The benchmark's Mac path, run here with MPSGraph replaced by NumPy: validated first,
    then an "mpsgraph" row per case that every other row is a percentage of."""
    from camel.bench import attention as bench

    calls = []

    def numpy_attention(q, k, v, out, scale, causal=False):
        assert scale == pytest.approx(1.0 / math.sqrt(q.shape[-1]))
        calls.append((q.shape, causal))
        out.numpy()[...] = flash.reference_numpy(q.numpy(), k.numpy(), v.numpy(), causal)[0]

    monkeypatch.setattr(metal, "mpsgraph_attention", numpy_attention)
    monkeypatch.setattr(metal, "is_simulator", lambda: False)
    assert bench.validate_mpsgraph(log=lambda *a: None) is None
    assert len(calls) == 3 * len(flash.HEAD_DIMS) * 2

    rows = bench.run(["flash_v1"], [17], [32], 1, log=lambda *a: None, reference="mpsgraph")
    assert [r[0] for r in rows] == ["mpsgraph", "naive", "flash_v1"] * 2
    for i in (0, 3):  # full, then causal
        ref_ms = rows[i][4]
        assert rows[i][7] == 100.0
        for row in rows[i + 1 : i + 3]:
            assert row[7] == pytest.approx(100.0 * ref_ms / row[4])
    assert "% of mpsgraph |" in bench.table(rows, True, "test", "mpsgraph")

    # A wrong result keeps MPSGraph out of the reference, and says so.
    def wrong(q, k, v, out, scale, causal=False):
        out.numpy()[...] = 0.0

    monkeypatch.setattr(metal, "mpsgraph_attention", wrong)
    assert "FAILED validation" in bench.validate_mpsgraph(log=lambda *a: None)
