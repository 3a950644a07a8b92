"""Tokenizer study: train tokenizer variants of a config alone and score their reconstructions.

    python bench/tokenizer_study.py --variant=vq --variant=fsq1000 --workroot=/tmp/study
    python bench/tokenizer_study.py --variant=fsq1000 --steps=700 --set=tokenizer_train.l1_weight=1.0

Each variant runs `train.py` with `stages=('tokenizer',)` (plus `'decoder'` for the `+dec`
variants) on the config (default `fashion_mnist`), then reconstructs the first 1000 real test
images and scores them as the end-of-training report does: Fréchet distance in the project's
classifier features against the real test split, its real-train floor, PSNR over 2000 test images,
and code use (fraction of codes, perplexity) on the whole test split. One JSON row per variant,
with the CPU model and ISA, is appended to `bench/results/tokenizer_study.json`. Variants are
override lists (VARIANTS below); `--set` adds overrides to every variant.
"""
import argparse
import datetime
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

RESULTS = os.path.join(REPO, "bench", "results", "tokenizer_study.json")
_KMEANS = ["tokenizer_train.vq_init=kmeans", "tokenizer_train.vq_restart_threshold=0.05"]
# Rows before 2026-12-05 ran on the config's old tokenizer (256 codes, random init, no restarts):
# "vq" there is today's "vq256_random"; the other variants override what they name.
VARIANTS = {
    "vq": [],  # the config's own tokenizer
    "vq256_random": ["tokenizer.codebook_size=256", "tokenizer_train.vq_init=random",
                     "tokenizer_train.vq_restart_threshold=0.0"],
    "vq_l1": ["tokenizer_train.l1_weight=1.0", "tokenizer_train.l2_weight=0.0"],
    "vq_kmeans": _KMEANS,
    "vq1024_kmeans": ["tokenizer.codebook_size=1024"] + _KMEANS,
    "fsq256": ["tokenizer.quantizer=fsq", "tokenizer.fsq_levels=(4,4,4,4)"],
    "fsq1000": ["tokenizer.quantizer=fsq", "tokenizer.fsq_levels=(8,5,5,5)"],
    "fsq4375": ["tokenizer.quantizer=fsq", "tokenizer.fsq_levels=(7,5,5,5,5)"],
    "lfq256": ["tokenizer.quantizer=lfq", "tokenizer.lfq_bits=8", "tokenizer.entropy_loss_ratio=0.1"],
    "lfq1024": ["tokenizer.quantizer=lfq", "tokenizer.lfq_bits=10", "tokenizer.entropy_loss_ratio=0.1"],
}


def variant_overrides(name: str) -> tuple[list[str], bool]:
    """(overrides, with decoder stage) for `NAME` or `NAME+dec`."""
    base, _, suffix = name.partition("+")
    if base not in VARIANTS or suffix not in ("", "dec"):
        raise SystemExit(f"unknown variant {name!r}; choose from {sorted(VARIANTS)} (optionally +dec)")
    return list(VARIANTS[base]), suffix == "dec"


def train(config: str, workdir: str, overrides: list[str], decoder: bool, log_path: str) -> dict:
    """Runs train.py; returns wall seconds per stage from its log."""
    stages = "('tokenizer','decoder')" if decoder else "('tokenizer',)"
    cmd = [sys.executable, os.path.join(REPO, "train.py"), f"--config={config}", f"--workdir={workdir}",
           f"--config.stages={stages}"] + [f"--config.{o}" for o in overrides]
    start = time.perf_counter()
    with open(log_path, "w") as log:
        subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    return dict(train_seconds=time.perf_counter() - start, command=" ".join(cmd[1:]))


def score(workdir: str, cache_dir: str, count: int = 1000) -> dict:
    """Reconstruction Fréchet / floor / PSNR / code use of the tokenizer (+ decoder) in `workdir`."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from maskgen import bundle as bundle_lib
    from maskgen import config_io, data
    from maskgen.eval.fashion import fashion_quality
    from maskgen.eval.reconstruction import reconstruction_error
    from maskgen.models import factory, quantizers

    cfg = config_io.read_config(workdir)
    tok = factory.tokenizer_model(cfg)
    device = jax.local_devices()[0]
    shape = (cfg.image_size, cfg.image_size, cfg.image_channels)
    abstract = bundle_lib._abstract_params(tok, jnp.zeros((1,) + shape, jnp.float32), device)
    params, _ = bundle_lib._restore_ema(os.path.join(workdir, "tokenizer"), abstract, None)
    if os.path.isdir(os.path.join(workdir, "decoder")):
        dec, _ = bundle_lib._restore_ema(os.path.join(workdir, "decoder"), {"decoder": abstract["decoder"]}, None)
        params = {**params, "decoder": dec["decoder"]}
    variables = {"params": params}
    recon_fn = jax.jit(lambda x: jnp.round(jnp.clip(tok.apply(variables, x)[0], 0, 1) * 255))
    counts_fn = jax.jit(lambda x: quantizers.code_counts(
        tok.apply(variables, x, method=tok.encode_to_indices), tok.num_codes))
    train_split = data.load_arrays("fashion_mnist", "train", cfg.dataset.data_dir)
    test = data.load_arrays("fashion_mnist", "test", cfg.dataset.data_dir)
    kept = []

    def reconstruct(batch):
        kept.append(np.asarray(recon_fn(jnp.asarray(batch, jnp.float32) / 255.0)))
        return kept[-1]

    err = reconstruction_error(test[0][:2000], reconstruct, batch_size=250)
    recon = np.concatenate(kept)[:count].astype(np.uint8)
    report = fashion_quality(recon, test[1][:count], cache_dir, train=train_split, test=test,
                             reconstructions=recon, progress=False)
    total = np.zeros((tok.num_codes,), np.float64)
    for start in range(0, len(test[0]), 500):
        total += np.asarray(counts_fn(jnp.asarray(test[0][start:start + 500], jnp.float32) / 255.0))
    usage = quantizers.usage_stats(total)
    floor = report["frechet_floor"]
    return dict(num_codes=int(tok.num_codes), reconstruction_frechet=report["reconstruction_frechet"],
                frechet_floor=floor, frechet_ratio=report["reconstruction_frechet"] / floor,
                recon_class_accuracy=report["class_accuracy"], psnr=float(err["psnr"]),
                mse=float(err["mse"]), codebook_usage=float(usage["codebook_usage"]),
                codebook_perplexity=float(usage["perplexity"]))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", action="append", required=True, help="VARIANTS key, optionally +dec")
    parser.add_argument("--config", default="configs/fashion_mnist.py")
    parser.add_argument("--steps", type=int, default=0, help="tokenizer steps (0: the config's)")
    parser.add_argument("--decoder_steps", type=int, default=600)
    parser.add_argument("--set", action="append", default=[], help="extra override a.b=v for every variant")
    parser.add_argument("--workroot", default="/tmp/tokenizer_study")
    parser.add_argument("--out", default=RESULTS)
    parser.add_argument("--note", default="")
    args = parser.parse_args(argv)
    from maskgen import hardware
    machine = hardware.cpu_info()
    os.makedirs(args.workroot, exist_ok=True)
    for name in args.variant:
        overrides, decoder = variant_overrides(name)
        if args.steps:
            overrides.append(f"tokenizer_train.num_train_steps={args.steps}")
        if decoder:
            overrides.append(f"decoder_train.num_train_steps={args.decoder_steps}")
        overrides += args.set
        tag = name.replace("+", "_") + (f"_{args.steps}" if args.steps else "")
        workdir = os.path.join(args.workroot, tag)
        timing = train(args.config, workdir, overrides, decoder, workdir + ".log")
        row = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                   variant=name, config=args.config, overrides=overrides, note=args.note,
                   load_average=os.getloadavg()[0], **machine, **timing,
                   **score(workdir, os.path.join(args.workroot, "eval_cache")))
        print(json.dumps({k: row[k] for k in ("variant", "train_seconds", "num_codes", "reconstruction_frechet",
                                              "frechet_ratio", "psnr", "codebook_usage")}), flush=True)
        existing = json.load(open(args.out)) if os.path.exists(args.out) else []
        with open(args.out + ".tmp", "w") as f:
            json.dump(existing + [row], f, indent=1)
        os.replace(args.out + ".tmp", args.out)


if __name__ == "__main__":
    main()
