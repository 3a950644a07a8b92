"""Scores a samples file: `python -m maskgen.eval --samples S.npz --metric fid|fashion ...`.

    # ImageNet-style: FID / IS / precision / recall with the Flax FID Inception
    python -m maskgen.eval --samples samples.npz --metric fid \\
        --inception inception.npz --ref_stats VIRTUAL_imagenet256_labeled.npz --out fid.json
    # reference statistics from real images (ADM layout, plus features for precision/recall)
    python -m maskgen.eval --samples real.npz --metric fid --inception inception.npz --save_stats ref.npz
    # Fashion-MNIST: class accuracy and classifier-feature Fréchet distance
    python -m maskgen.eval --samples samples.npz --metric fashion --cache_dir ~/.cache/maskgen

The samples `.npz` holds `images` (uint8 [N, H, W(, C)]) and, for fashion, `labels` [N].
Make Inception weights with `python -m maskgen.eval.convert_inception --torchscript default --out inception.npz`.
"""
import argparse
import io
import json
import os
import sys
import zipfile
from typing import Any, Optional, Sequence

import numpy as np


def _parse(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m maskgen.eval", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--samples", required=True, help=".npz with `images` uint8 and `labels`")
    parser.add_argument("--metric", required=True, choices=("fid", "fashion"))
    parser.add_argument("--out", help="write the metrics as JSON here")
    parser.add_argument("--batch_size", type=int, default=200, help="images per sharded batch")
    parser.add_argument("--verbose", action="store_true",
                        help="tracebacks for user errors too (MASKGEN_VERBOSE=1)")
    fid = parser.add_argument_group("fid")
    fid.add_argument("--inception", help="Flax Inception weights (.npz from convert_inception)")
    fid.add_argument("--ref_stats", help="reference .npz (ADM layout: mu, sigma; features or arr_0 for P/R)")
    fid.add_argument("--save_stats", help="write the samples' ADM-layout statistics (+ features) here")
    fid.add_argument("--k", type=int, default=3, help="neighbourhood size for precision / recall")
    fashion = parser.add_argument_group("fashion")
    fashion.add_argument("--cache_dir", help="where the trained classifier is cached")
    fashion.add_argument("--data_dir", help="tfds data dir for maskgen.data.load_arrays; "
                         "default: the Fashion-MNIST IDX files of dataset-fashion-mnist")
    fashion.add_argument("--train_examples", type=int, help="train the classifier on the first N "
                         "training images only (quick runs)")
    fashion.add_argument("--epochs", type=int, help="classifier training epochs (default 4)")
    args = parser.parse_args(argv)
    if args.metric == "fid" and not args.inception:
        parser.error("--metric fid needs --inception WEIGHTS")
    if args.metric == "fid" and not (args.ref_stats or args.save_stats):
        parser.error("--metric fid needs --ref_stats and/or --save_stats")
    if args.metric == "fashion" and not args.cache_dir:
        parser.error("--metric fashion needs --cache_dir DIR")
    if args.batch_size < 1:
        parser.error(f"--batch_size must be >= 1, got {args.batch_size}")
    if args.out and os.path.isdir(args.out):
        parser.error(f"--out {args.out} is a directory; --out names the JSON file to write")
    return args


def _load_samples(path: str, need_labels: bool) -> tuple[np.ndarray, Optional[np.ndarray]]:
    from maskgen import paths
    if not paths.is_file(path):
        raise ValueError(f"--samples {path}: no such file")
    raw = io.BytesIO(paths.read_bytes(path))  # local or gs://
    if not zipfile.is_zipfile(raw):  # np.load would talk about allow_pickle
        raise ValueError(f"--samples {path} is not an .npz file (not a zip archive); sample.py writes one "
                         "(OUT/samples.npz)")
    raw.seek(0)
    with np.load(raw, allow_pickle=False) as data:
        if "images" not in data.files:
            raise ValueError(f"{path} has no `images` array (keys: {sorted(data.files)})")
        if need_labels and "labels" not in data.files:
            raise ValueError(f"{path} has no `labels` array, which --metric fashion needs")
        return data["images"], (data["labels"] if "labels" in data.files else None)


def _fashion_split(split: str, data_dir: Optional[str]) -> tuple[np.ndarray, np.ndarray]:
    from maskgen import data
    if data_dir:
        return data.load_arrays("fashion_mnist", split, data_dir)
    return data.load_fashion_mnist_idx(split)


def run_fashion(args: argparse.Namespace) -> dict[str, Any]:
    """`--metric fashion`: class accuracy and classifier-feature Fréchet distance of the samples."""
    from maskgen.eval import classifier, fashion
    images, labels = _load_samples(args.samples, need_labels=True)
    train_x, train_y = _fashion_split("train", args.data_dir)
    if args.train_examples:
        train_x, train_y = train_x[:args.train_examples], train_y[:args.train_examples]
    config = classifier.TrainConfig()
    if args.epochs:
        config = classifier.TrainConfig(epochs=args.epochs)
    return fashion.fashion_quality(images, labels, args.cache_dir, train=(train_x, train_y),
                                   test=_fashion_split("test", args.data_dir),
                                   batch_size=args.batch_size, config=config)


def run_fid(args: argparse.Namespace) -> dict[str, Any]:
    """`--metric fid`: FID / IS / precision / recall of the samples against `--ref_stats`."""
    from maskgen.eval import fid, inception
    images, _ = _load_samples(args.samples, need_labels=False)
    model, params = inception.load_inception(args.inception)
    reference = None
    if args.ref_stats:
        reference = fid.load_reference(args.ref_stats, model, params, args.batch_size)
    report, pool = fid.fid_report(images, model, params, reference, args.batch_size, k=args.k)
    if args.save_stats:
        fid.save_reference(args.save_stats, pool)
    return report


def _table(report: dict[str, Any]) -> str:
    rows = []
    for key, value in report.items():
        if isinstance(value, list):
            rows += [(f"{key}[{i}]", v) for i, v in enumerate(value)]
        else:
            rows.append((key, value))
    width = max(len(name) for name, _ in rows)
    lines = []
    for name, value in rows:
        text = "n/a" if value is None else (f"{value:.4f}" if isinstance(value, float) else str(value))
        lines.append(f"{name:<{width}}  {text}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Scores `--samples`, prints a table and writes `--out`; returns the report (for tests)."""
    args = _parse(argv)
    report = run_fid(args) if args.metric == "fid" else run_fashion(args)
    print(_table(report))
    if args.out:
        from maskgen import paths
        paths.write_text(args.out, json.dumps(report, indent=2))  # atomic, local or gs://
    return report


if __name__ == "__main__":
    from maskgen import cli
    cli.run(lambda argv: (main(argv), 0)[1], sys.argv[1:])
