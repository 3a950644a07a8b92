"""Tokenizer stage: VQGAN + discriminator training on images.

The discriminator is built from `cfg.discriminator`: module fields
(`channel_base`, `max_channels`, `blur_resample`, `conv_impl`) are passed
through; the config's `filters` / `channel_multipliers` give the width at full
resolution (filters * multipliers[0]) and the cap (filters * max(multipliers)).
A perceptual loss runs when `perceptual_weight > 0`; its feature network is the
Inception-v3 of `maskgen.eval` loaded from the `.npz` named by
`perceptual_weights` (pool features; no LPIPS weights ship offline).
"""
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
from maskgen.stage_transformer import tokenizer_model

log = logging.getLogger(__name__)

STAGE = "tokenizer"
_DISC_FIELDS = ("channel_base", "max_channels", "blur_resample", "conv_impl")


def _next_pow2(n: int) -> int:
    return 1 << (int(n) - 1).bit_length()


def discriminator_model(cfg):
    from maskgen.models.discriminator import Discriminator
    d = cfg.discriminator.to_dict()
    kwargs = {k: d[k] for k in _DISC_FIELDS if k in d}
    if "channel_base" not in kwargs and "filters" in d:
        mults = list(d.get("channel_multipliers") or [1])
        kwargs["channel_base"] = int(d["filters"] * mults[0] * _next_pow2(cfg.image_size))
        kwargs["max_channels"] = int(d["filters"] * max(mults))
    return Discriminator(image_size=cfg.image_size, image_channels=cfg.image_channels,
                         dtype=jnp.dtype(cfg.tokenizer.get("dtype", "float32")), **kwargs)


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


def make_reconstructor(vqgan, num: int = 8):
    """(state, step) -> grid: first row the inputs, second row their EMA reconstructions."""
    @jax.jit
    def reconstruct(params, images):
        return vqgan.apply({"params": params}, images)[0]

    fixed = {}

    def sample(state, step):
        images = fixed["images"]
        recon = np.asarray(jax.device_get(reconstruct(state.ema_params, images)))
        return logging_utils.image_grid(np.concatenate([images, recon]), cols=len(images))
    return sample, fixed, num


def build(cfg, scfg, workdir: str, mesh) -> trainer.StageRun:
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
        data_iter.set_state(data_state)
        log.info("%s: resumed from step %d", STAGE, step)

    sample_fn, fixed, num = make_reconstructor(vqgan)
    batch_sh = {"image": shd.batch_sharding(mesh, 4), "label": shd.batch_sharding(mesh, 1)}

    def next_batch():
        local = next(data_iter)
        if "images" not in fixed:
            fixed["images"] = local["image"][:num]
        return shd.global_batch(local, mesh)

    jitted = shd.jit_sharded(step_fn, (shardings, batch_sh, shd.replicated(mesh)),
                             (shardings, shd.replicated(mesh)), donate_argnums=(0,))
    key = jax.device_put(jax.random.fold_in(jax.random.key(seed), 6), shd.replicated(mesh))
    return trainer.StageRun(
        name=STAGE, directory=directory, state=state, step_fn=jitted, next_batch=next_batch,
        data_iter=data_iter, checkpoints=checkpoints, key=key, num_steps=num_steps,
        checkpoint_every=int(scfg.checkpoint_every_steps), examples_per_step=batch,
        sample_fn=sample_fn)
