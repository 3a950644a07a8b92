"""`config.prng_impl`: the jax PRNG every key of a run is made with (dropout masks included).

Why selectable: threefry2x32 (jax's default) is counter-based and, with
`jax_threefry_partitionable` (on by default), gives the same bits for a key
whatever the sharding: masks on 1 and 8 devices are equal. It is slow to
compile and to run on TPU; `rbg` / `unsafe_rbg` use XLA's RngBitGenerator
(fast on TPU and GPU), but their bits depend on the backend and, for a
sharded draw, on the sharding: a run is reproducible only on the same
backend and mesh. `unsafe_rbg` also derives split/fold_in keys with a cheap
hash, and on TPU wants the libtpu flag in `LIBTPU_FLAGS`, which lets XLA
partition the bit generator per shard (MaxText sets it too).

Dropout (`maskgen.models.dropout.keep_mask`) draws `jax.random.bits` from the
key it is given, so the implementation follows the key: the trainer makes its
keys with `make_key(seed, cfg.prng_impl)` (or `configure(cfg.prng_impl)` sets
jax's default for every key the process creates).
"""
import os

import jax

# The implementations jax 0.10.2 registers (jax.random.key(..., impl=NAME)).
PRNG_IMPLS = ("threefry2x32", "threefry4x32", "philox2x32", "philox4x32", "rbg", "unsafe_rbg")
DEFAULT = "threefry2x32"
# libtpu flags per implementation (the MaxText setting for unsafe_rbg).
LIBTPU_FLAGS = {"unsafe_rbg": ("--xla_tpu_spmd_rng_bit_generator_unsafe=true",)}


def check_prng_impl(name: str) -> str:
    """The name itself, or a ValueError naming the config key."""
    try:
        jax.random.key_impl(jax.random.key(0, impl=name))
    except (ValueError, TypeError):
        raise ValueError(f"prng_impl={name!r} is not one of {PRNG_IMPLS}") from None
    return name


def make_key(seed: int, impl: str = DEFAULT) -> jax.Array:
    """A typed key of implementation `impl` (config.prng_impl)."""
    return jax.random.key(seed, impl=check_prng_impl(impl))


def key_impl_name(key: jax.Array) -> str:
    """The implementation name of a typed key (for logs and run summaries)."""
    return str(jax.random.key_impl(key))


def configure(impl: str) -> None:
    """Make `impl` jax's default PRNG, and add its libtpu flags while libtpu has not started.

    Why the default too: helpers that call `jax.random.key(seed)` without an
    `impl` (initialisation, sampling) then use the configured generator.
    The libtpu flags only act if set before the TPU backend initialises.
    """
    jax.config.update("jax_default_prng_impl", check_prng_impl(impl))
    flags = LIBTPU_FLAGS.get(impl, ())
    current = os.environ.get("LIBTPU_INIT_ARGS", "")
    missing = [f for f in flags if f.split("=")[0] not in current]
    if missing:
        os.environ["LIBTPU_INIT_ARGS"] = " ".join([current, *missing]).strip()
