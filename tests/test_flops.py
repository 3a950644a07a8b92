"""Analytic FLOP counts agree with XLA's own count of the transformer's matmuls."""
import jax
import jax.numpy as jnp
from flax.core import meta

from maskgen.flops import transformer_flops
from maskgen.models.transformer import Transformer


def test_full_and_subset_flops_match_xla_cost_analysis():
    model = Transformer(vocab_size=40, hidden_size=128, num_layers=2, num_heads=1, mlp_dim=512, max_len=65,
                        dropout_rate=0.0, attention_dropout_rate=0.0)
    v = meta.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 65), jnp.int32)))
    ids = jnp.zeros((1, 65), jnp.int32)
    cost = jax.jit(lambda v, x: model.apply(v, x, num_logits=30)).lower(v, ids).compile().cost_analysis()
    want = transformer_flops(2, 128, 512, 65, 30)
    # One head: the per-head attention scan has a single iteration, which XLA counts once.
    # XLA also counts element-wise ops; the matmuls dominate and must be within 10%.
    assert 0.9 * cost["flops"] <= want <= 1.0 * cost["flops"] + 1
    assert transformer_flops(2, 128, 512, 65, 30, rows=3) < want / 4
