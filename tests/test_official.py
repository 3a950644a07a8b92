"""Loading official MaskGIT checkpoints: architecture inference, logits, clear errors."""
import flax
import numpy as np
import pytest

from maskgen import official


def _ckpt(official_small, name):
    return official_small["_dir"] / "checkpoints" / name


def test_load_transformer_infers_architecture_and_reproduces_logits(official_small):
    tf = official.load_transformer(_ckpt(official_small, "maskgit_imagenet128_checkpoint"), num_classes=10)
    m = tf.model
    assert (m.vocab_size, m.hidden_size, m.num_layers, m.num_heads, m.mlp_dim, m.max_len) == (75, 64, 2, 2, 256, 65)
    assert tf.layout.codebook_size == 64 and tf.layout.mask_id == 74 and tf.token_grid == (8, 8)
    logits = np.asarray(tf.logits(official_small["tf_input_ids"]))
    ref = official_small["tf_logits"]
    assert logits.dtype == np.float32
    assert np.linalg.norm(logits - ref) / np.linalg.norm(ref) < 1e-5


def test_transformer_checkpoint_errors_name_the_tensor(official_small, tmp_path):
    raw = official.read_official(_ckpt(official_small, "maskgit_imagenet128_checkpoint"))
    bad = flax.traverse_util.flatten_dict(raw, sep="/")
    bad["params/TransformerLayer_1/Mlp_0/layer_output/bias"] = np.zeros((3,), np.float32)
    path = tmp_path / "bad"
    path.write_bytes(flax.serialization.to_bytes(flax.traverse_util.unflatten_dict(bad, sep="/")))
    with pytest.raises(ValueError, match="TransformerLayer_1/Mlp_0/layer_output/bias"):
        official.load_transformer(path, num_classes=10)
    del bad["params/TransformerLayer_1/Mlp_0/layer_output/bias"]
    path.write_bytes(flax.serialization.to_bytes(flax.traverse_util.unflatten_dict(bad, sep="/")))
    with pytest.raises(ValueError, match="missing"):
        official.load_transformer(path, num_classes=10)
    path.write_bytes(b"not msgpack at all")
    with pytest.raises(ValueError, match="msgpack"):
        official.load_transformer(path)
    with pytest.raises(FileNotFoundError):
        official.load_transformer(tmp_path / "absent")


def test_logits_rejects_out_of_range_ids(official_small):
    tf = official.load_transformer(_ckpt(official_small, "maskgit_imagenet128_checkpoint"), num_classes=10)
    with pytest.raises(ValueError, match="out of range"):
        tf.logits(np.full((1, 65), 75))
