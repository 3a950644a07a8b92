"""The "medium" benchmark preset: official architecture at 8 layers, width 256, 16x16 tokens.

Random weights, float32, 1000 classes, codebook 1024 (issue 9's comparison preset).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from common import base_config  # noqa: E402


def get_config():
    c = base_config()
    c.null_class = False  # the official architecture: 1024 + 1000 + 1 = 2025 ids
    c.transformer_train.label_dropout = 0.0
    c.transformer.update(dict(num_layers=8, hidden_size=256, num_heads=8, mlp_dim=1024))
    c.sampling.steps = 8
    c.batch_size = 32
    return c
