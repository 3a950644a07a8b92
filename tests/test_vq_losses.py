"""Tokenizer loss terms against hand (numpy) computations and analytic values."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maskgen import vq_losses


def _softplus(x):
    return np.log1p(np.exp(-np.abs(x))) + np.maximum(x, 0)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def test_reconstruction_losses(rng):
    a, b = rng.normal(size=(2, 4, 4, 3)), rng.normal(size=(2, 4, 4, 3))
    np.testing.assert_allclose(vq_losses.l1_loss(a, b), np.mean(np.abs(a - b)), rtol=1e-6)
    np.testing.assert_allclose(vq_losses.l2_loss(a, b), np.mean((a - b) ** 2), rtol=1e-6)
    np.testing.assert_allclose(vq_losses.reconstruction_loss(a, b, "l2"), np.mean((a - b) ** 2),
                               rtol=1e-6)
    assert vq_losses.l1_loss(jnp.ones(3, jnp.bfloat16), jnp.zeros(3)).dtype == jnp.float32
    with pytest.raises(ValueError, match="reconstruction loss kind"):
        vq_losses.reconstruction_loss(a, b, "l3")


def test_gan_losses(rng):
    real, fake = rng.normal(size=(6, 1)) * 3, rng.normal(size=(6, 1)) * 3
    np.testing.assert_allclose(vq_losses.generator_loss(fake), np.mean(_softplus(-fake)),
                               rtol=1e-6)
    np.testing.assert_allclose(vq_losses.discriminator_loss(real, fake),
                               np.mean(_softplus(-real)) + np.mean(_softplus(fake)), rtol=1e-6)
    np.testing.assert_allclose(vq_losses.generator_loss(fake, "hinge"), -np.mean(fake), rtol=1e-6)
    np.testing.assert_allclose(
        vq_losses.discriminator_loss(real, fake, "hinge"),
        np.mean(np.maximum(0, 1 - real)) + np.mean(np.maximum(0, 1 + fake)), rtol=1e-6)
    # Non-saturating = logistic cross-entropy with labels real=1, fake=0.
    sig = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
    np.testing.assert_allclose(
        vq_losses.discriminator_loss(real, fake),
        -np.mean(np.log(sig(real))) - np.mean(np.log(1 - sig(fake))), rtol=1e-5)
    with pytest.raises(ValueError, match="GAN loss kind"):
        vq_losses.generator_loss(fake, "wasserstein")


def test_r1_of_linear_discriminator_is_squared_weight_norm(rng):
    weight = jnp.asarray(rng.normal(size=(4, 4, 3)), jnp.float32)
    params = {"w": weight, "b": jnp.float32(0.7)}

    def apply_fn(params, images):
        return jnp.einsum("bhwc,hwc->b", images, params["w"])[:, None] + params["b"]

    images = jnp.asarray(rng.normal(size=(5, 4, 4, 3)), jnp.float32)
    penalty, logits = vq_losses.r1_penalty(apply_fn, params, images)
    np.testing.assert_allclose(penalty, np.sum(np.asarray(weight) ** 2), rtol=1e-5)
    np.testing.assert_allclose(logits, apply_fn(params, images), rtol=1e-6)


def test_r1_of_quadratic_discriminator_matches_per_image_gradient(rng):
    # D(x) = 0.5 |x|^2 has gradient x, so R1 = mean_b |x_b|^2.
    images = jnp.asarray(rng.normal(size=(3, 2, 2, 1)), jnp.float32)
    penalty, _ = vq_losses.r1_penalty(
        lambda p, x: 0.5 * p * jnp.sum(x ** 2, axis=(1, 2, 3)), 1.0, images)
    np.testing.assert_allclose(penalty, np.mean(np.sum(np.asarray(images) ** 2, axis=(1, 2, 3))),
                               rtol=1e-5)
    # And it is differentiable w.r.t. the discriminator parameters (d/dp of p^2 |x|^2).
    grad = jax.grad(lambda p: vq_losses.r1_penalty(
        lambda p, x: 0.5 * p * jnp.sum(x ** 2, axis=(1, 2, 3)), p, images)[0])(2.0)
    np.testing.assert_allclose(grad, 2 * 2.0 * float(penalty), rtol=1e-5)


def test_lecam_loss_and_ema(rng):
    real, fake = rng.normal(size=(8,)) + 1, rng.normal(size=(8,)) - 1
    ema = vq_losses.LeCamEMA(real=jnp.float32(0.5), fake=jnp.float32(-0.2))
    loss, new = vq_losses.lecam_loss(real, fake, ema, decay=0.9)
    ema_real = 0.9 * 0.5 + 0.1 * real.mean()
    ema_fake = 0.9 * -0.2 + 0.1 * fake.mean()
    np.testing.assert_allclose([new.real, new.fake], [ema_real, ema_fake], rtol=1e-5)
    expected = (np.mean(np.maximum(real - ema_fake, 0) ** 2)
                + np.mean(np.maximum(ema_real - fake, 0) ** 2))
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    # Gradients flow to the logits only, not through the EMA anchors.
    g_real = jax.grad(lambda r: vq_losses.lecam_loss(r, fake, ema, decay=0.9)[0])(real)
    np.testing.assert_allclose(g_real, 2 * np.maximum(real - ema_fake, 0) / 8, rtol=1e-5)
    zeros = vq_losses.LeCamEMA.zeros()
    assert float(zeros.real) == 0.0 and float(zeros.fake) == 0.0
    # jit-friendly: the EMA is a pytree.
    jitted = jax.jit(vq_losses.lecam_loss, static_argnames="decay")(real, fake, ema, decay=0.9)
    np.testing.assert_allclose(jitted[0], loss, rtol=1e-6)


def test_adaptive_gan_weight(rng):
    g_rec = {"kernel": rng.normal(size=(3, 3, 4, 2)), "bias": rng.normal(size=(2,))}
    g_gan = {"kernel": rng.normal(size=(3, 3, 4, 2)) * 0.1, "bias": rng.normal(size=(2,)) * 0.1}
    norm = lambda t: np.sqrt(sum(np.sum(v ** 2) for v in t.values()))  # noqa: E731
    np.testing.assert_allclose(vq_losses.adaptive_gan_weight(g_rec, g_gan),
                               norm(g_rec) / (norm(g_gan) + 1e-4), rtol=1e-5)
    zero = {k: np.zeros_like(v) for k, v in g_gan.items()}
    np.testing.assert_allclose(vq_losses.adaptive_gan_weight(g_rec, zero, max_weight=50.0), 50.0)
    # No gradient flows through the weight.
    grad = jax.grad(lambda s: vq_losses.adaptive_gan_weight(s * g_rec["kernel"], g_gan["kernel"]))(
        1.0)
    assert float(grad) == 0.0


def test_perceptual_loss_with_feature_hooks(rng):
    x, y = rng.normal(size=(2, 4, 4, 3)), rng.normal(size=(2, 4, 4, 3))
    raw = vq_losses.perceptual_loss(lambda im: im, x, y, normalize=False)
    np.testing.assert_allclose(raw, np.mean(np.sum((x - y) ** 2, axis=-1)), rtol=1e-5)
    unit = lambda v: v / np.linalg.norm(v, axis=-1, keepdims=True)  # noqa: E731
    two_layers = lambda im: [im, 2 * im[:, ::2, ::2]]  # noqa: E731
    normalized = vq_losses.perceptual_loss(two_layers, x, y)
    expected = (np.mean(np.sum((unit(x) - unit(y)) ** 2, axis=-1))
                + np.mean(np.sum((unit(x[:, ::2, ::2]) - unit(y[:, ::2, ::2])) ** 2, axis=-1)))
    np.testing.assert_allclose(normalized, expected, rtol=1e-5)
    assert float(vq_losses.perceptual_loss(two_layers, x, x)) == pytest.approx(0.0, abs=1e-7)


def test_entropy_loss(rng):
    affinity = rng.normal(size=(2, 3, 5))
    t = 0.7
    logits = affinity.reshape(-1, 5) / t
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    sample = -np.mean(np.sum(probs * np.log(probs), axis=-1))
    avg = probs.mean(0)
    expected = sample - (-np.sum(avg * np.log(avg + 1e-5)))
    np.testing.assert_allclose(vq_losses.entropy_loss(affinity, t), expected, rtol=1e-5)
    # Confident, evenly spread assignments minimise it (about -log K).
    one_hot = np.eye(5)[np.arange(10) % 5] * 100.0
    assert float(vq_losses.entropy_loss(one_hot, 1.0)) == pytest.approx(-np.log(5), abs=1e-3)
