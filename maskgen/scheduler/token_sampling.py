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
    use_top_k = top_k is not None and top_k < logits.shape[-1]
    use_top_p = top_p is not None and top_p < 1.
    if not (use_top_k or use_top_p):
        return logits
    # Both filters need the largest logits in order; with top-k only those k are sorted.
    if use_top_k:
        descending = lax.top_k(logits, top_k)[0]
    else:
        descending = -jnp.sort(-logits, axis=-1)
    threshold = descending[..., -1:]
    if use_top_p:
        probs = jax.nn.softmax(descending, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        threshold = jnp.min(jnp.where(mass_before < top_p, descending, jnp.inf), axis=-1,
                            keepdims=True)
    return jnp.where(logits < threshold, -jnp.inf, logits)


def gumbel(key, shape, dtype=jnp.float32):
    """jax.random.gumbel(key, shape, dtype), drawn flat and reshaped."""
    return jax.random.gumbel(key, (math.prod(shape),), dtype).reshape(shape)


def categorical(key, logits):
    """jax.random.categorical(key, logits) over the last axis (Gumbel-max), drawn flat."""
    return jnp.argmax(gumbel(key, logits.shape, logits.dtype) + logits, axis=-1)


def sample_per_example(keys, logits):
    """One categorical draw per row by inverse CDF; example b uses only keys[b].

    Returns (ids [B, n], log-probability of each drawn id [B, n]) for logits [B, n, V].
    One uniform per row instead of V Gumbel variates (Gumbel-max) makes the draw
    several times cheaper; it is the maskgen sampler (the official preset keeps
    Gumbel-max for token-exact reproduction). Tokens of probability 0 (filtered
    by top-k / top-p) are never drawn.
    """
    probs = jax.nn.softmax(logits, axis=-1)
    cdf = jnp.cumsum(probs, axis=-1)
    tiny = jnp.finfo(probs.dtype).tiny
    uniform = jax.vmap(lambda key: jax.random.uniform(key, logits.shape[1:-1], probs.dtype,
                                                      minval=tiny))(keys)
    target = uniform * cdf[..., -1]  # in (0, total]: the first id with cdf >= target
    ids = jnp.sum(cdf < target[..., None], axis=-1, dtype=jnp.int32)
    chosen = jnp.take_along_axis(probs, ids[..., None], axis=-1)[..., 0]
    # Guard against a rounding step of the prefix sum landing on a zero-probability id.
    fallback = jnp.argmax(probs, axis=-1).astype(jnp.int32)
    ids = jnp.where(chosen > 0, ids, fallback)
    chosen = jnp.where(chosen > 0, chosen, jnp.max(probs, axis=-1))
    return ids, jnp.log(chosen)


def gumbel_per_example(keys, length: int):
    """Gumbel noise [B, length], example b from keys[b]."""
    return jax.vmap(lambda key: gumbel(key, (length,)))(keys)
