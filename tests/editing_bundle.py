"""Tiny random models for the editing tests: in-memory bundles and saved checkpoints."""
import os
import pathlib
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax.core import meta

from maskgen import checkpoint as ckpt_lib
from maskgen import config_io
from maskgen.models import factory
from maskgen.models.sizes import seq_len
from maskgen.models.transformer import Transformer
from maskgen.models.vqgan import VQGAN
from maskgen.tokens import TokenLayout

REPO = pathlib.Path(__file__).resolve().parents[1]
SAMPLING = dict(steps=4, schedule="cosine", choice_temperature=4.5, temperature=1.0, top_k=0,
                top_p=1.0, guidance_scale=1.0, guidance_schedule="constant", order="confidence",
                recap_full_only_steps=0, recap_cheap_per_full=0)


def random_params(module, example, seed: int):
    """Random parameters of the right shapes without compiling `init` (slow on a busy CPU).

    Norm scales 1, biases 0, other tensors normal with variance 1 / fan-in.
    """
    shapes = meta.unbox(jax.eval_shape(module.init, jax.random.PRNGKey(0), example))["params"]
    rng = np.random.RandomState(seed)

    def draw(path, leaf):
        name = jax.tree_util.keystr(path[-1:])
        if "scale" in name:
            return jnp.ones(leaf.shape, leaf.dtype)
        if "bias" in name:
            return jnp.zeros(leaf.shape, leaf.dtype)
        fan_in = int(np.prod(leaf.shape[:-1])) or 1
        return jnp.asarray(rng.normal(0.0, fan_in ** -0.5, leaf.shape), leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def tiny_bundle(side: int = 8):
    """Random bundle for side x side grey images (f = 2, so side/2 x side/2 tokens)."""
    grid = side // 2
    length = 1 + grid * grid
    layout = TokenLayout(codebook_size=16, num_classes=4, null_class_id=3)
    tokenizer = VQGAN(codebook_size=16, embedding_dim=4, filters=8, num_res_blocks=1,
                      channel_multipliers=(1, 2), image_channels=1, norm_groups=4)
    transformer = Transformer(vocab_size=layout.vocab_size, hidden_size=16, num_layers=2, num_heads=2,
                              mlp_dim=32, max_len=length, dropout_rate=0.0, attention_dropout_rate=0.0)
    tok_params = random_params(tokenizer, jnp.zeros((1, side, side, 1)), seed=0)
    tf_params = random_params(transformer, jnp.zeros((1, length), jnp.int32), seed=1)
    config = ml_collections.ConfigDict(dict(sampling=dict(SAMPLING)))
    return types.SimpleNamespace(tokenizer=tokenizer, transformer=transformer, layout=layout,
                                 token_grid=(grid, grid), image_shape=(side, side, 1), config=config,
                                 params={"tokenizer": tok_params, "transformer": tf_params})


def sample_image(seed: int = 0, shape=(8, 8)) -> np.ndarray:
    """A uint8 grey image with structure (gradient + noise), so tokens vary across it."""
    rng = np.random.RandomState(seed)
    ramp = np.add.outer(np.arange(shape[0]), np.arange(shape[1])) * (255.0 / sum(shape))
    return np.clip(ramp + rng.randint(-40, 40, shape), 0, 255).astype(np.uint8)


def _save_stage(stage_dir, params):
    ckpt = ckpt_lib.StageCheckpoints(str(stage_dir))
    ckpt.save(1, {"step": jnp.int32(1), "params": params, "ema_params": params},
              {"kind": "sampler", "position": 1})
    ckpt.wait()
    ckpt.close()


def save_small_checkpoint(root) -> pathlib.Path:
    """A training workdir with the default job's layout (Fashion-MNIST config: 28x28x1 images,
    7x7 tokens) but narrow random networks, saved the way training saves them."""
    root = pathlib.Path(root)
    cfg = config_io.load_config_file(str(REPO / "configs" / "fashion_mnist.py"))
    cfg.tokenizer.update(dict(codebook_size=32, embedding_dim=8, filters=8, norm_groups=4))
    cfg.transformer.update(dict(num_layers=1, hidden_size=32, num_heads=2, mlp_dim=64))
    cfg.sampling.steps = 4
    config_io.write_config(cfg, os.fspath(root))
    size, channels = int(cfg.image_size), int(cfg.image_channels)
    _save_stage(root / "tokenizer", random_params(factory.tokenizer_model(cfg),
                                                  jnp.zeros((1, size, size, channels)), seed=0))
    _save_stage(root / "transformer", random_params(factory.transformer_model(cfg),
                                                    jnp.zeros((1, seq_len(cfg)), jnp.int32), seed=1))
    return root
