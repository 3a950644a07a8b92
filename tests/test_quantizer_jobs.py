"""The debug job end to end with each quantizer: both stages train, the tokens the transformer learns
are the quantizer's ids, sample.py decodes them, and the test-split code usage is what the ids say.

vq runs with every vq option at once (k-means init, dead-code restart, low-dim lookup).
Training runs in-process (one JAX start for all three), sample.py as a user runs it.
"""
import glob
import json
import os
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import maskgen
from maskgen import config_io
from maskgen.models import quantizers
from maskgen.models.sizes import code_count
from maskgen.training import quality, trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("fast_compile")]

JOBS = {
    "vq": dict(tokenizer=dict(quantizer="vq", vq_lookup_dim=4),
               tokenizer_train=dict(vq_init="kmeans", vq_kmeans_batches=2, vq_restart_threshold=0.5)),
    "fsq": dict(tokenizer=dict(quantizer="fsq", fsq_levels=(5, 3, 3))),
    "lfq": dict(tokenizer=dict(quantizer="lfq", lfq_bits=6, entropy_loss_ratio=0.1)),
}


def _cfg(job):
    cfg = config_io.load_config_file(os.path.join(REPO, "configs/debug.py"))
    cfg.dataset.synthetic_examples = 64
    cfg.tokenizer_train.gan_weight = 0.0  # the discriminator is the same for every quantizer
    for block, values in JOBS[job].items():
        cfg[block].update(values)
    return cfg


@pytest.mark.parametrize("job", sorted(JOBS))
def test_debug_job_with_each_quantizer_trains_tokenizes_and_samples(job, tmp_path):
    cfg, workdir = _cfg(job), tmp_path / job
    num_codes = code_count(cfg.tokenizer)
    assert num_codes == {"vq": 32, "fsq": 45, "lfq": 64}[job]
    trainer.train_and_evaluate(cfg, str(workdir))

    tok = ocp.CheckpointManager(workdir / "tokenizer").restore(4)["state"]
    assert int(tok["step"]) == 4
    if job == "vq":
        assert tok["params"]["quantizer"]["codebook"].shape == (32, 4)
        assert tok["code_usage"].shape == (32,) and np.all(np.isfinite(tok["code_usage"]))
    else:
        assert "code_usage" not in tok
    with np.load(glob.glob(str(workdir / "token_cache" / "*.npz"))[0]) as cache:
        tokens = cache["tokens"]
    assert tokens.min() >= 0 and tokens.max() < num_codes
    tf = ocp.CheckpointManager(workdir / "transformer").restore(4)["state"]
    vocab = num_codes + cfg.num_classes + 1 + 1  # codes, classes, null class, mask
    assert any(np.shape(leaf)[0] == vocab for leaf in jax.tree.leaves(tf["params"]) if np.ndim(leaf) == 2)

    bundle = maskgen.load(str(workdir))
    assert bundle.layout.codebook_size == num_codes == bundle.tokenizer.num_codes
    images = (np.random.default_rng(0).random((12, 16, 16, 3)) * 255).astype(np.uint8)
    ids = np.asarray(bundle.tokenizer.apply({"params": bundle.params["tokenizer"]},
                                            images.astype(np.float32) / 255.0, method="encode_to_indices"))
    usage = quality.code_usage(bundle, images, batch_size=5)
    assert usage["codebook_usage"] == pytest.approx(len(np.unique(ids)) / num_codes)
    expect = quantizers.usage_stats(np.bincount(ids.reshape(-1), minlength=num_codes))
    assert usage["codebook_perplexity"] == pytest.approx(float(expect["perplexity"]), rel=1e-5)

    env = dict(os.environ, PYTHONPATH=REPO, JAX_DISABLE_MOST_OPTIMIZATIONS="1",
               XLA_FLAGS="--xla_force_host_platform_device_count=1")
    out = tmp_path / "out"
    sample = subprocess.run([sys.executable, os.path.join(REPO, "sample.py"), f"--workdir={workdir}",
                             "--classes=0,3", "--per_class=2", "--seed=0", f"--out={out}"],
                            env=env, capture_output=True, text=True, timeout=300)
    assert sample.returncode == 0, sample.stderr[-3000:]
    with np.load(out / "samples.npz") as s:
        assert s["images"].shape == (4, 16, 16, 3) and s["images"].dtype == np.uint8
        assert s["tokens"].shape == (4, 4, 4) and s["tokens"].max() < num_codes
    assert json.loads((workdir / "config.json").read_text())["tokenizer"]["quantizer"] == job
