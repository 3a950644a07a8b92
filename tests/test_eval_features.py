"""Sharded batched evaluation: same numbers as one big call, batch split over all devices."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maskgen.eval import features, reconstruction


def _apply(params, batch):
    return {"sum": jnp.sum(batch * params["w"], axis=(1, 2)), "first": batch[:, 0, 0]}


def test_batched_apply_matches_direct_call_with_padding():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(21, 3, 4)).astype(np.float32)
    params = {"w": rng.normal(size=(4,)).astype(np.float32)}
    # 21 rows, batch 5 -> rounded up to 8 (the device count): 3 batches, the last padded.
    out = features.batched_apply(_apply, params, x, batch_size=5, progress=False)
    expected = _apply(params, x)
    np.testing.assert_allclose(out["sum"], expected["sum"], rtol=1e-6)
    np.testing.assert_array_equal(out["first"], x[:, 0, 0])


def test_sharded_step_splits_the_batch_over_every_device():
    assert jax.device_count() == 8  # tests/conftest.py
    mesh = features.data_mesh()
    step = features.sharded_step(_apply, mesh)
    assert features.sharded_step(_apply, mesh) is step  # compiled once, reused
    batch = jax.device_put(np.ones((16, 3, 4), np.float32),
                           jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))
    out = step({"w": np.ones(4, np.float32)}, batch)["sum"]
    assert len(out.sharding.device_set) == 8
    assert [s.data.shape for s in out.addressable_shards] == [(2,)] * 8
    np.testing.assert_array_equal(np.asarray(out), np.full(16, 12.0))


def test_batched_apply_rejects_empty_input():
    with pytest.raises(ValueError, match="non-empty"):
        features.batched_apply(_apply, {"w": np.ones(4)}, np.zeros((0, 3, 4)), 4)


def test_reconstruction_error_known_values():
    images = np.random.default_rng(1).integers(1, 255, size=(10, 8, 8, 3)).astype(np.uint8)
    perfect = reconstruction.reconstruction_error(images, lambda b: b, batch_size=3)
    assert perfect["mse"] == 0.0 and perfect["psnr"] == float("inf")
    off_by_one = reconstruction.reconstruction_error(images, lambda b: b.astype(np.float32) + 1, batch_size=4)
    assert off_by_one["mse"] == pytest.approx(1.0)
    assert off_by_one["psnr"] == pytest.approx(20 * np.log10(255.0))
    assert off_by_one["psnr_per_image"] == pytest.approx(20 * np.log10(255.0))
    # Out-of-range outputs are clipped like a saved image would be: 255 -> error 0 at 255.
    white = np.full((2, 4, 4), 255, np.uint8)
    assert reconstruction.reconstruction_error(white, lambda b: b + 50.0)["mse"] == 0.0
    with pytest.raises(ValueError, match="shape"):
        reconstruction.reconstruction_error(images, lambda b: b[:, :4])
