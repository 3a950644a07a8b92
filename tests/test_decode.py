"""Decoding loop: exact outputs on fake models, invariants, PRNG discipline, guidance, and
token-for-token equivalence of the official preset with google-research/maskgit."""
import dataclasses
import functools

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scheduler_fakes import ContextFake

from maskgen.models.transformer import Transformer
from maskgen.scheduler import DecodeConfig, decode, example_keys, schedules, token_sampling
from maskgen.tokens import TokenLayout

LAYOUT = TokenLayout(codebook_size=16, num_classes=5, null_class_id=4)
GRID = 4
LENGTH = 1 + GRID * GRID
MASK = LAYOUT.mask_id


def _all_masked(batch, labels=None):
    labels = np.arange(batch) % 4 if labels is None else np.asarray(labels)
    ids = np.full((batch, LENGTH), MASK, np.int32)
    ids[:, 0] = labels + LAYOUT.codebook_size
    return ids


def _edit_input(batch, seed=0):
    """Random known tokens with a different number of unknown positions per example."""
    rng = np.random.default_rng(seed)
    ids = _all_masked(batch)
    ids[:, 1:] = rng.integers(0, LAYOUT.codebook_size, (batch, LENGTH - 1))
    for b in range(batch):
        hidden = rng.choice(LENGTH - 1, size=4 + 3 * b, replace=False)
        ids[b, 1 + hidden] = MASK
    return ids


class CountedModel:
    """A ContextFake that logs the batch size of every executed call (a debug callback)."""

    def __init__(self, seed=0, scale=1.0):
        self.model = ContextFake(LENGTH, LAYOUT.vocab_size, LAYOUT.codebook_size, seed=seed,
                                 scale=scale)
        self.log = []

    def __call__(self, ids):
        jax.debug.callback(lambda probe: self.log.append(probe.shape[0]), ids[:, 0])
        return self.model(ids)


# Shared models and a cache of jitted decoders: identical runs compile once (XLA:CPU
# compiles are the cost of this file).
FAKE = CountedModel()
GREEDY_FAKE = CountedModel(seed=8, scale=0.5)


@functools.lru_cache(maxsize=None)
def _decoder(model, config, layout=LAYOUT, null_class_id=None):
    return jax.jit(lambda ids, key: decode(model, ids, key, config, layout, null_class_id))


def _run(model, ids, key, config, **kwargs):
    return _decoder(model, config, **kwargs)(jnp.asarray(ids, jnp.int32), key)


class OneHotModel:
    """logits 0 at the target id and -1e9 elsewhere: probability exactly one, for both samplers.

    With `uncond_target`, rows whose class token is the null class predict that instead.
    """

    def __init__(self, target, uncond_target=None, null_token=None):
        self.target = jnp.asarray(target)
        self.uncond_target = None if uncond_target is None else jnp.asarray(uncond_target)
        self.null_token = null_token

    def __call__(self, ids):
        target = jnp.broadcast_to(self.target, ids.shape)
        if self.uncond_target is not None:
            is_null = (ids[:, :1] == self.null_token)
            target = jnp.where(is_null, self.uncond_target, target)
        return jnp.where(jax.nn.one_hot(target, LAYOUT.codebook_size) > 0, 0.0, -1e9)


EDIT_CONFIG = DecodeConfig(steps=6, start_step=1, return_intermediates=True)
PLAIN_CONFIG = DecodeConfig(steps=5)
GUIDED_CONFIG = DecodeConfig(steps=5, guidance_scale=2.5, top_k=4)
HALTON_CONFIG = DecodeConfig(steps=5, order="halton", schedule="arccos", return_intermediates=True)


@pytest.mark.parametrize("config", [
    DecodeConfig(steps=5),
    DecodeConfig(steps=5, order="halton", schedule="arccos"),
    DecodeConfig(steps=4, temperature=0.7, temperature_end=1.3, top_k=3, top_p=0.8),
    DecodeConfig.official_maskgit(steps=5),
], ids=["confidence", "halton", "filters", "official"])
def test_one_hot_model_gives_exact_tokens(config):
    target = np.random.default_rng(1).integers(0, LAYOUT.codebook_size, LENGTH)
    ids = _edit_input(3)
    result = _run(OneHotModel(target), ids, 0, config)
    expected = np.where(ids == MASK, target[None], ids)
    np.testing.assert_array_equal(result.tokens, expected)


def test_every_position_revealed_once_with_static_counts():
    ids = _edit_input(4)
    FAKE.log.clear()
    result = _run(FAKE, ids, 3, EDIT_CONFIG)
    sequences = np.asarray(result.sequences)  # [B, T, L]
    tokens = np.asarray(result.tokens)
    assert FAKE.log == [4] * 5  # one model call per executed step (6 steps from step 1)
    unknown = ids == MASK
    np.testing.assert_array_equal(sequences[:, -1], tokens)
    np.testing.assert_array_equal(sequences[:, 0], ids)  # slot before start_step = input
    assert not np.any(tokens == MASK)
    assert np.all(tokens[:, 1:] < LAYOUT.codebook_size)
    np.testing.assert_array_equal(tokens[~unknown], ids[~unknown])  # known tokens never change
    table = schedules.remaining_table("cosine", LENGTH, 6, 1)
    for b in range(len(ids)):
        still_masked = (sequences[b] == MASK).sum(axis=1)
        np.testing.assert_array_equal(still_masked, table[unknown[b].sum()])
        # Once revealed a token keeps its value; known positions hold theirs in every slot.
        revealed = sequences[b] != MASK
        assert np.all(np.diff(revealed.astype(int), axis=0) >= 0)
        assert np.all((sequences[b] == tokens[b]) | ~revealed)


def test_same_seed_same_tokens_and_seeds_differ():
    ids = _edit_input(4)
    first = np.asarray(_run(FAKE, ids, 11, EDIT_CONFIG).tokens)
    np.testing.assert_array_equal(first, _run(FAKE, ids, 11, EDIT_CONFIG).tokens)
    other = np.asarray(_run(FAKE, ids, 12, EDIT_CONFIG).tokens)
    assert np.mean(first[ids == MASK] != other[ids == MASK]) > 0.2


def test_minus_one_marks_unknown_like_mask_id():
    ids = _edit_input(4)
    a = _run(FAKE, ids, 1, EDIT_CONFIG)
    b = _run(FAKE, np.where(ids == MASK, -1, ids), 1, EDIT_CONFIG)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.sequences, b.sequences)


def _official_reference(model, ids, key, steps, start, schedule, choice_temperature):
    """The official rule in plain numpy (jax.random only for the draws)."""
    cur = np.array(ids)
    unknown_at_start = (cur == MASK).sum(axis=1)
    slots = np.repeat(cur[:, None], steps, axis=1)
    remaining = []
    rng = key
    for step in range(start, steps):
        logits = np.asarray(model(jnp.asarray(cur)), np.float64)
        rng, sample_rng = jax.random.split(rng, 2)
        sampled = np.asarray(jax.random.categorical(sample_rng, jnp.asarray(logits, jnp.float32)))
        unknown = cur == MASK
        sampled = np.where(unknown, sampled, cur)
        slots[:, step] = sampled
        ratio = np.float32(step + 1) / np.float32(steps)
        fraction = schedules.mask_ratio(schedule, ratio, unknown_at_start)
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        chosen = np.take_along_axis(probs, np.minimum(sampled, probs.shape[-1] - 1)[..., None],
                                    axis=-1)[..., 0]
        chosen = np.where(unknown, chosen, np.inf)
        mask_len = np.floor(unknown_at_start.astype(np.float32) * fraction)
        mask_len = np.maximum(1, np.minimum(unknown.sum(1) - 1, mask_len)).astype(int)
        rng, choice_rng = jax.random.split(rng)
        noise = np.asarray(jax.random.gumbel(choice_rng, chosen.shape))
        with np.errstate(divide="ignore"):
            confidence = np.log(chosen) + choice_temperature * (1 - ratio) * noise
        cut = np.sort(confidence, axis=1)[np.arange(len(cur)), mask_len]
        cur = np.where(confidence < cut[:, None], MASK, sampled)
        remaining.append((cur == MASK).sum(1))
    return slots, np.stack(remaining)


@pytest.mark.parametrize("steps,start,schedule,tau", [
    (6, 0, "cosine", 4.5), (7, 2, "uniform", 2.0), (5, 0, "pow2.5", 1.0)])
def test_official_preset_matches_hand_written_loop(steps, start, schedule, tau):
    ids = _edit_input(4, seed=5) if start else _all_masked(4)
    key = jax.random.PRNGKey(7)
    config = DecodeConfig(steps=steps, start_step=start, schedule=schedule, choice_temperature=tau,
                          official=True, return_intermediates=True)
    FAKE.log.clear()
    result = _run(FAKE, ids, key, config)
    jax.block_until_ready(result.tokens)
    assert FAKE.log == [4] * (steps - start)  # one batch-B call per executed step
    slots, remaining = _official_reference(FAKE.model, ids, key, steps, start, schedule, tau)
    np.testing.assert_array_equal(result.sequences, slots)
    np.testing.assert_array_equal(result.tokens, slots[:, -1])
    table = schedules.remaining_table(schedule, LENGTH, steps, start)
    unknown = (ids == MASK).sum(1)
    # The official loop leaves its clamp (one mask) after the last step; the static table says 0.
    np.testing.assert_array_equal(remaining[:-1], table[unknown][:, start:-1].T)


@jax.jit
def _both_draws(key, logits):
    ours = token_sampling.categorical(key, logits), token_sampling.gumbel(key, logits.shape)
    theirs = jax.random.categorical(key, logits), jax.random.gumbel(key, logits.shape)
    return ours, theirs


def test_flat_draws_equal_jax_random():
    logits = jax.random.normal(jax.random.key(1), (4, 7))
    for seed in (3, 4):
        ours, theirs = _both_draws(jax.random.key(seed), logits)
        np.testing.assert_array_equal(ours[0], theirs[0])
        np.testing.assert_array_equal(ours[1], theirs[1])


@jax.jit
def _inverse_cdf_draws(keys, logits):
    return token_sampling.sample_per_example(keys, logits)


def test_inverse_cdf_sampler_frequencies_and_log_probs():
    probs = np.array([0.5, 0.3, 0.15, 0.05, 0.0])
    logits = jnp.broadcast_to(jnp.log(jnp.asarray(probs, jnp.float32)), (2, 20000, 5))
    ids, log_probs = _inverse_cdf_draws(example_keys(0, [0, 1]), logits)
    ids = np.asarray(ids)
    frequencies = np.bincount(ids.ravel(), minlength=5) / ids.size
    sigma = np.sqrt(probs * (1 - probs) / ids.size)
    assert np.all(np.abs(frequencies - probs) <= 5 * sigma + 1e-12), frequencies
    np.testing.assert_allclose(np.asarray(log_probs), np.log(probs[ids]), rtol=1e-5)
    assert not np.array_equal(ids[0], ids[1])  # examples draw from their own keys


@pytest.mark.parametrize("config", [PLAIN_CONFIG, GUIDED_CONFIG], ids=["plain", "guided"])
def test_tokens_do_not_depend_on_batch_composition(config):
    ids = _all_masked(4, labels=[0, 1, 2, 3])
    FAKE.log.clear()
    full = np.asarray(_run(FAKE, ids, 21, config).tokens)
    # Guidance doubles the batch of the one call per step.
    assert FAKE.log == [8 if config.guided else 4] * config.steps
    swapped = np.asarray(_run(FAKE, ids[[3, 2]], example_keys(21, [3, 2]), config).tokens)
    head = np.asarray(_run(FAKE, ids[:2], example_keys(21, [0, 1]), config).tokens)
    np.testing.assert_array_equal(full[[3, 2]], swapped)
    np.testing.assert_array_equal(full[:2], head)
    assert not np.array_equal(full[2, 1:], full[3, 1:])


@pytest.mark.parametrize("official", [False, True])
def test_guidance_weight_one_equals_unguided(official):
    ids = _all_masked(4)
    plain = dataclasses.replace(PLAIN_CONFIG, official=official)
    guided = dataclasses.replace(plain, guidance_scale=1.0, guidance_schedule="pow-cosine")
    FAKE.log.clear()
    guided_tokens = np.asarray(_run(FAKE, ids, 5, guided).tokens)
    assert FAKE.log == [8] * plain.steps  # the guided path ran (batch 2B)
    np.testing.assert_array_equal(_run(FAKE, ids, 5, plain).tokens, guided_tokens)


def test_guidance_combines_conditional_and_null_rows():
    rng = np.random.default_rng(6)
    cond, uncond = rng.integers(0, 16, (2, LENGTH))
    null_token = LAYOUT.null_class_id + LAYOUT.codebook_size
    model = OneHotModel(cond, uncond, null_token)
    ids = _all_masked(2)
    # w = 0 is the unconditional model.
    tokens = _run(model, ids, 0, DecodeConfig(steps=3, guidance_scale=0.0)).tokens
    np.testing.assert_array_equal(np.asarray(tokens)[:, 1:],
                                  np.broadcast_to(uncond[1:], (2, LENGTH - 1)))
    # w = 2 sharpens the conditional one; the null class may come from the call.
    plain_layout = TokenLayout(codebook_size=16, num_classes=5)
    tokens = _run(model, ids, 0, DecodeConfig(steps=3, guidance_scale=2.0), layout=plain_layout,
                  null_class_id=4).tokens
    np.testing.assert_array_equal(np.asarray(tokens)[:, 1:],
                                  np.broadcast_to(cond[1:], (2, LENGTH - 1)))


def test_guidance_requires_a_null_class():
    layout = TokenLayout(codebook_size=16, num_classes=5)
    with pytest.raises(ValueError, match="null class"):
        decode(FAKE, _all_masked(1), 0, DecodeConfig(guidance_scale=2.0), layout)


def test_halton_order_reveals_positions_in_halton_order():
    ids = np.concatenate([_all_masked(1), _edit_input(1)])
    sequences = np.asarray(_run(FAKE, ids, 0, HALTON_CONFIG).sequences)
    order = 1 + schedules.halton_order(GRID, GRID)
    ends = np.cumsum(schedules.tokens_per_step("arccos", GRID * GRID, 5))
    for t, end in enumerate(ends):
        revealed = np.flatnonzero(sequences[0, t, 1:] != MASK) + 1
        np.testing.assert_array_equal(np.sort(revealed), np.sort(order[:end]))
    # Editing: known positions are skipped, the unknown ones keep their Halton rank.
    unknown_in_order = [p for p in order if ids[1, p] == MASK]
    ends = np.cumsum(schedules.tokens_per_step("arccos", len(unknown_in_order), 5))
    for t, end in enumerate(ends):
        changed = np.flatnonzero((sequences[1, t] != MASK) & (ids[1] == MASK))
        np.testing.assert_array_equal(np.sort(changed), np.sort(unknown_in_order[:end]))


@pytest.mark.parametrize("options", [dict(top_k=1), dict(top_p=1e-6), dict(temperature=1e-4)])
def test_greedy_limits_sample_the_argmax(options):
    ids = _all_masked(2)
    config = DecodeConfig(steps=4, return_intermediates=True, **options)
    sequences = np.asarray(_run(GREEDY_FAKE, ids, 3, config).sequences)
    previous = ids
    for t in range(4):
        argmax = np.asarray(jnp.argmax(GREEDY_FAKE.model(jnp.asarray(previous)), axis=-1))
        new = (previous == MASK) & (sequences[:, t] != MASK)
        assert new.any()
        np.testing.assert_array_equal(sequences[:, t][new], argmax[new])
        previous = sequences[:, t]


def _filter_reference(logits, top_k=None, top_p=None):
    """Top-k then nucleus filtering written with numpy sorting, one row at a time."""
    out = np.full_like(logits, -np.inf)
    for index in np.ndindex(logits.shape[:-1]):
        row = logits[index].astype(np.float64)
        order = np.argsort(-row, kind="stable")
        keep = order[:top_k] if top_k else order
        if top_p is not None:
            probs = np.exp(row[keep] - row[keep].max())
            probs /= probs.sum()
            before = np.cumsum(probs) - probs
            keep = keep[before < top_p]
        out[index + (keep,)] = logits[index + (keep,)]
    return out


@pytest.mark.parametrize("top_k,top_p", [(3, None), (None, 0.6), (5, 0.7), (None, 1e-6)])
def test_filter_logits_matches_reference(top_k, top_p):
    logits = np.asarray(jax.random.normal(jax.random.key(2), (2, 5, 12)) * 2)
    filter_logits = jax.jit(token_sampling.filter_logits, static_argnums=(2, 3))
    got = np.asarray(filter_logits(jnp.asarray(logits), None, top_k, top_p))
    np.testing.assert_array_equal(got, _filter_reference(logits, top_k, top_p))
    # Temperature applies first (a sharper distribution has a smaller nucleus).
    scaled = filter_logits(jnp.asarray(logits), jnp.float32(0.5), top_k, top_p)
    np.testing.assert_allclose(np.asarray(scaled), _filter_reference(2 * logits, top_k, top_p),
                               rtol=1e-6)


@pytest.mark.parametrize("options,message", [
    (dict(steps=0), "steps"), (dict(steps=4, start_step=4), "start_step"),
    (dict(schedule="cosinus"), "schedule"), (dict(temperature=0.0), "temperature"),
    (dict(top_k=0), "top_k"), (dict(top_p=1.5), "top_p"), (dict(order="random"), "order"),
    (dict(guidance_schedule="cos"), "guidance_schedule"),
    (dict(official=True, order="halton"), "official"), (dict(choice_temperature=-1.), "choice"),
])
def test_invalid_configs_raise(options, message):
    with pytest.raises(ValueError, match=message):
        DecodeConfig(**options)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="ids must be"):
        decode(FAKE, np.zeros((LENGTH,), np.int32), 0, DecodeConfig(), LAYOUT)
    with pytest.raises(ValueError, match="per-example keys"):
        decode(FAKE, _all_masked(3), example_keys(0, [0, 1]), DecodeConfig(), LAYOUT)
    with pytest.raises(ValueError, match="one batch key"):
        decode(FAKE, _all_masked(2), example_keys(0, [0, 1]), DecodeConfig(official=True), LAYOUT)
    with pytest.raises(ValueError, match="codebook size"):
        decode(lambda i: jnp.zeros(i.shape + (8,)), _all_masked(1), 0, DecodeConfig(), LAYOUT)
    with pytest.raises(ValueError, match="grid"):
        odd = np.full((1, 7), MASK, np.int32)
        decode(FAKE, odd, 0, DecodeConfig(order="halton"), LAYOUT)


def test_official_equivalence_with_real_transformer(official_small):
    """maskgen's Transformer + official preset == google-research/maskgit, every slot, every run."""
    path = official_small["_dir"] / "checkpoints" / "maskgit_imagenet128_checkpoint"
    params = flax.serialization.from_bytes(None, path.read_bytes())["params"]
    model = Transformer(vocab_size=75, hidden_size=64, num_layers=2, num_heads=2, mlp_dim=256,
                        max_len=65)
    layout = TokenLayout(codebook_size=64, num_classes=10)

    @jax.jit
    def logits_fn(ids):
        return model.apply({"params": params}, ids, num_logits=layout.codebook_size)

    runs = [("gen_final_seqs", "gen", 8, 0, "cosine", 4.5),
            ("edit_final_seqs", "edit", 12, 2, "cosine", 4.5),
            ("outpaint_final_seqs", "outpaint", 8, 0, "cosine", 4.5)]
    for key in official_small:
        if key.startswith("decode_") and not key.endswith("_mask_len"):
            method, tau = key[len("decode_"):].rsplit("_t", 1)
            runs.append((key, "gen", 8, 0, method, float(tau)))
    assert len(runs) == 9
    for want_key, prefix, steps, start, schedule, tau in runs:
        config = DecodeConfig(steps=steps, start_step=start, schedule=schedule,
                              choice_temperature=tau, official=True, return_intermediates=True)
        result = _decoder(logits_fn, config, layout)(
            jnp.asarray(official_small[f"{prefix}_input_tokens"]),
            jnp.asarray(official_small[f"{prefix}_rng"]))
        want = official_small[want_key]
        want = np.where(want == -1, layout.mask_id, want)
        np.testing.assert_array_equal(result.sequences, want, err_msg=want_key)
        np.testing.assert_array_equal(result.tokens, want[:, -1], err_msg=want_key)
