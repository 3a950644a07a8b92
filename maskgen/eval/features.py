"""Runs a network over a large host array in fixed-size batches sharded over all devices.

Evaluation networks (Inception, the Fashion-MNIST classifier) see tens of
thousands of images; each batch is split along a 1-D `data` mesh so every
device takes its share, parameters are replicated, and one compiled program
serves every batch (the last batch is padded to the same shape).
"""
import functools
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from numpy.typing import ArrayLike
from tqdm.auto import tqdm

DATA_AXIS = "data"


def data_mesh(devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """A 1-D mesh over `devices` (default: all) with the single axis `data`."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (DATA_AXIS,))


@functools.lru_cache(maxsize=32)
def sharded_step(apply_fn: Callable, mesh: Mesh) -> Callable:
    """jit of apply_fn(params, batch): params replicated, batch and outputs split on `data`.

    Cached per (function, mesh) so repeated evaluations reuse one compilation;
    pass a module-level function, not a fresh closure, to benefit.
    """
    batch_sharding = NamedSharding(mesh, PartitionSpec(DATA_AXIS))
    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(apply_fn, in_shardings=(replicated, batch_sharding), out_shardings=batch_sharding)


def batched_apply(apply_fn: Callable, params: Any, inputs: ArrayLike, batch_size: int,
                  mesh: Optional[Mesh] = None, progress: bool = True, desc: str = "features") -> Any:
    """apply_fn(params, batch) over `inputs` [N, ...] -> its output pytree with N rows, on host.

    `batch_size` is rounded up to a multiple of the device count. Batch n+1 is
    dispatched before batch n is fetched, so the host copy overlaps compute.
    """
    inputs = np.asarray(inputs)
    if inputs.ndim < 1 or inputs.shape[0] == 0:
        raise ValueError(f"inputs must be a non-empty [N, ...] array, got shape {inputs.shape}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    mesh = data_mesh() if mesh is None else mesh
    num_devices = mesh.devices.size
    batch_size = -(-batch_size // num_devices) * num_devices
    batch_size = min(batch_size, -(-inputs.shape[0] // num_devices) * num_devices)
    batch_sharding = NamedSharding(mesh, PartitionSpec(DATA_AXIS))
    params = jax.device_put(params, NamedSharding(mesh, PartitionSpec()))
    step = sharded_step(apply_fn, mesh)

    total = inputs.shape[0]
    outputs, pending = [], None
    with tqdm(total=total, desc=desc, unit="img", disable=not progress) as bar:
        for start in range(0, total, batch_size):
            batch = inputs[start:start + batch_size]
            valid = batch.shape[0]
            if valid < batch_size:
                batch = np.concatenate([batch, np.zeros((batch_size - valid,) + batch.shape[1:], batch.dtype)])
            result = step(params, jax.device_put(batch, batch_sharding))
            if pending is not None:
                outputs.append(_fetch(*pending))
                bar.update(pending[1])
            pending = (result, valid)
        outputs.append(_fetch(*pending))
        bar.update(pending[1])
    return jax.tree.map(lambda *parts: np.concatenate(parts), *outputs)


def _fetch(result: Any, valid: int) -> Any:
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x))[:valid], result)
