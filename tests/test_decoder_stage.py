"""Decoder fine-tuning on frozen tokens: the decoder moves, the encoder, quantizer and every token id do not."""
import ast
import glob
import json
import os
import pathlib

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import maskgen
from maskgen import checkpoint as ckpt_lib
from maskgen import config_io
from maskgen.training import trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.usefixtures("fast_compile")


def _ema(workdir, stage, step):
    return ocp.CheckpointManager(workdir / stage).restore(step)["state"]["ema_params"]


def _assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.slow
def test_decoder_stage_moves_only_the_decoder_and_keeps_every_token(tmp_path):
    cfg = config_io.load_config_file(os.path.join(REPO, "configs/debug.py"))
    cfg.stages = ("tokenizer", "decoder", "transformer")
    cfg.dataset.synthetic_examples = 64
    cfg.tokenizer_train.gan_weight = 0.0
    cfg.decoder_train.update(dict(num_train_steps=3, disc_start_step=1, learning_rate=1e-2))
    workdir = tmp_path / "run"
    trainer.train_and_evaluate(cfg, str(workdir))

    tok, dec = _ema(workdir, "tokenizer", 4), _ema(workdir, "decoder", 3)
    assert set(dec) == {"decoder"}  # the stage stores nothing it could move but the decoder
    assert any(not np.array_equal(a, b) for a, b in
               zip(jax.tree.leaves(dec["decoder"]), jax.tree.leaves(tok["decoder"])))
    lecam = ocp.CheckpointManager(workdir / "decoder").restore(3)["state"]["lecam_ema"]
    assert np.isfinite(float(lecam["real"])) and float(lecam["real"]) != 0.0  # the discriminator trained

    # Every step of every stage carries the run's config (what config.json holds).
    for stage in ("tokenizer", "decoder", "transformer"):
        for step in ckpt_lib.StageCheckpoints(workdir / stage, read_only=True).steps():
            saved = ocp.CheckpointManager(workdir / stage).restore(
                step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
            assert saved == json.loads(config_io.to_json(cfg)), (stage, step)

    bundle = maskgen.load(str(workdir))
    assert bundle.steps == {"tokenizer": 4, "decoder": 3, "transformer": 4}
    params = bundle.params["tokenizer"]
    for part in ("encoder", "quantizer"):
        _assert_trees_equal(params[part], tok[part])
    _assert_trees_equal(params["decoder"], dec["decoder"])

    # Every token id is the tokenizer stage's: the token cache and fresh encodings alike.
    from maskgen.training import iterators
    images = np.stack([iterators.synthetic_image(cfg.seed, i, cfg.num_classes, 16, 3)[0] for i in range(64)])
    tok_only = dict(tok)
    ids_tok = np.asarray(bundle.tokenizer.apply({"params": tok_only}, images, method="encode_to_indices"))
    ids_bundle = np.asarray(bundle.tokenizer.apply({"params": params}, images, method="encode_to_indices"))
    np.testing.assert_array_equal(ids_bundle, ids_tok)
    with np.load(glob.glob(str(workdir / "token_cache" / "*.npz"))[0]) as cache:
        cached = np.sort(cache["tokens"], axis=0)
    np.testing.assert_array_equal(cached, np.sort(ids_tok.reshape(64, -1), axis=0))
    # Reconstructions do change: the bundle decodes with the fine-tuned decoder.
    recon_tok = bundle.tokenizer.apply({"params": tok_only}, images)[0]
    recon_bundle = bundle.tokenizer.apply({"params": params}, images)[0]
    assert float(np.abs(np.asarray(recon_tok) - np.asarray(recon_bundle)).max()) > 0

    # The preflight reads the decoder stage's checkpoints too: a rerun whose discriminator or decoder
    # has other shapes is refused before anything is written.
    from maskgen.training import preflight
    preflight.check_checkpoints(cfg, "decoder", trainer.stage_config(cfg, "decoder"), str(workdir))
    other = config_io.load_config_file(os.path.join(REPO, "configs/debug.py"))
    other.stages = cfg.stages
    other.discriminator.filters = int(cfg.discriminator.filters) * 2
    with pytest.raises(ckpt_lib.CheckpointMismatchError, match="decoder"):
        preflight.check_checkpoints(other, "decoder", trainer.stage_config(other, "decoder"), str(workdir))


def test_decoder_losses_use_no_label_trained_network():
    """The decoder stage may import the discriminator, never an evaluation (label-trained) network."""
    for name in ("decoder_step.py", "decoder_stage.py"):
        tree = ast.parse((pathlib.Path(REPO) / "maskgen" / "training" / name).read_text())
        imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        imported |= {a.name for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names}
        assert not any(m and (m.startswith("maskgen.eval") or "quality" in m or "inception" in m)
                       for m in imported), (name, imported)
