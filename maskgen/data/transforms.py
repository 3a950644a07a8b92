"""grain transforms: tfds record -> augmented example -> float batch.

Per-example transforms keep uint8 (cheap to move between grain workers); the
conversion to float32 in [0, 1] happens once per batch. Random transforms
draw from the numpy Generator grain derives from (sampler seed, global record
index), so augmentation is reproducible for a seed and survives checkpoint
restore without extra state.
"""
import dataclasses
from typing import Any, Dict, Optional, Tuple

import grain
import numpy as np

from maskgen.data import images


@dataclasses.dataclass(frozen=True)
class ParseExample(grain.transforms.Map):
    """tfds record dict -> {"image": uint8 [H, W, C], "label": int32 []}.

    Optionally resizes (scale to cover + centre crop) and converts channels,
    so sources with varied sizes or colour modes batch to one shape.
    """

    image_size: Optional[Tuple[int, int]] = None
    channels: Optional[int] = None
    image_key: str = "image"
    label_key: str = "label"

    def map(self, element: Dict[str, Any]) -> Dict[str, np.ndarray]:
        """Checks, resizes and converts one record (host side, in a worker)."""
        if self.image_key not in element or self.label_key not in element:
            raise ValueError(f"record needs keys {self.image_key!r} and "
                             f"{self.label_key!r}, has {sorted(element)}")
        image = np.asarray(element[self.image_key])
        if image.ndim == 2:
            image = image[..., None]
        if image.dtype != np.uint8:
            raise ValueError(f"expected uint8 images, got {image.dtype}")
        if self.image_size is not None:
            image = images.resize_array(image, self.image_size)
        if self.channels is not None:
            image = images.convert_channels(image, self.channels)
        return {"image": image,
                "label": np.int32(element[self.label_key])}


@dataclasses.dataclass(frozen=True)
class RandomCropWithPadding(grain.transforms.RandomMap):
    """Zero-pads by `padding` pixels per side, then crops the original size.

    Equivalent to a random translation of up to `padding` pixels; the classic
    small-image augmentation (CIFAR, Fashion-MNIST).
    """

    padding: int = 4

    def random_map(self, element: Dict[str, np.ndarray],
                   rng: np.random.Generator) -> Dict[str, np.ndarray]:
        """Crops one padded example at an offset drawn from grain's `rng`."""
        image = element["image"]
        height, width = image.shape[:2]
        pad = self.padding
        padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)))
        top, left = rng.integers(0, 2 * pad + 1, size=2)
        cropped = padded[top:top + height, left:left + width]
        return {**element, "image": np.ascontiguousarray(cropped)}


@dataclasses.dataclass(frozen=True)
class RandomHorizontalFlip(grain.transforms.RandomMap):
    """Mirrors the image left-right with probability `probability`."""

    probability: float = 0.5

    def random_map(self, element: Dict[str, np.ndarray],
                   rng: np.random.Generator) -> Dict[str, np.ndarray]:
        """Flips one example when grain's `rng` says so."""
        if rng.random() >= self.probability:
            return element
        flipped = np.ascontiguousarray(element["image"][:, ::-1])
        return {**element, "image": flipped}


class ToFloatBatch(grain.transforms.Map):
    """Batched uint8 images -> float32 in [0, 1]; labels -> int32."""

    def map(self, element: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        """Converts one batch (once per batch, not per example)."""
        return {
            "image": element["image"].astype(np.float32) / np.float32(255),
            "label": element["label"].astype(np.int32),
        }
