"""Softmax attention computed one head at a time (faster on XLA:CPU, same function).

Why: with the one-shot form (scores for every head in a [B, H, N, L] einsum,
softmax, second einsum) XLA:CPU fuses the whole chain into one library call
over all heads. At the medium preset (8 heads of 32, 257 tokens, batch 8) that
spends ~25 ms per layer on 0.54 GFLOP, while a `lax.scan` over the heads, whose
[B, N, L] score block stays in the L2 cache between the two matmuls, needs
~14 ms: the whole forward gets ~1.3x faster (bench/README.md, "profile").
The arithmetic per head is the one-shot form's (scale q, scores, float32
softmax, weighted values), so results agree to float32 rounding.

Shape legend: B batch, N queries, L keys, H heads, K head dim.
"""
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


def attend(q_BxNxHxK, k_BxLxHxK, v_BxLxHxK, dtype, dropout=None):
    """Softmax attention of N queries over L keys (no mask: fully bidirectional).

    `dropout`, when given, is applied to the attention probabilities: it is
    called once on a [B, H, N, L] array of ones, so its random mask is the one
    it would draw for the probabilities themselves, and the scaled mask
    multiplies each head's probabilities inside the loop.
    """
    batch, queries, heads, _ = q_BxNxHxK.shape
    keys = k_BxLxHxK.shape[1]
    scale = jnp.asarray(1.0 / np.sqrt(q_BxNxHxK.shape[-1]), q_BxNxHxK.dtype)
    q_HxBxNxK, k_HxBxLxK, v_HxBxLxK = (
        jnp.moveaxis(t, 2, 0) for t in (q_BxNxHxK * scale, k_BxLxHxK, v_BxLxHxK))
    xs = (q_HxBxNxK, k_HxBxLxK, v_HxBxLxK)
    if dropout is not None:
        keep_BxHxNxL = dropout(jnp.ones((batch, heads, queries, keys), dtype))
        xs += (jnp.moveaxis(keep_BxHxNxL, 1, 0),)

    def one_head(_, head):
        q, k, v = head[:3]
        logits_BxNxL = jnp.einsum("bnk,blk->bnl", q, k)
        probs = jax.nn.softmax(logits_BxNxL.astype(jnp.float32), axis=-1).astype(dtype)
        if len(head) == 4:
            probs = probs * head[3]
        return None, jnp.einsum("bnl,blk->bnk", probs, v)

    _, out_HxBxNxK = lax.scan(one_head, None, xs)
    return jnp.moveaxis(out_HxBxNxK, 0, 2)
