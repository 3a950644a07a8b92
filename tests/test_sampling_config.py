"""`cfg.sampling` has one reader: every key reaches decoding, in training samples and in `sample.py`."""
import os
import sys

import pytest

from maskgen import editing, sampling
from maskgen.models.sizes import token_grid, token_layout
from maskgen.training import transformer_stage

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "configs"))
import debug  # noqa: E402

# A value different from the default for every decoding key (ReCAP keys are read by recap_config_from).
CHANGED = dict(steps=7, schedule="linear", choice_temperature=2.0, temperature=0.8, temperature_end=0.5,
               top_k=5, top_p=0.9, guidance_scale=3.0, guidance_schedule="linear", order="halton")
RECAP_CHANGED = dict(recap_full_only_steps=2, recap_cheap_per_full=1)


def test_every_sampling_key_is_covered_here():
    assert set(CHANGED) | set(RECAP_CHANGED) == set(sampling.SAMPLING_DEFAULTS)


def test_config_defaults_are_the_shared_defaults():
    cfg = debug.get_config()
    block = {k: v for k, v in cfg.sampling.to_dict().items()}
    expected = dict(sampling.SAMPLING_DEFAULTS, steps=cfg.sampling.steps)  # debug.py edits steps only
    assert block == expected
    assert editing.DEFAULT_SAMPLING == sampling.SAMPLING_DEFAULTS


@pytest.mark.parametrize("key", sorted(CHANGED))
def test_training_samples_use_every_sampling_key(key):
    cfg = debug.get_config()  # null_class=True, so guidance is allowed
    layout = token_layout(cfg)
    base = transformer_stage.decode_config(cfg, layout)
    with cfg.unlocked():
        cfg.sampling[key] = CHANGED[key]
    changed = transformer_stage.decode_config(cfg, layout)
    assert changed != base, f"sampling.{key} does not reach the training-time decoder"
    assert changed == sampling.decode_config_from(cfg.sampling, token_grid(cfg))


def test_temperature_end_reaches_training_samples():
    cfg = debug.get_config()
    with cfg.unlocked():
        cfg.sampling.temperature_end = 0.25
    assert transformer_stage.decode_config(cfg, token_layout(cfg)).temperature_end == 0.25


def test_guidance_is_off_without_a_null_class():
    cfg = debug.get_config()
    with cfg.unlocked():
        cfg.null_class = False
        cfg.sampling.guidance_scale = 3.0
    assert transformer_stage.decode_config(cfg, token_layout(cfg)).guidance_scale is None


def test_recap_keys_are_read():
    assert sampling.recap_config_from(sampling.SAMPLING_DEFAULTS) is None
    recap = sampling.recap_config_from(dict(sampling.SAMPLING_DEFAULTS, **RECAP_CHANGED))
    assert (recap.full_only_steps, recap.cheap_steps) == (2, 1)


def test_unknown_sampling_key_is_refused():
    with pytest.raises(ValueError, match="unknown sampling keys.*'stpes'"):
        sampling.decode_config_from({"stpes": 3}, (2, 2))
