"""ReCAP policy: static plan, K=0 == plain decoding bit for bit, cheap steps see fresh group
tokens over a frozen cache, invariants with editing / guidance / Halton order."""
import functools

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maskgen.models.transformer import Transformer
from maskgen.scheduler import DecodeConfig, RecapConfig, decode, decode_recap, example_keys, recap_plan, schedules
from maskgen.scheduler.model_calls import ModelCalls
from maskgen.tokens import TokenLayout

LAYOUT = TokenLayout(codebook_size=16, num_classes=5, null_class_id=4)
LENGTH = 1 + 16
MASK = LAYOUT.mask_id


class CountingModel:
    """Token at position p = (number of non-mask ids the model sees + p) mod codebook.

    The full call caches a per-row "known" flag; the cheap call overwrites the flags of
    its rows with their fresh ids and counts over the whole cache, like KV reuse.
    Every call logs (kind, rows) through a debug callback.
    """

    def __init__(self):
        self.log = []

    def _logits(self, count, positions):
        token = (count[:, None] + positions) % LAYOUT.codebook_size
        return jnp.where(jax.nn.one_hot(token, LAYOUT.codebook_size) > 0, 0.0, -1e9)

    def _record(self, kind, ids):
        jax.debug.callback(lambda probe: self.log.append((kind,) + probe.shape), ids)

    def full(self, ids):
        self._record("full", ids)
        known = (ids != MASK).astype(jnp.int32)
        positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
        return self._logits(known.sum(1), positions), known

    def cheap(self, ids_sub, positions_sub, known):
        self._record("cheap", ids_sub)
        rows = jnp.arange(ids_sub.shape[0])[:, None]
        known = known.at[rows, positions_sub].set((ids_sub != MASK).astype(jnp.int32))
        return self._logits(known.sum(1), positions_sub)

    def __call__(self, ids):
        return self.full(ids)[0]


COUNTING = CountingModel()


class _RandomContext:
    """Soft logits depending on every id (through a cache of row embeddings)."""

    def __init__(self):
        rng = np.random.default_rng(0)
        self.positional = jnp.asarray(rng.normal(size=(LENGTH, 16)), jnp.float32)
        self.embedding = jnp.asarray(rng.normal(size=(LAYOUT.vocab_size, 16)), jnp.float32)

    def full(self, ids):
        cache = self.embedding[ids]
        return self.positional[None] + cache.mean(1, keepdims=True), cache

    def cheap(self, ids_sub, positions_sub, cache):
        rows = jnp.arange(ids_sub.shape[0])[:, None]
        cache = cache.at[rows, positions_sub].set(self.embedding[ids_sub])
        return self.positional[positions_sub] + cache.mean(1, keepdims=True)

    def logits(self, ids):
        return self.full(ids)[0]


RANDOM = _RandomContext()


@functools.lru_cache(maxsize=None)
def _recap_decoder(model, config, recap, layout=LAYOUT):
    return jax.jit(lambda ids, key: decode_recap(model.full, model.cheap, ids, key, config, layout,
                                                 recap))


@functools.lru_cache(maxsize=None)
def _plain_decoder(logits_fn, config, layout=LAYOUT):
    return jax.jit(lambda ids, key: decode(logits_fn, ids, key, config, layout))


def _inputs(batch, seed=0, edit=True):
    rng = np.random.default_rng(seed)
    ids = np.full((batch, LENGTH), MASK, np.int32)
    ids[:, 0] = np.arange(batch) % 4 + LAYOUT.codebook_size
    if edit:
        ids[:, 1:] = rng.integers(0, 16, (batch, LENGTH - 1))
        for b in range(batch):
            ids[b, 1 + rng.choice(LENGTH - 1, size=6 + 2 * b, replace=False)] = MASK
    return ids


@pytest.mark.parametrize("steps,full_only,cheap,full,cheap_calls", [
    (32, 12, 1, 22, 10), (24, 10, 1, 17, 7), (20, 10, 1, 15, 5), (16, 8, 1, 12, 4),
    (16, 0, 1, 8, 8), (8, 0, 0, 8, 0), (7, 0, 2, 3, 4), (5, 9, 1, 5, 0)])
def test_plan_counts(steps, full_only, cheap, full, cheap_calls):
    plan = recap_plan(steps, full_only, cheap, "cosine", 256)
    assert (plan.num_full, plan.num_cheap) == (full, cheap_calls)
    assert sum(plan.group_tokens) == 256
    assert [t for group in plan.groups for t in group] == list(range(steps))
    np.testing.assert_array_equal(
        plan.group_tokens,
        [schedules.tokens_per_step("cosine", 256, steps)[list(g)].sum() for g in plan.groups])
    for group, tokens, rows in zip(plan.groups, plan.group_tokens, plan.cheap_rows):
        assert rows == 0 if len(group) == 1 else rows >= tokens + 1


def test_plan_with_editing_start():
    plan = recap_plan(12, 0, 1, "cosine", 40, start_step=2)
    assert plan.groups == ((2, 3), (4, 5), (6, 7), (8, 9), (10, 11))
    assert (plan.num_full, plan.num_cheap) == (5, 5)
    assert sum(plan.group_tokens) == 40
    with pytest.raises(ValueError, match="cheap_steps"):
        RecapConfig(cheap_steps=-1)


@pytest.mark.parametrize("config,recap", [
    (DecodeConfig(steps=6, return_intermediates=True), RecapConfig(2, 0)),
    (DecodeConfig(steps=6, guidance_scale=3.0, return_intermediates=True), RecapConfig(0, 0)),
    # P >= T: every step is full-only even though K > 0.
    (DecodeConfig(steps=6, order="halton", start_step=1, return_intermediates=True),
     RecapConfig(10, 3)),
], ids=["plain", "guided", "halton-edit"])
def test_k0_equals_plain_decoding_bit_for_bit(config, recap):
    ids = _inputs(3)
    model = RANDOM
    plain = _plain_decoder(model.logits, config)(ids, 9)
    grouped = _recap_decoder(model, config, recap)(ids, 9)
    np.testing.assert_array_equal(grouped.tokens, plain.tokens)
    np.testing.assert_array_equal(grouped.sequences, plain.sequences)


@pytest.mark.parametrize("recap,config", [
    (RecapConfig(1, 1), DecodeConfig(steps=6, return_intermediates=True)),
    (RecapConfig(0, 2), DecodeConfig(steps=7, start_step=1, guidance_scale=2.0,
                                      return_intermediates=True)),
], ids=["P1K1", "P0K2-edit-guided"])
def test_cheap_steps_see_fresh_group_tokens(recap, config):
    ids = _inputs(3)
    COUNTING.log.clear()
    result = _recap_decoder(COUNTING, config, recap)(ids, 4)
    jax.block_until_ready(result.tokens)
    plan = recap_plan(config.steps, recap.full_only_steps, recap.cheap_steps, config.schedule,
                      LENGTH - 1, config.start_step, length=LENGTH)
    batch = len(ids) * (2 if config.guided else 1)
    kinds = [entry[0] for entry in COUNTING.log]
    assert kinds.count("full") == plan.num_full and kinds.count("cheap") == plan.num_cheap
    assert all(entry[1] == batch for entry in COUNTING.log)
    cheap_rows = sorted({rows for rows, group in zip(plan.cheap_rows, plan.groups)
                         if len(group) > 1})
    assert sorted({entry[2] for entry in COUNTING.log if entry[0] == "cheap"}) == cheap_rows

    sequences = np.asarray(result.sequences)
    tokens = np.asarray(result.tokens)
    unknown = ids == MASK
    np.testing.assert_array_equal(tokens[~unknown], ids[~unknown])
    assert not np.any(tokens == MASK)
    table = schedules.remaining_table(config.schedule, LENGTH, config.steps, config.start_step)
    previous = ids
    for t in range(config.start_step, config.steps):
        current = sequences[:, t]
        np.testing.assert_array_equal((current == MASK).sum(1), table[unknown.sum(1), t])
        # Every token was predicted from the sequence as it stood before its step,
        # whether that step was a full or a cheap evaluation.
        new = (previous == MASK) & (current != MASK)
        seen = (previous != MASK).sum(1, keepdims=True)
        expected = (seen + np.arange(LENGTH)[None]) % LAYOUT.codebook_size
        np.testing.assert_array_equal(current[new], np.broadcast_to(expected, current.shape)[new])
        np.testing.assert_array_equal(current[~new], previous[~new] if t else current[~new])
        previous = current


def test_recap_halton_reveals_the_same_positions_as_plain():
    ids = _inputs(2, edit=False)
    config = DecodeConfig(steps=6, order="halton", return_intermediates=True)
    plain = np.asarray(_plain_decoder(COUNTING, config)(ids, 1).sequences)
    grouped = np.asarray(_recap_decoder(COUNTING, config, RecapConfig(1, 2))(ids, 1).sequences)
    np.testing.assert_array_equal(plain == MASK, grouped == MASK)


def test_recap_tokens_do_not_depend_on_batch_composition():
    ids = _inputs(4)
    config, recap = DecodeConfig(steps=6, guidance_scale=2.0), RecapConfig(1, 1)
    model = RANDOM
    full = np.asarray(_recap_decoder(model, config, recap)(ids, 5).tokens)
    pair = _recap_decoder(model, config, recap)(ids[[3, 1]], example_keys(5, [3, 1])).tokens
    pair = np.asarray(pair)
    np.testing.assert_array_equal(full[[3, 1]], pair)


def test_recap_needs_maskgen_mode():
    with pytest.raises(ValueError, match="maskgen mode"):
        decode_recap(COUNTING.full, COUNTING.cheap, _inputs(1), jax.random.PRNGKey(0),
                     DecodeConfig(official=True), LAYOUT, RecapConfig())


@pytest.fixture(scope="module", params=["auto", "xla"])
def small_transformer(official_small, request):
    """The official small checkpoint, with the default (scan on CPU) and the xla attention."""
    path = official_small["_dir"] / "checkpoints" / "maskgit_imagenet128_checkpoint"
    params = flax.serialization.from_bytes(None, path.read_bytes())["params"]
    model = Transformer(vocab_size=75, hidden_size=64, num_layers=2, num_heads=2, mlp_dim=256,
                        max_len=65, attention=request.param)
    variables = {"params": params}
    layout = TokenLayout(codebook_size=64, num_classes=10, null_class_id=9)

    class Callables:
        def logits(self, ids):
            return model.apply(variables, ids, num_logits=64)

        def full(self, ids):
            return model.apply(variables, ids, num_logits=64, method="forward_with_kv")

        def cheap(self, ids, positions, kv):
            return model.apply(variables, ids, positions, kv, num_logits=64,
                               method="forward_subset")

    return Callables(), layout


@pytest.mark.parametrize("guided", [False, True])
def test_cheap_call_with_unchanged_rows_reproduces_full_logits(small_transformer, official_small,
                                                               guided):
    fns, layout = small_transformer
    ids = jnp.asarray(official_small["edit_input_tokens"][:3])
    ids = jnp.where(ids == -1, layout.mask_id, ids)
    null = layout.null_class_id + layout.codebook_size if guided else None
    calls = ModelCalls(fns.full, fns.cheap, layout.codebook_size, null)
    rng = np.random.default_rng(0)
    # Class row, 9 group rows, then padding rows that repeat the class row (as the decoder pads).
    group = np.stack([1 + rng.choice(64, 9, replace=False) for _ in range(3)])
    positions = np.concatenate([np.zeros((3, 1)), group, np.zeros((3, 4))], axis=1)
    positions = jnp.asarray(positions, jnp.int32)

    @jax.jit
    def both(ids):
        logits, cache = calls.full(ids, 2.0 if guided else None)
        cheap = calls.cheap(ids, positions, cache, 2.0 if guided else None)
        return jnp.take_along_axis(logits, positions[..., None], axis=1), cheap

    want, got = both(ids)
    error = float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))
    assert error < 1e-5, error


def test_k0_equals_plain_with_the_real_transformer(small_transformer, official_small):
    fns, layout = small_transformer
    ids = jnp.asarray(official_small["gen_input_tokens"][:4])
    config = DecodeConfig(steps=6, guidance_scale=2.0, return_intermediates=True)
    plain = jax.jit(lambda i: decode(fns.logits, i, 3, config, layout))(ids)
    grouped = jax.jit(lambda i: decode_recap(fns.full, fns.cheap, i, 3, config, layout,
                                             RecapConfig(2, 0)))(ids)
    np.testing.assert_array_equal(grouped.sequences, plain.sequences)
    cheap = jax.jit(lambda i: decode_recap(fns.full, fns.cheap, i, 3, config, layout,
                                           RecapConfig(2, 1)))(ids)
    # Identical through the full-only steps; afterwards the same number of masks per step.
    np.testing.assert_array_equal(cheap.sequences[:, :2], plain.sequences[:, :2])
    np.testing.assert_array_equal((np.asarray(cheap.sequences) == layout.mask_id).sum(-1),
                                  (np.asarray(plain.sequences) == layout.mask_id).sum(-1))
    assert not np.array_equal(cheap.tokens, plain.tokens)
