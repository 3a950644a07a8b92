"""Console progress, TensorBoard event files and PNG sample grids.

Only process 0 writes (files and the progress bar); the others stay quiet so
a pod's logs are readable.
"""
import logging
import os
from typing import Dict, Optional

import jax
import numpy as np
import PIL.Image
import tqdm

log = logging.getLogger(__name__)


def image_grid(images: np.ndarray, cols: Optional[int] = None) -> np.ndarray:
    """[N, H, W, C] floats in [0, 1] -> one uint8 [rows*H, cols*W, C] mosaic (1-px gaps)."""
    images = np.clip(np.asarray(images, np.float32), 0.0, 1.0)
    if images.ndim != 4:
        raise ValueError(f"image_grid expects [N, H, W, C], got shape {images.shape}")
    n, h, w, c = images.shape
    cols = cols or int(np.ceil(np.sqrt(n)))
    rows = -(-n // cols)
    grid = np.ones((rows * (h + 1) - 1, cols * (w + 1) - 1, c), np.float32)
    for i in range(n):
        r, q = divmod(i, cols)
        grid[r * (h + 1): r * (h + 1) + h, q * (w + 1): q * (w + 1) + w] = images[i]
    return np.round(grid * 255).astype(np.uint8)


def save_png(path: str, grid_uint8: np.ndarray) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    image = grid_uint8[..., 0] if grid_uint8.shape[-1] == 1 else grid_uint8
    PIL.Image.fromarray(image).save(path)
    return path


class MetricWriter:
    """TensorBoard scalars and images in `logdir` (process 0 only; a no-op elsewhere)."""

    def __init__(self, logdir: str):
        self.enabled = jax.process_index() == 0
        self._writer = None
        if self.enabled:
            from tensorboardX import SummaryWriter
            os.makedirs(logdir, exist_ok=True)
            self._writer = SummaryWriter(logdir)

    def scalars(self, step: int, values: Dict[str, float]):
        if self._writer is None:
            return
        for name, value in values.items():
            self._writer.add_scalar(name, float(value), int(step))

    def image(self, step: int, name: str, grid_uint8: np.ndarray):
        if self._writer is not None:
            self._writer.add_image(name, grid_uint8, int(step), dataformats="HWC")

    def flush(self):
        if self._writer is not None:
            self._writer.flush()

    def close(self):
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class Progress:
    """A tqdm bar over training steps with the latest metrics as its postfix."""

    def __init__(self, stage: str, start: int, total: int):
        self.bar = tqdm.tqdm(total=total, initial=start, desc=stage, unit="step", dynamic_ncols=True,
                             disable=jax.process_index() != 0, mininterval=1.0)

    def update(self, steps: int, metrics: Optional[Dict[str, float]] = None):
        if metrics:
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items()}, refresh=False)
        self.bar.update(steps)

    def close(self):
        self.bar.close()


def format_metrics(metrics: Dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items()))
