"""Class-conditional generation from a trained (or converted) model bundle.

`Sampler` compiles one program per (decoding options, batch size): tokens are
decoded by the scheduler and turned into uint8 pixels by the tokenizer inside
the same jit. Examples get keys fold_in(key(seed), global index), so a sample
does not change with the batch size used to produce it.
"""
import dataclasses
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from maskgen import scheduler
from maskgen.scheduler import DecodeConfig, RecapConfig

# The `sampling` block's defaults: configs/common.py starts from these, and a
# bundle without a `sampling` block (an official checkpoint) decodes with them.
SAMPLING_DEFAULTS = dict(
    steps=12, schedule="cosine", choice_temperature=4.5, temperature=1.0, temperature_end=None,
    top_k=0, top_p=1.0, guidance_scale=1.0, guidance_schedule="constant", order="confidence",
    recap_full_only_steps=0, recap_cheap_per_full=0)


def sampling_block(sampling: Any | None = None) -> dict:
    """A `sampling` block with every key present: the given entries over SAMPLING_DEFAULTS.

    Unknown keys raise, so a typo in an override does not silently decode with a default.
    """
    given = dict(sampling or {})
    unknown = sorted(set(given) - set(SAMPLING_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown sampling keys {unknown}; known: {sorted(SAMPLING_DEFAULTS)}")
    return {**SAMPLING_DEFAULTS, **given}


def decode_config_from(sampling: Any, token_grid: tuple[int, int], **overrides: Any) -> DecodeConfig:
    """DecodeConfig from a config's `sampling` block (+ keyword overrides).

    The one reader of the block's decoding keys: training-time samples, `sample.py`,
    the quality report and the editing API all come through here.
    """
    s = sampling_block(sampling)
    guidance = s.get("guidance_scale")
    options = dict(
        steps=int(s["steps"]), schedule=s["schedule"], choice_temperature=float(s["choice_temperature"]),
        temperature=float(s["temperature"]), temperature_end=s.get("temperature_end"),
        top_k=s.get("top_k") or None, top_p=None if s.get("top_p", 1.0) >= 1.0 else float(s["top_p"]),
        guidance_scale=None if guidance is None or float(guidance) == 1.0 else float(guidance),
        guidance_schedule=s.get("guidance_schedule", "constant"), order=s.get("order", "confidence"),
        grid_shape=tuple(token_grid))
    options.update(overrides)
    return DecodeConfig(**options)


def recap_config_from(sampling: Any, **overrides: Any) -> Optional[RecapConfig]:
    """RecapConfig from a config's `sampling` block; None when K (cheap per full) is 0."""
    given = {**dict(sampling or {}), **overrides}
    s = sampling_block(given)
    values = {}
    for key in ("recap_cheap_per_full", "recap_full_only_steps"):
        value = s.get(key) or 0
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"sampling.{key} (--{key}) must be a non-negative integer, got {value!r}")
        values[key] = value
    steps = given.get("steps")  # only a known step count; the editing CLI passes none
    if steps is not None and values["recap_full_only_steps"] > int(steps):
        raise ValueError(f"sampling.recap_full_only_steps (--recap_full_only_steps) = "
                         f"{values['recap_full_only_steps']} is larger than the decoding steps "
                         f"(sampling.steps / --steps) = {steps}")
    if values["recap_cheap_per_full"] == 0:
        return None
    return RecapConfig(full_only_steps=values["recap_full_only_steps"],
                       cheap_steps=values["recap_cheap_per_full"])


def to_uint8(images: jax.Array) -> jax.Array:
    return jnp.round(jnp.clip(images, 0.0, 1.0) * 255.0).astype(jnp.uint8)


@dataclasses.dataclass
class Sampler:
    """Decodes token sequences with a bundle's transformer and renders them with its tokenizer."""
    bundle: object
    decode_config: DecodeConfig
    recap: Optional[RecapConfig] = None

    def __post_init__(self) -> None:
        self._jitted = jax.jit(self._run)

    def _logit_fns(self, params: Any) -> tuple[Callable, Callable, Callable]:
        model, n = self.bundle.transformer, self.bundle.layout.codebook_size
        variables = {"params": params["transformer"]}
        full = lambda ids: model.apply(variables, ids, num_logits=n, method="forward_with_kv")  # noqa: E731
        cheap = lambda ids, pos, kv: model.apply(  # noqa: E731
            variables, ids, pos, kv, num_logits=n, method="forward_subset")
        plain = lambda ids: model.apply(variables, ids, num_logits=n)  # noqa: E731
        return plain, full, cheap

    def _run(self, params: Any, ids: jax.Array, keys: jax.Array) -> tuple[jax.Array, jax.Array]:
        plain, full, cheap = self._logit_fns(params)
        layout = self.bundle.layout
        if self.recap is None:
            result = scheduler.decode(plain, ids, keys, self.decode_config, layout)
        else:
            result = scheduler.decode_recap(full, cheap, ids, keys, self.decode_config, layout, self.recap)
        h, w = self.bundle.token_grid
        tokens = result.tokens[:, 1:].reshape(ids.shape[0], h, w)
        images = self.bundle.tokenizer.apply(
            {"params": params["tokenizer"]}, tokens, method="decode_from_indices")
        return tokens, to_uint8(images)

    def decode_ids(self, ids: jax.Array, keys: jax.Array) -> jax.Array:
        """ids [B, L] (class token at 0, unknown = mask id) -> (tokens [B,h,w], uint8 images)."""
        return self._jitted(self.bundle.params, jnp.asarray(ids, jnp.int32), keys)

    def generate(self, labels: jax.typing.ArrayLike, seed: int = 0, batch_size: int = 64,
                 progress: bool = True) -> dict:
        """Samples one image per label. Returns images uint8 [N,H,W,C], labels [N], tokens [N,h,w].

        Every batch is padded to `batch_size` so one program serves all batches.
        """
        layout = self.bundle.layout
        labels = layout.check_labels(np.asarray(labels, np.int64).reshape(-1))
        n = len(labels)
        length = 1 + int(np.prod(self.bundle.token_grid))
        tokens, images = [], []
        batch_size = max(1, min(batch_size, n))
        start = time.perf_counter()
        for lo in tqdm(range(0, n, batch_size), desc="sampling", disable=not progress, unit="batch"):
            idx = np.arange(lo, lo + batch_size)
            real = idx < n
            idx = np.where(real, idx, n - 1)
            ids = np.full((batch_size, length), layout.mask_id, np.int32)
            ids[:, 0] = labels[idx] + layout.codebook_size
            keys = scheduler.example_keys(seed, idx)
            t, im = self.decode_ids(ids, keys)
            tokens.append(np.asarray(t)[real])
            images.append(np.asarray(im)[real])
        seconds = time.perf_counter() - start
        return {"images": np.concatenate(images), "labels": labels.astype(np.int32),
                "tokens": np.concatenate(tokens).astype(np.int32), "seconds": seconds,
                "images_per_s": n / seconds}
