"""maskgen.bundle.load: workdir / stage / step paths, EMA params, clear errors."""
import logging
import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maskgen import bundle as bundle_lib
from maskgen import checkpoint as ckpt_lib
from maskgen import config_io
from maskgen.models import factory
from maskgen.models.sizes import seq_len

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


pytestmark = pytest.mark.usefixtures("fast_compile")  # tiny models: skip XLA optimisation passes


def _params(module, example, seed):
    return jax.jit(lambda k: nn.meta.unbox(module.init(k, example))["params"])(jax.random.key(seed))


def _scaled(tree, factor):
    return jax.tree.map(lambda x: x * factor, tree)


def _save(stage_dir, step, params, ema):
    ckpt = ckpt_lib.StageCheckpoints(stage_dir)
    ckpt.save(step, {"step": jnp.int32(step), "params": params, "ema_params": ema},
              {"kind": "sampler", "position": step})
    ckpt.wait()
    ckpt.close()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A debug-config workdir whose checkpoints hold freshly initialised (not trained) weights."""
    cfg = config_io.load_config_file(os.path.join(REPO, "configs/debug.py"))
    root = tmp_path_factory.mktemp("bundle") / "run"
    config_io.write_config(cfg, str(root))
    tok, tf = factory.tokenizer_model(cfg), factory.transformer_model(cfg)
    tok_p = _params(tok, jnp.zeros((1, 16, 16, 3)), 0)
    tf_p = _params(tf, jnp.zeros((1, seq_len(cfg)), jnp.int32), 1)
    _save(root / "tokenizer", 4, tok_p, _scaled(tok_p, 0.5))
    for step in (2, 4):
        _save(root / "transformer", step, tf_p, _scaled(tf_p, 0.1 * step))
    return root, cfg, tok_p, tf_p


def _assert_tree_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_load_workdir_gives_ema_params_and_working_modules(workdir):
    root, cfg, tok_p, tf_p = workdir
    b = bundle_lib.load(root)
    assert b.steps == {"tokenizer": 4, "transformer": 4}
    _assert_tree_equal(b.params["tokenizer"], _scaled(tok_p, 0.5))
    _assert_tree_equal(b.params["transformer"], _scaled(tf_p, 0.4))
    assert b.image_shape == (16, 16, 3) and b.token_grid == (4, 4)
    assert b.layout.vocab_size == 32 + 4 + 1 + 1 and b.layout.null_class_id == 4
    assert b.config.transformer.hidden_size == cfg.transformer.hidden_size
    ids = jnp.full((2, 17), b.layout.mask_id, jnp.int32).at[:, 0].set(b.layout.class_token([0, 1]))
    logits = b.transformer.apply({"params": b.params["transformer"]}, ids, num_logits=32)
    assert logits.shape == (2, 17, 32)
    images = b.tokenizer.apply({"params": b.params["tokenizer"]}, jnp.zeros((2, 4, 4), jnp.int32),
                               method="decode_from_indices")
    assert images.shape == (2, 16, 16, 3)


def test_load_stage_or_step_directory(workdir):
    root, _, _, tf_p = workdir
    assert bundle_lib.load(root / "transformer").steps["transformer"] == 4
    b = bundle_lib.load(root / "transformer" / "2")
    assert b.steps == {"tokenizer": 4, "transformer": 2}
    _assert_tree_equal(b.params["transformer"], _scaled(tf_p, 0.2))


def test_clear_errors(workdir, tmp_path, caplog):
    root, cfg, _, _ = workdir
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    # Another config: the mismatched parameter is named.
    cfg_big = config_io.read_config(copy)
    with cfg_big.unlocked():
        cfg_big.transformer.mlp_dim = 128
    with pytest.raises(ckpt_lib.CheckpointMismatchError,
                       match=r"intermediate_output/bias' has shape \(64,\)"):
        bundle_lib.load(copy, config=cfg_big)
    # A corrupt latest transformer step: logged, the previous step is used.
    os.remove(copy / "transformer" / "4" / "state" / "_METADATA")
    with caplog.at_level(logging.ERROR, logger="maskgen.checkpoint"):
        assert bundle_lib.load(copy).steps["transformer"] == 2
    assert any("step 4" in r.message for r in caplog.records)
    # No config.json: ask for the config; given the file, it loads.
    os.remove(copy / "config.json")
    with pytest.raises(ValueError, match="has no config.json; pass config="):
        bundle_lib.load(copy)
    assert bundle_lib.load(copy, config=os.path.join(REPO, "configs/debug.py")).steps["tokenizer"] == 4
    shutil.rmtree(copy / "tokenizer")
    with pytest.raises(ValueError, match="missing checkpoint directory .*tokenizer"):
        bundle_lib.load(copy, config=cfg)
    with pytest.raises(ValueError, match="no such directory"):
        bundle_lib.load(tmp_path / "nowhere")
