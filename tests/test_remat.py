"""transformer.remat: per-layer nn.remat keeps the parameter tree and the gradients; policies save what
they say."""
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.ad_checkpoint import saved_residuals

from maskgen.models.factory import transformer_from_block
from maskgen.models.remat import PROJECTION_NAMES, REMAT_OPTIONS, remat_policy
from maskgen.models.transformer import Transformer
from maskgen.tokens import TokenLayout

pytestmark = pytest.mark.usefixtures("fast_compile")  # tiny models: skip XLA optimisation passes


def _model(remat, attention="auto"):
    return Transformer(vocab_size=75, hidden_size=32, num_layers=2, num_heads=2, mlp_dim=64, max_len=17,
                       remat=remat, attention=attention)


@pytest.fixture(scope="module")
def setup():
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 75, (2, 17)), jnp.int32)
    params = flax.linen.unbox(_model("none").init(jax.random.key(0), ids)["params"])
    return params, ids


def _loss(model, ids):
    def loss(params):
        logits = model.apply({"params": params}, ids, deterministic=False, rngs={"dropout": jax.random.key(5)})
        return jnp.mean(jax.nn.log_softmax(logits)[..., 0])
    return loss


@pytest.mark.parametrize("remat", ["full", "dots_saveable", "save_qkv_out"])
@pytest.mark.parametrize("attention", ["scan", "xla"])
def test_gradients_equal_with_and_without_remat(remat, attention, setup):
    """Dropout on (the same masks must be redrawn in the recomputation), both attention kernels."""
    params, ids = setup
    want = jax.jit(jax.value_and_grad(_loss(_model("none", attention), ids)))(params)
    got = jax.jit(jax.value_and_grad(_loss(_model(remat, attention), ids)))(params)
    assert float(got[0]) == pytest.approx(float(want[0]), rel=1e-6)
    flat_want = flax.traverse_util.flatten_dict(want[1], sep="/")
    flat_got = flax.traverse_util.flatten_dict(got[1], sep="/")
    assert flat_got.keys() == flat_want.keys()
    for name, w in flat_want.items():
        np.testing.assert_allclose(np.asarray(flat_got[name]), np.asarray(w), rtol=1e-5, atol=1e-7, err_msg=name)


def test_remat_keeps_the_official_parameter_tree(setup):
    params, ids = setup
    remat_params = flax.linen.unbox(_model("full").init(jax.random.key(0), ids)["params"])
    assert jax.tree.structure(remat_params) == jax.tree.structure(params)
    assert "TransformerLayer_1" in remat_params
    np.testing.assert_array_equal(np.asarray(_model("full").apply({"params": params}, ids)),
                                  np.asarray(_model("none").apply({"params": params}, ids)))


def _saved(remat, setup):
    params, ids = setup
    # Residuals computed in the forward pass (parameters, saved under every policy, left out).
    return [src for _, src in saved_residuals(_loss(_model(remat, "xla"), ids), params)
            if not src.startswith("from the argument")]


def test_policies_change_what_is_saved(setup):
    """full saves fewer residuals than none; save_qkv_out saves exactly the named projections on top."""
    none, full, names = _saved("none", setup), _saved("full", setup), _saved("save_qkv_out", setup)
    assert len(full) < len(none)
    def tagged(srcs):
        return [s for s in srcs if any(f"named '{n}'" in s for n in PROJECTION_NAMES)]
    assert len(tagged(names)) == 2 * len(PROJECTION_NAMES)  # per layer: q, k, v, out
    assert not tagged(full)
    assert len(names) == len(full) + 2 * len(PROJECTION_NAMES) < len(none)


def test_factory_passes_remat_and_rejects_bad_names():
    layout = TokenLayout(codebook_size=64, num_classes=10, null_class_id=9)
    block = {"num_layers": 1, "hidden_size": 16, "num_heads": 2, "mlp_dim": 32, "dropout_rate": 0.0,
             "remat": "dots_saveable", "attention": "xla"}
    model = transformer_from_block(block, layout, 5)
    assert (model.remat, model.attention) == ("dots_saveable", "xla")
    with pytest.raises(ValueError, match=r"transformer.remat='dots' is not one of"):
        transformer_from_block({**block, "remat": "dots"}, layout, 5)
    with pytest.raises(ValueError, match=r"transformer.attention='flsh' is not one of"):
        transformer_from_block({**block, "attention": "flsh"}, layout, 5)
    assert {"none", "full", "dots_saveable", "save_qkv_out"} <= set(REMAT_OPTIONS)
    assert remat_policy("full") is None
