"""`python -m maskgen.eval --metric fashion`: table, JSON, and the library's numbers."""
import json

import numpy as np
import pytest

from maskgen.data import load_fashion_mnist_idx
from maskgen.eval import __main__ as cli
from maskgen.eval import classifier, fashion


def test_fashion_cli_matches_library(tmp_path, capsys):
    test_x, test_y = load_fashion_mnist_idx("test")
    samples = tmp_path / "samples.npz"
    np.savez(samples, images=test_x[:300], labels=test_y[:300])
    out = tmp_path / "report.json"
    cli.main(["--samples", str(samples), "--metric", "fashion", "--cache_dir", str(tmp_path / "cache"),
              "--train_examples", "2000", "--epochs", "2", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "class_accuracy" in printed and "per_class_accuracy[9]" in printed
    report = json.loads(out.read_text())
    train_x, train_y = load_fashion_mnist_idx("train")
    direct = fashion.fashion_quality(test_x[:300], test_y[:300], tmp_path / "cache",
                                     train=(train_x[:2000], train_y[:2000]), test=(test_x, test_y),
                                     config=classifier.TrainConfig(epochs=2), progress=False)
    assert report.pop("per_class_accuracy") == pytest.approx(direct.pop("per_class_accuracy"))
    assert report == pytest.approx(direct)
    assert report["real_test_accuracy"] > 0.6


def test_cli_rejects_incomplete_arguments(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main(["--samples", "x.npz", "--metric", "fid", "--ref_stats", "r.npz"])
    assert "--inception" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["--samples", "x.npz", "--metric", "fashion"])
    assert "--cache_dir" in capsys.readouterr().err
    samples = tmp_path / "no_labels.npz"
    np.savez(samples, images=np.zeros((4, 28, 28), np.uint8))
    with pytest.raises(ValueError, match="labels"):
        cli.main(["--samples", str(samples), "--metric", "fashion", "--cache_dir", str(tmp_path)])
