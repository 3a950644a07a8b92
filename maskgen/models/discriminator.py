"""StyleGAN-style image discriminator (the one the official MaskGIT repo ships).

Layout: a 3x3 stem conv, then residual blocks that each halve the resolution
until it is at most 4x4, then a 3x3 conv, flatten, two dense layers -> one logit
per image. Leaky ReLU (0.2) everywhere; residual sums are scaled by 1/sqrt(2).
Each image is processed independently (no minibatch-std, no batch norm), which
`vq_losses.r1_penalty` relies on.

Widths follow StyleGAN's resolution table: width(r) = min(max_channels,
channel_base // r) with r rounded up to a power of two (so 28x28 uses the 32x32
entry). The defaults (channel_base 16384, max_channels 512) reproduce the
official table at channel_multiplier 1 (256 px: 64, 128, 256, 512, 512, ...);
small CPU models shrink both.

Shape legend: B batch, H/W spatial, C channels.
"""
import math
from typing import Any, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from maskgen import axes
from maskgen.models.conv import Conv, avg_pool_down, blur_down, check_conv_impl

Dtype = Any
_init = nn.initializers.xavier_uniform()


def _leaky_relu(x: jax.Array) -> jax.Array:
    return jax.nn.leaky_relu(x, negative_slope=0.2)


def _next_pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(n)))


class DiscriminatorBlock(nn.Module):
    """conv3x3 -> lrelu -> downsample -> conv3x3 -> lrelu, plus a downsampled 1x1 skip.

    Instances are named `ResBlock_{i}` and their convs created in the official
    order (3x3, skip 1x1, 3x3), so the tree matches the official discriminator's.
    """
    filters: int
    blur_resample: bool
    conv_impl: str
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
        conv = dict(conv_impl=self.conv_impl, dtype=self.dtype, param_dtype=self.param_dtype,
                    kernel_init=_init)
        down = blur_down if self.blur_resample else avg_pool_down
        h = _leaky_relu(Conv(x_BxHxWxC.shape[-1], (3, 3), **conv)(x_BxHxWxC))
        h = down(h)
        skip = Conv(self.filters, (1, 1), use_bias=False, **conv)(down(x_BxHxWxC))
        h = _leaky_relu(Conv(self.filters, (3, 3), **conv)(h))
        return (skip + h) / math.sqrt(2.0)


class Discriminator(nn.Module):
    """Images [B,H,W,C] (square, in [0, 1]) -> logits [B, 1]."""
    image_size: int = 256
    image_channels: int = 3
    channel_base: int = 16384
    max_channels: int = 512
    blur_resample: bool = True
    conv_impl: str = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def width(self, resolution: int) -> int:
        return max(1, min(self.max_channels, self.channel_base // _next_pow2(resolution)))

    def resolutions(self) -> Tuple[int, ...]:
        """Spatial size entering each stage: image_size, ..., down to <= 4."""
        sizes = [self.image_size]
        while sizes[-1] > 4:
            sizes.append(-(-sizes[-1] // 2))
        return tuple(sizes)

    def _check(self, images: jax.Array) -> None:
        check_conv_impl(self.conv_impl)
        if self.image_size < 8:
            raise ValueError(f"discriminator image_size must be >= 8, got {self.image_size}")
        expected = (self.image_size, self.image_size, self.image_channels)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(f"discriminator expects images [batch, {expected[0]}, {expected[1]}, "
                             f"{expected[2]}], got shape {tuple(images.shape)}")
        if not jnp.issubdtype(images.dtype, jnp.floating):
            raise ValueError(f"discriminator images must be floating point, got {images.dtype}")

    @nn.compact
    def __call__(self, images_BxHxWxC: jax.Array) -> jax.Array:
        self._check(images_BxHxWxC)
        conv = dict(conv_impl=self.conv_impl, dtype=self.dtype, param_dtype=self.param_dtype,
                    kernel_init=_init)
        dense = dict(
            dtype=self.dtype, param_dtype=self.param_dtype,
            kernel_init=nn.with_logical_partitioning(_init, (axes.CONV_IN, axes.CONV_OUT)),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (axes.CONV_OUT,)))
        sizes = self.resolutions()
        x = _leaky_relu(Conv(self.width(sizes[0]), (3, 3), **conv)(images_BxHxWxC))
        for index, size in enumerate(sizes[1:]):
            x = DiscriminatorBlock(self.width(size), self.blur_resample, self.conv_impl,
                                   self.dtype, self.param_dtype, name=f"ResBlock_{index}")(x)
        x = _leaky_relu(Conv(self.width(sizes[-1]), (3, 3), **conv)(x))
        x = x.reshape(x.shape[0], -1)
        x = _leaky_relu(nn.Dense(self.width(sizes[-1]), **dense)(x))
        return nn.Dense(1, **dense)(x).astype(jnp.float32)
