"""Iterative parallel decoding (MaskGIT): options, result, and the `decode` entry point.

`decode` is traceable; wrap the call (with the model callable closed over its
parameters) in one `jax.jit` to get the whole decode as a single XLA program.
The schedule is precomputed in numpy at trace time; the loop is `lax.scan` /
`lax.fori_loop` with static shapes and no host round trips.

Two modes:
* maskgen (default): one key per example (`fold_in(key(seed), index)`), so images
  do not depend on batch size or device count; exactly `count_t` tokens are
  revealed at step t (static table, official counts), chosen by confidence or
  in Halton order.
* official (`official=True`): google-research/maskgit's loop, token for token.
"""
import dataclasses
from typing import Any, Callable, Optional, Sequence, Tuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from maskgen.scheduler import engine, schedules
from maskgen.scheduler import keys as keys_lib
from maskgen.scheduler import official as official_lib
from maskgen.scheduler.model_calls import ModelCalls
from maskgen.tokens import TokenLayout

ORDERS = ("confidence", "halton")


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """Decoding options (all static: changing one retraces).

    steps: T model steps (T - start_step are run).
    schedule: mask schedule name (see schedules.canonical_schedule).
    choice_temperature: Gumbel noise on the confidence, annealed tau (1 - (t+1)/T).
    temperature, temperature_end: sampling temperature, ramped linearly to
        `temperature_end` over the steps when given.
    top_k, top_p: optional sampling filters.
    guidance_scale: None = no guidance (one model call of batch B); a float w turns on
        classifier-free guidance (one call of batch 2B) with weight w_t from
        `guidance_schedule` (constant | linear | pow-cosine); w = 1 is conditional.
    order: `confidence` (MaskGIT) or `halton` (fixed 2-D Halton order, no noise).
    grid_shape: (h, w) of the token grid for Halton; default square.
    start_step: editing starts here (first ratio (start_step + 1) / T).
    return_intermediates: also return every step's sequence [B, T, L].
    official: reproduce the official MaskGIT loop (batch key, in-loop counts).
    """
    steps: int = 8
    schedule: str = "cosine"
    choice_temperature: float = 4.5
    temperature: float = 1.0
    temperature_end: Optional[float] = None
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    guidance_scale: Optional[float] = None
    guidance_schedule: str = "constant"
    order: str = "confidence"
    grid_shape: Optional[Tuple[int, int]] = None
    start_step: int = 0
    return_intermediates: bool = False
    official: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps must be a positive int, got {self.steps!r}")
        if not isinstance(self.start_step, int) or not 0 <= self.start_step < self.steps:
            raise ValueError(
                f"start_step must lie in [0, steps={self.steps}), got {self.start_step!r}")
        schedules.canonical_schedule(self.schedule)
        if self.choice_temperature < 0:
            raise ValueError(f"choice_temperature must be >= 0, got {self.choice_temperature}")
        for name in ("temperature", "temperature_end"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            raise ValueError(f"top_k must be a positive int or None, got {self.top_k!r}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p}")
        if self.guidance_schedule not in schedules.GUIDANCE_SCHEDULES:
            raise ValueError(f"unknown guidance_schedule {self.guidance_schedule!r}; expected one "
                             f"of {schedules.GUIDANCE_SCHEDULES}")
        if self.order not in ORDERS:
            raise ValueError(f"unknown order {self.order!r}; expected one of {ORDERS}")
        if self.grid_shape is not None and (
                len(self.grid_shape) != 2 or min(self.grid_shape) < 1):
            raise ValueError(f"grid_shape must be (height, width), got {self.grid_shape!r}")
        if self.official and self.order != "confidence":
            raise ValueError("the official preset decodes in confidence order only")

    @classmethod
    def official_maskgit(cls, steps: int = 16, start_step: int = 0, **overrides: Any) -> "DecodeConfig":
        """The official MaskGIT sampler: cosine, choice temperature 4.5, batch key."""
        options = dict(steps=steps, start_step=start_step, schedule="cosine",
                       choice_temperature=4.5, official=True)
        options.update(overrides)
        return cls(**options)

    @property
    def guided(self) -> bool:
        """Whether classifier-free guidance is on (a guidance_scale is set)."""
        return self.guidance_scale is not None


@flax.struct.dataclass
class DecodeResult:
    """tokens: [B, L] final ids (class token kept at position 0).

    sequences: [B, T, L] when requested, else None. Slots before start_step hold the
    input. Official preset: slot t = step t's sample before re-masking (every
    position filled), as google-research/maskgit returns. maskgen mode: slot t = the
    tokens committed after step t (still unknown positions hold mask_id). The last
    slot equals `tokens` in both.
    """
    tokens: jax.Array
    sequences: Optional[jax.Array] = None


def null_class_token(config: DecodeConfig, layout: TokenLayout,
                     null_class_id: Optional[int] = None) -> Optional[int]:
    """Class-token id of the null class when guidance is on, else None; errors if there is none."""
    if not config.guided:
        return None
    null_id = layout.null_class_id if null_class_id is None else null_class_id
    if null_id is None:
        raise ValueError("classifier-free guidance needs a null class: the token layout has "
                         "null_class_id=None and none was passed")
    if not 0 <= null_id < layout.num_classes:
        raise ValueError(f"null_class_id={null_id} outside [0, {layout.num_classes})")
    return int(null_id) + layout.codebook_size  # python int: static under jit


def prepare_ids(ids: ArrayLike, layout: TokenLayout) -> jax.Array:
    """Validates ids [B, L] and maps the official mask marker -1 to layout.mask_id."""
    ids = jnp.asarray(ids)
    if ids.ndim != 2 or ids.shape[1] < 2:
        raise ValueError(f"ids must be [batch, 1 + tokens] with the class token first, got "
                         f"shape {ids.shape}")
    if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ValueError(f"ids must be integers, got {ids.dtype}")
    return layout.canonical_ids(ids)


def _grid_shape(config: DecodeConfig, length: int) -> Tuple[int, int]:
    if config.grid_shape is not None:
        height, width = config.grid_shape
    else:
        height = width = int(round(np.sqrt(length - 1)))
    if height * width != length - 1:
        raise ValueError(f"grid {height}x{width} does not match the {length - 1} image tokens; "
                         "set DecodeConfig.grid_shape")
    return height, width


def step_tables(config: DecodeConfig, length: int) -> engine.StepTables:
    """Everything the maskgen loop needs per step, computed in numpy at trace time."""
    steps = config.steps
    priority = None
    if config.order == "halton":
        order = schedules.halton_order(*_grid_shape(config, length))
        priority = np.full(length, -np.inf, np.float32)
        priority[1 + order] = -np.arange(order.size, dtype=np.float32)
    temperatures = None
    if config.temperature != 1.0 or config.temperature_end is not None:
        temperatures = schedules.linear_ramp(config.temperature, config.temperature_end, steps)
    guidance = None
    if config.guided:
        guidance = schedules.guidance_scales(config.guidance_schedule, config.guidance_scale, steps)
    return engine.StepTables(
        counts=schedules.count_table(config.schedule, length, steps, config.start_step),
        choice_temperatures=schedules.choice_temperatures(config.choice_temperature, steps),
        temperatures=temperatures, guidance=guidance, priority=priority)


def _with_input_slots(ids: jax.Array, per_step: jax.Array, config: DecodeConfig) -> jax.Array:
    """[S, B, L] executed-step sequences -> [B, T, L] with the input in slots < start_step."""
    before = jnp.broadcast_to(ids[None], (config.start_step,) + ids.shape)
    return jnp.transpose(jnp.concatenate([before, per_step]), (1, 0, 2))


def run_maskgen(calls: ModelCalls, ids: jax.Array, key_or_keys: ArrayLike, config: DecodeConfig,
                layout: TokenLayout, groups: Sequence[Tuple[int, ...]]) -> DecodeResult:
    """The maskgen-mode loop over the given step groups (plain decoding: one step per group)."""
    tables = step_tables(config, ids.shape[1])
    example_keys = keys_lib.per_example_keys(key_or_keys, ids.shape[0])
    tokens, per_step = engine.run(
        calls, ids, example_keys, tables, engine.make_phases(groups, tables.counts),
        mask_id=layout.mask_id, top_k=config.top_k, top_p=config.top_p,
        keep_steps=config.return_intermediates)
    sequences = _with_input_slots(ids, per_step, config) if per_step is not None else None
    return DecodeResult(tokens=tokens, sequences=sequences)


def decode(logits_fn: Callable[[jax.Array], jax.Array], ids: ArrayLike, key_or_keys: ArrayLike,
           config: DecodeConfig, layout: TokenLayout, null_class_id: Optional[int] = None) -> DecodeResult:
    """Fills every unknown position of ids [B, L] (mask_id or -1); known tokens never change.

    logits_fn(ids [M, L]) -> logits [M, L, >= codebook_size]; pass the model
    `num_logits=layout.codebook_size` so it computes only codebook logits. M = B, or
    2B under guidance (conditional rows, then the null-class rows).
    key_or_keys: maskgen mode: an int seed or key (examples get fold_in(key, 0..B-1))
    or [B] per-example keys (see keys.example_keys); official preset: one key.
    null_class_id overrides layout.null_class_id for guidance.
    """
    ids = prepare_ids(ids, layout)
    calls = ModelCalls(lambda model_ids: (logits_fn(model_ids), None), None,
                       layout.codebook_size, null_class_token(config, layout, null_class_id))
    if config.official:
        return _run_official(calls, ids, key_or_keys, config, layout)
    groups = engine.group_steps(config.steps, config.start_step, config.steps, 0)
    return run_maskgen(calls, ids, key_or_keys, config, layout, groups)


def _run_official(calls: ModelCalls, ids: jax.Array, key_or_keys: ArrayLike, config: DecodeConfig,
                  layout: TokenLayout) -> DecodeResult:
    tables = step_tables(config, ids.shape[1])
    tokens, slots = official_lib.run(
        calls, ids, keys_lib.batch_key(key_or_keys), num_steps=config.steps,
        start_step=config.start_step, schedule=config.schedule,
        choice_temperature=config.choice_temperature, mask_id=layout.mask_id,
        temperatures=tables.temperatures, guidance=tables.guidance, top_k=config.top_k,
        top_p=config.top_p, keep_steps=config.return_intermediates)
    return DecodeResult(tokens=tokens, sequences=slots)
