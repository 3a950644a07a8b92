"""A tiny random model bundle for the editing tests: 8x8 grey images, 4x4 tokens (f = 2)."""
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax.core import meta

from maskgen.models.transformer import Transformer
from maskgen.models.vqgan import VQGAN
from maskgen.tokens import TokenLayout

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
