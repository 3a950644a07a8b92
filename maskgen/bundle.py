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

The models are built from the config saved with the transformer step being
loaded (every step carries the run's config, see `maskgen.checkpoint`), so a
workdir stays loadable after its `config.json` was rewritten; steps written
before steps carried a config use `config.json`. An explicit `config=` wins over both.
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


def _saved_config(ckpt: ckpt_lib.StageCheckpoints, step: int) -> ml_collections.ConfigDict | None:
    """The config saved with transformer `step`; None for a step from before steps carried one.

    An unreadable config item is logged and treated as absent: config.json is the fallback.
    """
    where = f"the config saved with {ckpt.directory} step {step}"
    try:
        data = ckpt.saved_config(step)
        return None if data is None else config_io.from_dict(data, where)
    except Exception as err:  # noqa: BLE001 - any read failure: fall back to config.json
        log.warning("%s is unreadable (%s: %s); using config.json", where, type(err).__name__, err)
        return None


def _flat(tree: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _param_shapes(cfg: ml_collections.ConfigDict) -> Any:
    """Shapes of the tokenizer and transformer parameters `cfg` builds (traced, nothing allocated)."""
    image = jnp.zeros((1, int(cfg.image_size), int(cfg.image_size), int(cfg.image_channels)), jnp.float32)
    models = ((factory.tokenizer_model(cfg), image),
              (factory.transformer_model(cfg), jnp.zeros((1, seq_len(cfg)), jnp.int32)))
    trees = [jax.eval_shape(lambda k, m=m, x=x: nn.meta.unbox(m.init(k, x)["params"]), jax.random.key(0))
             for m, x in models]
    return jax.tree.map(lambda a: tuple(a.shape), trees)


def _warn_if_config_json_differs(workdir: str, saved: ml_collections.ConfigDict, step: int) -> None:
    """One log line when config.json would build other parameter shapes than the step's config (which wins)."""
    path = os.path.join(workdir, "config.json")
    if not paths.is_file(path):
        return
    try:
        current = config_io.read_config(workdir)
    except ValueError as err:
        log.warning("%s is unusable (%s); using the config saved with transformer step %d", path, err, step)
        return
    if config_io.to_json(current) == config_io.to_json(saved):
        return
    try:
        same = _param_shapes(current) == _param_shapes(saved)
    except Exception:  # noqa: BLE001 - config.json cannot even build the models: it differs
        same = False
    if same:
        return
    now, then = _flat(current.to_dict()), _flat(saved.to_dict())
    keys = sorted(k for k in now.keys() | then.keys() if now.get(k) != then.get(k))
    shown = ", ".join(f"{k}: {now.get(k)!r} in config.json, {then.get(k)!r} in the step" for k in keys[:3])
    log.warning("%s differs from the config saved with transformer step %d in parameter shapes (%s%s); "
                "loading with the step's config", path, step, shown, ", ..." if len(keys) > 3 else "")


def _config(workdir: str, config: ml_collections.ConfigDict | str | None, ckpt: ckpt_lib.StageCheckpoints,
            step: int) -> tuple[ml_collections.ConfigDict, str]:
    """(config, where it came from): `config=`, else the one saved with transformer `step`, else config.json."""
    if isinstance(config, ml_collections.ConfigDict):
        return config, "config="
    if config is not None:
        return config_io.resolve_config(config), "config="
    saved = _saved_config(ckpt, step)
    if saved is not None:
        _warn_if_config_json_differs(workdir, saved, step)
        return saved, f"the config saved with transformer step {step}"
    if not paths.is_file(os.path.join(workdir, "config.json")):
        raise ValueError(f"{workdir} has no config.json; pass config= (the config file it was trained with)")
    return config_io.read_config(workdir), "config.json"


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


def _load_transformer(workdir: str, wanted: int | None, config: ml_collections.ConfigDict | str | None,
                      device: jax.Device) -> tuple[ml_collections.ConfigDict, str, Transformer, Any, int]:
    """(config, its source, transformer, EMA params, step) of `wanted` or the newest readable step.

    Each candidate step is built with its own config, so the config is always the loaded step's, also
    when an unreadable newer step is skipped.
    """
    stage_dir = os.path.join(workdir, "transformer")
    if not paths.is_dir(stage_dir):
        raise ValueError(f"missing checkpoint directory {stage_dir}")
    ckpt = ckpt_lib.StageCheckpoints(stage_dir, best_metric=None, read_only=True)
    candidates = [wanted] if wanted is not None else ckpt.steps()[::-1]
    if not candidates:
        raise ValueError(f"no checkpoint found in {stage_dir}")
    errors = []
    for step in candidates:
        cfg, source = _config(workdir, config, ckpt, step)
        transformer = factory.transformer_model(cfg)
        abstract = _abstract_params(transformer, jnp.zeros((1, seq_len(cfg)), jnp.int32), device)
        try:
            params, got = _restore_ema(stage_dir, abstract, step)
        except ckpt_lib.CheckpointMismatchError:
            raise
        except ValueError as err:  # unreadable (restore_subtree logged it): the previous step
            errors.append(str(err).removeprefix(f"no readable checkpoint in {ckpt.directory}: "))
            continue
        return cfg, source, transformer, params, got
    raise ValueError(f"no readable checkpoint in {ckpt.directory}: " + "; ".join(errors))


def load(path: Union[str, os.PathLike], config: ml_collections.ConfigDict | str | None = None,
         device: jax.Device | None = None) -> Bundle:
    """Loads a Bundle from a workdir or checkpoint directory (see module docstring)."""
    workdir, transformer_step = _split_path(path)
    device = device or jax.local_devices()[0]
    cfg, source, transformer, transformer_params, trained_step = _load_transformer(
        workdir, transformer_step, config, device)
    tokenizer = factory.tokenizer_model(cfg)
    layout, grid = token_layout(cfg), token_grid(cfg)
    image_shape = (int(cfg.image_size), int(cfg.image_size), int(cfg.image_channels))

    tok_abstract = _abstract_params(tokenizer, jnp.zeros((1,) + image_shape, jnp.float32), device)
    tok_params, tok_step = _restore_ema(os.path.join(workdir, "tokenizer"), tok_abstract, None)
    steps = {"tokenizer": tok_step}
    decoder_dir = os.path.join(workdir, "decoder")
    if ckpt_lib.has_steps(decoder_dir):  # the decoder stage: fine-tuned decoder, same encoder and codes
        dec, steps["decoder"] = _restore_ema(decoder_dir, {"decoder": tok_abstract["decoder"]}, None)
        tok_params = {**tok_params, "decoder": dec["decoder"]}
    log.info("bundle: tokenizer step %d, transformer step %d from %s (models built from %s)", tok_step,
             trained_step, workdir, source)
    return Bundle(tokenizer=tokenizer, transformer=transformer,
                  params={"tokenizer": tok_params, "transformer": transformer_params}, config=cfg,
                  layout=layout, image_shape=image_shape, token_grid=tuple(grid),
                  steps=dict(steps, transformer=trained_step))
