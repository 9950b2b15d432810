"""Stage 4-5A kernels against the NumPy reference (camel/backend_cpu.py).

LayerNorm (both forward versions) and its backward, GELU and its backward
(shaders/ops_layernorm.metal), embedding gather and the deterministic scatter-add
(shaders/ops_embedding.metal), slice copies and their backward (shaders/ops_layout.metal),
causal softmax at attention shapes, at awkward sizes (d_model 1, 33, 768; T 1, 17, 130;
vocab 65 and 1000), in all three simulator schedule orders.
"""

import numpy as np
import pytest

import camel
from camel import backend_cpu as cpu
from camel import config


def rand(*shape, seed=0, scale=1.0, shift=0.0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape) * scale + shift).astype(np.float32)


def host(mps, x):
    return np.array(mps.to_numpy(x))


def close(got, want, rtol=2e-5, atol=1e-5):
    assert got.shape == want.shape, (got.shape, want.shape)
    assert not np.isnan(got).any(), "NaN in the kernel's output"
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol)


# (B, T, D): d_model 1, 33, 768 and T 1, 17, 130 (not every pair: the suite stays fast)
LN_SHAPES = [
    (1, 1, 1),
    (2, 17, 1),
    (1, 1, 33),
    (2, 17, 33),
    (1, 130, 33),
    (2, 17, 768),
    (1, 130, 64),
    (3, 130, 1),
    (4, 64, 5),
]  # rows > 64: dweight and dbias in two passes (partials per block of 64 rows, then their sum)


# v4's geometry: a SIMD group per row (8 rows per threadgroup: 17 leaves a partial one),
# P = 2, 4, 8, 16 past 1024, 2048, 4096, 8192 floats; float4s when D % 4 == 0.
LN_V4_SHAPES = [(17, 1024), (9, 1028), (3, 3001), (2, 8196), (1, 16384)]


@pytest.mark.parametrize("version", [1, 2, 3, 4])
@pytest.mark.parametrize("shape", LN_SHAPES)
def test_layer_norm_forward(mps, monkeypatch, version, shape, poisoned_memory):
    monkeypatch.setattr(mps, "LAYERNORM_VERSION", version)
    d = shape[-1]
    x = rand(*shape, seed=1, scale=2.0, shift=3.0)  # a non-zero mean tests the shift in v2
    w, b = rand(d, seed=2), rand(d, seed=3)
    out, mean, rstd = mps.layer_norm(mps.from_numpy(x), mps.from_numpy(w), mps.from_numpy(b), 1e-5)
    want_out, want_mean, want_rstd = cpu.layer_norm(x, w, b, 1e-5)
    close(host(mps, mean), want_mean)
    close(host(mps, rstd), want_rstd, rtol=1e-4)
    close(host(mps, out), want_out, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape", LN_V4_SHAPES)
def test_layer_norm_forward_v4_wide_rows(mps, monkeypatch, shape, poisoned_memory):
    monkeypatch.setattr(mps, "LAYERNORM_VERSION", 4)
    d = shape[-1]
    x = rand(*shape, seed=31, scale=2.0, shift=3.0)
    w, b = rand(d, seed=32), rand(d, seed=33)
    out, mean, rstd = mps.layer_norm(mps.from_numpy(x), mps.from_numpy(w), mps.from_numpy(b), 1e-5)
    want_out, want_mean, want_rstd = cpu.layer_norm(x, w, b, 1e-5)
    close(host(mps, mean), want_mean)
    close(host(mps, rstd), want_rstd, rtol=1e-4)
    close(host(mps, out), want_out, rtol=1e-4, atol=1e-4)


def test_layer_norm_v4_unaligned_takes_floats(mps, monkeypatch):
    from camel.metal import DeviceArray

    monkeypatch.setattr(mps, "LAYERNORM_VERSION", 4)
    x, w, b = rand(5, 64, seed=34, shift=1.0), rand(64, seed=35), rand(64, seed=36)
    whole = mps.from_numpy(np.concatenate([[0.0], x.reshape(-1)]).astype(np.float32))
    dx = DeviceArray(x.shape, np.float32, whole.buffer, 4)
    out = host(mps, mps.layer_norm(dx, mps.from_numpy(w), mps.from_numpy(b), 1e-5)[0])
    close(out, cpu.layer_norm(x, w, b, 1e-5)[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("version", [2, 3, 4])
def test_layer_norm_large_mean(mps, monkeypatch, version):
    # mean 1000, std 0.5: E[x^2] - E[x]^2 without v2's shift would lose the variance
    monkeypatch.setattr(mps, "LAYERNORM_VERSION", version)
    x = rand(3, 257, seed=4, scale=0.5, shift=1000.0)
    w, b = np.ones(257, np.float32), np.zeros(257, np.float32)
    out, _, rstd = mps.layer_norm(mps.from_numpy(x), mps.from_numpy(w), mps.from_numpy(b), 1e-5)
    want_out, _, want_rstd = cpu.layer_norm(x, w, b, 1e-5)
    close(host(mps, rstd), want_rstd, rtol=2e-3)
    close(host(mps, out), want_out, rtol=2e-3, atol=2e-3)


def test_layer_norm_version_from_environment(mps, monkeypatch):
    x, w, b = rand(4, 33, seed=21, shift=5.0), rand(33, seed=22), rand(33, seed=23)
    args = [mps.from_numpy(a) for a in (x, w, b)]
    config.set_choices(layernorm="1")
    with camel.profile() as prof:
        out = host(mps, mps.layer_norm(*args, 1e-5)[0])
    assert [e.name for e in prof.events] == ["layernorm_forward_v1"]
    close(out, cpu.layer_norm(x, w, b, 1e-5)[0], atol=1e-4)
    config.set_choices(layernorm="7")
    with pytest.raises(ValueError, match=r"version '7' \(CAMEL_LAYERNORM.*valid: \[1, 2, 3, 4\]"):
        mps.layer_norm(*args, 1e-5)


@pytest.mark.parametrize("memory", ["1", "2"])
def test_layer_norm_default_picks_registers_or_two_sweeps(mps, monkeypatch, memory):
    # v4 holds rows of D <= 16384, v3 (the default with CAMEL_MEMORY_KERNELS=1) D <= 1024;
    # wider rows take v2
    config.set_choices(memory_kernels=memory)
    picks = {"1": [(1024, "layernorm_forward_v3"), (1025, "layernorm_forward_v2")],
             "2": [(1025, "layernorm_forward_v4"), (16385, "layernorm_forward_v2")]}  # fmt: skip
    for d, kernel in picks[memory]:
        x, w, b = rand(2, d, seed=28), rand(d, seed=29), rand(d, seed=30)
        with camel.profile() as prof:
            out = host(mps, mps.layer_norm(*[mps.from_numpy(a) for a in (x, w, b)], 1e-5)[0])
        assert [e.name for e in prof.events] == [kernel]
        close(out, cpu.layer_norm(x, w, b, 1e-5)[0], rtol=1e-4, atol=1e-4)
    config.set_choices(layernorm="4")
    x = mps.from_numpy(rand(1, 16385))
    with pytest.raises(ValueError, match=r"D <= 16384, got D = 16385 \(shape \(1, 16385\)\)"):
        mps.layer_norm(x, mps.from_numpy(rand(16385)), mps.from_numpy(rand(16385)), 1e-5)
    config.set_choices(layernorm="3")
    x = mps.from_numpy(rand(2, 1025))
    with pytest.raises(ValueError, match=r"D <= 1024, got D = 1025 \(shape \(2, 1025\)\)"):
        mps.layer_norm(x, mps.from_numpy(rand(1025)), mps.from_numpy(rand(1025)), 1e-5)


def test_layer_norm_backward_version_limits(mps, monkeypatch):
    x = mps.from_numpy(rand(2, 2049))
    args = [x, x, mps.from_numpy(rand(2049)), mps.from_numpy(rand(2)), mps.from_numpy(rand(2))]
    config.set_choices(layernorm_backward="3")
    with pytest.raises(ValueError, match=r"version 3 .* D <= 2048, got D = 2049 \(shape"):
        mps.layer_norm_backward(*args)
    config.set_choices(layernorm_backward="4")
    with pytest.raises(ValueError, match=r"unknown version '4' .*valid: 1, 2, 3"):
        mps.layer_norm_backward(*args)


# layer_norm_backward v2 (CAMEL_LAYERNORM_BACKWARD=2: a SIMD group per row, D <= 1024):
# D % 4 == 0 reads float4s, else floats; rows per threadgroup block 8 .. 64 (5000 rows: 10).
LN_BACKWARD_SHAPES = LN_SHAPES + [(3, 1024), (5, 1023), (2, 1025), (5000, 4), (33, 7, 96)]


# layer_norm_backward v3 (the default: P = 1, 2, 4, 8 SIMD groups per row, D <= 2048; the
# float kernel when D % 4 != 0; D = 2049 takes version 1): the shapes above and wider rows.
LN_BACKWARD_V3_SHAPES = LN_BACKWARD_SHAPES + [
    (3, 257),
    (9, 512),
    (4, 1536),
    (3, 2047),
    (2, 2048),
    (2, 2049),
]


def _ln_backward_version(monkeypatch, version):
    """1: CAMEL_MEMORY_KERNELS=1 (the lesson kernels); 2: CAMEL_LAYERNORM_BACKWARD=2; 3: the
    default (v3 where D <= 2048)."""
    config.set_choices(memory_kernels=str(min(version, 2)))
    config.set_choices(layernorm_backward=None)
    if version == 2:
        config.set_choices(layernorm_backward="2")


@pytest.mark.parametrize(
    "version, shape",
    [(1, s) for s in LN_BACKWARD_SHAPES]
    + [(2, s) for s in LN_BACKWARD_SHAPES if s[-1] <= 1024]
    + [(3, s) for s in LN_BACKWARD_V3_SHAPES],
)
def test_layer_norm_backward(mps, monkeypatch, version, shape, poisoned_memory):
    _ln_backward_version(monkeypatch, version)
    d = shape[-1]
    x, g = rand(*shape, seed=5, scale=2.0, shift=-1.0), rand(*shape, seed=6)
    w, b = rand(d, seed=7), rand(d, seed=8)
    _, mean, rstd = cpu.layer_norm(x, w, b, 1e-5)
    args = [mps.from_numpy(a) for a in (g, x, w, mean, rstd)]
    dx, dw, db = (host(mps, a) for a in mps.layer_norm_backward(*args))
    want_dx, want_dw, want_db = cpu.layer_norm_backward(g, x, w, mean, rstd)
    rows = x.size // d
    close(dx, want_dx, rtol=1e-4, atol=1e-4)
    # the column sums add `rows` terms in a different order than NumPy's pairwise sum
    close(dw, want_dw, rtol=1e-4, atol=2e-6 * rows)
    close(db, want_db, rtol=1e-4, atol=2e-6 * rows)


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("shape", [(1,), (17, 33), (130, 5), (3, 768), (2,), (7,), (4, 1026)])
def test_gelu_forward_backward(mps, monkeypatch, version, shape, poisoned_memory):
    # version 2: float4s with a scalar tail (sizes 1, 2, 7, 561, 650: every remainder mod 4)
    config.set_choices(memory_kernels=str(version))
    x = rand(*shape, seed=9, scale=3.0)
    x.reshape(-1)[:1] = -30.0  # far tails: tanh saturates to -1
    x.reshape(-1)[-1:] = 30.0
    g = rand(*shape, seed=10)
    close(host(mps, mps.gelu(mps.from_numpy(x))), cpu.gelu(x))
    dx = mps.gelu_backward(mps.from_numpy(x), mps.from_numpy(g))
    close(host(mps, dx), cpu.gelu_backward(x, g), rtol=1e-4)


@pytest.mark.parametrize("version", [1, 2])
def test_gelu_against_float64_over_its_whole_range(mps, monkeypatch, version):
    # Version 2 computes x * sigmoid(2u) instead of 0.5 x (1 + tanh(u)): the same function;
    # both must be within float32 rounding of the float64 tanh form, tails included.
    config.set_choices(memory_kernels=str(version))
    x = np.linspace(-40, 40, 20001, dtype=np.float32)
    x64 = x.astype(np.float64)
    u = 0.7978845608028654 * (x64 + 0.044715 * x64**3)
    t = np.tanh(u)
    want = 0.5 * x64 * (1 + t)
    want_d = 0.5 * (1 + t) + 0.5 * x64 * (1 - t * t) * 0.7978845608028654 * (
        1 + 3 * 0.044715 * x64**2
    )
    got = host(mps, mps.gelu(mps.from_numpy(x)))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    ones = mps.from_numpy(np.ones_like(x))
    got_d = host(mps, mps.gelu_backward(mps.from_numpy(x), ones))
    np.testing.assert_allclose(got_d, want_d, rtol=1e-5, atol=1e-5)


def test_gelu_unaligned_takes_the_scalar_kernels(mps):
    from camel.metal import DeviceArray

    x = rand(37, seed=28, scale=3.0)
    whole = mps.from_numpy(np.concatenate([[0.0], x]).astype(np.float32))
    dx = DeviceArray(x.shape, np.float32, whole.buffer, 4)
    close(host(mps, mps.gelu(dx)), cpu.gelu(x))
    close(host(mps, mps.gelu_backward(dx, dx)), cpu.gelu_backward(x, x), rtol=1e-4)


@pytest.mark.parametrize("vocab, idx_shape, d", [(65, (1,), 1), (65, (2, 17), 33),
                                                 (1000, (1, 130), 33), (1000, (17,), 768),
                                                 (65, (4, 130), 8)])  # fmt: skip
def test_embedding_forward_backward(mps, vocab, idx_shape, d):
    rng = np.random.default_rng(11)
    idx = rng.integers(0, vocab, size=idx_shape).astype(np.int32)
    idx.reshape(-1)[:3] = idx.reshape(-1)[0]  # a token repeated: the scatter-add must add
    weight = rand(vocab, d, seed=12)
    out = mps.embedding(mps.from_numpy(idx), mps.from_numpy(weight))
    np.testing.assert_array_equal(host(mps, out), cpu.embedding(idx, weight))  # a copy: exact
    g = rand(*idx_shape, d, seed=13)
    dw = host(mps, mps.embedding_backward(mps.from_numpy(g), mps.from_numpy(idx), vocab))
    close(dw, cpu.embedding_backward(g, idx, vocab), rtol=1e-5, atol=1e-5)
    unused = np.setdiff1d(np.arange(vocab), idx)
    assert np.all(dw[unused] == 0.0)


def test_embedding_backward_is_bit_identical_across_runs(mps):
    rng = np.random.default_rng(14)
    idx = rng.integers(0, 5, size=(4, 130)).astype(np.int32)  # ~100 hits per token
    g = rand(4, 130, 33, seed=15, scale=1e3)  # large, mixed-sign terms: order matters
    di, dg = mps.from_numpy(idx), mps.from_numpy(g)
    first = host(mps, mps.embedding_backward(dg, di, 5))
    for _ in range(3):
        again = host(mps, mps.embedding_backward(dg, di, 5))
        assert again.tobytes() == first.tobytes()
    # and it is the sum in position order, the order np.add.at uses
    np.testing.assert_array_equal(first, cpu.embedding_backward(g, idx, 5))


SLICES = [
    ((4, 17), (0, 0), (1, 1), (4, 16)),  # tokens[:, :-1]
    ((4, 17), (0, 1), (1, 1), (4, 16)),  # tokens[:, 1:]
    ((2, 5, 99), (0, 0, 33), (1, 1, 1), (2, 5, 33)),  # qkv[:, :, C:2C]
    ((7,), (6,), (-2,), (4,)),  # x[::-2]
    ((3, 130, 6), (2, 129, 1), (1, -3, 2), (1, 43, 3)),
    ((1,), (0,), (1,), (1,)),
]


@pytest.mark.parametrize("in_shape, starts, steps, counts", SLICES)
def test_slice_and_backward(mps, in_shape, starts, steps, counts):
    x = rand(*in_shape, seed=16)
    out = mps.slice(mps.from_numpy(x), starts, steps, counts)
    np.testing.assert_array_equal(host(mps, out), cpu.slice(x, starts, steps, counts))
    g = rand(*counts, seed=17)
    dx = mps.slice_backward(mps.from_numpy(g), in_shape, starts, steps)
    np.testing.assert_array_equal(host(mps, dx), cpu.slice_backward(g, in_shape, starts, steps))


def test_slice_int32_tokens(mps):
    tokens = np.arange(4 * 17, dtype=np.int32).reshape(4, 17)
    out = mps.slice(mps.from_numpy(tokens), (0, 1), (1, 1), (4, 16))
    got = host(mps, out)
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, tokens[:, 1:])


@pytest.mark.parametrize("shape", [(1, 2, 1, 1), (2, 2, 17, 17), (1, 3, 130, 130)])
def test_causal_softmax_attention_shapes(mps, shape):
    x = rand(*shape, seed=18, scale=2.0)
    y = mps.softmax(mps.from_numpy(x), causal=True)
    close(host(mps, y), cpu.softmax(x, causal=True), rtol=2e-5, atol=1e-6)
    g = rand(*shape, seed=19)
    dx = mps.softmax_backward(y, mps.from_numpy(g))
    want = cpu.softmax_backward(cpu.softmax(x, causal=True), g)
    close(host(mps, dx), want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "shape, dims", [((2, 17, 4, 8), (0, 2, 1, 3)), ((1, 3, 130, 33), (0, 2, 1, 3))]
)
def test_head_permutes(mps, shape, dims):
    # (B, T, H, D) <-> (B, H, T, D): permute_uint (ops_elementwise.metal)
    x = rand(*shape, seed=20)
    got = host(mps, mps.permute(mps.from_numpy(x), dims))
    np.testing.assert_array_equal(got, cpu.permute(x, dims))


@pytest.mark.parametrize("rows, kernel, version", [(17, "layernorm_backward_params", 1),
                                                   (300, "layernorm_backward_params_blocked", 1),
                                                   (3000, "layernorm_backward_v2", 2),
                                                   (3000, "layernorm_backward_v3", 3)])  # fmt: skip
def test_layer_norm_param_grads_are_deterministic(mps, monkeypatch, rows, kernel, version):
    _ln_backward_version(monkeypatch, version)
    x, g = rand(rows, 40, seed=24, scale=3.0), rand(rows, 40, seed=25, scale=100.0)
    w, b = rand(40, seed=26), rand(40, seed=27)
    _, mean, rstd = cpu.layer_norm(x, w, b, 1e-5)
    args = [mps.from_numpy(a) for a in (g, x, w, mean, rstd)]
    with camel.profile() as prof:
        first = [host(mps, a) for a in mps.layer_norm_backward(*args)[1:]]
    assert kernel in {e.name for e in prof.events}
    for _ in range(2):
        again = [host(mps, a) for a in mps.layer_norm_backward(*args)[1:]]
        assert all(a.tobytes() == b.tobytes() for a, b in zip(first, again, strict=True))


# A subprocess: without the kernel's guard a bad index reads gigabytes away and the
# simulator crashes, which must fail this test, not end the whole run.
BAD_INDEX_SCRIPT = r"""
import numpy as np
from camel import backend_mps, metal

v, d = 5, 3
weight = np.arange(v * d, dtype=np.float32).reshape(v, d) + 1.0
slack = 256  # the rows before and after weight are NaN: a stray read shows
buf = metal.Buffer(weight.nbytes + 2 * slack, host_write=True)
metal.DeviceArray((buf.nbytes // 4,), np.float32, buf).numpy()[...] = np.nan
w = metal.DeviceArray(weight.shape, np.float32, buf, offset=slack)
w.numpy()[...] = weight
idx = np.array([0, -1, v, v + 1, -v, 2**31 - 1, v - 1], np.int32)
good = (idx >= 0) & (idx < v)
out = backend_mps.embedding(metal.DeviceArray.from_numpy(idx), w).numpy()
want = np.where(good[:, None], weight[np.clip(idx, 0, v - 1)], 0.0)
g = np.arange(idx.size * d, dtype=np.float32).reshape(idx.size, d)
dw = backend_mps.embedding_backward(
    metal.DeviceArray.from_numpy(g), metal.DeviceArray.from_numpy(idx), v).numpy()
want_dw = np.zeros((v, d), np.float32)
np.add.at(want_dw, idx[good], g[good])
print("forward", np.array_equal(out, want), "backward", np.array_equal(dw, want_dw))
"""


def test_embedding_bad_index_reads_a_zero_row():
    """The kernels' own guarantee (camel/functional.py rejects bad indices before they
    run): an index outside [0, V) gives a zero row forward and is left out backward, with
    no read outside weight (its neighbours in the buffer are NaN)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("camel.backend_mps")
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=str(root))
    r = subprocess.run([sys.executable, "-c", BAD_INDEX_SCRIPT], env=env, capture_output=True,
                       text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, f"the embedding kernels crashed (exit {r.returncode}): {r.stderr}"
    assert r.stdout.split() == ["forward", "True", "backward", "True"], (r.stdout, r.stderr)
