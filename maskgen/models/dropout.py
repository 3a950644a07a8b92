"""Dropout whose random mask costs a quarter of the random words flax's does.

Why: `flax.linen.Dropout` draws one 32-bit threefry word per element. On
XLA:CPU threefry makes ~90M words/s on two cores, so at the medium preset
(batch 32, 8 layers, [B, H, 257, 257] attention probabilities) the masks alone
took ~40% of the training step (bench/README.md, "train step"). Here each
32-bit word is split into four 8-bit lanes and an element is kept when its
lane is >= round(rate * 256). The rate is therefore quantised to 1/256 (0.1
becomes 26/256 = 0.1016, a nonzero rate never rounds to 0); kept elements are scaled by the *actual* 1 / keep
probability, so the layer stays unbiased. Threefry stays the generator, so
masks are the same under any sharding (`jax_threefry_partitionable`).
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

LANES = 4  # 8-bit lanes per 32-bit random word


def drop_threshold(rate: float) -> int:
    """Lane values below this are dropped (a nonzero rate never rounds to no dropout)."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"dropout rate must lie in [0, 1), got {rate}")
    if rate == 0.0:
        return 0
    return min(max(int(round(rate * 256)), 1), 255)


def keep_probability(rate: float) -> float:
    """The keep probability the quantised threshold actually gives."""
    return 1.0 - drop_threshold(rate) / 256.0


def keep_mask(key: jax.Array, shape: tuple[int, ...], rate: float) -> jax.Array:
    """Boolean mask of `shape`, True with probability `keep_probability(rate)`."""
    *lead, last = shape
    words = jax.random.bits(key, (*lead, -(-last // LANES)), jnp.uint32)
    lanes = lax.bitcast_convert_type(words, jnp.uint8).reshape(*lead, -1)[..., :last]
    return lanes >= jnp.uint8(drop_threshold(rate))


def apply_keep(x: jax.Array, keep: jax.Array | None, keep_prob: float) -> jax.Array:
    """Inverted dropout with a given mask: kept entries / keep_prob, dropped ones 0."""
    if keep is None:
        return x
    return jnp.where(keep, x * jnp.asarray(1.0 / keep_prob, x.dtype), jnp.zeros_like(x))


class Dropout(nn.Module):
    """Inverted dropout with `keep_mask`; a drop-in for `nn.Dropout` (no parameters)."""
    rate: float
    rng_collection: str = "dropout"

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
        if deterministic or self.rate == 0.0:
            return x
        keep = keep_mask(self.make_rng(self.rng_collection), x.shape, self.rate)
        return apply_keep(x, keep, keep_probability(self.rate))
