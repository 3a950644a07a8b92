"""Reader for IDX files (the MNIST / Fashion-MNIST container format).

An IDX file is a big-endian array dump: two zero bytes, a dtype code, the
number of dimensions, one uint32 per dimension, then the values. Files are
usually gzip-compressed. The reader checks every part of that layout, so a
truncated download or a corrupted file fails loudly here instead of turning
into silently wrong training data later.
"""
import gzip
import os
import struct
import zlib
from typing import Tuple

import numpy as np

# Where the Debian package `dataset-fashion-mnist` installs the files.
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_INSTALL = "apt-get install dataset-fashion-mnist"
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FASHION_MNIST_CLASSES = (
    "t-shirt/top", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle boot",
)

# IDX dtype codes -> big-endian numpy dtypes.
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"


def _read_bytes(path: str) -> bytes:
    """Returns the (decompressed) content of `path`; ValueError if corrupt."""
    with open(path, "rb") as f:
        raw = f.read()
    if not raw.startswith(_GZIP_MAGIC):
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
        raise ValueError(f"IDX file {path}: corrupt or truncated gzip stream "
                         f"({e})") from e


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Reads an IDX file (gzip-compressed or raw) into a numpy array.

    Raises FileNotFoundError if `path` does not exist and ValueError naming the
    file if its magic number, dtype code, dimensions or size are wrong.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"IDX file not found: {path}")
    data = _read_bytes(path)
    if len(data) < 4:
        raise ValueError(f"IDX file {path}: {len(data)} bytes is shorter than "
                         "the 4-byte magic number")
    zero0, zero1, code, ndim = struct.unpack(">BBBB", data[:4])
    if zero0 != 0 or zero1 != 0:
        raise ValueError(f"IDX file {path}: bad magic number "
                         f"0x{data[:4].hex()} (must start with two zero bytes)")
    if code not in _IDX_DTYPES:
        raise ValueError(f"IDX file {path}: unknown dtype code 0x{code:02x}")
    if ndim == 0:
        raise ValueError(f"IDX file {path}: zero dimensions")
    header_size = 4 + 4 * ndim
    if len(data) < header_size:
        raise ValueError(f"IDX file {path}: truncated header ({len(data)} of "
                         f"{header_size} bytes)")
    shape = struct.unpack(f">{ndim}I", data[4:header_size])
    dtype = _IDX_DTYPES[code]
    count = int(np.prod(shape, dtype=np.int64))
    expected = header_size + count * dtype.itemsize
    if len(data) != expected:
        kind = "truncated" if len(data) < expected else "has trailing bytes"
        raise ValueError(f"IDX file {path}: {kind}: {len(data)} bytes, "
                         f"expected {expected} for shape {shape} of {dtype}")
    array = np.frombuffer(data, dtype=dtype, offset=header_size)
    return array.reshape(shape).astype(dtype.newbyteorder("="))


def fashion_mnist_paths(split: str,
                        idx_dir: str | os.PathLike = FASHION_MNIST_DIR
                        ) -> Tuple[str, str]:
    """(images path, labels path) of a Fashion-MNIST split ('train'/'test')."""
    if split not in FASHION_MNIST_FILES:
        raise ValueError(f"Fashion-MNIST split must be one of "
                         f"{sorted(FASHION_MNIST_FILES)}, got {split!r}")
    return tuple(os.path.join(idx_dir, name)
                 for name in FASHION_MNIST_FILES[split])


def fashion_mnist_available(
        idx_dir: str | os.PathLike = FASHION_MNIST_DIR) -> bool:
    """True when all four Fashion-MNIST IDX files are in `idx_dir`."""
    return all(os.path.isfile(p) for split in FASHION_MNIST_FILES
               for p in fashion_mnist_paths(split, idx_dir))


def load_fashion_mnist_idx(split: str,
                           idx_dir: str | os.PathLike = FASHION_MNIST_DIR
                           ) -> Tuple[np.ndarray, np.ndarray]:
    """Loads a Fashion-MNIST split from its IDX files.

    Returns (images uint8 [N, 28, 28, 1], labels int32 [N]). A missing file
    raises FileNotFoundError carrying the command that installs the data.
    """
    images_path, labels_path = fashion_mnist_paths(split, idx_dir)
    for path in (images_path, labels_path):
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"Fashion-MNIST file not found: {path}. Install the offline "
                f"copy with `{FASHION_MNIST_INSTALL}` (after apt-get update), "
                "or pass idx_dir pointing at the IDX files.")
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(f"IDX file {images_path}: expected uint8 images "
                         f"[N, H, W], got {images.dtype} {images.shape}")
    if labels.ndim != 1:
        raise ValueError(f"IDX file {labels_path}: expected labels [N], got "
                         f"shape {labels.shape}")
    if len(images) != len(labels):
        raise ValueError(f"Fashion-MNIST {split}: {len(images)} images in "
                         f"{images_path} but {len(labels)} labels in "
                         f"{labels_path}")
    if labels.size and (labels.min() < 0 or labels.max() >= 10):
        raise ValueError(f"IDX file {labels_path}: labels outside [0, 10)")
    return images[..., None], labels.astype(np.int32)
