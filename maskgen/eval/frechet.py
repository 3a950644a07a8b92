"""Fréchet distance between Gaussian fits of two feature sets, and their statistics files.

The statistics files follow the ADM evaluation suite (openai/guided-diffusion
`evaluations/`): an `.npz` with `mu` [D] and `sigma` [D, D]. Files that carry
more keys (the suite's reference batches also hold `mu_s`, `sigma_s`, `arr_0`)
are accepted; only `mu` and `sigma` are read.
"""
import os

import numpy as np
import scipy.linalg
from numpy.typing import ArrayLike

_STATS_KEYS = ("mu", "sigma")


def feature_stats(features: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """[N, D] features -> (mean [D], covariance [D, D]) in float64.

    float64 because FID subtracts two large traces; float32 covariances lose
    the small differences FID is made of.
    """
    features = np.asarray(features, np.float64)
    if features.ndim != 2:
        raise ValueError(f"features must be [N, D], got shape {features.shape}")
    if features.shape[0] < 2:
        raise ValueError(f"need at least 2 feature vectors for a covariance, got {features.shape[0]}")
    if not np.all(np.isfinite(features)):
        raise ValueError("features contain NaN or inf")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def _check_pair(mu: ArrayLike, sigma: ArrayLike, which: str) -> tuple[np.ndarray, np.ndarray]:
    mu = np.atleast_1d(np.asarray(mu, np.float64))
    sigma = np.atleast_2d(np.asarray(sigma, np.float64))
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"{which}: mu must be [D] and sigma [D, D], got {mu.shape} and {sigma.shape}")
    if not (np.all(np.isfinite(mu)) and np.all(np.isfinite(sigma))):
        raise ValueError(f"{which}: statistics contain NaN or inf")
    return mu, sigma


def _psd_factor(matrix: np.ndarray) -> np.ndarray:
    """B [D, r] with B @ B.T == matrix, r its numerical rank (LAPACK pivoted Cholesky, ?pstrf).

    Unlike plain Cholesky it accepts singular PSD matrices (fewer samples than
    dimensions), and it costs a fraction of an eigendecomposition.
    """
    factor, pivots, rank, info = scipy.linalg.lapack.dpstrf(matrix, lower=1)
    if info < 0:
        raise ValueError(f"pivoted Cholesky rejected the covariance (LAPACK info {info})")
    factor_b = np.empty((matrix.shape[0], rank))
    factor_b[pivots - 1] = np.tril(factor)[:, :rank]  # undo the pivoting: A[p][:, p] = L L^T
    return factor_b


def _trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr(sqrt(sigma1 @ sigma2)) through a symmetric similar matrix.

    sigma1 @ sigma2 is not symmetric, so its general matrix square root (what
    scipy.linalg.sqrtm computes, ~10x slower at D=2048) can go complex or fail
    on singular inputs. With sigma1 = B B^T, sigma1 sigma2 has the nonzero
    eigenvalues of the symmetric PSD B^T sigma2 B, so the trace is the sum of
    their square roots.
    """
    factor = _psd_factor((sigma1 + sigma1.T) / 2)
    middle = factor.T @ sigma2 @ factor
    values = scipy.linalg.eigvalsh((middle + middle.T) / 2, driver="evr")
    return float(np.sum(np.sqrt(np.clip(values, 0, None))))


def frechet_distance(mu1: ArrayLike, sigma1: ArrayLike, mu2: ArrayLike, sigma2: ArrayLike,
                     eps: float = 1e-6) -> float:
    """||mu1 - mu2||^2 + tr(sigma1 + sigma2 - 2 sqrt(sigma1 sigma2)), as in FID.

    Singular covariances (fewer samples than feature dimensions) are handled
    by the pivoted-Cholesky formulation; if round-off still makes the result
    non-finite, `eps` is added to both diagonals, as the standard
    implementations do.
    """
    mu1, sigma1 = _check_pair(mu1, sigma1, "first statistics")
    mu2, sigma2 = _check_pair(mu2, sigma2, "second statistics")
    if mu1.shape != mu2.shape:
        raise ValueError(f"feature sizes differ: {mu1.shape[0]} vs {mu2.shape[0]}")
    diff = mu1 - mu2
    trace_root = _trace_sqrt_product(sigma1, sigma2)
    if not np.isfinite(trace_root):
        offset = eps * np.eye(sigma1.shape[0])
        trace_root = _trace_sqrt_product(sigma1 + offset, sigma2 + offset)
    distance = float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_root)
    if not np.isfinite(distance):
        raise ValueError("Fréchet distance is not finite even with the eps offset")
    return distance


def frechet_distance_from_features(features1: ArrayLike, features2: ArrayLike) -> float:
    """Fréchet distance between the Gaussian fits of two [N, D] feature sets."""
    return frechet_distance(*feature_stats(features1), *feature_stats(features2))


def save_stats(path: str | os.PathLike, mu: ArrayLike, sigma: ArrayLike, **extra: ArrayLike) -> None:
    """Writes ADM-layout statistics (`mu`, `sigma`, plus any extra named arrays)."""
    mu, sigma = _check_pair(mu, sigma, str(path))
    np.savez(path, mu=mu, sigma=sigma, **extra)


def load_stats(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Reads (mu, sigma) from an ADM-layout `.npz`; other keys in the file are ignored."""
    with np.load(path) as data:
        missing = [key for key in _STATS_KEYS if key not in data.files]
        if missing:
            raise ValueError(f"{path}: statistics file lacks {missing} (has {sorted(data.files)})")
        return _check_pair(data["mu"], data["sigma"], str(path))
