"""Class-conditional sampling (and editing) from a maskgen workdir or checkpoint.

    python sample.py --workdir=workdir/fashion_mnist --classes=0,1,2 --per_class=8 --out=out/
    python sample.py --workdir=DIR --steps=32 --recap_full_only_steps=12 --recap_cheap_per_full=1

Writes OUT/grid.png (one row per class) and OUT/samples.npz with `images` (uint8 [N,H,W,C]), `labels` [N]
and `tokens` [N,h,w]. Decoding options default to the model config's `sampling` block; every flag
below overrides one of them. `--edit` switches to editing (see maskgen/edit_cli.py).
Flags are checked before the model loads: a bad value exits 2 with one line naming the flag; other
errors exit 1 with one line (`--verbose` or MASKGEN_VERBOSE=1 adds the traceback).
"""
import os
from typing import Sequence

from absl import flags

from maskgen.cli import UsageError

_WORKDIR = flags.DEFINE_string("workdir", None, "training workdir (or a converted checkpoint directory)")
_CONFIG = flags.DEFINE_string("config", None, "config file for a checkpoint directory that has no config.json")
_OUT = flags.DEFINE_string("out", None, "output directory (default WORKDIR/samples)")
_CLASSES = flags.DEFINE_string("classes", None, "comma-separated class ids (default: all classes)")
_PER_CLASS = flags.DEFINE_integer("per_class", 8, "samples per class")
_SEED = flags.DEFINE_integer("seed", 0, "sampling seed (per-example keys: fold_in(seed, index))")
_BATCH = flags.DEFINE_integer("batch_size", 64, "images per compiled batch (larger requests are split)")
_SCALE = flags.DEFINE_integer("grid_scale", 0, "enlarge the grid PNG by pixel repetition (0 = automatic)")

# Decoding options (None = the config's value).
_STEPS = flags.DEFINE_integer("steps", None, "decoding steps T")
_SCHEDULE = flags.DEFINE_string("schedule", None, "mask schedule: cosine, uniform, pow2.5, log, exp, arccos ...")
_GUIDANCE = flags.DEFINE_float("guidance", None, "classifier-free guidance scale (1 = off)")
_GUIDANCE_SCHEDULE = flags.DEFINE_string("guidance_schedule", None, "constant | linear | pow-cosine")
_CHOICE_T = flags.DEFINE_float("choice_temperature", None, "confidence-noise temperature (annealed to 0)")
_TEMPERATURE = flags.DEFINE_float("temperature", None, "token sampling temperature")
_TOP_K = flags.DEFINE_integer("top_k", None, "sample among the k most likely codes (0 = off)")
_TOP_P = flags.DEFINE_float("top_p", None, "nucleus sampling mass (1 = off)")
_ORDER = flags.DEFINE_string("order", None, "confidence | halton")
flags.DEFINE_integer("recap_full_only_steps", None, "recap: P leading steps that use full evaluations only")
flags.DEFINE_integer("recap_cheap_per_full", None,
                     "recap: K cheap (context-reusing) evaluations after each full one; 0 = ReCAP off")

flags.DEFINE_boolean("verbose", False, "print tracebacks of user errors too (also MASKGEN_VERBOSE=1)")

FLAGS = flags.FLAGS


def sampling_overrides() -> dict:
    """The decoding flags the user set, as `sampling` config keys."""
    names = {"steps": _STEPS, "schedule": _SCHEDULE, "guidance_scale": _GUIDANCE,
             "guidance_schedule": _GUIDANCE_SCHEDULE, "choice_temperature": _CHOICE_T,
             "temperature": _TEMPERATURE, "top_k": _TOP_K, "top_p": _TOP_P, "order": _ORDER}
    out = {k: f.value for k, f in names.items() if f.value is not None}
    for k in ("recap_full_only_steps", "recap_cheap_per_full"):
        if FLAGS[k].value is not None:
            out[k] = FLAGS[k].value
    return out


def parse_classes(text: str | None, num_classes: int) -> list[int]:
    if text is None:
        return list(range(num_classes))
    try:
        return [int(c) for c in text.split(",") if c.strip()]
    except ValueError:
        raise ValueError(f"--classes must be comma-separated integers, got {text!r}") from None


def check_flags() -> None:
    """Flag values that are wrong whatever the model: UsageError (exit 2) before anything loads."""
    if not _WORKDIR.value:
        raise UsageError("--workdir is required")
    for flag, low in ((_BATCH, 1), (_PER_CLASS, 1), (_SCALE, 0), (_STEPS, 1), (_TOP_K, 0),
                      (FLAGS["recap_full_only_steps"], 0), (FLAGS["recap_cheap_per_full"], 0)):
        if flag.value is not None and flag.value < low:
            raise UsageError(f"--{flag.name} must be >= {low}, got {flag.value}")
    if _TOP_P.value is not None and not 0.0 < _TOP_P.value <= 1.0:
        raise UsageError(f"--top_p must be in (0, 1], got {_TOP_P.value}")
    out = _OUT.value
    if out and os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"--out {out} is an existing file; --out names a directory (it will hold "
                         "grid.png and samples.npz)")


def check_recap(sampling: dict) -> None:
    """ReCAP against the decoding steps, naming the flags (the config's value when a flag is unset)."""
    steps = int(sampling["steps"])
    full_only = int(sampling.get("recap_full_only_steps") or 0)
    if full_only > steps:
        raise UsageError(f"--recap_full_only_steps={full_only} is larger than the decoding steps "
                         f"(--steps or the config's sampling.steps: {steps}); it must be <= {steps}")


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise UsageError(f"unexpected arguments: {argv[1:]}")
    check_flags()
    if FLAGS["edit"].value:
        from maskgen import edit_cli
        edit_cli.check_out(FLAGS)
    import numpy as np

    import maskgen
    from maskgen import paths
    from maskgen.image_grid import make_grid, save_npz, save_png
    from maskgen.sampling import Sampler, decode_config_from, recap_config_from

    # gs:// paths: scheme, credentials, bucket and permissions are checked before any model work.
    paths.check_storage(_WORKDIR.value, write=False, what="--workdir")
    if FLAGS["edit"].value:
        paths.check_storage(FLAGS["out"].value or os.path.join(_WORKDIR.value, "edit"), write=True,
                            what="--out")
    else:
        out_dir = paths.check_storage(_OUT.value or os.path.join(_WORKDIR.value, "samples"), write=True,
                                      what="--out")
    bundle = maskgen.load(_WORKDIR.value, config=_CONFIG.value)
    if FLAGS["edit"].value:
        from maskgen import edit_cli
        return edit_cli.run_edit(bundle, FLAGS)

    sampling = dict(bundle.config.sampling)
    sampling.update(sampling_overrides())
    check_recap(sampling)
    classes = parse_classes(_CLASSES.value, bundle.layout.num_real_classes)
    bundle.layout.check_labels(classes)
    if _PER_CLASS.value < 1:
        raise ValueError(f"--per_class must be >= 1, got {_PER_CLASS.value}")
    labels = np.repeat(np.asarray(classes), _PER_CLASS.value)

    sampler = Sampler(bundle, decode_config_from(sampling, bundle.token_grid),
                      recap_config_from(sampling))
    # Compile (same batch shape) outside the timed run so images/s measures decoding, not XLA.
    sampler.generate(labels[:_BATCH.value], seed=_SEED.value, batch_size=_BATCH.value, progress=False)
    out = sampler.generate(labels, seed=_SEED.value, batch_size=_BATCH.value)

    scale = _SCALE.value or max(1, 128 // bundle.image_shape[0])
    grid = make_grid(out["images"], rows=len(classes))
    save_npz(os.path.join(out_dir, "samples.npz"), images=out["images"], labels=out["labels"],
             tokens=out["tokens"])
    save_png(grid, os.path.join(out_dir, "grid.png"), scale=scale)
    print(f"{len(labels)} images in {out['seconds']:.2f} s ({out['images_per_s']:.1f} images/s, "
          f"batch {min(_BATCH.value, len(labels))}) -> {out_dir}/grid.png, {out_dir}/samples.npz")


if __name__ == "__main__":
    from maskgen import cpu_host
    cpu_host.restart_with_cpu_settings()  # XLA:CPU hosts only; before JAX starts
    from maskgen import cli, edit_cli
    edit_cli.add_edit_flags()
    cli.run_absl(main)
