"""VQGAN tokenizer: official equivalence, parameter layout, quantiser maths, input checks."""
import functools

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from maskgen import axes
from maskgen.models import conv as conv_lib
from maskgen.models.factory import tokenizer_from_block
from maskgen.models.vqgan import VQGAN, VectorQuantizer, check_images, check_token_ids, count_params

OFFICIAL_SMALL = dict(codebook_size=64, embedding_dim=16, filters=32, num_res_blocks=1,
                      channel_multipliers=(1, 1, 1, 1, 2))
IMAGENET = dict(codebook_size=1024, embedding_dim=256, filters=128, num_res_blocks=2,
                channel_multipliers=(1, 1, 2, 2, 4))
TINY = dict(codebook_size=16, embedding_dim=4, filters=8, num_res_blocks=1,
            channel_multipliers=(1, 2), norm_groups=4)


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def _random_params(model, images, seed=0):
    """Parameters of `model`'s layout filled with numpy noise.

    Real `init` would compile dozens of threefry kernels (slow on CPU); comparing
    implementations only needs some fixed parameters.
    """
    rng = np.random.default_rng(seed)
    shapes = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), images))["params"]
    return jax.tree.map(
        lambda s: jnp.asarray(rng.normal(scale=0.3, size=s.shape) + (len(s.shape) == 1), s.dtype),
        shapes)


def _paths_and_shapes(tree):
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(path): tuple(leaf.shape) for path, leaf in flat}


@pytest.fixture(scope="module")
def official(official_small):
    path = official_small["_dir"] / "checkpoints" / "tokenizer_imagenet128_checkpoint"
    state = flax.serialization.from_bytes(None, path.read_bytes())
    model = VQGAN(image_size=128, **OFFICIAL_SMALL)
    return model, {"params": state["params"]}


def _apply(model, method):
    return jax.jit(functools.partial(model.apply, method=method))


def test_official_encode_matches_reference(official, official_small):
    model, variables = official
    images = jnp.asarray(official_small["tok_images_uint8"], jnp.float32) / 255.0
    quantized, aux = _apply(model, VQGAN.encode)(variables, images)
    np.testing.assert_array_equal(np.asarray(aux["encoding_indices"]),
                                  official_small["tok_encode_indices"])
    assert _rel(aux["raw"], official_small["tok_encoder_raw"]) < 1e-5
    assert _rel(quantized, official_small["tok_quantized"]) < 1e-5
    ids = _apply(model, VQGAN.encode_to_indices)(variables, images)
    assert ids.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(ids), official_small["tok_encode_indices"])


def test_official_decode_matches_reference(official, official_small):
    model, variables = official
    decode_ids = _apply(model, VQGAN.decode_from_indices)
    for ids_key, image_key in (("tok_encode_indices", "tok_decode_from_encode"),
                               ("tok_rand_ids", "tok_decode_from_rand")):
        ids = check_token_ids(official_small[ids_key], model.codebook_size)
        assert _rel(decode_ids(variables, jnp.asarray(ids)), official_small[image_key]) < 1e-4
    # decode() of the looked-up codebook rows is the same computation.
    codebook = variables["params"]["quantizer"]["codebook"]
    features = jnp.take(codebook, official_small["tok_encode_indices"], axis=0)
    assert _rel(_apply(model, VQGAN.decode)(variables, features),
                official_small["tok_decode_from_encode"]) < 1e-4


def test_call_reconstructs_through_the_codebook(official, official_small):
    model, variables = official
    images = jnp.asarray(official_small["tok_images_uint8"], jnp.float32) / 255.0
    reconstruction, aux = _apply(model, VQGAN.__call__)(variables, images)
    assert reconstruction.shape == images.shape and reconstruction.dtype == jnp.float32
    assert _rel(reconstruction, official_small["tok_decode_from_encode"]) < 1e-4
    raw, q = np.asarray(aux["raw"]), np.asarray(official_small["tok_quantized"])
    np.testing.assert_allclose(aux["codebook_loss"], np.mean((q - raw) ** 2), rtol=1e-5)
    np.testing.assert_allclose(aux["commitment_loss"], 0.25 * np.mean((q - raw) ** 2), rtol=1e-5)


def test_init_tree_equals_official_checkpoint_tree(official):
    model, variables = official
    boxed = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 128, 128, 3)))
    assert _paths_and_shapes(nn.meta.unbox(boxed)) == _paths_and_shapes(variables)
    assert count_params(variables["params"]) == 518_259
    # Every parameter carries logical axis names of the right rank, from maskgen.axes.
    known = {v for k, v in vars(axes).items() if k.isupper()}
    leaves = jax.tree_util.tree_leaves(
        boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert leaves and all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
    for leaf in leaves:
        assert len(leaf.names) == len(leaf.value.shape) and set(leaf.names) <= known
        assert leaf.value.dtype == jnp.float32


@pytest.mark.parametrize("image_size,latent", [(256, 16), (512, 32)])
def test_imagenet_config_shapes_and_parameter_count(image_size, latent):
    model = VQGAN(image_size=image_size, **IMAGENET)
    images = jax.ShapeDtypeStruct((2, image_size, image_size, 3), jnp.float32)
    variables = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), images))
    assert count_params(variables["params"]) == 54_515_587
    assert variables["params"]["quantizer"]["codebook"].shape == (1024, 256)
    quantized, aux = jax.eval_shape(functools.partial(model.apply, method=VQGAN.encode),
                                    variables, images)
    assert quantized.shape == (2, latent, latent, 256)
    assert aux["encoding_indices"].shape == (2, latent, latent)
    assert aux["encoding_indices"].dtype == jnp.int32
    ids = jax.ShapeDtypeStruct((2, latent, latent), jnp.int32)
    decoded = jax.eval_shape(functools.partial(model.apply, method=VQGAN.decode_from_indices),
                             variables, ids)
    assert decoded.shape == (2, image_size, image_size, 3)
    assert model.latent_shape(image_size) == (latent, latent)


def test_quantizer_picks_nearest_codebook_entry_and_losses():
    rng = np.random.default_rng(0)
    codebook = rng.normal(size=(32, 6)).astype(np.float32)
    z = rng.normal(size=(3, 5, 5, 6)).astype(np.float32)
    quantizer = VectorQuantizer(codebook_size=32, embedding_dim=6, commitment_cost=0.5)
    variables = {"params": {"codebook": jnp.asarray(codebook)}}
    quantized, aux = quantizer.apply(variables, jnp.asarray(z))
    brute = np.sum((z[..., None, :].astype(np.float64) - codebook) ** 2, axis=-1)
    expected_ids = np.argmin(brute, axis=-1)
    np.testing.assert_array_equal(np.asarray(aux["encoding_indices"]), expected_ids)
    np.testing.assert_allclose(quantized, codebook[expected_ids], atol=1e-6)
    mse = np.mean((codebook[expected_ids] - z) ** 2)
    np.testing.assert_allclose(aux["codebook_loss"], mse, rtol=1e-5)
    np.testing.assert_allclose(aux["commitment_loss"], 0.5 * mse, rtol=1e-5)
    np.testing.assert_allclose(aux["quantizer_loss"], 1.5 * mse, rtol=1e-5)
    assert float(aux["entropy_loss"]) == 0.0


def test_quantizer_straight_through_and_loss_gradients():
    rng = np.random.default_rng(1)
    codebook = jnp.asarray(rng.normal(size=(16, 4)), jnp.float32)
    z = jnp.asarray(rng.normal(size=(2, 3, 3, 4)), jnp.float32)
    quantizer = VectorQuantizer(codebook_size=16, embedding_dim=4)

    def run(codebook, z):
        return quantizer.apply({"params": {"codebook": codebook}}, z)

    cotangent = jnp.asarray(rng.normal(size=z.shape), jnp.float32)
    _, vjp = jax.vjp(lambda c, x: run(c, x)[0], codebook, z)
    d_codebook, d_z = vjp(cotangent)
    np.testing.assert_array_equal(d_z, cotangent)  # identity for the encoder
    np.testing.assert_array_equal(d_codebook, 0.0)  # no gradient to codes through the output
    # The codebook loss moves only the codes, the commitment loss only the encoder.
    g_cb = jax.grad(lambda c, x: run(c, x)[1]["codebook_loss"], argnums=(0, 1))(codebook, z)
    g_cm = jax.grad(lambda c, x: run(c, x)[1]["commitment_loss"], argnums=(0, 1))(codebook, z)
    np.testing.assert_array_equal(g_cb[1], 0.0)
    np.testing.assert_array_equal(g_cm[0], 0.0)
    ids = np.asarray(run(codebook, z)[1]["encoding_indices"]).reshape(-1)
    q = np.asarray(codebook)[ids]
    expected = np.zeros((16, 4))
    np.add.at(expected, ids, 2 * (q - np.asarray(z).reshape(-1, 4)) / z.size)
    np.testing.assert_allclose(g_cb[0], expected, atol=1e-6)


def test_entropy_term_is_weighted_into_quantizer_loss():
    rng = np.random.default_rng(2)
    codebook = jnp.asarray(rng.normal(size=(8, 3)), jnp.float32)
    z = jnp.asarray(rng.normal(size=(2, 2, 2, 3)), jnp.float32)
    variables = {"params": {"codebook": codebook}}
    _, aux = VectorQuantizer(8, 3, entropy_loss_ratio=0.1, entropy_temperature=0.5).apply(
        variables, z)
    assert float(aux["entropy_loss"]) != 0.0
    np.testing.assert_allclose(
        aux["quantizer_loss"], aux["codebook_loss"] + aux["commitment_loss"] + aux["entropy_loss"],
        rtol=1e-6)


@pytest.mark.parametrize("kernel", [1, 3, 4])
def test_matmul_conv_equals_xla_conv(kernel):
    rng = np.random.default_rng(kernel)
    x = jnp.asarray(rng.normal(size=(2, 7, 6, 5)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(kernel, kernel, 5, 4)), jnp.float32)
    g = jnp.asarray(rng.normal(size=(2, 7, 6, 4)), jnp.float32)
    reference = jax.lax.conv_general_dilated(x, k, (1, 1), "SAME",
                                             dimension_numbers=("NHWC", "HWIO", "NHWC"))
    outs = {}
    for impl in conv_lib.CONV_IMPLS:
        y, vjp = jax.vjp(lambda a, b, impl=impl: conv_lib.conv2d_same(a, b, impl), x, k)
        outs[impl] = (y,) + vjp(g)
    np.testing.assert_allclose(outs["xla"][0], reference, atol=1e-5)
    for a, b in zip(outs["matmul"], outs["xla"]):
        assert _rel(a, b) < 1e-5


def test_conv_impls_give_same_model_outputs_and_gradients():
    images = jax.random.uniform(jax.random.key(0), (2, 8, 8, 3))
    results = {}
    for impl in conv_lib.CONV_IMPLS:
        model = VQGAN(conv_impl=impl, **TINY)
        params = _random_params(model, images)
        params = {k: v for k, v in params.items() if k != "quantizer"}  # unused below

        def loss(params, images, model=model):
            # Encoder -> decoder without the argmin, so tiny float differences cannot flip codes.
            recon = model.apply({"params": params}, images,
                                method=lambda m, x: m.decode(m.encoder(x)))
            return jnp.mean(jnp.abs(recon - images)), recon

        (value, recon), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params, images)
        results[impl] = (params, value, recon, grads)
    p_xla, v_xla, r_xla, g_xla = results["xla"]
    p_mm, v_mm, r_mm, g_mm = results["matmul"]
    assert _paths_and_shapes(p_xla) == _paths_and_shapes(p_mm)
    assert _rel(r_mm, r_xla) < 1e-5
    np.testing.assert_allclose(v_mm, v_xla, rtol=1e-5)
    for path_and_a, b in zip(jax.tree_util.tree_flatten_with_path(g_mm)[0],
                             jax.tree_util.tree_leaves(g_xla)):
        path, a = path_and_a
        assert np.linalg.norm(b) > 0 and _rel(a, b) < 1e-4, jax.tree_util.keystr(path)


def test_single_channel_fashion_mnist_shapes():
    model = VQGAN(image_channels=1, image_size=28, **{**TINY, "channel_multipliers": (1, 2, 2)})
    images = jax.ShapeDtypeStruct((3, 28, 28, 1), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.key(1), images)
    reconstruction, aux = jax.eval_shape(model.apply, variables, images)
    assert reconstruction.shape == (3, 28, 28, 1)
    assert aux["encoding_indices"].shape == (3, 7, 7)
    assert variables["params"]["encoder"]["Conv_0"]["kernel"].value.shape == (3, 3, 1, 8)


def test_bfloat16_activations_track_float32():
    images = jax.random.uniform(jax.random.key(0), (2, 8, 8, 1))
    f32 = VQGAN(image_channels=1, **TINY)
    bf16 = VQGAN(image_channels=1, dtype=jnp.bfloat16, **TINY)
    shapes = jax.eval_shape(bf16.init, jax.random.key(1), images)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nn.meta.unbox(shapes)))
    variables = {"params": _random_params(bf16, images)}
    through = lambda m, x: m.decode(m.encoder(x))  # noqa: E731  (no argmin: codes could flip)
    low = jax.jit(functools.partial(bf16.apply, method=through))(variables, images)
    high = jax.jit(functools.partial(f32.apply, method=through))(variables, images)
    assert low.dtype == jnp.float32 and low.shape == images.shape
    assert 0 < _rel(low, high) < 0.05  # bf16 rounding is visible but small


def test_bad_images_raise():
    check_images(jnp.zeros((1, 32, 32, 3)), channels=3, downsample_factor=16)
    with pytest.raises(ValueError, match="floating point"):
        check_images(np.zeros((1, 32, 32, 3), np.uint8), channels=3)
    with pytest.raises(ValueError, match="channels"):
        check_images(jnp.zeros((1, 32, 32, 1)), channels=3)
    with pytest.raises(ValueError, match="divisible"):
        check_images(jnp.zeros((1, 40, 40, 3)), channels=3, downsample_factor=16)
    with pytest.raises(ValueError, match="configured"):
        check_images(jnp.zeros((1, 64, 64, 3)), channels=3, image_size=128)
    with pytest.raises(ValueError, match="batch, height"):
        check_images(jnp.zeros((32, 32, 3)), channels=3)
    # The model runs the same checks while tracing, so jitted calls fail early too.
    model = VQGAN(**TINY)
    init = functools.partial(jax.eval_shape, model.init, jax.random.key(0))
    with pytest.raises(ValueError, match="divisible"):
        init(jax.ShapeDtypeStruct((1, 9, 9, 3), jnp.float32))
    with pytest.raises(ValueError, match="channels"):
        init(jax.ShapeDtypeStruct((1, 8, 8, 4), jnp.float32))


def test_bad_token_ids_raise():
    ok = check_token_ids(np.array([[[0, 63]]]), 64)
    assert ok.shape == (1, 1, 2)
    for bad, message in ((np.array([[[0, 64]]]), "out of range"),
                         (np.array([[[-1, 3]]]), "out of range"),
                         (np.array([[[0.0, 1.0]]]), "integers"),
                         (np.array([0, 1]), "batch, h, w")):
        with pytest.raises(ValueError, match=message):
            check_token_ids(bad, 64)
    model = VQGAN(**TINY)
    variables = jax.eval_shape(model.init, jax.random.key(0),
                               jax.ShapeDtypeStruct((1, 8, 8, 3), jnp.float32))
    with pytest.raises(ValueError, match="integer"):
        jax.eval_shape(functools.partial(model.apply, method=VQGAN.decode_from_indices),
                       variables, jax.ShapeDtypeStruct((1, 4, 4), jnp.float32))


def test_build_tokenizer_from_config():
    cfg = ml_collections.ConfigDict(dict(
        codebook_size=64, embedding_dim=16, filters=32, num_res_blocks=1,
        channel_multipliers=[1, 1, 1, 1, 2], image_channels=3, norm_groups=32,
        commitment_cost=0.25, dtype="bfloat16", conv_impl="matmul"))
    model = tokenizer_from_block(cfg)
    assert model.channel_multipliers == (1, 1, 1, 1, 2) and model.dtype == jnp.bfloat16
    assert model.conv_impl == "matmul" and model.downsample_factor == 16
    assert model.last_layer_name == "Conv_5"
    with pytest.raises(ValueError, match="unknown keys"):
        tokenizer_from_block({**cfg.to_dict(), "filtres": 3})
    with pytest.raises(ValueError, match="misses keys"):
        tokenizer_from_block({k: v for k, v in cfg.items() if k != "filters"})
    with pytest.raises(ValueError, match="norm_groups"):
        tokenizer_from_block({**cfg.to_dict(), "filters": 24})
    with pytest.raises(ValueError, match="conv_impl"):
        tokenizer_from_block({**cfg.to_dict(), "conv_impl": "fft"})
    with pytest.raises(ValueError, match="dtype"):
        tokenizer_from_block({**cfg.to_dict(), "dtype": "float33"})


def test_upsample_nearest_equals_image_resize():
    x = jax.random.normal(jax.random.key(3), (2, 3, 5, 4))
    expected = jax.image.resize(x, (2, 6, 10, 4), "nearest")
    np.testing.assert_array_equal(conv_lib.upsample_nearest(x), expected)
