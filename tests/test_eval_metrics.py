"""Inception score and k-NN precision / recall on sets with known answers."""
import numpy as np
import pytest

from maskgen.eval import metrics


def test_inception_score_uniform_predictions_is_one():
    mean, std = metrics.inception_score(np.zeros((20, 1008)), num_splits=2)
    assert mean == pytest.approx(1.0, abs=1e-12)
    assert std == pytest.approx(0.0, abs=1e-12)


def test_inception_score_confident_balanced_predictions_is_class_count():
    # One-hot predictions spread evenly over C classes: KL = log C for every x.
    logits = np.full((30, 10), -1e4)
    logits[np.arange(30), np.arange(30) % 5] = 0.0
    mean, _ = metrics.inception_score(logits)
    assert mean == pytest.approx(5.0, rel=1e-9)


def test_inception_score_matches_direct_formula():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(64, 7)) * 3
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    marginal = probs.mean(0)
    direct = np.exp(np.mean(np.sum(probs * np.log(probs / marginal), axis=1)))
    assert metrics.inception_score(logits)[0] == pytest.approx(direct, rel=1e-10)


def test_precision_recall_toy_line():
    # Real: 10 points 1 apart on a line, k=1 -> every real ball has radius 1.
    real = np.stack([np.arange(10.0), np.zeros(10)], axis=1)
    # Two fakes inside real balls, two far away.
    fake = np.array([[0.5, 0.0], [3.2, 0.0], [20.0, 0.0], [50.0, 50.0]])
    precision, recall = metrics.precision_recall(real, fake, k=1)
    assert precision == pytest.approx(0.5)
    # Fake balls (k=1): 0.5 and 3.2 reach 2.7, 20 reaches 16.8 -> covers all of 0..9.
    assert recall == pytest.approx(1.0)
    # Fake points clustered tightly at one end: high precision, low recall.
    fake = np.array([[0.0, 0.1], [0.0, -0.1], [0.1, 0.0], [-0.1, 0.0]])
    precision, recall = metrics.precision_recall(real, fake, k=1)
    assert precision == pytest.approx(1.0)
    assert recall == pytest.approx(0.1)  # only the real point at 0 is covered


def _brute_force(real, fake, k):
    def radii(x):
        d = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
        return np.sort(d, axis=1)[:, k]

    def coverage(q, ref, r):
        d = np.sqrt(((q[:, None] - ref[None]) ** 2).sum(-1))
        return np.mean(np.any(d <= r[None], axis=1))

    return coverage(fake, real, radii(real)), coverage(real, fake, radii(fake))


def test_precision_recall_matches_brute_force_with_chunking():
    rng = np.random.default_rng(1)
    real = rng.normal(size=(70, 5))
    fake = rng.normal(size=(50, 5)) * 0.6 + 0.8
    # chunk_size 16 forces several padded chunks.
    got = metrics.precision_recall(real, fake, k=3, chunk_size=16)
    expected = _brute_force(real, fake, 3)
    assert got == pytest.approx(expected)
    assert 0.0 < got[0] < 1.0 and 0.0 < got[1] < 1.0


def test_identical_sets_have_full_precision_and_recall():
    x = np.random.default_rng(2).normal(size=(40, 8))
    assert metrics.precision_recall(x, x, k=3) == pytest.approx((1.0, 1.0))


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="num_splits"):
        metrics.inception_score(np.zeros((4, 3)), num_splits=5)
    with pytest.raises(ValueError, match="more than k"):
        metrics.precision_recall(np.zeros((3, 2)), np.zeros((10, 2)), k=3)
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        metrics.precision_recall(np.zeros((10, 2)), np.zeros((10, 3)))
