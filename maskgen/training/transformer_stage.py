"""Transformer stage: MaskGIT training on the tokens of a frozen tokenizer.

Token source, in order of preference:
  * `dataset.name == "synthetic_tokens"`: generated token grids, no tokenizer;
  * `transformer_train.pretokenize`: the train split encoded once into
    `WORKDIR/token_cache/` with the tokenizer's EMA parameters;
  * otherwise images are encoded on the fly by the frozen tokenizer each step.
The tokenizer is read from `transformer_train.tokenizer_workdir` (default: this
WORKDIR), latest readable step of its `tokenizer/` directory, EMA parameters only.
"""
import functools
import logging
import os
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from maskgen import checkpoint as ckpt_lib
from maskgen import image_grid, paths, prng
from maskgen import sharding as shd
from maskgen.bundle import Bundle
from maskgen.models.factory import tokenizer_model, transformer_model
from maskgen.models.sizes import seq_len, token_grid, token_layout
from maskgen.sampling import decode_config_from
from maskgen.scheduler import DecodeConfig, decode
from maskgen.tokens import TokenLayout
from maskgen.training import iterators, optimizer, quality, rng, stage_setup, token_cache, train_state
from maskgen.training import transformer_step as tst
from maskgen.training.loop import StageRun, StopSignal

log = logging.getLogger(__name__)

STAGE = "transformer"


ENCODE_BATCH = 512  # images per pre-tokenisation call


def tokenizer_param_target(cfg: ml_collections.ConfigDict, mesh: Mesh,
                           rules: Any = shd.RULES) -> tuple[nn.Module, dict]:
    """(tokenizer module, {"ema_params": sharded ShapeDtypeStructs}) for partial restores."""
    model = tokenizer_model(cfg)
    shape = (1, cfg.image_size, cfg.image_size, cfg.image_channels)
    boxed = jax.eval_shape(lambda k: model.init(k, jnp.zeros(shape, jnp.float32))["params"],
                           jax.random.key(0))
    abstract = nn.meta.unbox(boxed)
    shardings = shd.tree_shardings(shd.logical_specs(boxed), abstract, mesh, rules)
    return model, {"ema_params": train_state.sharded_abstract(abstract, shardings)}


def load_tokenizer(cfg: ml_collections.ConfigDict, workdir: str, mesh: Mesh, rules: Any = shd.RULES,
                   with_decoder_stage: bool = True) -> tuple[nn.Module, Any, str, int]:
    """(tokenizer module, EMA params sharded on `mesh`, stage directory, step).

    With `with_decoder_stage`, the decoder comes from WORKDIR/decoder (the decoder stage) when that
    holds a checkpoint; encoder and quantizer, and so the token ids, always come from the tokenizer.
    """
    source = cfg.transformer_train.get("tokenizer_workdir") or workdir
    stage_dir = os.path.join(source, "tokenizer")
    if not paths.is_dir(stage_dir):
        raise ValueError(
            f"the transformer stage needs a trained tokenizer, but {stage_dir} does not exist: run "
            "the tokenizer stage first, set transformer_train.tokenizer_workdir, or train on "
            "dataset.name='synthetic_tokens'")
    model, target = tokenizer_param_target(cfg, mesh, rules)
    tree, step = ckpt_lib.restore_subtree(stage_dir, target)
    log.info("tokenizer: EMA parameters of step %d from %s", step, stage_dir)
    params = tree["ema_params"]
    decoder_dir = os.path.join(source, "decoder")
    if with_decoder_stage and ckpt_lib.has_steps(decoder_dir):
        dec, dec_step = ckpt_lib.restore_subtree(
            decoder_dir, {"ema_params": {"decoder": target["ema_params"]["decoder"]}})
        params = {**params, "decoder": dec["ema_params"]["decoder"]}
        log.info("tokenizer: decoder of decoder-stage step %d from %s", dec_step, decoder_dir)
    return model, params, stage_dir, step


def _encoder(tokenizer: nn.Module, params: Any, mesh: Mesh) -> Callable:
    """Jitted images [B,H,W,C] (batch-sharded) -> token ids [B,h,w] with fixed parameters."""
    param_sh = jax.tree.map(lambda x: x.sharding, params)

    def encode(p: Any, images: jax.Array) -> jax.Array:
        return tokenizer.apply({"params": p}, images, method=tokenizer.encode_to_indices)
    jitted = jax.jit(encode, in_shardings=(param_sh, shd.batch_sharding(mesh, 4)),
                     out_shardings=shd.batch_sharding(mesh, 3))
    return lambda images: jitted(params, images)


def decode_config(cfg: ml_collections.ConfigDict, layout: TokenLayout) -> DecodeConfig:
    """DecodeConfig for periodic samples: `cfg.sampling` read by `sampling.decode_config_from`.

    Guidance needs a null class; a config without one samples unguided.
    """
    overrides = {} if layout.null_class_id is not None else {"guidance_scale": None}
    return decode_config_from(cfg.sampling, token_grid(cfg), **overrides)


def make_sampler(cfg: ml_collections.ConfigDict, model: nn.Module, layout: TokenLayout, tokenizer: nn.Module,
                 tok_params: Any,
                 mesh: Mesh, num: int = 8) -> Callable:
    """(state, step) -> uint8 grid of `num` class-conditional samples from the EMA params.

    The images come back replicated, so every host can read them (process 0 writes).
    """
    config = decode_config(cfg, layout)
    h, w = token_grid(cfg)
    labels = np.arange(num) % layout.num_real_classes
    ids = np.full((num, 1 + h * w), layout.mask_id, np.int32)
    ids[:, 0] = np.asarray(layout.class_token(labels))

    @functools.partial(jax.jit, out_shardings=shd.replicated(mesh))
    def generate(params: Any, tparams: Any, ids: jax.Array, key: jax.Array) -> jax.Array:
        def logits_fn(x: jax.Array) -> jax.Array:
            return model.apply({"params": params}, x, num_logits=layout.codebook_size)
        tokens = decode(logits_fn, ids, key, config, layout).tokens[:, 1:].reshape(num, h, w)
        return tokenizer.apply({"params": tparams}, tokens, method=tokenizer.decode_from_indices)

    def sample(state: Any, step: int) -> np.ndarray:
        images = generate(state.ema_params, tok_params, ids,
                          prng.make_key(cfg.seed, cfg.get("prng_impl", prng.DEFAULT)))
        return image_grid.float_grid(np.asarray(jax.device_get(images)), cols=min(num, 8))
    return sample


def build(cfg: ml_collections.ConfigDict, scfg: ml_collections.ConfigDict, workdir: str, mesh: Mesh,
          stop: Optional[StopSignal] = None) -> StageRun:
    """The transformer stage's StageRun (state restored from WORKDIR/transformer when present)."""
    rules = shd.rules_from_config(cfg.get("sharding_rules"))
    layout, length, grid = token_layout(cfg), seq_len(cfg), token_grid(cfg)
    model = transformer_model(cfg)
    batch = int(scfg.batch_size)
    stage_setup.check_batch_divisible(STAGE, batch, mesh)
    tx, lr = optimizer.adamw(scfg, scfg.num_train_steps)
    step_fn = tst.make_train_step(model, layout, tx, lr, scfg, scfg.ema_decay)
    init = tst.make_init(model, tx, length)
    start = stage_setup.restore_or_init(STAGE, cfg, workdir, init, mesh, rules)

    tokenizer = tok_params = None
    num_tokens = grid[0] * grid[1]
    data_seed = rng.data_seed(cfg.seed, "transformer_data")
    if cfg.dataset.name == iterators.SYNTHETIC_TOKENS:
        data_iter = iterators.SyntheticTokens(
            cfg.dataset.get("synthetic_examples", 256), batch, data_seed, layout.num_real_classes,
            num_tokens, layout.codebook_size)
        encode = None
    else:
        tokenizer, tok_params, tok_dir, tok_step = load_tokenizer(cfg, workdir, mesh, rules)
        encode = _encoder(tokenizer, tok_params, mesh)
        if scfg.pretokenize:
            # Encoding has no backward pass: a larger batch than training's keeps the device busy.
            encode_batch = batch * max(1, ENCODE_BATCH // batch)
            arrays = token_cache.build_or_load(cfg, workdir, encode, mesh, encode_batch, grid, tok_dir, tok_step,
                                               check_stop=stop.check if stop is not None else None)
            data_iter = iterators.TokenCacheReader(arrays["tokens"], arrays["labels"], batch, data_seed,
                                                 arrays.get("tokens_flipped"))
            encode = None
        else:
            data_iter = iterators.image_iterator(cfg, batch, data_seed)
    start.resume_iterator(data_iter)

    def next_batch() -> dict:
        local = next(data_iter)
        if encode is None:
            return shd.global_batch(local, mesh)
        images = shd.global_batch({"image": local["image"]}, mesh)["image"]
        tokens = encode(images).reshape(batch, num_tokens)
        return {"tokens": tokens, "label": shd.global_batch({"label": local["label"]}, mesh)["label"]}

    batch_sh = {"tokens": shd.batch_sharding(mesh, 2), "label": shd.batch_sharding(mesh, 1)}
    jitted = stage_setup.jit_step(STAGE, step_fn, int(cfg.seed), start.shardings, batch_sh, mesh,
                                  cfg.get("prng_impl", prng.DEFAULT))
    sample_fn: Optional[object] = None
    eval_fn: Optional[object] = None
    if tokenizer is not None:
        sample_fn = make_sampler(cfg, model, layout, tokenizer, tok_params, mesh)
        if quality.supports_quality(cfg) and cfg.get("eval_num_samples", 0):
            eval_fn = make_quality_eval(cfg, workdir, model, layout, tokenizer, tok_params, grid)
    return StageRun(
        name=STAGE, directory=os.path.join(workdir, STAGE), state=start.state, step_fn=jitted,
        next_batch=next_batch, data_iter=data_iter, checkpoints=start.checkpoints,
        num_steps=int(scfg.num_train_steps),
        checkpoint_every=int(scfg.checkpoint_every_steps), examples_per_step=batch,
        tokens_per_example=length, sample_fn=sample_fn, eval_fn=eval_fn)


def make_quality_eval(cfg: ml_collections.ConfigDict, workdir: str, model: nn.Module, layout: TokenLayout,
                      tokenizer: nn.Module,
                      tok_params: Any, grid: tuple[int, int]) -> Callable:
    """(state, step) -> quality report of the EMA transformer (Fashion-MNIST class accuracy, Fréchet)."""
    per_class = max(1, int(cfg.eval_num_samples) // layout.num_real_classes)

    def evaluate(state: Any, step: int) -> dict:
        bundle = Bundle(tokenizer=tokenizer, transformer=model,
                        params={"tokenizer": tok_params, "transformer": state.ema_params}, config=cfg,
                        layout=layout, image_shape=(cfg.image_size, cfg.image_size, cfg.image_channels),
                        token_grid=tuple(grid), steps={"transformer": step})
        report, _ = quality.quality_report(bundle, per_class=per_class, seed=int(cfg.seed),
                                           cache_dir=quality.default_cache_dir(workdir),
                                           data_dir=cfg.dataset.data_dir, progress=False)
        report["step"] = step
        if jax.process_index() == 0:
            quality.write_report(report, os.path.join(workdir, STAGE, "eval", f"step_{step:08d}.json"))
            quality.write_report(report, os.path.join(workdir, "quality.json"))
        log.info("%s step %d quality: %s", STAGE, step, quality.format_report(report))
        return report

    return evaluate
