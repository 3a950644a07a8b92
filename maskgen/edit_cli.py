"""The `--edit` mode of sample.py: inpainting, outpainting and class edits from the command line.

    python sample.py --workdir=W --edit=inpaint --image=in.png --box=8,8,12,12 --class_id=3 --out=D
    python sample.py --workdir=W --edit=inpaint --image=in.png --mask=mask.png --out=D
    python sample.py --workdir=W --edit=outpaint --image=in.png --direction=right --class_id=3 --out=D
    python sample.py --workdir=W --edit=outpaint --image=in.png --canvas=28,56 --class_id=3 --out=D
    python sample.py --workdir=W --edit=edit_class --image=in.png --box=0,0,14,28 --class_id=5 --out=D

Writes D/before_after.png (input | the regenerated tokens hatched | result;
for outpainting: input on the grey canvas | result) and D/edit.npz (`image`,
`generated`, `input`, `tokens_before`, `tokens_after`, `token_mask`, `offset`,
`class_id`; -1 = none). Every input is checked before the model runs, so bad input
raises ValueError and writes nothing. Masks: a PNG (pixels > 127 = regenerate) or
a .npy array (non-zero = regenerate), of the image's size. Box, canvas and amount
are in pixels. Decoding flags of sample.py (--steps, --guidance, --seed, ...) apply.
"""
import io
import os
from typing import Any

import numpy as np
from absl import flags
from PIL import Image

from maskgen import editing, paths
from maskgen.image_grid import make_grid, save_npz, save_png
from maskgen.sampling import recap_config_from

EDIT_MODES = ("inpaint", "outpaint", "edit_class")
# sample.py flag -> DecodeConfig field, forwarded when the flag is defined and set.
_DECODE_FLAGS = {"schedule": "schedule", "choice_temperature": "choice_temperature",
                 "temperature": "temperature", "top_k": "top_k", "top_p": "top_p",
                 "order": "order", "guidance_schedule": "guidance_schedule"}


def add_edit_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Defines the editing flags (once; `--out` and `--seed` only where nobody has)."""
    if "edit" in flag_values:
        return
    fv = dict(flag_values=flag_values)
    flags.DEFINE_enum("edit", None, list(EDIT_MODES), "edit an image instead of sampling", **fv)
    flags.DEFINE_string("image", None, "input image file (PNG/JPEG ...)", **fv)
    flags.DEFINE_string("mask", None, "mask file: .png (>127 = regenerate) or .npy (non-zero)", **fv)
    flags.DEFINE_string("box", None, "region top,left,height,width in pixels", **fv)
    flags.DEFINE_string("direction", None, "outpaint side(s): left, right, up, down (comma list)", **fv)
    flags.DEFINE_integer("amount", None, "outpaint: pixels added per side (default half the image)",
                         **fv)
    flags.DEFINE_string("canvas", None, "outpaint: target canvas height,width in pixels (image "
                        "centred)", **fv)
    flags.DEFINE_integer("class_id", None, "class to generate (default: the null class, if any)",
                         **fv)
    flags.DEFINE_integer("start_step", None, "first decoding step (edits skip early steps)", **fv)
    flags.DEFINE_integer("dilation", 1, "tokens added around the masked tokens", **fv)
    flags.DEFINE_integer("feather", None, "paste-back blend width in pixels (default per mode)", **fv)
    flags.DEFINE_boolean("paste_back", True, "keep the input pixels outside the edited tokens", **fv)
    flags.DEFINE_boolean("resize", False, "resize an input of another size to the model's", **fv)
    if "out" not in flag_values:
        flags.DEFINE_string("out", None, "output directory", **fv)
    if "seed" not in flag_values:
        flags.DEFINE_integer("seed", 0, "editing seed", **fv)


def _value(flag_values: flags.FlagValues, name: str, default: Any | None = None) -> Any:
    return flag_values[name].value if name in flag_values else default


def parse_ints(text: str, count: int, name: str) -> tuple[int, ...]:
    """'a,b,...' -> tuple of `count` ints, or ValueError naming the flag."""
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"--{name} must be {count} comma-separated integers, got {text!r}") from None
    if len(values) != count:
        raise ValueError(f"--{name} must be {count} comma-separated integers, got {text!r}")
    return values


def load_image(path: str, channels: int) -> np.ndarray:
    """uint8 [H, W, C] with the model's channel count."""
    if not path:
        raise ValueError("--image is required for --edit")
    if not paths.is_file(path):
        raise ValueError(f"--image {path}: no such file")
    try:
        with Image.open(io.BytesIO(paths.read_bytes(path))) as image:
            array = np.asarray(image.convert("L" if channels == 1 else "RGB"))
    except OSError as e:
        raise ValueError(f"--image {path} is not a readable image ({e})") from e
    return array[..., None] if array.ndim == 2 else array


def load_mask(path: str) -> np.ndarray:
    """bool [H, W] from a PNG (grey > 127) or a .npy array (non-zero)."""
    if not paths.is_file(path):
        raise ValueError(f"--mask {path}: no such file")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".npy":
        try:
            mask = np.load(io.BytesIO(paths.read_bytes(path)), allow_pickle=False)
        except ValueError as e:
            raise ValueError(f"--mask {path} is not a numpy array file ({e})") from e
        if mask.ndim == 3 and mask.shape[-1] == 1:
            mask = mask[..., 0]
        if mask.ndim != 2:
            raise ValueError(f"--mask {path} must be a 2-D array, got shape {mask.shape}")
        return mask != 0
    if ext == ".png":
        try:
            with Image.open(io.BytesIO(paths.read_bytes(path))) as image:
                return np.asarray(image.convert("L")) > 127
        except OSError as e:
            raise ValueError(f"--mask {path} is not a readable PNG ({e})") from e
    raise ValueError(f"--mask must be a .png or .npy file, got {path}")


def _region(flag_values: flags.FlagValues, mode: str) -> Any:
    mask_path, box = _value(flag_values, "mask"), _value(flag_values, "box")
    if mode == "outpaint":
        if mask_path or box:
            raise ValueError("--edit=outpaint takes --direction or --canvas, not --mask/--box")
        return None
    if bool(mask_path) == bool(box):
        raise ValueError(f"--edit={mode} needs exactly one of --mask or --box")
    region = load_mask(mask_path) if mask_path else parse_ints(box, 4, "box")
    if mask_path and not region.any():
        raise ValueError(f"--mask {mask_path} is empty: nothing to {mode}")
    return region


def _decoding_kwargs(flag_values: flags.FlagValues) -> dict:
    """Keyword arguments for the editing API from sample.py's decoding flags."""
    kwargs = {}
    for name, field in _DECODE_FLAGS.items():
        value = _value(flag_values, name)
        if value is None:
            continue
        if name == "top_k":
            value = value or None
        if name == "top_p":
            value = None if value >= 1.0 else value
        kwargs[field] = value
    for name in ("steps", "start_step", "guidance"):
        if _value(flag_values, name) is not None:
            kwargs[name] = _value(flag_values, name)
    cheap = _value(flag_values, "recap_cheap_per_full")
    if cheap is not None:
        full_only = _value(flag_values, "recap_full_only_steps") or 0
        kwargs["recap"] = recap_config_from(dict(recap_cheap_per_full=cheap,
                                                 recap_full_only_steps=full_only)) or False
    return kwargs


def check_out(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Refuses an --out that is an existing file before the model loads (it must be a directory)."""
    out = _value(flag_values, "out")
    if out and os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out} is an existing file; --out names a directory (it will hold "
                         "before_after.png and edit.npz)")


def _out_dir(flag_values: flags.FlagValues) -> str:
    out = _value(flag_values, "out")
    if out:
        return out
    workdir = _value(flag_values, "workdir")
    if not workdir:
        raise ValueError("--out is required for --edit")
    return os.path.join(workdir, "edit")


def _fit(image: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Display copy of the input at the result's size (only differs with --resize)."""
    if image.shape[:2] == tuple(shape[:2]):
        return image
    pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    array = np.asarray(pil.resize((shape[1], shape[0]), Image.Resampling.BICUBIC))
    return array[..., None] if array.ndim == 2 else array


def before_after(image: np.ndarray, result: editing.EditResult, factor: int) -> np.ndarray:
    """uint8 panel: input, regenerated area (hatched) and result side by side."""
    after = result.image
    region = np.repeat(np.repeat(result.token_mask, factor, 0), factor, 1)[..., None]
    if result.tokens_after.shape == result.tokens_before.shape:  # in-place edit
        before = _fit(image, after.shape)
        rows, cols = np.indices(after.shape[:2])
        stripes = (((rows + cols) // max(1, factor // 2)) % 2 * 255)[..., None]
        marked = np.where(region, stripes, before).astype(np.uint8)
        panels = [before, marked, after]
    else:
        h, w = (n * factor for n in result.tokens_before.shape)
        before = np.full_like(after, 128)
        top, left = result.pixel_offset
        before[top:top + h, left:left + w] = _fit(image, (h, w))
        panels = [before, after]
    return make_grid(np.stack(panels), rows=1)


def run_edit(bundle: Any, flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """sample.py's entry: runs the edit and writes the files (returns None, a clean exit status)."""
    edit_from_flags(bundle, flag_values)


def edit_from_flags(bundle: Any, flag_values: flags.FlagValues = flags.FLAGS) -> dict:
    """Runs the edit the flags describe, writes before_after.png and edit.npz.

    Returns {"png": path, "npz": path, "result": EditResult}.
    """
    mode = _value(flag_values, "edit")
    if mode not in EDIT_MODES:
        raise ValueError(f"--edit must be one of {EDIT_MODES}, got {mode!r}")
    channels = int(bundle.image_shape[2])
    image = load_image(_value(flag_values, "image"), channels)
    region = _region(flag_values, mode)
    check_out(flag_values)
    out_dir = _out_dir(flag_values)
    kwargs = _decoding_kwargs(flag_values)
    kwargs.update(seed=_value(flag_values, "seed", 0), resize=_value(flag_values, "resize", False),
                  paste_back=_value(flag_values, "paste_back", True),
                  feather=_value(flag_values, "feather"))
    class_id = _value(flag_values, "class_id")
    if mode == "outpaint":
        direction, canvas = _value(flag_values, "direction"), _value(flag_values, "canvas")
        result = editing.outpaint(
            bundle, image, class_id, direction=direction, amount=_value(flag_values, "amount"),
            canvas=parse_ints(canvas, 2, "canvas") if canvas else None, **kwargs)
    else:
        for name in ("direction", "amount", "canvas"):
            if _value(flag_values, name) is not None:
                raise ValueError(f"--{name} is an outpaint flag, not for --edit={mode}")
        run = editing.inpaint if mode == "inpaint" else editing.edit_class
        result = run(bundle, image, region, class_id, dilation=_value(flag_values, "dilation", 1),
                     **kwargs)

    factor = int(bundle.tokenizer.downsample_factor)
    panel = before_after(image, result, factor)
    npz = os.path.join(out_dir, "edit.npz")
    png = os.path.join(out_dir, "before_after.png")
    save_npz(npz, image=result.image, generated=result.generated, input=image,
             tokens_before=result.tokens_before, tokens_after=result.tokens_after,
             token_mask=result.token_mask, offset=np.asarray(result.offset, np.int32),
             class_id=np.int32(-1 if class_id is None else class_id))
    save_png(panel, png, scale=max(1, 128 // int(bundle.image_shape[0])))
    print(f"{mode}: {int(result.token_mask.sum())} of {result.token_mask.size} tokens generated -> "
          f"{png}, {npz}")
    return {"png": png, "npz": npz, "result": result}
