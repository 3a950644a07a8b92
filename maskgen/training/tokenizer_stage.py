"""Tokenizer stage: VQGAN + discriminator training on images.

Models come from `maskgen.models.factory` (see there how `cfg.discriminator` maps
onto the discriminator). A perceptual loss runs when `perceptual_weight > 0`; its feature network is the
Inception-v3 of `maskgen.eval` loaded from the `.npz` named by
`perceptual_weights` (pool features; no LPIPS weights ship offline).

With tokenizer.quantizer = vq and `vq_init = "kmeans"`, a fresh run replaces the
codebook (params and EMA copy) before step 0 by k-means++ + Lloyd on the encoder
outputs of `vq_kmeans_batches` batches from a stream of their own (so the training
order is the same as without it): the default init puts every code near 0, far
from the encoder's outputs, and most codes would never be picked.
"""
import functools
import logging
import math
import os
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from maskgen import image_grid, prng
from maskgen import sharding as shd
from maskgen.models import quantizers
from maskgen.models.factory import discriminator_model, tokenizer_model
from maskgen.training import iterators, optimizer, rng, stage_setup, train_state
from maskgen.training import tokenizer_step as tts
from maskgen.training.loop import StageRun, StopSignal

log = logging.getLogger(__name__)

STAGE = "tokenizer"


def perceptual_features(tcfg: ml_collections.ConfigDict) -> Callable | None:
    """Feature function for the perceptual loss, or None when it is off."""
    if not tcfg.perceptual_weight:
        return None
    if not tcfg.perceptual_weights:
        raise ValueError("tokenizer_train.perceptual_weight > 0 needs tokenizer_train.perceptual_weights "
                         "(an Inception .npz written by maskgen.eval.convert_inception)")
    from maskgen.eval import inception
    model, params = inception.load_inception(tcfg.perceptual_weights)

    def features(images: jax.Array) -> jax.Array:
        x = jnp.broadcast_to(images, images.shape[:3] + (3,)) * 255.0
        x = (inception.resize_bilinear_legacy(x) - 128.0) / 128.0
        return model.apply({"params": params}, x)["pool"]
    return features


def make_reconstructor(vqgan: Any, mesh: Mesh, num: int = 8) -> tuple[Callable, Any]:
    """(sample_fn, fixed): sample_fn(state, step) -> grid of inputs over EMA reconstructions.

    The inputs are the first `num` rows of the first global batch, stored in
    `fixed["images"]` by the caller; the result is replicated, so every host
    can read it (process 0 writes it).
    """
    @functools.partial(jax.jit, out_shardings=shd.replicated(mesh))
    def reconstruct(params: Any, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        images = images[:num]
        return images, vqgan.apply({"params": params}, images)[0]

    fixed = {}

    def sample(state: Any, step: int) -> np.ndarray:
        images, recon = jax.device_get(reconstruct(state.ema_params, fixed["images"]))
        return image_grid.float_grid(np.concatenate([images, recon]), cols=len(images))
    return sample, fixed


def kmeans_init_state(vqgan: Any, state: train_state.TrainState, cfg: ml_collections.ConfigDict,
                      scfg: ml_collections.ConfigDict, mesh: Mesh) -> train_state.TrainState:
    """`state` with its vq codebook (params and ema_params) from k-means on encoder outputs."""
    batch = int(scfg.batch_size)
    num_batches = int(scfg.get("vq_kmeans_batches", 4))
    if num_batches < 1:
        raise ValueError(f"tokenizer_train.vq_kmeans_batches must be >= 1, got {num_batches}")
    data_iter = iterators.image_iterator(cfg, batch, rng.data_seed(cfg.seed, "tokenizer_kmeans_data"))
    images = tuple(shd.global_batch(next(data_iter), mesh)["image"] for _ in range(num_batches))
    old = state.params["quantizer"]["codebook"]
    iterations = int(scfg.get("vq_kmeans_iterations", 10))

    @functools.partial(jax.jit, out_shardings=(old.sharding, old.sharding))
    def fit(params: Any, images: jax.Array, key: jax.Array) -> tuple[jax.Array, jax.Array]:
        latents = jnp.concatenate([vqgan.apply({"params": params}, x, method=vqgan.encode_latents)
                                   .reshape(-1, params["quantizer"]["codebook"].shape[-1]) for x in images])
        codebook = quantizers.kmeans_codebook(latents, params["quantizer"]["codebook"], key, iterations,
                                              normalize=bool(vqgan.vq_lookup_dim))
        return codebook, jnp.copy(codebook)  # two buffers: the step donates params and EMA separately

    codebooks = fit(state.params, images, rng.key(cfg.seed, "tokenizer_kmeans"))

    def with_codebook(params: Any, codebook: jax.Array) -> Any:
        return {**params, "quantizer": {**params["quantizer"], "codebook": codebook}}
    log.info("%s: vq codebook initialised by k-means on %d encoder vectors", STAGE,
             num_batches * batch * math.prod(vqgan.latent_shape(cfg.image_size)))
    return state.replace(params=with_codebook(state.params, codebooks[0]),
                         ema_params=with_codebook(state.ema_params, codebooks[1]))


def build(cfg: ml_collections.ConfigDict, scfg: ml_collections.ConfigDict, workdir: str, mesh: Mesh,
          stop: Optional[StopSignal] = None) -> StageRun:
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
    init = tts.make_init(vqgan, disc, tx, disc_tx, image_shape, scfg)
    start = stage_setup.restore_or_init(STAGE, cfg, workdir, init, mesh, rules)
    state = start.state
    if start.resumed_step is None and scfg.get("vq_init", "random") == "kmeans":
        if vqgan.quantizer_type == "vq":
            state = kmeans_init_state(vqgan, state, cfg, scfg, mesh)
        else:
            log.info("%s: vq_init=kmeans does not apply to quantizer %s (no codebook)", STAGE,
                     vqgan.quantizer_type)
    data_iter = iterators.image_iterator(cfg, batch, rng.data_seed(cfg.seed, "tokenizer_data"))
    start.resume_iterator(data_iter)

    sample_fn, fixed = make_reconstructor(vqgan, mesh)
    batch_sh = {"image": shd.batch_sharding(mesh, 4), "label": shd.batch_sharding(mesh, 1)}

    def next_batch() -> Any:
        batch = shd.global_batch(next(data_iter), mesh)
        fixed.setdefault("images", batch["image"])  # never donated: the step donates only the state
        return batch

    jitted = stage_setup.jit_step(STAGE, step_fn, int(cfg.seed), start.shardings, batch_sh, mesh,
                                  cfg.get("prng_impl", prng.DEFAULT))
    return StageRun(
        name=STAGE, directory=os.path.join(workdir, STAGE), state=state, step_fn=jitted,
        next_batch=next_batch, data_iter=data_iter, checkpoints=start.checkpoints, num_steps=num_steps,
        checkpoint_every=int(scfg.checkpoint_every_steps), examples_per_step=batch,
        sample_fn=sample_fn)
