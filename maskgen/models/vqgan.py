"""VQGAN image tokenizer with the official MaskGIT parameter layout.

The tree is `encoder/...`, `quantizer/codebook`, `decoder/...` with the names and
shapes of google-research/maskgit's `VQVAE`, so an official checkpoint's `params`
can be passed to `apply` unchanged. Quirks reproduced on purpose:

  * ResBlock "shortcut": when the width changes, a 1x1 conv C_out->C_out is
    applied to the block's *output* h and the block returns h + Conv_2(h); the
    block input is dropped (the pretrained weights were trained that way).
  * Residual-block convs and the encoder stem conv have no bias; GroupNorm eps 1e-6.
  * Average-pool downsampling, nearest x2 + 3x3 conv upsampling, no attention
    blocks, swish, and no squashing of the decoder output (images live in [0, 1]).
  * Quantizer distances in the expanded form |z|^2 - 2 z.c + |c|^2, first argmin.

`quantizer_type` = "vq" (default) keeps exactly that tree; "fsq" / "lfq" and the
vq option `vq_lookup_dim` use other quantizers (maskgen.models.quantizers), whose
`num_codes` sets the token vocabulary.

Unlike the official module, `__call__` works (encode -> decode) and `encode`
always returns the straight-through quantised features with the VQ losses.

Shape legend: B batch, H/W image size, h/w latent size (H / 2^(levels-1)),
D embedding dim, K codebook size, C channels.
"""
from typing import Any, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from maskgen.models import quantizers
from maskgen.models.conv import Conv, avg_pool_down, check_conv_impl, group_norm, upsample_nearest
from maskgen.models.quantizers import VectorQuantizer  # noqa: F401  (re-exported: the vq module)

Dtype = Any


def parse_dtype(name_or_dtype: jax.typing.DTypeLike) -> Dtype:
    """A dtype from a config string; an unknown name is a ValueError, not numpy's TypeError."""
    try:
        return jnp.dtype(name_or_dtype)
    except TypeError as err:
        raise ValueError(f"unknown dtype {name_or_dtype!r}") from err


class ResBlock(nn.Module):
    """GN -> swish -> conv3x3 -> GN -> swish -> conv3x3, with the official shortcut quirk."""
    filters: int
    norm_groups: int
    conv_impl: str
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
        conv = dict(use_bias=False, conv_impl=self.conv_impl, dtype=self.dtype,
                    param_dtype=self.param_dtype)
        h = group_norm(self.norm_groups, self.dtype, self.param_dtype)(x_BxHxWxC)
        h = Conv(self.filters, (3, 3), **conv)(nn.swish(h))
        h = group_norm(self.norm_groups, self.dtype, self.param_dtype)(h)
        h = Conv(self.filters, (3, 3), **conv)(nn.swish(h))
        if x_BxHxWxC.shape[-1] != self.filters:
            # Official quirk: the "shortcut" acts on h, not on the block input.
            return h + Conv(self.filters, (1, 1), **conv)(h)
        return x_BxHxWxC + h


class Encoder(nn.Module):
    """Images [B,H,W,C] -> continuous features [B,h,w,D]."""
    filters: int
    num_res_blocks: int
    channel_multipliers: Tuple[int, ...]
    embedding_dim: int
    norm_groups: int
    conv_impl: str
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, images_BxHxWxC: jax.Array) -> jax.Array:
        block = dict(norm_groups=self.norm_groups, conv_impl=self.conv_impl, dtype=self.dtype,
                     param_dtype=self.param_dtype)
        conv = dict(conv_impl=self.conv_impl, dtype=self.dtype, param_dtype=self.param_dtype)
        x = Conv(self.filters, (3, 3), use_bias=False, **conv)(images_BxHxWxC)
        levels = len(self.channel_multipliers)
        for level, multiplier in enumerate(self.channel_multipliers):
            for _ in range(self.num_res_blocks):
                x = ResBlock(self.filters * multiplier, **block)(x)
            if level < levels - 1:
                x = avg_pool_down(x)
        for _ in range(self.num_res_blocks):
            x = ResBlock(self.filters * self.channel_multipliers[-1], **block)(x)
        x = nn.swish(group_norm(self.norm_groups, self.dtype, self.param_dtype)(x))
        return Conv(self.embedding_dim, (1, 1), **conv)(x)


class Decoder(nn.Module):
    """Quantised features [B,h,w,D] -> images [B,H,W,C] (unsquashed)."""
    filters: int
    num_res_blocks: int
    channel_multipliers: Tuple[int, ...]
    out_channels: int
    norm_groups: int
    conv_impl: str
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, z_BxhxwxD: jax.Array) -> jax.Array:
        block = dict(norm_groups=self.norm_groups, conv_impl=self.conv_impl, dtype=self.dtype,
                     param_dtype=self.param_dtype)
        conv = dict(conv_impl=self.conv_impl, dtype=self.dtype, param_dtype=self.param_dtype)
        x = Conv(self.filters * self.channel_multipliers[-1], (3, 3), **conv)(z_BxhxwxD)
        for _ in range(self.num_res_blocks):
            x = ResBlock(self.filters * self.channel_multipliers[-1], **block)(x)
        for level in reversed(range(len(self.channel_multipliers))):
            width = self.filters * self.channel_multipliers[level]
            for _ in range(self.num_res_blocks):
                x = ResBlock(width, **block)(x)
            if level > 0:
                x = Conv(width, (3, 3), **conv)(upsample_nearest(x))
        x = nn.swish(group_norm(self.norm_groups, self.dtype, self.param_dtype)(x))
        return Conv(self.out_channels, (3, 3), **conv)(x)


def check_images(images: jax.Array, channels: int, downsample_factor: int = 1,
                 image_size: Optional[int] = None) -> jax.Array:
    """Raises ValueError unless `images` is a float [B,H,W,channels] batch of a usable size.

    Only static properties (rank, shape, dtype) are checked, so this also works on
    tracers inside jit.
    """
    shape = tuple(images.shape)
    if len(shape) != 4:
        raise ValueError(f"images must be [batch, height, width, channels], got shape {shape}")
    if not jnp.issubdtype(images.dtype, jnp.floating):
        raise ValueError(
            f"images must be floating point in [0, 1], got dtype {images.dtype} "
            "(divide uint8 by 255)")
    if shape[-1] != channels:
        raise ValueError(f"images have {shape[-1]} channels, the tokenizer expects {channels}")
    height, width = shape[1:3]
    if image_size is not None and (height, width) != (image_size, image_size):
        raise ValueError(
            f"image size {height}x{width} differs from the configured {image_size}x{image_size}")
    if height % downsample_factor or width % downsample_factor:
        raise ValueError(
            f"image size {height}x{width} is not divisible by the downsampling factor "
            f"{downsample_factor}")
    return images


def check_token_ids(ids: jax.Array, codebook_size: int) -> jax.Array:
    """Host-side check that token ids are integers in [0, codebook_size); returns numpy ids."""
    ids = np.asarray(ids)
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"token ids must be integers, got dtype {ids.dtype}")
    if ids.ndim != 3:
        raise ValueError(f"token ids must be [batch, h, w], got shape {ids.shape}")
    bad = ids[(ids < 0) | (ids >= codebook_size)]
    if bad.size:
        raise ValueError(
            f"token id {int(bad.flat[0])} out of range [0, {codebook_size}) for this codebook")
    return ids


class VQGAN(nn.Module):
    """Encoder + vector quantiser + decoder; see the module docstring for the layout.

    `dtype` is the activation dtype (e.g. bfloat16); parameters are `param_dtype`
    (float32). Quantiser distances and losses are always computed in float32.
    """
    codebook_size: int = 1024
    embedding_dim: int = 256
    filters: int = 128
    num_res_blocks: int = 2
    channel_multipliers: Tuple[int, ...] = (1, 1, 2, 2, 4)
    image_channels: int = 3
    norm_groups: int = 32
    commitment_cost: float = 0.25
    entropy_loss_ratio: float = 0.0
    entropy_temperature: float = 0.01
    # vq | fsq | lfq (maskgen.models.quantizers; config key `tokenizer.quantizer`; the submodule
    # keeps the name `quantizer` for the official tree).
    quantizer_type: str = "vq"
    fsq_levels: Tuple[int, ...] = (8, 5, 5, 5)  # fsq only: prod(levels) codes
    lfq_bits: int = 10  # lfq only: 2**bits codes
    lfq_normalize: bool = False  # lfq only: codes on the unit sphere
    vq_lookup_dim: int = 0  # vq only: > 0 = factorised l2-normalised lookup in this many dims
    image_size: Optional[int] = None  # if set, inputs must be exactly this size
    conv_impl: str = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self) -> None:
        self.check_config()
        common = dict(filters=self.filters, num_res_blocks=self.num_res_blocks,
                      channel_multipliers=tuple(self.channel_multipliers),
                      norm_groups=self.norm_groups, conv_impl=self.conv_impl,
                      dtype=self.dtype, param_dtype=self.param_dtype)
        self.encoder = Encoder(embedding_dim=self.embedding_dim, **common)
        self.quantizer = quantizers.make_quantizer(
            self.quantizer_name_checked(), codebook_size=self.codebook_size,
            embedding_dim=self.embedding_dim, commitment_cost=self.commitment_cost,
            entropy_loss_ratio=self.entropy_loss_ratio, entropy_temperature=self.entropy_temperature,
            fsq_levels=tuple(self.fsq_levels), lfq_bits=self.lfq_bits, lfq_normalize=self.lfq_normalize,
            vq_lookup_dim=self.vq_lookup_dim, param_dtype=self.param_dtype)
        self.decoder = Decoder(out_channels=self.image_channels, **common)

    def quantizer_name_checked(self) -> str:
        return quantizers.check_quantizer(self.quantizer_type)

    @property
    def num_codes(self) -> int:
        """Distinct token ids: codebook_size (vq), prod(fsq_levels) (fsq), 2**lfq_bits (lfq)."""
        return quantizers.code_count(self.quantizer_type, self.codebook_size, self.fsq_levels, self.lfq_bits)

    def check_config(self) -> None:
        """Raises ValueError for field combinations the architecture cannot build."""
        check_conv_impl(self.conv_impl)
        quantizers.code_count(self.quantizer_type, self.codebook_size, self.fsq_levels,
                              self.lfq_bits)  # validates the quantizer name, levels, bits
        if self.quantizer_type == "vq" and self.vq_lookup_dim < 0:
            raise ValueError(f"tokenizer.vq_lookup_dim must be >= 0 (0 = off), got {self.vq_lookup_dim}")
        if not self.channel_multipliers:
            raise ValueError("channel_multipliers must name at least one level")
        for size, name in ((self.codebook_size, "codebook_size"),
                           (self.embedding_dim, "embedding_dim"), (self.filters, "filters"),
                           (self.image_channels, "image_channels"),
                           (self.norm_groups, "norm_groups")):
            if size < 1:
                raise ValueError(f"{name} must be positive, got {size}")
        for multiplier in self.channel_multipliers:
            if (self.filters * multiplier) % self.norm_groups:
                raise ValueError(
                    f"width filters*multiplier = {self.filters * multiplier} is not divisible by "
                    f"norm_groups={self.norm_groups}")
        if self.image_size is not None and self.image_size % self.downsample_factor:
            raise ValueError(f"image_size {self.image_size} is not divisible by the downsampling "
                             f"factor {self.downsample_factor}")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channel_multipliers) - 1)

    @property
    def last_layer_name(self) -> str:
        """Name of the decoder's output conv (for the adaptive GAN weight)."""
        return f"Conv_{len(self.channel_multipliers)}"

    def latent_shape(self, image_size: int) -> Tuple[int, int]:
        side = image_size // self.downsample_factor
        return side, side

    def _check(self, images: jax.Array) -> jax.Array:
        return check_images(images, self.image_channels, self.downsample_factor, self.image_size)

    def encode(self, images_BxHxWxC: jax.Array) -> Tuple[jax.Array, Any]:
        """Images in [0, 1] -> (straight-through quantised [B,h,w,D] float32, aux dict)."""
        z = self.encoder(self._check(images_BxHxWxC))
        return self.quantizer(z)

    def encode_latents(self, images_BxHxWxC: jax.Array) -> jax.Array:
        """Images -> the float32 vectors the quantizer rounds or looks up [B,h,w,d] (k-means init)."""
        return self.encode(images_BxHxWxC)[1]["latent"]

    def encode_to_indices(self, images_BxHxWxC: jax.Array) -> jax.Array:
        """Images -> int32 token ids [B,h,w]."""
        _, aux = self.encode(images_BxHxWxC)
        return aux["encoding_indices"]

    def decode(self, quantized_BxhxwxD: jax.Array) -> jax.Array:
        """Quantised features -> images [B,H,W,C] float32 (not clipped)."""
        if quantized_BxhxwxD.ndim != 4 or quantized_BxhxwxD.shape[-1] != self.embedding_dim:
            raise ValueError(f"decode expects [batch, h, w, {self.embedding_dim}] features, got "
                             f"shape {quantized_BxhxwxD.shape}")
        return self.decoder(quantized_BxhxwxD).astype(jnp.float32)

    def decode_from_indices(self, ids_Bxhxw: jax.Array) -> jax.Array:
        """Token ids [B,h,w] -> images. Validate ids first with `check_token_ids` (host)."""
        if ids_Bxhxw.ndim != 3 or not jnp.issubdtype(ids_Bxhxw.dtype, jnp.integer):
            raise ValueError(f"token ids must be integer [batch, h, w], got shape "
                             f"{ids_Bxhxw.shape} dtype {ids_Bxhxw.dtype}")
        return self.decode(self.quantizer.lookup(ids_Bxhxw))

    def __call__(self, images_BxHxWxC: jax.Array) -> tuple[jax.Array, dict]:
        """Images -> (reconstruction [B,H,W,C], aux of `encode`)."""
        quantized, aux = self.encode(images_BxHxWxC)
        return self.decode(quantized), aux


TOKENIZER_CONFIG_KEYS = ("codebook_size", "embedding_dim", "filters", "num_res_blocks",
                         "channel_multipliers", "image_channels", "norm_groups",
                         "commitment_cost", "dtype")


def count_params(params: Any) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))
