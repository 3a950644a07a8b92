"""notebooks/inpainting.ipynb runs top to bottom against a small checkpoint built here.

The checkpoint has the default job's layout (Fashion-MNIST config, 28x28x1 images,
7x7 tokens) with narrow, randomly initialised networks, saved the way training
saves it, so the notebook exercises `maskgen.load` and every editing call.
"""
import os
import pathlib

import jax.numpy as jnp
import nbformat
import pytest
from nbclient import NotebookClient

from editing_bundle import random_params
from maskgen import builders
from maskgen import checkpoint as ckpt_lib
from maskgen import config_io
from maskgen.models.layout import seq_len

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "inpainting.ipynb"


def _save(stage_dir, params):
    ckpt = ckpt_lib.StageCheckpoints(str(stage_dir))
    ckpt.save(1, {"step": jnp.int32(1), "params": params, "ema_params": params},
              {"kind": "sampler", "position": 1})
    ckpt.wait()
    ckpt.close()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    cfg = config_io.load_config_file(str(REPO / "configs" / "fashion_mnist.py"))
    cfg.tokenizer.update(dict(codebook_size=32, embedding_dim=8, filters=8, norm_groups=4))
    cfg.transformer.update(dict(num_layers=1, hidden_size=32, num_heads=2, mlp_dim=64))
    cfg.sampling.steps = 4
    root = tmp_path_factory.mktemp("notebook") / "fashion_mnist"
    config_io.write_config(cfg, str(root))
    size, channels = int(cfg.image_size), int(cfg.image_channels)
    _save(root / "tokenizer", random_params(builders.tokenizer_model(cfg),
                                            jnp.zeros((1, size, size, channels)), seed=0))
    _save(root / "transformer", random_params(builders.transformer_model(cfg),
                                              jnp.zeros((1, seq_len(cfg)), jnp.int32), seed=1))
    return root


def test_notebook_runs_top_to_bottom(checkpoint, monkeypatch):
    monkeypatch.setenv("MASKGEN_CHECKPOINT", str(checkpoint))
    monkeypatch.setenv("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")  # compile time dominates here
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO),
                                                                   os.environ.get("PYTHONPATH")])))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(notebook, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert f"{checkpoint}: 28x28x1 images, 7x7 tokens (4x4 pixels each), 10 classes" in text
    figures = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(figures) == 5  # input, mask, inpainting, outpainting, class edit
