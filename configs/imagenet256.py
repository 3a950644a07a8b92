"""MaskGIT on ImageNet 256x256: the paper's numbers (24 layers, width 768, 16x16 tokens).

    python train.py --config=configs/imagenet256.py --workdir=/ckpt/in256 \
        --config.dataset.data_dir=/data/tfds
"""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from common import base_config  # noqa: E402


def get_config():
    c = base_config()
    c.image_size = 256
    # The paper's model has no null class and no label dropout (vocab 1024+1000+1 =
    # 2025, so official checkpoints load as they are). For guidance, train with
    # --config.null_class=True --config.transformer_train.label_dropout=0.1.
    c.null_class = False
    c.transformer_train.label_dropout = 0.0
    c.num_train_steps = 2_000_000  # transformer; tokenizer stage may set its own
    c.batch_size = 256
    c.sampling.steps = 8
    return c
