"""The decoder's view of the model: guidance batching and codebook slicing around user callables.

The scheduler never imports a model. It receives
  full_fn(ids [M, L]) -> (logits [M, L, V'], cache)          (plain decoding: cache None)
  cheap_fn(ids_sub [M, n], positions_sub [M, n], cache) -> logits [M, n, V']
with M = B, or 2B under classifier-free guidance (conditional rows first, then the
same rows with the null class token at position 0). Only the first codebook_size
logits are used, so callers should ask the model for exactly those
(`num_logits=codebook_size`); class and mask ids can never be sampled.
"""
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from maskgen.scheduler.token_sampling import guide


class ModelCalls:
    """Runs the user callables on the (possibly guidance-doubled) batch; returns [B, ...] logits."""

    def __init__(self, full_fn: Callable[[jax.Array], tuple[jax.Array, Any]],
                 cheap_fn: Optional[Callable[[jax.Array, jax.Array, Any], jax.Array]], codebook_size: int,
                 null_token: Optional[int] = None) -> None:
        self._full_fn = full_fn
        self._cheap_fn = cheap_fn
        self._codebook_size = codebook_size
        self._null_token = null_token  # class-token id of the null class, None = no guidance

    @property
    def guided(self) -> bool:
        """Whether each call runs the doubled (conditional + null-class) batch."""
        return self._null_token is not None

    def _model_ids(self, seq: jax.Array) -> jax.Array:
        if not self.guided:
            return seq
        unconditional = seq.at[:, 0].set(jnp.asarray(self._null_token, seq.dtype))
        return jnp.concatenate([seq, unconditional], axis=0)

    def _codebook_logits(self, logits: jax.Array, batch: int, rows: int,
                         weight: Optional[ArrayLike]) -> jax.Array:
        expected = (batch * (2 if self.guided else 1), rows)
        if logits.ndim != 3 or logits.shape[:2] != expected:
            raise ValueError(f"model returned logits of shape {logits.shape}; expected "
                             f"{expected + ('V',)}")
        if logits.shape[-1] < self._codebook_size:
            raise ValueError(f"model returned {logits.shape[-1]} logits per token, fewer than the "
                             f"codebook size {self._codebook_size}")
        logits = logits[..., :self._codebook_size]
        if not self.guided:
            return logits
        return guide(logits[:batch], logits[batch:], weight)

    def full(self, seq: jax.Array, weight: Optional[ArrayLike] = None) -> tuple[jax.Array, Any]:
        """Full evaluation of seq [B, L] -> (codebook logits [B, L, C], opaque cache)."""
        output = self._full_fn(self._model_ids(seq))
        if not (isinstance(output, tuple) and len(output) == 2):
            raise ValueError("full_fn must return a (logits, cache) pair")
        logits, cache = output
        return self._codebook_logits(logits, seq.shape[0], seq.shape[1], weight), cache

    def cheap(self, seq: jax.Array, positions: jax.Array, cache: Any,
              weight: Optional[ArrayLike] = None) -> jax.Array:
        """Recomputes only the rows `positions` [B, n] of seq [B, L] against the frozen cache."""
        ids = self._model_ids(seq)
        positions = jnp.tile(positions, (ids.shape[0] // seq.shape[0], 1))
        ids_sub = jnp.take_along_axis(ids, positions, axis=1)
        logits = self._cheap_fn(ids_sub, positions, cache)
        return self._codebook_logits(logits, seq.shape[0], positions.shape[1], weight)
