"""grain input pipeline over prepared tfds datasets, and a whole-split loader.

`make_loader` returns a `grain.DataLoader`; iterating it yields
`{"image": float32 [B, H, W, C] in [0, 1], "label": int32 [B]}` with B the
per-process batch size. Each JAX process reads a disjoint, equal-sized slice
of the split. The order and the augmentations are a pure function of
(seed, shard, worker_count) - grain assembles batches per worker, so keep
worker_count fixed across a resume - and the iterator's position is
checkpointable:

    it = iter(loader)
    state = it.get_state()          # bytes; or, with orbax,
    # ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it))
    it.set_state(state)             # next(it) is the batch that followed
"""
import dataclasses
import os
from typing import Any, Dict, Optional, Sequence, Tuple

import grain
import jax
import numpy as np
from absl import flags

from maskgen.data import builders, idx, images, transforms


@dataclasses.dataclass(frozen=True)
class DatasetSummary:
    """What a trainer needs to know about a prepared dataset."""

    name: str
    data_dir: str                 # the prepared tfds directory
    num_examples: Dict[str, int]  # split name -> example count
    class_names: Tuple[str, ...]
    image_shape: Tuple           # stored (H, W, C); None entries if varied

    @property
    def num_classes(self) -> int:
        """Number of class labels (the label feature's names)."""
        return len(self.class_names)


def dataset_summary(dataset: str | os.PathLike,
                    data_dir: Optional[str | os.PathLike] = None,
                    **prepare_kwargs: Any) -> DatasetSummary:
    """Prepares `dataset` if needed and describes it (see prepare_dataset)."""
    builder = builders.prepare_dataset(dataset, data_dir, **prepare_kwargs)
    features = builder.info.features
    label = features["label"]
    return DatasetSummary(
        name=builder.info.full_name,
        data_dir=str(builder.data_dir),
        num_examples={s: int(v.num_examples)
                      for s, v in builder.info.splits.items()},
        class_names=tuple(label.names),
        image_shape=tuple(features["image"].shape),
    )


def _open_source(dataset: str | os.PathLike, split: str,
                 data_dir: Optional[str | os.PathLike],
                 image_size: Optional[Tuple[int, int]],
                 channels: Optional[int], max_examples: Optional[int],
                 idx_dir: str | os.PathLike,
                 allow_download: bool) -> Tuple[Any, Any]:
    """(read-only builder, random-access source) for one split."""
    prepare_kwargs = dict(max_examples=max_examples, idx_dir=idx_dir,
                          allow_download=allow_download)
    if os.path.isdir(os.fspath(dataset)):
        prepare_kwargs.update(image_size=image_size,
                              channels=3 if channels is None else channels)
    builder = builders.prepare_dataset(dataset, data_dir, **prepare_kwargs)
    if split not in builder.info.splits:
        raise ValueError(f"dataset {dataset!r} has no split {split!r}; "
                         f"splits: {sorted(builder.info.splits)}")
    return builder, builder.as_data_source(split=split)


def _shard_options(shard_index: Optional[int], shard_count: Optional[int]
                   ) -> grain.sharding.ShardOptions:
    if (shard_index is None) != (shard_count is None):
        raise ValueError("give both shard_index and shard_count, or neither "
                         f"(got {shard_index!r}, {shard_count!r})")
    if shard_index is None:
        shard_index, shard_count = jax.process_index(), jax.process_count()
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index {shard_index} is outside [0, "
                         f"{shard_count})")
    # Equal shards keep every process stepping in lockstep.
    return grain.sharding.ShardOptions(shard_index=shard_index,
                                       shard_count=shard_count,
                                       drop_remainder=True)


def make_loader(dataset: str | os.PathLike, *, split: str = "train",
                data_dir: Optional[str | os.PathLike] = None, batch_size: int,
                seed: int = 0,
                image_size: Optional[int | Sequence[int]] = None,
                channels: Optional[int] = None, random_crop: bool = False,
                crop_padding: int = 4, random_flip: Optional[bool] = None,
                shuffle: bool = True, num_epochs: Optional[int] = None,
                drop_remainder: bool = True,
                shard_index: Optional[int] = None,
                shard_count: Optional[int] = None, worker_count: int = 0,
                worker_buffer_size: int = 1,
                read_threads: Optional[int] = None, prefetch: int = 500,
                max_examples: Optional[int] = None,
                idx_dir: str | os.PathLike = idx.FASHION_MNIST_DIR,
                allow_download: bool = False) -> grain.DataLoader:
    """Builds the grain DataLoader for one split of a dataset.

    Args:
      dataset: "fashion_mnist", an image-folder path, or a prepared tfds name
        (see `prepare_dataset`); it is prepared on first use.
      split: split name ("train", "test", ...).
      data_dir: where prepared datasets live (tfds default if None).
      batch_size: examples per batch on this process.
      seed: 32-bit seed for the shuffle order and the augmentations.
      image_size: int or (H, W); images are scaled to cover it and centre
        cropped (None keeps the stored size). For image folders it is also
        the stored size.
      channels: 1 or 3 (None keeps the stored channels; folders default 3).
      random_crop: zero-pad by `crop_padding` and crop back (translation).
      random_flip: horizontal flip with p=0.5; None means on, except for
        fashion_mnist, where left/right carry meaning for some classes.
      shuffle: shuffle globally each epoch (order depends on seed and epoch).
      num_epochs: None repeats forever.
      drop_remainder: drop the last partial batch.
      shard_index, shard_count: this process's slice; default
        jax.process_index() / jax.process_count().
      worker_count: grain worker processes (0 = in-process; >0 needs a
        `__main__` guard in the entry script).
      worker_buffer_size, read_threads, prefetch: grain buffering knobs
        (batches per worker, record-reading threads, records read ahead).
        read_threads=None uses one per usable CPU core, at most 16: more
        threads than cores measured slower (GIL contention).
      max_examples, idx_dir, allow_download: passed to `prepare_dataset`.
    """
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got "
                         f"{batch_size!r}")
    if not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2 ** 32:
        raise ValueError(f"seed must be an int in [0, 2**32), got {seed!r}")
    if crop_padding < 0:
        raise ValueError(f"crop_padding must be >= 0, got {crop_padding}")
    if worker_count < 0:
        raise ValueError(f"worker_count must be >= 0, got {worker_count}")
    if num_epochs is not None and num_epochs < 1:
        raise ValueError(f"num_epochs must be >= 1 or None, got {num_epochs}")
    size = None if image_size is None else images.image_hw(image_size)
    if channels is not None:
        images.check_channels(channels)
    if read_threads is None:
        read_threads = min(16, len(os.sched_getaffinity(0))
                           if hasattr(os, "sched_getaffinity")
                           else os.cpu_count() or 1)
    shard = _shard_options(shard_index, shard_count)
    _, source = _open_source(dataset, split, data_dir, size, channels,
                             max_examples, idx_dir, allow_download)
    per_shard = len(source) // shard.shard_count
    if per_shard == 0 or (drop_remainder and num_epochs is not None
                          and per_shard * num_epochs < batch_size):
        raise ValueError(
            f"split {split!r} of {dataset!r} has {len(source)} examples: "
            f"{per_shard} per process for {shard.shard_count} processes, too "
            f"few for one batch of {batch_size}")
    if worker_count > 0 and not flags.FLAGS.is_parsed():
        # grain workers read absl flags; outside an absl app (notebooks,
        # plain scripts) their defaults are what we want.
        flags.FLAGS.mark_as_parsed()
    if random_flip is None:
        random_flip = dataset != builders.FASHION_MNIST

    operations = [transforms.ParseExample(image_size=size, channels=channels)]
    if random_crop and crop_padding > 0:
        operations.append(transforms.RandomCropWithPadding(crop_padding))
    if random_flip:
        operations.append(transforms.RandomHorizontalFlip())
    operations += [
        grain.transforms.Batch(batch_size=int(batch_size),
                               drop_remainder=drop_remainder),
        transforms.ToFloatBatch(),
    ]
    sampler = grain.samplers.IndexSampler(
        num_records=len(source), shard_options=shard, shuffle=shuffle,
        num_epochs=num_epochs, seed=int(seed))
    return grain.DataLoader(
        data_source=source, sampler=sampler, operations=operations,
        worker_count=worker_count, worker_buffer_size=worker_buffer_size,
        shard_options=shard,
        read_options=grain.ReadOptions(num_threads=read_threads,
                                       prefetch_buffer_size=prefetch))


def load_arrays(dataset: str | os.PathLike, split: str = "train",
                data_dir: Optional[str | os.PathLike] = None, *,
                image_size: Optional[int | Sequence[int]] = None,
                channels: Optional[int] = None,
                max_examples: Optional[int] = None,
                idx_dir: str | os.PathLike = idx.FASHION_MNIST_DIR,
                allow_download: bool = False,
                chunk_size: int = 4096) -> Tuple[np.ndarray, np.ndarray]:
    """Reads a whole split into memory, in stored order, without grain.

    For pre-tokenising and evaluation on small datasets. Returns
    (images uint8 [N, H, W, C], labels int32 [N]); `image_size`/`channels`
    as in `make_loader` (needed when stored images differ in size).
    """
    size = None if image_size is None else images.image_hw(image_size)
    if channels is not None:
        images.check_channels(channels)
    _, source = _open_source(dataset, split, data_dir, size, channels,
                             max_examples, idx_dir, allow_download)
    parse = transforms.ParseExample(image_size=size, channels=channels)
    pixels, labels = [], []
    for start in range(0, len(source), chunk_size):
        keys = list(range(start, min(start + chunk_size, len(source))))
        for record in source.__getitems__(keys):
            example = parse.map(record)
            pixels.append(example["image"])
            labels.append(example["label"])
    shapes = {p.shape for p in pixels}
    if len(shapes) > 1:
        raise ValueError(f"split {split!r} of {dataset!r} has images of "
                         f"several shapes ({sorted(shapes)[:3]}...); pass "
                         "image_size")
    return np.stack(pixels), np.asarray(labels, dtype=np.int32)
