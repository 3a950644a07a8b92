"""Stand-in models for the scheduler tests (the scheduler never imports maskgen.models).

`ReferenceTransformer` is an independent plain-jnp implementation of the official
MaskGIT transformer forward (post-LN BERT, tanh GELU, LN eps 1e-12, tied MLM head),
with the three entry points the decoder uses: full forward, full forward that
also returns per-layer k/v, and a row-subset forward against a frozen k/v cache.
It runs the official_small checkpoint. `ContextFake` is a tiny deterministic model
whose logits depend on position and on the whole input, cheap enough for many
decoding runs.
"""
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np

LN_EPS = 1e-12


def load_official_params(reference_dir):
    path = reference_dir / "checkpoints" / "maskgit_imagenet128_checkpoint"
    return flax.serialization.from_bytes(None, path.read_bytes())["params"]


def _layer_norm(x, params):
    mean = jnp.mean(x, axis=-1, keepdims=True)
    variance = jnp.maximum(jnp.mean(jnp.square(x), axis=-1, keepdims=True) - jnp.square(mean), 0.)
    return (x - mean) * (jax.lax.rsqrt(variance + LN_EPS) * params["scale"]) + params["bias"]


def _project(x, params):
    return jnp.einsum("bld,dhk->blhk", x, params["kernel"]) + params["bias"]


class ReferenceTransformer:
    """Official MaskGIT transformer arithmetic over a raw checkpoint tree."""

    def __init__(self, params, num_logits=None):
        self.params = params
        self.num_logits = num_logits
        self.num_layers = sum(name.startswith("TransformerLayer_") for name in params)

    def _embed(self, ids, positions):
        embed = self.params["Embed_0"]
        x = (jnp.take(embed["word_embeddings"]["embedding"], ids, axis=0)
             + jnp.take(embed["position_embeddings"]["embedding"], positions, axis=0))
        return _layer_norm(x, embed["embeddings_ln"])

    def _layer(self, index, x, kv=None, positions=None):
        """One block; with kv, scatters this block's fresh k/v at positions into the cache."""
        layer = self.params[f"TransformerLayer_{index}"]
        attention = layer["Attention_0"]["self_attention"]
        query = _project(x, attention["query"])
        key = _project(x, attention["key"])
        value = _project(x, attention["value"])
        fresh = (key, value)
        if kv is not None:
            rows = jnp.arange(x.shape[0])[:, None]
            key = kv[0][index].at[rows, positions].set(key)
            value = kv[1][index].at[rows, positions].set(value)
        query = query / jnp.sqrt(query.shape[-1]).astype(query.dtype)
        weights = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", query, key), axis=-1)
        mixed = jnp.einsum("bhqk,bkhd->bqhd", weights, value)
        out = jnp.einsum("bqhd,hde->bqe", mixed, attention["out"]["kernel"])
        out = out + attention["out"]["bias"]
        x = _layer_norm(x + out, layer["Attention_0"]["attention_output_ln"])
        mlp = layer["Mlp_0"]
        hidden = jax.nn.gelu(x @ mlp["intermediate_output"]["kernel"]
                             + mlp["intermediate_output"]["bias"])
        out = hidden @ mlp["layer_output"]["kernel"] + mlp["layer_output"]["bias"]
        return _layer_norm(x + out, mlp["layer_output_ln"]), fresh

    def _head(self, x):
        mlm = self.params["MlmLayer_0"]
        hidden = jax.nn.gelu(x @ mlm["mlm_dense"]["kernel"] + mlm["mlm_dense"]["bias"])
        hidden = _layer_norm(hidden, mlm["mlm_ln"])
        words = self.params["Embed_0"]["word_embeddings"]["embedding"]
        bias = self.params["MlmLayer_0"]["mlm_bias"]["bias"]
        if self.num_logits is not None:
            words, bias = words[:self.num_logits], bias[:self.num_logits]
        return hidden @ words.T + bias

    def forward_with_kv(self, ids):
        ids = jnp.asarray(ids, jnp.int32)
        positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
        x = self._embed(ids, positions)
        keys, values = [], []
        for index in range(self.num_layers):
            x, (key, value) = self._layer(index, x)
            keys.append(key)
            values.append(value)
        return self._head(x), (jnp.stack(keys), jnp.stack(values))

    def __call__(self, ids):
        return self.forward_with_kv(ids)[0]

    def forward_subset(self, ids_sub, positions_sub, kv):
        x = self._embed(jnp.asarray(ids_sub, jnp.int32), positions_sub)
        for index in range(self.num_layers):
            x, _ = self._layer(index, x, kv, positions_sub)
        return self._head(x)


class ContextFake:
    """logits[b, i] = A[i] + mean_j E[ids[b, j]] @ M: depends on position and on every id.

    Also offers the full/cheap pair with a cache holding the per-row context
    vectors, so cheap calls over unchanged rows reproduce the full logits.
    """

    def __init__(self, length, vocab_size, num_logits, seed=0, scale=3.0):
        rng = np.random.default_rng(seed)
        self.positional = jnp.asarray(scale * rng.normal(size=(length, num_logits)), jnp.float32)
        self.embedding = jnp.asarray(rng.normal(size=(vocab_size, 8)), jnp.float32)
        self.mixing = jnp.asarray(scale * rng.normal(size=(8, num_logits)), jnp.float32)

    def __call__(self, ids):
        context = jnp.mean(self.embedding[ids], axis=1)  # [B, 8]
        return self.positional[None] + (context @ self.mixing)[:, None, :]

    def full(self, ids):
        return self(ids), self.embedding[ids]  # cache: per-row embedding [B, L, 8]

    def cheap(self, ids_sub, positions_sub, cache):
        rows = jnp.arange(ids_sub.shape[0])[:, None]
        cache = cache.at[rows, positions_sub].set(self.embedding[ids_sub])
        context = jnp.mean(cache, axis=1)
        return self.positional[positions_sub] + (context @ self.mixing)[:, None, :]
