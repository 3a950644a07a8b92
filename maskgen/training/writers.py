"""Console progress and TensorBoard event files of a training run.

Only process 0 writes (files and the progress bar); the others stay quiet so
a pod's logs are readable.
"""
import logging
from typing import Dict, Optional

import jax
import numpy as np
import tqdm

from maskgen import paths

log = logging.getLogger(__name__)


class MetricWriter:
    """TensorBoard scalars and images in `logdir` (process 0 only; a no-op elsewhere).

    A `gs://` logdir uses tensorboardX's own GCS writer (google-cloud-storage):
    it keeps the event file in memory and uploads it whole, as one object, at
    every flush (atomic, like every maskgen write on GCS), so TensorBoard
    pointed at the bucket sees the events up to the last flush.
    """

    def __init__(self, logdir: str) -> None:
        self.enabled = jax.process_index() == 0
        self._writer = None
        if self.enabled:
            from tensorboardX import SummaryWriter
            paths.makedirs(logdir)
            self._writer = SummaryWriter(logdir)

    def scalars(self, step: int, values: Dict[str, float]) -> None:
        if self._writer is None:
            return
        for name, value in values.items():
            self._writer.add_scalar(name, float(value), int(step))

    def image(self, step: int, name: str, grid_uint8: np.ndarray) -> None:
        if self._writer is not None:
            self._writer.add_image(name, grid_uint8, int(step), dataformats="HWC")

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class Progress:
    """A tqdm bar over training steps with the latest metrics as its postfix."""

    def __init__(self, stage: str, start: int, total: int) -> None:
        self.bar = tqdm.tqdm(total=total, initial=start, desc=stage, unit="step", dynamic_ncols=True,
                             disable=jax.process_index() != 0, mininterval=1.0)

    def update(self, steps: int, metrics: Optional[Dict[str, float]] = None) -> None:
        if metrics:
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items()}, refresh=False)
        self.bar.update(steps)

    def close(self) -> None:
        self.bar.close()


def format_metrics(metrics: Dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items()))
