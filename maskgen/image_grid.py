"""Image grids and atomic PNG/NPZ writing (a killed run never leaves a half-written file)."""
from typing import Callable, Optional

import numpy as np
from PIL import Image

from maskgen import paths


def make_grid(images: np.ndarray, rows: int, pad: int = 2, pad_value: int = 255) -> np.ndarray:
    """uint8 images [N, H, W, C] -> one uint8 image with `rows` rows, filled row by row."""
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.dtype != np.uint8:
        raise ValueError(f"expected uint8 images [N, H, W, C], got {images.dtype} {images.shape}")
    n, h, w, c = images.shape
    if rows < 1 or n == 0:
        raise ValueError(f"need rows >= 1 and at least one image (rows={rows}, images={n})")
    cols = -(-n // rows)
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), pad_value, np.uint8)
    for i in range(n):
        r, k = divmod(i, cols)
        y, x = pad + r * (h + pad), pad + k * (w + pad)
        grid[y:y + h, x:x + w] = images[i]
    return grid


def float_grid(images: np.ndarray, cols: Optional[int] = None) -> np.ndarray:
    """[N, H, W, C] floats in [0, 1] -> one uint8 [rows*H, cols*W, C] mosaic (1-px gaps)."""
    images = np.clip(np.asarray(images, np.float32), 0.0, 1.0)
    if images.ndim != 4:
        raise ValueError(f"float_grid expects [N, H, W, C], got shape {images.shape}")
    n, h, w, c = images.shape
    cols = cols or int(np.ceil(np.sqrt(n)))
    rows = -(-n // cols)
    grid = np.ones((rows * (h + 1) - 1, cols * (w + 1) - 1, c), np.float32)
    for i in range(n):
        r, q = divmod(i, cols)
        grid[r * (h + 1): r * (h + 1) + h, q * (w + 1): q * (w + 1) + w] = images[i]
    return np.round(grid * 255).astype(np.uint8)


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """Calls write(tmp) on a local temporary file, then publishes it at `path` (local or gs://).

    Locally a rename onto `path`; on GCS a single-object upload (see `paths.atomic_write`).
    """
    paths.atomic_write(path, write)


def save_png(image: np.ndarray, path: str, scale: int = 1) -> None:
    """Writes a uint8 [H, W, C] (C = 1 or 3) image, optionally enlarged by pixel repetition."""
    image = np.asarray(image)
    if scale > 1:
        image = image.repeat(scale, 0).repeat(scale, 1)
    pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    atomic_write(path, lambda tmp: pil.save(tmp, format="PNG"))


def save_npz(path: str, **arrays: np.ndarray) -> None:
    """Writes arrays to an .npz atomically."""
    atomic_write(path, lambda tmp: np.savez(tmp, **arrays))
