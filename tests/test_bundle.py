"""maskgen.bundle.load: workdir / stage / step paths, EMA params, clear errors."""
import json
import logging
import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from maskgen import bundle as bundle_lib
from maskgen import checkpoint as ckpt_lib
from maskgen import config_io
from maskgen.models import factory
from maskgen.models.sizes import seq_len
from maskgen.sampling import Sampler, decode_config_from

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


pytestmark = pytest.mark.usefixtures("fast_compile")  # tiny models: skip XLA optimisation passes


def _params(module, example, seed):
    return jax.jit(lambda k: nn.meta.unbox(module.init(k, example))["params"])(jax.random.key(seed))


def _scaled(tree, factor):
    return jax.tree.map(lambda x: x * factor, tree)


def _save(stage_dir, step, params, ema, config=None):
    ckpt = ckpt_lib.StageCheckpoints(stage_dir, config=config)
    ckpt.save(step, {"step": jnp.int32(step), "params": params, "ema_params": ema},
              {"kind": "sampler", "position": step})
    ckpt.wait()
    ckpt.close()


def _make_workdir(root, carry_config):
    """A debug-config workdir whose checkpoints hold freshly initialised (not trained) weights.

    `carry_config`: each step saves the config (as training does now); without it the steps look like
    ones written before steps carried their config.
    """
    cfg = config_io.load_config_file(os.path.join(REPO, "configs/debug.py"))
    config_io.write_config(cfg, str(root))
    tok, tf = factory.tokenizer_model(cfg), factory.transformer_model(cfg)
    tok_p = _params(tok, jnp.zeros((1, 16, 16, 3)), 0)
    tf_p = _params(tf, jnp.zeros((1, seq_len(cfg)), jnp.int32), 1)
    step_cfg = cfg if carry_config else None
    _save(root / "tokenizer", 4, tok_p, _scaled(tok_p, 0.5), step_cfg)
    for step in (2, 4):
        _save(root / "transformer", step, tf_p, _scaled(tf_p, 0.1 * step), step_cfg)
    return root, cfg, tok_p, tf_p


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """Steps without a config item (written before steps carried one): load reads config.json."""
    return _make_workdir(tmp_path_factory.mktemp("bundle") / "run", carry_config=False)


@pytest.fixture(scope="module")
def carried(tmp_path_factory):
    """Steps that carry their config, as every stage writes them."""
    return _make_workdir(tmp_path_factory.mktemp("bundle_carried") / "run", carry_config=True)


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


def _rewrite_config_json(root, **changes):
    """config.json replaced by one with `changes` ("block.key": value), as a later run would leave it."""
    cfg = config_io.read_config(root)
    with cfg.unlocked():
        for key, value in changes.items():
            block, name = key.split(".")
            cfg[block][name] = value
    config_io.write_config(cfg, str(root))
    return cfg


def test_each_step_carries_the_run_config_and_orbax_reads_every_item(carried):
    root, cfg, _, _ = carried
    for stage in ("tokenizer", "transformer"):
        ckpt = ckpt_lib.StageCheckpoints(root / stage, read_only=True)
        for step in ckpt.steps():
            saved = ckpt.saved_config(step)
            assert saved == json.loads(config_io.to_json(cfg))
            assert config_io.to_json(config_io.from_dict(saved)) == (root / "config.json").read_text()
    # Plain orbax, one ocp.args per item.
    restored = ocp.CheckpointManager(root / "transformer").restore(4, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(), data=ocp.args.JsonRestore(), config=ocp.args.JsonRestore()))
    assert int(restored["state"]["step"]) == 4 and restored["data"]["position"] == 4
    assert restored["config"]["transformer"]["hidden_size"] == cfg.transformer.hidden_size


def test_rewritten_config_json_still_loads_and_samples_with_the_steps_config(carried, tmp_path, caplog):
    root, cfg, _, tf_p = carried
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    hidden = cfg.transformer.hidden_size
    big = _rewrite_config_json(copy, **{"transformer.hidden_size": 2 * hidden})
    with caplog.at_level(logging.WARNING, logger="maskgen.bundle"):
        b = bundle_lib.load(copy)
    assert b.config.transformer.hidden_size == hidden and b.steps["transformer"] == 4
    _assert_tree_equal(b.params["transformer"], _scaled(tf_p, 0.4))
    warned = [r.message for r in caplog.records if r.name == "maskgen.bundle"]
    assert len(warned) == 1 and "transformer.hidden_size" in warned[0] and "step's config" in warned[0]
    out = Sampler(b, decode_config_from(b.config.sampling, b.token_grid, steps=2)).generate(
        [0, 1], seed=0, progress=False)
    assert out["images"].shape == (2, 16, 16, 3) and out["images"].dtype == np.uint8
    # A named step uses that step's config too; an explicit config= still wins (and here mismatches).
    assert bundle_lib.load(copy / "transformer" / "2").config.transformer.hidden_size == hidden
    with pytest.raises(ckpt_lib.CheckpointMismatchError):
        bundle_lib.load(copy, config=big)
    # A difference that changes no shape is not worth a warning; the step's config is still used.
    _rewrite_config_json(copy, **{"transformer.hidden_size": hidden, "sampling.steps": 3})
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="maskgen.bundle"):
        assert bundle_lib.load(copy).config.sampling.steps == cfg.sampling.steps
    assert not [r for r in caplog.records if r.name == "maskgen.bundle"]


def test_step_without_config_loads_from_config_json(workdir, tmp_path):
    root, cfg, _, _ = workdir
    assert ckpt_lib.StageCheckpoints(root / "transformer", read_only=True).saved_config(4) is None
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    _rewrite_config_json(copy, **{"sampling.steps": 3})
    assert bundle_lib.load(copy).config.sampling.steps == 3  # config.json's, the only config there is


def test_an_unreadable_newest_step_falls_back_with_the_older_steps_config(carried, tmp_path, caplog):
    root, cfg, _, tf_p = carried
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    later = config_io.read_config(copy)
    with later.unlocked():
        later.sampling.steps = 7  # a resumed run with other decoding defaults: same shapes
    _save(copy / "transformer", 6, tf_p, tf_p, later)
    assert bundle_lib.load(copy).config.sampling.steps == 7
    os.remove(copy / "transformer" / "6" / "state" / "_METADATA")
    with caplog.at_level(logging.ERROR, logger="maskgen.checkpoint"):
        b = bundle_lib.load(copy)
    assert b.steps["transformer"] == 4 and b.config.sampling.steps == cfg.sampling.steps
    assert any("step 6" in r.message for r in caplog.records)
