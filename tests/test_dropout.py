"""maskgen.models.dropout: 8-bit-lane masks keep the stated fraction, stay unbiased, follow the key,
and do not depend on how the computation is sharded."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from maskgen.models.dropout import Dropout, drop_threshold, keep_mask, keep_probability


def test_rate_is_quantised_to_one_256th():
    assert drop_threshold(0.0) == 0 and keep_probability(0.0) == 1.0
    assert drop_threshold(0.1) == 26 and keep_probability(0.1) == pytest.approx(230 / 256)
    assert drop_threshold(0.5) == 128
    assert drop_threshold(0.001) == 1  # a nonzero rate keeps some dropout (1/256)
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="dropout rate"):
            drop_threshold(bad)


@pytest.mark.parametrize("rate", [0.1, 0.5])
def test_kept_fraction_matches_keep_probability(rate):
    mask = np.asarray(keep_mask(jax.random.key(0), (64, 3, 129), rate))  # last dim not a multiple of 4
    assert mask.shape == (64, 3, 129) and mask.dtype == bool
    n = mask.size
    sd = np.sqrt(keep_probability(rate) * (1 - keep_probability(rate)) / n)
    assert abs(mask.mean() - keep_probability(rate)) < 5 * sd
    # every lane position of a word is used (no lane stuck at always-keep)
    for lane in range(4):
        assert abs(mask[..., lane::4].mean() - keep_probability(rate)) < 10 * sd


def test_same_key_same_mask_new_key_new_mask():
    a, b = keep_mask(jax.random.key(1), (8, 33), 0.3), keep_mask(jax.random.key(1), (8, 33), 0.3)
    c = keep_mask(jax.random.key(2), (8, 33), 0.3)
    assert bool(jnp.all(a == b)) and not bool(jnp.all(a == c))


def test_module_is_unbiased_and_identity_when_deterministic():
    x = jnp.ones((256, 256))
    drop = Dropout(0.1)
    y = drop.apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(3)})
    kept = np.asarray(y) != 0
    np.testing.assert_allclose(np.asarray(y)[kept], 1.0 / keep_probability(0.1), rtol=1e-6)
    assert abs(float(jnp.mean(y)) - 1.0) < 0.01
    assert bool(jnp.all(drop.apply({}, x, deterministic=True) == x))
    assert bool(jnp.all(Dropout(0.0).apply({}, x, deterministic=False) == x))


def test_mask_does_not_depend_on_sharding():
    devices = np.array(jax.devices()[:8])
    assert devices.size == 8, "tests/conftest.py sets 8 virtual CPU devices"
    mesh = jax.sharding.Mesh(devices.reshape(4, 2), ("data", "model"))
    key = jax.random.key(7)
    plain = jax.jit(lambda k: keep_mask(k, (8, 4, 16, 17), 0.25))(key)
    sharded = jax.jit(lambda k: keep_mask(k, (8, 4, 16, 17), 0.25),
                      out_shardings=NamedSharding(mesh, P("data", "model")))(key)
    assert bool(jnp.all(plain == sharded))
