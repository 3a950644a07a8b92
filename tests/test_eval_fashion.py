"""Fashion-MNIST quality report on a few thousand real images with a short training run."""
import gzip
import pathlib

import numpy as np
import pytest

from maskgen.eval import classifier, fashion

IDX_DIR = pathlib.Path("/usr/share/datasets/fashion-mnist")
SHORT = classifier.TrainConfig(epochs=3, batch_size=64, learning_rate=3e-3)


def _read_idx(name, header, shape):
    path = IDX_DIR / name
    if not path.exists():
        raise FileNotFoundError(f"{path} missing: apt-get install -y dataset-fashion-mnist")
    with gzip.open(path) as f:
        return np.frombuffer(f.read(), np.uint8, offset=header).reshape(shape)


@pytest.fixture(scope="module")
def data():
    train_x = _read_idx("train-images-idx3-ubyte.gz", 16, (-1, 28, 28))[:3000]
    train_y = _read_idx("train-labels-idx1-ubyte.gz", 8, (-1,))[:3000]
    test_x = _read_idx("t10k-images-idx3-ubyte.gz", 16, (-1, 28, 28))[:1000]
    test_y = _read_idx("t10k-labels-idx1-ubyte.gz", 8, (-1,))[:1000]
    return (train_x, train_y), (test_x, test_y)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("fashion_cache")


def _quality(images, labels, data, cache_dir):
    train, test = data
    return fashion.fashion_quality(images, labels, cache_dir, train=train, test=test,
                                   batch_size=256, config=SHORT, progress=False)


def test_real_test_images_score_like_the_real_split(data, cache_dir):
    _, (test_x, test_y) = data
    report = _quality(test_x[:, :, :, None], test_y, data, cache_dir)  # [N, 28, 28, 1] accepted
    # A short run on 3k images still learns the task well above chance (10%).
    assert report["real_test_accuracy"] > 0.7
    # The "generated" set is the test split itself: same accuracy, zero distance.
    assert report["class_accuracy"] == pytest.approx(report["real_test_accuracy"])
    assert abs(report["frechet"]) < 1e-6 * report["frechet_floor"]
    assert report["frechet_floor"] > 0
    per_class = report["per_class_accuracy"]
    preds = np.argmax(classifier.classify(_cached_params(data, cache_dir), test_x)["logits"], axis=1)
    for c in range(10):
        assert per_class[c] == pytest.approx(np.mean(preds[test_y == c] == c))


def _cached_params(data, cache_dir):
    return classifier.load_or_train(cache_dir, data[0], SHORT, progress=False)


def test_wrong_labels_and_noise_score_badly(data, cache_dir):
    train, (test_x, test_y) = data
    rng = np.random.default_rng(0)
    shifted = (test_y[:500] + 1) % 10  # every label wrong
    report = _quality(test_x[:500], shifted, data, cache_dir)
    assert report["class_accuracy"] < 0.2
    noise = rng.integers(0, 256, size=(500, 28, 28), dtype=np.uint8)
    labels = np.repeat(np.arange(5), 100)  # classes 5..9 absent
    report = _quality(noise, labels, data, cache_dir)
    assert report["per_class_accuracy"][5:] == [None] * 5
    assert report["frechet"] > 10 * report["frechet_floor"]
    # Held-out real images sit near the floor, far below noise.
    real = _quality(train[0][-500:], train[1][-500:], data, cache_dir)
    assert real["frechet"] < 3 * real["frechet_floor"] < report["frechet"]


def test_reconstruction_frechet_compares_reconstructions_with_the_test_split(data, cache_dir):
    train, (test_x, test_y) = data
    # Identity "reconstructions" of the test images are the test set itself: distance 0.
    exact = fashion.fashion_quality(test_x[:300], test_y[:300], cache_dir, train=train, test=(test_x, test_y),
                                    config=SHORT, progress=False, reconstructions=test_x)
    assert abs(exact["reconstruction_frechet"]) < 1e-6 * exact["frechet_floor"]
    assert exact["frechet"] > 0  # the 300 generated images are not the whole split
    # Reconstructions that lost the image (flat grey) are far from real images, past the samples.
    grey = np.full((300, 28, 28), 128, np.uint8)
    grey[:, 0, 0] = np.arange(300) % 256  # a little variance, so the covariance is not singular
    lost = fashion.fashion_quality(test_x[:300], test_y[:300], cache_dir, train=train, test=(test_x, test_y),
                                   config=SHORT, progress=False, reconstructions=grey)
    assert lost["reconstruction_frechet"] > 10 * lost["frechet"]
    assert "reconstruction_frechet" not in _quality(test_x[:300], test_y[:300], data, cache_dir)


def test_classifier_is_cached_and_reused(data, cache_dir, monkeypatch):
    params = _cached_params(data, cache_dir)
    files = list(cache_dir.glob("fashion_classifier_*.npz"))
    assert len(files) == 1

    def no_training(*args, **kwargs):
        raise AssertionError("the cached classifier should have been reused")

    monkeypatch.setattr(classifier, "train_classifier", no_training)
    again = classifier.load_or_train(cache_dir, data[0], SHORT, progress=False)
    for key in params:
        for leaf in params[key]:
            np.testing.assert_array_equal(again[key][leaf], params[key][leaf])
    # Different training data -> a different cache entry (so it trains: patched out here).
    with pytest.raises(AssertionError, match="reused"):
        classifier.load_or_train(cache_dir, (data[0][0][:100], data[0][1][:100]), SHORT)


def test_training_is_deterministic(data):
    x, y = data[0][0][:256], data[0][1][:256]
    config = classifier.TrainConfig(epochs=1, batch_size=64)
    a = classifier.train_classifier(x, y, config, progress=False)
    b = classifier.train_classifier(x, y, config, progress=False)
    np.testing.assert_array_equal(a["logits"]["kernel"], b["logits"]["kernel"])


def test_bad_inputs_raise(data, cache_dir):
    train, test = data
    with pytest.raises(ValueError, match="uint8"):
        fashion.fashion_quality(test[0].astype(np.float32), test[1], cache_dir, train, test)
    with pytest.raises(ValueError, match=r"\[N, 28, 28"):
        fashion.fashion_quality(np.zeros((4, 32, 32), np.uint8), np.zeros(4), cache_dir, train, test)
    with pytest.raises(ValueError, match="labels"):
        fashion.fashion_quality(test[0][:4], np.array([0, 1, 2, 10]), cache_dir, train, test)
