"""ReCAP: reuse cached context features for cheap decoding steps (arXiv 2505.19089).

Policy side only; the model supplies the two evaluations:
  full_fn(ids [M, L]) -> (logits [M, L, V'], cache)
  cheap_fn(ids_sub [M, n], positions_sub [M, n], cache) -> logits [M, n, V']
cheap_fn recomputes only the given rows (class row + the group's positions) and
lets them attend over the cached k/v of every other position, frozen at the
group's full evaluation.

Static grouping from (T, P, K): the first P steps are full evaluations alone;
after that every group is one full evaluation and K cheap ones. At the full
evaluation the decoder ranks the unknown positions once (confidence with the
annealed Gumbel noise, or the Halton order) and takes the positions the group's
1 + K steps will reveal, in rank order: the first step's share is sampled from
the full logits, each cheap step samples the next share from its own logits.
With K = 0 this is exactly plain decoding: same keys, same tokens.
"""
import dataclasses
from typing import Any, Callable, Optional, Tuple

import jax
import numpy as np
from jax.typing import ArrayLike

from maskgen.scheduler import engine, schedules
from maskgen.scheduler.decode import DecodeConfig, DecodeResult, null_class_token, prepare_ids, run_maskgen
from maskgen.scheduler.model_calls import ModelCalls
from maskgen.tokens import TokenLayout


@dataclasses.dataclass(frozen=True)
class RecapConfig:
    """full_only_steps: P leading steps with a full evaluation each; cheap_steps: K per full one."""
    full_only_steps: int = 0
    cheap_steps: int = 1

    def __post_init__(self) -> None:
        for name in ("full_only_steps", "cheap_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative int, got {value!r}")


@dataclasses.dataclass(frozen=True)
class RecapPlan:
    """Static structure of a ReCAP decode for N unknown tokens.

    groups: the steps of each group (first step = full evaluation, rest cheap).
    group_tokens: tokens each group reveals. cheap_rows: rows a cheap call of each
    group recomputes (class row + the padded group size the compiled loop uses).
    """
    groups: Tuple[Tuple[int, ...], ...]
    group_tokens: Tuple[int, ...]
    cheap_rows: Tuple[int, ...]
    num_full: int
    num_cheap: int


def _groups(num_steps: int, start_step: int, recap: RecapConfig) -> list[Tuple[int, ...]]:
    return engine.group_steps(num_steps, start_step, recap.full_only_steps, recap.cheap_steps)


def recap_plan(num_steps: int, full_only_steps: int, cheap_steps: int, schedule: str = "cosine",
               num_unknown: int = 256, start_step: int = 0, length: Optional[int] = None) -> RecapPlan:
    """Counts of full and cheap evaluations and the group sizes (for benchmarks and cost models).

    length: sequence length L the decoder will see (default N + 1); it sets the
    padded group size, which is the worst case over every possible unknown count.
    """
    recap = RecapConfig(full_only_steps, cheap_steps)
    counts = schedules.count_table(schedule, num_unknown if length is None else length,
                                   num_steps, start_step)
    groups = _groups(num_steps, start_step, recap)
    rows = {}
    for phase in engine.make_phases(groups, counts):
        rows.update({start: phase.rows for start in phase.starts})
    tokens = tuple(int(counts[num_unknown, list(group)].sum()) for group in groups)
    return RecapPlan(groups=tuple(groups), group_tokens=tokens,
                     cheap_rows=tuple(1 + rows[group[0]] if len(group) > 1 else 0
                                      for group in groups),
                     num_full=len(groups), num_cheap=sum(len(group) - 1 for group in groups))


def decode_recap(full_fn: Callable[[jax.Array], tuple[jax.Array, Any]],
                 cheap_fn: Callable[[jax.Array, jax.Array, Any], jax.Array], ids: ArrayLike,
                 key_or_keys: ArrayLike, config: DecodeConfig, layout: TokenLayout,
                 recap: RecapConfig, null_class_id: Optional[int] = None) -> DecodeResult:
    """`decode` with ReCAP grouping; maskgen mode only (the official loop has no groups).

    Both callables see the guidance-doubled batch when guidance is on; pass them
    `num_logits=layout.codebook_size`. Editing works unchanged: known tokens are
    context, only unknown positions join groups.
    """
    if config.official:
        raise ValueError("ReCAP runs in maskgen mode; the official preset has no step groups")
    if not isinstance(recap, RecapConfig):
        raise ValueError(f"recap must be a RecapConfig, got {type(recap).__name__}")
    ids = prepare_ids(ids, layout)
    calls = ModelCalls(full_fn, cheap_fn, layout.codebook_size,
                       null_class_token(config, layout, null_class_id))
    groups = _groups(config.steps, config.start_step, recap)
    return run_maskgen(calls, ids, key_or_keys, config, layout, groups)


def plan_summary(plan: RecapPlan) -> str:
    """One line for logs: '22 full + 10 cheap (groups of 1..36 tokens)'."""
    sizes = np.asarray(plan.group_tokens)
    return (f"{plan.num_full} full + {plan.num_cheap} cheap "
            f"(groups of {sizes.min()}..{sizes.max()} tokens)")
