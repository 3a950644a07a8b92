"""Fréchet distance against a direct scipy evaluation of the formula, and the stats files."""
import numpy as np
import pytest
import scipy.linalg

from maskgen.eval import frechet


def _direct_fid(x, y):
    """The textbook formula with scipy's general matrix square root."""
    mu1, mu2 = x.mean(0), y.mean(0)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    root = scipy.linalg.sqrtm(s1 @ s2).real
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(root))


def _features(seed, n=400, d=16, shift=0.0):
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(d, d)) / np.sqrt(d)
    return rng.normal(size=(n, d)) @ mix + shift


def test_matches_direct_scipy_formula():
    x, y = _features(0), _features(1, shift=0.3)
    got = frechet.frechet_distance_from_features(x, y)
    assert got == pytest.approx(_direct_fid(x, y), rel=1e-8)
    assert got > 0.5


def test_set_with_itself_is_zero():
    x = _features(2)
    assert abs(frechet.frechet_distance_from_features(x, x)) < 1e-8


def test_gaussians_with_known_distance():
    # Diagonal covariances: FD = |dmu|^2 + sum (sqrt(a) - sqrt(b))^2.
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 4.0, 1.0])
    mu1, mu2 = np.zeros(3), np.array([1.0, 2.0, 0.0])
    expected = 5.0 + (1 - 2) ** 2 + 0 + (3 - 1) ** 2
    got = frechet.frechet_distance(mu1, np.diag(a), mu2, np.diag(b))
    assert got == pytest.approx(expected, rel=1e-12)


def test_singular_covariances_stay_finite_and_close_to_offset_scipy():
    # 10 samples in 32 dimensions: rank-9 covariances, where sqrtm struggles.
    x, y = _features(3, n=10, d=32), _features(4, n=10, d=32, shift=0.1)
    got = frechet.frechet_distance_from_features(x, y)
    assert np.isfinite(got)
    mu1, s1 = frechet.feature_stats(x)
    mu2, s2 = frechet.feature_stats(y)
    offset = 1e-6 * np.eye(32)
    root = scipy.linalg.sqrtm((s1 + offset) @ (s2 + offset)).real
    direct = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(root)
    assert got == pytest.approx(direct, rel=1e-4)


def test_stats_roundtrip_accepts_extra_keys(tmp_path):
    x = _features(5)
    mu, sigma = frechet.feature_stats(x)
    path = tmp_path / "ref.npz"
    # ADM reference batches carry spatial stats and images next to mu/sigma.
    np.savez(path, mu=mu, sigma=sigma, mu_s=mu[:4], sigma_s=sigma[:4, :4],
             arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    mu2, sigma2 = frechet.load_stats(path)
    np.testing.assert_array_equal(mu2, mu)
    np.testing.assert_array_equal(sigma2, sigma)
    frechet.save_stats(tmp_path / "own.npz", mu, sigma)
    with np.load(tmp_path / "own.npz") as data:
        assert sorted(data.files) == ["mu", "sigma"]


def test_bad_inputs_raise(tmp_path):
    with pytest.raises(ValueError, match="lacks"):
        path = str(tmp_path / "no_sigma.npz")
        np.savez(path, mu=np.zeros(3))
        frechet.load_stats(path)
    with pytest.raises(ValueError, match="feature sizes differ"):
        frechet.frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        frechet.feature_stats(np.zeros(5))
