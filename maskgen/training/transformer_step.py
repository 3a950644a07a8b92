"""The MaskGIT transformer's training step (pure, jit-able, no host sync).

Per example: draw progress r ~ U[0, 1), mask ratio = schedule(r) raised to at
least `min_masking_rate`, and mask ceil(ratio * N) of the N image tokens at
uniformly random positions. The class token (possibly dropped to the null
class, for classifier-free guidance) sits at position 0. Cross-entropy with
label smoothing over the codebook logits only, on the masked positions (or on
all image tokens with `loss_on_all`). Every random draw comes from
`fold_in(key, step)`, so a resumed run repeats the same draws.

Batch: {"tokens": int32 [B, N] codebook ids (row-major token grid),
        "label": int32 [B] class ids in [0, num_real_classes)}.
"""
from typing import Any, Callable, Dict

import jax
import jax.numpy as jnp
import ml_collections
import optax

from maskgen.scheduler import schedules
from maskgen.tokens import TokenLayout
from maskgen.training import optimizer, train_state


def mask_tokens(key: jax.Array, tokens_BxN: jax.Array, schedule: str, min_masking_rate: float,
                mask_id: int) -> tuple[jax.Array, jax.Array]:
    """(inputs with masked positions set to `mask_id`, bool mask [B, N])."""
    batch, n = tokens_BxN.shape
    k_ratio, k_pos = jax.random.split(key)
    r = jax.random.uniform(k_ratio, (batch,))
    ratio = schedules.mask_ratio(schedule, r, max(n, 2))
    ratio = jnp.maximum(ratio, min_masking_rate)
    num_masked = jnp.clip(jnp.ceil(ratio * n), 1, n).astype(jnp.int32)
    scores = jax.random.uniform(k_pos, (batch, n))
    cut = jnp.take_along_axis(jnp.sort(scores, axis=-1), num_masked[:, None] - 1, axis=-1)
    masked = scores <= cut
    return jnp.where(masked, mask_id, tokens_BxN), masked


def drop_labels(key: jax.Array, labels_B: jax.Array, rate: float, null_class_id: int) -> jax.Array:
    """Replaces each label by the null class with probability `rate`."""
    if rate <= 0:
        return labels_B
    drop = jax.random.bernoulli(key, rate, labels_B.shape)
    return jnp.where(drop, null_class_id, labels_B)


def masked_token_loss(logits_BxNxK: jax.Array, targets_BxN: jax.Array, weights_BxN: jax.Array,
                      label_smoothing: float) -> jax.Array:
    """Weighted mean cross-entropy (smoothed one-hot targets) over the weighted positions."""
    num_classes = logits_BxNxK.shape[-1]
    target = optax.smooth_labels(jax.nn.one_hot(targets_BxN, num_classes), label_smoothing)
    per_token = optax.softmax_cross_entropy(logits_BxNxK.astype(jnp.float32), target)
    weights = weights_BxN.astype(jnp.float32)
    return jnp.sum(per_token * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def check_train_config(tcfg: ml_collections.ConfigDict, layout: TokenLayout) -> None:
    """Host-side validation of the transformer training block."""
    schedules.canonical_schedule(tcfg.mask_schedule)
    if not 0.0 <= tcfg.min_masking_rate <= 1.0:
        raise ValueError("transformer_train.min_masking_rate must lie in [0, 1], got "
                         f"{tcfg.min_masking_rate}")
    if not 0.0 <= tcfg.label_dropout < 1.0:
        raise ValueError(f"transformer_train.label_dropout must lie in [0, 1), got {tcfg.label_dropout}")
    if tcfg.label_dropout > 0 and layout.null_class_id is None:
        raise ValueError(
            f"transformer_train.label_dropout={tcfg.label_dropout} needs a null class "
            "(set null_class=True), or set label_dropout=0")
    if not 0.0 <= tcfg.label_smoothing < 1.0:
        raise ValueError(f"transformer_train.label_smoothing must lie in [0, 1), got {tcfg.label_smoothing}")


def make_train_step(model: Any, layout: TokenLayout, tx: optax.GradientTransformation, lr_fn: Callable,
                    tcfg: ml_collections.ConfigDict, ema_decay: float) -> Callable:
    """Returns train_step(state, batch, key) -> (state, metrics) for a Transformer module."""
    check_train_config(tcfg, layout)
    schedule, min_rate = tcfg.mask_schedule, float(tcfg.min_masking_rate)
    smoothing, label_dropout = float(tcfg.label_smoothing), float(tcfg.label_dropout)
    loss_on_all = bool(tcfg.loss_on_all)
    codebook = layout.codebook_size

    def loss_fn(params: Any, batch: Any, key: jax.Array) -> tuple[jax.Array, dict]:
        k_mask, k_label, k_dropout = jax.random.split(key, 3)
        tokens = batch["tokens"].astype(jnp.int32)
        inputs, masked = mask_tokens(k_mask, tokens, schedule, min_rate, layout.mask_id)
        labels = drop_labels(k_label, batch["label"].astype(jnp.int32), label_dropout, layout.null_class_id)
        ids = jnp.concatenate([layout.class_token(labels)[:, None], inputs], axis=1)
        logits = model.apply({"params": params}, ids, deterministic=False, num_logits=codebook,
                             rngs={"dropout": k_dropout})[:, 1:]
        weights = jnp.ones_like(masked) if loss_on_all else masked
        loss = masked_token_loss(logits, tokens, weights, smoothing)
        hits = (jnp.argmax(logits, axis=-1) == tokens) & masked
        accuracy = jnp.sum(hits) / jnp.maximum(jnp.sum(masked), 1)
        return loss, dict(loss=loss, masked_accuracy=accuracy.astype(jnp.float32),
                          mask_fraction=jnp.mean(masked.astype(jnp.float32)))

    def train_step(state: Any, batch: Any, key: jax.Array) -> tuple[Any, Dict[str, jax.Array]]:
        step_key = jax.random.fold_in(key, state.step)
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (_, metrics), grads = grad_fn(state.params, batch, step_key)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = dict(metrics, grad_norm=optax.tree.norm(grads),
                       learning_rate=jnp.asarray(lr_fn(state.step), jnp.float32))
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                                  ema_params=optimizer.ema_update(state.ema_params, params, ema_decay))
        return new_state, metrics

    return train_step


def make_init(model: Any, tx: optax.GradientTransformation, seq_len: int) -> Callable:
    """init(key) -> boxed TrainState (for `train_state.init_sharded`)."""
    def init(key: jax.Array) -> Any:
        variables = model.init({"params": key}, jnp.zeros((1, seq_len), jnp.int32))
        return train_state.new_state(variables["params"], tx)
    return init
