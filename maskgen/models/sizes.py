"""Sizes a config implies: the token-id vocabulary, the token grid, the sequence length."""
from collections.abc import Mapping
from typing import Any

import ml_collections

from maskgen.models.quantizers import code_count as _code_count
from maskgen.tokens import TokenLayout


def code_count(tokenizer_block: Mapping[str, Any]) -> int:
    """Token ids the tokenizer emits: codebook_size (vq), prod(fsq_levels) (fsq), 2**lfq_bits (lfq).

    The transformer's vocabulary follows this, so `codebook_size` matters only for vq.
    """
    get = tokenizer_block.get
    return _code_count(get("quantizer", "vq"), get("codebook_size", 0), get("fsq_levels", ()),
                       get("lfq_bits", 0))


def token_layout(cfg: ml_collections.ConfigDict) -> TokenLayout:
    """The vocabulary layout a config implies (a null class is appended when enabled)."""
    null = cfg.num_classes if cfg.null_class else None
    return TokenLayout(codebook_size=code_count(cfg.tokenizer),
                       num_classes=cfg.num_classes + int(cfg.null_class), null_class_id=null)


def downsample_factor(cfg: ml_collections.ConfigDict) -> int:
    return 2 ** (len(cfg.tokenizer.channel_multipliers) - 1)


def token_grid(cfg: ml_collections.ConfigDict) -> tuple[int, int]:
    """(h, w) of the token grid for the config's image size."""
    f = downsample_factor(cfg)
    if cfg.image_size % f:
        raise ValueError(f"image_size {cfg.image_size} is not divisible by the tokenizer's downsampling {f}")
    return cfg.image_size // f, cfg.image_size // f


def seq_len(cfg: ml_collections.ConfigDict) -> int:
    """Transformer sequence length: one class token + h*w image tokens."""
    h, w = token_grid(cfg)
    return 1 + h * w
