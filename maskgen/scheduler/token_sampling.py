"""Turning logits into sampled tokens and confidences (temperature, top-k, top-p, guidance).

Pure array functions; every option that is off is skipped at trace time so the
default path is exactly `categorical(logits)` as in the official decoder.

Random draws go through `gumbel`/`categorical` below: the same numbers as
`jax.random.gumbel`/`jax.random.categorical` (partitionable threefry counts
elements in row-major order, so a flat draw reshaped is identical), but XLA:CPU
compiles a 1-D draw several times faster than a 3-D one.
"""
import math
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import ArrayLike, DTypeLike


def guide(cond: jax.Array, uncond: jax.Array, weight: ArrayLike) -> jax.Array:
    """Classifier-free guidance uncond + w (cond - uncond), written as cond + (w-1)(cond - uncond).

    The second form is the same function but returns `cond` bit for bit at w = 1.
    """
    return cond + (weight - 1.) * (cond - uncond)


def filter_logits(logits: jax.Array, temperature: Optional[ArrayLike] = None, top_k: Optional[int] = None,
                  top_p: Optional[float] = None) -> jax.Array:
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


def gumbel(key: jax.Array, shape: Sequence[int], dtype: DTypeLike = jnp.float32) -> jax.Array:
    """jax.random.gumbel(key, shape, dtype), drawn flat and reshaped."""
    return jax.random.gumbel(key, (math.prod(shape),), dtype).reshape(shape)


def categorical(key: jax.Array, logits: jax.Array) -> jax.Array:
    """jax.random.categorical(key, logits) over the last axis (Gumbel-max), drawn flat."""
    return jnp.argmax(gumbel(key, logits.shape, logits.dtype) + logits, axis=-1)


def sample_per_example(keys: jax.Array, logits: jax.Array, block: int = 32) -> tuple[jax.Array, jax.Array]:
    """One categorical draw per row by inverse CDF; example b uses only keys[b].

    Returns (ids [B, n], log-probability of each drawn id [B, n]) for logits [B, n, V].
    One uniform per row instead of V Gumbel variates (Gumbel-max) makes the draw
    several times cheaper; it is the maskgen sampler (the official preset keeps
    Gumbel-max for token-exact reproduction). Tokens of probability 0 (filtered
    by top-k / top-p) are never drawn.
    """
    return sample_with_uniform(uniform_per_example(keys, logits.shape[1]), logits, block)


def uniform_per_example(keys: jax.Array, length: int) -> jax.Array:
    """The uniforms [B, length] sample_per_example draws (a prefix of a longer draw: same key)."""
    tiny = jnp.finfo(jnp.float32).tiny
    return jax.vmap(lambda key: jax.random.uniform(key, (length,), jnp.float32, minval=tiny))(keys)


def _prefix_sum(x: jax.Array) -> jax.Array:
    """Inclusive prefix sum over a short last axis as a matmul with a triangle of ones.

    XLA:CPU lowers jnp.cumsum to a reduce-window, slower than this tiny matmul.
    """
    n = x.shape[-1]
    upper = jnp.asarray(np.triu(np.ones((n, n), np.float32)), x.dtype)
    return jnp.matmul(x, upper, precision=lax.Precision.HIGHEST)


def sample_with_uniform(uniform: jax.Array, logits: jax.Array, block: int = 32) -> tuple[jax.Array, jax.Array]:
    """sample_per_example with its uniforms [B, n] given (drawn ahead, outside the decoding loop).

    The CDF is searched in two levels, blocks of `block` ids then ids inside the
    chosen block: the same id as a search of the flat CDF (up to float rounding)
    without a prefix sum over the whole vocabulary, which XLA:CPU computes
    slowly (the flat form cost ~2x the whole rest of a decoding step).
    """
    batch, rows, vocab = logits.shape
    weights = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))  # unnormalised, max 1
    pad = (-vocab) % block
    if pad:
        weights = jnp.pad(weights, ((0, 0), (0, 0), (0, pad)))
    blocks = weights.reshape(batch, rows, -1, block)
    mass = jnp.sum(blocks, axis=-1)  # [B, n, V / block]
    block_cdf = _prefix_sum(mass)
    total = block_cdf[..., -1]
    target = uniform.astype(weights.dtype) * total  # in (0, total]: the first id whose cdf reaches it
    chosen_block = jnp.minimum(jnp.sum(block_cdf < target[..., None], axis=-1, dtype=jnp.int32),
                               mass.shape[-1] - 1)
    before = jnp.take_along_axis(block_cdf - mass, chosen_block[..., None], axis=-1)
    inner = jnp.take_along_axis(blocks, chosen_block[..., None, None], axis=2)[:, :, 0]  # [B, n, block]
    inner_cdf = before + _prefix_sum(inner)
    offset = jnp.minimum(jnp.sum(inner_cdf < target[..., None], axis=-1, dtype=jnp.int32), block - 1)
    chosen = jnp.take_along_axis(inner, offset[..., None], axis=-1)[..., 0]
    # Rounding may land on a zero-weight id: take the block's most likely id instead.
    offset = jnp.where(chosen > 0, offset, jnp.argmax(inner, axis=-1).astype(jnp.int32))
    chosen = jnp.where(chosen > 0, chosen, jnp.max(inner, axis=-1))
    return chosen_block * block + offset, jnp.log(chosen) - jnp.log(total)


def gumbel_per_example(keys: jax.Array, length: int) -> jax.Array:
    """Gumbel noise [B, length], example b from keys[b]."""
    return jax.vmap(lambda key: gumbel(key, (length,)))(keys)
