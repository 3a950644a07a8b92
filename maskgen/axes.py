"""Logical axis names: the only place these strings are spelled.

Models annotate every parameter with these names; `maskgen.sharding` maps them
onto mesh axes with a rule table, so no model file knows about meshes. Models
also mark activations (`constrain`); `maskgen.sharding` binds the marks to a mesh.
"""
import contextlib
import contextvars
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Optional

BATCH = "batch"
LENGTH = "length"  # token sequence
EMBED = "embed"  # transformer width
MLP = "mlp"  # transformer MLP hidden
HEADS = "heads"
HEAD_DIM = "kv"  # per-head feature size
VOCAB = "vocab"  # word-embedding rows (codebook + classes + mask)
POSITIONS = "positions"  # position-embedding rows
NORM = "norm"  # LayerNorm / GroupNorm scale and bias
# Convolutional tokenizer / discriminator.
CONV_H = "conv_height"
CONV_W = "conv_width"
CONV_IN = "conv_in"
CONV_OUT = "conv_out"
CODEBOOK = "codebook"
CODE_DIM = "code_dim"


# Activation marks. Models call `constrain(x, names)`; `maskgen.sharding.activation_sharding`
# installs the function that turns a mark into a sharding constraint on its mesh. Without one
# (single-device code, tests, decoding outside a mesh) a mark is the identity. The indirection
# keeps models free of meshes: they name axes, sharding decides where they live.
_PIN = contextvars.ContextVar("maskgen_activation_pin", default=None)


def constrain(x: Any, names: Sequence[Optional[str]]) -> Any:
    """`x` with its logical axis names applied by the active pinning function (identity if none)."""
    pin = _PIN.get()
    return x if pin is None else pin(x, tuple(names))


def active_pin() -> Optional[Callable]:
    return _PIN.get()


@contextlib.contextmanager
def pinning(pin: Optional[Callable]) -> Iterator[None]:
    """Within this context (at trace time), `constrain` calls `pin(x, names)`; None turns marks off."""
    token = _PIN.set(pin)
    try:
        yield
    finally:
        _PIN.reset(token)
