"""Models from a config: the one place that maps config blocks onto module arguments."""
import jax.numpy as jnp

from maskgen.models.layout import seq_len, token_layout
from maskgen.models.transformer import build_transformer

_DISC_FIELDS = ("channel_base", "max_channels", "blur_resample", "conv_impl")


def tokenizer_model(cfg):
    """VQGAN from `cfg.tokenizer` (+ the top-level image_channels)."""
    from maskgen.models import vqgan
    return vqgan.build_tokenizer(dict(cfg.tokenizer.to_dict(), image_channels=cfg.image_channels))


def transformer_model(cfg):
    """MaskGIT transformer for the config's token layout and sequence length."""
    return build_transformer(cfg.transformer, token_layout(cfg), seq_len(cfg))


def _next_pow2(n: int) -> int:
    return 1 << (int(n) - 1).bit_length()


def discriminator_model(cfg):
    """Discriminator from `cfg.discriminator`.

    Module fields (channel_base, max_channels, blur_resample, conv_impl) pass
    through; otherwise `filters` / `channel_multipliers` set the width at full
    resolution (filters * multipliers[0]) and the cap (filters * max(multipliers)).
    """
    from maskgen.models.discriminator import Discriminator
    d = cfg.discriminator.to_dict()
    kwargs = {k: d[k] for k in _DISC_FIELDS if k in d}
    if "channel_base" not in kwargs and "filters" in d:
        mults = list(d.get("channel_multipliers") or [1])
        kwargs["channel_base"] = int(d["filters"] * mults[0] * _next_pow2(cfg.image_size))
        kwargs["max_channels"] = int(d["filters"] * max(mults))
    return Discriminator(image_size=cfg.image_size, image_channels=cfg.image_channels,
                         dtype=jnp.dtype(cfg.tokenizer.get("dtype", "float32")), **kwargs)
