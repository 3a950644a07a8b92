"""The default job, shortened: real Fashion-MNIST (300 images), tiny networks, a few steps per stage.

Runs train.py (data preparation, tokenizer, pre-tokenisation, transformer, end-of-training quality
report) and sample.py as a user would, and checks what they wrote.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.slow  # end to end: subprocesses that train or sample

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SHRINK = [
    "--config.dataset.max_examples=300", "--config.quality_train_examples=300",
    "--config.quality_classifier_epochs=1", "--config.eval_num_samples=20",
    "--config.tokenizer.filters=8", "--config.tokenizer.codebook_size=32", "--config.tokenizer.embedding_dim=8",
    "--config.tokenizer.norm_groups=4", "--config.transformer.num_layers=1", "--config.transformer.hidden_size=32",
    "--config.transformer.num_heads=2", "--config.transformer.mlp_dim=64", "--config.sampling.steps=4",
    "--config.tokenizer_train.num_train_steps=4", "--config.tokenizer_train.batch_size=16",
    "--config.decoder_train.num_train_steps=4", "--config.decoder_train.batch_size=16",
    "--config.transformer_train.num_train_steps=4", "--config.transformer_train.batch_size=16",
    "--config.checkpoint_every_steps=2", "--config.log_every_steps=2", "--config.sample_every_steps=0",
]


def _run(script, *args, data_dir):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, os.path.join(REPO, script), *args], env=env, capture_output=True,
                          text=True, timeout=900, cwd=data_dir)


def test_shortened_default_job_trains_samples_and_measures(tmp_path):
    workdir = tmp_path / "fm"
    data_dir = tmp_path / "tfds"
    train = _run("train.py", "--config=" + os.path.join(REPO, "configs", "fashion_mnist.py"),
                 f"--workdir={workdir}", f"--config.dataset.data_dir={data_dir}", *SHRINK, data_dir=tmp_path)
    assert train.returncode == 0, train.stderr[-4000:]
    assert "quality.json" in train.stdout and "class accuracy" in train.stdout

    report = json.loads((workdir / "quality.json").read_text())
    assert report["num_samples"] == 20 and report["step"] == 4
    for key in ("class_accuracy", "real_test_accuracy"):
        assert 0.0 <= report[key] <= 1.0
    assert report["frechet"] > 0 and report["frechet_floor"] > 0
    assert np.isfinite(report["reconstruction_psnr"]) and report["reconstruction_mse"] > 0
    assert report["reconstruction_frechet"] > 0
    assert 0 < report["codebook_usage"] <= 1 and 1 <= report["codebook_perplexity"] <= 32
    assert (workdir / "transformer" / "eval" / "step_00000004.json").exists()
    assert sorted(d for d in os.listdir(workdir / "transformer") if d.isdigit()) == ["2", "4"]

    sample = _run("sample.py", f"--workdir={workdir}", "--classes=0,1,2,3,4,5,6,7,8,9", "--per_class=2",
                  "--seed=0", f"--out={tmp_path / 'out'}", data_dir=tmp_path)
    assert sample.returncode == 0, sample.stderr[-4000:]
    with np.load(tmp_path / "out" / "samples.npz") as s:
        assert s["images"].shape == (20, 28, 28, 1) and s["images"].dtype == np.uint8
        np.testing.assert_array_equal(s["labels"], np.repeat(np.arange(10), 2))
        assert s["tokens"].shape == (20, 7, 7)
    grid = np.asarray(Image.open(tmp_path / "out" / "grid.png"))
    assert grid.ndim == 2 and grid.shape[0] > grid.shape[1]  # 10 rows of 2 samples
