"""Loading official MaskGIT checkpoints: architecture inference, logits, tokenizer, generation, errors."""
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maskgen import official
from maskgen.models.transformer import Transformer
from maskgen.models.vqgan import VQGAN

TRANSFORMER = "maskgit_imagenet128_checkpoint"
TOKENIZER = "tokenizer_imagenet128_checkpoint"


def _ckpt(official_small, name):
    return official_small["_dir"] / "checkpoints" / name


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def _write(path, flat):
    path.write_bytes(flax.serialization.to_bytes(flax.traverse_util.unflatten_dict(flat, sep="/")))
    return path


@pytest.fixture(scope="module")
def transformer(official_small):
    return official.load_transformer(_ckpt(official_small, TRANSFORMER), num_classes=10)


@pytest.fixture(scope="module")
def tokenizer(official_small):
    return official.load_tokenizer(_ckpt(official_small, TOKENIZER))


@pytest.fixture(scope="module")
def generated(transformer, official_small):
    return np.asarray(official.generate(transformer, official_small["gen_labels"],
                                        official_small["gen_rng"], num_iter=8))


# ----------------------------------------------------------------------------- transformer

def test_load_transformer_infers_architecture_and_reproduces_logits(transformer, official_small):
    m = transformer.model
    assert (m.vocab_size, m.hidden_size, m.num_layers, m.num_heads, m.mlp_dim, m.max_len) == (
        75, 64, 2, 2, 256, 65)
    assert transformer.layout.codebook_size == 64 and transformer.layout.mask_id == 74
    assert transformer.token_grid == (8, 8)
    logits = np.asarray(transformer.logits(official_small["tf_input_ids"]))
    ref = official_small["tf_logits"]
    assert logits.dtype == np.float32
    assert _rel(logits, ref) < 1e-5
    # The mask may be given as -1 (official) or as the mask id: same logits.
    ids = np.where(official_small["tf_input_ids"] == -1, 74, official_small["tf_input_ids"])
    np.testing.assert_array_equal(np.asarray(transformer.logits(ids)), logits)
    # Plain Flax call on the returned model and variables gives the same numbers.
    direct = transformer.model.apply(transformer.variables, jnp.asarray(official_small["tf_input_ids"]))
    np.testing.assert_allclose(np.asarray(direct), logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("attention", ["xla", "splash"])
def test_official_logits_with_other_attention_implementations(transformer, official_small, attention):
    """The official checkpoint reproduces the reference logits with transformer.attention=xla / splash too."""
    model = transformer.model.clone(attention=attention)
    logits = np.asarray(jax.jit(model.apply)(transformer.variables, jnp.asarray(official_small["tf_input_ids"])))
    assert _rel(logits, official_small["tf_logits"]) < 1e-5


@pytest.mark.parametrize("remat", ["full", "save_qkv_out"])
def test_official_checkpoint_loads_into_a_rematerialised_model(transformer, official_small, remat):
    model = transformer.model.clone(remat=remat)
    logits = np.asarray(model.apply(transformer.variables, jnp.asarray(official_small["tf_input_ids"])))
    assert _rel(logits, official_small["tf_logits"]) < 1e-5


@pytest.mark.parametrize("layers,hidden,heads,mlp,length,vocab",
                         [(3, 32, 4, 48, 17, 30), (1, 16, 1, 64, 5, 9)])
def test_transformer_shapes_determine_the_architecture(layers, hidden, heads, mlp, length, vocab):
    model = Transformer(vocab_size=vocab, hidden_size=hidden, num_layers=layers, num_heads=heads,
                        mlp_dim=mlp, max_len=length)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, length), jnp.int32))
    got = official.transformer_from_shapes(flax.core.meta.unbox(shapes)["params"])
    assert (got.vocab_size, got.hidden_size, got.num_layers, got.num_heads, got.mlp_dim, got.max_len) == (
        vocab, hidden, layers, heads, mlp, length)


def test_transformer_checkpoint_errors_name_the_tensor(official_small, tmp_path):
    raw = official.read_official(_ckpt(official_small, TRANSFORMER))
    bad = flax.traverse_util.flatten_dict(raw, sep="/")
    bad["params/TransformerLayer_1/Mlp_0/layer_output/bias"] = np.zeros((3,), np.float32)
    path = _write(tmp_path / "bad", bad)
    with pytest.raises(ValueError, match="TransformerLayer_1/Mlp_0/layer_output/bias"):
        official.load_transformer(path, num_classes=10)
    del bad["params/TransformerLayer_1/Mlp_0/layer_output/bias"]
    _write(path, bad)
    with pytest.raises(ValueError, match="missing"):
        official.load_transformer(path, num_classes=10)
    del bad["params/Embed_0/position_embeddings/embedding"]
    _write(path, bad)
    with pytest.raises(ValueError, match="Embed_0/position_embeddings/embedding' is missing"):
        official.load_transformer(path, num_classes=10)
    path.write_bytes(b"not msgpack at all")
    with pytest.raises(ValueError, match="msgpack"):
        official.load_transformer(path)
    with pytest.raises(FileNotFoundError):
        official.load_transformer(tmp_path / "absent")
    with pytest.raises(ValueError, match="expected a transformer checkpoint, found a tokenizer"):
        official.load_transformer(_ckpt(official_small, TOKENIZER), num_classes=10)
    with pytest.raises(ValueError, match="cannot hold"):
        official.load_transformer(_ckpt(official_small, TRANSFORMER), num_classes=80)


def test_load_transformer_with_a_config_checks_against_it(official_small):
    tf = official.load_transformer(_ckpt(official_small, TRANSFORMER), config="official_small")
    assert tf.layout.num_classes == 10 and tf.layout.codebook_size == 64
    assert _rel(tf.logits(official_small["tf_input_ids"]), official_small["tf_logits"]) < 1e-5
    with pytest.raises(ValueError, match="tensor .Embed_0/.* has shape"):
        official.load_transformer(_ckpt(official_small, TRANSFORMER), config="debug")


def test_logits_rejects_out_of_range_ids(transformer):
    with pytest.raises(ValueError, match="out of range"):
        transformer.logits(np.full((1, 65), 75))


# ----------------------------------------------------------------------------- tokenizer

def test_load_tokenizer_infers_architecture_and_reproduces_reference(tokenizer, official_small):
    m = tokenizer.model
    assert (m.filters, m.num_res_blocks, tuple(m.channel_multipliers), m.embedding_dim,
            m.codebook_size, m.image_channels, m.norm_groups) == (32, 1, (1, 1, 1, 1, 2), 16, 64, 3, 32)
    images = official_small["tok_images_uint8"].astype(np.float32) / 255.0
    ids = np.asarray(tokenizer.encode(images))
    assert ids.shape == (2, 8, 8) and np.issubdtype(ids.dtype, np.integer)
    np.testing.assert_array_equal(ids, official_small["tok_encode_indices"])
    decoded = np.asarray(tokenizer.decode(official_small["tok_encode_indices"]))
    assert decoded.shape == (2, 128, 128, 3) and decoded.dtype == np.float32
    assert _rel(decoded, official_small["tok_decode_from_encode"]) < 1e-4
    random_images = tokenizer.decode(official_small["tok_rand_ids"])
    assert _rel(random_images, official_small["tok_decode_from_rand"]) < 1e-4


@pytest.mark.parametrize("fields", [
    dict(codebook_size=16, embedding_dim=4, filters=8, num_res_blocks=2, channel_multipliers=(1, 2, 4),
         image_channels=1, norm_groups=4),
    dict(codebook_size=7, embedding_dim=3, filters=4, num_res_blocks=3, channel_multipliers=(2,),
         image_channels=3, norm_groups=2),
])
def test_tokenizer_shapes_determine_the_architecture(fields):
    model = VQGAN(**fields)
    side = model.downsample_factor
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                            jnp.zeros((1, side, side, fields["image_channels"])))
    got = official.tokenizer_config_from_shapes(flax.core.meta.unbox(shapes)["params"])
    want = {k: v for k, v in fields.items() if k != "norm_groups"}
    assert got == want


def test_tokenizer_config_completes_what_shapes_leave_open(official_small, tokenizer):
    # GroupNorm groups are not visible in the shapes: a different value loads but computes otherwise.
    other = official.load_tokenizer(_ckpt(official_small, TOKENIZER), config={"norm_groups": 16})
    assert other.model.norm_groups == 16
    a = np.asarray(other.decode(official_small["tok_rand_ids"]))
    assert _rel(a, official_small["tok_decode_from_rand"]) > 1e-3
    named = official.load_tokenizer(_ckpt(official_small, TOKENIZER), config="official_small")
    assert named.model.entropy_loss_ratio == 0.1  # a training field only the config sets
    assert named.model.channel_multipliers == tokenizer.model.channel_multipliers
    with pytest.raises(ValueError, match="unknown tokenizer config keys"):
        official.load_tokenizer(_ckpt(official_small, TOKENIZER), config={"groups": 32})
    with pytest.raises(ValueError, match="tensor 'decoder/Conv_0/bias' has shape"):
        official.load_tokenizer(_ckpt(official_small, TOKENIZER), config="debug")


def test_tokenizer_checkpoint_errors_name_the_tensor(official_small, tmp_path):
    flat = flax.traverse_util.flatten_dict(official.read_official(_ckpt(official_small, TOKENIZER)), sep="/")
    bad = dict(flat)
    bad["params/decoder/ResBlock_3/GroupNorm_1/scale"] = np.ones((5,), np.float32)
    with pytest.raises(ValueError, match="decoder/ResBlock_3/GroupNorm_1/scale' has shape"):
        official.load_tokenizer(_write(tmp_path / "a", bad))
    bad = dict(flat)
    del bad["params/encoder/ResBlock_2/Conv_1/kernel"]
    with pytest.raises(ValueError, match="encoder/ResBlock_2/Conv_1/kernel' is missing"):
        official.load_tokenizer(_write(tmp_path / "b", bad))
    bad = dict(flat)
    bad["params/quantizer/extra"] = np.zeros((2,), np.float32)
    with pytest.raises(ValueError, match="unexpected tensor 'quantizer/extra'"):
        official.load_tokenizer(_write(tmp_path / "c", bad))
    bad = {k: v for k, v in flat.items() if not k.startswith("params/encoder/ResBlock_3")}
    with pytest.raises(ValueError, match="ResBlock_\\* modules are not numbered"):
        official.load_tokenizer(_write(tmp_path / "d", bad))
    bad = {k: v for k, v in flat.items() if not k.startswith("params/encoder/ResBlock_5")}
    with pytest.raises(ValueError, match="5 ResBlocks, which does not split into 5 levels"):
        official.load_tokenizer(_write(tmp_path / "e", bad))
    with pytest.raises(ValueError, match="expected a tokenizer checkpoint, found a transformer"):
        official.load_tokenizer(_ckpt(official_small, TRANSFORMER))


def test_tokenizer_rejects_bad_input(tokenizer):
    with pytest.raises(ValueError, match="floating point"):
        tokenizer.encode(np.zeros((1, 128, 128, 3), np.uint8))
    with pytest.raises(ValueError, match="channels"):
        tokenizer.encode(np.zeros((1, 128, 128, 1), np.float32))
    with pytest.raises(ValueError, match="divisible"):
        tokenizer.encode(np.zeros((1, 100, 128, 3), np.float32))
    with pytest.raises(ValueError, match="out of range"):
        tokenizer.decode(np.full((1, 8, 8), 64))
    with pytest.raises(ValueError, match="batch, h, w"):
        tokenizer.decode(np.zeros((8, 8), np.int32))


# ----------------------------------------------------------------------------- generation

def test_generate_reproduces_official_tokens(generated, transformer, official_small):
    want = official_small["gen_final_seqs"][:, -1]
    assert generated.shape == (8, 65)
    np.testing.assert_array_equal(generated, want)
    np.testing.assert_array_equal(generated[:, 0], official_small["gen_labels"] + 64)
    assert generated[:, 1:].min() >= 0 and generated[:, 1:].max() < 64
    # Same key, same tokens (a typed key gives the same stream); another key, other tokens.
    again = official.generate(transformer, official_small["gen_labels"],
                              jax.random.wrap_key_data(official_small["gen_rng"]))
    np.testing.assert_array_equal(np.asarray(again), generated)
    other = official.generate(transformer, official_small["gen_labels"], jax.random.PRNGKey(7))
    assert (np.asarray(other)[:, 1:] != generated[:, 1:]).mean() > 0.2  # peaky logits: many agree


def test_generate_passes_schedule_and_temperature_through(transformer, official_small):
    tokens = official.generate(transformer, official_small["gen_labels"], official_small["gen_rng"],
                               num_iter=8, choice_temperature=1.0, schedule="pow2")
    np.testing.assert_array_equal(np.asarray(tokens), official_small["decode_pow2_t1.0"][:, -1])


def test_official_pipeline_reproduces_generated_images(generated, tokenizer, transformer, official_small):
    images = np.asarray(tokenizer.decode(generated[:2, 1:].reshape(2, 8, 8)))
    want = official_small["gen_images_first2"]
    assert _rel(images, want) < 1e-4
    # generate_images = generate + decode (same batch, same key).
    full = np.asarray(official.generate_images(transformer, tokenizer, official_small["gen_labels"],
                                               official_small["gen_rng"]))
    assert full.shape == (8, 128, 128, 3)
    assert _rel(full[:2], want) < 1e-4


def test_generate_rejects_bad_labels_and_keys(transformer, official_small):
    with pytest.raises(ValueError, match="out of range"):
        official.generate(transformer, [0, 10], official_small["gen_rng"])
    with pytest.raises(ValueError, match="integers"):
        official.generate(transformer, [0.5], official_small["gen_rng"])
    with pytest.raises(ValueError, match="1-D"):
        official.generate(transformer, 3, official_small["gen_rng"])
    with pytest.raises(ValueError, match="one batch key"):
        official.generate(transformer, [1, 2], jax.random.split(jax.random.PRNGKey(0), 2))
