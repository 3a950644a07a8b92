"""Edit regions: pixel masks and boxes -> token masks, paste-back weights, outpainting windows.

Pure numpy on the host: the geometry of an edit is known before anything is
compiled, so the jitted decode only ever sees static shapes.

Token rule (user-visible): a token is regenerated when its f x f pixel patch
(f = the tokenizer's downsampling factor) contains at least one masked pixel.
The token mask is then dilated by `dilation` tokens in every direction (square
neighbourhood), so dilation 1 grows a box by one token on each side like the
editing helper of google-research/maskgit. The extra ring gives the model room
to blend the new content into the old.
"""
from typing import List, Optional, Sequence, Tuple

import numpy as np

DIRECTIONS = ("left", "right", "up", "down")


def _as_int(value: object, name: str) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return int(value)


def box_mask(box: Sequence[int], height: int, width: int) -> np.ndarray:
    """Box (top, left, height, width) in pixels -> bool [height, width]; must lie inside the image."""
    if len(box) != 4:
        raise ValueError(f"a box is (top, left, height, width), got {box!r}")
    top, left, box_h, box_w = (_as_int(v, "box coordinate") for v in box)
    if box_h < 1 or box_w < 1:
        raise ValueError(f"box height and width must be positive, got {box_h}x{box_w}")
    if top < 0 or left < 0 or top + box_h > height or left + box_w > width:
        raise ValueError(f"box (top={top}, left={left}, height={box_h}, width={box_w}) does not fit "
                         f"inside the {height}x{width} image")
    mask = np.zeros((height, width), bool)
    mask[top:top + box_h, left:left + box_w] = True
    return mask


def is_box(mask_or_box: np.ndarray | Sequence[int]) -> bool:
    """A flat sequence of four numbers is a box; anything two-dimensional is a pixel mask."""
    return np.ndim(mask_or_box) == 1 and len(mask_or_box) == 4


def pixel_mask(mask_or_box: np.ndarray | Sequence[int], height: int, width: int) -> np.ndarray:
    """A bool/0-1 array [height, width] (True = regenerate) or a box -> bool [height, width]."""
    if is_box(mask_or_box):
        return box_mask(mask_or_box, height, width)
    mask = np.asarray(mask_or_box)
    if mask.ndim == 3 and mask.shape[-1] == 1:
        mask = mask[..., 0]
    if mask.shape != (height, width):
        raise ValueError(f"mask has shape {mask.shape}, expected ({height}, {width}) to match the "
                         "image (or give a box (top, left, height, width))")
    if not (mask.dtype == bool or np.issubdtype(mask.dtype, np.number)):
        raise ValueError(f"mask must be boolean or numeric, got dtype {mask.dtype}")
    if np.issubdtype(mask.dtype, np.floating) and not np.isfinite(mask).all():
        raise ValueError("mask contains NaN or infinite values")
    return mask != 0


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Square (Chebyshev) dilation of a bool [h, w] mask by `radius` cells."""
    radius = _as_int(radius, "dilation")
    if radius < 0:
        raise ValueError(f"dilation must be >= 0, got {radius}")
    out = mask.copy()
    for _ in range(radius):
        grown = np.pad(out, 1)
        out = np.zeros_like(out)
        for dy in range(3):
            for dx in range(3):
                out |= grown[dy:dy + mask.shape[0], dx:dx + mask.shape[1]]
    return out


def token_mask(pixels: np.ndarray, factor: int, dilation: int = 1) -> np.ndarray:
    """bool [H, W] pixel mask -> bool [H/f, W/f] tokens to regenerate (see the module rule)."""
    height, width = pixels.shape
    if height % factor or width % factor:
        raise ValueError(f"mask size {height}x{width} is not divisible by the patch size {factor}")
    touched = pixels.reshape(height // factor, factor, width // factor, factor).any(axis=(1, 3))
    return dilate(touched, dilation)


def upsample(tokens: np.ndarray, factor: int) -> np.ndarray:
    """Token grid [h, w] -> pixel grid [h f, w f] (each token covers its f x f patch)."""
    return np.repeat(np.repeat(tokens, factor, axis=0), factor, axis=1)


def _erode(mask: np.ndarray) -> np.ndarray:
    """Square erosion; beyond the image counts as inside (the image edge is no seam)."""
    padded = np.pad(mask, 1, constant_values=True)
    out = np.ones_like(mask)
    for dy in range(3):
        for dx in range(3):
            out &= padded[dy:dy + mask.shape[0], dx:dx + mask.shape[1]]
    return out


def inner_ramp(region: np.ndarray, feather: int) -> np.ndarray:
    """float [H, W]: 0 outside `region`, rising linearly to 1 over `feather` pixels inside it.

    A pixel at square distance d >= 1 from the nearest outside pixel gets
    min(d, feather + 1) / (feather + 1); feather 0 is a hard edge.
    """
    feather = _as_int(feather, "feather")
    if feather < 0:
        raise ValueError(f"feather must be >= 0, got {feather}")
    depth = region.astype(np.int32)
    eroded = region
    for _ in range(feather):
        eroded = _erode(eroded)
        depth += eroded
    return depth.astype(np.float32) / (feather + 1)


def inpaint_weights(tokens: np.ndarray, pixels: np.ndarray, factor: int, feather: int) -> np.ndarray:
    """Weight of the generated image per pixel for inpainting paste-back.

    Exactly 0 outside the regenerated token region (those pixels stay the input's),
    exactly 1 on the user's masked pixels, a `feather`-pixel ramp in between.
    """
    return np.maximum(inner_ramp(upsample(tokens, factor), feather), pixels.astype(np.float32))


def outpaint_weights(generated: np.ndarray, factor: int, feather: int) -> np.ndarray:
    """Weight of the generated image per canvas pixel for outpainting paste-back.

    Exactly 1 on generated tokens (no input exists there) and the ramp runs inside
    the kept image, so its pixels more than `feather` from the seam stay exact.
    """
    return 1.0 - inner_ramp(~upsample(generated, factor), feather)


def blend(original: np.ndarray, generated: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """float [H, W, C] images in [0, 1]; weight 0 returns the original bit for bit."""
    w = weights[..., None].astype(np.float64)
    mixed = w * generated + (1.0 - w) * original
    return np.where(w == 0.0, original, np.where(w == 1.0, generated, mixed))


def outpaint_canvas(image_tokens: Tuple[int, int], direction: str | Sequence[str] | None = None,
                    amount: Optional[int] = None, canvas: Optional[Tuple[int, int]] = None,
                    offset: Optional[Tuple[int, int]] = None) -> Tuple[Tuple[int, int], Tuple[int, int]]:
    """(canvas (Hc, Wc), offset (top, left)) in tokens for an image of `image_tokens` tokens.

    direction: "left" | "right" | "up" | "down" or several of them (list or comma
    string): the image grows by `amount` tokens on each named side (default: half the
    image along that axis). canvas: the target size; the image sits at `offset`
    (default centred). Give one of the two.
    """
    h0, w0 = image_tokens
    if (direction is None) == (canvas is None):
        raise ValueError("outpaint needs exactly one of direction=... or canvas=...")
    if direction is not None:
        if offset is not None:
            raise ValueError("offset goes with canvas=..., not with direction=...")
        names = direction.split(",") if isinstance(direction, str) else list(direction)
        names = [n.strip() for n in names if n.strip()]
        bad = [n for n in names if n not in DIRECTIONS]
        if bad or not names:
            raise ValueError(f"unknown direction {bad[0] if bad else direction!r}; expected one or "
                             f"more of {DIRECTIONS}")
        grow = {}
        for name in names:
            size = h0 if name in ("up", "down") else w0
            step = max(1, size // 2) if amount is None else _as_int(amount, "amount")
            if step < 1:
                raise ValueError(f"amount must be >= 1 token, got {step}")
            grow[name] = step
        canvas = (h0 + grow.get("up", 0) + grow.get("down", 0),
                  w0 + grow.get("left", 0) + grow.get("right", 0))
        return canvas, (grow.get("up", 0), grow.get("left", 0))
    if amount is not None:
        raise ValueError("amount goes with direction=..., not with canvas=...")
    if len(canvas) != 2:
        raise ValueError(f"canvas must be (height, width), got {canvas!r}")
    canvas = tuple(_as_int(c, "canvas size") for c in canvas)
    if canvas[0] < h0 or canvas[1] < w0:
        raise ValueError(f"canvas {canvas[0]}x{canvas[1]} tokens is smaller than the image "
                         f"({h0}x{w0} tokens)")
    if canvas == (h0, w0):
        raise ValueError("canvas equals the image size: nothing to outpaint")
    if offset is None:
        offset = ((canvas[0] - h0) // 2, (canvas[1] - w0) // 2)
    if len(offset) != 2:
        raise ValueError(f"offset must be (top, left), got {offset!r}")
    offset = tuple(_as_int(o, "offset") for o in offset)
    if not (0 <= offset[0] <= canvas[0] - h0 and 0 <= offset[1] <= canvas[1] - w0):
        raise ValueError(f"offset {offset} puts the {h0}x{w0} image outside the "
                         f"{canvas[0]}x{canvas[1]} canvas")
    return canvas, offset


def _axis_starts(size: int, window: int, anchor: int, stride: int) -> List[int]:
    """Window starts along one axis: a lattice through `anchor`, clamped into the canvas."""
    reach = size // stride + 2
    starts = {min(max(anchor + k * stride, 0), size - window) for k in range(-reach, reach + 1)}
    return sorted(starts)


def window_plan(known: np.ndarray, window: Tuple[int, int], anchor: Tuple[int, int],
                overlap: Optional[Sequence[int]] = None) -> np.ndarray:
    """Origins int32 [n, 2] of the training-size windows outpainting decodes, in order.

    Windows lie on a lattice through `anchor` (the image's position) with the given
    overlap (default half a window), so neighbouring windows share context. Each turn
    takes the window with the most already-known tokens among those that still hold
    unknown ones (ties: nearest the anchor, then row-major), as MaskGIT extends an
    image step by step; windows with nothing left to generate are dropped.
    """
    height, width = known.shape
    win_h, win_w = window
    if height < win_h or width < win_w:
        raise ValueError(f"canvas {height}x{width} tokens is smaller than the model's {win_h}x{win_w} "
                         "token grid: outpainting decodes whole training-size windows")
    if overlap is None:
        overlap = (win_h // 2, win_w // 2)
    overlap = tuple(_as_int(o, "overlap") for o in overlap)
    if not (0 <= overlap[0] < win_h and 0 <= overlap[1] < win_w):
        raise ValueError(f"overlap {overlap} must lie in [0, window) = [0, {win_h}) x [0, {win_w})")
    rows = _axis_starts(height, win_h, anchor[0], win_h - overlap[0])
    cols = _axis_starts(width, win_w, anchor[1], win_w - overlap[1])
    candidates = [(r, c) for r in rows for c in cols]
    filled = known.copy()
    plan = []
    while True:
        best, best_score = None, None
        for r, c in candidates:
            patch = filled[r:r + win_h, c:c + win_w]
            if patch.all():
                continue
            score = (-int(patch.sum()), max(abs(r - anchor[0]), abs(c - anchor[1])), r, c)
            if best_score is None or score < best_score:
                best, best_score = (r, c), score
        if best is None:
            break
        plan.append(best)
        filled[best[0]:best[0] + win_h, best[1]:best[1] + win_w] = True
    return np.asarray(plan, np.int32).reshape(-1, 2)
