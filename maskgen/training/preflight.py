"""Everything a training run checks before it writes a byte to the workdir.

Why: a run rejected after start-up used to leave `config.json` rewritten with the rejected overrides,
so `sample.py` on that workdir failed too until someone guessed the old flags (issue 16). Here every
check that can fail on user input runs first, reading only: the stage settings and the mesh and batch,
the data directory, and each stage's existing checkpoints against the model this config builds
(parameter shapes from orbax's checkpoint *metadata*, no arrays restored). Only when all pass does
`trainer` lock the workdir and write `config.json`.

It also reports what will run: the effective per-stage steps, batch and checkpoint cadence, which
top-level command-line overrides a stage block shadows (`--config.num_train_steps` does nothing for a
stage whose block sets its own value), and stages whose EMA would still be mostly their starting weights
at the end (the EMA parameters are what sampling, evaluation and the next stage use).
"""
import logging
import os
from typing import Any, Callable, Dict, List, Sequence

import jax
import ml_collections
from etils import epath
from flax import linen as nn
from jax.sharding import Mesh

from maskgen import checkpoint as ckpt_lib
from maskgen.models.factory import discriminator_model, tokenizer_model, transformer_model
from maskgen.models.sizes import seq_len
from maskgen.training import decoder_step, optimizer, stage_setup
from maskgen.training import tokenizer_step as tts
from maskgen.training import transformer_step as tst

log = logging.getLogger(__name__)

# Datasets that are prepared (written) under dataset.data_dir on first use.
_PREPARED_DATASETS = ("fashion_mnist",)
_NO_DATA_DIR = ("synthetic", "synthetic_tokens")


def stage_init(cfg: ml_collections.ConfigDict, stage: str, scfg: ml_collections.ConfigDict) -> Callable:
    """The stage's `init(key) -> boxed TrainState`, as its `build` makes it (for shapes only)."""
    num_steps = int(scfg.num_train_steps)
    tx, _ = optimizer.adamw(scfg, num_steps)
    if stage in ("tokenizer", "decoder"):
        disc_tx, _ = optimizer.adamw(scfg, num_steps, learning_rate=scfg.disc_learning_rate)
        image_shape = (cfg.image_size, cfg.image_size, cfg.image_channels)
        if stage == "tokenizer":  # scfg: the codes' usage EMA is part of the state when codes restart
            return tts.make_init(tokenizer_model(cfg), discriminator_model(cfg), tx, disc_tx, image_shape, scfg)
        return decoder_step.make_init(tokenizer_model(cfg), discriminator_model(cfg), tx, disc_tx, image_shape)
    return tst.make_init(transformer_model(cfg), tx, seq_len(cfg))


def check_checkpoints(cfg: ml_collections.ConfigDict, stage: str, scfg: ml_collections.ConfigDict,
                      workdir: str) -> None:
    """Raises CheckpointMismatchError when the stage's newest readable step was written by another model.

    Read-only: a step whose metadata cannot be read is skipped here (the restore moves it aside later).
    """
    stage_dir = epath.Path(workdir) / stage
    if not stage_dir.is_dir():
        return
    steps = sorted((int(p.name) for p in stage_dir.iterdir() if p.name.isdigit()), reverse=True)
    if not steps:
        return
    ckpt = ckpt_lib.StageCheckpoints(os.fspath(stage_dir), best_metric=None, read_only=True)
    try:
        for step in steps:
            try:
                saved = ckpt.saved_tree(step)
            except Exception:  # noqa: BLE001 - unreadable: the restore reports and falls back
                continue
            boxed = jax.eval_shape(stage_init(cfg, stage, scfg), jax.random.key(0))
            target = nn.meta.unbox(boxed).to_tree()
            ckpt_lib.check_compatible(saved, target, f"checkpoint {stage_dir} step {step}")
            return
    finally:
        ckpt.close()


def check_data_dir(cfg: ml_collections.ConfigDict) -> None:
    """A data_dir that does not exist is created only below an existing parent (a typo fails instead).

    The config's default (None: tfds' ~/tensorflow_datasets) is created as before, so the README's
    default job still works on a fresh machine.
    """
    dataset = cfg.dataset
    data_dir = dataset.get("data_dir")
    if not data_dir or dataset.name in _NO_DATA_DIR:
        return
    path = epath.Path(os.path.expanduser(str(data_dir)))
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"dataset.data_dir {data_dir} is not a directory")
        return
    if dataset.name not in _PREPARED_DATASETS and not os.path.isdir(str(dataset.name)):
        raise ValueError(f"dataset.data_dir {data_dir} does not exist; dataset {dataset.name!r} must already "
                         "be prepared there (check --config.dataset.data_dir)")
    if not path.parent.is_dir():
        raise ValueError(f"dataset.data_dir {data_dir} does not exist, nor does its parent {path.parent}: a "
                         f"typo? Create it (mkdir -p {data_dir}) to prepare {dataset.name!r} there")
    log.warning("dataset.data_dir %s does not exist: %s will be prepared there", data_dir, dataset.name)


def shadowed_overrides(cfg: ml_collections.ConfigDict, stages: Sequence[str],
                       overrides: Sequence[str], inherited: Sequence[str]) -> List[str]:
    """Messages for top-level overrides (`--config.num_train_steps`) that a stage block overrules."""
    messages = []
    for key in inherited:
        if key not in overrides:
            continue
        for stage in stages:
            own = cfg[f"{stage}_train"].get(key)
            if own is not None and own != cfg[key]:
                messages.append(f"--config.{key}={cfg[key]} does not apply to the {stage} stage: "
                                f"{stage}_train.{key}={own} is set in the config and wins (set "
                                f"--config.{stage}_train.{key} to change it)")
    return messages


# An EMA that keeps more than this share of its starting weights after the stage's steps is reported.
EMA_START_SHARE_LIMIT = 0.05


def ema_lag_warnings(stage_configs: Dict[str, Any]) -> List[str]:
    """Messages for stages whose EMA ends with a large share of its starting weights.

    The EMA starts at the stage's first parameters (random ones, or the tokenizer's decoder in the
    decoder stage) and keeps ema_decay ** steps of them: 0.999 over 400 steps keeps 67%.
    """
    messages = []
    for stage, scfg in stage_configs.items():
        decay, steps = float(scfg.get("ema_decay", 0.0) or 0.0), int(scfg.num_train_steps)
        share = decay ** steps
        if share > EMA_START_SHARE_LIMIT:
            messages.append(
                f"{stage}_train.ema_decay={decay} over {steps} steps leaves {share:.0%} of the starting "
                f"weights in the EMA parameters that sampling and evaluation use; lower ema_decay "
                f"(e.g. {_suggested_decay(steps)}) or train longer")
    return messages


def _suggested_decay(steps: int) -> float:
    """The largest of 0.9 / 0.99 / 0.995 / 0.999 / ... whose EMA averages over at most a quarter of the
    steps (it then keeps about e^-4 = 2% of its start)."""
    best = 0.9
    for decay in (0.99, 0.995, 0.999, 0.9995, 0.9999):
        if 1.0 / (1.0 - decay) <= steps / 4:
            best = decay
    return best


def override_keys(argv: Sequence[str]) -> List[str]:
    """Config keys set on a command line (`--config.a.b=1` -> 'a.b')."""
    keys = []
    for arg in argv:
        if arg.startswith("--config.") and len(arg) > len("--config."):
            keys.append(arg[len("--config."):].split("=", 1)[0])
    return keys


def preflight(cfg: ml_collections.ConfigDict, workdir: str, mesh: Mesh, stage_configs: Dict[str, Any],
              overrides: Sequence[str] = (), inherited: Sequence[str] = ()) -> None:
    """All checks before the first write (see the module docstring); raises ValueError on the first.

    `overrides`: config keys set on the command line; `inherited`: the top-level keys stage blocks inherit.
    """
    for stage, scfg in stage_configs.items():
        stage_setup.check_batch_divisible(stage, int(scfg.batch_size), mesh)
    check_data_dir(cfg)
    workdir_path = epath.Path(workdir)
    if workdir_path.exists() and not workdir_path.is_dir():
        raise ValueError(f"--workdir {workdir} exists and is not a directory")
    for stage, scfg in stage_configs.items():
        try:
            check_checkpoints(cfg, stage, scfg, workdir)
        except ckpt_lib.CheckpointMismatchError as err:
            raise ckpt_lib.CheckpointMismatchError(
                f"{err}. Nothing was changed in {workdir}: rerun with the settings its config.json records, "
                "or train this config in another --workdir") from None
    if jax.process_index() == 0:
        for stage, scfg in stage_configs.items():
            log.info("stage %s: %d steps, batch %d, checkpoint every %d steps, keep %d", stage,
                     int(scfg.num_train_steps), int(scfg.batch_size), int(scfg.checkpoint_every_steps),
                     int(cfg.keep_checkpoints))
        for message in shadowed_overrides(cfg, list(stage_configs), overrides, inherited):
            log.warning("%s", message)
        for message in ema_lag_warnings(stage_configs):
            log.warning("%s", message)
