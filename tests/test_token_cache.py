"""The pre-tokenised training split: built once, reused while the setup matches, moved with its workdir."""
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from maskgen import sharding as shd
from maskgen.training import iterators, token_cache


def _cfg(examples: int = 24) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        seed=3, num_classes=4, image_size=8, image_channels=1,
        dataset=dict(name=iterators.SYNTHETIC, data_dir=None, train_split="train", random_flip=False,
                     synthetic_examples=examples, max_examples=None)))


class CountingEncoder:
    """Token ids from 2x2 mean pooling, quantised to 16 levels; counts its calls."""

    def __init__(self):
        self.calls = 0
        self._fn = jax.jit(lambda x: jnp.clip(
            (x.reshape(x.shape[0], 4, 2, 4, 2).mean((2, 4)) * 16).astype(jnp.int32), 0, 15))

    def __call__(self, images):
        self.calls += 1
        return self._fn(images)


def _build(cfg, workdir, encoder, tokenizer_step=5):
    mesh = shd.make_mesh({"data": -1}, jax.devices()[:1])
    return token_cache.build_or_load(cfg, str(workdir), encoder, mesh, 8, (4, 4),
                                     str(workdir / "tokenizer"), tokenizer_step)


def test_the_cache_holds_the_encoded_split_and_is_reused(tmp_path):
    cfg, encoder = _cfg(), CountingEncoder()
    arrays = _build(cfg, tmp_path, encoder)
    pairs = [iterators.synthetic_image(cfg.seed, i, cfg.num_classes, cfg.image_size, cfg.image_channels)
             for i in range(24)]
    images = np.stack([p[0] for p in pairs])
    expected = np.clip((images.reshape(24, 4, 2, 4, 2).mean((2, 4)) * 16).astype(np.int32), 0, 15)
    np.testing.assert_array_equal(arrays["tokens"], expected.reshape(24, 16))
    np.testing.assert_array_equal(arrays["labels"], [p[1] for p in pairs])
    built_calls = encoder.calls
    assert built_calls == 3  # 24 examples in batches of 8

    again = _build(cfg, tmp_path, encoder)
    assert encoder.calls == built_calls  # read from disk, nothing encoded
    np.testing.assert_array_equal(again["tokens"], arrays["tokens"])


def test_a_copied_workdir_keeps_its_cache_but_a_retrained_tokenizer_rebuilds_it(tmp_path):
    cfg, encoder = _cfg(), CountingEncoder()
    first = _build(cfg, tmp_path / "run", encoder)
    shutil.copytree(tmp_path / "run", tmp_path / "copy")
    calls = encoder.calls
    copied = _build(cfg, tmp_path / "copy", encoder)
    assert encoder.calls == calls
    np.testing.assert_array_equal(copied["tokens"], first["tokens"])

    _build(cfg, tmp_path / "copy", encoder, tokenizer_step=6)  # another tokenizer checkpoint
    assert encoder.calls == 2 * calls


@pytest.mark.parametrize("tokenizer_dir, workdir, expected", [
    ("/runs/a/tokenizer", "/runs/a", "tokenizer"),
    ("/runs/a/tokenizer", "/runs/a/", "tokenizer"),
    ("/runs/ab/tokenizer", "/runs/a", "/runs/ab/tokenizer"),  # a sibling that shares a prefix
    ("/elsewhere/tokenizer", "/runs/a", "/elsewhere/tokenizer"),
    ("gs://bucket/run/tokenizer", "gs://bucket/run", "tokenizer"),
])
def test_tokenizer_reference(tokenizer_dir, workdir, expected):
    assert token_cache.tokenizer_reference(tokenizer_dir, workdir) == expected
