"""What both stages do before their first step: check the batch, restore or initialise, jit.

A stage supplies its models, `init` function and step; this module turns them
into sharded state (the latest readable checkpoint when there is one, else a
fresh initialisation from the stage's named PRNG purpose), the checkpoint
manager and the jitted, donated step, the same way for every stage.
"""
import dataclasses
import logging
import os
from typing import Any, Callable, Optional

import ml_collections
from jax.sharding import Mesh

from maskgen import checkpoint as ckpt_lib
from maskgen import prng
from maskgen import sharding as shd
from maskgen.training import iterators, rng, train_state

log = logging.getLogger(__name__)


def check_batch_divisible(stage: str, batch: int, mesh: Mesh) -> None:
    """A global batch must split evenly over the mesh's data x fsdp devices."""
    divisor = shd.batch_divisor(mesh)
    if batch % divisor:
        raise ValueError(f"{stage} batch_size {batch} is not divisible by the {divisor} devices of the "
                         "mesh's data x fsdp axes")


@dataclasses.dataclass
class StageStart:
    """A stage's state at the start of this run and where it came from."""
    state: train_state.TrainState  # sharded on the mesh
    shardings: Any  # TrainState of NamedShardings, for jitting the step
    checkpoints: ckpt_lib.StageCheckpoints
    data_state: Optional[dict]  # the saved input position, None for a fresh start
    resumed_step: Optional[int]  # None for a fresh start

    def resume_iterator(self, data_iter: Any) -> None:
        """Moves `data_iter` to the position saved with the restored state (no-op on a fresh start)."""
        if self.data_state is not None:
            data_iter.set_state(iterators.local_state(self.data_state))


def restore_or_init(stage: str, cfg: ml_collections.ConfigDict, workdir: str, init: Callable, mesh: Mesh,
                    rules: Any) -> StageStart:
    """The stage's latest readable checkpoint in WORKDIR/<stage>, else a fresh state.

    `init(key) -> boxed TrainState`; a fresh state uses the key of the PRNG
    purpose `<stage>_init`.
    """
    abstract, shardings = train_state.abstract_and_shardings(init, mesh, rules)
    # Every step carries `cfg`: the workdir stays loadable by the config its steps were written with.
    checkpoints = ckpt_lib.StageCheckpoints(os.path.join(workdir, stage), keep=cfg.keep_checkpoints, config=cfg)
    restored = checkpoints.restore(train_state.sharded_abstract(abstract, shardings).to_tree())
    if restored is None:
        key = rng.key(cfg.seed, f"{stage}_init", cfg.get("prng_impl", prng.DEFAULT))
        state = train_state.materialize(init, key, shardings)
        return StageStart(state, shardings, checkpoints, None, None)
    tree, data_state, step = restored
    log.info("%s: resumed from step %d", stage, step)
    return StageStart(train_state.TrainState.from_tree(tree), shardings, checkpoints, data_state, step)


def with_key(step_fn: Callable, seed: int, purpose: str, prng_impl: str = prng.DEFAULT) -> Callable:
    """step(state, batch) calling step_fn(state, batch, key) with a key made inside the program.

    The key is a compile-time constant, so nothing is transferred per step and
    multi-process runs need no replicated key array.
    """
    def step(state: Any, batch: Any) -> Any:
        return step_fn(state, batch, rng.key(seed, purpose, prng_impl))
    return step


def jit_step(stage: str, step_fn: Callable, seed: int, shardings: Any, batch_shardings: Any,
             mesh: Mesh, prng_impl: str = prng.DEFAULT) -> Callable:
    """The stage's step jitted over the mesh with its state donated; metrics come back replicated."""
    return shd.jit_sharded(with_key(step_fn, seed, f"{stage}_step", prng_impl), (shardings, batch_shardings),
                           (shardings, shd.replicated(mesh)), donate_argnums=(0,))
