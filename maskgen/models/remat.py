"""Rematerialisation (gradient checkpointing) options for the transformer layers.

Why: a layer's activations for the backward pass ([B, H, L, L] probabilities
under `xla`, the MLP hidden [B, L, F]) dominate accelerator memory at large
batch; `jax.checkpoint` trades them for recomputation. `config.transformer.remat`:
  none                 keep everything (no checkpoint)
  full                 save only the layer input, recompute the layer
  save_qkv_out         save the named q/k/v/out projections (`PROJECTION_NAMES`), recompute the rest
  <policy>             a `jax.checkpoint_policies` policy that takes no arguments, e.g. dots_saveable
"""
from collections.abc import Callable

import jax

# `checkpoint_name` tags in SelfAttention, saved by the save_qkv_out policy.
PROJECTION_NAMES = ("attention_query", "attention_key", "attention_value", "attention_out")
# jax.checkpoint_policies members that are policies themselves (the others build one from names).
_PLAIN_POLICIES = ("everything_saveable", "nothing_saveable", "dots_saveable", "checkpoint_dots",
                   "dots_with_no_batch_dims_saveable", "checkpoint_dots_with_no_batch_dims")
REMAT_OPTIONS = ("none", "full", "save_qkv_out") + tuple(
    p for p in _PLAIN_POLICIES if hasattr(jax.checkpoint_policies, p))


def check_remat_name(name: str) -> str:
    """The name itself, or a ValueError naming the config key."""
    if name not in REMAT_OPTIONS:
        raise ValueError(f"transformer.remat={name!r} is not one of {REMAT_OPTIONS}")
    return name


def remat_policy(name: str) -> Callable | None:
    """The `jax.checkpoint` policy for a remat option (None: save nothing but the inputs)."""
    check_remat_name(name)
    if name == "none":
        raise ValueError("transformer.remat='none' has no checkpoint policy (the layer is not rematerialised)")
    if name == "full":
        return None
    if name == "save_qkv_out":
        return jax.checkpoint_policies.save_only_these_names(*PROJECTION_NAMES)
    return getattr(jax.checkpoint_policies, name)
