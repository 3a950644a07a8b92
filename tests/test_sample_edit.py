"""sample.py --edit end to end (a subprocess on a saved checkpoint): the lead's flag wiring + edit_cli."""
import os
import subprocess
import sys

import numpy as np
import pytest
from editing_bundle import REPO, sample_image, save_small_checkpoint
from PIL import Image

pytestmark = pytest.mark.slow  # end to end: subprocesses that train or sample


def test_sample_py_edit_end_to_end(tmp_path):
    """sample.py --edit on a saved checkpoint: files on success; exit != 0 and nothing on bad input."""
    workdir = save_small_checkpoint(tmp_path / "run")
    Image.fromarray(sample_image(2, (28, 28))).save(tmp_path / "in.png")
    env = dict(os.environ, JAX_DISABLE_MOST_OPTIMIZATIONS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))

    def sample(*args):
        return subprocess.run([sys.executable, str(REPO / "sample.py"), f"--workdir={workdir}",
                               f"--image={tmp_path / 'in.png'}", *args], env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=300)

    done = sample("--edit=inpaint", "--box=8,8,8,8", "--class_id=4", f"--out={tmp_path / 'ok'}")
    assert done.returncode == 0, done.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "ok").iterdir()) == ["before_after.png", "edit.npz"]
    with np.load(tmp_path / "ok" / "edit.npz") as saved:
        assert saved["image"].shape == (28, 28, 1) and saved["tokens_after"].shape == (7, 7)
    bad = sample("--edit=inpaint", "--box=20,20,9,4", "--class_id=4", f"--out={tmp_path / 'bad'}")
    assert bad.returncode != 0 and "does not fit inside the 28x28 image" in bad.stderr
    assert not (tmp_path / "bad").exists()
