"""Fashion-MNIST sample quality: does a generated image show its class, and does the set look real?

Numbers, from a classifier trained on the real training split (`classifier.py`):
  * class_accuracy / per_class_accuracy: generated images classified as the
    class they were generated for;
  * frechet: Fréchet distance between generated and real test images in the
    classifier's penultimate feature space (FID's recipe with a domain model);
  * frechet_floor: the same distance for as many real *training* images:
    what a perfect generator would score at this sample count;
  * real_test_accuracy: the classifier's own accuracy on the real test split;
  * reconstruction_frechet (when `reconstructions` are given): the same
    distance for a tokenizer's reconstructions of real images, the best
    Fréchet a generator on that tokenizer can reach.
"""
from typing import Any, Optional

import numpy as np
from jax.sharding import Mesh
from numpy.typing import ArrayLike

from maskgen.eval import classifier, frechet


def fashion_quality(images: ArrayLike, labels: ArrayLike, cache_dir: str, train: tuple[ArrayLike, ArrayLike],
                    test: tuple[ArrayLike, ArrayLike], batch_size: int = 1000, mesh: Optional[Mesh] = None,
                    config: classifier.TrainConfig | None = None, seed: int = 0,
                    progress: bool = True, reconstructions: Optional[ArrayLike] = None) -> dict[str, Any]:
    """uint8 images [N, 28, 28(, 1)] generated for `labels` [N] -> dict of quality numbers.

    `train` and `test` are (images, labels) of the real splits; the classifier
    is trained on `train` once and cached in `cache_dir`. `reconstructions`
    (uint8, optional) are a tokenizer's encode-decode of real images.
    """
    config = classifier.TrainConfig() if config is None else config
    images, labels = classifier.check_data(images, labels, "generated")
    if images.shape[0] < 2:
        raise ValueError(f"need at least 2 generated images, got {images.shape[0]}")
    train_images, train_labels = classifier.check_data(*train, "training")
    test_images, test_labels = classifier.check_data(*test, "test")
    params = classifier.load_or_train(cache_dir, (train_images, train_labels), config, progress=progress)

    def run(x: np.ndarray) -> dict[str, np.ndarray]:
        return classifier.classify(params, x, batch_size=batch_size, mesh=mesh)

    generated, real_test = run(images), run(test_images)
    # Floor: as many real training images as there are samples, drawn without replacement.
    count = min(images.shape[0], train_images.shape[0])
    subset = np.sort(np.random.default_rng(seed).permutation(train_images.shape[0])[:count])
    real_train = run(train_images[subset])

    correct = np.argmax(generated["logits"], axis=1) == labels
    per_class = [float(correct[labels == c].mean()) if np.any(labels == c) else None
                 for c in range(classifier.NUM_CLASSES)]
    test_stats = frechet.feature_stats(real_test["features"])

    def distance_to_test(features: np.ndarray) -> float:
        return frechet.frechet_distance(*frechet.feature_stats(features), *test_stats)

    report = {
        "num_samples": int(images.shape[0]),
        "class_accuracy": float(correct.mean()),
        "per_class_accuracy": per_class,
        "frechet": distance_to_test(generated["features"]),
        "frechet_floor": distance_to_test(real_train["features"]),
        "real_test_accuracy": float(np.mean(np.argmax(real_test["logits"], axis=1) == test_labels)),
    }
    if reconstructions is not None:
        recon, _ = classifier.check_data(reconstructions, np.zeros(len(reconstructions), np.int32),
                                         "reconstructed")
        report["reconstruction_frechet"] = distance_to_test(run(recon)["features"])
    return report
