"""Mesh construction, the logical-axis rule table, and mesh-independence of the train step."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maskgen import config_io
from maskgen import sharding as shd
from maskgen.models.factory import transformer_from_block
from maskgen.models.sizes import seq_len, token_layout
from maskgen.training import optimizer, train_state
from maskgen.training import transformer_step as tst

pytestmark = pytest.mark.usefixtures("fast_compile")  # tiny models: skip XLA optimisation passes


def _mesh(data, fsdp, tensor):
    n = data * fsdp * tensor
    return shd.make_mesh(dict(data=data, fsdp=fsdp, tensor=tensor), jax.devices()[:n])


def test_mesh_shape_fills_and_validates():
    assert shd.mesh_shape(dict(data=-1, fsdp=2, tensor=1), 8) == (4, 2, 1)
    assert shd.mesh_shape(dict(data=2, fsdp=-1, tensor=2), 8) == (2, 2, 2)
    with pytest.raises(ValueError, match="at most one axis"):
        shd.mesh_shape(dict(data=-1, fsdp=-1, tensor=1), 8)
    with pytest.raises(ValueError, match="needs 4 devices"):
        shd.mesh_shape(dict(data=2, fsdp=2, tensor=1), 8)
    with pytest.raises(ValueError, match="not divisible"):
        shd.mesh_shape(dict(data=-1, fsdp=3, tensor=1), 8)


def test_resolve_spec_rules():
    mesh = _mesh(2, 2, 2)
    P = jax.sharding.PartitionSpec
    # MLP kernel: the larger (mlp) dim takes tensor, embed takes fsdp.
    assert shd.resolve_spec(("embed", "mlp"), (32, 64), mesh) == P("fsdp", "tensor")
    assert shd.resolve_spec(("mlp", "embed"), (64, 32), mesh) == P("tensor", "fsdp")
    # Attention: heads on tensor, embed on fsdp, head_dim whole.
    assert shd.resolve_spec(("embed", "heads", "kv"), (32, 2, 16), mesh) == P("fsdp", "tensor", None)
    # A vocabulary that fsdp cannot divide stays whole; the width is sharded instead.
    assert shd.resolve_spec(("vocab", "embed"), (2025, 32), mesh) == P(None, "fsdp")
    assert shd.resolve_spec(("vocab", "embed"), (2048, 32), mesh) == P("fsdp", None)
    assert shd.resolve_spec(("norm",), (32,), mesh) == P(None)
    # Size-1 mesh axes are dropped: on 8x1x1 parameters are replicated.
    assert shd.resolve_spec(("embed", "mlp"), (32, 64), _mesh(8, 1, 1)) == P(None, None)
    # Config overrides: put embed on tensor instead.
    rules = shd.rules_from_config({"embed": ["tensor"], "mlp": ["fsdp"]})
    assert shd.resolve_spec(("embed", "mlp"), (32, 64), mesh, rules) == P("tensor", "fsdp")
    with pytest.raises(ValueError, match="unknown mesh axis 'model'"):
        shd.rules_from_config({"embed": ["model"]})
    with pytest.raises(ValueError, match="no sharding rule"):
        shd.resolve_spec(("bogus",), (4,), mesh)


def _setup(cfg, num_steps=10):
    layout = token_layout(cfg)
    length = seq_len(cfg)
    model = transformer_from_block(cfg.transformer, layout, length)
    tx, lr = optimizer.adamw(cfg.transformer_train, num_steps)
    step_fn = tst.make_train_step(model, layout, tx, lr, cfg.transformer_train,
                                  cfg.transformer_train.ema_decay)
    return layout, length, step_fn, tst.make_init(model, tx, length)


def _run_steps(mesh, cfg, batch, steps=2):
    _, _, step_fn, init = _setup(cfg)
    state, shardings, _ = train_state.init_sharded(init, jax.random.key(0), mesh)
    batch_sh = shd.batch_shardings(mesh, batch)
    step = shd.jit_sharded(step_fn, (shardings, batch_sh, shd.replicated(mesh)),
                           (shardings, shd.replicated(mesh)), donate_argnums=(0,))
    key = jax.device_put(jax.random.key(1), shd.replicated(mesh))
    losses = []
    for _ in range(steps):
        state, metrics = step(state, shd.global_batch(batch, mesh), key)
        losses.append(float(metrics["loss"]))
    return state, losses


@pytest.fixture(scope="module")
def debug_cfg():
    cfg = config_io.load_config_file("configs/debug.py")
    # One layer keeps compilation (which dominates these tests) short; 4 heads split by tensor=2.
    cfg.transformer.update(dict(num_layers=1, hidden_size=32, num_heads=4, mlp_dim=64))
    return cfg


@pytest.fixture(scope="module")
def token_batch(debug_cfg):
    layout = token_layout(debug_cfg)
    rng = np.random.default_rng(0)
    n = seq_len(debug_cfg) - 1
    return dict(tokens=rng.integers(0, layout.codebook_size, (8, n)).astype(np.int32),
                label=rng.integers(0, debug_cfg.num_classes, (8,)).astype(np.int32))


@pytest.fixture(scope="module")
def single_device_run(debug_cfg, token_batch):
    state, losses = _run_steps(_mesh(1, 1, 1), debug_cfg, token_batch)
    return jax.device_get(state), losses


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 4, 1), (2, 2, 2)])
def test_train_step_is_mesh_independent(shape, debug_cfg, token_batch, single_device_run):
    ref_state, ref_losses = single_device_run
    state, losses = _run_steps(_mesh(*shape), debug_cfg, token_batch)
    np.testing.assert_allclose(losses, ref_losses, rtol=2e-5)
    assert ref_losses[1] != ref_losses[0]  # the step really changed the parameters
    for name in ("params", "ema_params", "opt_state"):
        got, want = jax.device_get(getattr(state, name)), getattr(ref_state, name)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-6)
    assert int(state.step) == 2


def test_train_step_is_mesh_independent_with_xla_attention(debug_cfg, token_batch):
    """transformer.attention=xla (one-shot softmax, attention dropout included) on a 2x2x2 mesh."""
    cfg = debug_cfg.copy_and_resolve_references()
    cfg.transformer.attention = "xla"
    assert cfg.transformer.attention_dropout_rate > 0
    ref_state, ref_losses = _run_steps(_mesh(1, 1, 1), cfg, token_batch)
    state, losses = _run_steps(_mesh(2, 2, 2), cfg, token_batch)
    np.testing.assert_allclose(losses, ref_losses, rtol=2e-5)
    assert ref_losses[1] != ref_losses[0]
    got, want = jax.device_get(state.params), jax.device_get(ref_state.params)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-6)


def test_params_are_sharded_as_the_rules_say(debug_cfg):
    mesh = _mesh(2, 2, 2)
    _, _, _, init = _setup(debug_cfg)
    state, _, _ = train_state.init_sharded(init, jax.random.key(0), mesh)
    P = jax.sharding.PartitionSpec
    layer = state.params["TransformerLayer_0"]
    mlp_in = layer["Mlp_0"]["intermediate_output"]["kernel"]  # (embed 32, mlp 64)
    query = layer["Attention_0"]["self_attention"]["query"]["kernel"]  # (embed, heads 4, kv 8)
    word = state.params["Embed_0"]["word_embeddings"]["embedding"]  # (vocab 38, embed 32)
    expect = [(mlp_in, P("fsdp", "tensor"), (16, 32)), (query, P("fsdp", "tensor", None), (16, 2, 8)),
              (word, P("fsdp", None), (19, 32))]
    for arr, spec, shard_shape in expect:
        assert arr.sharding.spec == spec
        assert all(s.data.shape == shard_shape for s in arr.addressable_shards)
    # Optimizer moments follow their parameters; the EMA copy too.
    mu = state.opt_state[1][0].mu["TransformerLayer_0"]["Mlp_0"]["intermediate_output"]["kernel"]
    assert mu.sharding.spec == P("fsdp", "tensor")
    ema = state.ema_params["TransformerLayer_0"]["Mlp_0"]["intermediate_output"]["kernel"]
    assert ema.sharding.spec == P("fsdp", "tensor")
    assert state.step.sharding.spec == P()


def test_global_batch_splits_rows_over_data_and_fsdp(token_batch):
    mesh = _mesh(2, 2, 2)
    arr = shd.global_batch(token_batch, mesh)["tokens"]
    assert arr.shape == token_batch["tokens"].shape
    assert arr.sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"), None)
    for shard in arr.addressable_shards:
        assert shard.data.shape == (2, token_batch["tokens"].shape[1])
        np.testing.assert_array_equal(np.asarray(shard.data), token_batch["tokens"][shard.index])
    np.testing.assert_array_equal(shd.local_rows(arr), token_batch["tokens"])


def test_imagenet256_step_compiles_ahead_of_time_on_8_devices():
    """Abstract state and batch only: sharding/shape errors surface without hardware."""
    cfg = config_io.load_config_file("configs/imagenet256.py")
    layout, length, step_fn, init = _setup(cfg, num_steps=cfg.num_train_steps)
    mesh = _mesh(2, 2, 2)
    abstract, shardings = train_state.abstract_and_shardings(init, mesh)
    state = train_state.sharded_abstract(abstract, shardings)
    b = cfg.batch_size
    batch = dict(tokens=jax.ShapeDtypeStruct((b, length - 1), jnp.int32,
                                             sharding=shd.batch_sharding(mesh, 2)),
                 label=jax.ShapeDtypeStruct((b,), jnp.int32, sharding=shd.batch_sharding(mesh, 1)))
    key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=shd.replicated(mesh))
    step = shd.jit_sharded(step_fn, (shardings, {k: v.sharding for k, v in batch.items()},
                                     shd.replicated(mesh)), (shardings, shd.replicated(mesh)),
                           donate_argnums=(0,))
    compiled = step.lower(state, batch, key).compile()
    mem = compiled.memory_analysis()
    num_params = sum(np.prod(x.shape) for x in jax.tree.leaves(abstract.params))
    assert num_params == 172_457_193  # the official ImageNet-256 transformer
    print(f"\nimagenet256 train step, mesh 2x2x2, global batch {b}: per device "
          f"arguments {mem.argument_size_in_bytes / 2**20:.0f} MiB, outputs "
          f"{mem.output_size_in_bytes / 2**20:.0f} MiB, temporaries "
          f"{mem.temp_size_in_bytes / 2**20:.0f} MiB (unoptimised CPU estimate)")
    # Parameters + EMA + two Adam moments, float32, split over fsdp x tensor (4 ways) at best.
    state_bytes = 4 * num_params * 4
    assert state_bytes / 8 < mem.argument_size_in_bytes < state_bytes / 2
    assert mem.alias_size_in_bytes > 0.9 * mem.argument_size_in_bytes  # donated state reused
