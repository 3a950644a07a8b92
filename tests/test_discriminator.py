"""StyleGAN discriminator: parameter layout, resampling maths, per-image independence."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maskgen import axes
from maskgen.models import conv as conv_lib
from maskgen.models.discriminator import Discriminator

SMALL = dict(image_size=28, image_channels=1, channel_base=256, max_channels=32)


def _random_params(model, images, seed=0):
    """Numpy-noise parameters in the model's layout (avoids compiling threefry inits)."""
    rng = np.random.default_rng(seed)
    shapes = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), images))["params"]
    return jax.tree.map(
        lambda s: jnp.asarray(rng.normal(size=s.shape) / np.sqrt(np.prod(s.shape[:-1])), s.dtype),
        shapes)


def _shapes(tree):
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(p, simple=True, separator="/"): tuple(x.shape) for p, x in flat}


def test_imagenet_256_tree_matches_official_layout():
    model = Discriminator(image_size=256)
    boxed = jax.eval_shape(model.init, jax.random.key(0),
                           jax.ShapeDtypeStruct((2, 256, 256, 3), jnp.float32))
    expected = {"Conv_0/kernel": (3, 3, 3, 64), "Conv_0/bias": (64,),
                "Conv_1/kernel": (3, 3, 512, 512), "Conv_1/bias": (512,),
                "Dense_0/kernel": (4 * 4 * 512, 512), "Dense_0/bias": (512,),
                "Dense_1/kernel": (512, 1), "Dense_1/bias": (1,)}
    widths = [64, 128, 256, 512, 512, 512, 512]  # official table at 256, 128, ..., 4 px
    for i, (c_in, c_out) in enumerate(zip(widths[:-1], widths[1:])):
        expected.update({
            f"ResBlock_{i}/Conv_0/kernel": (3, 3, c_in, c_in), f"ResBlock_{i}/Conv_0/bias": (c_in,),
            f"ResBlock_{i}/Conv_1/kernel": (1, 1, c_in, c_out),
            f"ResBlock_{i}/Conv_2/kernel": (3, 3, c_in, c_out),
            f"ResBlock_{i}/Conv_2/bias": (c_out,)})
    assert _shapes(nn.meta.unbox(boxed)["params"]) == expected
    known = {v for k, v in vars(axes).items() if k.isupper()}
    leaves = jax.tree_util.tree_leaves(
        boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
    assert all(len(x.names) == len(x.value.shape) and set(x.names) <= known for x in leaves)


def test_small_grey_discriminator_stages():
    model = Discriminator(**SMALL)
    assert model.resolutions() == (28, 14, 7, 4)
    assert [model.width(r) for r in model.resolutions()] == [8, 16, 32, 32]
    params = jax.eval_shape(model.init, jax.random.key(0),
                            jax.ShapeDtypeStruct((1, 28, 28, 1), jnp.float32))["params"]
    assert params["Dense_0"]["kernel"].value.shape == (4 * 4 * 32, 32)


@pytest.mark.parametrize("blur,impls", [(True, ("xla", "matmul")), (False, ("xla",))])
def test_logits_are_per_image_and_conv_impls_agree(blur, impls):
    images = jax.random.uniform(jax.random.key(0), (4, 28, 28, 1))
    permutation = np.array([2, 0, 3, 1])
    # One call sees the batch, a permutation of it and a single image: each image's
    # logit must not depend on its neighbours (R1 and LeCam assume this).
    stacked = jnp.concatenate([images, images[permutation], images[:1]])
    outputs = {}
    for impl in impls:
        model = Discriminator(blur_resample=blur, conv_impl=impl, **SMALL)
        params = _random_params(model, images)

        @jax.jit
        def logits_and_input_grad(x, model=model, params=params):
            logits, vjp = jax.vjp(lambda x: model.apply({"params": params}, x), x)
            return logits, vjp(jnp.ones_like(logits))[0]

        logits, grad = logits_and_input_grad(stacked)
        assert logits.shape == (9, 1) and logits.dtype == jnp.float32
        np.testing.assert_allclose(logits[4:8], logits[:4][permutation], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(logits[8], logits[0], rtol=1e-5, atol=1e-6)
        assert np.std(np.asarray(logits[:4])) > 0  # images are told apart
        outputs[impl] = (logits, grad)
    if len(impls) == 2:
        for a, b in zip(outputs["matmul"], outputs["xla"]):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("size", [8, 7])
def test_blur_down_equals_depthwise_binomial_conv(size):
    x = jax.random.normal(jax.random.key(size), (2, size, size + 1, 3))
    taps = np.array([1.0, 3.0, 3.0, 1.0])
    filt = np.outer(taps, taps) / 64.0
    kernel = jnp.asarray(np.tile(filt[:, :, None, None], (1, 1, 1, 3)), jnp.float32)
    reference = jax.lax.conv_general_dilated(
        x, kernel, (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=3, precision=jax.lax.Precision.HIGHEST)
    result = conv_lib.blur_down(x)
    assert result.shape == reference.shape == (2, -(-size // 2), -(-(size + 1) // 2), 3)
    np.testing.assert_allclose(result, reference, atol=1e-6)


def test_avg_pool_down_is_mean_of_valid_cells():
    x = np.arange(2 * 5 * 4 * 1, dtype=np.float32).reshape(2, 5, 4, 1)
    y = np.asarray(conv_lib.avg_pool_down(jnp.asarray(x)))
    assert y.shape == (2, 3, 2, 1)
    np.testing.assert_allclose(y[:, :2], x[:, :4].reshape(2, 2, 2, 2, 2, 1).mean(axis=(2, 4)))
    np.testing.assert_allclose(y[:, 2], x[:, 4].reshape(2, 2, 2, 1).mean(axis=2))  # odd edge


def test_bad_inputs_raise():
    model = Discriminator(**SMALL)
    init = functools.partial(jax.eval_shape, model.init, jax.random.key(0))
    with pytest.raises(ValueError, match="expects images"):
        init(jax.ShapeDtypeStruct((1, 32, 32, 1), jnp.float32))
    with pytest.raises(ValueError, match="expects images"):
        init(jax.ShapeDtypeStruct((1, 28, 28, 3), jnp.float32))
    with pytest.raises(ValueError, match="floating"):
        init(jax.ShapeDtypeStruct((1, 28, 28, 1), jnp.uint8))
    with pytest.raises(ValueError, match=">= 8"):
        tiny = Discriminator(image_size=4, image_channels=1)
        jax.eval_shape(tiny.init, jax.random.key(0),
                       jax.ShapeDtypeStruct((1, 4, 4, 1), jnp.float32))
    with pytest.raises(ValueError, match="conv_impl"):
        bad = Discriminator(conv_impl="winograd", **SMALL)
        jax.eval_shape(bad.init, jax.random.key(0),
                       jax.ShapeDtypeStruct((1, 28, 28, 1), jnp.float32))
