"""MaskGIT on ImageNet 512x512: same networks, 32x32 tokens (1025 positions)."""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from common import base_config  # noqa: E402


def get_config():
    c = base_config()
    c.image_size = 512
    # The paper's model has no null class and no label dropout (vocab 1024+1000+1 =
    # 2025, so official checkpoints load as they are). For guidance, train with
    # --config.null_class=True --config.transformer_train.label_dropout=0.1.
    c.null_class = False
    c.transformer_train.label_dropout = 0.0
    c.num_train_steps = 2_000_000
    c.batch_size = 256
    c.sampling.steps = 12
    return c
