"""maskgen.models.attention: per-head attention equals the one-shot softmax attention, and its
hand-written backward equals autodiff of that reference, dropout included."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maskgen.models.attention import attend


def _reference(q, k, v, keep_HxBxNxL=None, keep_prob=1.0):
    """One-shot softmax attention in jnp (differentiable), dropout on the probabilities."""
    s = jnp.einsum("bnhk,blhk->bhnl", q, k) / np.sqrt(q.shape[-1])
    p = jax.nn.softmax(s, axis=-1)
    if keep_HxBxNxL is not None:
        p = p * jnp.moveaxis(keep_HxBxNxL, 0, 1) / keep_prob
    return jnp.einsum("bhnl,blhk->bnhk", p, v)


def _inputs(seed, batch, queries, keys, heads, dim):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(batch, queries, heads, dim)).astype(np.float32)
    k, v = (rng.normal(size=(batch, keys, heads, dim)).astype(np.float32) for _ in range(2))
    keep = rng.random((heads, batch, queries, keys)) < 0.7
    return jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(keep)


@pytest.mark.parametrize("queries", [9, 3])
def test_matches_numpy_reference(queries):
    q, k, v, _ = _inputs(0, 2, queries, 9, 3, 4)
    s = np.einsum("bnhk,blhk->bhnl", q, k) / 2.0
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    want = np.einsum("bhnl,blhk->bnhk", p, v)
    out = attend(q, k, v, jnp.float32)
    assert out.shape == (2, queries, 3, 4)
    np.testing.assert_allclose(np.asarray(out), want, rtol=1e-5, atol=1e-6)


def test_dropout_multiplies_each_heads_probabilities_by_its_mask():
    q, k, v, keep = _inputs(1, 2, 5, 5, 2, 4)
    out = attend(q, k, v, jnp.float32, keep, 0.7)
    np.testing.assert_allclose(np.asarray(out), np.asarray(_reference(q, k, v, keep, 0.7)), rtol=1e-5, atol=1e-6)
    assert not np.allclose(np.asarray(out), np.asarray(attend(q, k, v, jnp.float32)), atol=1e-3)


@pytest.mark.parametrize("queries,dropout", [(7, False), (7, True), (3, True)])
def test_custom_backward_equals_autodiff_of_the_reference(queries, dropout):
    """dq, dk, dv of the flash-style backward vs jax.grad through the one-shot softmax."""
    q, k, v, keep = _inputs(2, 2, queries, 7, 3, 8)
    keep = keep if dropout else None
    cotangent = jnp.asarray(np.random.default_rng(3).normal(size=q.shape).astype(np.float32))

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v) * cotangent)
    got = jax.jit(jax.grad(loss(lambda q, k, v: attend(q, k, v, jnp.float32, keep, 0.7)), (0, 1, 2)))(q, k, v)
    want = jax.grad(loss(lambda q, k, v: _reference(q, k, v, keep, 0.7)), (0, 1, 2))(q, k, v)
    for name, g, w in zip("qkv", got, want):
        assert float(jnp.max(jnp.abs(w))) > 1e-2, name  # a real gradient, not zeros on both sides
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-5, err_msg=name)


def test_bfloat16_activations_stay_close_to_float32():
    q, k, v, _ = _inputs(4, 2, 6, 6, 2, 8)
    out = attend(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), v.astype(jnp.bfloat16), jnp.bfloat16)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(_reference(q, k, v)), atol=5e-2)
    grads = jax.grad(lambda q: jnp.sum(attend(q, k.astype(jnp.bfloat16), v.astype(jnp.bfloat16),
                                              jnp.bfloat16).astype(jnp.float32)))(q.astype(jnp.bfloat16))
    assert grads.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(grads.astype(jnp.float32))))


def test_mask_of_the_wrong_shape_is_rejected():
    q, k, v, keep = _inputs(5, 3, 4, 4, 2, 4)
    with pytest.raises(ValueError, match=r"\[H, B, N, L\]"):
        attend(q, k, v, jnp.float32, jnp.moveaxis(keep, 0, 1), 0.7)
