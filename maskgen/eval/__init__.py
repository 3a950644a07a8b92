"""Evaluation: FID / IS / precision-recall with a Flax FID Inception, Fashion-MNIST quality.

`python -m maskgen.eval --help` scores a samples `.npz` from the command line.
"""
from maskgen.eval.classifier import FashionClassifier, TrainConfig, classify, load_or_train, train_classifier
from maskgen.eval.fashion import fashion_quality
from maskgen.eval.features import batched_apply, data_mesh, sharded_step
from maskgen.eval.fid import fid_report, load_reference, save_reference
from maskgen.eval.frechet import (
                                  feature_stats,
                                  frechet_distance,
                                  frechet_distance_from_features,
                                  load_stats,
                                  save_stats,
)
from maskgen.eval.inception import InceptionV3, inception_features, load_inception, preprocess
from maskgen.eval.metrics import inception_score, precision_recall
from maskgen.eval.reconstruction import reconstruction_error

__all__ = [
    "FashionClassifier", "InceptionV3", "TrainConfig", "batched_apply", "classify", "data_mesh",
    "fashion_quality", "feature_stats", "fid_report", "frechet_distance",
    "frechet_distance_from_features", "inception_features", "inception_score", "load_inception",
    "load_or_train", "load_reference", "load_stats", "precision_recall", "preprocess",
    "reconstruction_error", "save_reference", "save_stats", "sharded_step", "train_classifier",
]
