"""Orbax stage checkpoints: mesh changes, corrupt steps, config mismatches, retention."""
import glob
import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from maskgen import checkpoint as ckpt_lib
from maskgen import config_io
from maskgen import sharding as shd
from maskgen.models.factory import transformer_from_block
from maskgen.models.sizes import seq_len, token_layout
from maskgen.training import optimizer, train_state, trainer
from maskgen.training import transformer_step as tst

pytestmark = pytest.mark.usefixtures("fast_compile")  # tiny models: skip XLA optimisation passes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEBUG = config_io.load_config_file(os.path.join(REPO, "configs/debug.py"))


def _mesh(data, fsdp, tensor=1):
    return shd.make_mesh(dict(data=data, fsdp=fsdp, tensor=tensor), jax.devices()[:data * fsdp * tensor])


def _parts(mlp_dim=64):
    cfg = config_io.load_config_file("configs/debug.py")
    cfg.transformer.update(dict(num_layers=1, mlp_dim=mlp_dim))
    layout, length = token_layout(cfg), seq_len(cfg)
    model = transformer_from_block(cfg.transformer, layout, length)
    tx, lr = optimizer.adamw(cfg.transformer_train, 10)
    step_fn = tst.make_train_step(model, layout, tx, lr, cfg.transformer_train, 0.9)
    return cfg, layout, length, step_fn, tst.make_init(model, tx, length)


def _batch(layout, length, mesh):
    rng = np.random.default_rng(3)
    local = dict(tokens=rng.integers(0, layout.codebook_size, (8, length - 1)).astype(np.int32),
                 label=rng.integers(0, layout.num_real_classes, (8,)).astype(np.int32))
    return shd.global_batch(local, mesh)


def _step(step_fn, shardings, mesh):
    batch_sh = {"tokens": shd.batch_sharding(mesh, 2), "label": shd.batch_sharding(mesh, 1)}
    return shd.jit_sharded(step_fn, (shardings, batch_sh, shd.replicated(mesh)),
                           (shardings, shd.replicated(mesh)), donate_argnums=(0,))


def test_save_on_4x2_restore_on_8x1_and_continue(tmp_path):
    _, layout, length, step_fn, init = _parts()
    mesh_a, mesh_b = _mesh(4, 2), _mesh(8, 1)
    key = jax.random.key(1)
    state, sh_a, abstract = train_state.init_sharded(init, jax.random.key(0), mesh_a)
    step_a = _step(step_fn, sh_a, mesh_a)
    state, _ = step_a(state, _batch(layout, length, mesh_a), key)
    fsdp_sharded = state.params["TransformerLayer_0"]["Mlp_0"]["intermediate_output"]["kernel"]
    assert fsdp_sharded.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")  # (embed, mlp)

    ckpt = ckpt_lib.StageCheckpoints(tmp_path / "transformer")
    ckpt.save(1, state.to_tree(), {"kind": "sampler", "position": 1}, {"loss": 1.0})
    ckpt.wait()
    saved = jax.device_get(state.to_tree())

    # Restore onto a different mesh shape: arrays arrive with the new mesh's shardings.
    _, sh_b = train_state.abstract_and_shardings(init, mesh_b)
    target = train_state.sharded_abstract(abstract, sh_b).to_tree()
    tree, data_state, step = ckpt_lib.StageCheckpoints(tmp_path / "transformer").restore(target)
    assert step == 1 and data_state["position"] == 1
    restored = train_state.TrainState.from_tree(tree)
    kernel = restored.params["TransformerLayer_0"]["Mlp_0"]["intermediate_output"]["kernel"]
    assert kernel.sharding.mesh.shape == mesh_b.shape
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, None)
    for a, b in zip(jax.tree.leaves(jax.device_get(tree)), jax.tree.leaves(saved)):
        np.testing.assert_array_equal(a, b)

    # Continue on 8x1; it matches continuing on 4x2.
    new_b, metrics_b = _step(step_fn, sh_b, mesh_b)(restored, _batch(layout, length, mesh_b), key)
    new_a, metrics_a = step_a(state, _batch(layout, length, mesh_a), key)
    assert int(new_b.step) == 2
    np.testing.assert_allclose(float(metrics_b["loss"]), float(metrics_a["loss"]), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(jax.device_get(new_b.params)),
                    jax.tree.leaves(jax.device_get(new_a.params))):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def _tiny_tree(value):
    return {"step": jnp.int32(value), "params": {"w": jnp.full((32, 4), float(value)), "b": jnp.zeros((4,))}}


def _target():
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=dev), _tiny_tree(0))


def _save_steps(directory, steps, losses=None, config=DEBUG):
    """Steps as training writes them (with the `config` item unless config=None)."""
    ckpt = ckpt_lib.StageCheckpoints(directory, keep=2, config=config)
    for i, s in enumerate(steps):
        metrics = None if losses is None else {"loss": losses[i]}
        ckpt.save(s, _tiny_tree(s), {"kind": "sampler", "position": s}, metrics)
    ckpt.wait()
    ckpt.close()


# Orbax's reader threads may leave an asyncio loop callback behind after a failed read.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage", ["truncate", "scribble", "drop_metadata", "drop_item"])
def test_corrupt_latest_step_falls_back_to_previous(tmp_path, caplog, damage):
    directory = tmp_path / "stage"
    _save_steps(directory, [2, 4])
    step_dir = directory / "4"
    data_files = glob.glob(str(step_dir / "state" / "**" / "d" / "*"), recursive=True)
    assert data_files
    if damage == "truncate":
        for f in data_files:
            os.truncate(f, 3)
    elif damage == "scribble":
        for f in data_files:
            with open(f, "r+b") as fh:
                fh.write(b"\xff" * os.path.getsize(f))
    elif damage == "drop_metadata":
        os.remove(step_dir / "state" / "_METADATA")
    else:
        import shutil
        shutil.rmtree(step_dir / "state")
    with caplog.at_level(logging.ERROR, logger="maskgen.checkpoint"):
        tree, data_state, step = ckpt_lib.StageCheckpoints(directory).restore(_target())
    assert step == 2 and data_state["position"] == 2
    np.testing.assert_array_equal(np.asarray(tree["params"]["w"]), 2.0)
    assert any("step 4" in r.message and ("corrupt" in r.message or "unreadable" in r.message)
               for r in caplog.records)
    # The bad step is moved aside, so a later save of step 4 is possible again.
    assert sorted(p.name.split(".")[0] for p in directory.iterdir()) == ["2", "corrupt"]
    ckpt = ckpt_lib.StageCheckpoints(directory)
    assert ckpt.save(4, _tiny_tree(4), {"kind": "sampler", "position": 4})
    ckpt.wait()
    assert ckpt.steps() == [2, 4]


def test_no_readable_step_is_an_error(tmp_path):
    directory = tmp_path / "stage"
    _save_steps(directory, [2])
    os.remove(directory / "2" / "state" / "_METADATA")
    with pytest.raises(ValueError, match="no readable checkpoint"):
        ckpt_lib.StageCheckpoints(directory).restore(_target())


def test_checkpoint_from_another_config_names_the_parameter(tmp_path):
    _, _, _, _, init_small = _parts(mlp_dim=64)
    _, _, _, _, init_big = _parts(mlp_dim=128)
    mesh = _mesh(1, 1)
    state, _, _ = train_state.init_sharded(init_small, jax.random.key(0), mesh)
    ckpt = ckpt_lib.StageCheckpoints(tmp_path / "transformer")
    ckpt.save(1, state.to_tree(), {"kind": "sampler", "position": 1})
    ckpt.wait()
    abstract, shardings = train_state.abstract_and_shardings(init_big, mesh)
    target = train_state.sharded_abstract(abstract, shardings).to_tree()
    with pytest.raises(ckpt_lib.CheckpointMismatchError,
                       match=r"'params/TransformerLayer_0/Mlp_0/intermediate_output/bias' has shape "
                             r"\(64,\) in the checkpoint but \(128,\)"):
        ckpt_lib.StageCheckpoints(tmp_path / "transformer").restore(target)
    # Entries present on one side only are named too.
    abstract, _ = train_state.abstract_and_shardings(init_small, mesh)
    target = abstract.to_tree()
    del target["params"]["MlmLayer_0"]
    with pytest.raises(ckpt_lib.CheckpointMismatchError, match="MlmLayer_0"):
        ckpt_lib.check_compatible(ckpt.saved_tree(1), target)


def test_keeps_latest_n_plus_best(tmp_path):
    directory = tmp_path / "stage"
    _save_steps(directory, [1, 2, 3, 4, 5], losses=[5.0, 0.5, 4.0, 3.0, 2.0])
    assert ckpt_lib.StageCheckpoints(directory).steps() == [2, 4, 5]


def test_plain_orbax_reads_the_checkpoint_without_maskgen(tmp_path):
    directory = tmp_path / "stage"
    _save_steps(directory, [3])
    restored = ocp.CheckpointManager(directory).restore(3)
    assert int(restored["state"]["step"]) == 3
    np.testing.assert_array_equal(np.asarray(restored["state"]["params"]["w"]), 3.0)
    assert restored["data"] == {"kind": "sampler", "position": 3}
    assert restored["config"] == json.loads(config_io.to_json(DEBUG))
    # And item by item through ocp.args, as maskgen restores them.
    restored = ocp.CheckpointManager(directory).restore(3, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(), data=ocp.args.JsonRestore(), config=ocp.args.JsonRestore()))
    assert int(restored["state"]["step"]) == 3 and restored["config"]["seed"] == DEBUG.seed


def test_steps_from_before_the_config_item_still_restore(tmp_path):
    directory = tmp_path / "stage"
    _save_steps(directory, [2], config=None)
    _save_steps(directory, [4])
    ckpt = ckpt_lib.StageCheckpoints(directory)
    assert ckpt.saved_config(2) is None and ckpt.saved_config(4)["seed"] == DEBUG.seed
    tree, data_state, step = ckpt.restore(_target(), step=2)
    assert step == 2 and data_state["position"] == 2
    np.testing.assert_array_equal(np.asarray(tree["params"]["w"]), 2.0)
    assert ckpt_lib.restore_subtree(directory, {"params": _target()["params"]}, step=2)[1] == 2


def test_training_saves_the_run_config_with_every_step(tmp_path):
    cfg = config_io.load_config_file(os.path.join(REPO, "configs/debug.py"))
    cfg.stages = ("transformer",)
    cfg.dataset.name = "synthetic_tokens"
    cfg.transformer.num_layers = 1
    cfg.num_train_steps = 2
    cfg.log_every_steps = 1000
    workdir = tmp_path / "run"
    trainer.train_and_evaluate(cfg, str(workdir))
    ckpt = ckpt_lib.StageCheckpoints(workdir / "transformer", read_only=True)
    assert ckpt.steps() == [2]
    assert ckpt.saved_config(2) == json.loads(config_io.to_json(cfg))
    assert config_io.to_json(config_io.from_dict(ckpt.saved_config(2))) == (workdir / "config.json").read_text()


def test_restore_subtree_reads_only_the_requested_entry(tmp_path):
    directory = tmp_path / "stage"
    _save_steps(directory, [2, 4])
    target = {"params": _target()["params"]}
    tree, step = ckpt_lib.restore_subtree(directory, target)
    assert step == 4 and set(tree) == {"params"}
    np.testing.assert_array_equal(np.asarray(tree["params"]["w"]), 4.0)
    with pytest.raises(ValueError, match="no checkpoint directory"):
        ckpt_lib.restore_subtree(tmp_path / "missing", target)
