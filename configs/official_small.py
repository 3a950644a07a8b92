"""The small official-architecture MaskGIT of `../shared/reference/official_small/` (tests).

128 px images -> 8x8 tokens, codebook 64, 10 classes, no null class (vocab 75),
2-layer width-64 transformer: official checkpoints of that configuration convert
with `python -m maskgen.convert --config official_small`.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from common import base_config  # noqa: E402


def get_config():
    c = base_config()
    c.image_size = 128
    c.num_classes = 10
    c.null_class = False  # official checkpoints have no null class
    c.dataset.name = "synthetic"
    c.tokenizer.update(dict(codebook_size=64, embedding_dim=16, filters=32, num_res_blocks=1,
                            channel_multipliers=[1, 1, 1, 1, 2], norm_groups=32))
    c.transformer.update(dict(num_layers=2, hidden_size=64, num_heads=2, mlp_dim=256))
    c.sampling.steps = 8
    c.transformer_train.label_dropout = 0.0
    return c
