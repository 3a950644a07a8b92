"""python -m maskgen.convert: official checkpoints -> a workdir that load, sample.py and editing read."""
import json
import os
import subprocess
import sys

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import maskgen
from maskgen import checkpoint as ckpt_lib
from maskgen import convert, editing, official
from maskgen.scheduler import DecodeConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = {"tokenizer": "tokenizer_imagenet128_checkpoint", "transformer": "maskgit_imagenet128_checkpoint"}


def _official(official_small, kind):
    return str(official_small["_dir"] / "checkpoints" / FILES[kind])


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


@pytest.fixture(scope="module")
def workdir(official_small, tmp_path_factory):
    out = tmp_path_factory.mktemp("converted") / "official_small"
    for kind in ("tokenizer", "transformer"):
        argv = ["--official", _official(official_small, kind), "--kind", kind,
                "--config", "official_small", "--out", str(out)]
        assert convert.main(argv) == 0
    return out


@pytest.fixture(scope="module")
def loaded(workdir):
    return maskgen.load(str(workdir))


@pytest.fixture(scope="module")
def render(loaded):
    """Jitted tokenizer rendering of token ids [2, 8, 8] with the converted weights."""
    fn = jax.jit(lambda p, ids: loaded.tokenizer.apply({"params": p}, ids, method="decode_from_indices"))
    return lambda ids: np.asarray(fn(loaded.params["tokenizer"], jnp.asarray(ids, jnp.int32)))


def test_converted_workdir_has_the_training_layout(workdir):
    assert sorted(os.listdir(workdir)) == ["config.json", "tokenizer", "transformer"]
    with open(workdir / "config.json") as f:
        cfg = json.load(f)
    assert (cfg["image_size"], cfg["num_classes"], cfg["null_class"]) == (128, 10, False)
    for kind in ("tokenizer", "transformer"):
        assert os.listdir(workdir / kind) == ["0"]
        step = ckpt_lib.StageCheckpoints(workdir / kind, read_only=True)
        assert step.saved_config(0) == cfg  # the step carries the config, as training's do


def test_loaded_bundle_holds_the_official_weights(loaded, official_small):
    assert loaded.steps == {"tokenizer": 0, "transformer": 0}
    assert loaded.token_grid == (8, 8) and loaded.image_shape == (128, 128, 3)
    assert loaded.layout.codebook_size == 64 and loaded.layout.mask_id == 74
    for kind in ("tokenizer", "transformer"):
        want = official.read_official(_official(official_small, kind))["params"]
        want = flax.traverse_util.flatten_dict(want)
        got = flax.traverse_util.flatten_dict(jax.device_get(loaded.params[kind]))
        assert sorted(got) == sorted(want)
        for path in want:
            np.testing.assert_array_equal(got[path], want[path], err_msg="/".join(path))


def test_loaded_bundle_reproduces_official_outputs(loaded, render, official_small):
    logits = jax.jit(loaded.transformer.apply)({"params": loaded.params["transformer"]},
                                               jnp.asarray(official_small["tf_input_ids"]))
    assert _rel(logits, official_small["tf_logits"]) < 1e-5
    assert _rel(render(official_small["tok_encode_indices"]), official_small["tok_decode_from_encode"]) < 1e-4


def test_editing_api_reproduces_the_official_class_edit(loaded, official_small):
    top, left, _, _ = official_small["edit_bbox_top_left_height_width"]
    image = official_small["edit_image_uint8"].astype(np.float32) / 255.0
    # The official helper floors the 72 px box width to 4 tokens; 64 px gives the same token box.
    out = editing.inpaint(loaded, image, (top, left, 64, 64), int(official_small["edit_label"]),
                          seed=official_small["edit_rng"], paste_back=False,
                          decode_config=DecodeConfig.official_maskgit(steps=12, start_step=2))
    want = official_small["edit_final_seqs"][0, -1, 1:].reshape(8, 8)
    np.testing.assert_array_equal(out.tokens_after, want)
    assert _rel(out.generated, np.clip(official_small["edit_images_first1"][0], 0, 1)) < 1e-4


def test_sample_py_runs_on_the_converted_workdir(workdir, render, official_small, tmp_path):
    out = tmp_path / "samples"
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
               JAX_DISABLE_MOST_OPTIMIZATIONS="1")  # faster compiles; checked to 1/255 below
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "sample.py"), f"--workdir={workdir}", "--classes=7",
         "--per_class=1", "--batch_size=1", "--steps=4", f"--out={out}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with np.load(out / "samples.npz") as f:
        images, labels, tokens = f["images"], f["labels"], f["tokens"]
    assert images.shape == (1, 128, 128, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(labels, [7])
    assert tokens.shape == (1, 8, 8) and 0 <= tokens.min() and tokens.max() < 64
    # The pixels are the official tokenizer's rendering of the sampled tokens.
    rendered = render(np.concatenate([tokens, official_small["tok_encode_indices"][:1]]))[:1]
    want = np.round(np.clip(rendered, 0, 1) * 255)
    assert np.abs(images.astype(np.float64) - want).max() <= 1
    assert os.path.isfile(out / "grid.png")


def test_shape_mismatch_names_the_tensor_and_writes_nothing(official_small, tmp_path):
    out = tmp_path / "bad"
    with pytest.raises(ValueError, match="tensor 'Embed_0/.*' has shape"):
        convert.convert(_official(official_small, "transformer"), "transformer", "imagenet256", out)
    with pytest.raises(ValueError, match="tensor 'decoder/.*' has shape"):
        convert.convert(_official(official_small, "tokenizer"), "tokenizer", "imagenet256", out)
    assert not out.exists()
    with_null = convert.resolve_config("official_small")
    with_null.null_class = True
    with pytest.raises(ValueError, match="word_embeddings.*null_class=False"):
        convert.convert(_official(official_small, "transformer"), "transformer", with_null, out)
    with pytest.raises(ValueError, match="expected a transformer checkpoint, found a tokenizer"):
        convert.convert(_official(official_small, "tokenizer"), "transformer", "official_small", out)
    assert not out.exists()


def test_tensor_missing_from_the_file_is_named(official_small, tmp_path):
    flat = flax.traverse_util.flatten_dict(official.read_official(_official(official_small, "transformer")),
                                           sep="/")
    del flat["params/MlmLayer_0/mlm_bias/bias"]
    path = tmp_path / "partial"
    path.write_bytes(flax.serialization.to_bytes(flax.traverse_util.unflatten_dict(flat, sep="/")))
    with pytest.raises(ValueError, match="'MlmLayer_0/mlm_bias/bias' is missing"):
        convert.convert(path, "transformer", "official_small", tmp_path / "out")


def test_refuses_to_mix_configs_or_overwrite(workdir, official_small, tmp_path, capsys):
    with pytest.raises(ValueError, match="already exists"):
        convert.convert(_official(official_small, "tokenizer"), "tokenizer", "official_small", workdir)
    out = tmp_path / "mixed"
    convert.convert(_official(official_small, "tokenizer"), "tokenizer", "official_small", out)
    other = convert.resolve_config("official_small")
    other.sampling.steps = 12
    with pytest.raises(ValueError, match="holds a different config"):
        convert.convert(_official(official_small, "transformer"), "transformer", other, out)
    assert not (out / "transformer").exists()
    # The CLI reports errors on stderr with exit status 1.
    argv = ["--official", _official(official_small, "transformer"), "--kind", "transformer",
            "--config", "no_such_config", "--out", str(out)]
    assert convert.main(argv) == 1
    err = capsys.readouterr().err
    assert "unknown config 'no_such_config'" in err and "imagenet256" in err


def test_resolve_config_accepts_names_paths_and_configdicts():
    by_name = convert.resolve_config("imagenet512")
    by_path = convert.resolve_config(os.path.join(REPO, "configs", "imagenet512.py"))
    assert by_name.to_dict() == by_path.to_dict()
    assert convert.resolve_config(by_name) is by_name
    with pytest.raises(ValueError, match="kind must be one of"):
        convert.convert("x", "vqgan", "imagenet256", "out")
    with pytest.raises(ValueError, match="config must be"):
        convert.resolve_config(3)


def test_imagenet_configs_match_the_official_architecture():
    """The official ImageNet parameter counts and shapes (official_layout.md) fit configs/imagenet*.py."""
    for name, length, count in (("imagenet256", 257, 172_457_193), ("imagenet512", 1025, 173_047_017)):
        cfg = convert.resolve_config(name)
        shapes = jax.eval_shape(convert.build_model("transformer", cfg).init, jax.random.PRNGKey(0),
                                jnp.zeros((1, length), jnp.int32))
        params = flax.core.meta.unbox(shapes)["params"]
        assert params["Embed_0"]["word_embeddings"]["embedding"].shape == (2025, 768)
        assert params["Embed_0"]["position_embeddings"]["embedding"].shape == (length, 768)
        attention = params["TransformerLayer_23"]["Attention_0"]["self_attention"]
        assert attention["query"]["kernel"].shape == (768, 16, 48)
        assert sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params)) == count
    # Both resolutions share the tokenizer architecture.
    tok = convert.build_model("tokenizer", cfg)
    shapes = jax.eval_shape(tok.init, jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))
    params = flax.core.meta.unbox(shapes)["params"]
    assert sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params)) == 54_515_587
    assert official.tokenizer_config_from_shapes(params) == dict(
        codebook_size=1024, embedding_dim=256, filters=128, num_res_blocks=2,
        channel_multipliers=(1, 1, 2, 2, 4), image_channels=3)
    assert params["encoder"]["ResBlock_8"]["Conv_2"]["kernel"].shape == (1, 1, 512, 512)
