"""MaskGIT transformer: official equivalence, bidirectionality, parameter layout, ReCAP entry points."""
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.core import meta

from maskgen import axes
from maskgen.models.factory import transformer_from_block
from maskgen.models.transformer import KVCache, Transformer, attend, check_input_ids, scatter_rows

SMALL = dict(vocab_size=75, hidden_size=64, num_layers=2, num_heads=2, mlp_dim=256, max_len=65)


def _rel(a, b):
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))


@pytest.fixture(scope="module")
def official_params(official_small):
    path = official_small["_dir"] / "checkpoints" / "maskgit_imagenet128_checkpoint"
    return flax.serialization.from_bytes(None, path.read_bytes())


@pytest.fixture(scope="module")
def tiny():
    model = Transformer(vocab_size=20, hidden_size=16, num_layers=2, num_heads=2, mlp_dim=32, max_len=10,
                        dropout_rate=0.1, attention_dropout_rate=0.1)
    variables = meta.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 10), jnp.int32)))
    return model, variables


def test_param_tree_matches_official_checkpoint(official_params):
    model = Transformer(**SMALL)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 65), jnp.int32))
    mine = jax.tree_util.tree_map(lambda x: x.shape, meta.unbox(shapes))
    theirs = jax.tree_util.tree_map(lambda x: x.shape, official_params)
    assert mine == theirs


def test_reproduces_official_logits(official_small, official_params):
    model = Transformer(**SMALL)
    logits = model.apply(official_params, official_small["tf_input_ids"])
    assert logits.shape == (4, 65, 75)
    assert _rel(logits, official_small["tf_logits"]) < 1e-5


def test_reproduces_official_intermediates(official_small, official_params):
    model = Transformer(**SMALL)
    ids = official_small["tf_input_ids"][2:3]
    _, state = model.apply(official_params, ids, capture_intermediates=True)
    inter = flax.traverse_util.flatten_dict(state["intermediates"], sep="/")
    names = [k[: -len("/__call__")] for k in inter if k.endswith("__call__")]
    checked = 0
    for key, ref in official_small.items():
        if not key.startswith("tf_inter/"):
            continue
        name = key[len("tf_inter/"):]
        out = inter[name + "/__call__"][0]
        out = out[0] if isinstance(out, tuple) else out  # layers also return their K/V
        assert _rel(out[0], ref) < 1e-5, name
        checked += 1
    assert checked == 10, names


def test_mask_minus_one_equals_mask_id(official_small, official_params):
    model = Transformer(**SMALL)
    ids = official_small["tf_input_ids"]
    assert (ids == -1).any()
    a = model.apply(official_params, ids)
    b = model.apply(official_params, np.where(ids == -1, model.mask_id, ids))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bidirectional_and_mask_sensitive(tiny):
    model, variables = tiny
    ids = jnp.array([[15, 1, 2, 3, 4, 5, 6, 7, 8, 9]])
    base = model.apply(variables, ids)
    j = 5
    changed = model.apply(variables, ids.at[0, j].set(model.mask_id))
    diff = np.abs(np.asarray(changed - base)).max(-1)[0]
    assert diff[j - 1] > 1e-6 and diff[j + 1] > 1e-6 and diff[0] > 1e-6


def test_dropout_off_is_deterministic_and_on_is_random(tiny):
    model, variables = tiny
    ids = jnp.arange(10)[None] % 15
    a = model.apply(variables, ids, deterministic=True)
    b = model.apply(variables, ids, deterministic=True)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    c = model.apply(variables, ids, deterministic=False, rngs={"dropout": jax.random.PRNGKey(1)})
    d = model.apply(variables, ids, deterministic=False, rngs={"dropout": jax.random.PRNGKey(2)})
    assert np.abs(np.asarray(c - d)).max() > 1e-4


def test_num_logits_slices_the_vocabulary(tiny):
    model, variables = tiny
    ids = jnp.arange(10)[None] % 15
    full = model.apply(variables, ids)
    part = model.apply(variables, ids, num_logits=8)
    assert part.shape == (1, 10, 8)
    np.testing.assert_allclose(np.asarray(part), np.asarray(full[..., :8]), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("res,count", [(256, 172_457_193), (512, 173_047_017)])
def test_imagenet_parameter_count(res, count):
    import importlib.util

    from maskgen.models.sizes import seq_len, token_layout
    spec = importlib.util.spec_from_file_location("cfg", f"configs/imagenet{res}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cfg = mod.get_config()
    model = transformer_from_block(cfg.transformer, token_layout(cfg), seq_len(cfg))
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, seq_len(cfg)), jnp.int32))
    assert sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(meta.unbox(shapes))) == count


def test_every_parameter_has_logical_axes(tiny):
    model, _ = tiny
    boxed = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 10), jnp.int32))
    leaves = jax.tree_util.tree_leaves(boxed, is_leaf=lambda x: isinstance(x, meta.Partitioned))
    known = {v for k, v in vars(axes).items() if k.isupper()}
    assert leaves and all(isinstance(x, meta.Partitioned) for x in leaves)
    for x in leaves:
        assert len(x.names) == len(x.value.shape) and set(x.names) <= known


def test_bfloat16_activations_keep_float32_params():
    model = Transformer(vocab_size=20, hidden_size=16, num_layers=1, num_heads=2, mlp_dim=32, max_len=10,
                        dtype=jnp.bfloat16)
    variables = meta.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 10), jnp.int32)))
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(variables))
    logits = model.apply(variables, jnp.zeros((2, 10), jnp.int32))
    assert logits.dtype == jnp.float32 and np.isfinite(np.asarray(logits)).all()


def test_attention_matches_plain_reference():
    rng = np.random.default_rng(0)
    q, k, v = (rng.normal(size=(2, 5, 3, 4)).astype(np.float32) for _ in range(3))
    out = attend(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.float32)
    s = np.einsum("bqhd,bkhd->bhqk", q, k) / 2.0
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    np.testing.assert_allclose(np.asarray(out), np.einsum("bhqk,bkhd->bqhd", p, v), rtol=1e-5, atol=1e-6)


def test_scatter_cache_attention_equals_gather_concat_reference():
    """Queries of N rows over (cache with their rows overwritten) == over concat(others, fresh)."""
    rng = np.random.default_rng(1)
    B, L, N, H, K = 2, 9, 3, 2, 4
    cache_k, cache_v = rng.normal(size=(2, B, L, H, K)).astype(np.float32)
    fresh_q, fresh_k, fresh_v = rng.normal(size=(3, B, N, H, K)).astype(np.float32)
    pos = np.stack([rng.choice(L, N, replace=False) for _ in range(B)])
    k_full = scatter_rows(jnp.asarray(cache_k), jnp.asarray(fresh_k), jnp.asarray(pos))
    v_full = scatter_rows(jnp.asarray(cache_v), jnp.asarray(fresh_v), jnp.asarray(pos))
    out = np.asarray(attend(jnp.asarray(fresh_q), k_full, v_full, jnp.float32))
    for b in range(B):
        others = np.setdiff1d(np.arange(L), pos[b])
        kk = np.concatenate([cache_k[b, others], fresh_k[b]])
        vv = np.concatenate([cache_v[b, others], fresh_v[b]])
        ref = attend(jnp.asarray(fresh_q[b:b + 1]), jnp.asarray(kk[None]), jnp.asarray(vv[None]), jnp.float32)
        np.testing.assert_allclose(out[b], np.asarray(ref)[0], rtol=1e-5, atol=1e-6)


def test_subset_forward_with_unchanged_rows_reproduces_full_logits(official_small, official_params):
    model = Transformer(**SMALL)
    ids = jnp.asarray(official_small["tf_input_ids"])
    logits, kv = model.apply(official_params, ids, method="forward_with_kv")
    assert isinstance(kv, KVCache) and kv.k.shape == (2, 4, 65, 2, 32)
    np.testing.assert_array_equal(np.asarray(logits), np.asarray(model.apply(official_params, ids)))
    pos = jnp.asarray(np.stack([np.r_[0, np.sort(np.random.default_rng(b).choice(64, 7, replace=False)) + 1]
                                for b in range(4)]))
    sub = model.apply(official_params, jnp.take_along_axis(ids, pos, 1), pos, kv, method="forward_subset")
    want = np.take_along_axis(np.asarray(logits), np.asarray(pos)[..., None], 1)
    np.testing.assert_allclose(np.asarray(sub), want, rtol=1e-5, atol=1e-5)


def test_subset_forward_sees_changed_rows(official_small, official_params):
    """A changed group token moves the other group rows' logits (they attend to fresh K/V)."""
    model = Transformer(**SMALL)
    ids = jnp.asarray(official_small["tf_input_ids"][2:3])
    _, kv = model.apply(official_params, ids, method="forward_with_kv")
    pos = jnp.array([[0, 5, 9]])
    sub_ids = jnp.take_along_axis(ids, pos, 1)
    a = model.apply(official_params, sub_ids, pos, kv, method="forward_subset")
    b = model.apply(official_params, sub_ids.at[0, 2].set(3), pos, kv, method="forward_subset")
    assert np.abs(np.asarray(a - b))[0, 1].max() > 1e-5


@pytest.mark.parametrize("ids,match", [
    (np.zeros((2,), np.int32), "batch, length"),
    (np.zeros((1, 4), np.float32), "integers"),
    (np.zeros((1, 11), np.int32), "exceeds"),
    (np.array([[0, 20]]), "out of range"),
    (np.array([[0, -2]]), "out of range"),
])
def test_bad_input_ids_raise(ids, match):
    with pytest.raises(ValueError, match=match):
        check_input_ids(ids, vocab_size=20, max_len=10)
