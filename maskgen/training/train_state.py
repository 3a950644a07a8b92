"""The train state and its abstract-first, already-sharded construction.

`TrainState` is what a checkpoint holds (see `maskgen.checkpoint` for the saved
tree). Construction never materialises parameters on one device: the init
function is traced with `jax.eval_shape`, its flax logical-axis boxes are
turned into NamedShardings by `maskgen.sharding`, and `jax.jit(init,
out_shardings=...)` writes every array straight into its shards.
"""
from typing import Any, Callable, Dict, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from maskgen import sharding as shd


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 [], optimizer steps taken
    params: Any  # the model's `params` collection
    ema_params: Any  # exponential moving average of `params` (sampling, evaluation)
    opt_state: Any
    # Tokenizer stage only: discriminator params/opt state and LeCam EMAs; {} otherwise.
    extra: Dict[str, Any] = flax.struct.field(default_factory=dict)

    def to_tree(self) -> Dict[str, Any]:
        """The checkpoint tree: step, params, ema_params, opt_state (+ extra entries)."""
        tree = dict(step=self.step, params=self.params, ema_params=self.ema_params,
                    opt_state=self.opt_state)
        tree.update(self.extra)
        return tree

    @classmethod
    def from_tree(cls, tree: Dict[str, Any]) -> "TrainState":
        base = ("step", "params", "ema_params", "opt_state")
        return cls(step=tree["step"], params=tree["params"], ema_params=tree["ema_params"],
                   opt_state=tree["opt_state"], extra={k: v for k, v in tree.items() if k not in base})


def new_state(params: Any, tx: Any, extra: Optional[Dict[str, Any]] = None) -> TrainState:
    """A fresh state: step 0, EMA = params, optimizer state of `tx`."""
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      ema_params=jax.tree.map(jnp.copy, params),
                      opt_state=tx.init(params), extra=dict(extra or {}))


def abstract_and_shardings(init_fn: Callable[[jax.Array], Any], mesh: jax.sharding.Mesh,
                           rules: Any = shd.RULES) -> tuple[Any, Any]:
    """(unboxed abstract state, NamedSharding tree) of `init_fn(key)` without computing it."""
    boxed = jax.eval_shape(init_fn, jax.random.key(0))
    abstract = nn.meta.unbox(boxed)
    shardings = shd.tree_shardings(shd.logical_specs(boxed), abstract, mesh, rules)
    return abstract, shardings


def sharded_abstract(abstract: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying their shardings (restore targets, AOT compilation)."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract, shardings)


def materialize(init_fn: Callable[[jax.Array], Any], key: jax.Array, shardings: Any) -> Any:
    """Runs `init_fn(key)` under jit so every array is created directly in its shards."""
    return jax.jit(lambda k: nn.meta.unbox(init_fn(k)), out_shardings=shardings)(key)


def init_sharded(init_fn: Callable[[jax.Array], Any], key: jax.Array, mesh: jax.sharding.Mesh,
                 rules: Any = shd.RULES) -> tuple[Any, Any, Any]:
    """(state, shardings, abstract): `abstract_and_shardings` then `materialize`."""
    abstract, shardings = abstract_and_shardings(init_fn, mesh, rules)
    return materialize(init_fn, key, shardings), shardings, abstract
