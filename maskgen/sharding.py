"""Device mesh, logical-axis rules, and the shardings of state and batches.

Models only *name* their parameter axes (`maskgen.axes`); this module decides
where those names live on a `(data, fsdp, tensor)` mesh:

* `RULES` maps each logical name to an ordered list of candidate mesh axes
  (a candidate may be a tuple of axes, sharding one dimension over several).
* `resolve_spec` turns a parameter's logical names and shape into a mesh
  `PartitionSpec`. Dimensions are visited from the largest down, so FSDP lands
  on the largest dimension that can take it; a candidate is skipped when one
  of its axes is already used by the array or does not divide the dimension
  (e.g. a 2025-row vocabulary on 4 fsdp devices stays whole and the embedding
  width is sharded instead). Mesh axes of size 1 are dropped, so a spec says
  only what is really split.
* Batches are split over (data, fsdp) on their leading dimension.
* Activations: the models mark a few of them with logical names
  (`axes.constrain`, e.g. the residual stream as (batch, length, embed)). Inside a
  function compiled by `jit_sharded` (or under `activation_sharding`) each mark
  becomes a `with_sharding_constraint` resolved with `ACTIVATION_RULES` (batch
  over data x fsdp, heads and MLP features over tensor, the width whole: FSDP
  shards weights, not the residual stream); elsewhere it is the identity, so
  single-device code and tests see no mesh.

Parameter rules can be overridden from a config (`cfg.sharding_rules`, a dict
of logical name -> list of mesh axes or lists of axes).
"""
import contextlib
import functools
import math
from typing import Any, Callable, Dict, Iterator, Mapping, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from maskgen import axes

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# logical name -> candidate mesh axes, tried in order.
RULES: Dict[str, Tuple[Any, ...]] = {
    axes.BATCH: (BATCH_AXES,),
    axes.LENGTH: (),
    axes.EMBED: ("fsdp",),
    axes.MLP: ("tensor", "fsdp"),
    axes.HEADS: ("tensor",),
    axes.HEAD_DIM: (),
    axes.VOCAB: ("fsdp",),
    axes.POSITIONS: (),
    axes.NORM: (),
    axes.CONV_H: (),
    axes.CONV_W: (),
    axes.CONV_IN: ("fsdp",),
    axes.CONV_OUT: ("tensor", "fsdp"),
    axes.CODEBOOK: ("fsdp",),
    axes.CODE_DIM: (),
}

# Activations: logical name -> candidate mesh axes. Visited in the array's own
# dimension order (batch first), unlike parameters (largest dimension first).
ACTIVATION_RULES: Dict[str, Tuple[Any, ...]] = {
    axes.BATCH: (BATCH_AXES, "data", "fsdp"),
    axes.LENGTH: (),
    axes.EMBED: (),
    axes.MLP: ("tensor",),
    axes.HEADS: ("tensor",),
    axes.HEAD_DIM: (),
    axes.VOCAB: (),
}


def mesh_shape(mesh_cfg: Mapping[str, int], num_devices: int) -> Tuple[int, int, int]:
    """(data, fsdp, tensor) sizes; one entry may be -1 and is filled from the device count."""
    sizes = [int(mesh_cfg.get(name, 1)) for name in MESH_AXES]
    unknown = [i for i, s in enumerate(sizes) if s == -1]
    if len(unknown) > 1:
        raise ValueError(f"mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh: axis sizes must be positive or -1, got {dict(zip(MESH_AXES, sizes))}")
    known = math.prod(s for s in sizes if s != -1)
    if unknown:
        if num_devices % known:
            raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))}: {num_devices} devices are not "
                             f"divisible by the fixed axes' product {known}")
        sizes[unknown[0]] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
                         f"but {num_devices} are available")
    return tuple(sizes)


def make_mesh(mesh_cfg: Mapping[str, int], devices: Optional[Sequence[Any]] = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: all), axes of Auto type."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(mesh_cfg, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                         devices=devices)


def rules_from_config(overrides: Optional[Mapping[str, Any]] = None) -> Dict[str, Tuple[Any, ...]]:
    """The default rule table with `overrides` (name -> candidates) applied."""
    rules = dict(RULES)
    for name, candidates in dict(overrides or {}).items():
        if isinstance(candidates, str):
            candidates = (candidates,)
        fixed = []
        for cand in candidates or ():
            cand_axes = (cand,) if isinstance(cand, str) else tuple(cand)
            bad = [a for a in cand_axes if a not in MESH_AXES]
            if bad:
                raise ValueError(f"sharding rule {name!r}: unknown mesh axis {bad[0]!r} "
                                 f"(mesh axes are {MESH_AXES})")
            fixed.append(cand if isinstance(cand, str) else cand_axes)
        rules[name] = tuple(fixed)
    return rules


def _candidate_axes(candidate: Any) -> Tuple[str, ...]:
    return (candidate,) if isinstance(candidate, str) else tuple(candidate)


def resolve_spec(logical: Sequence[Optional[str]], shape: Sequence[int], mesh: Mesh,
                 rules: Mapping[str, Sequence[Any]] = RULES, largest_first: bool = True) -> PartitionSpec:
    """Mesh PartitionSpec for an array with logical axis names `logical` and `shape`.

    `largest_first` visits dimensions from the largest down (parameters: FSDP on
    the biggest one); False visits them in order (activations: batch first).
    """
    logical = tuple(logical)
    if len(logical) != len(shape):
        raise ValueError(f"logical axes {logical} do not match shape {tuple(shape)}")
    sizes = dict(mesh.shape)
    assigned: list = [None] * len(shape)
    used: set = set()
    order = list(range(len(shape)))
    if largest_first:
        order.sort(key=lambda i: -shape[i])  # stable: ties keep their order
    for i in order:
        name = logical[i]
        if name is None:
            continue
        if name not in rules:
            raise ValueError(f"no sharding rule for logical axis {name!r}; known: {sorted(rules)}")
        for candidate in rules[name]:
            cand = tuple(a for a in _candidate_axes(candidate) if sizes.get(a, 1) > 1)
            if not cand or used.intersection(cand):
                continue
            if shape[i] % math.prod(sizes[a] for a in cand):
                continue
            assigned[i] = cand[0] if len(cand) == 1 else cand
            used.update(cand)
            break
    return PartitionSpec(*assigned)


def _is_spec(x: Any) -> bool:
    return isinstance(x, PartitionSpec)


def logical_specs(boxed_tree: Any) -> Any:
    """Logical PartitionSpecs of a tree holding flax `LogicallyPartitioned` boxes (P() elsewhere)."""
    return nn.get_partition_spec(boxed_tree)


def tree_shardings(logical_tree: Any, abstract_tree: Any, mesh: Mesh,
                   rules: Mapping[str, Sequence[Any]] = RULES) -> Any:
    """NamedShardings for `abstract_tree` (unboxed shapes) from matching logical specs."""
    def one(spec: PartitionSpec, leaf: Any) -> NamedSharding:
        return NamedSharding(mesh, resolve_spec(tuple(spec), leaf.shape, mesh, rules))
    return jax.tree.map(one, logical_tree, abstract_tree, is_leaf=_is_spec)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
    """Leading (batch) dimension over (data, fsdp), the rest whole."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *([None] * (ndim - 1))))


def batch_shardings(mesh: Mesh, batch: Any) -> Any:
    return jax.tree.map(lambda x: batch_sharding(mesh, np.ndim(x)), batch)


def batch_divisor(mesh: Mesh) -> int:
    """The global batch must be a multiple of this (devices on the batch axes)."""
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def global_batch(local_batch: int, mesh: Mesh) -> Any:
    """Assembles each process's slice into global arrays sharded over the batch axes.

    Every process passes its own `local_batch` (leading dimension = global batch /
    process count); with one process this is a plain sharded device_put.
    """
    def one(x: np.ndarray) -> jax.Array:
        x = np.asarray(x)
        sharding = batch_sharding(mesh, x.ndim)
        global_shape = (x.shape[0] * jax.process_count(),) + x.shape[1:]
        return jax.make_array_from_process_local_data(sharding, x, global_shape)
    return jax.tree.map(one, local_batch)


def describe(tree_of_shardings: Any) -> Dict[str, str]:
    """'path' -> PartitionSpec string, for logs and tests."""
    flat, _ = jax.tree_util.tree_flatten_with_path(
        tree_of_shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
    return {jax.tree_util.keystr(path): str(s.spec) for path, s in flat}


class _Pin:
    """Turns an activation mark into a sharding constraint on `mesh` (`axes.pinning` holds it)."""

    def __init__(self, mesh: Mesh, rules: Mapping[str, Sequence[Any]]) -> None:
        self.mesh, self.rules = mesh, rules

    def spec(self, logical: Sequence[Optional[str]], shape: Sequence[int]) -> PartitionSpec:
        return resolve_spec(logical, shape, self.mesh, self.rules, largest_first=False)

    def __call__(self, x: jax.Array, logical: Sequence[Optional[str]]) -> jax.Array:
        if self.mesh.size == 1:
            return x
        return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, self.spec(logical, x.shape)))


@contextlib.contextmanager
def activation_sharding(mesh: Optional[Mesh],
                        rules: Mapping[str, Sequence[Any]] = ACTIVATION_RULES) -> Iterator[None]:
    """While tracing inside this context, the models' `axes.constrain` marks pin activations on `mesh`.

    A context variable rather than flax's `logical_axis_rules` + a global mesh:
    under those, flax re-checks DenseGeneral's 3-axis kernel names against its
    flat 2-D init and fails. None turns the marks off.
    """
    with axes.pinning(None if mesh is None else _Pin(mesh, rules)):
        yield


def activation_spec(logical: Sequence[Optional[str]], shape: Sequence[int]) -> Optional[PartitionSpec]:
    """The spec a mark gets now (None outside `activation_sharding`)."""
    pin = axes.active_pin()
    return pin.spec(logical, shape) if isinstance(pin, _Pin) else None


def mesh_of(shardings: Any) -> Optional[Mesh]:
    """The mesh of the first NamedSharding in a tree (None if there is none)."""
    for leaf in jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding)):
        if isinstance(leaf, NamedSharding):
            return leaf.mesh
    return None


def jit_sharded(fn: Callable, in_shardings: Any, out_shardings: Any, donate_argnums: int | Sequence[int] = (),
                activation_rules: Mapping[str, Sequence[Any]] = ACTIVATION_RULES) -> Callable:
    """`jax.jit` with explicit in/out shardings (and donation) and live activation constraints.

    `fn` is traced under `activation_sharding(mesh of in_shardings)`, so the
    models' `constrain` marks become sharding constraints of the compiled step.
    """
    mesh = mesh_of(in_shardings)

    @functools.wraps(fn)
    def traced(*args: Any, **kwargs: Any) -> Any:
        with activation_sharding(mesh, activation_rules):
            return fn(*args, **kwargs)

    return jax.jit(traced, in_shardings=in_shardings, out_shardings=out_shardings,
                   donate_argnums=donate_argnums)


def local_rows(global_array: jax.Array) -> np.ndarray:
    """This process's rows of a batch-sharded array, in order (inverse of `global_batch`)."""
    shards = {}
    for shard in global_array.addressable_shards:
        start = shard.index[0].start or 0
        shards.setdefault(start, shard)
    return np.concatenate([np.asarray(shards[k].data) for k in sorted(shards)], axis=0)
