"""A tiny config that runs every code path on a CPU in seconds (tests, smoke runs)."""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from common import base_config  # noqa: E402


def get_config():
    c = base_config()
    c.seed = 0
    c.image_size = 16
    c.image_channels = 3
    c.num_classes = 4
    c.dataset.name = "synthetic"
    c.dataset.random_flip = False
    c.tokenizer.update(dict(codebook_size=32, embedding_dim=8, filters=8, num_res_blocks=1,
                            channel_multipliers=[1, 1, 2], norm_groups=4))
    c.discriminator.update(dict(filters=8, channel_multipliers=[1, 2]))
    c.transformer.update(dict(num_layers=2, hidden_size=32, num_heads=2, mlp_dim=64))
    c.sampling.steps = 4
    c.num_train_steps = 4
    c.batch_size = 8
    c.checkpoint_every_steps = 2
    c.log_every_steps = 1
    c.eval_every_steps = 0
    c.sample_every_steps = 0
    c.eval_num_samples = 16
    c.tokenizer_train.learning_rate = 1e-3
    c.tokenizer_train.disc_start_step = 2
    c.transformer_train.update(dict(learning_rate=1e-3, warmup_steps=1, ema_decay=0.9))
    return c
