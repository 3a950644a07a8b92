"""maskgen.models.attention: per-head attention equals the one-shot softmax attention, dropout included."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maskgen.models.attention import attend


def _reference(q, k, v, keep=None):
    s = np.einsum("bnhk,blhk->bhnl", q, k) / np.sqrt(q.shape[-1])
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    if keep is not None:
        p = p * keep
    return np.einsum("bhnl,blhk->bnhk", p, v)


@pytest.mark.parametrize("queries", [9, 3])
def test_matches_numpy_reference(queries):
    rng = np.random.default_rng(0)
    q = rng.normal(size=(2, queries, 3, 4)).astype(np.float32)
    k, v = (rng.normal(size=(2, 9, 3, 4)).astype(np.float32) for _ in range(2))
    out = attend(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.float32)
    assert out.shape == (2, queries, 3, 4)
    np.testing.assert_allclose(np.asarray(out), _reference(q, k, v), rtol=1e-5, atol=1e-6)


def test_dropout_multiplies_each_heads_probabilities_by_its_mask():
    rng = np.random.default_rng(1)
    q, k, v = (rng.normal(size=(2, 5, 2, 4)).astype(np.float32) for _ in range(3))
    keep = (rng.random((2, 2, 5, 5)) < 0.7).astype(np.float32) / 0.7  # [B, H, N, L]
    out = attend(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.float32,
                 dropout=lambda ones: ones * jnp.asarray(keep))
    np.testing.assert_allclose(np.asarray(out), _reference(q, k, v, keep), rtol=1e-5, atol=1e-6)


def test_flax_dropout_draws_the_mask_it_would_draw_for_the_probabilities():
    """Same rng, same [B, H, N, L] shape: the mask equals dropout applied to the probabilities."""
    rng = np.random.default_rng(2)
    q, k, v = (jnp.asarray(rng.normal(size=(2, 6, 2, 4)).astype(np.float32)) for _ in range(3))
    drop = nn.Dropout(0.3, deterministic=False)
    rngs = {"dropout": jax.random.key(5)}
    got = drop.apply({}, q, method=lambda m, _: attend(q, k, v, jnp.float32, dropout=m), rngs=rngs)
    probs = jax.nn.softmax(jnp.einsum("bnhk,blhk->bhnl", q / 2.0, k), axis=-1)
    want = jnp.einsum("bhnl,blhk->bnhk", drop.apply({}, probs, rngs=rngs), v)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
    assert not np.allclose(np.asarray(got), np.asarray(attend(q, k, v, jnp.float32)), atol=1e-3)
