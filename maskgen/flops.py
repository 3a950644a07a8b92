"""Model FLOP counts and the machine's dense-matmul FLOP/s, for benchmarks.

Counts are analytic (2 FLOPs per multiply-add of every matmul/einsum), so a
utilisation figure = achieved model FLOP/s / measured matmul FLOP/s means the
same thing on every backend. Element-wise work (softmax, LayerNorm, GELU) is
not counted, as is usual for MFU.
"""
import time

import jax
import jax.numpy as jnp
from jax.typing import DTypeLike


def transformer_flops(num_layers: int, hidden: int, mlp: int, seq_len: int, num_logits: int,
                      rows: int | None = None) -> float:
    """FLOPs of one forward for one example.

    `rows` = number of recomputed rows (ReCAP cheap evaluation: rows attend over
    all `seq_len` keys); None = full evaluation of all `seq_len` rows.
    """
    n = seq_len if rows is None else rows
    per_layer = (2 * n * hidden * hidden * 4  # q, k, v, out projections
                 + 2 * 2 * n * seq_len * hidden  # scores and weighted values
                 + 2 * 2 * n * hidden * mlp)  # MLP
    head = 2 * n * hidden * hidden + 2 * n * hidden * num_logits
    return float(num_layers * per_layer + head)


def matmul_flops_per_s(n: int = 1024, dtype: DTypeLike = jnp.float32, repeats: int = 10) -> float:
    """Best-of-`repeats` FLOP/s of an n x n x n matmul on the default device."""
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), dtype)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), dtype)
    f = jax.jit(lambda x, y: x @ y)
    f(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2.0 * n ** 3 / best
