"""tfds builders that need no TensorFlow, and `prepare_dataset`.

Datasets are written once as array_record files (random access, read by grain
through tfds data sources). Images are handed to tfds as PNG bytes because
tfds encodes numpy images through TensorFlow. Both builders set
`disable_shuffling`, so record i is the i-th generated example: Fashion-MNIST
keeps its official order and image folders their sorted file order.

The builders are not registered with tfds (their names would clash with the
public `fashion_mnist`); reading goes through `tfds.builder_from_directory`,
which needs only the prepared files.
"""
import hashlib
import os
import re
import urllib.request
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import PIL.Image
import tensorflow_datasets as tfds

from maskgen.data import idx, images

FILE_FORMAT = "array_record"
FASHION_MNIST = "fashion_mnist"
# Public mirror of the IDX files (the one tfds' own fashion_mnist uses).
FASHION_MNIST_URL = (
    "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif",
                    ".tiff")
SPLIT_NAMES = ("train", "validation", "test")


def default_data_dir() -> str:
    """The tfds default: $TFDS_DATA_DIR or ~/tensorflow_datasets."""
    return os.path.expanduser(
        os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets"))


def _subset_name(max_examples: Optional[int]) -> str:
    if max_examples is None:
        return ""
    if int(max_examples) < 1:
        raise ValueError(f"max_examples must be >= 1 or None, got "
                         f"{max_examples!r}")
    return f"first{int(max_examples)}"


class FashionMnist(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Fashion-MNIST from the local IDX files (28x28x1, 10 classes).

    `max_examples` keeps the first N examples of each split (for tests); it
    is part of the config name, so a subset never shadows the full set.
    """

    name = FASHION_MNIST
    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="full")]

    def __init__(self, *, idx_dir: str | os.PathLike = idx.FASHION_MNIST_DIR,
                 max_examples: Optional[int] = None, **kwargs: Any) -> None:
        self._idx_dir = os.fspath(idx_dir)
        self._max_examples = max_examples
        if max_examples is None:
            config = self.BUILDER_CONFIGS[0]
        else:  # a custom config: tfds logs one warning about it
            config = tfds.core.BuilderConfig(name=_subset_name(max_examples))
        super().__init__(config=config, **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Zalando Fashion-MNIST, read from local IDX files.",
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(28, 28, 1)),
                "label": tfds.features.ClassLabel(
                    names=list(idx.FASHION_MNIST_CLASSES)),
            }),
            supervised_keys=("image", "label"),
            disable_shuffling=True,
            homepage="https://github.com/zalandoresearch/fashion-mnist",
            license="MIT",
        )

    def _split_generators(self, dl_manager: Any
                          ) -> Dict[str, Iterator[Tuple[int, dict]]]:
        del dl_manager  # the files are local
        return {split: self._generate_examples(split)
                for split in idx.FASHION_MNIST_FILES}

    def _generate_examples(self, split: str) -> Iterator[Tuple[int, dict]]:
        pixels, labels = idx.load_fashion_mnist_idx(split, self._idx_dir)
        count = len(labels) if self._max_examples is None else min(
            len(labels), int(self._max_examples))
        for i in range(count):
            yield i, {"image": images.png_bytes(pixels[i]),
                      "label": int(labels[i])}


def _list_images(class_dir: str) -> List[str]:
    return sorted(
        os.path.join(class_dir, f) for f in os.listdir(class_dir)
        if f.lower().endswith(IMAGE_EXTENSIONS)
        and os.path.isfile(os.path.join(class_dir, f)))


def _subdirs(path: str) -> List[str]:
    return sorted(d for d in os.listdir(path)
                  if os.path.isdir(os.path.join(path, d))
                  and not d.startswith("."))


def scan_image_folder(root: str | os.PathLike
                      ) -> Tuple[List[str], Dict[str, List[Tuple[str, int]]]]:
    """Finds the splits, class names and files of an image folder.

    Layouts: `root/<class>/<image>` (one split, "train"), or
    `root/<split>/<class>/<image>` when every sub-folder of root is one of
    train/validation/test. Class names are sorted and numbered from 0 over
    the union of all splits, so every split uses the same label ids.

    Returns (class_names, {split: [(path, label), ...]}).
    """
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder not found: {root}")
    top = _subdirs(root)
    if not top:
        raise ValueError(f"image folder {root} has no class sub-folders")
    if set(top) <= set(SPLIT_NAMES):
        split_dirs = {s: os.path.join(root, s) for s in top}
    else:
        split_dirs = {"train": root}
    per_split = {s: _subdirs(d) for s, d in split_dirs.items()}
    class_names = sorted(set().union(*per_split.values()))
    if not class_names:
        raise ValueError(f"image folder {root} has no class sub-folders")
    files = {}
    for split, split_dir in split_dirs.items():
        entries = []
        for name in per_split[split]:
            paths = _list_images(os.path.join(split_dir, name))
            if not paths:
                raise ValueError(
                    f"class folder {os.path.join(split_dir, name)} holds no "
                    f"images ({', '.join(IMAGE_EXTENSIONS)})")
            label = class_names.index(name)
            entries.extend((p, label) for p in paths)
        files[split] = entries
    return class_names, files


def _folder_fingerprint(root: str,
                        files: Mapping[str, Sequence[Tuple[str, int]]]) -> str:
    """Hash of the folder's path and its file list (names and sizes)."""
    digest = hashlib.sha1(os.path.abspath(root).encode())
    for split in sorted(files):
        for path, label in files[split]:
            digest.update(f"{split}|{os.path.relpath(path, root)}|{label}|"
                          f"{os.path.getsize(path)}\n".encode())
    return digest.hexdigest()[:10]


class ImageFolder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A user folder of class sub-folders, resized to one image size.

    The config name records the folder name, size, channels, subset and a
    fingerprint of the file list, so editing the folder or asking for another
    size prepares a new dataset instead of reusing a stale one.
    """

    name = "image_folder"
    VERSION = tfds.core.Version("1.0.0")

    def __init__(self, *, root: str | os.PathLike,
                 image_size: int | Sequence[int], channels: int = 3,
                 max_examples: Optional[int] = None, **kwargs: Any) -> None:
        self._root = os.fspath(root)
        self._size = images.image_hw(image_size)
        self._channels = images.check_channels(channels)
        self._max_examples = max_examples
        self._class_names, self._files = scan_image_folder(self._root)
        base = re.sub(r"[^a-z0-9]+", "_",
                      os.path.basename(os.path.abspath(self._root)).lower())
        parts = [base.strip("_") or "folder",
                 f"{self._size[0]}x{self._size[1]}c{self._channels}",
                 _subset_name(max_examples),
                 _folder_fingerprint(self._root, self._files)]
        config = tfds.core.BuilderConfig(
            name="_".join(p for p in parts if p),
            description=f"image folder {os.path.abspath(self._root)}")
        super().__init__(config=config, **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=f"Images from {os.path.abspath(self._root)}",
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(
                    shape=(*self._size, self._channels)),
                "label": tfds.features.ClassLabel(names=self._class_names),
            }),
            supervised_keys=("image", "label"),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager: Any
                          ) -> Dict[str, Iterator[Tuple[int, dict]]]:
        del dl_manager
        return {split: self._generate_examples(entries)
                for split, entries in self._files.items()}

    def _generate_examples(self, entries: Sequence[Tuple[str, int]]
                           ) -> Iterator[Tuple[int, dict]]:
        if self._max_examples is not None:
            entries = entries[:int(self._max_examples)]
        for i, (path, label) in enumerate(entries):
            try:
                with PIL.Image.open(path) as pil_image:
                    pil_image.load()
                    fitted = images.resize_center_crop(
                        pil_image.convert("RGB" if self._channels == 3
                                          else "L"), self._size)
            except (OSError, PIL.Image.DecompressionBombError) as e:
                raise ValueError(f"cannot read image {path}: {e}") from e
            array = images.from_pil(fitted, self._channels)
            yield i, {"image": images.png_bytes(array), "label": label}


def _download_fashion_mnist(target_dir: str) -> str:
    """Fetches the four public IDX files (only when explicitly allowed)."""
    os.makedirs(target_dir, exist_ok=True)
    for split in idx.FASHION_MNIST_FILES:
        for path in idx.fashion_mnist_paths(split, target_dir):
            if not os.path.isfile(path):
                url = FASHION_MNIST_URL + os.path.basename(path)
                urllib.request.urlretrieve(url, path + ".part")
                os.replace(path + ".part", path)
    return target_dir


def check_local_data_dir(path: "str | os.PathLike", what: str = "dataset.data_dir") -> None:
    """Refuses a URL (gs://, s3:// ...) as a dataset location, naming the supported alternatives.

    Why: grain reads tfds datasets through array_record's C++ reader, which opens
    local files only. Measured (array_record 0.8, fake-gcs-server): an
    `ArrayRecordReader("gs://bucket/x.array_record")` did not return within 120 s
    instead of failing, so a gs:// data_dir would hang a training run at its
    first batch rather than stop with an error. Checkpoints, logs and samples
    can live in a bucket; the dataset must be on a local or mounted filesystem.
    """
    text = os.fspath(path)
    scheme = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*)://", text)
    if scheme:
        raise ValueError(
            f"{what}={text}: datasets cannot be read from {scheme.group(1)}:// (array_record, which "
            f"grain reads tfds datasets with, opens local files only). Use a local copy (e.g. "
            f"`gcloud storage cp -r {text} /data/tfds` on every host, then {what}=/data/tfds) or mount the "
            f"bucket with Cloud Storage FUSE (`gcsfuse --implicit-dirs BUCKET /mnt/BUCKET`, then "
            f"{what}=/mnt/BUCKET/...); the workdir itself may stay on gs://")


def _prepare(builder: tfds.core.DatasetBuilder) -> tfds.core.DatasetBuilder:
    """download_and_prepare unless the files are already there."""
    if not _is_prepared(builder.data_dir):
        builder.download_and_prepare(file_format=FILE_FORMAT)
    return tfds.builder_from_directory(builder.data_dir)


def _is_prepared(builder_dir: str | os.PathLike) -> bool:
    return os.path.isfile(os.path.join(builder_dir, "dataset_info.json"))


def prepare_dataset(name_or_path: str | os.PathLike,
                    data_dir: Optional[str | os.PathLike] = None, *,
                    image_size: Optional[int | Sequence[int]] = None,
                    channels: int = 3, max_examples: Optional[int] = None,
                    idx_dir: str | os.PathLike = idx.FASHION_MNIST_DIR,
                    allow_download: bool = False) -> tfds.core.DatasetBuilder:
    """Makes a dataset readable by grain; returns its read-only tfds builder.

    `name_or_path` is one of:
      * "fashion_mnist": built from the local IDX files in `idx_dir`; if they
        are missing and `allow_download` is set, the public IDX files are
        fetched into `data_dir/downloads/fashion_mnist` first.
      * a directory of class sub-folders: built with `ImageFolder` at
        `image_size` (required) and `channels`.
      * any other tfds name ("imagenet2012", "name/config:1.0.0") already
        prepared as array_record under `data_dir`; with `allow_download`,
        tfds' own builder prepares it (which may need TensorFlow).

    Preparing is idempotent: a dataset already on disk is reused, not
    rebuilt. `builder.data_dir` is the prepared directory; `builder.info`
    has the split sizes and class count. Run it on one process before
    multi-host training reads the same directory.
    """
    data_dir = os.fspath(data_dir) if data_dir is not None \
        else default_data_dir()
    name_or_path = os.fspath(name_or_path)
    check_local_data_dir(data_dir)
    check_local_data_dir(name_or_path, "dataset")
    if os.path.isdir(name_or_path):
        if image_size is None:
            raise ValueError(f"image_size is required to prepare the image "
                             f"folder {name_or_path}")
        return _prepare(ImageFolder(
            root=name_or_path, image_size=image_size, channels=channels,
            max_examples=max_examples, data_dir=data_dir,
            file_format=FILE_FORMAT))
    if name_or_path == FASHION_MNIST:
        builder = FashionMnist(idx_dir=idx_dir, max_examples=max_examples,
                               data_dir=data_dir, file_format=FILE_FORMAT)
        if _is_prepared(builder.data_dir):
            return tfds.builder_from_directory(builder.data_dir)
        if not idx.fashion_mnist_available(idx_dir):
            if not allow_download:
                # Raises FileNotFoundError with the install command.
                idx.load_fashion_mnist_idx("train", idx_dir)
                idx.load_fashion_mnist_idx("test", idx_dir)
            idx_dir = _download_fashion_mnist(
                os.path.join(data_dir, "downloads", FASHION_MNIST))
            builder = FashionMnist(idx_dir=idx_dir, max_examples=max_examples,
                                   data_dir=data_dir, file_format=FILE_FORMAT)
        return _prepare(builder)
    if max_examples is not None:
        raise ValueError(f"max_examples applies to fashion_mnist and image "
                         f"folders, not to the tfds dataset {name_or_path!r}")
    try:
        return tfds.core.read_only_builder.builder_from_files(
            name_or_path, data_dir=data_dir)
    except tfds.core.DatasetNotFoundError as e:
        if not allow_download:
            raise FileNotFoundError(
                f"dataset {name_or_path!r} is neither a folder nor prepared "
                f"under {data_dir}; prepare it with tfds "
                f"(file_format='array_record') or pass allow_download=True"
            ) from e
    builder = tfds.builder(name_or_path, data_dir=data_dir,
                           file_format=FILE_FORMAT)
    return _prepare(builder)
