"""Load google-research/maskgit checkpoints as maskgen models (notebook-friendly).

The official files are single msgpack blobs written by
`flax.serialization.to_bytes({"params": ...})`. maskgen's modules use the same
parameter tree, so loading is: read, infer the architecture from the shapes,
check every tensor against the maskgen module, and wrap.

    tf = official.load_transformer("maskgit_imagenet256_checkpoint")
    logits = tf.logits(input_ids)            # float32 [B, L, 2025]
    tok = official.load_tokenizer("tokenizer_imagenet256_checkpoint")
    ids = tok.encode(images)                 # int [B, 16, 16] for [B, 256, 256, 3] in [0, 1]
    seqs = official.generate(tf, class_ids, jax.random.PRNGKey(0), num_iter=8)
"""
import dataclasses
import os
import re
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax.core import meta

from maskgen.models.transformer import Transformer, check_input_ids
from maskgen.tokens import TokenLayout


def read_official(path) -> dict:
    """Reads an official checkpoint file into nested dicts of numpy arrays ({"params": ...})."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"official checkpoint not found: {path}")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        state = flax.serialization.from_bytes(None, raw)
    except Exception as e:  # msgpack raises several types on garbage
        raise ValueError(f"{path} is not a flax msgpack checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(state, dict) or "params" not in state:
        keys = list(state)[:5] if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{path}: expected a top-level 'params' entry, found {keys}")
    return {"params": state["params"]}


def check_tree(params: dict, expected: Any, what: str) -> None:
    """Raises ValueError naming the first missing, unexpected or mis-shaped tensor."""
    got = flax.traverse_util.flatten_dict(params, sep="/")
    want = flax.traverse_util.flatten_dict(meta.unbox(expected), sep="/")
    for k in sorted(want):
        if k not in got:
            raise ValueError(f"{what}: tensor '{k}' is missing from the checkpoint")
        if tuple(np.shape(got[k])) != tuple(want[k].shape):
            raise ValueError(f"{what}: tensor '{k}' has shape {tuple(np.shape(got[k]))}, "
                             f"the model expects {tuple(want[k].shape)}")
    extra = sorted(set(got) - set(want))
    if extra:
        raise ValueError(f"{what}: unexpected tensor '{extra[0]}' in the checkpoint")


def _transformer_from_shapes(params: dict) -> Transformer:
    try:
        vocab, hidden = params["Embed_0"]["word_embeddings"]["embedding"].shape
        max_len = params["Embed_0"]["position_embeddings"]["embedding"].shape[0]
        layers = sorted(int(m.group(1)) for k in params if (m := re.fullmatch(r"TransformerLayer_(\d+)", k)))
        first = params["TransformerLayer_0"]
        _, heads, _ = first["Attention_0"]["self_attention"]["query"]["kernel"].shape
        mlp = first["Mlp_0"]["intermediate_output"]["kernel"].shape[1]
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"not a MaskGIT transformer parameter tree (missing {e})") from e
    if layers != list(range(len(layers))):
        raise ValueError(f"transformer layers are not numbered 0..N-1: {layers}")
    return Transformer(vocab_size=vocab, hidden_size=hidden, num_layers=len(layers), num_heads=heads,
                       mlp_dim=mlp, max_len=max_len, dropout_rate=0.0, attention_dropout_rate=0.0)


@dataclasses.dataclass
class OfficialTransformer:
    """An official transformer as a maskgen model with its parameters."""
    model: Transformer
    variables: dict
    layout: TokenLayout

    def __post_init__(self):
        self._jit_logits = jax.jit(lambda v, x: self.model.apply(v, x))

    @property
    def seq_len(self) -> int:
        return self.model.max_len

    @property
    def token_grid(self) -> tuple[int, int]:
        side = int(round((self.seq_len - 1) ** 0.5))
        return side, side

    def logits(self, input_ids) -> jax.Array:
        """float32 [B, L, vocab] for official-layout ids (class token at 0; -1 or mask id = masked)."""
        ids = check_input_ids(input_ids, self.layout.vocab_size, self.seq_len)
        return self._jit_logits(self.variables, jnp.asarray(ids, jnp.int32))

    def logits_fn(self, num_logits=None):
        """A jit-friendly ids -> logits callable for the scheduler."""
        return lambda ids: self.model.apply(self.variables, ids, num_logits=num_logits)


def load_transformer(path, num_classes: int = 1000) -> OfficialTransformer:
    """Loads an official transformer checkpoint; the architecture is read off the shapes."""
    variables = read_official(path)
    model = _transformer_from_shapes(variables["params"])
    codebook = model.vocab_size - num_classes - 1
    if codebook < 1:
        raise ValueError(f"vocabulary {model.vocab_size} cannot hold {num_classes} classes + mask")
    expected = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, model.max_len), jnp.int32))
    check_tree(variables["params"], expected["params"], f"transformer checkpoint {path}")
    variables = jax.tree_util.tree_map(jnp.asarray, variables)
    return OfficialTransformer(model, variables, TokenLayout(codebook, num_classes))
