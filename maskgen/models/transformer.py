"""The MaskGIT bidirectional transformer over VQ tokens (BERT-style, post-LN).

The parameter tree follows google-research/maskgit exactly (`Embed_0`,
`TransformerLayer_{i}/Attention_0/self_attention/{query,key,value,out}`,
`Mlp_0`, `MlmLayer_0`), so an official checkpoint's `params` can be passed to
`apply` unchanged. Every parameter carries logical axis names from
`maskgen.axes`, and so do the residual stream and the MLP hidden activations
(`axes.constrain`: sharding constraints inside `maskgen.sharding.jit_sharded`, the
identity elsewhere); meshes are the trainer's business.

Three entry points share the parameters:
  * `__call__(ids)`                         -> logits
  * `forward_with_kv(ids)`                  -> (logits, KVCache of every layer)
  * `forward_subset(ids_sub, pos_sub, kv)`  -> logits of the given rows only
The last two serve ReCAP: a cheap step recomputes a few rows and lets them
attend to keys/values cached by the previous full evaluation.

Shape legend: B batch, L sequence (class token + h*w), N rows of a subset,
D width, H heads, K head dim, F MLP width, V vocabulary, Y layers.

`attention` picks the attention kernel per backend (maskgen.models.attention);
`remat` wraps each layer in `nn.remat` under a checkpoint policy
(maskgen.models.remat). Neither changes the parameter tree.
"""
from typing import Any, Callable, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from maskgen import axes
from maskgen.models.attention import attend, check_attention_name
from maskgen.models.dropout import Dropout, keep_mask, keep_probability
from maskgen.models.remat import check_remat_name, remat_policy
from maskgen.tokens import OFFICIAL_MASK_ID

Dtype = Any
LN_EPS = 1e-12  # BERT's LayerNorm epsilon, as the official model uses
_init = nn.initializers.truncated_normal(0.02)


def _param(init: Callable, names: Any) -> Callable:
    return nn.with_logical_partitioning(init, names)


def _layer_norm(name: str, dtype: jax.typing.DTypeLike, param_dtype: jax.typing.DTypeLike) -> nn.LayerNorm:
    return nn.LayerNorm(
        epsilon=LN_EPS, dtype=dtype, param_dtype=param_dtype, name=name,
        scale_init=_param(nn.initializers.ones, (axes.NORM,)),
        bias_init=_param(nn.initializers.zeros, (axes.NORM,)))


def _gelu(x: jax.Array) -> jax.Array:
    return jax.nn.gelu(x, approximate=True)  # tanh form, as the official model


@flax.struct.dataclass
class KVCache:
    """Per-layer attention keys and values of a full evaluation."""
    k: jax.Array  # [Y, B, L, H, K]
    v: jax.Array  # [Y, B, L, H, K]


class Embed(nn.Module):
    """Word + learned absolute position embeddings, then LayerNorm and dropout."""
    vocab_size: int
    hidden_size: int
    max_len: int
    dropout_rate: float
    dtype: Dtype
    param_dtype: Dtype

    def setup(self) -> None:
        self.word_embeddings = nn.Embed(
            self.vocab_size, self.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
            embedding_init=_param(_init, (axes.VOCAB, axes.EMBED)))
        self.position_embeddings = nn.Embed(
            self.max_len, self.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
            embedding_init=_param(_init, (axes.POSITIONS, axes.EMBED)))
        self.embeddings_ln = _layer_norm("embeddings_ln", self.dtype, self.param_dtype)
        self.dropout = Dropout(self.dropout_rate)

    def __call__(self, ids_BxL: jax.Array, positions_BxL: jax.Array, deterministic: bool) -> jax.Array:
        x = self.word_embeddings(ids_BxL) + self.position_embeddings(positions_BxL)
        return self.dropout(self.embeddings_ln(x), deterministic=deterministic)

    def word_table(self) -> jax.Array:
        return self.word_embeddings.embedding


def scatter_rows(cache_BxLxHxK: jax.Array, rows_BxNxHxK: jax.Array, positions_BxN: jax.Array) -> jax.Array:
    """Writes each example's fresh rows over its cached rows at `positions` (static shapes)."""
    return jax.vmap(lambda c, r, p: c.at[p].set(r.astype(c.dtype)))(cache_BxLxHxK, rows_BxNxHxK, positions_BxN)


class SelfAttention(nn.Module):
    """Multi-head self-attention with the official q/k/v/out parameter names and shapes."""
    hidden_size: int
    num_heads: int
    dropout_rate: float
    dtype: Dtype
    param_dtype: Dtype
    attention: str = "auto"

    def setup(self) -> None:
        self.head_dim = self.hidden_size // self.num_heads

        def proj(name: str) -> nn.DenseGeneral:
            return nn.DenseGeneral(
                (self.num_heads, self.head_dim), dtype=self.dtype, param_dtype=self.param_dtype, name=name,
                kernel_init=_param(_init, (axes.EMBED, axes.HEADS, axes.HEAD_DIM)),
                bias_init=_param(nn.initializers.zeros, (axes.HEADS, axes.HEAD_DIM)))
        self.query, self.key, self.value = proj("query"), proj("key"), proj("value")
        self.out = nn.DenseGeneral(
            self.hidden_size, axis=(-2, -1), dtype=self.dtype,
            param_dtype=self.param_dtype, name="out",
            kernel_init=_param(_init, (axes.HEADS, axes.HEAD_DIM, axes.EMBED)),
            bias_init=_param(nn.initializers.zeros, (axes.EMBED,)))

    def __call__(self, x_BxLxD: jax.Array, deterministic: bool, kv: tuple[jax.Array, jax.Array] | None = None,
                 positions_BxN: jax.Array | None = None) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """Full attention, or (given `kv` and `positions`) rows x attending over the cache.

        Returns (output, (k, v)) where (k, v) are the full-length keys/values used.
        """
        # Named for the save_qkv_out remat policy (identity otherwise).
        q = checkpoint_name(self.query(x_BxLxD), "attention_query")
        k = checkpoint_name(self.key(x_BxLxD), "attention_key")
        v = checkpoint_name(self.value(x_BxLxD), "attention_value")
        if kv is not None:
            k = scatter_rows(kv[0], k, positions_BxN)
            v = scatter_rows(kv[1], v, positions_BxN)
        keep = None
        if not deterministic and self.dropout_rate > 0:
            batch, queries, heads, _ = q.shape
            keep = keep_mask(self.make_rng("dropout"), (heads, batch, queries, k.shape[1]), self.dropout_rate)
        y = attend(q, k, v, self.dtype, keep, keep_probability(self.dropout_rate), self.attention)
        return checkpoint_name(self.out(y), "attention_out"), (k, v)


class Attention(nn.Module):
    """Self-attention sub-block: attention, dropout, residual, post-LayerNorm."""
    hidden_size: int
    num_heads: int
    dropout_rate: float
    attention_dropout_rate: float
    dtype: Dtype
    param_dtype: Dtype
    attention: str = "auto"

    def setup(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        self.self_attention = SelfAttention(
            self.hidden_size, self.num_heads, self.attention_dropout_rate,
            self.dtype, self.param_dtype, self.attention)
        self.dropout = Dropout(self.dropout_rate)
        self.attention_output_ln = _layer_norm("attention_output_ln", self.dtype, self.param_dtype)

    def __call__(self, x: jax.Array, deterministic: bool, kv: tuple[jax.Array, jax.Array] | None = None,
                 positions: jax.Array | None = None) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        a, new_kv = self.self_attention(x, deterministic, kv, positions)
        a = self.dropout(a, deterministic=deterministic)
        return self.attention_output_ln(a + x), new_kv


class Mlp(nn.Module):
    """GELU MLP sub-block with residual and post-LayerNorm."""
    hidden_size: int
    mlp_dim: int
    dropout_rate: float
    dtype: Dtype
    param_dtype: Dtype

    def setup(self) -> None:
        self.intermediate_output = nn.Dense(
            self.mlp_dim, dtype=self.dtype, param_dtype=self.param_dtype,
            kernel_init=_param(_init, (axes.EMBED, axes.MLP)),
            bias_init=_param(nn.initializers.zeros, (axes.MLP,)))
        self.layer_output = nn.Dense(
            self.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
            kernel_init=_param(_init, (axes.MLP, axes.EMBED)),
            bias_init=_param(nn.initializers.zeros, (axes.EMBED,)))
        self.dropout = Dropout(self.dropout_rate)
        self.layer_output_ln = _layer_norm("layer_output_ln", self.dtype, self.param_dtype)

    def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
        h = axes.constrain(_gelu(self.intermediate_output(x)), (axes.BATCH, axes.LENGTH, axes.MLP))
        h = self.layer_output(h)
        h = self.dropout(h, deterministic=deterministic)
        return self.layer_output_ln(h + x)


class TransformerLayer(nn.Module):
    hidden_size: int
    num_heads: int
    mlp_dim: int
    dropout_rate: float
    attention_dropout_rate: float
    dtype: Dtype
    param_dtype: Dtype
    attention: str = "auto"

    def setup(self) -> None:
        self.Attention_0 = Attention(
            self.hidden_size, self.num_heads, self.dropout_rate, self.attention_dropout_rate,
            self.dtype, self.param_dtype, self.attention)
        self.Mlp_0 = Mlp(self.hidden_size, self.mlp_dim, self.dropout_rate, self.dtype, self.param_dtype)

    def __call__(self, x: jax.Array, deterministic: bool, kv: tuple[jax.Array, jax.Array] | None = None,
                 positions: jax.Array | None = None) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        x, new_kv = self.Attention_0(x, deterministic, kv, positions)
        x = self.Mlp_0(x, deterministic)
        return axes.constrain(x, (axes.BATCH, axes.LENGTH, axes.EMBED)), new_kv


class Bias(nn.Module):
    """A bare learned bias (the official `mlm_bias`)."""
    size: int
    param_dtype: Dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b = self.param("bias", _param(nn.initializers.zeros, (axes.VOCAB,)), (self.size,), self.param_dtype)
        return x + b[: x.shape[-1]].astype(x.dtype)


class MlmLayer(nn.Module):
    """MLM head: dense + GELU + LayerNorm, logits through the tied word embeddings + bias."""
    hidden_size: int
    vocab_size: int
    dtype: Dtype
    param_dtype: Dtype

    def setup(self) -> None:
        self.mlm_dense = nn.Dense(
            self.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
            kernel_init=_param(_init, (axes.EMBED, axes.MLP)),  # square; MLP names its output side
            bias_init=_param(nn.initializers.zeros, (axes.MLP,)))
        self.mlm_ln = _layer_norm("mlm_ln", self.dtype, self.param_dtype)
        self.mlm_bias = Bias(self.vocab_size, self.param_dtype)

    def __call__(self, x: jax.Array, word_table_VxD: jax.Array, num_logits: Optional[int]) -> jax.Array:
        h = self.mlm_ln(_gelu(self.mlm_dense(x)))
        table = word_table_VxD if num_logits is None else word_table_VxD[:num_logits]
        logits = jnp.einsum("bnd,vd->bnv", h, table.astype(self.dtype))
        return self.mlm_bias(logits.astype(jnp.float32))


class Transformer(nn.Module):
    """Bidirectional MaskGIT transformer; ids [B, L] -> logits [B, L, V]."""
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    mlp_dim: int
    max_len: int
    dropout_rate: float = 0.1
    attention_dropout_rate: float = 0.1
    dtype: Dtype = jnp.float32  # activations / matmuls
    param_dtype: Dtype = jnp.float32
    attention: str = "auto"  # maskgen.models.attention.IMPLEMENTATIONS
    remat: str = "none"  # maskgen.models.remat.REMAT_OPTIONS

    def setup(self) -> None:
        check_attention_name(self.attention)
        check_remat_name(self.remat)
        layer_cls = TransformerLayer
        if self.remat != "none":
            # static_argnums counts self: `deterministic` (a Python bool) is argument 2.
            layer_cls = nn.remat(TransformerLayer, policy=remat_policy(self.remat), static_argnums=(2,))
        self.Embed_0 = Embed(self.vocab_size, self.hidden_size, self.max_len, self.dropout_rate,
                             self.dtype, self.param_dtype)
        self.layers = [
            layer_cls(self.hidden_size, self.num_heads, self.mlp_dim, self.dropout_rate,
                      self.attention_dropout_rate, self.dtype, self.param_dtype, self.attention,
                      name=f"TransformerLayer_{i}")
            for i in range(self.num_layers)]
        self.MlmLayer_0 = MlmLayer(self.hidden_size, self.vocab_size, self.dtype, self.param_dtype)

    @property
    def mask_id(self) -> int:
        return self.vocab_size - 1

    def _canonical(self, ids: jax.Array) -> jax.Array:
        ids = jnp.asarray(ids, jnp.int32)
        return jnp.where(ids == OFFICIAL_MASK_ID, self.mask_id, ids)

    def _run(self, ids: jax.Array, positions: jax.Array, deterministic: bool, num_logits: int,
             kv: Optional[KVCache] = None) -> tuple[jax.Array, KVCache]:
        x = self.Embed_0(self._canonical(ids), positions, deterministic)
        x = axes.constrain(x, (axes.BATCH, axes.LENGTH, axes.EMBED))
        ks, vs = [], []
        for i, layer in enumerate(self.layers):
            layer_kv = None if kv is None else (kv.k[i], kv.v[i])
            x, (k, v) = layer(x, deterministic, layer_kv, positions if kv is not None else None)
            ks.append(k)
            vs.append(v)
        logits = self.MlmLayer_0(x, self.Embed_0.word_table(), num_logits)
        return logits, KVCache(jnp.stack(ks), jnp.stack(vs))

    def __call__(self, ids_BxL: jax.Array, deterministic: bool = True,
                 num_logits: Optional[int] = None) -> jax.Array:
        """Logits [B, L, V] (or only the first `num_logits` ids, e.g. the codebook)."""
        positions = jnp.broadcast_to(jnp.arange(ids_BxL.shape[1]), ids_BxL.shape)
        return self._run(ids_BxL, positions, deterministic, num_logits)[0]

    def forward_with_kv(self, ids_BxL: jax.Array, deterministic: bool = True,
                        num_logits: Optional[int] = None) -> tuple[jax.Array, KVCache]:
        """Full evaluation that also returns every layer's keys and values (for ReCAP)."""
        positions = jnp.broadcast_to(jnp.arange(ids_BxL.shape[1]), ids_BxL.shape)
        return self._run(ids_BxL, positions, deterministic, num_logits)

    def forward_subset(self, ids_BxN: jax.Array, positions_BxN: jax.Array, kv: KVCache, deterministic: bool = True,
                       num_logits: Optional[int] = None) -> jax.Array:
        """Cheap evaluation: recompute only the given rows, attending over the cached K/V.

        In every layer the rows' fresh keys/values overwrite the cache at their
        positions, so the rows see each other's current state and every other
        position as frozen at the cache's full evaluation.
        """
        return self._run(ids_BxN, positions_BxN, deterministic, num_logits, kv)[0]


def check_input_ids(ids: jax.Array, vocab_size: int, max_len: int) -> jax.Array:
    """Host-side validation of transformer input ids (jitted code cannot raise)."""
    ids = np.asarray(ids)
    if ids.ndim != 2:
        raise ValueError(f"input ids must be [batch, length], got shape {ids.shape}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"input ids must be integers, got dtype {ids.dtype}")
    if ids.shape[1] > max_len:
        raise ValueError(f"sequence length {ids.shape[1]} exceeds the model's {max_len} positions")
    bad = ids[(ids < OFFICIAL_MASK_ID) | (ids >= vocab_size)]
    if bad.size:
        raise ValueError(f"token id {int(bad.flat[0])} out of range [0, {vocab_size}) (-1 = mask)")
    return ids
