"""Convert official MaskGIT checkpoints into a maskgen checkpoint directory.

    python -m maskgen.convert --official tokenizer_imagenet256_checkpoint \
        --kind tokenizer --config imagenet256 --out ckpt/in256
    python -m maskgen.convert --official maskgit_imagenet256_checkpoint \
        --kind transformer --config imagenet256 --out ckpt/in256
    python sample.py --workdir=ckpt/in256 --classes=1,88,207 --per_class=4

Every tensor of the official file is checked against the model the maskgen
config builds (an error names the first missing or mis-shaped one), then the
parameters are written the way training writes them: `OUT/config.json` and
`OUT/<kind>/0/` (orbax, `state/{step, params, ema_params}`; both parameter
entries hold the official weights, so `maskgen.load`, `sample.py`, the editing
API and a transformer stage with `tokenizer_workdir=OUT` all read it).
Converting both kinds into the same OUT gives a complete, loadable workdir.
"""
import argparse
import os
import sys
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections

from maskgen import checkpoint as ckpt_lib
from maskgen import config_io, official, paths
from maskgen.config_io import resolve_config  # noqa: F401 - public here since the first release
from maskgen.models import factory
from maskgen.models.sizes import seq_len

KINDS = ("tokenizer", "transformer")
CONVERTED_STEP = 0
def build_model(kind: str, cfg: ml_collections.ConfigDict) -> Any:
    """The maskgen module the config builds for `kind`."""
    if kind == "tokenizer":
        return factory.tokenizer_model(cfg)
    if kind == "transformer":
        return factory.transformer_model(cfg)
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


def _example_input(kind: str, cfg: ml_collections.ConfigDict) -> jax.Array:
    if kind == "tokenizer":
        return jnp.zeros((1, cfg.image_size, cfg.image_size, cfg.image_channels), jnp.float32)
    return jnp.zeros((1, seq_len(cfg)), jnp.int32)


def check_against_config(params: dict, kind: str, cfg: ml_collections.ConfigDict, what: str) -> None:
    """Raises ValueError naming the first tensor that does not fit the config's model."""
    official.check_kind(params, kind, what)
    model = build_model(kind, cfg)
    expected = jax.eval_shape(model.init, jax.random.PRNGKey(0), _example_input(kind, cfg))["params"]
    try:
        official.check_tree(params, expected, what)
    except ValueError as err:
        if kind == "transformer" and cfg.null_class:
            raise ValueError(f"{err} (the config reserves a null class, null_class=True; official "
                             "checkpoints have none, set null_class=False)") from err
        raise


def _write_config(cfg: ml_collections.ConfigDict, out_dir: str) -> None:
    """Writes OUT/config.json, or checks that an existing one holds the same config."""
    path = os.path.join(out_dir, "config.json")
    if paths.is_file(path):
        if config_io.to_json(config_io.read_config(out_dir)) != config_io.to_json(cfg):
            raise ValueError(f"{path} holds a different config; convert into another --out "
                             "directory or use the config it was written with")
        return
    config_io.write_config(cfg, out_dir)


def convert(official_path: str, kind: str, config: ml_collections.ConfigDict, out_dir: str) -> str:
    """Checks and writes one official checkpoint into `out_dir`; returns the stage directory."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    cfg = resolve_config(config)
    out_dir = paths.check_storage(out_dir, write=True, what="--out")  # local or gs://
    stage_dir = os.path.join(out_dir, kind)
    if paths.listdir(stage_dir):
        raise ValueError(f"{stage_dir} already exists and is not empty; remove it or choose another --out")
    source = paths.check_storage(official_path, write=False, what="--official")
    params = official.read_official(source)["params"]
    check_against_config(params, kind, cfg, f"{kind} checkpoint {source}")

    _write_config(cfg, out_dir)
    params = jax.tree_util.tree_map(jnp.asarray, params)
    ckpt = ckpt_lib.StageCheckpoints(stage_dir, keep=1, best_metric=None, async_save=False, config=cfg)
    try:
        ckpt.save(CONVERTED_STEP,
                  {"step": jnp.int32(CONVERTED_STEP), "params": params, "ema_params": params},
                  {"kind": "converted", "source": source, "format": "google-research/maskgit"})
        ckpt.wait()
    finally:
        ckpt.close()
    return stage_dir


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m maskgen.convert", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--official", required=True, help="official checkpoint file (flax msgpack)")
    parser.add_argument("--kind", required=True, choices=KINDS)
    parser.add_argument("--config", required=True,
                        help="maskgen config: a name in configs/ (imagenet256, imagenet512) or a file")
    parser.add_argument("--out", required=True, help="output directory (a maskgen workdir)")
    parser.add_argument("--verbose", action="store_true",
                        help="tracebacks for user errors too (MASKGEN_VERBOSE=1)")
    args = parser.parse_args(argv)
    try:
        stage_dir = convert(args.official, args.kind, args.config, args.out)
    except Exception as err:  # noqa: BLE001 - one line for user errors, the traceback for bugs
        from maskgen import cli
        return cli.report(err, argv)
    config_path = os.path.join(os.path.dirname(stage_dir), "config.json")
    print(f"wrote {args.kind} to {stage_dir} (config {config_path})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
