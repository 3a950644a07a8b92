"""Loss terms for VQGAN tokenizer training, as pure jit-friendly functions.

Everything returns float32 scalars (means over the batch) so callers can weight
and sum them freely. Discriminator outputs ("logits") are one number per image,
[B] or [B, 1].

  * reconstruction: `l1_loss`, `l2_loss`, `reconstruction_loss(kind)`;
  * adversarial: `generator_loss` / `discriminator_loss`, "non_saturating" or "hinge";
  * regularisers: `r1_penalty` (gradient penalty on real images), `lecam_loss`
    (LeCam with EMAs of D outputs, carried by the caller in a `LeCamEMA`);
  * `adaptive_gan_weight` (VQGAN's grad-norm ratio at the decoder's last layer);
  * `perceptual_loss` with any feature function (LPIPS weights are not shipped);
  * `entropy_loss` on codebook affinities, used by the quantiser.
"""
from typing import Any, Callable, Sequence, Tuple, Union

import flax
import jax
import jax.numpy as jnp

GAN_LOSS_KINDS = ("non_saturating", "hinge")
RECONSTRUCTION_KINDS = ("l1", "l2")


def _f32(x: jax.Array) -> jax.Array:
    return jnp.asarray(x, jnp.float32)


def l1_loss(target: jax.Array, prediction: jax.Array) -> jax.Array:
    return jnp.mean(jnp.abs(_f32(target) - _f32(prediction)))


def l2_loss(target: jax.Array, prediction: jax.Array) -> jax.Array:
    return jnp.mean(jnp.square(_f32(target) - _f32(prediction)))


def reconstruction_loss(target: jax.Array, prediction: jax.Array, kind: str = "l1") -> jax.Array:
    if kind == "l1":
        return l1_loss(target, prediction)
    if kind == "l2":
        return l2_loss(target, prediction)
    raise ValueError(
        f"reconstruction loss kind must be one of {RECONSTRUCTION_KINDS}, got {kind!r}")


def _check_gan_kind(kind: str) -> None:
    if kind not in GAN_LOSS_KINDS:
        raise ValueError(f"GAN loss kind must be one of {GAN_LOSS_KINDS}, got {kind!r}")


def generator_loss(fake_logits: jax.Array, kind: str = "non_saturating") -> jax.Array:
    """Generator's adversarial loss: non-saturating -log sigmoid(D(fake)), or hinge -D(fake)."""
    _check_gan_kind(kind)
    fake = _f32(fake_logits)
    if kind == "hinge":
        return -jnp.mean(fake)
    return jnp.mean(jax.nn.softplus(-fake))


def discriminator_loss(real_logits: jax.Array, fake_logits: jax.Array, kind: str = "non_saturating") -> jax.Array:
    """Discriminator loss: logistic (softplus(-real) + softplus(fake)) or hinge."""
    _check_gan_kind(kind)
    real, fake = _f32(real_logits), _f32(fake_logits)
    if kind == "hinge":
        return jnp.mean(jax.nn.relu(1.0 - real)) + jnp.mean(jax.nn.relu(1.0 + fake))
    return jnp.mean(jax.nn.softplus(-real)) + jnp.mean(jax.nn.softplus(fake))


def r1_penalty(apply_fn: Callable, params: Any, real_images: jax.Array) -> Tuple[jax.Array, jax.Array]:
    """R1 = mean over images of |d D(x) / d x|^2, plus the logits D(x) for reuse.

    `apply_fn(params, images) -> logits` must treat images independently (no batch
    statistics), so the gradient of the summed logits is every image's own gradient.
    The caller multiplies by its weight (and, as StyleGAN does, by gamma / 2).
    """
    logits, vjp_fn = jax.vjp(lambda x: apply_fn(params, x), real_images)
    (grad,) = vjp_fn(jnp.ones_like(logits))
    grad = _f32(grad).reshape(real_images.shape[0], -1)
    return jnp.mean(jnp.sum(jnp.square(grad), axis=-1)), logits


@flax.struct.dataclass
class LeCamEMA:
    """Running means of D's outputs on real and on fake images (start both at 0)."""
    real: jax.Array  # [] float32
    fake: jax.Array  # [] float32

    @classmethod
    def zeros(cls) -> "LeCamEMA":
        return cls(real=jnp.zeros((), jnp.float32), fake=jnp.zeros((), jnp.float32))


def lecam_loss(real_logits: jax.Array, fake_logits: jax.Array, ema: LeCamEMA,
               decay: float = 0.999) -> Tuple[jax.Array, LeCamEMA]:
    """LeCam regulariser (Tseng et al. 2021) -> (loss, updated EMA).

    The EMAs are first moved towards this batch's mean outputs, then
    loss = mean(relu(real - ema.fake)^2) + mean(relu(ema.real - fake)^2):
    D's real outputs are pulled towards the fake anchor and vice versa, which
    keeps D from drifting to extreme logits when data are scarce.
    """
    real, fake = _f32(real_logits), _f32(fake_logits)
    new_ema = LeCamEMA(
        real=decay * ema.real + (1.0 - decay) * jax.lax.stop_gradient(jnp.mean(real)),
        fake=decay * ema.fake + (1.0 - decay) * jax.lax.stop_gradient(jnp.mean(fake)))
    loss = (jnp.mean(jnp.square(jax.nn.relu(real - new_ema.fake)))
            + jnp.mean(jnp.square(jax.nn.relu(new_ema.real - fake))))
    return loss, new_ema


def _global_norm(tree: Any) -> jax.Array:
    return jnp.sqrt(sum(jnp.sum(jnp.square(_f32(x))) for x in jax.tree_util.tree_leaves(tree)))


def adaptive_gan_weight(reconstruction_grads: Any, gan_grads: Any, eps: float = 1e-4,
                        max_weight: float = 1e4) -> jax.Array:
    """VQGAN's balance |g_rec| / (|g_gan| + eps), clipped to [0, max_weight], no gradient.

    Both arguments are gradients (arrays or pytrees) of the respective losses with
    respect to the same parameters, normally the decoder's output conv kernel
    (`params['decoder'][VQGAN.last_layer_name]['kernel']`).
    """
    weight = _global_norm(reconstruction_grads) / (_global_norm(gan_grads) + eps)
    return jax.lax.stop_gradient(jnp.clip(weight, 0.0, max_weight))


FeatureFn = Callable[[jax.Array], Union[jax.Array, Sequence[jax.Array]]]


def perceptual_loss(features_fn: FeatureFn, target: jax.Array, prediction: jax.Array,
                    normalize: bool = True) -> jax.Array:
    """Feature-space distance: sum over layers of mean_{b,h,w} sum_c (f(x) - f(y))^2.

    `features_fn(images)` returns one [B,...,C] array or a sequence of them. With
    `normalize`, features are scaled to unit L2 norm over channels first (as
    LPIPS does, without its learned channel weights).
    """
    def as_list(f: Any) -> list:
        return [f] if isinstance(f, jax.Array) or hasattr(f, "shape") else list(f)

    total = jnp.zeros((), jnp.float32)
    for f_t, f_p in zip(as_list(features_fn(target)), as_list(features_fn(prediction)),
                        strict=True):
        f_t, f_p = _f32(f_t), _f32(f_p)
        if normalize:
            f_t = f_t / (jnp.linalg.norm(f_t, axis=-1, keepdims=True) + 1e-10)
            f_p = f_p / (jnp.linalg.norm(f_p, axis=-1, keepdims=True) + 1e-10)
        total = total + jnp.mean(jnp.sum(jnp.square(f_t - f_p), axis=-1))
    return total


def entropy_loss(affinity_NxK: jax.Array, temperature: float = 0.01) -> jax.Array:
    """Codebook-usage loss: mean per-sample entropy minus entropy of the mean assignment.

    Low when each vector picks one code confidently (low per-sample entropy) and
    the batch spreads over many codes (high entropy of the average). `affinity`
    is -distance, [..., K]; probabilities are softmax(affinity / temperature).
    """
    logits = _f32(affinity_NxK).reshape(-1, affinity_NxK.shape[-1]) / temperature
    probs = jax.nn.softmax(logits, axis=-1)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    sample_entropy = -jnp.mean(jnp.sum(probs * log_probs, axis=-1))
    avg_probs = jnp.mean(probs, axis=0)
    avg_entropy = -jnp.sum(avg_probs * jnp.log(avg_probs + 1e-5))
    return sample_entropy - avg_entropy
