"""Sizes a config implies: the token-id vocabulary, the token grid, the sequence length."""
from maskgen.tokens import TokenLayout


def token_layout(cfg) -> TokenLayout:
    """The vocabulary layout a config implies (a null class is appended when enabled)."""
    null = cfg.num_classes if cfg.null_class else None
    return TokenLayout(codebook_size=cfg.tokenizer.codebook_size,
                       num_classes=cfg.num_classes + int(cfg.null_class), null_class_id=null)


def downsample_factor(cfg) -> int:
    return 2 ** (len(cfg.tokenizer.channel_multipliers) - 1)


def token_grid(cfg) -> tuple[int, int]:
    """(h, w) of the token grid for the config's image size."""
    f = downsample_factor(cfg)
    if cfg.image_size % f:
        raise ValueError(f"image_size {cfg.image_size} is not divisible by the tokenizer's downsampling {f}")
    return cfg.image_size // f, cfg.image_size // f


def seq_len(cfg) -> int:
    """Transformer sequence length: one class token + h*w image tokens."""
    h, w = token_grid(cfg)
    return 1 + h * w
