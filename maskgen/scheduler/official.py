"""The official MaskGIT decode rule, reproduced operation for operation.

Used by the `official` preset so that maskgen reproduces google-research/maskgit
token for token: one batch key split in the official order, the mask count
recomputed in-loop from the float32 schedule, re-masking of the least confident
sampled tokens with `conf < sort(conf)[mask_len]`. The per-step arithmetic is
kept in the official form on purpose (e.g. the ratio computed from the traced
step): XLA simplifies it the same way for both, which float32 floors rely on.
The random draws are the official ones (token_sampling draws them flat, with
identical bits).
"""
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from maskgen.scheduler import schedules, token_sampling
from maskgen.scheduler.model_calls import ModelCalls


def run(calls: ModelCalls, seq: jax.Array, key: jax.Array, *, num_steps: int, start_step: int,
        schedule: str, choice_temperature: float, mask_id: int,
        temperatures: Optional[np.ndarray] = None, guidance: Optional[np.ndarray] = None,
        top_k: Optional[int] = None, top_p: Optional[float] = None,
        keep_steps: bool = False) -> tuple[jax.Array, Optional[jax.Array]]:
    """Returns (tokens [B, L], slots [B, T, L] or None); slot t = step t's pre-re-mask sample."""
    schedule = schedules.canonical_schedule(schedule)
    unknown_at_start = jnp.sum(seq == mask_id, axis=-1)  # [B] int32
    slots = jnp.tile(seq[:, None, :], (1, num_steps, 1)) if keep_steps else None

    def body(step: jax.Array, state: tuple) -> tuple:
        rng, current, last_sample, slots = state
        logits = calls.full(current, None if guidance is None else jnp.asarray(guidance)[step])[0]
        if temperatures is not None or top_k is not None or top_p is not None:
            temperature = None if temperatures is None else jnp.asarray(temperatures)[step]
            logits = token_sampling.filter_logits(logits, temperature, top_k, top_p)
        rng, sample_rng = jax.random.split(rng, 2)
        sampled = token_sampling.categorical(sample_rng, logits)
        unknown = current == mask_id
        chosen = jnp.where(unknown, sampled, current)
        ratio = 1. * (step + 1) / num_steps
        mask_ratio = schedules.mask_ratio(schedule, ratio, unknown_at_start)
        if slots is not None:
            slots = lax.dynamic_update_slice(slots, chosen[:, None, :], (0, step, 0))
        probs = jax.nn.softmax(logits, axis=-1)
        selected = jnp.take_along_axis(probs, sampled[..., None], axis=-1)[..., 0]
        selected = jnp.where(unknown, selected, jnp.inf)
        mask_len = jnp.floor(unknown_at_start * mask_ratio)[:, None]
        mask_len = jnp.maximum(1, jnp.minimum(jnp.sum(unknown, axis=-1, keepdims=True) - 1,
                                              mask_len))
        rng, choice_rng = jax.random.split(rng)
        noise_scale = choice_temperature * (1. - ratio)
        noise = token_sampling.gumbel(choice_rng, selected.shape)
        confidence = jnp.log(selected) + noise_scale * noise
        cut_off = jnp.take_along_axis(jnp.sort(confidence, axis=-1),
                                      mask_len.astype(jnp.int32), axis=-1)
        remask = confidence < cut_off
        return rng, jnp.where(remask, mask_id, chosen), chosen, slots

    state = (key, seq, seq, slots)
    _, _, last_sample, slots = lax.fori_loop(start_step, num_steps, body, state)
    return last_sample, slots
