"""Tokenizer stage: VQGAN + discriminator training on images.

Models come from `maskgen.models.factory` (see there how `cfg.discriminator` maps
onto the discriminator). A perceptual loss runs when `perceptual_weight > 0`; its feature network is the
Inception-v3 of `maskgen.eval` loaded from the `.npz` named by
`perceptual_weights` (pool features; no LPIPS weights ship offline).
"""
import functools
import logging
import os
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from jax.sharding import Mesh

from maskgen import image_grid
from maskgen import sharding as shd
from maskgen.models.factory import discriminator_model, tokenizer_model
from maskgen.training import iterators, optimizer, rng, stage_setup
from maskgen.training import tokenizer_step as tts
from maskgen.training.loop import StageRun, StopSignal

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
        return image_grid.float_grid(np.concatenate([images, recon]), cols=len(images))
    return sample, fixed


def build(cfg, scfg, workdir: str, mesh: Mesh, stop: Optional[StopSignal] = None) -> StageRun:
    """The tokenizer stage's StageRun (state restored from WORKDIR/tokenizer when present)."""
    rules = shd.rules_from_config(cfg.get("sharding_rules"))
    vqgan, disc = tokenizer_model(cfg), discriminator_model(cfg)
    batch = int(scfg.batch_size)
    stage_setup.check_batch_divisible(STAGE, batch, mesh)
    num_steps = int(scfg.num_train_steps)
    tx, lr = optimizer.adamw(scfg, num_steps)
    disc_tx, _ = optimizer.adamw(scfg, num_steps, learning_rate=scfg.disc_learning_rate)
    step_fn = tts.make_train_step(vqgan, disc, tx, disc_tx, lr, scfg, scfg.ema_decay,
                                  perceptual_features(scfg))
    image_shape = (cfg.image_size, cfg.image_size, cfg.image_channels)
    init = tts.make_init(vqgan, disc, tx, disc_tx, image_shape)
    start = stage_setup.restore_or_init(STAGE, cfg, workdir, init, mesh, rules)
    data_iter = iterators.image_iterator(cfg, batch, rng.data_seed(cfg.seed, "tokenizer_data"))
    start.resume_iterator(data_iter)

    sample_fn, fixed = make_reconstructor(vqgan, mesh)
    batch_sh = {"image": shd.batch_sharding(mesh, 4), "label": shd.batch_sharding(mesh, 1)}

    def next_batch():
        batch = shd.global_batch(next(data_iter), mesh)
        fixed.setdefault("images", batch["image"])  # never donated: the step donates only the state
        return batch

    jitted = stage_setup.jit_step(STAGE, step_fn, int(cfg.seed), start.shardings, batch_sh, mesh)
    return StageRun(
        name=STAGE, directory=os.path.join(workdir, STAGE), state=start.state, step_fn=jitted,
        next_batch=next_batch, data_iter=data_iter, checkpoints=start.checkpoints, num_steps=num_steps,
        checkpoint_every=int(scfg.checkpoint_every_steps), examples_per_step=batch,
        sample_fn=sample_fn)
