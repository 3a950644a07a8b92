"""Inception score and k-NN manifold precision / recall.

Precision / recall follow Kynkäänniemi et al. 2019 ("Improved precision and
recall metric for assessing generative models"), as the ADM evaluation suite
computes them: each reference point owns a ball reaching its k-th nearest
neighbour (itself excluded); precision is the share of generated points inside
some real ball, recall the share of real points inside some generated ball.
"""
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import scipy.special
from numpy.typing import ArrayLike


def inception_score(logits: ArrayLike, num_splits: int = 1) -> tuple[float, float]:
    """exp(E_x KL(p(y|x) || p(y))) from classifier logits [N, C] -> (mean, std) over splits.

    The ADM suite splits 50k samples into chunks of 5000 (num_splits=10) and
    reports the mean; p(y) is estimated within each split.
    """
    logits = np.asarray(logits, np.float64)
    if logits.ndim != 2:
        raise ValueError(f"logits must be [N, C], got shape {logits.shape}")
    if not 1 <= num_splits <= logits.shape[0]:
        raise ValueError(f"num_splits={num_splits} must lie in [1, N={logits.shape[0]}]")
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    scores = []
    for part in np.array_split(log_probs, num_splits):
        log_marginal = scipy.special.logsumexp(part, axis=0) - np.log(part.shape[0])
        probs = np.exp(part)
        # Classes no sample predicts have p = 0 and log p(y) = -inf: their terms are 0.
        with np.errstate(invalid="ignore"):
            terms = np.where(probs > 0, probs * (part - log_marginal), 0.0)
        scores.append(np.exp(terms.sum(axis=1).mean()))
    return float(np.mean(scores)), float(np.std(scores))


def _squared_distances(rows: jax.Array, columns: jax.Array) -> jax.Array:
    """[r, D] x [c, D] -> [r, c] squared Euclidean distances (clipped at 0 against round-off)."""
    cross = jnp.matmul(rows, columns.T, precision=jax.lax.Precision.HIGHEST)
    norms_r = jnp.sum(rows * rows, axis=1)
    norms_c = jnp.sum(columns * columns, axis=1)
    return jnp.maximum(norms_r[:, None] - 2 * cross + norms_c[None, :], 0.0)


def _chunked(rows: jax.Array, chunk_size: int, fn: Callable[[jax.Array], jax.Array]) -> jax.Array:
    """Applies fn to fixed-size row chunks (lax.map) so peak memory is chunk x N, not N x N."""
    count = rows.shape[0]
    padded = -count % chunk_size
    rows = jnp.pad(rows, ((0, padded), (0, 0)))
    out = jax.lax.map(fn, rows.reshape(-1, chunk_size, rows.shape[1]))
    return out.reshape(-1)[:count]


@functools.partial(jax.jit, static_argnames=("k", "chunk_size"))
def knn_radii(features: jax.Array, k: int = 3, chunk_size: int = 1024) -> jax.Array:
    """Squared distance from each point to its k-th nearest other point."""
    def kth(rows: jax.Array) -> jax.Array:
        neg_smallest, _ = jax.lax.top_k(-_squared_distances(rows, features), k + 1)
        return -neg_smallest[:, k]  # entry 0 is the point itself
    return _chunked(features, chunk_size, kth)


@functools.partial(jax.jit, static_argnames=("chunk_size",))
def manifold_coverage(queries: jax.Array, references: jax.Array, radii: jax.Array,
                      chunk_size: int = 1024) -> jax.Array:
    """Share of queries inside at least one reference ball (squared radii `radii`)."""
    def inside(rows: jax.Array) -> jax.Array:
        return jnp.any(_squared_distances(rows, references) <= radii[None, :], axis=1)
    return jnp.mean(_chunked(queries, chunk_size, inside).astype(jnp.float32))


def precision_recall(real_features: ArrayLike, fake_features: ArrayLike, k: int = 3,
                     chunk_size: int = 1024) -> tuple[float, float]:
    """(precision, recall) of fake features against real ones, k-NN manifolds (ADM uses k=3)."""
    real = jnp.asarray(real_features, jnp.float32)
    fake = jnp.asarray(fake_features, jnp.float32)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"features must be [N, D] with one D, got {real.shape} and {fake.shape}")
    if min(real.shape[0], fake.shape[0]) <= k:
        raise ValueError(f"k={k} needs more than k points per set, got {real.shape[0]} and {fake.shape[0]}")
    chunk_size = min(chunk_size, max(real.shape[0], fake.shape[0]))
    precision = manifold_coverage(fake, real, knn_radii(real, k, chunk_size), chunk_size)
    recall = manifold_coverage(real, fake, knn_radii(fake, k, chunk_size), chunk_size)
    return float(precision), float(recall)
