"""Optimisers and learning-rate schedules from a stage's training config.

AdamW with decoupled weight decay on matrices only (kernels and embedding
tables; biases and norm parameters are not decayed, the usual BERT/ViT
practice), global-norm gradient clipping first, and a schedule of linear
warm-up followed by cosine decay to zero (or a constant rate). The EMA copy of
the parameters is kept in the train state, not in the optax chain, so that it
is a top-level checkpoint entry that sampling code can read on its own.
"""
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

SCHEDULES = ("cosine", "constant", "linear")


def lr_schedule(learning_rate: float, num_steps: int, warmup_steps: int = 0,
                kind: str = "cosine") -> optax.Schedule:
    """Linear warm-up from 0 over `warmup_steps`, then `kind` decay over the remaining steps."""
    if kind not in SCHEDULES:
        raise ValueError(f"unknown lr_schedule {kind!r}; expected one of {SCHEDULES}")
    if learning_rate < 0 or warmup_steps < 0 or num_steps < 1:
        raise ValueError(f"bad schedule: learning_rate={learning_rate}, warmup_steps={warmup_steps}, "
                         f"num_steps={num_steps}")
    warmup_steps = int(warmup_steps)
    decay_steps = max(int(num_steps) - warmup_steps, 1)

    def schedule(step: int) -> jax.Array:
        step = jnp.asarray(step, jnp.float32)
        warm = jnp.minimum(1.0, (step + 1.0) / max(warmup_steps, 1)) if warmup_steps else 1.0
        progress = jnp.clip((step - warmup_steps) / decay_steps, 0.0, 1.0)
        if kind == "cosine":
            decay = 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
        elif kind == "linear":
            decay = 1.0 - progress
        else:
            decay = 1.0
        return learning_rate * warm * decay
    return schedule


def decay_mask(params: Any) -> Any:
    """True for parameters that get weight decay: arrays with two or more dimensions."""
    return jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)


def adamw(train_cfg: ml_collections.ConfigDict, num_steps: int,
          learning_rate: float | None = None) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(optax transformation, lr schedule) for a stage's training block.

    Reads learning_rate, b1, b2, weight_decay, warmup_steps, lr_schedule and
    grad_clip (<= 0 or None disables clipping).
    """
    lr = train_cfg.learning_rate if learning_rate is None else learning_rate
    schedule = lr_schedule(lr, num_steps, train_cfg.get("warmup_steps", 0),
                           train_cfg.get("lr_schedule", "cosine"))
    parts = []
    clip = train_cfg.get("grad_clip", None)
    if clip is not None and clip > 0:
        parts.append(optax.clip_by_global_norm(clip))
    parts.append(optax.adamw(schedule, b1=train_cfg.b1, b2=train_cfg.b2,
                             weight_decay=train_cfg.get("weight_decay", 0.0), mask=decay_mask))
    return optax.chain(*parts), schedule


def ema_update(ema_params: Any, params: Any, decay: float) -> Any:
    """One exponential-moving-average step, decay * ema + (1 - decay) * params."""
    return jax.tree.map(lambda e, p: (decay * e + (1.0 - decay) * p).astype(e.dtype), ema_params, params)
