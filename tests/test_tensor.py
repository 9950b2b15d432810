"""camel.Tensor: creation, dtypes, devices, host access, shape ops, operators."""

import numpy as np
import pytest

import camel


def test_creation_dtypes(device):
    assert camel.tensor(1.5, device=device).dtype == np.float32
    assert camel.tensor(1.5, device=device).shape == ()
    assert camel.tensor([1, 2, 3], device=device).dtype == np.int32
    assert camel.tensor(np.arange(4, dtype=np.int64), device=device).dtype == np.int32
    assert camel.tensor(np.ones(3, dtype=np.float64), device=device).dtype == np.float32
    assert camel.tensor([[1.0, 2.0]], device=device).shape == (1, 2)
    assert camel.tensor([True, False], device=device).tolist() == [1.0, 0.0]
    t = camel.tensor([1.0], requires_grad=True, device=device)
    assert t.requires_grad and t.grad is None and t.device == device


def test_int64_out_of_int32_range_raises():
    with pytest.raises(ValueError, match=r"integer value 4294967296 does not fit in int32"):
        camel.tensor(np.array([1, 2**32]))


def test_unsupported_data_raises():
    with pytest.raises(TypeError, match="cannot make a tensor from dtype"):
        camel.tensor(["a", "b"])
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        camel.tensor([1.0], device="tpu")


def test_factories(device):
    assert camel.zeros(2, 3, device=device).tolist() == [[0.0] * 3] * 2
    assert camel.ones((2,), device=device).tolist() == [1.0, 1.0]
    assert camel.zeros(3, dtype="int32", device=device).dtype == np.int32
    assert camel.arange(5, device=device).tolist() == [0, 1, 2, 3, 4]
    assert camel.arange(2, 8, 3).tolist() == [2, 5]
    assert camel.arange(5).dtype == np.int32
    r = camel.randn(257, 3, device=device)
    assert r.shape == (257, 3) and r.dtype == np.float32 and abs(r.numpy().mean()) < 0.2
    assert camel.randn(2, requires_grad=True).requires_grad


def test_manual_seed_makes_randn_repeatable():
    camel.manual_seed(7)
    a = camel.randn(5).numpy().copy()
    camel.manual_seed(7)
    np.testing.assert_array_equal(a, camel.randn(5).numpy())
    assert not np.array_equal(a, camel.randn(5).numpy())


def test_numpy_shares_memory_on_cpu_and_tensor_copies():
    arr = np.array([1.0, 2.0], dtype=np.float32)
    t = camel.tensor(arr)
    arr[0] = 5.0
    assert t.tolist() == [1.0, 2.0]  # camel.tensor copies its input
    t.numpy()[1] = 9.0
    assert t.tolist() == [1.0, 9.0]  # numpy() is the storage itself on "cpu"


def test_item_and_tolist(device):
    assert camel.tensor([[2.5]], device=device).item() == 2.5
    assert isinstance(camel.tensor(3, device=device).item(), int)
    with pytest.raises(ValueError, match=r"\[item\] .* got shape \(2,\)"):
        camel.tensor([1.0, 2.0], device=device).item()


def test_to_roundtrip_and_detach(devices):
    t = camel.tensor([[1.0, 2.0], [3.0, 4.0]])
    for d in devices:
        u = t.to(d)
        assert u.device == d and u.to("cpu").tolist() == t.tolist()
    assert t.to("cpu") is t
    d = camel.tensor([1.0], requires_grad=True) * 2.0
    assert not d.detach().requires_grad and d.detach().tolist() == [2.0]


def test_repr_shows_values_device_and_grad(device):
    t = camel.tensor([1.0, 2.0], requires_grad=True, device=device)
    r = repr(t)
    assert "1." in r and "2." in r and "requires_grad=True" in r
    if device != "cpu":
        assert f"device='{device}'" in r
    assert "grad_fn=<mul>" in repr(t * 2.0)
    assert "dtype=int32" in repr(camel.arange(3, device=device))


def test_reshape(device):
    t = camel.arange(12, device=device)
    assert t.reshape(3, 4).shape == (3, 4)
    assert t.reshape((2, -1)).shape == (2, 6)
    assert t.reshape(-1, 2, 3).tolist() == np.arange(12).reshape(-1, 2, 3).tolist()
    with pytest.raises(ValueError, match=r"\[reshape\] cannot reshape \(12,\) \(12 elements\)"):
        t.reshape(5, -1)
    with pytest.raises(ValueError, match="cannot reshape"):
        t.reshape(-1, -1)


def test_transpose_and_T(device):
    a = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    t = camel.tensor(a, device=device)
    np.testing.assert_array_equal(t.transpose(0, 2).numpy(), a.transpose(2, 1, 0))
    np.testing.assert_array_equal(t.transpose(-1, -2).numpy(), a.swapaxes(-1, -2))
    np.testing.assert_array_equal(t[0].T.numpy(), a[0].T)
    with pytest.raises(ValueError, match=r"\[T\] expects a 2-D tensor, got shape \(2, 3, 4\)"):
        _ = t.T
    with pytest.raises(ValueError, match=r"\[transpose\] axis 3 does not exist"):
        t.transpose(0, 3)


def test_getitem_is_a_copy_and_matches_numpy(device):
    a = np.arange(7 * 33, dtype=np.float32).reshape(7, 33)
    t = camel.tensor(a, device=device)
    for key in [0, -1, (2, 5), slice(1, None, 2), (Ellipsis, 3), (slice(None, None, -3), 1)]:
        np.testing.assert_array_equal(t[key].numpy(), a[key])
    if device == "cpu":
        row = t[1]
        row.numpy()[0] = -1.0
        assert t.numpy()[1, 0] == a[1, 0]  # materialised, not a view


def test_getitem_errors():
    t = camel.zeros(2, 3)
    with pytest.raises(IndexError, match=r"index 5 is out of range for axis 1 of size 3"):
        t[0, 5]
    with pytest.raises(IndexError, match="too many indices"):
        t[0, 0, 0]
    with pytest.raises(TypeError, match="basic indexing only.*F.embedding"):
        t[camel.tensor([0, 1])]
    with pytest.raises(TypeError, match="basic indexing only"):
        t[None]


def test_operators(device):
    a = camel.tensor([1.0, 2.0], device=device)
    b = camel.tensor([3.0, 5.0], device=device)
    assert (a + b).tolist() == [4.0, 7.0]
    assert (a - b).tolist() == [-2.0, -3.0]
    assert (a * b).tolist() == [3.0, 10.0]
    assert (-a).tolist() == [-1.0, -2.0]
    assert (a / 2).tolist() == [0.5, 1.0]
    assert (1 - a).tolist() == [0.0, -1.0]
    assert (2 * a + 1).tolist() == [3.0, 5.0]
    m = camel.tensor([[1.0, 2.0]], device=device) @ camel.tensor([[3.0], [4.0]], device=device)
    assert m.tolist() == [[11.0]]


def test_division_by_a_tensor_is_refused():
    a = camel.tensor([1.0])
    with pytest.raises(TypeError, match=r"\[div\] camel divides only by a Python number"):
        a / a
    with pytest.raises(TypeError, match=r"\[div\]"):
        1.0 / a


def test_reductions_methods(device):
    a = np.array([[1.0, 5.0, 2.0], [4.0, 0.0, 3.0]], dtype=np.float32)
    t = camel.tensor(a, device=device)
    assert t.sum().item() == 15.0
    assert t.sum(axis=0).tolist() == [5.0, 5.0, 5.0]
    assert t.mean(axis=1, keepdims=True).shape == (2, 1)
    assert t.max(axis=-1).values.tolist() == [5.0, 4.0]
    assert t.max(axis=-1).indices.tolist() == [1, 0]
    assert t.max().item() == 5.0
    np.testing.assert_allclose(t.softmax().numpy().sum(-1), [1.0, 1.0], rtol=1e-6)


def test_cuda_device_is_an_alias_of_mps_on_the_cuda_shim_only():
    from camel import metal

    try:
        shim = metal.shim()
    except metal.MetalError:
        shim = None
    if shim == "cuda":
        t = camel.tensor([1.0, 2.0], device="cuda")
        assert t.device == "mps" and t.to("cuda") is t
        assert camel.zeros(3).to("cuda").device == "mps"
    else:
        with pytest.raises(ValueError, match=r"'cuda' is an alias of 'mps' on the CUDA shim.*"
                           r"write device='mps'"):  # fmt: skip
            camel.tensor([1.0], device="cuda")
        with pytest.raises(ValueError, match="write device='mps'"):
            camel.zeros(2).to("cuda")
