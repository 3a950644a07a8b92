"""Evaluation: FID / IS / precision-recall with a Flax FID Inception, Fashion-MNIST quality.

`python -m maskgen.eval --help` runs the metrics on a samples `.npz`.
"""
from maskgen.eval.features import batched_apply, data_mesh
from maskgen.eval.frechet import (feature_stats, frechet_distance, frechet_distance_from_features,
                                  load_stats, save_stats)
from maskgen.eval.inception import InceptionV3, inception_features, load_inception, preprocess
from maskgen.eval.metrics import inception_score, precision_recall

__all__ = [
    "InceptionV3", "batched_apply", "data_mesh", "feature_stats", "frechet_distance",
    "frechet_distance_from_features", "inception_features", "inception_score", "load_inception",
    "load_stats", "precision_recall", "preprocess", "save_stats",
]
