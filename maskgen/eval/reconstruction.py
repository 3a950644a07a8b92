"""Tokenizer reconstruction error: MSE and PSNR between images and their reconstructions."""
from typing import Callable

import numpy as np
from numpy.typing import ArrayLike


def reconstruction_error(images: ArrayLike, reconstruct: Callable[[np.ndarray], ArrayLike], batch_size: int = 256,
                         max_value: float = 255.0) -> dict[str, float]:
    """Runs `reconstruct` over `images` in batches -> {"mse", "psnr", "psnr_per_image"}.

    `reconstruct(batch)` must return an array of the batch's shape on the same
    scale (e.g. encode + decode of a tokenizer, mapped back to 0..255).
    Reconstructions are clipped to [0, max_value], as they would be when
    saved as images. "psnr" is from the dataset MSE; "psnr_per_image" the
    mean of per-image PSNRs (what tokenizer papers usually quote).
    """
    images = np.asarray(images)
    if images.ndim < 2 or images.shape[0] == 0:
        raise ValueError(f"images must be a non-empty batch [N, ...], got shape {images.shape}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    per_image = []
    for start in range(0, images.shape[0], batch_size):
        batch = images[start:start + batch_size]
        recon = np.asarray(reconstruct(batch), np.float64)
        if recon.shape != batch.shape:
            raise ValueError(f"reconstruct returned shape {recon.shape} for a batch of shape {batch.shape}")
        error = (np.clip(recon, 0, max_value) - batch.astype(np.float64)) ** 2
        per_image.append(error.reshape(error.shape[0], -1).mean(axis=1))
    per_image = np.concatenate(per_image)
    mse = float(per_image.mean())
    with np.errstate(divide="ignore"):
        psnr_each = 10 * np.log10(max_value ** 2 / per_image)  # inf for a perfect image
        psnr = float(10 * np.log10(max_value ** 2 / mse)) if mse > 0 else float("inf")
    return {"mse": mse, "psnr": psnr, "psnr_per_image": float(np.mean(psnr_each))}
