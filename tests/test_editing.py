"""Editing: token-mask rule, exactness of kept tokens/pixels, outpainting windows, determinism,
equivalence with the official editing run, and ValueErrors for bad input."""
import types

import flax
import jax
import numpy as np
import pytest
from editing_bundle import sample_image, tiny_bundle
from PIL import Image

from maskgen import editing, masks
from maskgen.models.transformer import Transformer
from maskgen.models.vqgan import VQGAN
from maskgen.scheduler import DecodeConfig, RecapConfig
from maskgen.tokens import TokenLayout

pytestmark = pytest.mark.usefixtures("fast_compile")  # tiny models: skip XLA optimisation passes


@pytest.fixture(scope="module")
def bundle():
    return tiny_bundle()


@pytest.fixture(scope="module")
def image():
    return sample_image(0)


def _render(bundle, tokens):
    return np.asarray(editing._render(bundle.tokenizer, bundle.params["tokenizer"], tokens[None])[0])


# ----------------------------------------------------------------------------- geometry

def _token_mask_by_loops(pixels, factor, dilation):
    h, w = pixels.shape[0] // factor, pixels.shape[1] // factor
    touched = np.array([[pixels[i * factor:(i + 1) * factor, j * factor:(j + 1) * factor].any()
                         for j in range(w)] for i in range(h)])
    return np.array([[any(touched[a, b] for a in range(h) for b in range(w)
                          if max(abs(a - i), abs(b - j)) <= dilation)
                      for j in range(w)] for i in range(h)])


@pytest.mark.parametrize("dilation", [0, 1, 2])
def test_token_mask_rule_matches_a_patch_by_patch_count(dilation):
    rng = np.random.RandomState(dilation)
    for _ in range(5):
        pixels = rng.rand(12, 16) > 0.97
        np.testing.assert_array_equal(masks.token_mask(pixels, 4, dilation),
                                      _token_mask_by_loops(pixels, 4, dilation))
    box = masks.pixel_mask((3, 5, 2, 6), 12, 16)
    assert box.sum() == 12 and box[3, 5] and box[4, 10] and not box[5, 5] and not box[3, 11]
    np.testing.assert_array_equal(masks.token_mask(box, 4, dilation),
                                  _token_mask_by_loops(box, 4, dilation))


def test_paste_weights_stay_inside_the_token_region():
    pixels = masks.pixel_mask((10, 10, 3, 3), 32, 32)
    tokens = masks.token_mask(pixels, 4, 1)
    weights = masks.inpaint_weights(tokens, pixels, 4, feather=3)
    region = masks.upsample(tokens, 4)
    assert (weights[~region] == 0).all() and (weights[pixels] == 1).all()
    assert (weights[region] > 0).all() and 0 < weights[region].min() < 1
    # Tokens 1..4 are regenerated (pixels 4..19): a linear ramp going in from the region's edge.
    np.testing.assert_allclose(weights[3:9, 12], [0, 0.25, 0.5, 0.75, 1.0, 1.0])
    hard = masks.inpaint_weights(tokens, pixels, 4, feather=0)
    np.testing.assert_array_equal(hard, region.astype(np.float32))
    generated = masks.outpaint_weights(~masks.upsample(np.pad(np.ones((2, 2), bool), 1), 1), 1, 1)
    np.testing.assert_array_equal(generated, [[1, 1, 1, 1], [1, .5, .5, 1], [1, .5, .5, 1],
                                              [1, 1, 1, 1]])


@pytest.mark.parametrize("canvas,offset,window", [((4, 10), (0, 0), (4, 4)), ((9, 9), (3, 3), (4, 4)),
                                                  ((4, 4), (0, 0), (4, 4)), ((6, 13), (1, 9), (5, 4))])
def test_window_plan_covers_the_canvas_with_context(canvas, offset, window):
    known = np.zeros(canvas, bool)
    known[offset[0]:offset[0] + 3, offset[1]:offset[1] + 3] = True
    plan = masks.window_plan(known, window, offset)
    filled = known.copy()
    for top, left in plan:
        assert 0 <= top <= canvas[0] - window[0] and 0 <= left <= canvas[1] - window[1]
        patch = filled[top:top + window[0], left:left + window[1]]
        assert patch.any() and not patch.all()  # decodes something, given some context
        filled[top:top + window[0], left:left + window[1]] = True
    assert filled.all()


# ----------------------------------------------------------------------------- inpainting

def test_inpaint_keeps_tokens_and_pixels_outside_the_region(bundle, image):
    box = (1, 1, 3, 2)  # rows 1..3, cols 1..2 -> tokens rows 0..1, col 0..1, dilated to 0..2
    out = editing.inpaint(bundle, image, box, class_id=1, seed=0)
    assert out.image.dtype == np.uint8 and out.image.shape == image.shape
    expected = np.zeros((4, 4), bool)
    expected[:3, :3] = True
    np.testing.assert_array_equal(out.token_mask, expected)
    np.testing.assert_array_equal(out.tokens_after[~out.token_mask], out.tokens_before[~out.token_mask])
    assert (out.tokens_after != out.tokens_before).any()
    assert out.tokens_after.min() >= 0 and out.tokens_after.max() < 16
    assert out["tokens_after"] is out.tokens_after and "token_mask" in out
    # Tokens are what the tokenizer gives for the image; generated = render(tokens_after).
    np.testing.assert_array_equal(out.tokens_before, editing._tokenise(bundle, image[..., None] / 255.0))
    rendered = np.round(_render(bundle, out.tokens_after) * 255).astype(np.uint8)[..., 0]
    assert np.abs(rendered.astype(int) - out.generated.astype(int)).max() <= 1
    # Paste-back: untouched outside the regenerated tokens, the model's pixels on the mask.
    region = masks.upsample(out.token_mask, 2)
    np.testing.assert_array_equal(out.image[~region], image[~region])
    user = masks.pixel_mask(box, 8, 8)
    np.testing.assert_array_equal(out.image[user], out.generated[user])
    raw = editing.inpaint(bundle, image, box, class_id=1, seed=0, paste_back=False)
    np.testing.assert_array_equal(raw.image, out.generated)
    np.testing.assert_array_equal(raw.tokens_after, out.tokens_after)


def test_inpaint_same_seed_same_output_other_seed_differs(bundle, image):
    mask = np.zeros((8, 8), bool)
    mask[5:, 1:7] = True
    a = editing.inpaint(bundle, image, mask, 2, seed=3)
    b = editing.inpaint(bundle, image, mask, 2, seed=3)
    np.testing.assert_array_equal(a.tokens_after, b.tokens_after)
    np.testing.assert_array_equal(a.image, b.image)
    c = editing.inpaint(bundle, image, mask, 2, seed=4)
    assert (c.tokens_after != a.tokens_after).any()
    np.testing.assert_array_equal(c.tokens_after[~c.token_mask], a.tokens_after[~a.token_mask])


def test_empty_mask_returns_the_input(bundle, image):
    out = editing.inpaint(bundle, image, np.zeros((8, 8), bool), 0, seed=0)
    assert not out.token_mask.any()
    np.testing.assert_array_equal(out.tokens_after, out.tokens_before)
    np.testing.assert_array_equal(out.image, image)


def test_image_conventions_float_pil_and_null_class(bundle, image):
    box = (0, 4, 2, 4)
    ref = editing.inpaint(bundle, image, box, 1, seed=5)
    as_float = editing.inpaint(bundle, image.astype(np.float32) / 255.0, box, 1, seed=5)
    assert as_float.image.dtype == np.float32 and as_float.image.shape == (8, 8)
    np.testing.assert_array_equal(as_float.tokens_after, ref.tokens_after)
    region = masks.upsample(ref.token_mask, 2)
    np.testing.assert_array_equal(as_float.image[~region], image[~region].astype(np.float32) / 255.0)
    pil = editing.inpaint(bundle, Image.fromarray(image), box, 1, seed=5)
    assert isinstance(pil.image, Image.Image) and pil.image.mode == "L"
    np.testing.assert_array_equal(np.asarray(pil.image), ref.image)
    unconditional = editing.inpaint(bundle, image[..., None], box, None, seed=5)  # null class 3
    assert unconditional.image.shape == (8, 8, 1)
    assert unconditional.class_id is None
    np.testing.assert_array_equal(unconditional.tokens_after[~ref.token_mask],
                                  ref.tokens_before[~ref.token_mask])


def test_resize_option(bundle, image, capsys):
    big = np.repeat(np.repeat(image, 2, 0), 2, 1)
    with pytest.raises(ValueError, match="16x16 pixels, the model works at 8x8"):
        editing.inpaint(bundle, big, (0, 0, 4, 4), 1)
    out = editing.inpaint(bundle, big, (0, 0, 4, 4), 1, resize=True)
    assert "resizing the image from 16x16 to 8x8" in capsys.readouterr().out
    assert out.image.shape == (8, 8)
    expected = np.zeros((4, 4), bool)
    expected[:2, :2] = True  # the 4x4 box became 2x2 pixels = token (0, 0), dilated by one
    np.testing.assert_array_equal(out.token_mask, expected)


def test_edit_class_defaults_to_twelve_steps_from_step_two(bundle, image):
    box = (0, 0, 4, 4)
    edited = editing.edit_class(bundle, image, box, 0, seed=1)
    same = editing.inpaint(bundle, image, box, 0, seed=1, steps=12, start_step=2)
    np.testing.assert_array_equal(edited.tokens_after, same.tokens_after)
    np.testing.assert_array_equal(edited.image, same.image)
    config, _ = editing.decoding_options(bundle, steps=6, start_step=1)
    assert (config.steps, config.start_step, config.grid_shape) == (6, 1, (4, 4))


def test_guidance_and_recap_keep_known_tokens(bundle, image):
    mask = np.zeros((8, 8), bool)
    mask[:, 4:] = True
    out = editing.inpaint(bundle, image, mask, 2, seed=0, guidance=3.0,
                          recap=RecapConfig(full_only_steps=1, cheap_steps=1))
    np.testing.assert_array_equal(out.tokens_after[:, :1], out.tokens_before[:, :1])
    assert out.tokens_after.min() >= 0 and out.tokens_after.max() < 16
    config, recap = editing.decoding_options(bundle, guidance=3.0, recap=False)
    assert config.guidance_scale == 3.0 and recap is None


def test_official_class_edit_is_reproduced(official_small):
    """The official class-edit run (start step 2 of 12), sample 0: token mask, tokens, pixels."""
    folder = official_small["_dir"] / "checkpoints"
    read = lambda name: flax.serialization.from_bytes(None, (folder / name).read_bytes())["params"]  # noqa
    model = types.SimpleNamespace(
        tokenizer=VQGAN(image_size=128, codebook_size=64, embedding_dim=16, filters=32,
                        num_res_blocks=1, channel_multipliers=(1, 1, 1, 1, 2), image_channels=3),
        transformer=Transformer(vocab_size=75, hidden_size=64, num_layers=2, num_heads=2,
                                mlp_dim=256, max_len=65),
        layout=TokenLayout(64, 10), token_grid=(8, 8), image_shape=(128, 128, 3), config=None,
        params={"tokenizer": read("tokenizer_imagenet128_checkpoint"),
                "transformer": read("maskgit_imagenet128_checkpoint")})
    # The official helper floors the box width (72 px -> 4 tokens); 64 px gives the same box
    # under the "touches" rule.
    top, left, height, width = official_small["edit_bbox_top_left_height_width"]
    assert (height, width) == (64, 72)
    image = official_small["edit_image_uint8"].astype(np.float32) / 255.0
    out = editing.inpaint(model, image, (top, left, 64, 64), int(official_small["edit_label"]),
                          seed=official_small["edit_rng"], paste_back=False,
                          decode_config=DecodeConfig.official_maskgit(steps=12, start_step=2))
    np.testing.assert_array_equal(out.token_mask, official_small["edit_latent_mask"][0] > 0)
    kept = ~out.token_mask
    given = official_small["edit_input_tokens"][0, 1:].reshape(8, 8)
    np.testing.assert_array_equal(out.tokens_before[kept], given[kept])
    np.testing.assert_array_equal(out.tokens_after,
                                  official_small["edit_final_seqs"][0, -1, 1:].reshape(8, 8))
    want = np.clip(official_small["edit_images_first1"][0], 0, 1)
    assert np.linalg.norm(out.generated - want) / np.linalg.norm(want) < 1e-4


# ----------------------------------------------------------------------------- outpainting

def test_outpaint_inside_one_window(bundle, image):
    top_half = image[:4]  # 2x4 tokens, grown downwards to the 4x4 training grid
    out = editing.outpaint(bundle, top_half, 1, direction="down", amount=4, seed=0)
    assert out.image.shape == (8, 8) and out.offset == (0, 0) and out.tokens_after.shape == (4, 4)
    np.testing.assert_array_equal(out.tokens_after[:2], out.tokens_before)
    np.testing.assert_array_equal(out.token_mask, np.arange(4)[:, None].repeat(4, 1) >= 2)
    # The kept image's pixels away from the seam (feather f // 2 = 1 pixel) are exact.
    np.testing.assert_array_equal(out.image[:3], top_half[:3])
    np.testing.assert_array_equal(out.image[4:], out.generated[4:])
    same = editing.outpaint(bundle, top_half, 1, canvas=(4, 4), offset=(0, 0), unit="tokens", seed=0)
    np.testing.assert_array_equal(same.tokens_after, out.tokens_after)


@pytest.mark.parametrize("kwargs,offset,shape", [
    (dict(direction="right", amount=8), (0, 0), (4, 8)),
    (dict(canvas=(12, 14)), (1, 1), (6, 7)),
])
def test_outpaint_beyond_the_training_grid(bundle, image, kwargs, offset, shape):
    out = editing.outpaint(bundle, image, 2, seed=7, **kwargs)
    assert out.offset == offset and out.tokens_after.shape == shape
    assert out.image.shape == (shape[0] * 2, shape[1] * 2)
    r, c = offset
    np.testing.assert_array_equal(out.tokens_after[r:r + 4, c:c + 4], out.tokens_before)
    assert out.token_mask.sum() == shape[0] * shape[1] - 16
    assert out.tokens_after.min() >= 0 and out.tokens_after.max() < 16
    y, x = out.pixel_offset
    np.testing.assert_array_equal(out.image[y + 1:y + 7, x + 1:x + 7], image[1:7, 1:7])
    # Reference: the same windows decoded one by one through the single-window path.
    plan = masks.window_plan(~out.token_mask, (4, 4), offset)
    keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(jax.random.key(7), np.arange(len(plan)))
    config, _ = editing.decoding_options(bundle)
    canvas = np.full(shape, bundle.layout.mask_id, np.int32)
    canvas[r:r + 4, c:c + 4] = out.tokens_before
    for (top, left), key in zip(plan, keys):
        window = canvas[top:top + 4, left:left + 4]
        canvas[top:top + 4, left:left + 4] = editing._run(
            bundle, window, np.zeros((1, 2), np.int32), key, 2 + 16, config, None)
    np.testing.assert_array_equal(out.tokens_after, canvas)
    again = editing.outpaint(bundle, image, 2, seed=7, **kwargs)
    np.testing.assert_array_equal(again.image, out.image)


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("call,message", [
    (lambda b, im: editing.inpaint(b, im, np.zeros((8, 6), bool), 0), r"mask has shape \(8, 6\)"),
    (lambda b, im: editing.inpaint(b, im, (0, 0, 8, 8), 0), "nothing to keep"),
    (lambda b, im: editing.inpaint(b, im, np.pad(np.ones((4, 4), bool), 2), 0), "nothing to keep"),
    (lambda b, im: editing.inpaint(b, im, (0, 0, 2, 2), 3), "class id 3 out of range"),
    (lambda b, im: editing.inpaint(b, im, (0, 0, 2, 2), -1), "class id -1 out of range"),
    (lambda b, im: editing.inpaint(b, im, (0, 0, 2, 2), 1.5), "class_id must be an integer"),
    (lambda b, im: editing.inpaint(b, im[:6], (0, 0, 2, 2), 0), "6x8 pixels, the model works at 8x8"),
    (lambda b, im: editing.inpaint(b, im, (6, 6, 3, 3), 0), "does not fit inside the 8x8 image"),
    (lambda b, im: editing.inpaint(b, im, (0, 0, 0, 3), 0), "must be positive"),
    (lambda b, im: editing.inpaint(b, im / 200.0, (0, 0, 2, 2), 0), r"must lie in \[0, 1\]"),
    (lambda b, im: editing.inpaint(b, im > 9, (0, 0, 2, 2), 0), "dtype bool is not supported"),
    (lambda b, im: editing.inpaint(b, np.stack([im] * 3, -1), (0, 0, 2, 2), 0), "3 channels"),
    (lambda b, im: editing.inpaint(b, im, (0, 0, 2, 2), 0, dilation=-1), "dilation must be >= 0"),
    (lambda b, im: editing.inpaint(b, im, (0, 0, 2, 2), 0, steps=4, start_step=4), "start_step"),
    (lambda b, im: editing.inpaint(b, im, (0, 0, 2, 2), 0, tempo=2), "unknown decoding option"),
    (lambda b, im: editing.inpaint(b, im, (0, 0, 2, 2), 0, recap="yes"), "recap must be"),
    (lambda b, im: editing.edit_class(b, im, (0, 0, 2, 2), None), "needs the target class_id"),
    (lambda b, im: editing.outpaint(b, im, 0), "exactly one of direction"),
    (lambda b, im: editing.outpaint(b, im, 0, direction="left", canvas=(8, 16)), "exactly one"),
    (lambda b, im: editing.outpaint(b, im, 0, direction="sideways"), "unknown direction 'sideways'"),
    (lambda b, im: editing.outpaint(b, im, 0, direction="left", amount=3), "not a multiple"),
    (lambda b, im: editing.outpaint(b, im[:4], 0, direction="down", amount=2), "smaller than the model"),
    (lambda b, im: editing.outpaint(b, im, 0, canvas=(8, 8)), "nothing to outpaint"),
    (lambda b, im: editing.outpaint(b, im, 0, canvas=(8, 12), offset=(0, 6)), "outside the"),
    (lambda b, im: editing.outpaint(b, im, 0, canvas=(8, 12), unit="inches"), "unit must be"),
    (lambda b, im: editing.outpaint(b, im, 3, direction="left"), "class id 3 out of range"),
])
def test_bad_input_raises_value_error(bundle, image, call, message):
    with pytest.raises(ValueError, match=message):
        call(bundle, image)


def test_unconditional_edit_needs_a_null_class(bundle, image):
    no_null = types.SimpleNamespace(**vars(bundle))
    no_null.layout = TokenLayout(codebook_size=16, num_classes=4)
    with pytest.raises(ValueError, match="no null class"):
        editing.inpaint(no_null, image, (0, 0, 2, 2), None)
