"""Inception-v3 in the layout of the TF 2015-12-05 graph that FID is defined with.

This is the FID variant of Inception (pytorch-fid's `FIDInceptionA/C/E`), not
torchvision's: average pools exclude padding from the count, and the last
block (Mixed_7c) max-pools in its pool branch. Batch norm is folded into the
convolutions by `convert_inception`, so every layer is conv + bias + ReLU.
Parameter names follow torchvision (`Mixed_5b/branch5x5_1/...`).

Inputs: NHWC, 299x299, scaled like the TF graph, (x - 128) / 128 for 8-bit
x, i.e. [-1, 0.9921875]. `preprocess` takes uint8 images of any size there.
"""
import functools
import os
import zipfile
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax.sharding import Mesh
from numpy.typing import ArrayLike

from maskgen import axes
from maskgen.eval import features as features_lib

INPUT_SIZE = 299
POOL_FEATURES = 2048
NUM_LOGITS = 1008  # the TF graph's softmax has 1008 outputs (1000 classes + unused)
HIGHEST = jax.lax.Precision.HIGHEST


def _conv_relu(x: jax.Array, features: int, kernel: tuple[int, int], name: str, strides: int = 1,
               padding: tuple[int, int] = (0, 0), precision: jax.lax.Precision = HIGHEST) -> jax.Array:
    """Conv (+ folded batch norm as bias) + ReLU, registered on the calling module as `name`."""
    pad_h, pad_w = padding
    conv = nn.Conv(
        features, kernel, strides=(strides, strides), padding=((pad_h, pad_h), (pad_w, pad_w)),
        precision=precision, name=name,
        kernel_init=nn.with_logical_partitioning(
            nn.initializers.lecun_normal(), (axes.CONV_H, axes.CONV_W, axes.CONV_IN, axes.CONV_OUT)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (axes.CONV_OUT,)))
    return nn.relu(conv(x))


def _avg_pool_same(x: jax.Array) -> jax.Array:
    # TF "SAME" average pooling divides by the number of real (unpadded) inputs.
    return nn.avg_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_valid(x: jax.Array) -> jax.Array:
    return nn.max_pool(x, (3, 3), (2, 2), padding="VALID")


class InceptionA(nn.Module):
    """Mixed_5b/c/d: 1x1, 5x5, double 3x3 and average-pool branches."""
    pool_features: int
    precision: jax.lax.Precision = HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = dict(precision=self.precision)
        b1 = _conv_relu(x, 64, (1, 1), "branch1x1", **c)
        b5 = _conv_relu(x, 48, (1, 1), "branch5x5_1", **c)
        b5 = _conv_relu(b5, 64, (5, 5), "branch5x5_2", padding=(2, 2), **c)
        b3 = _conv_relu(x, 64, (1, 1), "branch3x3dbl_1", **c)
        b3 = _conv_relu(b3, 96, (3, 3), "branch3x3dbl_2", padding=(1, 1), **c)
        b3 = _conv_relu(b3, 96, (3, 3), "branch3x3dbl_3", padding=(1, 1), **c)
        bp = _conv_relu(_avg_pool_same(x), self.pool_features, (1, 1), "branch_pool", **c)
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    """Mixed_6a: grid reduction 35 -> 17."""
    precision: jax.lax.Precision = HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = dict(precision=self.precision)
        b3 = _conv_relu(x, 384, (3, 3), "branch3x3", strides=2, **c)
        bd = _conv_relu(x, 64, (1, 1), "branch3x3dbl_1", **c)
        bd = _conv_relu(bd, 96, (3, 3), "branch3x3dbl_2", padding=(1, 1), **c)
        bd = _conv_relu(bd, 96, (3, 3), "branch3x3dbl_3", strides=2, **c)
        return jnp.concatenate([b3, bd, _max_pool_valid(x)], axis=-1)


class InceptionC(nn.Module):
    """Mixed_6b..e: factorised 7x7 branches with `channels_7x7` inner width."""
    channels_7x7: int
    precision: jax.lax.Precision = HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c, c7 = dict(precision=self.precision), self.channels_7x7
        b1 = _conv_relu(x, 192, (1, 1), "branch1x1", **c)
        b7 = _conv_relu(x, c7, (1, 1), "branch7x7_1", **c)
        b7 = _conv_relu(b7, c7, (1, 7), "branch7x7_2", padding=(0, 3), **c)
        b7 = _conv_relu(b7, 192, (7, 1), "branch7x7_3", padding=(3, 0), **c)
        bd = _conv_relu(x, c7, (1, 1), "branch7x7dbl_1", **c)
        bd = _conv_relu(bd, c7, (7, 1), "branch7x7dbl_2", padding=(3, 0), **c)
        bd = _conv_relu(bd, c7, (1, 7), "branch7x7dbl_3", padding=(0, 3), **c)
        bd = _conv_relu(bd, c7, (7, 1), "branch7x7dbl_4", padding=(3, 0), **c)
        bd = _conv_relu(bd, 192, (1, 7), "branch7x7dbl_5", padding=(0, 3), **c)
        bp = _conv_relu(_avg_pool_same(x), 192, (1, 1), "branch_pool", **c)
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    """Mixed_7a: grid reduction 17 -> 8."""
    precision: jax.lax.Precision = HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = dict(precision=self.precision)
        b3 = _conv_relu(x, 192, (1, 1), "branch3x3_1", **c)
        b3 = _conv_relu(b3, 320, (3, 3), "branch3x3_2", strides=2, **c)
        b7 = _conv_relu(x, 192, (1, 1), "branch7x7x3_1", **c)
        b7 = _conv_relu(b7, 192, (1, 7), "branch7x7x3_2", padding=(0, 3), **c)
        b7 = _conv_relu(b7, 192, (7, 1), "branch7x7x3_3", padding=(3, 0), **c)
        b7 = _conv_relu(b7, 192, (3, 3), "branch7x7x3_4", strides=2, **c)
        return jnp.concatenate([b3, b7, _max_pool_valid(x)], axis=-1)


class InceptionE(nn.Module):
    """Mixed_7b/c: expanded-filter-bank output blocks.

    The TF graph's Mixed_7c max-pools in its pool branch (Mixed_7b averages);
    FID depends on keeping that quirk, hence `max_pool`.
    """
    max_pool: bool
    precision: jax.lax.Precision = HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = dict(precision=self.precision)
        b1 = _conv_relu(x, 320, (1, 1), "branch1x1", **c)
        b3 = _conv_relu(x, 384, (1, 1), "branch3x3_1", **c)
        b3a = _conv_relu(b3, 384, (1, 3), "branch3x3_2a", padding=(0, 1), **c)
        b3b = _conv_relu(b3, 384, (3, 1), "branch3x3_2b", padding=(1, 0), **c)
        bd = _conv_relu(x, 448, (1, 1), "branch3x3dbl_1", **c)
        bd = _conv_relu(bd, 384, (3, 3), "branch3x3dbl_2", padding=(1, 1), **c)
        bda = _conv_relu(bd, 384, (1, 3), "branch3x3dbl_3a", padding=(0, 1), **c)
        bdb = _conv_relu(bd, 384, (3, 1), "branch3x3dbl_3b", padding=(1, 0), **c)
        if self.max_pool:
            pooled = nn.max_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)))
        else:
            pooled = _avg_pool_same(x)
        bp = _conv_relu(pooled, 192, (1, 1), "branch_pool", **c)
        return jnp.concatenate([b1, b3a, b3b, bda, bdb, bp], axis=-1)


class InceptionV3(nn.Module):
    """[B, 299, 299, 3] scaled images -> {"pool": [B, 2048], "logits": [B, 1008] if num_logits}."""
    num_logits: Optional[int] = None
    precision: jax.lax.Precision = HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"InceptionV3 wants [B, H, W, 3] images, got shape {x.shape}")
        c = dict(precision=self.precision)
        x = _conv_relu(x, 32, (3, 3), "Conv2d_1a_3x3", strides=2, **c)
        x = _conv_relu(x, 32, (3, 3), "Conv2d_2a_3x3", **c)
        x = _conv_relu(x, 64, (3, 3), "Conv2d_2b_3x3", padding=(1, 1), **c)
        x = _max_pool_valid(x)
        x = _conv_relu(x, 80, (1, 1), "Conv2d_3b_1x1", **c)
        x = _conv_relu(x, 192, (3, 3), "Conv2d_4a_3x3", **c)
        x = _max_pool_valid(x)
        x = InceptionA(32, name="Mixed_5b", **c)(x)
        x = InceptionA(64, name="Mixed_5c", **c)(x)
        x = InceptionA(64, name="Mixed_5d", **c)(x)
        x = InceptionB(name="Mixed_6a", **c)(x)
        x = InceptionC(128, name="Mixed_6b", **c)(x)
        x = InceptionC(160, name="Mixed_6c", **c)(x)
        x = InceptionC(160, name="Mixed_6d", **c)(x)
        x = InceptionC(192, name="Mixed_6e", **c)(x)
        x = InceptionD(name="Mixed_7a", **c)(x)
        x = InceptionE(max_pool=False, name="Mixed_7b", **c)(x)
        x = InceptionE(max_pool=True, name="Mixed_7c", **c)(x)
        pool = jnp.mean(x, axis=(1, 2))
        out = {"pool": pool}
        if self.num_logits:
            # The logits layer is a 1x1 conv on the pooled vector in the TF graph.
            out["logits"] = nn.Dense(
                self.num_logits, precision=self.precision, name="fc",
                kernel_init=nn.with_logical_partitioning(
                    nn.initializers.lecun_normal(), (axes.CONV_IN, axes.CONV_OUT)),
                bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (axes.CONV_OUT,)))(pool)
        return out


def _legacy_bilinear_matrix(size_in: int, size_out: int) -> np.ndarray:
    """[out, in] interpolation weights of TF1's ResizeBilinear (align_corners=False).

    That op samples source position j * in / out (no half-pixel offset) and
    clamps at the last pixel; the FID graph resizes with it, and NVlabs'
    TorchScript port reproduces it with an offset grid_sample.
    """
    position = np.arange(size_out) * (size_in / size_out)
    low = np.floor(position).astype(int)
    high = np.minimum(low + 1, size_in - 1)
    frac = position - low
    matrix = np.zeros((size_out, size_in), np.float32)
    matrix[np.arange(size_out), low] += 1 - frac
    matrix[np.arange(size_out), high] += frac
    return matrix


def resize_bilinear_legacy(images: jax.Array, size: int = INPUT_SIZE) -> jax.Array:
    """[B, H, W, C] float -> [B, size, size, C] with TF1 ResizeBilinear semantics."""
    _, height, width, _ = images.shape
    if (height, width) == (size, size):
        return images
    rows = jnp.asarray(_legacy_bilinear_matrix(height, size))
    cols = jnp.asarray(_legacy_bilinear_matrix(width, size))
    images = jnp.einsum("oh,bhwc->bowc", rows, images, precision=HIGHEST)
    return jnp.einsum("pw,bowc->bopc", cols, images, precision=HIGHEST)


def preprocess(images: jax.Array) -> jax.Array:
    """uint8 [B, H, W], [B, H, W, 1] or [B, H, W, 3] -> float32 [B, 299, 299, 3] in [-1, 0.9921875]."""
    if images.dtype != jnp.uint8:
        raise ValueError(f"Inception input must be uint8 images, got dtype {images.dtype}")
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"images must be [B, H, W], [B, H, W, 1] or [B, H, W, 3], got {images.shape}")
    images = jnp.broadcast_to(images, images.shape[:3] + (3,)).astype(jnp.float32)
    return (resize_bilinear_legacy(images) - 128.0) / 128.0


def inception_params_shapes(num_logits: Optional[int] = None) -> dict[str, Any]:
    """The parameter tree's shapes (no weights materialised), for checking converted files."""
    model = InceptionV3(num_logits=num_logits)
    x = jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    return nn.unbox(variables["params"])


def flatten_params(params: dict[str, Any]) -> dict[str, Any]:
    """Nested dict -> {'Mixed_5b/branch1x1/kernel': array}: the weights file's keys."""
    return traverse_util.flatten_dict(params, sep="/")


def check_params(params: dict[str, Any]) -> dict[str, Any]:
    """Raises ValueError unless `params` has exactly the InceptionV3 tree and shapes."""
    num_logits = params["fc"]["kernel"].shape[1] if "fc" in params else None
    expected = flatten_params(inception_params_shapes(num_logits))
    got = flatten_params(params)
    missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    if missing or extra:
        raise ValueError(f"Inception params do not match the model: missing {missing[:5]}, "
                         f"unexpected {extra[:5]} ({len(missing)} / {len(extra)} in all)")
    for key, shape in expected.items():
        if tuple(got[key].shape) != tuple(shape.shape):
            raise ValueError(f"Inception param {key}: shape {got[key].shape}, model wants {shape.shape}")
    return params


def save_params(path: str, params: dict[str, Any]) -> None:
    """Writes the weights file: an `.npz` keyed by `/`-joined parameter paths."""
    np.savez(path, **{k: np.asarray(v, np.float32) for k, v in flatten_params(check_params(params)).items()})


def load_params(path: str) -> dict[str, Any]:
    """Reads a weights file -> nested dict of float32 arrays, shape-checked against the model."""
    if not os.path.exists(path):
        raise ValueError(f"Inception weights file not found: {path} (make one with "
                         "`python -m maskgen.eval.convert_inception --torchscript default --out FILE`)")
    hint = "make one with `python -m maskgen.eval.convert_inception --torchscript default --out FILE`"
    if os.path.isdir(path):
        raise ValueError(f"Inception weights {path} is a directory, not an .npz ({hint})")
    if not zipfile.is_zipfile(path):  # np.load would talk about allow_pickle
        raise ValueError(f"Inception weights {path} is not an .npz of weights (not a zip archive); {hint}")
    try:
        with np.load(path, allow_pickle=False) as data:
            flat = {key: data[key].astype(np.float32) for key in data.files}
    except (ValueError, OSError, EOFError) as err:
        reason = " ".join(str(err).split())[:120]
        raise ValueError(f"Inception weights {path} is not an .npz of weights ({reason}); {hint}") from None
    return check_params(traverse_util.unflatten_dict(flat, sep="/"))


def load_inception(path: str) -> tuple[InceptionV3, dict[str, Any]]:
    """Weights `.npz` from `convert_inception` -> (InceptionV3 module, params).

    The module has logits (for IS) only when the file carries the `fc` layer.
    """
    params = load_params(path)
    num_logits = params["fc"]["kernel"].shape[1] if "fc" in params else None
    return InceptionV3(num_logits=num_logits), params


def inception_features(model: InceptionV3, params: dict[str, Any], images: ArrayLike, batch_size: int = 200,
                       mesh: Optional[Mesh] = None, progress: bool = True) -> dict[str, np.ndarray]:
    """uint8 images [N, H, W(, C)] -> {"pool": [N, 2048] float32, "logits": [N, 1008] if present}.

    Preprocessing runs on device; the batch is sharded over every device in `mesh`.
    """
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise ValueError(f"images must be uint8, got {images.dtype}; convert with "
                         "np.clip(np.round(x * 255), 0, 255).astype(np.uint8) for [0, 1] floats")

    return features_lib.batched_apply(_apply_fn(model.num_logits, model.precision), params, images,
                                      batch_size, mesh=mesh, progress=progress, desc="inception")


@functools.lru_cache(maxsize=None)
def _apply_fn(num_logits: Optional[int], precision: jax.lax.Precision) -> Callable:
    """One function object per model configuration, so `sharded_step` compiles it once."""
    model = InceptionV3(num_logits=num_logits, precision=precision)

    def apply(params: dict[str, Any], images: jax.Array) -> dict[str, jax.Array]:
        return model.apply({"params": params}, preprocess(images))

    return apply
