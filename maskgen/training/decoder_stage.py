"""Decoder stage: fine-tune the tokenizer's decoder on its frozen tokens (see `decoder_step`).

Run it after the tokenizer: `config.stages = ("tokenizer", "decoder", "transformer")`. It
starts from the tokenizer's EMA decoder (WORKDIR/tokenizer, or
transformer_train.tokenizer_workdir) and writes only the decoder to WORKDIR/decoder/; the
encoder and quantizer stay in WORKDIR/tokenizer, untouched, so the token cache and the
transformer stage see the same token ids with or without this stage. Whoever decodes
(`maskgen.load`, the transformer stage's samples and quality report) takes the decoder
from WORKDIR/decoder when it holds a checkpoint.
"""
import functools
import logging
import os
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from maskgen import image_grid, prng
from maskgen import sharding as shd
from maskgen.models.factory import discriminator_model
from maskgen.training import decoder_step, iterators, optimizer, rng, stage_setup
from maskgen.training.loop import StageRun, StopSignal

log = logging.getLogger(__name__)

STAGE = "decoder"


def _copy(tree: Any, shardings: Any) -> Any:
    return jax.jit(lambda t: jax.tree.map(jnp.copy, t), out_shardings=shardings)(tree)


def build(cfg: ml_collections.ConfigDict, scfg: ml_collections.ConfigDict, workdir: str, mesh: Mesh,
          stop: Optional[StopSignal] = None) -> StageRun:
    """The decoder stage's StageRun (state restored from WORKDIR/decoder when present)."""
    from maskgen.training.transformer_stage import load_tokenizer  # the one tokenizer reader
    rules = shd.rules_from_config(cfg.get("sharding_rules"))
    vqgan, frozen, _, tok_step = load_tokenizer(cfg, workdir, mesh, rules, with_decoder_stage=False)
    disc = discriminator_model(cfg)
    batch = int(scfg.batch_size)
    stage_setup.check_batch_divisible(STAGE, batch, mesh)
    num_steps = int(scfg.num_train_steps)
    tx, lr = optimizer.adamw(scfg, num_steps)
    disc_tx, _ = optimizer.adamw(scfg, num_steps, learning_rate=scfg.disc_learning_rate)
    step_fn = decoder_step.make_train_step(vqgan, disc, tx, disc_tx, lr, scfg, scfg.ema_decay)
    image_shape = (cfg.image_size, cfg.image_size, cfg.image_channels)
    init = decoder_step.make_init(vqgan, disc, tx, disc_tx, image_shape)
    start = stage_setup.restore_or_init(STAGE, cfg, workdir, init, mesh, rules)
    state = start.state
    if start.resumed_step is None:  # start from the tokenizer's decoder (two buffers: both are donated)
        decoder = {"decoder": frozen["decoder"]}
        state = state.replace(params=_copy(decoder, start.shardings.params),
                              ema_params=_copy(decoder, start.shardings.ema_params))
        log.info("%s: starting from the decoder of tokenizer step %d", STAGE, tok_step)
    data_iter = iterators.image_iterator(cfg, batch, rng.data_seed(cfg.seed, "decoder_data"))
    start.resume_iterator(data_iter)
    batch_sh = {"image": shd.batch_sharding(mesh, 4), "label": shd.batch_sharding(mesh, 1)}
    frozen_sh = jax.tree.map(lambda x: x.sharding, frozen)
    key = rng.key(cfg.seed, "decoder_step", cfg.get("prng_impl", prng.DEFAULT))
    jitted = shd.jit_sharded(lambda s, b, f: step_fn(s, b, key, f), (start.shardings, batch_sh, frozen_sh),
                             (start.shardings, shd.replicated(mesh)), donate_argnums=(0,))
    fixed = {}

    def next_batch() -> Any:
        batch = shd.global_batch(next(data_iter), mesh)
        fixed.setdefault("images", batch["image"])
        return batch

    @functools.partial(jax.jit, out_shardings=shd.replicated(mesh))
    def reconstruct(decoder_params: Any, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        images = images[:8]
        return images, vqgan.apply({"params": {**frozen, **decoder_params}}, images)[0]

    def sample(state: Any, step: int) -> np.ndarray:
        images, recon = jax.device_get(reconstruct(state.ema_params, fixed["images"]))
        return image_grid.float_grid(np.concatenate([images, recon]), cols=len(images))

    return StageRun(
        name=STAGE, directory=os.path.join(workdir, STAGE), state=state,
        step_fn=lambda s, b: jitted(s, b, frozen), next_batch=next_batch, data_iter=data_iter,
        checkpoints=start.checkpoints, num_steps=num_steps,
        checkpoint_every=int(scfg.checkpoint_every_steps), examples_per_step=batch, sample_fn=sample)
