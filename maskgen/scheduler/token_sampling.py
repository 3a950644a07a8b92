"""Turning logits into sampled tokens and confidences (temperature, top-k, top-p, guidance).

Pure array functions; every option that is off is skipped at trace time so the
default path is exactly `categorical(logits)` as in the official decoder.

Random draws go through `gumbel`/`categorical` below: the same numbers as
`jax.random.gumbel`/`jax.random.categorical` (partitionable threefry counts
elements in row-major order, so a flat draw reshaped is identical), but XLA:CPU
compiles a 1-D draw several times faster than a 3-D one.
"""
import math

import jax
import jax.numpy as jnp
from jax import lax


def guide(cond, uncond, weight):
    """Classifier-free guidance uncond + w (cond - uncond), written as cond + (w-1)(cond - uncond).

    The second form is the same function but returns `cond` bit for bit at w = 1.
    """
    return cond + (weight - 1.) * (cond - uncond)


def filter_logits(logits, temperature=None, top_k=None, top_p=None):
    """Sampling logits: divided by `temperature`, then restricted to the top-k / top-p set.

    `temperature` may be a traced scalar; None skips the division. `top_k` (static int)
    keeps the k largest logits; `top_p` keeps the smallest set of most likely tokens
    whose probability reaches p (always at least one). Removed tokens get -inf.
    """
    if temperature is not None:
        logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth_largest = lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth_largest, -jnp.inf, logits)
    if top_p is not None and top_p < 1.:
        descending = -jnp.sort(-logits, axis=-1)
        probs = jax.nn.softmax(descending, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        kept = mass_before < top_p
        threshold = jnp.min(jnp.where(kept, descending, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return logits


def gumbel(key, shape, dtype=jnp.float32):
    """jax.random.gumbel(key, shape, dtype), drawn flat and reshaped."""
    return jax.random.gumbel(key, (math.prod(shape),), dtype).reshape(shape)


def categorical(key, logits):
    """jax.random.categorical(key, logits) over the last axis (Gumbel-max), drawn flat."""
    return jnp.argmax(gumbel(key, logits.shape, logits.dtype) + logits, axis=-1)


def sample_per_example(keys, logits):
    """One categorical draw per row, example b using only keys[b]: ids [B, n] from logits [B, n, V]."""
    return jax.vmap(categorical)(keys, logits)


def log_prob_of(logits, ids):
    """log softmax(logits) at `ids`: [B, n] from logits [B, n, V] and ids [B, n]."""
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    return jnp.take_along_axis(log_probs, ids[..., None], axis=-1)[..., 0]


def gumbel_per_example(keys, length: int):
    """Gumbel noise [B, length], example b from keys[b]."""
    return jax.vmap(lambda key: gumbel(key, (length,)))(keys)
