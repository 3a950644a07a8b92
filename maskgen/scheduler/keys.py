"""PRNG keys for decoding: one batch key (official) or one key per example (maskgen).

Per-example keys are `fold_in(key(seed), example_index)`, so an image depends on
its seed and global index only, never on batch size, batch position or device
count. Keys are handled as typed key arrays internally; raw uint32 keys
(`jax.random.PRNGKey`) are accepted everywhere and give the same random streams.
"""
import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike


def _is_typed_key(value: object) -> bool:
    return hasattr(value, "dtype") and jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key)


def _is_integer_scalar(value: object) -> bool:
    if isinstance(value, (bool, np.bool_)):
        return False
    if isinstance(value, (int, np.integer)):
        return True
    return (hasattr(value, "dtype") and np.ndim(value) == 0
            and jnp.issubdtype(value.dtype, jnp.integer))


def as_key_array(value: ArrayLike) -> jax.Array:
    """Seed / raw uint32 key(s) / typed key(s) -> typed key array (shape () or [B])."""
    if _is_typed_key(value):
        return value
    if _is_integer_scalar(value):
        return jax.random.key(value)
    array = value if isinstance(value, jax.Array) else np.asarray(value)
    if array.dtype == np.uint32 and array.ndim in (1, 2) and array.shape[-1] == 2:
        return jax.random.wrap_key_data(array)
    raise ValueError(
        "expected an int seed, a PRNG key (typed or raw uint32 [2]) or per-example keys "
        f"([B] typed or raw uint32 [B, 2]); got {type(value).__name__} with shape "
        f"{getattr(array, 'shape', None)} and dtype {getattr(array, 'dtype', None)}")


def example_keys(seed_or_key: ArrayLike, indices: ArrayLike) -> jax.Array:
    """Per-example keys fold_in(key(seed), index) for the given global example indices."""
    base = as_key_array(seed_or_key)
    if base.ndim != 0:
        raise ValueError(f"example_keys needs one seed or key, got keys of shape {base.shape}")
    indices = jnp.asarray(indices, jnp.int32)
    if indices.ndim != 1:
        raise ValueError(f"indices must be 1-D, got shape {indices.shape}")
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(base, indices)


def per_example_keys(key_or_keys: ArrayLike, batch_size: int) -> jax.Array:
    """[B] keys: a seed or single key is expanded to examples 0..B-1; [B] keys are used as given."""
    keys = as_key_array(key_or_keys)
    if keys.ndim == 0:
        return example_keys(keys, jnp.arange(batch_size))
    if keys.shape != (batch_size,):
        raise ValueError(f"got {keys.shape[0]} per-example keys for a batch of {batch_size}")
    return keys


def batch_key(key_or_seed: ArrayLike) -> jax.Array:
    """One key for the whole batch (official sampling)."""
    key = as_key_array(key_or_seed)
    if key.ndim != 0:
        raise ValueError(
            f"the official preset draws from one batch key; got keys of shape {key.shape}")
    return key


def step_keys(keys: jax.Array, step: ArrayLike) -> tuple[jax.Array, jax.Array]:
    """(sample, choice) key pairs of every example for decoding step `step`."""
    def split_one(key: jax.Array) -> tuple[jax.Array, jax.Array]:
        sample_key, choice_key = jax.random.split(jax.random.fold_in(key, step))
        return sample_key, choice_key
    return jax.vmap(split_one)(keys)
