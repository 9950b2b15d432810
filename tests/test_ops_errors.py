"""Bad input: every op refuses it with a message naming the op and the offending
shapes, dtypes, devices or values. Never a silent wrong result."""

import numpy as np
import pytest

import camel
import camel.functional as F
from camel import devices


def f32(*shape):
    return camel.tensor(np.ones(shape, np.float32))


def i32(*values):
    return camel.tensor(np.array(values, np.int32))


CASES = [
    # broadcasting beyond the trailing-suffix rule
    (
        lambda: f32(2, 3) + f32(2),
        ValueError,
        r"\[add\] cannot broadcast shapes \(2, 3\) and \(2,\): camel broadcasts only a trailing",
    ),
    (lambda: f32(2, 3) * f32(3, 2), ValueError, r"\[mul\] cannot broadcast shapes \(2, 3\)"),
    (lambda: f32(4, 3) + f32(1, 3), ValueError, r"\[add\] cannot broadcast"),
    (lambda: f32(2) + np.ones(2), TypeError, r"\[add\] b must be a camel Tensor, got ndarray"),
    (lambda: f32(2) + i32(1, 2), TypeError, r"\[add\] b must be float32, got int32"),
    # matmul
    (
        lambda: f32(3, 4) @ f32(5, 6),
        ValueError,
        r"\[matmul\] shapes \(3, 4\) and \(5, 6\) do not align: 4 != 5",
    ),
    (
        lambda: f32(2, 3, 4) @ f32(3, 4, 5),
        ValueError,
        r"\[matmul\] batch dims \(2,\) and \(3,\) differ",
    ),
    (lambda: f32(2, 4) @ f32(2, 4, 5), ValueError, r"\[matmul\] batch dims \(\) and \(2,\)"),
    (lambda: f32(4) @ f32(4, 5), ValueError, r"\[matmul\] expects tensors with at least 2 dims"),
    (
        lambda: camel.zeros(2, 3, dtype="int32") @ f32(3, 4),
        TypeError,
        r"\[matmul\] a must be float32, got int32 \(shape \(2, 3\)\)",
    ),
    # reductions over an axis that does not exist
    (lambda: f32(2, 3).sum(axis=2), ValueError, r"\[sum\] axis 2 does not exist .* \(2, 3\)"),
    (lambda: f32(2, 3).max(axis=-3), ValueError, r"\[max\] axis -3 does not exist"),
    (lambda: f32(2, 3).mean(axis=(0, 5)), ValueError, r"\[mean\] axis 5 does not exist"),
    (lambda: f32(2, 3).sum(axis=(1, -1)), ValueError, r"\[sum\] repeated axis"),
    (lambda: f32(2, 3).softmax(axis=2), ValueError, r"\[softmax\] axis 2 does not exist"),
    (lambda: f32(2, 3).sum(axis=1.0), TypeError, r"\[sum\] axis must be an int"),
    # cross_entropy
    (
        lambda: F.cross_entropy(f32(3, 10), i32(1, 10, 2)),
        IndexError,
        r"\[cross_entropy\] target \(C = 10 classes\) 10 at flat position 1 is out of range",
    ),
    (
        lambda: F.cross_entropy(f32(2, 10), i32(-1, 0)),
        IndexError,
        r"\[cross_entropy\] target .* -1 .* \(valid: 0..9\)",
    ),
    (
        lambda: F.cross_entropy(f32(3, 10), f32(3)),
        TypeError,
        r"\[cross_entropy\] targets must be int32 indices, got float32",
    ),
    (
        lambda: F.cross_entropy(f32(3, 10), i32(1, 2)),
        ValueError,
        r"\[cross_entropy\] expects logits \(N, C\) and targets \(N,\), got shapes \(3, 10\)",
    ),
    (lambda: F.cross_entropy(f32(2, 3, 4), i32(1, 2)), ValueError, r"logits \(N, C\)"),
    # embedding
    (
        lambda: F.embedding(f32(3), f32(5, 2)),
        TypeError,
        r"\[embedding\] indices must be int32 indices, got float32",
    ),
    (
        lambda: F.embedding(i32(0, 5), f32(5, 2)),
        IndexError,
        r"\[embedding\] index \(V = 5 rows\) 5 at flat position 1 is out of range",
    ),
    (lambda: F.embedding(i32(0), f32(5)), ValueError, r"\[embedding\] weight must be \(V, D\)"),
    # layer_norm
    (
        lambda: F.layer_norm(f32(2, 4), f32(3), f32(3)),
        ValueError,
        r"\[layer_norm\] expects x \(..., D\) with weight \(D,\) and bias \(D,\), got shapes "
        r"\(2, 4\), \(3,\) and \(3,\)",
    ),
    (lambda: F.layer_norm(f32(2, 4), f32(4), f32(4), eps=0), ValueError, r"eps must be positive"),
    # attention
    (
        lambda: F.scaled_dot_product_attention(f32(1, 2, 3, 4), f32(1, 2, 3, 5), f32(1, 2, 3, 4)),
        ValueError,
        r"\[scaled_dot_product_attention\] expects q \(B, H, T, D\)",
    ),
    # permute / reshape
    (lambda: f32(2, 3).permute(0, 0), ValueError, r"\[permute\] \(0, 0\) is not a permutation"),
]


@pytest.mark.parametrize("i", range(len(CASES)))
def test_bad_input_raises_a_teaching_error(i):
    fn, exc, pattern = CASES[i]
    with pytest.raises(exc, match=pattern):
        fn()


def test_mixed_devices_are_refused(devices):
    if "mps" not in devices:
        pytest.skip("needs a second device (camel.backend_mps and a shim)")
    a = camel.ones(2)
    b = camel.ones(2, device="mps")
    with pytest.raises(RuntimeError, match=r"\[add\] tensors on different devices: cpu and mps"):
        a + b
    with pytest.raises(RuntimeError, match=r"\[matmul\] tensors on different devices"):
        camel.ones(2, 2) @ camel.ones(2, 2, device="mps")


def test_mixed_devices_message_without_mps():
    # The check itself does not need a GPU: fake a second device on one tensor.
    a, b = camel.ones(2), camel.ones(2)
    b.device = "mps"
    with pytest.raises(RuntimeError, match=r"\[add\] tensors on different devices: cpu and mps"):
        a + b
    with pytest.raises(RuntimeError, match=r"\[embedding\] tensors on different devices"):
        w = f32(2, 2)
        w.device = "mps"
        F.embedding(camel.tensor([0]), w)


def test_unavailable_device_is_a_clear_error(monkeypatch):
    def broken(name):
        raise ImportError("no module named camel.backend_mps")

    monkeypatch.setattr(devices, "_backends", {})  # forget a backend loaded by earlier tests
    monkeypatch.setattr(devices.importlib, "import_module", broken)
    with pytest.raises(RuntimeError, match=r"device 'mps' is not available"):
        camel.ones(2).to("mps")
