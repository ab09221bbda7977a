"""The MNIST digits (LeCun et al.) from their IDX files in a folder the user passes (gzipped or plain): the
'train' (60,000) and 't10k' (10,000) subsets, and the train/test split of the paper's MNIST experiments
(section 4.2), which ``tvae_em.simulate`` poses into MNIST(N) and MNIST(U).
"""

import gzip
from pathlib import Path

import numpy as np

from tvae_em.errors import InputError, UsageError

MNIST_DIGIT_PX = 28
MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "t10k": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_UBYTE = 0x08


def load_mnist(directory, subset="t10k"):
    """Read the standard MNIST IDX files (gzipped or plain) of ``subset`` 'train' or 't10k' from a folder.

    Returns (images uint8 (n, 28, 28), labels int64 (n,)). Raises InputError naming the file when it is
    missing, truncated or not an MNIST IDX file.
    """
    if subset not in MNIST_FILES:
        raise UsageError(f"unknown MNIST subset {subset!r}; expected 'train' or 't10k'")
    image_name, label_name = MNIST_FILES[subset]
    images = _read_idx(_find_idx(directory, image_name), ndim=3)
    labels = _read_idx(_find_idx(directory, label_name), ndim=1).astype(np.int64)
    if images.shape[1:] != (MNIST_DIGIT_PX, MNIST_DIGIT_PX) or len(images) != len(labels):
        raise InputError(directory, f"MNIST {subset} images {images.shape} but labels {labels.shape}")
    return images, labels


def has_mnist(directory, subset):
    """True when ``directory`` holds the image and label files of MNIST ``subset`` (gzipped or plain)."""
    return all(_idx_candidates(directory, name) for name in MNIST_FILES[subset])


def _idx_candidates(directory, name):
    return [p for p in (Path(directory) / name, Path(directory) / f"{name}.gz") if p.is_file()]


def _find_idx(directory, name):
    found = _idx_candidates(directory, name)
    if not found:
        raise InputError(directory, f"no MNIST file {name} or {name}.gz")
    return found[0]


def _read_idx(path, ndim):
    """Parse an IDX file: 4-byte magic (0, 0, dtype, ndim), ndim big-endian uint32 sizes, then the data."""
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as err:
        raise InputError(path, f"cannot read MNIST IDX file ({err})") from None
    header_bytes = 4 + 4 * ndim
    if len(raw) < header_bytes or raw[:4] != bytes([0, 0, _IDX_UBYTE, ndim]):
        raise InputError(path, f"not an MNIST IDX file of {ndim}-D unsigned bytes")
    shape = tuple(int(s) for s in np.frombuffer(raw[4:header_bytes], dtype=">u4"))
    if len(raw) != header_bytes + int(np.prod(shape)):
        raise InputError(path, f"truncated or oversized: header says {shape}, file has {len(raw)} bytes")
    return np.frombuffer(raw, dtype=np.uint8, offset=header_bytes).reshape(shape)


def mnist_split(directory, split, n_holdout=1000):
    """Digits and labels of the 'train' or 'test' split.

    With the 60,000-digit training file present this is the paper's split (train = train-*, test =
    t10k-*). With only the 10,000 t10k digits, train is the first 10,000 - ``n_holdout`` of them and test
    the last ``n_holdout``.
    """
    if split not in ("train", "test"):
        raise UsageError(f"unknown split {split!r}; expected 'train' or 'test'")
    if has_mnist(directory, "train"):
        return load_mnist(directory, "train" if split == "train" else "t10k")
    images, labels = load_mnist(directory, "t10k")
    if not 0 < n_holdout < len(images):
        raise UsageError(f"held-out count {n_holdout} must lie between 1 and {len(images) - 1}")
    cut = len(images) - n_holdout
    return (images[:cut], labels[:cut]) if split == "train" else (images[cut:], labels[cut:])
