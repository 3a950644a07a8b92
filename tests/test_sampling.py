"""Sampler: batch-size independence, determinism, pixels = tokenizer(tokens), ReCAP path, bad labels."""
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.core import meta

from maskgen.image_grid import make_grid, save_npz, save_png
from maskgen.models.transformer import Transformer
from maskgen.models.vqgan import VQGAN
from maskgen.sampling import Sampler, decode_config_from, recap_config_from
from maskgen.tokens import TokenLayout


@pytest.fixture(scope="module")
def bundle():
    layout = TokenLayout(codebook_size=16, num_classes=4, null_class_id=3)
    tok = VQGAN(codebook_size=16, embedding_dim=4, filters=8, num_res_blocks=1, channel_multipliers=(1, 2),
                image_channels=1, norm_groups=4)
    tf = Transformer(vocab_size=layout.vocab_size, hidden_size=16, num_layers=2, num_heads=2, mlp_dim=32,
                     max_len=17, dropout_rate=0.0, attention_dropout_rate=0.0)
    tp = meta.unbox(tok.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1))))["params"]
    xp = meta.unbox(tf.init(jax.random.PRNGKey(1), jnp.zeros((1, 17), jnp.int32)))["params"]
    return types.SimpleNamespace(tokenizer=tok, transformer=tf, layout=layout, token_grid=(4, 4),
                                 image_shape=(8, 8, 1), params={"tokenizer": tp, "transformer": xp})


SAMPLING = dict(steps=4, schedule="cosine", choice_temperature=4.5, temperature=1.0, top_k=0, top_p=1.0,
                guidance_scale=2.0, guidance_schedule="constant", order="confidence",
                recap_full_only_steps=1, recap_cheap_per_full=0)


def test_samples_do_not_depend_on_batch_size(bundle):
    sampler = Sampler(bundle, decode_config_from(SAMPLING, bundle.token_grid))
    a = sampler.generate([0, 1, 2, 0, 1], seed=3, batch_size=5, progress=False)
    b = sampler.generate([0, 1, 2, 0, 1], seed=3, batch_size=2, progress=False)
    np.testing.assert_array_equal(a["tokens"], b["tokens"])
    np.testing.assert_array_equal(a["images"], b["images"])
    assert a["images"].shape == (5, 8, 8, 1) and a["images"].dtype == np.uint8
    assert a["tokens"].shape == (5, 4, 4) and a["tokens"].min() >= 0 and a["tokens"].max() < 16
    np.testing.assert_array_equal(a["labels"], [0, 1, 2, 0, 1])
    c = sampler.generate([0, 1, 2, 0, 1], seed=4, batch_size=5, progress=False)
    assert (c["tokens"] != a["tokens"]).any()


def test_images_are_the_tokenizer_decode_of_the_tokens(bundle):
    sampler = Sampler(bundle, decode_config_from(SAMPLING, bundle.token_grid, guidance_scale=None))
    out = sampler.generate([1, 2], seed=0, progress=False)
    ref = bundle.tokenizer.apply({"params": bundle.params["tokenizer"]}, jnp.asarray(out["tokens"]),
                                 method="decode_from_indices")
    ref = np.round(np.clip(np.asarray(ref), 0, 1) * 255).astype(np.uint8)
    assert np.abs(ref.astype(int) - out["images"].astype(int)).max() <= 1


def test_recap_sampler_runs_and_fills_every_token(bundle):
    cfg = decode_config_from(SAMPLING, bundle.token_grid, steps=6)
    recap = recap_config_from(SAMPLING, recap_cheap_per_full=1)
    assert recap is not None and recap.cheap_steps == 1 and recap.full_only_steps == 1
    assert recap_config_from(SAMPLING) is None
    out = Sampler(bundle, cfg, recap).generate([0, 1, 2], seed=0, progress=False)
    assert out["tokens"].min() >= 0 and out["tokens"].max() < 16


def test_unknown_class_raises(bundle):
    sampler = Sampler(bundle, decode_config_from(SAMPLING, bundle.token_grid))
    with pytest.raises(ValueError, match="class id 3 out of range"):
        sampler.generate([0, 3], progress=False)  # 3 is the null class


def test_grid_layout_and_atomic_files(tmp_path):
    images = np.stack([np.full((2, 3, 1), i, np.uint8) for i in range(5)])
    grid = make_grid(images, rows=2, pad=1, pad_value=255)
    assert grid.shape == (2 * 3 + 1, 3 * 4 + 1, 1)
    assert grid[1, 1, 0] == 0 and grid[1, 5, 0] == 1 and grid[4, 1, 0] == 3 and grid[4, 9, 0] == 255
    save_png(grid, tmp_path / "g.png", scale=2)
    save_npz(tmp_path / "s.npz", images=images)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.png", "s.npz"]
    with pytest.raises(ValueError, match="uint8"):
        make_grid(images.astype(np.float32), rows=1)
