"""Activation sharding constraints: present in the sharded train step, absent without a mesh, exact."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from maskgen import config_io
from maskgen import sharding as shd
from maskgen.models.factory import transformer_from_block
from maskgen.models.sizes import seq_len, token_layout
from maskgen.training import optimizer, train_state
from maskgen.training import transformer_step as tst

pytestmark = pytest.mark.usefixtures("fast_compile")  # tiny models: skip XLA optimisation passes

# Shardy prints `sdy.sharding_constraint`; the GSPMD lowering a `@Sharding` custom call.
_CONSTRAINT = re.compile(r"sdy\.sharding_constraint|custom_call @Sharding\b")


def _mesh(data, fsdp, tensor):
    return shd.make_mesh(dict(data=data, fsdp=fsdp, tensor=tensor), jax.devices()[:data * fsdp * tensor])


@pytest.fixture(scope="module")
def cfg():
    c = config_io.load_config_file("configs/debug.py")
    # 4 heads and a 64-wide MLP split 4 ways by tensor; two layers so per-layer marks are counted.
    c.transformer.update(dict(num_layers=2, hidden_size=32, num_heads=4, mlp_dim=64))
    return c


def _setup(cfg):
    layout, length = token_layout(cfg), seq_len(cfg)
    model = transformer_from_block(cfg.transformer, layout, length)
    tx, lr = optimizer.adamw(cfg.transformer_train, 10)
    step_fn = tst.make_train_step(model, layout, tx, lr, cfg.transformer_train, cfg.transformer_train.ema_decay)
    return model, layout, length, step_fn, tst.make_init(model, tx, length)


def _batch(cfg, n=8):
    layout, rng = token_layout(cfg), np.random.default_rng(0)
    return dict(tokens=rng.integers(0, layout.codebook_size, (n, seq_len(cfg) - 1)).astype(np.int32),
                label=rng.integers(0, cfg.num_classes, (n,)).astype(np.int32))


def _lowered_text(cfg, mesh, jit):
    _, _, _, step_fn, init = _setup(cfg)
    abstract, shardings = train_state.abstract_and_shardings(init, mesh)
    state = train_state.sharded_abstract(abstract, shardings)
    batch_sh = shd.batch_shardings(mesh, _batch(cfg))
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sh[k]) for k, v in _batch(cfg).items()}
    key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=shd.replicated(mesh))
    step = jit(step_fn, (shardings, batch_sh, shd.replicated(mesh)), (shardings, shd.replicated(mesh)))
    return step.lower(state, batch, key).as_text()


def test_sharded_train_step_carries_activation_constraints(cfg):
    mesh = _mesh(1, 2, 4)
    plain = _lowered_text(cfg, mesh, lambda f, i, o: jax.jit(f, in_shardings=i, out_shardings=o))
    live = _lowered_text(cfg, mesh, shd.jit_sharded)
    assert len(_CONSTRAINT.findall(plain)) == 0  # what every step had before the marks were bound
    # Forward marks: embeddings + per layer (MLP hidden, layer output); autodiff transposes each
    # constraint into the backward pass as well.
    layers = cfg.transformer.num_layers
    assert len(_CONSTRAINT.findall(live)) >= 2 * (1 + 2 * layers)
    # The residual stream is split over the batch axes only; the MLP hidden also over tensor.
    assert re.search(r'sharding_constraint.*\[\{"fsdp"\}, \{\}, \{\}\]', live)
    assert re.search(r'sharding_constraint.*\[\{"fsdp"\}, \{\}, \{"tensor"\}\]', live)


def test_activation_specs_follow_the_activation_rules():
    with shd.activation_sharding(_mesh(2, 2, 2)):
        assert shd.activation_spec(("batch", "length", "embed"), (8, 5, 32)) == P(("data", "fsdp"), None, None)
        assert shd.activation_spec(("batch", "length", "mlp"), (8, 5, 64)) == P(("data", "fsdp"), None, "tensor")
        # A batch the four batch devices cannot divide falls back to one axis, then to none.
        assert shd.activation_spec(("batch", "length", "embed"), (2, 5, 32)) == P("data", None, None)
        assert shd.activation_spec(("batch", "length", "embed"), (1, 5, 32)) == P(None, None, None)
    assert shd.activation_spec(("batch", "length", "embed"), (8, 5, 32)) is None


def test_constrain_is_the_identity_without_a_mesh(cfg):
    model, _, length, _, _ = _setup(cfg)
    ids = jnp.zeros((2, length), jnp.int32)
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), ids))

    def forward(p, x):
        return model.apply(p, x)
    assert not _CONSTRAINT.search(jax.jit(forward).lower(params, ids).as_text())
    with shd.activation_sharding(_mesh(1, 1, 1)):  # a one-device mesh adds nothing either
        assert not _CONSTRAINT.search(jax.jit(forward).lower(params, ids).as_text())


def _run(cfg, mesh, steps=2):
    _, _, _, step_fn, init = _setup(cfg)
    state, shardings, _ = train_state.init_sharded(init, jax.random.key(0), mesh)
    batch = _batch(cfg)
    step = shd.jit_sharded(step_fn, (shardings, shd.batch_shardings(mesh, batch), shd.replicated(mesh)),
                           (shardings, shd.replicated(mesh)), donate_argnums=(0,))
    key = jax.device_put(jax.random.key(1), shd.replicated(mesh))
    losses = []
    for _ in range(steps):
        state, metrics = step(state, shd.global_batch(batch, mesh), key)
        losses.append(float(metrics["loss"]))
    return jax.device_get(state), losses


def test_tensor_parallel_mesh_matches_one_device(cfg):
    ref_state, ref_losses = _run(cfg, _mesh(1, 1, 1))
    state, losses = _run(cfg, _mesh(1, 2, 4))
    assert ref_losses[1] != ref_losses[0]  # the first update changed the parameters
    np.testing.assert_allclose(losses, ref_losses, rtol=2e-5)
    for name in ("params", "opt_state"):
        for a, b in zip(jax.tree.leaves(getattr(state, name)), jax.tree.leaves(getattr(ref_state, name))):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-6)
