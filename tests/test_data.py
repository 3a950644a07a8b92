"""Tests for maskgen.data: IDX reading, tfds builders, grain pipeline."""
import gzip
import hashlib
import os
import shutil
import struct

import grain
import numpy as np
import PIL.Image
import pytest

from maskgen import data
from maskgen.data import builders, idx

FM_DIR = idx.FASHION_MNIST_DIR
NUM = 300  # examples per split in the small prepared Fashion-MNIST


# ----------------------------------------------------------------- helpers
def _manual_header_and_bytes(path):
    """Independent IDX parse: struct header + raw payload bytes."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    magic, count = struct.unpack(">II", raw[:8])
    return magic, count, raw


def _write_idx(path, array, code, compress=True):
    header = struct.pack(">BBBB", 0, 0, code, array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    if compress:
        payload = gzip.compress(payload)
    with open(path, "wb") as f:
        f.write(payload)


def _image_ids(images_uint8):
    return [hashlib.sha1(im.tobytes()).hexdigest() for im in images_uint8]


def _to_uint8(batch_images):
    return np.round(batch_images * 255).astype(np.uint8)


def _take(loader, count):
    it = iter(loader)
    return [next(it) for _ in range(count)]


@pytest.fixture(scope="module")
def fm_data_dir(tmp_path_factory):
    """A data dir holding Fashion-MNIST's first NUM examples per split."""
    data_dir = tmp_path_factory.mktemp("tfds")
    data.prepare_dataset("fashion_mnist", data_dir, max_examples=NUM)
    return data_dir


@pytest.fixture(scope="module")
def fm_first():
    """First NUM train images/labels straight from the IDX files."""
    images, labels = idx.load_fashion_mnist_idx("train")
    return images[:NUM], labels[:NUM]


def _loader(data_dir, **kwargs):
    args = dict(data_dir=data_dir, max_examples=NUM, batch_size=10, seed=0,
                read_threads=2, prefetch=16)
    args.update(kwargs)
    return data.make_loader("fashion_mnist", **args)


# -------------------------------------------------------------- IDX reader
def test_idx_train_labels_and_pixels_match_manual_parse():
    images, labels = idx.load_fashion_mnist_idx("train")
    assert images.shape == (60000, 28, 28, 1) and images.dtype == np.uint8
    assert labels.dtype == np.int32
    np.testing.assert_array_equal(labels[:10], [9, 0, 0, 3, 0, 2, 7, 2, 5, 5])

    img_path, lab_path = idx.fashion_mnist_paths("train")
    magic, count, raw = _manual_header_and_bytes(img_path)
    rows, cols = struct.unpack(">II", raw[8:16])
    assert (magic, count, rows, cols) == (2051, 60000, 28, 28)
    for i, r, c in [(0, 0, 0), (0, 14, 14), (1, 10, 5), (123, 27, 27),
                    (59999, 13, 20), (777, 3, 17)]:
        assert images[i, r, c, 0] == raw[16 + i * 784 + r * 28 + c]
    assert images[0].sum() == sum(raw[16:16 + 784])
    assert images[0].max() > 0
    magic, count, raw = _manual_header_and_bytes(lab_path)
    assert (magic, count) == (2049, 60000)
    assert list(labels[-5:]) == list(raw[-5:])


def test_idx_test_split_and_label_histogram():
    images, labels = idx.load_fashion_mnist_idx("test")
    assert images.shape == (10000, 28, 28, 1)
    _, _, raw = _manual_header_and_bytes(idx.fashion_mnist_paths("test")[1])
    np.testing.assert_array_equal(labels,
                                  np.frombuffer(raw, np.uint8, offset=8))
    # Fashion-MNIST test is balanced: 1000 per class.
    np.testing.assert_array_equal(np.bincount(labels), [1000] * 10)


@pytest.mark.parametrize("dtype,code", [(np.uint8, 0x08), (np.int16, 0x0B),
                                        (np.int32, 0x0C), (np.float32, 0x0D)])
@pytest.mark.parametrize("compress", [True, False])
def test_read_idx_roundtrips_dtypes(tmp_path, dtype, code, compress):
    rng = np.random.default_rng(0)
    array = (rng.normal(size=(3, 4, 5)) * 100).astype(dtype)
    path = tmp_path / "a.idx"
    _write_idx(path, array, code, compress)
    out = idx.read_idx(path)
    assert out.dtype == np.dtype(dtype) and out.dtype.isnative
    np.testing.assert_array_equal(out, array)


def test_read_idx_rejects_bad_files(tmp_path):
    good = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    raw_path = tmp_path / "good.idx"
    _write_idx(raw_path, good, 0x08, compress=False)
    raw = raw_path.read_bytes()

    def write(name, content):
        path = tmp_path / name
        path.write_bytes(content)
        return path

    cases = {
        "truncated.gz": (gzip.compress(raw[:-5]), "truncated"),
        "trailing.gz": (gzip.compress(raw + b"\0"), "trailing"),
        "badmagic.gz": (gzip.compress(b"\x01" + raw[1:]), "magic"),
        "dtype.gz": (gzip.compress(raw[:2] + b"\x42" + raw[3:]), "dtype"),
        "header.gz": (gzip.compress(raw[:9]), "header"),
        "cutgzip.gz": (gzip.compress(raw)[:-12], "gzip"),
        "tiny": (b"\0\0", "magic number"),
    }
    for name, (content, words) in cases.items():
        path = write(name, content)
        with pytest.raises(ValueError, match=words) as err:
            idx.read_idx(path)
        assert str(path) in str(err.value)
    with pytest.raises(FileNotFoundError, match="nope.gz"):
        idx.read_idx(tmp_path / "nope.gz")


def test_missing_fashion_mnist_names_install_command(tmp_path):
    with pytest.raises(FileNotFoundError,
                       match="apt-get install dataset-fashion-mnist") as err:
        idx.load_fashion_mnist_idx("train", idx_dir=tmp_path)
    assert str(tmp_path) in str(err.value)
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        data.prepare_dataset("fashion_mnist", tmp_path / "d", idx_dir=tmp_path)
    with pytest.raises(ValueError, match="split"):
        idx.load_fashion_mnist_idx("validation")


def test_mismatched_image_and_label_counts(tmp_path):
    for split in ("train", "test"):
        images_name, labels_name = idx.FASHION_MNIST_FILES[split]
        _write_idx(tmp_path / images_name, np.zeros((4, 28, 28), np.uint8), 8)
        _write_idx(tmp_path / labels_name, np.zeros((3,), np.uint8), 8)
    with pytest.raises(ValueError, match="4 images .* 3 labels"):
        idx.load_fashion_mnist_idx("train", idx_dir=tmp_path)


# -------------------------------------------------------- tfds builders
def test_prepared_fashion_mnist_matches_idx(fm_data_dir, fm_first):
    builder = data.prepare_dataset("fashion_mnist", fm_data_dir,
                                   max_examples=NUM)
    assert {s: v.num_examples for s, v in builder.info.splits.items()} == {
        "train": NUM, "test": NUM}
    assert builder.info.features["label"].num_classes == 10
    assert builder.info.file_format.value == "array_record"
    images, labels = data.load_arrays("fashion_mnist", "train", fm_data_dir,
                                      max_examples=NUM)
    assert images.dtype == np.uint8 and labels.dtype == np.int32
    np.testing.assert_array_equal(images, fm_first[0])
    np.testing.assert_array_equal(labels, fm_first[1])
    summary = data.dataset_summary("fashion_mnist", fm_data_dir,
                                   max_examples=NUM)
    assert summary.num_classes == 10 and summary.image_shape == (28, 28, 1)
    assert summary.num_examples == {"train": NUM, "test": NUM}


def test_prepare_is_idempotent_and_found_by_name(fm_data_dir):
    builder = data.prepare_dataset("fashion_mnist", fm_data_dir,
                                   max_examples=NUM)
    info = os.path.join(builder.data_dir, "dataset_info.json")
    before = os.stat(info).st_mtime_ns
    again = data.prepare_dataset("fashion_mnist", fm_data_dir,
                                 max_examples=NUM)
    assert str(again.data_dir) == str(builder.data_dir)
    assert os.stat(info).st_mtime_ns == before
    # Any prepared tfds dataset is readable by name without its builder code.
    by_name = data.prepare_dataset(f"fashion_mnist/first{NUM}", fm_data_dir)
    assert str(by_name.data_dir) == str(builder.data_dir)
    with pytest.raises(FileNotFoundError, match="imagenet2012"):
        data.prepare_dataset("imagenet2012", fm_data_dir)


def test_download_fallback_only_when_allowed(tmp_path, monkeypatch):
    fetched = []

    def fake_fetch(url, target):  # stands in for the network
        fetched.append(url)
        shutil.copy(os.path.join(FM_DIR, url.rsplit("/", 1)[1]), target)

    monkeypatch.setattr(builders.urllib.request, "urlretrieve", fake_fetch)
    empty = tmp_path / "no_idx"
    empty.mkdir()
    with pytest.raises(FileNotFoundError):
        data.prepare_dataset("fashion_mnist", tmp_path / "d", idx_dir=empty,
                             max_examples=5)
    assert not fetched
    builder = data.prepare_dataset("fashion_mnist", tmp_path / "d",
                                   idx_dir=empty, max_examples=5,
                                   allow_download=True)
    assert len(fetched) == 4
    assert all(u.startswith(builders.FASHION_MNIST_URL) for u in fetched)
    _, labels = data.load_arrays("fashion_mnist", "train", tmp_path / "d",
                                 max_examples=5, idx_dir=empty)
    np.testing.assert_array_equal(labels, [9, 0, 0, 3, 0])
    assert builder.info.splits["test"].num_examples == 5


# ------------------------------------------------------------ grain loader
def test_loader_batches_shapes_ranges_and_values(fm_data_dir, fm_first):
    loader = _loader(fm_data_dir, shuffle=False, batch_size=8)
    batches = _take(loader, 3)
    for batch in batches:
        assert set(batch) == {"image", "label"}
        assert batch["image"].dtype == np.float32
        assert batch["image"].shape == (8, 28, 28, 1)
        assert batch["label"].dtype == np.int32 and batch["label"].shape == (8,)
        assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0
    # Without shuffle or augmentation the batches are the IDX images / 255.
    images = np.concatenate([b["image"] for b in batches])
    labels = np.concatenate([b["label"] for b in batches])
    np.testing.assert_allclose(images, fm_first[0][:24] / 255.0, atol=1e-7)
    np.testing.assert_array_equal(labels, fm_first[1][:24])


def test_loader_resizes_and_converts_channels(fm_data_dir, fm_first):
    batch = _take(_loader(fm_data_dir, shuffle=False, batch_size=4,
                          image_size=32, channels=3), 1)[0]
    assert batch["image"].shape == (4, 32, 32, 3)
    np.testing.assert_array_equal(batch["image"][..., 0],
                                  batch["image"][..., 2])
    # Mean brightness survives the 28 -> 32 resize (within interpolation).
    np.testing.assert_allclose(batch["image"].mean(axis=(1, 2, 3)),
                               fm_first[0][:4].mean(axis=(1, 2, 3)) / 255,
                               atol=0.02)


def test_one_epoch_covers_split_once_and_is_seeded(fm_data_dir, fm_first):
    def epoch(seed):
        batches = list(_loader(fm_data_dir, seed=seed, num_epochs=1))
        return _image_ids(_to_uint8(np.concatenate(
            [b["image"] for b in batches])))

    all_ids = _image_ids(fm_first[0])
    assert len(set(all_ids)) == NUM
    a, a_again, b = epoch(1), epoch(1), epoch(2)
    assert len(a) == NUM and sorted(a) == sorted(all_ids)
    assert a == a_again
    assert a != b and sorted(b) == sorted(all_ids)
    assert a != all_ids  # shuffled


def test_augmented_stream_is_deterministic_for_seed(fm_data_dir):
    kwargs = dict(random_crop=True, random_flip=True)
    first = _take(_loader(fm_data_dir, seed=5, **kwargs), 3)
    again = _take(_loader(fm_data_dir, seed=5, **kwargs), 3)
    other = _take(_loader(fm_data_dir, seed=6, **kwargs), 3)
    for x, y in zip(first, again):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["label"], y["label"])
    assert not all(np.array_equal(x["image"], z["image"])
                   for x, z in zip(first, other))


def test_random_crop_is_a_bounded_zero_filled_shift(fm_data_dir, fm_first):
    pad = 3
    batches = _take(_loader(fm_data_dir, shuffle=False, random_crop=True,
                            crop_padding=pad, batch_size=20), 1)
    shifted = _to_uint8(batches[0]["image"])
    seen_shifts = set()
    for aug, orig in zip(shifted, fm_first[0][:20]):
        padded = np.pad(orig, ((pad, pad), (pad, pad), (0, 0)))
        matches = [(dy, dx) for dy in range(2 * pad + 1)
                   for dx in range(2 * pad + 1)
                   if np.array_equal(padded[dy:dy + 28, dx:dx + 28], aug)]
        assert matches, "augmented image is not a shift of its source"
        seen_shifts.update(matches)
    assert len(seen_shifts) > 3


def test_random_flip_mirrors_about_half(fm_data_dir, fm_first):
    images = np.concatenate([b["image"] for b in _loader(
        fm_data_dir, shuffle=False, random_flip=True, num_epochs=1)])
    images = _to_uint8(images)
    flipped = 0
    for aug, orig in zip(images, fm_first[0]):
        if np.array_equal(aug, orig[:, ::-1]) and not np.array_equal(aug, orig):
            flipped += 1
        else:
            np.testing.assert_array_equal(aug, orig)
    assert 0.35 * NUM < flipped < 0.65 * NUM
    # Fashion-MNIST defaults to no flip.
    plain = _to_uint8(_take(_loader(fm_data_dir, shuffle=False), 1)[0]["image"])
    np.testing.assert_array_equal(plain, fm_first[0][:10])


def test_iterator_state_restores_exact_next_batch(fm_data_dir):
    kwargs = dict(seed=11, random_crop=True, random_flip=True)
    it = iter(_loader(fm_data_dir, **kwargs))
    for _ in range(3):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(2)]
    resumed = iter(_loader(fm_data_dir, **kwargs))
    resumed.set_state(state)
    for want in expected:
        got = next(resumed)
        np.testing.assert_array_equal(got["image"], want["image"])
        np.testing.assert_array_equal(got["label"], want["label"])


def test_iterator_state_through_orbax_checkpoint_manager(fm_data_dir,
                                                         tmp_path):
    import orbax.checkpoint as ocp
    it = iter(_loader(fm_data_dir, seed=4))
    next(it)
    next(it)
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        manager.save(2, args=ocp.args.Composite(
            data=grain.checkpoint.CheckpointSave(it)))
        manager.wait_until_finished()
    want = next(it)
    fresh = iter(_loader(fm_data_dir, seed=4))
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        manager.restore(2, args=ocp.args.Composite(
            data=grain.checkpoint.CheckpointRestore(fresh)))
    got = next(fresh)
    np.testing.assert_array_equal(got["image"], want["image"])
    np.testing.assert_array_equal(got["label"], want["label"])


def test_two_process_sharding_is_disjoint_and_complete(fm_data_dir, fm_first):
    shards = []
    for index in range(2):
        batches = list(_loader(fm_data_dir, num_epochs=1, shard_index=index,
                               shard_count=2, seed=9))
        assert len(batches) == NUM // 2 // 10
        shards.append(_image_ids(_to_uint8(np.concatenate(
            [b["image"] for b in batches]))))
    assert len(shards[0]) == len(shards[1]) == NUM // 2
    assert not set(shards[0]) & set(shards[1])
    assert sorted(shards[0] + shards[1]) == sorted(_image_ids(fm_first[0]))


def test_loader_argument_errors(fm_data_dir):
    with pytest.raises(ValueError, match="batch_size"):
        _loader(fm_data_dir, batch_size=0)
    with pytest.raises(ValueError, match="seed"):
        _loader(fm_data_dir, seed=-1)
    with pytest.raises(ValueError, match="shard_index and shard_count"):
        _loader(fm_data_dir, shard_index=1)
    with pytest.raises(ValueError, match="shard_index 2"):
        _loader(fm_data_dir, shard_index=2, shard_count=2)
    with pytest.raises(ValueError, match="too few"):
        _loader(fm_data_dir, batch_size=NUM + 1, num_epochs=1)
    with pytest.raises(ValueError, match="no split 'validation'"):
        _loader(fm_data_dir, split="validation")
    with pytest.raises(ValueError, match="channels"):
        _loader(fm_data_dir, channels=2)


# --------------------------------------------------------- image folders
_COLOURS = {"cat": (200, 30, 30), "ant": (10, 220, 40), "bee": (5, 5, 250)}


def _write_folder(root, per_class=3):
    """Solid-colour images of assorted sizes and modes, one colour per class.

    A solid colour stays that colour under any resize, which gives an
    independent expected value for every stored pixel.
    """
    sizes = [(20, 30), (40, 16), (12, 12)]
    for name, colour in _COLOURS.items():
        os.makedirs(root / name)
        for i in range(per_class):
            w, h = sizes[i % len(sizes)]
            image = PIL.Image.new("RGB", (w, h), colour)
            if i == 2:
                image = image.convert("RGBA")
            image.save(root / name / f"{i}.png")
        (root / name / "notes.txt").write_text("not an image")


def test_image_folder_builder_labels_sizes_and_pixels(tmp_path):
    root = tmp_path / "pets"
    _write_folder(root)
    builder = data.prepare_dataset(root, tmp_path / "d", image_size=(8, 6))
    names = builder.info.features["label"].names
    assert names == ["ant", "bee", "cat"]
    assert builder.info.splits["train"].num_examples == 9
    images, labels = data.load_arrays(root, "train", tmp_path / "d",
                                      image_size=(8, 6))
    assert images.shape == (9, 8, 6, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(labels, [0, 0, 0, 1, 1, 1, 2, 2, 2])
    for image, label in zip(images, labels):
        colour = np.array(_COLOURS[names[label]], np.uint8)
        np.testing.assert_array_equal(image, np.broadcast_to(colour,
                                                             image.shape))
    batch = _take(data.make_loader(root, data_dir=tmp_path / "d",
                                   image_size=(8, 6), batch_size=4, seed=0,
                                   read_threads=1), 1)[0]
    assert batch["image"].shape == (4, 8, 6, 3)
    assert set(batch["label"]) <= {0, 1, 2}


def test_image_folder_grey_splits_and_rebuild_on_change(tmp_path):
    root = tmp_path / "ds"
    for split in ("train", "test"):
        _write_folder(root / split, per_class=2 if split == "train" else 1)
    builder = data.prepare_dataset(root, tmp_path / "d", image_size=5,
                                   channels=1)
    assert {s: v.num_examples for s, v in builder.info.splits.items()} == {
        "train": 6, "test": 3}
    images, labels = data.load_arrays(root, "test", tmp_path / "d",
                                      image_size=5, channels=1)
    assert images.shape == (3, 5, 5, 1)
    np.testing.assert_array_equal(labels, [0, 1, 2])
    grey = [PIL.Image.new("RGB", (1, 1), _COLOURS[n]).convert("L").getpixel(
        (0, 0)) for n in ("ant", "bee", "cat")]
    np.testing.assert_array_equal(images[:, 2, 2, 0], grey)
    # Adding an image makes a new dataset, never a stale reuse.
    extra = root / "train" / "ant" / "x.png"
    PIL.Image.new("RGB", (9, 9), (1, 2, 3)).save(extra)
    rebuilt = data.prepare_dataset(root, tmp_path / "d", image_size=5,
                                   channels=1)
    assert str(rebuilt.data_dir) != str(builder.data_dir)
    assert rebuilt.info.splits["train"].num_examples == 7


def test_image_folder_errors(tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    PIL.Image.new("RGB", (4, 4)).save(flat / "a.png")
    with pytest.raises(ValueError, match="no class sub-folders"):
        data.prepare_dataset(flat, tmp_path / "d", image_size=4)
    (flat / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        data.prepare_dataset(flat, tmp_path / "d", image_size=4)
    with pytest.raises(ValueError, match="image_size is required"):
        data.prepare_dataset(flat, tmp_path / "d")
    bad = tmp_path / "bad"
    (bad / "x").mkdir(parents=True)
    (bad / "x" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="broken.png"):
        data.prepare_dataset(bad, tmp_path / "d", image_size=4)
