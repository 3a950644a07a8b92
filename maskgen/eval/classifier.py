"""A small Fashion-MNIST classifier whose penultimate layer is the "Inception" of the toy task.

Trained once on the real training split (about 90% test accuracy in 4 epochs)
and cached as `.npz` under a name that fingerprints the data and the training
settings, so later evaluations reuse it.

Its convolutions are written as matmuls over patches (a 2x2 patchify layer,
then a 3x3 stride-2 layer via im2col): XLA:CPU computes convolution filter
gradients several times slower than matmuls, and with native `nn.Conv` (plus
max-pool gradients) an epoch on 2 cores took minutes instead of ~15 s.
"""
import dataclasses
import hashlib
import io
import json
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util
from jax.sharding import Mesh
from numpy.typing import ArrayLike
from tqdm.auto import tqdm

from maskgen import axes, paths
from maskgen.eval import features as features_lib

IMAGE_SIZE = 28
NUM_CLASSES = 10
ARCH_VERSION = 1  # bump when the architecture changes, so stale caches are not reused


def _dense(features: int, name: str) -> nn.Dense:
    # Every layer is a convolution written as a matmul over patches (or a 1x1
    # conv on the flattened map), hence the conv axis names.
    return nn.Dense(
        features, name=name,
        kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), (axes.CONV_IN, axes.CONV_OUT)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (axes.CONV_OUT,)))


class FashionClassifier(nn.Module):
    """uint8 [B, 28, 28] or [B, 28, 28, 1] -> {"logits": [B, 10], "features": [B, feature_dim]}."""
    feature_dim: int = 128
    num_classes: int = NUM_CLASSES

    @nn.compact
    def __call__(self, images: jax.Array) -> dict[str, jax.Array]:
        if images.ndim == 4 and images.shape[-1] == 1:
            images = images[..., 0]
        if images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
            raise ValueError(f"classifier wants [B, 28, 28(, 1)] images, got shape {images.shape}")
        batch = images.shape[0]
        x = images.astype(jnp.float32) / 255.0
        # 2x2 patchify: [B, 28, 28] -> [B, 14, 14, 4] -> 32 channels.
        x = x.reshape(batch, 14, 2, 14, 2).transpose(0, 1, 3, 2, 4).reshape(batch, 14, 14, 4)
        x = nn.relu(_dense(32, "patchify")(x))
        # 3x3 stride-2 conv via im2col: [B, 14, 14, 32] -> [B, 7, 7, 288] -> 64 channels.
        padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
        patches = jnp.concatenate(
            [padded[:, i:i + 14:2, j:j + 14:2] for i in range(3) for j in range(3)], axis=-1)
        x = nn.relu(_dense(64, "conv3x3_s2")(patches))
        features = nn.relu(_dense(self.feature_dim, "penultimate")(x.reshape(batch, -1)))
        return {"logits": _dense(self.num_classes, "logits")(features), "features": features}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Classifier training settings; part of the cache fingerprint, so a change retrains."""
    epochs: int = 4
    batch_size: int = 128
    learning_rate: float = 2e-3  # Adam, cosine-decayed to 0 over training
    seed: int = 0


def check_data(images: ArrayLike, labels: ArrayLike, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Validates uint8 [N, 28, 28(, 1)] images and [N] labels in [0, 10) -> ([N, 28, 28] uint8, int32)."""
    images, labels = np.asarray(images), np.asarray(labels)
    if images.dtype != np.uint8:
        raise ValueError(f"{what} images must be uint8, got {images.dtype}")
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    if images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(f"{what} images must be [N, 28, 28(, 1)], got {images.shape}")
    if labels.shape != images.shape[:1]:
        raise ValueError(f"{what}: {images.shape[0]} images but labels of shape {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise ValueError(f"{what} labels must lie in [0, {NUM_CLASSES}), got {labels.min()}..{labels.max()}")
    return images, labels.astype(np.int32)


def train_classifier(images: ArrayLike, labels: ArrayLike, config: TrainConfig = TrainConfig(),
                     progress: bool = True) -> dict[str, Any]:
    """Trains FashionClassifier on uint8 images [N, 28, 28(, 1)] -> params (plain arrays)."""
    images, labels = check_data(images, labels, "training")
    steps_per_epoch = images.shape[0] // config.batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"batch_size={config.batch_size} exceeds the {images.shape[0]} training images")
    model = FashionClassifier()
    init_key, shuffle_key = jax.random.split(jax.random.key(config.seed))
    params = nn.unbox(model.init(init_key, jnp.zeros((1, IMAGE_SIZE, IMAGE_SIZE), jnp.uint8))["params"])
    tx = optax.adam(optax.cosine_decay_schedule(config.learning_rate, config.epochs * steps_per_epoch))
    opt_state = tx.init(params)
    images_dev, labels_dev = jnp.asarray(images), jnp.asarray(labels)

    @jax.jit
    def run_epoch(params: Any, opt_state: Any, key: jax.Array) -> tuple[Any, Any, jax.Array]:
        order = jax.random.permutation(key, images_dev.shape[0])
        order = order[:steps_per_epoch * config.batch_size].reshape(steps_per_epoch, config.batch_size)

        def step(carry: tuple[Any, Any], index: jax.Array) -> tuple[tuple[Any, Any], jax.Array]:
            params, opt_state = carry

            def loss_fn(p: Any) -> jax.Array:
                logits = model.apply({"params": p}, images_dev[index])["logits"]
                return optax.softmax_cross_entropy_with_integer_labels(logits, labels_dev[index]).mean()

            loss, grads = jax.value_and_grad(loss_fn)(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), loss

        (params, opt_state), losses = jax.lax.scan(step, (params, opt_state), order)
        return params, opt_state, losses.mean()

    bar = tqdm(range(config.epochs), desc="fashion classifier", unit="epoch", disable=not progress)
    for epoch in bar:
        params, opt_state, loss = run_epoch(params, opt_state, jax.random.fold_in(shuffle_key, epoch))
        bar.set_postfix(loss=f"{float(loss):.3f}")
    return jax.device_get(params)


def classify(params: Any, images: ArrayLike, batch_size: int = 1000, mesh: Optional[Mesh] = None,
             progress: bool = False) -> dict[str, np.ndarray]:
    """uint8 images [N, 28, 28(, 1)] -> {"logits": [N, 10], "features": [N, 128]} on host, batch sharded."""
    images, _ = check_data(images, np.zeros(len(images), np.int32), "classified")
    return features_lib.batched_apply(_apply, params, images, batch_size, mesh=mesh,
                                      progress=progress, desc="classifier")


def _apply(params: Any, images: jax.Array) -> dict[str, jax.Array]:
    return FashionClassifier().apply({"params": params}, images)


def _cache_name(images: np.ndarray, labels: np.ndarray, config: TrainConfig) -> str:
    digest = hashlib.sha1()
    digest.update(json.dumps([ARCH_VERSION, dataclasses.asdict(config)]).encode())
    digest.update(np.ascontiguousarray(images).tobytes())
    digest.update(np.ascontiguousarray(labels).tobytes())
    return f"fashion_classifier_{digest.hexdigest()[:16]}.npz"


def load_or_train(cache_dir: str, train: tuple[ArrayLike, ArrayLike], config: TrainConfig = TrainConfig(),
                  progress: bool = True) -> dict[str, Any]:
    """Params trained on `train` = (images, labels): read from `cache_dir` if cached, else trained and saved.

    The file name fingerprints the training data, settings and architecture.
    """
    images, labels = check_data(*train, "training")
    path = paths.join(cache_dir, _cache_name(images, labels, config))  # local or gs://
    if paths.exists(path):
        with np.load(io.BytesIO(paths.read_bytes(path))) as data:
            return traverse_util.unflatten_dict({k: data[k] for k in data.files}, sep="/")
    params = train_classifier(images, labels, config, progress=progress)
    # atomic (temp + rename locally, one object upload on gs://): a killed run never leaves half a cache
    paths.atomic_write(path, lambda tmp: np.savez(tmp, **traverse_util.flatten_dict(params, sep="/")))
    return params
