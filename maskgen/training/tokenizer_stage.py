"""Tokenizer stage: VQGAN + discriminator training on images.

Models come from `maskgen.models.factory` (see there how `cfg.discriminator` maps
onto the discriminator). A perceptual loss runs when `perceptual_weight > 0`; its feature network is the
Inception-v3 of `maskgen.eval` loaded from the `.npz` named by
`perceptual_weights` (pool features; no LPIPS weights ship offline).
"""
import functools
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np

from maskgen import checkpoint as ckpt_lib
from maskgen import input_pipeline
from maskgen import logging_utils
from maskgen import optim
from maskgen import sharding as shd
from maskgen import train_state
from maskgen import train_step_tokenizer as tts
from maskgen import trainer
from maskgen.models.factory import discriminator_model, tokenizer_model

log = logging.getLogger(__name__)

STAGE = "tokenizer"
def perceptual_features(tcfg):
    """Feature function for the perceptual loss, or None when it is off."""
    if not tcfg.perceptual_weight:
        return None
    if not tcfg.perceptual_weights:
        raise ValueError("tokenizer_train.perceptual_weight > 0 needs tokenizer_train.perceptual_weights "
                         "(an Inception .npz written by maskgen.eval.convert_inception)")
    from maskgen.eval import inception
    model, params = inception.load_inception(tcfg.perceptual_weights)

    def features(images):
        x = jnp.broadcast_to(images, images.shape[:3] + (3,)) * 255.0
        x = (inception.resize_bilinear_legacy(x) - 128.0) / 128.0
        return model.apply({"params": params}, x)["pool"]
    return features


def make_reconstructor(vqgan, mesh, num: int = 8):
    """(sample_fn, fixed): sample_fn(state, step) -> grid of inputs over EMA reconstructions.

    The inputs are the first `num` rows of the first global batch, stored in
    `fixed["images"]` by the caller; the result is replicated, so every host
    can read it (process 0 writes it).
    """
    @functools.partial(jax.jit, out_shardings=shd.replicated(mesh))
    def reconstruct(params, images):
        images = images[:num]
        return images, vqgan.apply({"params": params}, images)[0]

    fixed = {}

    def sample(state, step):
        images, recon = jax.device_get(reconstruct(state.ema_params, fixed["images"]))
        return logging_utils.image_grid(np.concatenate([images, recon]), cols=len(images))
    return sample, fixed


def build(cfg, scfg, workdir: str, mesh, stop=None) -> trainer.StageRun:
    """The tokenizer stage's StageRun (state restored from WORKDIR/tokenizer when present)."""
    rules = shd.rules_from_config(cfg.get("sharding_rules"))
    vqgan, disc = tokenizer_model(cfg), discriminator_model(cfg)
    batch = int(scfg.batch_size)
    if batch % shd.batch_divisor(mesh):
        raise ValueError(f"tokenizer batch_size {batch} is not divisible by the "
                         f"{shd.batch_divisor(mesh)} devices of the mesh's data x fsdp axes")
    num_steps = int(scfg.num_train_steps)
    tx, lr = optim.adamw(scfg, num_steps)
    disc_tx, _ = optim.adamw(scfg, num_steps, learning_rate=scfg.disc_learning_rate)
    step_fn = tts.make_train_step(vqgan, disc, tx, disc_tx, lr, scfg, scfg.ema_decay,
                                  perceptual_features(scfg))
    image_shape = (cfg.image_size, cfg.image_size, cfg.image_channels)
    init = tts.make_init(vqgan, disc, tx, disc_tx, image_shape)
    abstract, shardings = train_state.abstract_and_shardings(init, mesh, rules)

    directory = os.path.join(workdir, STAGE)
    checkpoints = ckpt_lib.StageCheckpoints(directory, keep=cfg.keep_checkpoints)
    restored = checkpoints.restore(train_state.sharded_abstract(abstract, shardings).to_tree())
    seed = int(cfg.seed)
    data_iter = input_pipeline.image_iterator(cfg, batch, seed + 5)
    if restored is None:
        state = train_state.materialize(init, jax.random.fold_in(jax.random.key(seed), 4), shardings)
    else:
        tree, data_state, step = restored
        state = train_state.TrainState.from_tree(tree)
        data_iter.set_state(input_pipeline.local_state(data_state))
        log.info("%s: resumed from step %d", STAGE, step)

    sample_fn, fixed = make_reconstructor(vqgan, mesh)
    batch_sh = {"image": shd.batch_sharding(mesh, 4), "label": shd.batch_sharding(mesh, 1)}

    def next_batch():
        batch = shd.global_batch(next(data_iter), mesh)
        fixed.setdefault("images", batch["image"])  # never donated: the step donates only the state
        return batch

    jitted = shd.jit_sharded(trainer.with_key(step_fn, seed, 6), (shardings, batch_sh),
                             (shardings, shd.replicated(mesh)), donate_argnums=(0,))
    return trainer.StageRun(
        name=STAGE, directory=directory, state=state, step_fn=jitted, next_batch=next_batch,
        data_iter=data_iter, checkpoints=checkpoints, num_steps=num_steps,
        checkpoint_every=int(scfg.checkpoint_every_steps), examples_per_step=batch,
        sample_fn=sample_fn)
