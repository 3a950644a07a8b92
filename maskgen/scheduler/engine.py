"""The maskgen decoding engine: static per-step counts, per-example keys, grouped reveals.

Decoding runs over *groups* of consecutive steps. A group starts with one full
model evaluation, samples a candidate token at every position and ranks the
unknown positions by confidence (log-prob of the candidate plus annealed Gumbel
noise, or a fixed priority such as the Halton order). The top `n_g` positions,
n_g = tokens the group's steps reveal, are the group; its first step reveals the
first share from the full logits, every further step (a ReCAP "cheap" step)
recomputes only the class row and the group rows against the frozen cache and
reveals the next share. Plain decoding is the special case of one-step groups,
so it shares this code path bit for bit with ReCAP at K = 0.

Everything about the schedule is numpy at trace time. Groups with the same
number of steps run under one `lax.scan`; the group size is padded to a static
bound `rows` (top_k of that size), padded ranks are no-ops.
"""
import dataclasses
from typing import Optional, Sequence, Tuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from maskgen.scheduler import keys as keys_lib
from maskgen.scheduler import token_sampling
from maskgen.scheduler.model_calls import ModelCalls


@dataclasses.dataclass(frozen=True)
class Phase:
    """Groups that share a shape: start steps, steps per group, padded group size."""
    starts: Tuple[int, ...]
    steps_per_group: int
    rows: int


@dataclasses.dataclass(frozen=True)
class StepTables:
    """Trace-time tables indexed by absolute step t (and by the initial unknown count N)."""
    counts: np.ndarray  # int32 [L + 1, T]: tokens revealed at step t for N unknown
    choice_temperatures: np.ndarray  # float32 [T]: Gumbel scale on the confidence
    temperatures: Optional[np.ndarray]  # float32 [T] sampling temperature, None = 1
    guidance: Optional[np.ndarray]  # float32 [T] guidance weight, None = unguided
    priority: Optional[np.ndarray]  # float32 [L] fixed order (higher first), None = confidence


def group_steps(num_steps: int, start_step: int, full_only_steps: int,
                cheap_steps: int) -> list[Tuple[int, ...]]:
    """Executed steps in groups: steps < P alone, then runs of 1 + K (the last may be short)."""
    steps = list(range(start_step, num_steps))
    groups = [(t,) for t in steps if t < full_only_steps]
    rest = [t for t in steps if t >= full_only_steps]
    size = cheap_steps + 1
    groups += [tuple(rest[i:i + size]) for i in range(0, len(rest), size)]
    return groups


def make_phases(groups: Sequence[Tuple[int, ...]], counts: np.ndarray, slack: float = 1.25) -> list[Phase]:
    """Consecutive groups of equal length share a phase (one lax.scan) while their sizes stay close.

    rows = the phase's worst-case group size over N. A multi-step group joins
    the previous phase only if that phase's largest size stays within `slack` x
    its smallest, so cheap evaluations are not padded far beyond their group
    (growing group sizes, as the cosine schedule gives, would otherwise all pay
    for the last). One-step groups (plain decoding) always share one phase.
    """
    phases, smallest = [], []
    for group in groups:
        rows = int(max(1, counts[:, list(group)].sum(axis=1).max()))
        if phases and phases[-1].steps_per_group == len(group) and (
                len(group) == 1 or max(phases[-1].rows, rows) <= slack * min(smallest[-1], rows)):
            last = phases[-1]
            phases[-1] = Phase(last.starts + (group[0],), last.steps_per_group,
                               max(last.rows, rows))
            smallest[-1] = min(smallest[-1], rows)
        else:
            phases.append(Phase((group[0],), len(group), rows))
            smallest.append(rows)
    return phases


def _step_value(table: Optional[np.ndarray], step: jax.Array) -> Optional[jax.Array]:
    return None if table is None else jnp.asarray(table)[step]


def _candidates(logits: jax.Array, uniform: jax.Array, temperature: Optional[jax.Array],
                top_k: Optional[int], top_p: Optional[float]) -> Tuple[jax.Array, jax.Array]:
    """Sampled ids and their log-probability under the filtered, tempered distribution."""
    logits = token_sampling.filter_logits(logits, temperature, top_k, top_p)
    return token_sampling.sample_with_uniform(uniform, logits)


@flax.struct.dataclass
class Draws:
    """Every step's random numbers, drawn before the loop in one vectorised call.

    uniform[t, b] / gumbel[t, b]: the [L] uniforms (token sampling) and Gumbel
    noise (confidence) of example b at step t, from keys.step_keys(keys, t). A
    step that samples n < L rows uses the first n uniforms: the numbers a draw
    of shape (n,) from the same key gives (partitionable threefry). Drawing per
    step inside the loop cost more than the rest of a step at small model sizes
    on CPU (XLA:CPU runs threefry as a rolled loop).
    """
    uniform: jax.Array  # float32 [T, B, L]
    gumbel: jax.Array  # float32 [T, B, L]


def draw_all(example_keys: jax.Array, num_steps: int, length: int) -> Draws:
    """Every step's uniforms and Gumbel noise up front: one vectorised draw beats per-step draws."""
    def per_step(step: jax.Array) -> tuple[jax.Array, jax.Array]:
        sample_keys, choice_keys = keys_lib.step_keys(example_keys, step)
        return (token_sampling.uniform_per_example(sample_keys, length),
                token_sampling.gumbel_per_example(choice_keys, length))
    uniform, gumbel = jax.vmap(per_step)(jnp.arange(num_steps))
    return Draws(uniform=uniform, gumbel=gumbel)


def _scatter(seq: jax.Array, positions: jax.Array, values: jax.Array) -> jax.Array:
    return seq.at[jnp.arange(seq.shape[0])[:, None], positions].set(values)


def _group(seq: jax.Array, start: jax.Array, *, calls: ModelCalls, draws: Draws, counts: jax.Array,
           tables: StepTables, mask_id: int, phase: Phase, top_k: Optional[int], top_p: Optional[float],
           keep_steps: bool) -> Tuple[jax.Array, Optional[jax.Array]]:
    """One group: full evaluation, ranking, then the group's steps. Returns (seq, per-step seqs)."""
    batch, length = seq.shape
    rows = phase.rows
    logits, cache = calls.full(seq, _step_value(tables.guidance, start))
    candidates, log_probs = _candidates(
        logits, draws.uniform[start], _step_value(tables.temperatures, start), top_k, top_p)
    if tables.priority is None:
        noise = draws.gumbel[start]
        confidence = log_probs + jnp.asarray(tables.choice_temperatures)[start] * noise
    else:
        confidence = jnp.broadcast_to(jnp.asarray(tables.priority), (batch, length))
    confidence = jnp.where(seq == mask_id, confidence, -jnp.inf)
    _, positions = lax.top_k(confidence, rows)  # [B, rows], most confident first

    ends = jnp.cumsum(lax.dynamic_slice_in_dim(counts, start, phase.steps_per_group, axis=1),
                      axis=1)  # [B, steps]: rank where each step's share ends
    rank = jnp.arange(rows)[None, :]
    values = jnp.take_along_axis(seq, positions, axis=1)
    first = rank < ends[:, :1]
    values = jnp.where(first, jnp.take_along_axis(candidates, positions, axis=1), values)
    per_step = [_scatter(seq, positions, values)] if keep_steps else []

    member = rank < ends[:, -1:]
    row_positions = jnp.concatenate(  # class row + group rows; padding repeats the class row
        [jnp.zeros((batch, 1), positions.dtype), jnp.where(member, positions, 0)], axis=1)
    for j in range(1, phase.steps_per_group):
        step = start + j
        current = _scatter(seq, positions, values)
        cheap_logits = calls.cheap(current, row_positions, cache,
                                   _step_value(tables.guidance, step))[:, 1:]
        cheap_candidates, _ = _candidates(
            cheap_logits, draws.uniform[step][:, :cheap_logits.shape[1]],
            _step_value(tables.temperatures, step), top_k, top_p)
        reveal = (rank >= ends[:, j - 1:j]) & (rank < ends[:, j:j + 1])
        values = jnp.where(reveal, cheap_candidates, values)
        if keep_steps:
            per_step.append(_scatter(seq, positions, values))
    seq = _scatter(seq, positions, values)
    return seq, (jnp.stack(per_step) if keep_steps else None)


def run(calls: ModelCalls, seq: jax.Array, example_keys: jax.Array, tables: StepTables,
        phases: Sequence[Phase], *, mask_id: int, top_k: Optional[int] = None,
        top_p: Optional[float] = None,
        keep_steps: bool = False) -> Tuple[jax.Array, Optional[jax.Array]]:
    """Decodes seq [B, L] (mask_id = unknown).

    Returns (tokens [B, L], committed sequence after every executed step [S, B, L] or None).
    """
    length = seq.shape[1]
    unknown = jnp.sum(seq == mask_id, axis=1)
    counts = jnp.asarray(tables.counts)[jnp.minimum(unknown, length)]  # [B, T]
    draws = draw_all(example_keys, tables.counts.shape[1], length)
    outputs = []
    for phase in phases:
        def body(carry: jax.Array, start: jax.Array,
                 phase: Phase = phase) -> tuple[jax.Array, Optional[jax.Array]]:
            return _group(carry, start, calls=calls, draws=draws, counts=counts,
                          tables=tables, mask_id=mask_id, phase=phase, top_k=top_k, top_p=top_p,
                          keep_steps=keep_steps)
        seq, per_step = lax.scan(body, seq, jnp.asarray(phase.starts, jnp.int32))
        if keep_steps:
            outputs.append(per_step.reshape((-1,) + per_step.shape[2:]))
    return seq, (jnp.concatenate(outputs) if keep_steps else None)
