"""Image editing with a trained MaskGIT: inpainting, outpainting, class-conditional re-generation.

`model` is a bundle as returned by `maskgen.load` (tokenizer, transformer,
params, config, layout, image_shape, token_grid). Every edit runs the same way:
tokenise the image, mark the tokens to regenerate with the mask id, put the
class token in front, let the scheduler decode the unknown tokens (known tokens
never change), render the token grid, and optionally paste the untouched input
pixels back.

Which tokens are regenerated (inpainting / class edits): every token whose
f x f pixel patch (f = tokenizer downsampling factor) touches a masked pixel,
grown by `dilation` tokens (default 1) in every direction; see `maskgen.masks`.
With paste-back on, pixels outside those tokens are returned bit for bit, the
masked pixels come from the model, and a `feather`-pixel ramp inside the
regenerated tokens blends the two.

Outpainting puts the image's tokens on a larger grid. The transformer only
knows its training grid, so the canvas is filled window by window (training-size
windows that overlap, each decoding its unknown tokens given the known ones, as
the MaskGIT paper extrapolates); the tokenizer decoder is convolutional and
renders the whole canvas at once.

Images: numpy arrays [H, W] or [H, W, C], uint8 (or another integer type, values
0..255) or float in [0, 1], or PIL images; results use the same type, dtype and
layout. All geometry is checked on the host before anything runs, so bad input
fails fast with a ValueError naming the problem.
"""
import dataclasses
import functools
from typing import Any, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from maskgen import masks, scheduler
from maskgen.sampling import SAMPLING_DEFAULTS, decode_config_from, recap_config_from, sampling_block
from maskgen.scheduler import DecodeConfig, RecapConfig
from maskgen.scheduler.keys import as_key_array

# Used when a bundle carries no `sampling` config block (kept as a public name).
DEFAULT_SAMPLING = SAMPLING_DEFAULTS
# The official class-editing demo decodes 12 steps starting at step 2.
EDIT_STEPS, EDIT_START_STEP = 12, 2


@dataclasses.dataclass
class EditResult:
    """What an edit returns; fields also read as `result["image"]`.

    image: the edited image (input's type, dtype and layout; the canvas for outpainting).
    generated: the raw render of `tokens_after` (same convention), before any paste-back.
    tokens_before: int32 [h, w] tokens of the input. tokens_after: int32 tokens of the result
    ([h, w], or the canvas grid for outpainting). token_mask: bool, True = generated.
    offset / pixel_offset: (top, left) of the input inside the result, in tokens / pixels.
    """
    image: object
    generated: object
    tokens_before: np.ndarray
    tokens_after: np.ndarray
    token_mask: np.ndarray
    class_id: Optional[int]
    offset: Tuple[int, int] = (0, 0)
    pixel_offset: Tuple[int, int] = (0, 0)

    def keys(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self)]

    def __getitem__(self, name: str) -> Any:
        if name not in self.keys():
            raise KeyError(name)
        return getattr(self, name)

    def __contains__(self, name: str) -> bool:
        return name in self.keys()


# ----------------------------------------------------------------------------- images

@dataclasses.dataclass(frozen=True)
class _Convention:
    """How the caller passed the image, so results come back the same way."""
    pil_mode: Optional[str]
    dtype: np.dtype
    squeeze: bool


def _read_image(image: Image.Image | jax.typing.ArrayLike, channels: int) -> tuple[np.ndarray, _Convention]:
    """Image -> (float64 [H, W, C] in [0, 1], convention)."""
    if isinstance(image, Image.Image):
        mode = "L" if channels == 1 else "RGB"
        array = np.asarray(image.convert(mode))
        convention = _Convention(mode, np.dtype(np.uint8), channels == 1)
    else:
        array = np.asarray(image)
        convention = _Convention(None, array.dtype, array.ndim == 2)
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3:
        raise ValueError(f"image must be [H, W] or [H, W, C], got shape {array.shape}")
    if array.shape[-1] != channels:
        raise ValueError(f"image has {array.shape[-1]} channels, the model expects {channels}")
    if np.issubdtype(array.dtype, np.integer) and array.dtype != bool:
        if array.size and (array.min() < 0 or array.max() > 255):
            raise ValueError(f"integer images must hold values 0..255, got {array.min()}..{array.max()}")
        return array.astype(np.float64) / 255.0, convention
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ValueError("image contains NaN or infinite values")
        if array.size and (array.min() < 0.0 or array.max() > 1.0):
            raise ValueError(f"float images must lie in [0, 1], got {array.min():.3g}..{array.max():.3g}")
        return array.astype(np.float64), convention
    raise ValueError(f"image dtype {array.dtype} is not supported: use uint8 or float in [0, 1]")


def _write_image(pixels: np.ndarray, convention: _Convention) -> Image.Image | np.ndarray:
    """float [H, W, C] in [0, 1] -> the caller's convention."""
    if convention.pil_mode is not None or np.issubdtype(convention.dtype, np.integer):
        out = np.round(np.clip(pixels, 0.0, 1.0) * 255.0).astype(convention.dtype)
    else:
        out = pixels.astype(convention.dtype)
    if convention.squeeze:
        out = out[..., 0]
    return Image.fromarray(out, convention.pil_mode) if convention.pil_mode else out


def _resize_image(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    print(f"maskgen.editing: resizing the image from {pixels.shape[0]}x{pixels.shape[1]} to "
          f"{height}x{width}, the model's resolution")
    resized = jax.image.resize(jnp.asarray(pixels, jnp.float32), (height, width, pixels.shape[2]),
                               method="cubic", antialias=True)
    return np.clip(np.asarray(resized, np.float64), 0.0, 1.0)


def _resize_mask(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """Area resize: a target pixel is masked when its footprint holds any masked pixel."""
    image = Image.fromarray(mask.astype(np.uint8) * 255, "L")
    return np.asarray(image.resize((width, height), Image.Resampling.BOX)) > 0


def _size_error(size: tuple[int, int], model_size: tuple[int, int]) -> ValueError:
    return ValueError(f"image is {size[0]}x{size[1]} pixels, the model works at {model_size[0]}x"
                      f"{model_size[1]}: resize it first or pass resize=True "
                      "(--resize with sample.py --edit)")


# ----------------------------------------------------------------------------- model calls

@functools.partial(jax.jit, static_argnums=0)
def _encode(tokenizer: Any, params: Any, images: jax.Array) -> jax.Array:
    return tokenizer.apply({"params": params}, images, method="encode_to_indices")


@functools.partial(jax.jit, static_argnums=0)
def _render(tokenizer: Any, params: Any, tokens: jax.Array) -> jax.Array:
    images = tokenizer.apply({"params": params}, tokens, method="decode_from_indices")
    return jnp.clip(images, 0.0, 1.0)


def _decode_sequence(params: Any, ids: jax.Array, key: jax.Array, transformer: Any, layout: Any,
                     config: DecodeConfig, recap: RecapConfig | None) -> jax.Array:
    """ids [1, L] with unknown = mask id -> decoded ids [1, L]."""
    variables = {"params": params}
    n = layout.codebook_size
    if recap is None:
        logits = lambda x: transformer.apply(variables, x, num_logits=n)  # noqa: E731
        return scheduler.decode(logits, ids, key, config, layout).tokens
    full = lambda x: transformer.apply(variables, x, num_logits=n, method="forward_with_kv")  # noqa: E731
    cheap = lambda x, pos, kv: transformer.apply(  # noqa: E731
        variables, x, pos, kv, num_logits=n, method="forward_subset")
    return scheduler.decode_recap(full, cheap, ids, key, config, layout, recap).tokens


@functools.partial(jax.jit, static_argnames=("transformer", "layout", "config", "recap"))
def _decode_windows(params: Any, canvas: jax.Array, origins: jax.Array, keys: jax.Array, class_token: jax.Array, *,
                    transformer: Any, layout: Any, config: DecodeConfig,
                    recap: RecapConfig | None) -> jax.Array:
    """Decodes the unknown tokens of canvas [Hc, Wc] window by window (one XLA loop).

    origins [n, 2]: window corners in order; keys [n]: one key per window. Each
    window is a training-size token grid; its decoded tokens are written back
    before the next window reads the canvas.
    """
    window = config.grid_shape

    def body(i: int, canvas: jax.Array) -> jax.Array:
        corner = (origins[i, 0], origins[i, 1])
        tokens = jax.lax.dynamic_slice(canvas, corner, window)
        ids = jnp.concatenate([class_token[None], tokens.reshape(-1)])[None]
        decoded = _decode_sequence(params, ids, keys[i], transformer, layout, config, recap)
        return jax.lax.dynamic_update_slice(canvas, decoded[0, 1:].reshape(window), corner)

    return jax.lax.fori_loop(0, origins.shape[0], body, canvas)


# ----------------------------------------------------------------------------- options

def _sampling_block(model: Any) -> dict:
    config = getattr(model, "config", None)
    if config is not None and "sampling" in config:
        return sampling_block(config["sampling"])
    return sampling_block()


def _int_option(value: Any, name: str) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return int(value)


def decoding_options(model: Any, steps: int | None = None, start_step: int | None = None,
                     guidance: float | None = None,
                     recap: RecapConfig | bool | None = None,
                     decode_config: Optional[DecodeConfig] = None,
                     **options: Any) -> tuple[DecodeConfig, RecapConfig | None]:
    """(DecodeConfig, RecapConfig or None) for an edit: the model's `sampling` block + overrides.

    guidance: classifier-free guidance scale (1 = off). recap: None = the config's
    setting, False = off, or a RecapConfig. decode_config replaces the config block
    (e.g. `DecodeConfig.official_maskgit(12, 2)`); `options` are DecodeConfig fields.
    """
    known = {f.name for f in dataclasses.fields(DecodeConfig)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"unknown decoding option {unknown[0]!r}; DecodeConfig fields are "
                         f"{sorted(known)}")
    overrides = dict(options)
    if steps is not None:
        overrides["steps"] = _int_option(steps, "steps")
    if start_step is not None:
        overrides["start_step"] = _int_option(start_step, "start_step")
    if guidance is not None:
        overrides["guidance_scale"] = None if float(guidance) == 1.0 else float(guidance)
    overrides["return_intermediates"] = False
    grid = tuple(int(s) for s in model.token_grid)
    sampling = _sampling_block(model)
    if decode_config is None:
        config = decode_config_from(sampling, grid, **overrides)
    else:
        config = dataclasses.replace(decode_config, **overrides)
    config = dataclasses.replace(config, grid_shape=grid)
    if recap is None:
        recap = None if config.official else recap_config_from(sampling)
    elif recap is False:
        recap = None
    elif not isinstance(recap, RecapConfig):
        raise ValueError(f"recap must be None, False or a RecapConfig, got {recap!r}")
    if recap is not None and config.official:
        raise ValueError("ReCAP runs in maskgen mode; the official preset has no step groups")
    return config, recap


def _class_token(layout: Any, class_id: int | None) -> int:
    """Token of `class_id`; None means the null class (unconditional) where the model has one."""
    if class_id is None:
        if layout.null_class_id is None:
            raise ValueError("class_id is required: this model has no null class for "
                             "unconditional edits")
        return layout.null_class_id + layout.codebook_size
    class_id = _int_option(class_id, "class_id")
    layout.check_labels([class_id])
    return class_id + layout.codebook_size


def _keys(seed: int, count: int) -> jax.Array:
    """`count` window keys: the seed's key itself for one window, fold_in(key, i) for several."""
    key = as_key_array(seed)
    if key.ndim != 0:
        raise ValueError(f"seed must be an int or one PRNG key, got keys of shape {key.shape}")
    if count == 1:
        return key[None]
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, jnp.arange(count))


def _run(model: Any, canvas: jax.Array, origins: jax.Array, seed: int, class_token: int,
         config: DecodeConfig, recap: RecapConfig | None) -> np.ndarray:
    layout = model.layout
    tokens = _decode_windows(
        model.params["transformer"], jnp.asarray(canvas, jnp.int32), jnp.asarray(origins, jnp.int32),
        _keys(seed, len(origins)), jnp.asarray(class_token, jnp.int32),
        transformer=model.transformer, layout=layout, config=config, recap=recap)
    return np.asarray(tokens, np.int32)


def _tokenise(model: Any, pixels: jax.Array) -> np.ndarray:
    ids = _encode(model.tokenizer, model.params["tokenizer"], jnp.asarray(pixels[None], jnp.float32))
    return np.asarray(ids[0], np.int32)


def _pixels_of(model: Any, tokens: jax.Array) -> np.ndarray:
    images = _render(model.tokenizer, model.params["tokenizer"], jnp.asarray(tokens[None], jnp.int32))
    return np.asarray(images[0], np.float64)


# ----------------------------------------------------------------------------- edits

def inpaint(model: Any, image: Image.Image | jax.typing.ArrayLike, mask: jax.typing.ArrayLike,
            class_id: int | None = None, seed: int = 0, steps: int | None = None,
            start_step: int | None = None, guidance: float | None = None,
            recap: RecapConfig | bool | None = None, paste_back: bool = True, feather: Optional[int] = None,
            dilation: int = 1,
            resize: bool = False, decode_config: Optional[DecodeConfig] = None,
            **decode_options: Any) -> EditResult:
    """Regenerates the masked part of `image`, conditioned on class `class_id`.

    mask: bool [H, W] (True = regenerate; 0/1 numbers work too) or a pixel box
    (top, left, height, width). Tokens touching masked pixels, dilated by
    `dilation` tokens, are decoded; all other tokens stay exactly as tokenised.
    class_id: a class of the model; None = the null class (unconditional), when
    the model has one. seed: int or PRNG key. steps / start_step / guidance /
    recap / decode_config / decode_options: decoding (see `decoding_options`).
    paste_back: keep the input's pixels outside the regenerated tokens and blend over
    `feather` pixels (default f) inside them. resize: resize images (and masks) of
    another size to the model's resolution instead of raising; results are then at
    the model's resolution. An empty mask returns the input and its tokens without
    decoding; a mask covering every token raises (nothing to keep: use sampling).
    """
    height, width, channels = (int(s) for s in model.image_shape)
    factor = int(model.tokenizer.downsample_factor)
    pixels, convention = _read_image(image, channels)
    given = pixels.shape[:2]
    pixels_mask = masks.pixel_mask(mask, *given)
    if given != (height, width):
        if not resize:
            raise _size_error(given, (height, width))
        pixels = _resize_image(pixels, height, width)
        pixels_mask = _resize_mask(pixels_mask, height, width)
    regenerate = masks.token_mask(pixels_mask, factor, dilation)
    if regenerate.all():
        raise ValueError("nothing to keep: the mask (after dilation) covers every token; use "
                         "sampling to generate a whole image, or lower dilation")
    class_token = _class_token(model.layout, class_id)
    config, recap = decoding_options(model, steps, start_step, guidance, recap, decode_config,
                                     **decode_options)
    feather = factor if feather is None else feather
    weights = masks.inpaint_weights(regenerate, pixels_mask, factor, feather)

    before = _tokenise(model, pixels)
    if regenerate.any():
        canvas = np.where(regenerate, model.layout.mask_id, before)
        after = _run(model, canvas, np.zeros((1, 2), np.int32), seed, class_token, config, recap)
    else:
        after = before
    generated = _pixels_of(model, after)
    if not regenerate.any():
        result = pixels
    elif paste_back:
        result = masks.blend(pixels, generated, weights)
    else:
        result = generated
    return EditResult(image=_write_image(result, convention),
                      generated=_write_image(generated, convention), tokens_before=before,
                      tokens_after=after, token_mask=regenerate, class_id=class_id)


def edit_class(model: Any, image: Image.Image | jax.typing.ArrayLike, box: Any, class_id: int | None,
               seed: int = 0,
               steps: int | None = None,
               start_step: int | None = None,
               **kwargs: Any) -> EditResult:
    """Re-generates the region `box` (or a pixel mask) as class `class_id`.

    Like the official demo, decoding skips the first steps (the region is not
    blank: its surroundings are known): by default 12 steps from step 2, or
    `sampling.edit_steps` / `sampling.edit_start_step` from the model config.
    With `steps` alone, start_step keeps that proportion. Other keyword arguments
    as for `inpaint`.
    """
    if class_id is None:
        raise ValueError("edit_class needs the target class_id")
    sampling = _sampling_block(model)
    edit_steps = int(sampling.get("edit_steps", EDIT_STEPS))
    edit_start = int(sampling.get("edit_start_step", EDIT_START_STEP))
    if steps is None:
        steps = edit_steps
        start_step = edit_start if start_step is None else start_step
    elif start_step is None:
        steps = _int_option(steps, "steps")
        start_step = min(steps - 1, int(round(steps * edit_start / edit_steps)))
    return inpaint(model, image, box, class_id, seed=seed, steps=steps, start_step=start_step,
                   **kwargs)


def _to_tokens(value: Any, factor: int, unit: str, name: str) -> Any:
    """Pixel (or token) lengths -> tokens; pixels must be whole tokens."""
    if value is None:
        return None
    scalar = np.ndim(value) == 0
    values = [value] if scalar else list(value)
    out = []
    for v in values:
        v = _int_option(v, name)
        if unit == "pixels":
            if v % factor:
                raise ValueError(f"{name} {v} pixels is not a multiple of the token size {factor}")
            v //= factor
        out.append(v)
    return out[0] if scalar else tuple(out)


def outpaint(model: Any, image: Image.Image | jax.typing.ArrayLike, class_id: int | None = None,
             direction: str | None = None,
             amount: float | None = None,
             canvas: jax.typing.ArrayLike | None = None, offset: int | None = None,
             unit: str = "pixels", seed: int = 0, steps: int | None = None, start_step: int | None = None,
             guidance: float | None = None, recap: RecapConfig | bool | None = None,
             overlap: int | None = None, paste_back: bool = True, feather: Optional[int] = None,
             resize: bool = False, decode_config: Optional[DecodeConfig] = None,
             **decode_options: Any) -> EditResult:
    """Extends `image` onto a larger canvas and generates the new area.

    Either `direction` ("left", "right", "up", "down", or several, e.g. "left,right")
    with `amount` (default half the image on that axis), or a target `canvas`
    (height, width) with the image at `offset` (top, left; default centred).
    Sizes are in `unit` = "pixels" (multiples of the token size f) or "tokens".
    The image may be smaller than the model's resolution (sides multiples of f);
    larger or odd sizes need resize=True. The canvas must hold at least one
    training-size window; it is decoded in windows that overlap by `overlap` tokens
    (default half a window). paste_back keeps the input pixels, blended over
    `feather` pixels (default f // 2) inside the input's border.
    """
    if unit not in ("pixels", "tokens"):
        raise ValueError(f"unit must be 'pixels' or 'tokens', got {unit!r}")
    height, width, channels = (int(s) for s in model.image_shape)
    factor = int(model.tokenizer.downsample_factor)
    pixels, convention = _read_image(image, channels)
    size = pixels.shape[:2]
    if size[0] > height or size[1] > width or size[0] % factor or size[1] % factor:
        if not resize:
            raise _size_error(size, (height, width))
        pixels = _resize_image(pixels, height, width)
    image_tokens = (pixels.shape[0] // factor, pixels.shape[1] // factor)
    canvas, offset = masks.outpaint_canvas(
        image_tokens, direction, _to_tokens(amount, factor, unit, "amount"),
        _to_tokens(canvas, factor, unit, "canvas"), _to_tokens(offset, factor, unit, "offset"))
    known = np.zeros(canvas, bool)
    known[offset[0]:offset[0] + image_tokens[0], offset[1]:offset[1] + image_tokens[1]] = True
    origins = masks.window_plan(known, tuple(model.token_grid), offset, overlap)
    class_token = _class_token(model.layout, class_id)
    config, recap = decoding_options(model, steps, start_step, guidance, recap, decode_config,
                                     **decode_options)
    feather = factor // 2 if feather is None else feather
    weights = masks.outpaint_weights(~known, factor, feather) if paste_back else None

    before = _tokenise(model, pixels)
    ids = np.full(canvas, model.layout.mask_id, np.int32)
    ids[known] = before.reshape(-1)
    after = _run(model, ids, origins, seed, class_token, config, recap)
    generated = _pixels_of(model, after)
    top, left = offset[0] * factor, offset[1] * factor
    if paste_back:
        placed = np.zeros_like(generated)
        placed[top:top + pixels.shape[0], left:left + pixels.shape[1]] = pixels
        result = masks.blend(placed, generated, weights)
    else:
        result = generated
    return EditResult(image=_write_image(result, convention),
                      generated=_write_image(generated, convention), tokens_before=before,
                      tokens_after=after, token_mask=~known, class_id=class_id,
                      offset=tuple(offset), pixel_offset=(top, left))
