"""Small numpy/PIL image helpers shared by the dataset builders and the loader.

Everything here works on uint8 HWC arrays and runs on the host (inside grain
workers or while preparing a dataset), never inside jit.
"""
import io
from typing import Sequence, Tuple

import numpy as np
import PIL.Image

_PIL_MODES = {1: "L", 3: "RGB"}


def image_hw(image_size: int | Sequence[int]) -> Tuple[int, int]:
    """Normalises an int or (height, width) into a (height, width) tuple."""
    if isinstance(image_size, (int, np.integer)):
        size = (int(image_size), int(image_size))
    else:
        size = tuple(int(s) for s in image_size)
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"image_size must be a positive int or (height, "
                         f"width), got {image_size!r}")
    return size


def check_channels(channels: int) -> int:
    """Returns `channels` if it is 1 or 3 (the modes PIL converts to)."""
    if channels not in _PIL_MODES:
        raise ValueError(f"channels must be 1 or 3, got {channels!r}")
    return channels


def to_pil(image: np.ndarray) -> PIL.Image.Image:
    """uint8 [H, W, C] (C in 1, 3, 4) -> PIL image."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] not in (
            1, 3, 4):
        raise ValueError(f"expected a uint8 [H, W, 1|3|4] image, got "
                         f"{image.dtype} {image.shape}")
    if image.shape[-1] == 1:
        return PIL.Image.fromarray(image[..., 0], mode="L")
    return PIL.Image.fromarray(image, mode="RGB" if image.shape[-1] == 3
                               else "RGBA")


def from_pil(pil_image: PIL.Image.Image, channels: int) -> np.ndarray:
    """PIL image (any mode) -> uint8 [H, W, channels]."""
    converted = pil_image.convert(_PIL_MODES[check_channels(channels)])
    array = np.asarray(converted, dtype=np.uint8)
    return array[..., None] if channels == 1 else array


def resize_center_crop(pil_image: PIL.Image.Image,
                       image_size: int | Sequence[int]) -> PIL.Image.Image:
    """Scales the image to cover `image_size`, then crops the centre.

    Keeping the aspect ratio (instead of stretching) is what ImageNet-style
    generative models are trained on; for a source that already has the target
    aspect ratio this is a plain resize. PIL's resize filters are antialiased,
    so large downscales do not alias.
    """
    height, width = image_hw(image_size)
    src_w, src_h = pil_image.size
    if (src_h, src_w) == (height, width):
        return pil_image
    scale = max(height / src_h, width / src_w)
    new_h = max(height, round(src_h * scale))
    new_w = max(width, round(src_w * scale))
    resized = pil_image.resize((new_w, new_h), PIL.Image.Resampling.BICUBIC)
    top = (new_h - height) // 2
    left = (new_w - width) // 2
    return resized.crop((left, top, left + width, top + height))


def convert_channels(image: np.ndarray, channels: int) -> np.ndarray:
    """uint8 [H, W, C] -> uint8 [H, W, channels] (grey <-> RGB, drops alpha)."""
    check_channels(channels)
    if image.shape[-1] == channels:
        return image
    if image.shape[-1] == 1 and channels == 3:
        return np.repeat(image, 3, axis=-1)
    return from_pil(to_pil(image), channels)


def resize_array(image: np.ndarray,
                 image_size: int | Sequence[int]) -> np.ndarray:
    """uint8 [H, W, C] -> uint8 [height, width, C] via resize_center_crop."""
    height, width = image_hw(image_size)
    if image.shape[:2] == (height, width):
        return image
    channels = 1 if image.shape[-1] == 1 else 3
    return from_pil(resize_center_crop(to_pil(image), (height, width)),
                    channels)


def png_bytes(image: np.ndarray) -> bytes:
    """uint8 [H, W, C] -> PNG bytes (tfds encodes numpy images only with TF)."""
    buffer = io.BytesIO()
    to_pil(image).save(buffer, format="PNG")
    return buffer.getvalue()
