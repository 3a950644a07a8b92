"""Convolution and resampling building blocks shared by the tokenizer and the discriminator.

`Conv` keeps flax's `nn.Conv` parameter layout (`kernel` HWIO, optional `bias`) so
official checkpoints load unchanged, but lets the caller pick how the 3x3
convolution is computed:

  * "xla":    `lax.conv_general_dilated`, the same op `nn.Conv` emits;
  * "matmul": im2col (shifted slices concatenated along channels) + one matmul.

On XLA:CPU the filter gradient of the native convolution is the slow part of a
training step; as a matmul it runs on the GEMM path instead. Both give the same
numbers to float32 rounding (tests/test_vqgan.py checks outputs and gradients).

Resampling: `avg_pool_down` is TF-style 2x2/stride-2 "SAME" average pooling with
padding cells excluded (the official tokenizer's downsample), `blur_down` the
StyleGAN [1, 3, 3, 1] blur + stride-2 subsampling, `upsample_nearest` pixel
repetition. Shape legend: B batch, H/W spatial, C channels, O output channels.
"""
from typing import Any, Callable, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from maskgen import axes

Dtype = Any
CONV_IMPLS = ("xla", "matmul")
_DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")


def check_conv_impl(conv_impl: str) -> str:
    if conv_impl not in CONV_IMPLS:
        raise ValueError(f"conv_impl must be one of {CONV_IMPLS}, got {conv_impl!r}")
    return conv_impl


def _same_pads(kernel_size: int) -> Tuple[int, int]:
    """Stride-1 "SAME" padding: the extra cell of an even kernel goes after, as in XLA."""
    total = kernel_size - 1
    return total // 2, total - total // 2


def im2col(x_BxHxWxC: jax.Array, kernel_hw: Tuple[int, int]) -> jax.Array:
    """[B,H,W,C] -> [B,H,W,kh*kw*C] patches, ordered (dy, dx, c) like a flattened HWIO kernel."""
    kh, kw = kernel_hw
    _, height, width, _ = x_BxHxWxC.shape
    padded = jnp.pad(x_BxHxWxC, ((0, 0), _same_pads(kh), _same_pads(kw), (0, 0)))
    taps = [padded[:, dy:dy + height, dx:dx + width, :] for dy in range(kh) for dx in range(kw)]
    return taps[0] if len(taps) == 1 else jnp.concatenate(taps, axis=-1)


def conv2d_same(x_BxHxWxC: jax.Array, kernel_HWIO: jax.Array, conv_impl: str = "xla",
                precision: Any | None = None) -> jax.Array:
    """Stride-1 "SAME" convolution with an HWIO kernel, by either implementation."""
    kh, kw, c_in, c_out = kernel_HWIO.shape
    if x_BxHxWxC.shape[-1] != c_in:
        raise ValueError(f"conv input has {x_BxHxWxC.shape[-1]} channels, kernel expects {c_in}")
    if check_conv_impl(conv_impl) == "xla":
        return lax.conv_general_dilated(
            x_BxHxWxC, kernel_HWIO, (1, 1), "SAME",
            dimension_numbers=_DIMENSION_NUMBERS, precision=precision)
    patches = im2col(x_BxHxWxC, (kh, kw))
    return jnp.dot(patches, kernel_HWIO.reshape(kh * kw * c_in, c_out), precision=precision)


class Conv(nn.Module):
    """Stride-1 "SAME" conv with `nn.Conv`'s parameter names, shapes and default init.

    Parameters are annotated with the conv logical axes (kernel H, W, in, out).
    """
    features: int
    kernel_size: Sequence[int] = (3, 3)
    use_bias: bool = True
    conv_impl: str = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernel_init: Callable = nn.initializers.lecun_normal()
    bias_init: Callable = nn.initializers.zeros
    precision: Any = None

    @nn.compact
    def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
        kh, kw = self.kernel_size
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(
                self.kernel_init, (axes.CONV_H, axes.CONV_W, axes.CONV_IN, axes.CONV_OUT)),
            (kh, kw, x_BxHxWxC.shape[-1], self.features), self.param_dtype)
        y = conv2d_same(x_BxHxWxC.astype(self.dtype), kernel.astype(self.dtype),
                        self.conv_impl, self.precision)
        if self.use_bias:
            bias = self.param(
                "bias", nn.with_logical_partitioning(self.bias_init, (axes.CONV_OUT,)),
                (self.features,), self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y


def group_norm(num_groups: int, dtype: Dtype, param_dtype: Dtype, name: str | None = None) -> nn.GroupNorm:
    """GroupNorm with eps 1e-6 (the official tokenizer's) and logically named parameters."""
    return nn.GroupNorm(
        num_groups=num_groups, epsilon=1e-6, dtype=dtype, param_dtype=param_dtype, name=name,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones, (axes.NORM,)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (axes.NORM,)))


def avg_pool_down(x_BxHxWxC: jax.Array) -> jax.Array:
    """2x2/stride-2 average pool, TF "SAME": odd sizes round up, padding cells not counted."""
    return nn.avg_pool(x_BxHxWxC, (2, 2), (2, 2), padding="SAME", count_include_pad=False)


def upsample_nearest(x_BxHxWxC: jax.Array, factor: int = 2) -> jax.Array:
    """Nearest-neighbour upsampling by an integer factor (pixel repetition)."""
    return jnp.repeat(jnp.repeat(x_BxHxWxC, factor, axis=1), factor, axis=2)


_BLUR_TAPS = (1.0, 3.0, 3.0, 1.0)  # binomial filter; the 2-D filter is its normalised outer product


def _blur_down_axis(x: jax.Array, axis: int) -> jax.Array:
    """1-D [1,3,3,1]/8 filter + stride 2 along `axis`, TF "SAME" padding (extra cell after)."""
    size = x.shape[axis]
    out = -(-size // 2)
    taps = len(_BLUR_TAPS)
    pad_total = max((out - 1) * 2 + taps - size, 0)
    pads = [(0, 0)] * x.ndim
    pads[axis] = (pad_total // 2, pad_total - pad_total // 2)
    padded = jnp.pad(x, pads)
    norm = sum(_BLUR_TAPS)
    result = 0
    for t, weight in enumerate(_BLUR_TAPS):
        tap = lax.slice_in_dim(padded, t, t + 2 * (out - 1) + 1, stride=2, axis=axis)
        result = result + (weight / norm) * tap
    return result


def blur_down(x_BxHxWxC: jax.Array) -> jax.Array:
    """StyleGAN blur-pool: separable [1,3,3,1] low-pass, then keep every second pixel.

    Written as strided slices rather than a depthwise conv: identical values, and
    its gradient avoids XLA:CPU's slow grouped-conv filter path.
    """
    return _blur_down_axis(_blur_down_axis(x_BxHxWxC, 1), 2)
