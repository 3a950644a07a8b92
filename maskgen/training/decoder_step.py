"""Decoder fine-tuning on frozen tokens: the step trains only the tokenizer's decoder.

Why: at a fixed rate an L1/L2 decoder outputs the average of the images a token grid could
stand for, which is blurred and off the data distribution (Blau & Michaeli's
rate-distortion-perception trade-off); an adversarial decoder on the same tokens can
sharpen them without changing a single token (TiTok's second stage).

The encoder and quantizer parameters are an argument of the step, not part of the
state, so nothing can move them: the quantised features of a batch are computed with
them, then only `params = {"decoder": ...}` get gradients. Generator loss:
  l1_weight * L1 + l2_weight * L2
  + [step >= disc_start_step] * (gan_weight * adversarial + feature_matching_weight * FM),
FM = mean over the discriminator's blocks of mean |features(real) - features(fake)|.
Discriminator (own AdamW, `disc_learning_rate`): hinge or logistic loss on real vs
decoded images + lecam_weight * LeCam (EMAs in `extra`). No loss uses features of a
network trained with labels: the discriminator only ever sees real vs decoded.
"""
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax

from maskgen import vq_losses
from maskgen.models.discriminator import DiscriminatorBlock
from maskgen.training import optimizer, train_state


def check_train_config(tcfg: ml_collections.ConfigDict) -> None:
    if tcfg.gan_loss not in vq_losses.GAN_LOSS_KINDS:
        raise ValueError(f"decoder_train.gan_loss must be one of {vq_losses.GAN_LOSS_KINDS}, "
                         f"got {tcfg.gan_loss!r}")
    weights = {k: float(tcfg[k]) for k in ("l1_weight", "l2_weight", "gan_weight",
                                           "feature_matching_weight", "lecam_weight")}
    bad = [k for k, v in weights.items() if v < 0]
    if bad:
        raise ValueError(f"decoder_train.{bad[0]} must be >= 0, got {weights[bad[0]]}")
    if weights["l1_weight"] + weights["l2_weight"] == 0:
        raise ValueError("decoder_train needs a reconstruction loss (l1_weight or l2_weight > 0)")
    if tcfg.disc_start_step < 0:
        raise ValueError(f"decoder_train.disc_start_step must be >= 0, got {tcfg.disc_start_step}")


def _is_block(module: Any, method_name: str) -> bool:
    return isinstance(module, DiscriminatorBlock) and method_name == "__call__"


def make_train_step(vqgan: Any, disc: Any, tx: optax.GradientTransformation,
                    disc_tx: optax.GradientTransformation, lr_fn: Callable, tcfg: ml_collections.ConfigDict,
                    ema_decay: float) -> Callable:
    """train_step(state, batch, key, frozen) -> (state, metrics).

    `frozen` is the tokenizer's parameter tree (its `decoder` entry is ignored); state.params
    is {"decoder": ...}; state.extra holds the discriminator and the LeCam EMAs.
    """
    check_train_config(tcfg)
    l1_w, l2_w = float(tcfg.l1_weight), float(tcfg.l2_weight)
    gan_w, fm_w = float(tcfg.gan_weight), float(tcfg.feature_matching_weight)
    lecam_w, disc_start, kind = float(tcfg.lecam_weight), int(tcfg.disc_start_step), tcfg.gan_loss
    use_gan = gan_w > 0 or fm_w > 0

    def disc_apply(d_params: Any, images: jax.Array) -> tuple[jax.Array, list]:
        """(logits, block features) of the discriminator."""
        logits, state = disc.apply({"params": d_params}, images, capture_intermediates=_is_block,
                                   mutable=["intermediates"])
        return logits, jax.tree.leaves(state["intermediates"])

    def generator_loss(params: Any, d_params: Any, quantized: jax.Array, images: jax.Array,
                       gan_on: jax.Array) -> tuple[jax.Array, tuple]:
        recon = vqgan.apply({"params": params}, quantized, method=vqgan.decode)
        rec = jnp.zeros((), jnp.float32)
        if l1_w:
            rec += l1_w * vq_losses.l1_loss(images, recon)
        if l2_w:
            rec += l2_w * vq_losses.l2_loss(images, recon)
        metrics = dict(reconstruction_loss=rec, l1=vq_losses.l1_loss(images, recon))
        total = rec
        if use_gan:
            fake_logits, fake_feats = disc_apply(d_params, recon)
            _, real_feats = disc_apply(d_params, images)
            adv = vq_losses.generator_loss(fake_logits, kind)
            fm = sum(jnp.mean(jnp.abs(jax.lax.stop_gradient(r).astype(jnp.float32) - f.astype(jnp.float32)))
                     for r, f in zip(real_feats, fake_feats)) / max(len(fake_feats), 1)
            total += gan_on * (gan_w * adv + fm_w * fm)
            metrics.update(generator_gan_loss=adv, feature_matching_loss=fm)
        metrics["loss"] = total
        return total, (metrics, recon)

    def disc_loss(d_params: Any, images: jax.Array, recon: jax.Array,
                  lecam_ema: vq_losses.LeCamEMA) -> tuple[jax.Array, tuple]:
        real, _ = disc_apply(d_params, images)
        fake, _ = disc_apply(d_params, jax.lax.stop_gradient(recon))
        loss = vq_losses.discriminator_loss(real, fake, kind)
        metrics = dict(disc_loss=loss, logits_real=jnp.mean(real), logits_fake=jnp.mean(fake))
        if lecam_w:
            lecam, lecam_ema = vq_losses.lecam_loss(real, fake, lecam_ema, tcfg.lecam_ema_decay)
            loss += lecam_w * lecam
            metrics["lecam_loss"] = lecam
        return loss, (metrics, lecam_ema)

    def train_step(state: Any, batch: Any, key: jax.Array, frozen: Any) -> tuple[Any, dict]:
        del key  # deterministic
        images = batch["image"].astype(jnp.float32)
        tokenizer_params = {k: v for k, v in frozen.items() if k != "decoder"}
        quantized, _ = vqgan.apply({"params": tokenizer_params}, images, method=vqgan.encode)
        quantized = jax.lax.stop_gradient(quantized)
        extra = state.extra
        on = state.step >= disc_start
        (_, (metrics, recon)), grads = jax.value_and_grad(generator_loss, has_aux=True)(
            state.params, extra["disc_params"], quantized, images, on.astype(jnp.float32))
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        d_params, d_opt, ema = extra["disc_params"], extra["disc_opt_state"], extra["lecam_ema"]
        if use_gan:
            (_, (d_metrics, new_ema)), d_grads = jax.value_and_grad(disc_loss, has_aux=True)(
                d_params, images, recon, ema)
            d_updates, new_d_opt = disc_tx.update(d_grads, d_opt, d_params)
            new_d = optax.apply_updates(d_params, d_updates)
            # Select, not cond: XLA:CPU runs a conditional's branch several times slower.
            (d_params, d_opt, ema), d_metrics = jax.tree.map(
                lambda new, old: jnp.where(on, new, old), ((new_d, new_d_opt, new_ema), d_metrics),
                ((d_params, d_opt, ema), jax.tree.map(jnp.zeros_like, d_metrics)))
            metrics = dict(metrics, **d_metrics)
        metrics = dict(metrics, grad_norm=optax.tree.norm(grads),
                       learning_rate=jnp.asarray(lr_fn(state.step), jnp.float32))
        new_state = state.replace(
            step=state.step + 1, params=params, opt_state=opt_state,
            ema_params=optimizer.ema_update(state.ema_params, params, ema_decay),
            extra=dict(extra, disc_params=d_params, disc_opt_state=d_opt, lecam_ema=ema))
        return new_state, metrics

    return train_step


def make_init(vqgan: Any, disc: Any, tx: optax.GradientTransformation, disc_tx: optax.GradientTransformation,
              image_shape: tuple[int, ...]) -> Callable:
    """init(key) -> boxed TrainState: {"decoder": fresh decoder} (the stage loads the tokenizer's
    decoder over it), a fresh discriminator and its optimizer in `extra`."""
    def init(key: jax.Array) -> Any:
        k_gen, k_disc = jax.random.split(key)
        images = jnp.zeros((1,) + tuple(image_shape), jnp.float32)
        params = {"decoder": vqgan.init(k_gen, images)["params"]["decoder"]}
        disc_params = disc.init(k_disc, images)["params"]
        return train_state.new_state(params, tx, extra=dict(
            disc_params=disc_params, disc_opt_state=disc_tx.init(disc_params),
            lecam_ema=vq_losses.LeCamEMA.zeros()))
    return init
