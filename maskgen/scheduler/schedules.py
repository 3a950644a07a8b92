"""Mask schedules: how much of the image is still masked at a given progress.

One formula table serves training (`mask_ratio` on jax arrays, traceable) and
decoding (the same formulas evaluated in float32 numpy at trace time, so a
jitted decode loop only indexes precomputed tables). The formulas and the
[1e-6, 1] clip follow the official MaskGIT `mask_schedule.schedule`; `arccos`
is the Halton-MaskGIT curve.

A schedule maps progress r in [0, 1] to the fraction of the N initially
unknown tokens that stays masked: 1 at r=0, (almost) 0 at r=1.
"""
import functools
import math
import re
from types import ModuleType

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

MIN_MASK_RATIO = 1e-6
_ALIASES = {"linear": "uniform", "square": "pow2", "cubic": "pow3"}
_NAMED = ("uniform", "cosine", "log", "exp", "arccos")
_POW = re.compile(r"pow(\d+(\.\d*)?|\.\d+)$")


def canonical_schedule(name: str) -> str:
    """Validates a schedule name and resolves aliases (`linear`, `square`, `cubic`)."""
    if not isinstance(name, str):
        raise ValueError(f"schedule name must be a string, got {name!r}")
    name = _ALIASES.get(name, name)
    if name in _NAMED:
        return name
    match = _POW.match(name)
    if match and float(match.group(1)) > 0:
        return name
    raise ValueError(
        f"unknown mask schedule {name!r}; expected one of {sorted(_NAMED + tuple(_ALIASES))} "
        "or 'pow<p>' with p > 0 (e.g. pow2.5)")


def _needs_count(name: str) -> bool:
    return name in ("log", "exp")


def _formula(xp: ModuleType, name: str, r: ArrayLike, num_unknown: ArrayLike | None) -> ArrayLike:
    """The unclipped schedule value, written in the official operation order."""
    if name == "uniform":
        return 1. - r
    if name == "cosine":
        return xp.cos(math.pi / 2. * r)
    if name.startswith("pow"):
        return 1. - r ** float(name[3:])
    if name == "log":
        return -xp.log2(r) / xp.log2(num_unknown)
    if name == "exp":
        return 1 - xp.exp2(-xp.log2(num_unknown) * (1 - r))
    if name == "arccos":
        return xp.arccos(r) / (math.pi / 2.)
    raise AssertionError(name)  # canonical_schedule() guards every caller


def mask_ratio(name: str, r: ArrayLike,
               num_unknown: ArrayLike | None = None) -> np.ndarray | np.float32 | jax.Array:
    """Fraction of the unknown tokens left masked at progress `r`, clipped to [1e-6, 1].

    `r` may be a python float (-> np.float32), a numpy array (evaluated in float32 numpy)
    or a jax array / tracer (evaluated with jnp, jit-friendly). `num_unknown` (N) is only
    read by `log` and `exp`, whose curves depend on it; N must exceed 1 there.
    """
    name = canonical_schedule(name)
    if _needs_count(name):
        if num_unknown is None:
            raise ValueError(f"schedule {name!r} needs num_unknown (the initial mask count)")
        if not isinstance(num_unknown, jax.Array) and np.any(np.asarray(num_unknown) < 2):
            raise ValueError(f"schedule {name!r} needs num_unknown >= 2, got {num_unknown}")
    if isinstance(r, jax.Array) or isinstance(num_unknown, jax.Array):
        value = _formula(jnp, name, jnp.asarray(r, jnp.float32), num_unknown)
        return jnp.clip(value, MIN_MASK_RATIO, 1.)
    r = np.asarray(r, np.float32)
    if num_unknown is not None:
        num_unknown = np.asarray(num_unknown, np.float32)  # jnp.log2(int32) is float32 too
    with np.errstate(divide="ignore", invalid="ignore"):
        value = np.asarray(_formula(np, name, r, num_unknown), np.float32)
    return np.clip(value, np.float32(MIN_MASK_RATIO), np.float32(1.))


def step_ratios(num_steps: int) -> np.ndarray:
    """Progress after each step, (t + 1) / T in float32 (as the official loop computes it)."""
    _check_steps(num_steps)
    return (np.arange(num_steps, dtype=np.float32) + np.float32(1)) / np.float32(num_steps)


def _check_steps(num_steps: int, start_step: int = 0) -> None:
    if not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
    if not isinstance(start_step, (int, np.integer)) or not 0 <= start_step < num_steps:
        raise ValueError(f"start_step must lie in [0, num_steps={num_steps}), got {start_step!r}")


def remaining_table(name: str, max_unknown: int, num_steps: int, start_step: int = 0) -> np.ndarray:
    """Tokens still masked after each step, for every initial count N in [0, max_unknown].

    Returns int32 [max_unknown + 1, T]. Row N follows the official rule: after step t
    keep floor(N * mask_ratio((t+1)/T)) masked (float32 product), at least one token
    revealed and one left masked per step while possible; the last step reveals the
    rest. Steps before `start_step` are not run (their entries stay N), so the first
    run step reveals everything its ratio allows, as in official editing.
    """
    name = canonical_schedule(name)
    _check_steps(num_steps, start_step)
    if max_unknown < 0:
        raise ValueError(f"max_unknown must be >= 0, got {max_unknown}")
    counts = np.arange(max_unknown + 1, dtype=np.int32)
    ratios = step_ratios(num_steps)
    remaining = np.empty((max_unknown + 1, num_steps), np.int64)
    remaining[:, :start_step] = counts[:, None]
    previous = counts.astype(np.int64)
    for t in range(start_step, num_steps - 1):
        fraction = mask_ratio(name, ratios[t], np.maximum(counts, 2))
        target = np.floor(counts.astype(np.float32) * fraction).astype(np.int64)
        kept = np.maximum(1, np.minimum(previous - 1, target))
        previous = np.minimum(previous, kept)
        remaining[:, t] = previous
    remaining[:, num_steps - 1] = 0
    return remaining.astype(np.int32)


def count_table(name: str, max_unknown: int, num_steps: int, start_step: int = 0) -> np.ndarray:
    """Tokens revealed per step for every N in [0, max_unknown]: int32 [N + 1, T], rows sum to N."""
    remaining = remaining_table(name, max_unknown, num_steps, start_step)
    before = np.concatenate(
        [np.arange(max_unknown + 1, dtype=np.int32)[:, None], remaining[:, :-1]], axis=1)
    return (before - remaining).astype(np.int32)


def tokens_per_step(name: str, num_unknown: int, num_steps: int, start_step: int = 0) -> np.ndarray:
    """Static tokens revealed per step (numpy int32 [T], sums to N; zero before start_step).

    Same counts as the official decode loop produces for an input with N unknown
    tokens (e.g. cosine, N=256, T=8 -> 5, 15, 24, 31, 39, 45, 48, 49).
    """
    if not isinstance(num_unknown, (int, np.integer)) or num_unknown < 0:
        raise ValueError(f"num_unknown must be a non-negative int, got {num_unknown!r}")
    return count_table(name, int(num_unknown), num_steps, start_step)[num_unknown]


def choice_temperatures(temperature: float, num_steps: int) -> np.ndarray:
    """Annealed confidence-noise scale tau * (1 - (t+1)/T): float32 [T], 0 at the last step."""
    return (np.float32(temperature) * (np.float32(1.) - step_ratios(num_steps))).astype(np.float32)


def linear_ramp(start: float, end: float | None, num_steps: int) -> np.ndarray:
    """`start` at step 0 moving linearly to `end` at step T-1 (constant when end is None)."""
    _check_steps(num_steps)
    if end is None:
        return np.full(num_steps, start, np.float32)
    fraction = np.arange(num_steps, dtype=np.float64) / max(num_steps - 1, 1)
    return (start + (end - start) * fraction).astype(np.float32)


GUIDANCE_SCHEDULES = ("constant", "linear", "pow-cosine")
POW_COSINE_EXPONENT = 2.75


def guidance_scales(name: str, scale: float, num_steps: int) -> np.ndarray:
    """Per-step guidance weight w_t (w=1 means plain conditional), float32 [T].

    `constant`: w every step. `linear`: from 1 at step 0 towards w, w_t = 1 + (w-1) t/T
    (MUSE/MAR style: little guidance while the image is mostly masked).
    `pow-cosine`: w_t = 1 + (w-1) (1 - cos(pi (t/T)^2.75)) / 2 (MDT's power-cosine).
    """
    _check_steps(num_steps)
    progress = np.arange(num_steps, dtype=np.float64) / num_steps
    if name == "constant":
        shape = np.ones(num_steps)
    elif name == "linear":
        shape = progress
    elif name == "pow-cosine":
        shape = (1. - np.cos(math.pi * progress ** POW_COSINE_EXPONENT)) / 2.
    else:
        raise ValueError(
            f"unknown guidance schedule {name!r}; expected one of {GUIDANCE_SCHEDULES}")
    return (1. + (scale - 1.) * shape).astype(np.float32)


def _radical_inverse(index: int, base: int) -> float:
    value, denominator = 0.0, 1.0
    while index:
        index, digit = divmod(index, base)
        denominator *= base
        value += digit / denominator
    return value


@functools.lru_cache(maxsize=32)
def _halton_order_cached(height: int, width: int) -> tuple:
    seen = np.zeros(height * width, bool)
    order = []
    index = 0
    while len(order) < height * width:
        row = int(_radical_inverse(index, 2) * height)
        col = int(_radical_inverse(index, 3) * width)
        position = row * width + col
        if not seen[position]:
            seen[position] = True
            order.append(position)
        index += 1
    return tuple(order)


def halton_order(height: int, width: int) -> np.ndarray:
    """Row-major grid positions in the order a 2-D Halton sequence (bases 2, 3) first visits them.

    Every position appears exactly once (int32 [h*w]); consecutive entries are
    spread over the image, which is what makes Halton decoding order good.
    """
    if not (isinstance(height, (int, np.integer)) and isinstance(width, (int, np.integer))
            and height > 0 and width > 0):
        raise ValueError(f"grid must have positive int sides, got {height}x{width}")
    return np.asarray(_halton_order_cached(int(height), int(width)), np.int32)
