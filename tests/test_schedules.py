"""Mask schedules, static step counts, Halton order, temperature and guidance tables."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maskgen.scheduler import schedules

ALL_NAMES = ("uniform", "linear", "cosine", "pow1", "square", "pow2.5", "cubic", "log", "exp",
             "arccos")


@pytest.mark.parametrize("total", [64, 256])
def test_mask_ratio_matches_official_values(official_small, total):
    names = [str(name) for name in official_small["sched_methods"]]
    ratios = official_small["sched_ratios"]
    want = official_small[f"sched_values_total{total}"]
    for row, name in enumerate(names):
        host = schedules.mask_ratio(name, ratios, total)
        traced = jax.jit(lambda r, n, name=name: schedules.mask_ratio(name, r, n))(
            jnp.asarray(ratios), jnp.int32(total))
        # The end points are exact (1 and the 1e-6 clip); in between float32 ulps.
        np.testing.assert_allclose(host, want[row], rtol=2e-6, atol=1e-7, err_msg=name)
        np.testing.assert_allclose(np.asarray(traced), want[row], rtol=2e-6, atol=1e-7,
                                   err_msg=name)
        assert host[ratios == 0][0] == want[row][ratios == 0][0]
        assert host[ratios == 1][0] == want[row][ratios == 1][0] == np.float32(1e-6)


def test_aliases_and_arccos():
    r = np.linspace(0, 1, 17, dtype=np.float32)
    for alias, name in [("linear", "uniform"), ("square", "pow2"), ("cubic", "pow3")]:
        np.testing.assert_array_equal(schedules.mask_ratio(alias, r), schedules.mask_ratio(name, r))
    np.testing.assert_allclose(schedules.mask_ratio("square", r),
                               np.clip(1 - r.astype(np.float64) ** 2, 1e-6, 1), rtol=1e-6)
    # arccos(r) / (pi/2): 1 at r=0, 2/3 at r=1/2, clipped to 1e-6 at r=1.
    values = schedules.mask_ratio("arccos", np.array([0., .5, 1.], np.float32))
    np.testing.assert_allclose(values, [1., 2. / 3., 1e-6], rtol=1e-6)


@pytest.mark.parametrize("name", ALL_NAMES)
def test_schedules_are_monotone_and_bounded(name):
    r = np.linspace(0, 1, 201, dtype=np.float32)
    values = schedules.mask_ratio(name, r, 256)
    start = np.float32(1 - 1 / 256) if name == "exp" else 1.0  # exp starts at 1 - 1/N
    assert values[0] == start and values[-1] == np.float32(1e-6)
    assert np.all(values >= np.float32(1e-6)) and np.all(values <= 1.0)
    assert np.all(np.diff(values) <= 0), f"{name} is not non-increasing"


def test_bad_schedule_names_and_missing_count():
    for bad in ("cosin", "pow", "pow-1", "powx", "", "pow0"):
        with pytest.raises(ValueError, match="schedule"):
            schedules.mask_ratio(bad, 0.5)
    with pytest.raises(ValueError, match="num_unknown"):
        schedules.mask_ratio("log", 0.5)
    with pytest.raises(ValueError, match="num_unknown >= 2"):
        schedules.mask_ratio("exp", 0.5, 1)


def test_official_token_counts():
    # Tokens revealed per step as the official loop produces them (official_layout.md section 5).
    expected = {
        (256, 8): [5, 15, 24, 31, 39, 45, 48, 49],
        (256, 12): [3, 6, 11, 15, 18, 22, 26, 28, 30, 31, 33, 33],
        (256, 16): [2, 3, 7, 8, 11, 13, 15, 16, 19, 20, 22, 23, 23, 25, 24, 25],
        (1024, 12): [9, 26, 43, 60, 74, 88, 101, 112, 120, 126, 132, 133],
    }
    for (total, steps), counts in expected.items():
        np.testing.assert_array_equal(schedules.tokens_per_step("cosine", total, steps), counts)


def _check_remaining(official_small, prefix, mask_len_key, steps, start, schedule="cosine"):
    inputs = official_small[f"{prefix}_input_tokens"]
    unknown = (inputs == -1).sum(axis=1)
    table = schedules.remaining_table(schedule, inputs.shape[1], steps, start)
    official = official_small[mask_len_key]  # [executed steps, B]; last step's is the clamp 1
    got = table[unknown][:, start:steps - 1].T
    np.testing.assert_array_equal(got, official[:-1], err_msg=mask_len_key)


def test_remaining_counts_match_official_runs(official_small):
    _check_remaining(official_small, "gen", "gen_step_mask_len", 8, 0)
    _check_remaining(official_small, "outpaint", "outpaint_step_mask_len", 8, 0)
    # Editing: per-example unknown counts, starting at step 2 of 12.
    _check_remaining(official_small, "edit", "edit_step_mask_len", 12, 2)
    for key in official_small:
        if key.startswith("decode_") and key.endswith("_mask_len"):
            method = key[len("decode_"):].rsplit("_t", 1)[0]
            _check_remaining(official_small, "gen", key, 8, 0, method)


@pytest.mark.parametrize("name", ["cosine", "uniform", "pow2.5", "log", "exp", "arccos"])
def test_counts_sum_to_n_and_follow_the_official_clamp(name):
    for steps, start in [(1, 0), (5, 0), (8, 3), (16, 0), (12, 11)]:
        table = schedules.count_table(name, 70, steps, start)
        remaining = schedules.remaining_table(name, 70, steps, start)
        np.testing.assert_array_equal(table.sum(axis=1), np.arange(71))
        assert np.all(table >= 0)
        assert np.all(table[:, :start] == 0)
        before = np.arange(71)[:, None] - np.cumsum(table, axis=1) + table
        # Official clamp [1, unknown - 1]: a step reveals >= 1 token while >= 2 are
        # masked, and keeps one masked for the last step.
        executed = np.zeros(steps, bool)
        executed[start:steps - 1] = True
        assert np.all(table[:, executed][before[:, executed] >= 2] >= 1), (name, steps, start)
        assert np.all(remaining[1:, executed] >= 1), (name, steps, start)
        assert np.all(remaining[:, -1] == 0)


def test_count_argument_errors():
    with pytest.raises(ValueError, match="start_step"):
        schedules.tokens_per_step("cosine", 16, 4, start_step=4)
    with pytest.raises(ValueError, match="num_steps"):
        schedules.tokens_per_step("cosine", 16, 0)
    with pytest.raises(ValueError, match="num_unknown"):
        schedules.tokens_per_step("cosine", -1, 4)


def test_choice_temperatures_match_official(official_small):
    np.testing.assert_array_equal(schedules.choice_temperatures(4.5, 8),
                                  official_small["gen_step_choice_temperature"])
    # The official 12-step run went through XLA's reciprocal rewrite: ulp-level only.
    np.testing.assert_allclose(schedules.choice_temperatures(4.5, 12)[2:],
                               official_small["edit_step_choice_temperature"], atol=1e-6)


@pytest.mark.parametrize("height,width", [(8, 8), (16, 16), (5, 7), (1, 1), (3, 1)])
def test_halton_visits_every_position_once(height, width):
    order = schedules.halton_order(height, width)
    assert order.shape == (height * width,)
    np.testing.assert_array_equal(np.sort(order), np.arange(height * width))


def test_halton_order_values_and_spread():
    # Points (radical inverse base 2, base 3) for i = 0..4 on an 8x8 grid:
    # (0,0) (1/2,1/3) (1/4,2/3) (3/4,1/9) (1/8,4/9) -> rows 0,4,2,6,1 / cols 0,2,5,0,3.
    np.testing.assert_array_equal(schedules.halton_order(8, 8)[:5], [0, 34, 21, 48, 11])
    # Low discrepancy: the first 16 positions of a 16x16 grid use 16 distinct rows
    # (base-2 strata), the first 9 use 9 distinct columns (base-3 strata).
    order = schedules.halton_order(16, 16)
    assert len(set(order[:16] // 16)) == 16
    assert len(set(order[:9] % 16)) == 9
    with pytest.raises(ValueError, match="grid"):
        schedules.halton_order(0, 4)


def test_guidance_and_temperature_ramps():
    np.testing.assert_array_equal(schedules.guidance_scales("constant", 3.0, 4), [3.0] * 4)
    np.testing.assert_allclose(schedules.guidance_scales("linear", 3.0, 4), [1.0, 1.5, 2.0, 2.5])
    cosine = schedules.guidance_scales("pow-cosine", 3.0, 8)
    assert cosine[0] == 1.0 and np.all(np.diff(cosine) > 0) and cosine[-1] < 3.0
    np.testing.assert_allclose(cosine[4], 1 + 2 * (1 - math.cos(math.pi * 0.5 ** 2.75)) / 2,
                               rtol=1e-6)
    for name in schedules.GUIDANCE_SCHEDULES:
        np.testing.assert_array_equal(schedules.guidance_scales(name, 1.0, 5), np.ones(5))
    with pytest.raises(ValueError, match="guidance schedule"):
        schedules.guidance_scales("cos", 2.0, 4)
    np.testing.assert_allclose(schedules.linear_ramp(1.0, 0.5, 3), [1.0, 0.75, 0.5])
    np.testing.assert_array_equal(schedules.linear_ramp(0.7, None, 2), np.float32([0.7, 0.7]))
