"""sample.py --edit (maskgen.edit_cli): files written, same result as the API, bad input writes nothing."""
import numpy as np
import pytest
from absl import flags
from editing_bundle import sample_image, tiny_bundle
from PIL import Image

from maskgen import edit_cli, editing

pytestmark = pytest.mark.usefixtures("fast_compile")  # tiny models: skip XLA optimisation passes


@pytest.fixture(scope="module")
def bundle():
    return tiny_bundle()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inputs")
    image = sample_image(1)
    Image.fromarray(image).save(folder / "in.png")
    Image.fromarray(np.repeat(np.repeat(image, 2, 0), 2, 1)).save(folder / "big.png")
    mask = np.zeros((8, 8), bool)
    mask[6:, 5:] = True
    Image.fromarray(mask.astype(np.uint8) * 255).save(folder / "mask.png")
    np.save(folder / "mask.npy", mask)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(folder / "empty.png")
    np.save(folder / "wrong.npy", np.ones((4, 8), bool))
    (folder / "mask.txt").write_text("1")
    return folder, image, mask


def parse(argv):
    """Flags as sample.py defines them (a subset), plus the editing flags."""
    fv = flags.FlagValues()
    flags.DEFINE_string("workdir", None, "", flag_values=fv)
    flags.DEFINE_integer("steps", None, "", flag_values=fv)
    flags.DEFINE_float("guidance", None, "", flag_values=fv)
    flags.DEFINE_string("schedule", None, "", flag_values=fv)
    edit_cli.add_edit_flags(fv)
    edit_cli.add_edit_flags(fv)  # a second call is a no-op
    fv(["sample.py"] + argv)
    return fv


def test_inpaint_writes_the_api_result(bundle, files, tmp_path):
    folder, image, mask = files
    out = tmp_path / "box"
    written = edit_cli.edit_from_flags(bundle, parse(
        [f"--image={folder / 'in.png'}", "--edit=inpaint", "--box=6,5,2,3", "--class_id=1",
         "--seed=2", f"--out={out}"]))
    assert sorted(p.name for p in out.iterdir()) == ["before_after.png", "edit.npz"]
    saved = np.load(written["npz"])
    api = editing.inpaint(bundle, image, (6, 5, 2, 3), 1, seed=2)
    np.testing.assert_array_equal(saved["tokens_after"], api.tokens_after)
    np.testing.assert_array_equal(saved["image"][..., 0], api.image)
    np.testing.assert_array_equal(saved["input"][..., 0], image)
    assert int(saved["class_id"]) == 1
    panel = np.asarray(Image.open(written["png"]))
    assert panel.shape == ((8 + 4) * 16, (3 * 10 + 2) * 16)  # three 8x8 panels, pad 2, scale 16
    # The mask files name the same pixels as the box.
    for name in ("mask.png", "mask.npy"):
        again = edit_cli.edit_from_flags(bundle, parse(
            [f"--image={folder / 'in.png'}", "--edit=inpaint", f"--mask={folder / name}",
             "--class_id=1", "--seed=2", f"--out={tmp_path / name}"]))
        np.testing.assert_array_equal(np.load(again["npz"])["tokens_after"], api.tokens_after)


def test_outpaint_and_edit_class(bundle, files, tmp_path):
    folder, image, _ = files
    outpainted = edit_cli.edit_from_flags(bundle, parse(
        [f"--image={folder / 'in.png'}", "--edit=outpaint", "--direction=right", "--amount=8",
         "--class_id=0", f"--out={tmp_path / 'out'}"]))
    saved = np.load(outpainted["npz"])
    assert saved["tokens_after"].shape == (4, 8) and saved["image"].shape == (8, 16, 1)
    np.testing.assert_array_equal(saved["tokens_after"][:, :4], saved["tokens_before"])
    assert np.asarray(Image.open(outpainted["png"])).shape == ((8 + 4) * 16, (2 * 18 + 2) * 16)
    edited = edit_cli.edit_from_flags(bundle, parse(
        [f"--image={folder / 'big.png'}", "--resize", "--edit=edit_class", "--box=0,0,8,8",
         "--class_id=2", f"--out={tmp_path / 'class'}"]))
    saved = np.load(edited["npz"])
    assert saved["image"].shape == (8, 8, 1) and saved["input"].shape == (16, 16, 1)
    big = np.repeat(np.repeat(image, 2, 0), 2, 1)
    api = editing.edit_class(bundle, big, (0, 0, 8, 8), 2, resize=True)
    np.testing.assert_array_equal(saved["tokens_after"], api.tokens_after)
    np.testing.assert_array_equal(saved["token_mask"], api.token_mask)


@pytest.mark.parametrize("argv,message", [
    (["--edit=inpaint", "--box=0,0,2,2"], "--image is required"),
    (["--edit=inpaint", "--image=/nonexistent.png", "--box=0,0,2,2"], "no such file"),
    (["--edit=inpaint", "IMAGE", "--box=0,0,2,2", "--mask=MASK/mask.png"], "exactly one of --mask"),
    (["--edit=inpaint", "IMAGE"], "exactly one of --mask or --box"),
    (["--edit=inpaint", "IMAGE", "--box=0,0,2"], "--box must be 4 comma-separated"),
    (["--edit=inpaint", "IMAGE", "--box=0,0,9,2"], "does not fit"),
    (["--edit=inpaint", "IMAGE", "--mask=MASK/wrong.npy"], r"mask has shape \(4, 8\)"),
    (["--edit=inpaint", "IMAGE", "--mask=MASK/empty.png"], "is empty"),
    (["--edit=inpaint", "IMAGE", "--mask=MASK/mask.txt"], ".png or .npy"),
    (["--edit=inpaint", "IMAGE", "--box=0,0,2,2", "--class_id=3"], "class id 3 out of range"),
    (["--edit=inpaint", "IMAGE", "--box=0,0,2,2", "--direction=left"], "outpaint flag"),
    (["--edit=edit_class", "IMAGE", "--box=0,0,2,2"], "needs the target class_id"),
    (["--edit=outpaint", "IMAGE", "--box=0,0,2,2"], "not --mask/--box"),
    (["--edit=outpaint", "IMAGE", "--canvas=a,b"], "--canvas must be 2"),
    (["--edit=outpaint", "IMAGE", "--canvas=8,11"], "not a multiple of the token size"),
    (["--edit=outpaint", "IMAGE"], "exactly one of direction"),
    (["--edit=inpaint", "--image=BIG", "--box=0,0,2,2"], "16x16 pixels, the model works at 8x8"),
    (["--edit=inpaint", "IMAGE", "--box=0,0,2,2", "--steps=2", "--start_step=2"], "start_step"),
    (["--edit=inpaint", "IMAGE", "--box=0,0,2,2", "--schedule=wobbly"], "wobbly"),
])
def test_bad_input_raises_and_writes_nothing(bundle, files, tmp_path, argv, message):
    folder = files[0]
    argv = [a.replace("IMAGE", f"--image={folder / 'in.png'}").replace("MASK", str(folder))
            .replace("BIG", str(folder / "big.png")) for a in argv]
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=message):
        edit_cli.run_edit(bundle, parse(argv + [f"--out={out}"]))
    assert not out.exists()

