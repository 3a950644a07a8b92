"""Load google-research/maskgit checkpoints as maskgen models (notebook-friendly).

The official files are single msgpack blobs written by
`flax.serialization.to_bytes({"params": ...})`. maskgen's modules use the same
parameter trees, so loading is: read, infer the architecture from the shapes,
check every tensor against the maskgen module, and wrap.

    transformer = official.load_transformer("maskgit_imagenet256_checkpoint")
    logits = transformer.logits(input_ids)          # float32 [B, L, 2025]
    tok = official.load_tokenizer("tokenizer_imagenet256_checkpoint")
    ids = tok.encode(images)                 # int [B, 16, 16] for [B, 256, 256, 3] in [0, 1]
    seqs = official.generate(transformer, class_ids, jax.random.PRNGKey(0), num_iter=8)
    images = tok.decode(seqs[:, 1:].reshape(-1, 16, 16))

The plain Flax equivalent of `transformer.logits(ids)` is `transformer.model.apply(transformer.variables, ids)`
(likewise `tok.model.apply(tok.variables, images, method="encode_to_indices")`).
"""
import dataclasses
import os
import re
from typing import Any, Callable, Dict, Optional, Sequence

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax.core import meta
from jax.typing import ArrayLike

from maskgen import config_io, paths
from maskgen.models import factory
from maskgen.models.sizes import token_layout
from maskgen.models.transformer import Transformer, check_input_ids
from maskgen.models.vqgan import VQGAN, check_images, check_token_ids
from maskgen.scheduler import DecodeConfig, DecodeResult, decode
from maskgen.scheduler.keys import batch_key
from maskgen.tokens import TokenLayout

TOKENIZER_PARTS = ("encoder", "decoder", "quantizer")
TRANSFORMER_PARTS = ("Embed_0", "MlmLayer_0")


def read_official(path: str | os.PathLike) -> dict:
    """Reads an official checkpoint file into nested dicts of numpy arrays ({"params": ...})."""
    path = paths.normalize(path)  # local or gs://
    if os.path.isdir(path):
        files = sorted(f for f in os.listdir(path) if "checkpoint" in f)[:3]
        hint = f" (e.g. {os.path.join(path, files[0])})" if files else ""
        raise ValueError(f"--official {path} is a directory; pass the checkpoint file itself{hint}, as "
                         "downloaded (tokenizer_imagenet256_checkpoint, maskgit_imagenet256_checkpoint, ...)")
    if not paths.is_file(path):
        raise FileNotFoundError(f"official checkpoint not found: {path}")
    raw = paths.read_bytes(path)
    try:
        state = flax.serialization.from_bytes(None, raw)
    except Exception as e:  # msgpack raises several types on garbage
        raise ValueError(f"{path} is not a flax msgpack checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(state, dict) or "params" not in state:
        keys = list(state)[:5] if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{path}: expected a top-level 'params' entry, found {keys}")
    return {"params": state["params"]}


def checkpoint_kind(params: dict) -> Optional[str]:
    """'tokenizer', 'transformer' or None, judged by the top-level module names."""
    if not isinstance(params, dict):
        return None
    if all(k in params for k in TOKENIZER_PARTS):
        return "tokenizer"
    if all(k in params for k in TRANSFORMER_PARTS):
        return "transformer"
    return None


def check_kind(params: dict, kind: str, what: str) -> None:
    """Raises ValueError when the tree is clearly the other kind of checkpoint (or neither)."""
    found = checkpoint_kind(params)
    if found != kind:
        top = sorted(params)[:6] if isinstance(params, dict) else type(params).__name__
        found_text = f"a {found} checkpoint" if found else f"no MaskGIT model (top-level {top})"
        raise ValueError(f"{what}: expected a {kind} checkpoint, found {found_text}")


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


def _shape(params: dict, path: str, what: str, rank: int) -> tuple:
    """Shape of the tensor at '/'-joined `path`; ValueError naming it when absent or of wrong rank."""
    node = params
    for part in path.split("/"):
        if not isinstance(node, dict) or part not in node:
            raise ValueError(f"{what}: tensor '{path}' is missing from the checkpoint")
        node = node[part]
    shape = tuple(np.shape(node))
    if len(shape) != rank:
        raise ValueError(f"{what}: tensor '{path}' has shape {shape}, expected rank {rank}")
    return shape


def _numbered(tree: dict, prefix: str, what: str, where: str) -> int:
    """How many `prefix_0..prefix_{n-1}` entries `tree` has (they must be contiguous)."""
    found = sorted(int(m.group(1)) for k in tree if (m := re.fullmatch(rf"{prefix}_(\d+)", k)))
    if found != list(range(len(found))):
        raise ValueError(f"{what}: {where}{prefix}_* modules are not numbered 0..N-1: {found}")
    return len(found)


# ----------------------------------------------------------------------------- transformer

def transformer_from_shapes(params: dict, what: str = "transformer checkpoint") -> Transformer:
    """The maskgen Transformer (dropout off) whose parameter shapes `params` has."""
    vocab, hidden = _shape(params, "Embed_0/word_embeddings/embedding", what, 2)
    max_len, _ = _shape(params, "Embed_0/position_embeddings/embedding", what, 2)
    layers = _numbered(params, "TransformerLayer", what, "")
    if layers == 0:
        raise ValueError(f"{what}: tensor 'TransformerLayer_0' is missing from the checkpoint")
    _, heads, _ = _shape(params, "TransformerLayer_0/Attention_0/self_attention/query/kernel", what, 3)
    _, mlp = _shape(params, "TransformerLayer_0/Mlp_0/intermediate_output/kernel", what, 2)
    return Transformer(vocab_size=vocab, hidden_size=hidden, num_layers=layers, num_heads=heads,
                       mlp_dim=mlp, max_len=max_len, dropout_rate=0.0, attention_dropout_rate=0.0)


@dataclasses.dataclass
class OfficialTransformer:
    """An official transformer as a maskgen model with its parameters."""
    model: Transformer
    variables: dict
    layout: TokenLayout
    _decoders: Dict[DecodeConfig, Any] = dataclasses.field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._jit_logits = jax.jit(lambda v, x: self.model.apply(v, x))

    @property
    def seq_len(self) -> int:
        """L: 1 class token + the image tokens (the model's position table)."""
        return self.model.max_len

    @property
    def token_grid(self) -> tuple[int, int]:
        """(h, w) of the square token grid the L - 1 image tokens form."""
        side = int(round((self.seq_len - 1) ** 0.5))
        return side, side

    def logits(self, input_ids: ArrayLike) -> jax.Array:
        """float32 [B, L, vocab] for official-layout ids (class token at 0; -1 or mask id = masked)."""
        ids = check_input_ids(input_ids, self.layout.vocab_size, self.seq_len)
        return self._jit_logits(self.variables, jnp.asarray(ids, jnp.int32))

    def logits_fn(self, num_logits: Optional[int] = None) -> Callable[[jax.Array], jax.Array]:
        """A jit-friendly ids -> logits callable for the scheduler."""
        return lambda ids: self.model.apply(self.variables, ids, num_logits=num_logits)

    def decoder(self, config: DecodeConfig) -> Callable[[dict, jax.Array, jax.Array], DecodeResult]:
        """Jitted (variables, ids [B, L], key) -> DecodeResult for `config`, compiled once per config."""
        if config not in self._decoders:
            layout, model = self.layout, self.model

            def run(variables: dict, ids: jax.Array, key: jax.Array) -> DecodeResult:
                logits_fn = lambda x: model.apply(variables, x, num_logits=layout.codebook_size)  # noqa: E731
                return decode(logits_fn, ids, key, config, layout)
            self._decoders[config] = jax.jit(run)
        return self._decoders[config]


def _layout_for(vocab_size: int, num_classes: int) -> TokenLayout:
    codebook = vocab_size - num_classes - 1
    if codebook < 1:
        raise ValueError(f"vocabulary {vocab_size} cannot hold {num_classes} classes + mask")
    return TokenLayout(codebook, num_classes)


def load_transformer(path: str | os.PathLike, num_classes: int = 1000,
                     config: str | os.PathLike | ml_collections.ConfigDict | None = None) -> OfficialTransformer:
    """Loads an official transformer checkpoint; the architecture is read off the shapes.

    num_classes: classes of the checkpoint (1000 for ImageNet); the codebook size is
    vocab - num_classes - 1. config (optional): a maskgen config (name in configs/,
    file path or ConfigDict); its transformer is built instead and every tensor is
    checked against it, and num_classes comes from it.
    """
    what = f"transformer checkpoint {os.fspath(path)}"
    variables = read_official(path)
    check_kind(variables["params"], "transformer", what)
    if config is None:
        model = transformer_from_shapes(variables["params"], what)
        layout = _layout_for(model.vocab_size, num_classes)
    else:
        cfg = config_io.resolve_config(config)
        model, layout = factory.transformer_model(cfg), token_layout(cfg)
    check_tree(variables["params"], _abstract_params(model, jnp.zeros((1, model.max_len), jnp.int32)),
               what)
    variables = jax.tree_util.tree_map(jnp.asarray, variables)
    return OfficialTransformer(model, variables, layout)


# ----------------------------------------------------------------------------- tokenizer

def tokenizer_config_from_shapes(params: dict, what: str = "tokenizer checkpoint") -> dict:
    """VQGAN constructor fields that the shapes determine (norm_groups is not among them).

    Encoder: Conv_0 (3,3,C,filters), then `num_res_blocks` ResBlocks per level plus
    as many mid blocks. Decoder: Conv_0, one up-sampling conv per level but the
    first, and an output conv, so it has levels + 1 convs.
    """
    _, _, channels, filters = _shape(params, "encoder/Conv_0/kernel", what, 4)
    codebook_size, embedding_dim = _shape(params, "quantizer/codebook", what, 2)
    decoder_convs = _numbered(params["decoder"], "Conv", what, "decoder/")
    levels = decoder_convs - 1
    if levels < 1:
        raise ValueError(f"{what}: tensor 'decoder/Conv_1/kernel' is missing from the checkpoint")
    blocks = _numbered(params["encoder"], "ResBlock", what, "encoder/")
    if blocks == 0 or blocks % (levels + 1):
        raise ValueError(f"{what}: the encoder has {blocks} ResBlocks, which does not split into "
                         f"{levels} levels + a middle stage of equal depth")
    num_res_blocks = blocks // (levels + 1)
    multipliers = []
    for level in range(levels):
        path = f"encoder/ResBlock_{level * num_res_blocks}/Conv_0/kernel"
        width = _shape(params, path, what, 4)[-1]
        if width % filters:
            raise ValueError(f"{what}: tensor '{path}' has {width} output channels, not a multiple "
                             f"of the {filters} filters of encoder/Conv_0")
        multipliers.append(width // filters)
    return dict(codebook_size=codebook_size, embedding_dim=embedding_dim, filters=filters,
                num_res_blocks=num_res_blocks, channel_multipliers=tuple(multipliers),
                image_channels=channels)


@dataclasses.dataclass
class OfficialTokenizer:
    """An official VQGAN tokenizer as a maskgen model with its parameters."""
    model: VQGAN
    variables: dict

    def __post_init__(self) -> None:
        self._jit_encode = jax.jit(
            lambda v, x: self.model.apply(v, x, method="encode_to_indices"))
        self._jit_decode = jax.jit(
            lambda v, ids: self.model.apply(v, ids, method="decode_from_indices"))

    @property
    def codebook_size(self) -> int:
        """Number of VQ codes (token ids 0..codebook_size-1)."""
        return self.model.codebook_size

    @property
    def downsample_factor(self) -> int:
        """f: pixels per token along each side."""
        return self.model.downsample_factor

    def encode(self, images: ArrayLike) -> jax.Array:
        """Images float [B, H, W, C] in [0, 1] -> int32 token ids [B, H/f, W/f]."""
        images = jnp.asarray(images)
        check_images(images, self.model.image_channels, self.downsample_factor,
                     self.model.image_size)
        return self._jit_encode(self.variables, images.astype(jnp.float32))

    def decode(self, ids: ArrayLike) -> jax.Array:
        """Token ids int [B, h, w] -> float32 images [B, h*f, w*f, C] (unclipped, nominally [0, 1])."""
        ids = check_token_ids(ids, self.codebook_size)
        return self._jit_decode(self.variables, jnp.asarray(ids, jnp.int32))


def _abstract_params(model: Transformer | VQGAN, example: jax.Array) -> Any:
    return jax.eval_shape(model.init, jax.random.PRNGKey(0), example)["params"]


def _tokenizer_model(params: dict, config: dict | str | os.PathLike | ml_collections.ConfigDict | None,
                     what: str) -> VQGAN:
    fields = tokenizer_config_from_shapes(params, what)
    if config is not None and not isinstance(config, dict):
        return factory.tokenizer_model(config_io.resolve_config(config))
    if config is not None:
        unknown = sorted(set(config) - {f.name for f in dataclasses.fields(VQGAN)}
                         - {"parent", "name"})
        if unknown:
            raise ValueError(f"unknown tokenizer config keys {unknown}")
        fields.update(config)
    fields["channel_multipliers"] = tuple(int(m) for m in fields["channel_multipliers"])
    if "dtype" in fields:
        fields["dtype"] = jnp.dtype(fields["dtype"])
    model = VQGAN(**fields)
    model.check_config()
    return model


def load_tokenizer(path: str | os.PathLike,
                   config: dict | str | os.PathLike | ml_collections.ConfigDict | None = None
                   ) -> OfficialTokenizer:
    """Loads an official VQGAN tokenizer checkpoint; the architecture is read off the shapes.

    Inferred: filters, num_res_blocks, channel_multipliers, embedding_dim,
    codebook_size, image_channels. GroupNorm groups cannot be read off the shapes
    (official: 32). config (optional): a dict of `VQGAN` fields that override or
    complete the inferred ones (e.g. {"norm_groups": 16, "image_size": 256}), or a
    maskgen config (name in configs/, file path, ConfigDict) whose tokenizer is used.
    Every tensor is checked against the resulting model.
    """
    what = f"tokenizer checkpoint {os.fspath(path)}"
    variables = read_official(path)
    params = variables["params"]
    check_kind(params, "tokenizer", what)
    model = _tokenizer_model(params, config, what)
    side = model.downsample_factor
    example = jnp.zeros((1, side, side, model.image_channels), jnp.float32)
    check_tree(params, _abstract_params(model, example), what)
    return OfficialTokenizer(model, jax.tree_util.tree_map(jnp.asarray, variables))


# ----------------------------------------------------------------------------- generation

def class_input_ids(layout: TokenLayout, class_ids: Sequence[int] | np.ndarray, seq_len: int) -> np.ndarray:
    """[B, L] int32: class token (label + codebook size) at 0, the mask id everywhere else."""
    labels = np.asarray(class_ids)
    if labels.ndim != 1 or labels.size == 0:
        raise ValueError(f"class_ids must be a non-empty 1-D list of labels, got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"class_ids must be integers, got dtype {labels.dtype}")
    layout.check_labels(labels)
    ids = np.full((labels.size, seq_len), layout.mask_id, np.int32)
    ids[:, 0] = labels + layout.codebook_size
    return ids


def generate(transformer: OfficialTransformer, class_ids: Sequence[int] | np.ndarray, key: ArrayLike,
             num_iter: int = 8,
             choice_temperature: float = 4.5, schedule: str = "cosine") -> jax.Array:
    """int32 [B, L] tokens as the official `generate_samples` decodes them (class token at 0 kept).

    Runs the scheduler's official preset: one batch key (a `jax.random.PRNGKey` or
    typed key; same key, same tokens), `num_iter` steps, Gumbel re-masking noise
    `choice_temperature * (1 - (t+1)/T)`, the given mask schedule. Every position
    is filled (the official code's `final_seqs[:, -1]`).
    """
    config = DecodeConfig.official_maskgit(steps=int(num_iter), schedule=schedule,
                                           choice_temperature=float(choice_temperature))
    ids = class_input_ids(transformer.layout, class_ids, transformer.seq_len)
    result = transformer.decoder(config)(transformer.variables, jnp.asarray(ids), batch_key(key))
    return result.tokens


def generate_images(transformer: OfficialTransformer, tokenizer: OfficialTokenizer,
                    class_ids: Sequence[int] | np.ndarray, key: ArrayLike,
                    num_iter: int = 8, choice_temperature: float = 4.5,
                    schedule: str = "cosine") -> jax.Array:
    """float32 images [B, H, W, C] (unclipped), as the official `generate_samples` returns them."""
    if tokenizer.codebook_size != transformer.layout.codebook_size:
        raise ValueError(f"tokenizer codebook {tokenizer.codebook_size} != transformer codebook "
                         f"{transformer.layout.codebook_size}")
    tokens = generate(transformer, class_ids, key, num_iter, choice_temperature, schedule)
    h, w = transformer.token_grid
    if h * w != transformer.seq_len - 1:
        raise ValueError(f"sequence length {transformer.seq_len} is not 1 + a square token grid")
    return tokenizer.decode(np.asarray(tokens[:, 1:]).reshape(-1, h, w))
