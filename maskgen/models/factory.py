"""Models from a config: the one place that maps config blocks onto module arguments.

Model files take explicit keyword arguments only; everything that reads a
`ConfigDict` to build a module lives here, so a new config key has one home.
"""
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import ml_collections

from maskgen.models import quantizers
from maskgen.models.attention import check_attention_name, resolve_attention
from maskgen.models.discriminator import Discriminator
from maskgen.models.remat import check_remat_name
from maskgen.models.sizes import seq_len, token_layout
from maskgen.models.transformer import Transformer
from maskgen.models.vqgan import TOKENIZER_CONFIG_KEYS, VQGAN, parse_dtype
from maskgen.tokens import TokenLayout

# Tokenizer keys a config may set beyond TOKENIZER_CONFIG_KEYS.
TOKENIZER_OPTIONAL_KEYS = ("entropy_loss_ratio", "entropy_temperature", "image_size", "conv_impl",
                           "quantizer", "fsq_levels", "lfq_bits", "lfq_normalize", "vq_lookup_dim")
_DISC_FIELDS = ("channel_base", "max_channels", "blur_resample", "conv_impl")


def tokenizer_from_block(block: Mapping[str, Any]) -> VQGAN:
    """VQGAN from a `tokenizer` block (+ image_channels); unknown or missing keys raise.

    Typos must not fall back silently to a module default.
    """
    keys = set(block.keys())
    missing = [k for k in TOKENIZER_CONFIG_KEYS if k not in keys]
    if missing:
        raise ValueError(f"tokenizer config misses keys {missing}")
    unknown = sorted(keys - set(TOKENIZER_CONFIG_KEYS) - set(TOKENIZER_OPTIONAL_KEYS))
    if unknown:
        raise ValueError(f"tokenizer config has unknown keys {unknown}")
    kwargs = {k: block[k] for k in keys}
    if "quantizer" in kwargs:  # the module field; its submodule keeps the official name `quantizer`
        kwargs["quantizer_type"] = quantizers.check_quantizer(kwargs.pop("quantizer"))
    if "fsq_levels" in kwargs:
        kwargs["fsq_levels"] = quantizers.check_fsq_levels(kwargs["fsq_levels"])
    kwargs["channel_multipliers"] = tuple(int(m) for m in kwargs["channel_multipliers"])
    kwargs["dtype"] = parse_dtype(kwargs["dtype"])
    model = VQGAN(**kwargs)
    model.check_config()
    return model


def tokenizer_model(cfg: ml_collections.ConfigDict) -> VQGAN:
    """VQGAN from `cfg.tokenizer` (+ the top-level image_channels)."""
    return tokenizer_from_block(dict(cfg.tokenizer.to_dict(), image_channels=cfg.image_channels))


def transformer_from_block(block: Mapping[str, Any], layout: TokenLayout, max_len: int) -> Transformer:
    """Transformer from a `transformer` block, a token layout and a sequence length."""
    t = block
    return Transformer(
        vocab_size=layout.vocab_size, hidden_size=t["hidden_size"], num_layers=t["num_layers"],
        num_heads=t["num_heads"], mlp_dim=t["mlp_dim"], max_len=max_len,
        dropout_rate=t["dropout_rate"],
        attention_dropout_rate=t.get("attention_dropout_rate", t["dropout_rate"]),
        dtype=jnp.dtype(t.get("dtype", "float32")),
        attention=check_attention_name(t.get("attention", "auto")),
        remat=check_remat_name(t.get("remat", "none")))


def transformer_model(cfg: ml_collections.ConfigDict) -> Transformer:
    """MaskGIT transformer for the config's token layout and sequence length."""
    return transformer_from_block(cfg.transformer, token_layout(cfg), seq_len(cfg))


def accelerator_summary(cfg: ml_collections.ConfigDict, platform: str) -> dict:
    """Which attention kernel the transformer runs on `platform` in training and in decoding, and why,
    with the remat and PRNG settings: printed at start-up and kept in the run's workdir."""
    t = cfg.transformer
    dtype = jnp.dtype(t.get("dtype", "float32"))
    head_dim = int(t["hidden_size"]) // int(t["num_heads"])
    requested = check_attention_name(t.get("attention", "auto"))
    dropout = float(t.get("attention_dropout_rate", t["dropout_rate"])) > 0
    train_impl, train_why = resolve_attention(requested, dtype, head_dim, platform, dropout=dropout)
    decode_impl, decode_why = resolve_attention(requested, dtype, head_dim, platform)
    return {"platform": platform, "attention": requested,
            "attention_train": train_impl, "attention_train_reason": train_why,
            "attention_decode": decode_impl, "attention_decode_reason": decode_why,
            "remat": check_remat_name(t.get("remat", "none")), "prng_impl": cfg.get("prng_impl", "threefry2x32")}


def _next_pow2(n: int) -> int:
    return 1 << (int(n) - 1).bit_length()


def discriminator_model(cfg: ml_collections.ConfigDict) -> Discriminator:
    """Discriminator from `cfg.discriminator`.

    Module fields (channel_base, max_channels, blur_resample, conv_impl) pass
    through; otherwise `filters` / `channel_multipliers` set the width at full
    resolution (filters * multipliers[0]) and the cap (filters * max(multipliers)).
    """
    d = cfg.discriminator.to_dict()
    kwargs = {k: d[k] for k in _DISC_FIELDS if k in d}
    if "channel_base" not in kwargs and "filters" in d:
        mults = list(d.get("channel_multipliers") or [1])
        kwargs["channel_base"] = int(d["filters"] * mults[0] * _next_pow2(cfg.image_size))
        kwargs["max_channels"] = int(d["filters"] * max(mults))
    return Discriminator(image_size=cfg.image_size, image_channels=cfg.image_channels,
                         dtype=jnp.dtype(cfg.tokenizer.get("dtype", "float32")), **kwargs)
