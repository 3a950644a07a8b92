"""config.prng_impl: every implementation gives deterministic dropout masks through the key it is handed;
threefry's masks do not depend on the sharding (the others promise nothing there)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from maskgen import prng
from maskgen.models.dropout import Dropout, keep_mask, keep_probability


@pytest.mark.parametrize("impl", prng.PRNG_IMPLS)
def test_masks_are_deterministic_per_implementation(impl):
    key = prng.make_key(3, impl)
    assert prng.key_impl_name(key) == impl
    draw = jax.jit(lambda k: keep_mask(k, (4, 2, 33, 35), 0.25))
    a, b = np.asarray(draw(key)), np.asarray(draw(prng.make_key(3, impl)))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, np.asarray(draw(prng.make_key(4, impl))))
    assert not np.array_equal(a, np.asarray(draw(jax.random.fold_in(key, 1))))
    assert abs(a.mean() - keep_probability(0.25)) < 0.02
    # Through flax's make_rng (the transformer's dropout path) the key's implementation is kept.
    x = jnp.ones((8, 64))
    y1 = Dropout(0.5).apply({}, x, deterministic=False, rngs={"dropout": key})
    y2 = Dropout(0.5).apply({}, x, deterministic=False, rngs={"dropout": prng.make_key(3, impl)})
    np.testing.assert_array_equal(np.asarray(y1), np.asarray(y2))


def test_the_masks_come_from_the_chosen_generator():
    masks = {impl: np.asarray(keep_mask(prng.make_key(0, impl), (64, 64), 0.5)) for impl in prng.PRNG_IMPLS}
    for impl in prng.PRNG_IMPLS:
        if impl != "threefry2x32":
            assert not np.array_equal(masks[impl], masks["threefry2x32"]), impl


def test_threefry_masks_are_equal_on_1_and_8_devices():
    devices = np.array(jax.devices()[:8])
    assert devices.size == 8, "tests/conftest.py sets 8 virtual CPU devices"
    mesh = jax.sharding.Mesh(devices.reshape(4, 2), ("data", "model"))
    key = prng.make_key(7, "threefry2x32")

    def draw(k):
        return keep_mask(k, (8, 4, 16, 17), 0.25)
    plain = jax.jit(draw)(key)
    sharded = jax.jit(draw, out_shardings=NamedSharding(mesh, P("data", "model")))(key)
    assert len(sharded.sharding.device_set) == 8
    np.testing.assert_array_equal(np.asarray(plain), np.asarray(sharded))


def test_bad_name_and_configure():
    with pytest.raises(ValueError, match=r"prng_impl='bogus' is not one of"):
        prng.check_prng_impl("bogus")
    old = jax.config.jax_default_prng_impl
    try:
        prng.configure("rbg")
        assert prng.key_impl_name(jax.random.key(0)) == "rbg"
    finally:
        jax.config.update("jax_default_prng_impl", old)
    assert prng.key_impl_name(jax.random.key(0)) == old


def test_transformer_dropout_with_an_rbg_key():
    from maskgen.models.transformer import Transformer
    model = Transformer(vocab_size=11, hidden_size=16, num_layers=1, num_heads=2, mlp_dim=32, max_len=9)
    ids = jnp.zeros((2, 9), jnp.int32)
    variables = nn.unbox(model.init(jax.random.key(0), ids))

    def run(seed, impl):
        return np.asarray(model.apply(variables, ids, deterministic=False,
                                      rngs={"dropout": prng.make_key(seed, impl)}))
    np.testing.assert_array_equal(run(1, "rbg"), run(1, "rbg"))
    assert not np.array_equal(run(1, "rbg"), run(1, "threefry2x32"))


def test_training_keys_use_config_prng_impl(tmp_path):
    from maskgen import config_io
    from maskgen.training import rng, trainer
    for impl in ("threefry2x32", "rbg"):
        assert prng.key_impl_name(rng.key(3, "transformer_step", impl)) == impl
    assert not np.array_equal(jax.random.key_data(rng.key(3, "transformer_step")),
                              jax.random.key_data(rng.key(3, "transformer_init")))
    cfg = config_io.load_config_file("configs/debug.py")
    cfg.prng_impl = "unsafe_rbg"
    mesh = trainer.make_mesh(cfg)
    info = trainer.record_accelerator_settings(cfg, mesh, str(tmp_path))
    assert info["prng_impl"] == "unsafe_rbg" and info["attention_train"] == "scan"  # auto on CPU
    assert (tmp_path / trainer.ACCELERATOR_FILE).exists()
    cfg.prng_impl = "philox"
    with pytest.raises(ValueError, match="prng_impl='philox'"):
        trainer.record_accelerator_settings(cfg, mesh, str(tmp_path))
