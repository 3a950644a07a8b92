"""notebooks/inpainting.ipynb runs top to bottom against a small checkpoint built here.

The checkpoint has the default job's layout with narrow, randomly initialised
networks (`editing_bundle.save_small_checkpoint`), so the notebook exercises
`maskgen.load` and every editing call.
"""
import os

import nbformat
import pytest
from editing_bundle import REPO, save_small_checkpoint
from nbclient import NotebookClient

NOTEBOOK = REPO / "notebooks" / "inpainting.ipynb"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_small_checkpoint(tmp_path_factory.mktemp("notebook") / "fashion_mnist")


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
    assert "checkpoint steps: {'tokenizer': 1, 'transformer': 1}" in text
    figures = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(figures) == 5  # input, mask, inpainting, outpainting, class edit
