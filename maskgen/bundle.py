"""`load(path) -> Bundle`: a trained tokenizer + transformer, ready for sampling and editing.

`path` may be
  * a training workdir (`config.json`, `tokenizer/`, `transformer/`): the latest
    readable step of each stage is used (the decoder from `decoder/` when the decoder
    stage ran; encoder and quantizer always from `tokenizer/`);
  * a stage directory (`WORKDIR/transformer`) or one step of it
    (`WORKDIR/transformer/1000`): that transformer step, the latest tokenizer;
  * any directory with `tokenizer/` and `transformer/` checkpoint directories in
    the same layout, with `config=` naming its config file (or a ConfigDict)
    when it has no `config.json`.
The EMA parameters are loaded (plain `params` when a checkpoint has no EMA
copy), onto one device, without reading optimizer state.
"""
import dataclasses
import logging
import os
from typing import Any, Dict, Optional, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from maskgen import checkpoint as ckpt_lib
from maskgen import config_io, paths
from maskgen.models import factory
from maskgen.models.sizes import seq_len, token_grid, token_layout
from maskgen.models.transformer import Transformer
from maskgen.tokens import TokenLayout

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Bundle:
    tokenizer: Any  # maskgen.models.vqgan.VQGAN
    transformer: Transformer
    params: Dict[str, Any]  # {"tokenizer": EMA params, "transformer": EMA params}
    config: ml_collections.ConfigDict
    layout: TokenLayout
    image_shape: Tuple[int, int, int]  # (H, W, C)
    token_grid: Tuple[int, int]  # (h, w)
    steps: Dict[str, int]  # the checkpoint step each part came from


def _split_path(path: str) -> tuple[str, int | None]:
    """(workdir, transformer step or None) for a workdir, stage dir or step dir."""
    path = paths.normalize(path)  # local or gs://
    if not paths.is_dir(path):
        raise ValueError(f"no such directory: {path}")
    name, parent = os.path.basename(path), os.path.dirname(path)
    if name.isdigit() and os.path.basename(parent) in ("transformer", "tokenizer"):
        if os.path.basename(parent) != "transformer":
            raise ValueError(f"{path} is a tokenizer step; pass the workdir or a transformer step")
        return os.path.dirname(parent), int(name)
    if name in ("transformer", "tokenizer") and not paths.is_dir(os.path.join(path, "transformer")):
        return parent, None
    return path, None


def _config(workdir: str, config: ml_collections.ConfigDict | None) -> ml_collections.ConfigDict:
    if isinstance(config, ml_collections.ConfigDict):
        return config
    if config is not None:
        return config_io.resolve_config(config)
    if not paths.is_file(os.path.join(workdir, "config.json")):
        raise ValueError(f"{workdir} has no config.json; pass config= (the config file it was trained with)")
    return config_io.read_config(workdir)


def _abstract_params(module: nn.Module, example: Any, device: jax.Device) -> Any:
    boxed = jax.eval_shape(lambda k: module.init(k, example)["params"], jax.random.key(0))
    sharding = jax.sharding.SingleDeviceSharding(device)
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding),
                        nn.meta.unbox(boxed))


def _restore_ema(stage_dir: str, abstract: Any, step: Optional[int]) -> tuple[Any, Any]:
    """EMA params (or plain params when the checkpoint has none) of `step` / the latest step."""
    if not paths.is_dir(stage_dir):
        raise ValueError(f"missing checkpoint directory {stage_dir}")
    ckpt = ckpt_lib.StageCheckpoints(stage_dir, best_metric=None, read_only=True)
    latest = step if step is not None else ckpt.latest_step()
    if latest is None:
        raise ValueError(f"no checkpoint found in {stage_dir}")
    try:
        saved = ckpt.saved_tree(latest)
    except Exception:  # noqa: BLE001 - unreadable: restore_subtree reports and falls back
        saved = {"ema_params": None}
    key = "ema_params" if "ema_params" in saved else "params"
    tree, got = ckpt_lib.restore_subtree(stage_dir, {key: abstract}, step)
    return tree[key], got


def load(path: Union[str, os.PathLike], config: ml_collections.ConfigDict | None = None,
         device: jax.Device | None = None) -> Bundle:
    """Loads a Bundle from a workdir or checkpoint directory (see module docstring)."""
    workdir, transformer_step = _split_path(path)
    cfg = _config(workdir, config)
    device = device or jax.local_devices()[0]
    tokenizer = factory.tokenizer_model(cfg)
    layout, grid = token_layout(cfg), token_grid(cfg)
    length = seq_len(cfg)
    transformer = factory.transformer_model(cfg)
    image_shape = (int(cfg.image_size), int(cfg.image_size), int(cfg.image_channels))

    tok_abstract = _abstract_params(tokenizer, jnp.zeros((1,) + image_shape, jnp.float32), device)
    transformer_abstract = _abstract_params(transformer, jnp.zeros((1, length), jnp.int32), device)
    tok_params, tok_step = _restore_ema(os.path.join(workdir, "tokenizer"), tok_abstract, None)
    steps = {"tokenizer": tok_step}
    decoder_dir = os.path.join(workdir, "decoder")
    if ckpt_lib.has_steps(decoder_dir):  # the decoder stage: fine-tuned decoder, same encoder and codes
        dec, steps["decoder"] = _restore_ema(decoder_dir, {"decoder": tok_abstract["decoder"]}, None)
        tok_params = {**tok_params, "decoder": dec["decoder"]}
    transformer_params, trained_step = _restore_ema(os.path.join(workdir, "transformer"),
                                                    transformer_abstract, transformer_step)
    log.info("bundle: tokenizer step %d, transformer step %d from %s", tok_step, trained_step, workdir)
    return Bundle(tokenizer=tokenizer, transformer=transformer,
                  params={"tokenizer": tok_params, "transformer": transformer_params}, config=cfg,
                  layout=layout, image_shape=image_shape, token_grid=tuple(grid),
                  steps=dict(steps, transformer=trained_step))
