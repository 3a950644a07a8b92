"""sample.py end to end on a saved checkpoint: files, array keys/shapes, batch-size independence, errors."""
import os
import subprocess
import sys

import numpy as np
import pytest
from editing_bundle import REPO, save_small_checkpoint
from PIL import Image

pytestmark = pytest.mark.slow  # end to end: subprocesses that train or sample


def _run(workdir, out, *args):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, str(REPO / "sample.py"), f"--workdir={workdir}", f"--out={out}",
                           "--seed=0", *args], env=env, capture_output=True, text=True, timeout=600)


def test_sample_py_writes_grid_and_npz_independent_of_batch_size(tmp_path):
    workdir = save_small_checkpoint(tmp_path / "run")
    a = _run(workdir, tmp_path / "a", "--classes=0,1,2", "--per_class=2", "--steps=4", "--guidance=2.0")
    assert a.returncode == 0, a.stderr[-3000:]
    assert "images/s" in a.stdout
    b = _run(workdir, tmp_path / "b", "--classes=0,1,2", "--per_class=2", "--steps=4", "--guidance=2.0",
             "--batch_size=4")
    assert b.returncode == 0, b.stderr[-3000:]
    with np.load(tmp_path / "a" / "samples.npz") as sa, np.load(tmp_path / "b" / "samples.npz") as sb:
        assert sa["images"].shape == (6, 28, 28, 1) and sa["images"].dtype == np.uint8
        assert sa["tokens"].shape == (6, 7, 7) and sa["tokens"].max() < 32
        np.testing.assert_array_equal(sa["labels"], [0, 0, 1, 1, 2, 2])
        np.testing.assert_array_equal(sa["tokens"], sb["tokens"])  # batch 6 vs batches of 4
        # Pixels: same tokens; XLA may tile the decoder's convs differently per batch size (<= 1 level).
        assert np.abs(sa["images"].astype(int) - sb["images"].astype(int)).max() <= 1
    grid = np.asarray(Image.open(tmp_path / "a" / "grid.png"))
    assert grid.shape[0] > grid.shape[1] / 2 * 3 / 4  # 3 rows of 2 columns, enlarged
    bad = _run(workdir, tmp_path / "c", "--classes=0,10", "--per_class=1")  # 10 is the null class
    assert bad.returncode != 0 and "class id 10 out of range" in bad.stderr
    assert not (tmp_path / "c").exists()
