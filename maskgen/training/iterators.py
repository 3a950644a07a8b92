"""Training inputs: per-process batch iterators with a checkpointable position.

Every iterator yields this process's slice of each global batch as numpy
arrays and has `get_state()` / `set_state(state)` with a JSON-able state, which
the checkpoint stores under `data/`:

  * `GrainImages`      a dataset prepared by `maskgen.data` (tfds name, local
                       folder, fashion_mnist), read through grain;
  * `SyntheticImages`  `dataset.name == "synthetic"`: deterministic images and
                       labels computed from (seed, example index), no files;
  * `SyntheticTokens`  `dataset.name == "synthetic_tokens"`: token grids drawn the
                       same way, for transformer-only runs without a tokenizer;
  * `TokenCacheReader` tokens of a pre-tokenised split (written by `maskgen.training.token_cache`).

The in-memory ones share `EpochSampler`: a fresh permutation of the N examples
per epoch from (seed, epoch); global batch k takes positions [k*B, (k+1)*B) of
that endless stream and process p its p-th contiguous part. The state is just
the number of batches taken, so resuming is exact.
"""
import json
from typing import Any, Dict, Optional

import jax
import ml_collections
import numpy as np

SYNTHETIC = "synthetic"
SYNTHETIC_TOKENS = "synthetic_tokens"


def local_batch_size(global_batch: int) -> int:
    count = jax.process_count()
    if global_batch % count:
        raise ValueError(f"batch_size {global_batch} is not divisible by the {count} processes")
    return global_batch // count


class EpochSampler:
    """Example indices of this process's part of each global batch, reshuffled every epoch."""

    def __init__(self, num_examples: int, global_batch: int, seed: int,
                 process_index: Optional[int] = None, process_count: Optional[int] = None) -> None:
        if num_examples < 1:
            raise ValueError(f"the dataset is empty (num_examples={num_examples})")
        self.num_examples, self.global_batch, self.seed = int(num_examples), int(global_batch), int(seed)
        self.process_index = jax.process_index() if process_index is None else process_index
        self.process_count = jax.process_count() if process_count is None else process_count
        if self.global_batch % self.process_count:
            raise ValueError(f"batch_size {global_batch} is not divisible by {self.process_count} processes")
        self.local_batch = self.global_batch // self.process_count
        self.position = 0  # global batches taken
        self._perm_epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)
            self._perm_epoch = epoch
        return self._perm

    def next_positions(self) -> np.ndarray:
        """Global stream positions of this process's next local batch."""
        start = self.position * self.global_batch + self.process_index * self.local_batch
        self.position += 1
        return np.arange(start, start + self.local_batch, dtype=np.int64)

    def indices(self, positions: np.ndarray) -> np.ndarray:
        epochs, offsets = np.divmod(positions, self.num_examples)
        return np.array([self._permutation(int(e))[int(o)] for e, o in zip(epochs, offsets)], np.int64)

    def flips(self, positions: np.ndarray) -> np.ndarray:
        """A deterministic coin per stream position (horizontal-flip augmentation)."""
        return np.array([np.random.default_rng([self.seed, 7, int(p)]).random() < 0.5
                         for p in positions], bool)

    def get_state(self) -> Dict:
        return {"kind": "sampler", "position": int(self.position), "seed": self.seed,
                "num_examples": self.num_examples, "global_batch": self.global_batch}

    def set_state(self, state: Dict) -> None:
        if state.get("kind") != "sampler":
            raise ValueError(f"cannot resume an in-memory dataset from input state {state}")
        for key in ("num_examples", "global_batch"):
            if key in state and int(state[key]) != getattr(self, key):
                raise ValueError(f"input state has {key}={state[key]} but this run has "
                                 f"{getattr(self, key)}: the checkpoint is from another data config")
        self.position = int(state["position"])


def synthetic_image(seed: int, index: int, num_classes: int, size: int, channels: int) -> tuple[np.ndarray, int]:
    """(image float32 [size, size, channels] in [0, 1], label) of synthetic example `index`.

    Class-coloured smooth blobs plus a little noise: cheap, deterministic and
    learnable enough for smoke runs.
    """
    rng = np.random.default_rng([seed, index])
    label = index % num_classes
    colour = np.random.default_rng([seed, 1_000_003, label]).uniform(0.15, 0.85, channels)
    coarse = rng.uniform(-0.25, 0.25, (4, 4, 1))
    field = np.kron(coarse, np.ones((-(-size // 4), -(-size // 4), 1)))[:size, :size]
    image = colour[None, None, :] + field + rng.normal(0, 0.03, (size, size, channels))
    return np.clip(image, 0.0, 1.0).astype(np.float32), label


def synthetic_tokens(seed: int, index: int, num_classes: int, num_tokens: int,
                     codebook_size: int) -> tuple[np.ndarray, int]:
    """(tokens int32 [num_tokens], label): class-dependent codes on half the codebook."""
    rng = np.random.default_rng([seed, index])
    label = index % num_classes
    offset = (label * codebook_size) // num_classes
    tokens = (rng.integers(0, max(codebook_size // 2, 1), num_tokens) + offset) % codebook_size
    return tokens.astype(np.int32), label


class SyntheticImages:
    """`dataset.name == "synthetic"`: a finite set of generated images, sampled like a real split."""

    def __init__(self, num_examples: int, global_batch: int, seed: int, num_classes: int, image_size: int,
                 channels: int,
                 random_flip: bool = False) -> None:
        self.sampler = EpochSampler(num_examples, global_batch, seed)
        self.data_seed, self.num_classes = int(seed), int(num_classes)
        self.image_size, self.channels, self.random_flip = int(image_size), int(channels), random_flip

    def example(self, index: int) -> tuple[np.ndarray, int]:
        return synthetic_image(self.data_seed, int(index), self.num_classes, self.image_size, self.channels)

    def __iter__(self) -> "SyntheticImages":
        return self

    def __next__(self) -> Dict[str, np.ndarray]:
        positions = self.sampler.next_positions()
        pairs = [self.example(i) for i in self.sampler.indices(positions)]
        images = np.stack([p[0] for p in pairs])
        if self.random_flip:
            flip = self.sampler.flips(positions)
            images[flip] = images[flip, :, ::-1]
        return {"image": images, "label": np.array([p[1] for p in pairs], np.int32)}

    def get_state(self) -> Dict:
        return self.sampler.get_state()

    def set_state(self, state: Any) -> None:
        self.sampler.set_state(state)


class SyntheticTokens:
    """`dataset.name == "synthetic_tokens"`: token grids without any tokenizer."""

    def __init__(self, num_examples: int, global_batch: int, seed: int, num_classes: int, num_tokens: int,
                 codebook_size: int) -> None:
        self.sampler = EpochSampler(num_examples, global_batch, seed)
        self.args = (int(seed), int(num_classes), int(num_tokens), int(codebook_size))

    def __iter__(self) -> "SyntheticTokens":
        return self

    def __next__(self) -> Dict[str, np.ndarray]:
        seed, classes, tokens, codebook = self.args
        pairs = [synthetic_tokens(seed, int(i), classes, tokens, codebook)
                 for i in self.sampler.indices(self.sampler.next_positions())]
        return {"tokens": np.stack([p[0] for p in pairs]), "label": np.array([p[1] for p in pairs], np.int32)}

    def get_state(self) -> Dict:
        return self.sampler.get_state()

    def set_state(self, state: Any) -> None:
        self.sampler.set_state(state)


class TokenCacheReader:
    """Batches of cached tokens; with flipped tokens cached, a coin per position picks the view."""

    def __init__(self, tokens: np.ndarray, labels: np.ndarray, global_batch: int, seed: int,
                 tokens_flipped: np.ndarray | None = None) -> None:
        self.tokens, self.labels, self.tokens_flipped = tokens, labels, tokens_flipped
        # Each process caches only its own shard: it samples that shard on its own
        # (a local stream of local batches), with a seed of its own.
        self.sampler = EpochSampler(len(tokens), local_batch_size(global_batch),
                                    int(seed) * 1_000_003 + jax.process_index(),
                                    process_index=0, process_count=1)

    def __iter__(self) -> "TokenCacheReader":
        return self

    def __next__(self) -> Dict[str, np.ndarray]:
        positions = self.sampler.next_positions()
        idx = self.sampler.indices(positions)
        tokens = self.tokens[idx]
        if self.tokens_flipped is not None:
            flip = self.sampler.flips(positions)
            tokens = np.where(flip[:, None], self.tokens_flipped[idx], tokens)
        return {"tokens": tokens.astype(np.int32), "label": self.labels[idx].astype(np.int32)}

    def get_state(self) -> Dict:
        return self.sampler.get_state()

    def set_state(self, state: Any) -> None:
        self.sampler.set_state(state)


class GrainImages:
    """A `maskgen.data.make_loader` iterator with a JSON-able state."""

    def __init__(self, dataset_cfg: ml_collections.ConfigDict, global_batch: int, seed: int, image_size: int,
                 channels: int, num_epochs: int | None = None,
                 shuffle: bool = True, augment: bool = True, drop_remainder: bool = True,
                 split: str | None = None) -> None:
        from maskgen import data
        self.loader = data.make_loader(
            dataset_cfg.name, split=split or dataset_cfg.train_split, data_dir=dataset_cfg.data_dir,
            batch_size=local_batch_size(global_batch), seed=int(seed) % 2 ** 32,
            image_size=image_size, channels=channels,
            random_crop=bool(dataset_cfg.random_crop) and augment,
            random_flip=bool(dataset_cfg.random_flip) and augment, shuffle=shuffle,
            num_epochs=num_epochs, drop_remainder=drop_remainder,
            worker_count=int(dataset_cfg.worker_count), max_examples=dataset_cfg.get("max_examples"))
        self._it = iter(self.loader)

    def __iter__(self) -> "GrainImages":
        return self

    def __next__(self) -> Dict[str, np.ndarray]:
        batch = next(self._it)
        return {"image": np.asarray(batch["image"], np.float32),
                "label": np.asarray(batch["label"], np.int32)}

    def get_state(self) -> Dict:
        return {"kind": "grain", "state": self._it.get_state().decode()}

    def set_state(self, state: Any) -> None:
        if state.get("kind") != "grain":
            raise ValueError(f"cannot resume a grain dataset from input state {state}")
        self._it.set_state(state["state"].encode())


def image_iterator(cfg: ml_collections.ConfigDict, global_batch: int, seed: int) -> GrainImages | SyntheticImages:
    """The training-image iterator a config asks for (synthetic or a prepared dataset)."""
    ds = cfg.dataset
    if ds.name == SYNTHETIC:
        return SyntheticImages(ds.get("synthetic_examples", 256), global_batch, seed, cfg.num_classes,
                               cfg.image_size, cfg.image_channels, bool(ds.random_flip))
    if ds.name == SYNTHETIC_TOKENS:
        raise ValueError("dataset 'synthetic_tokens' has no images: it can only feed the transformer stage")
    return GrainImages(ds, global_batch, seed, cfg.image_size, cfg.image_channels)



def gather_states(state: Dict) -> Dict:
    """Every process's iterator state, for the checkpoint's `data` item (written by process 0).

    grain states differ between processes (each reads its own shard), so all of
    them are collected; this syncs the hosts and runs only when saving.
    """
    if jax.process_count() == 1:
        return {"process_count": 1, "per_process": [state]}
    from jax.experimental import multihost_utils
    raw = np.frombuffer(json.dumps(state, sort_keys=True).encode(), np.uint8)
    lengths = multihost_utils.process_allgather(np.array([raw.size], np.int32))
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[:raw.size] = raw
    rows = multihost_utils.process_allgather(padded)
    states = [json.loads(bytes(rows[i][:int(lengths[i][0])]).decode()) for i in range(len(rows))]
    return {"process_count": jax.process_count(), "per_process": states}


def local_state(saved: Dict) -> Dict:
    """This process's iterator state out of `gather_states`' record."""
    if "per_process" not in saved:
        raise ValueError(f"unrecognised input state in the checkpoint: {sorted(saved)}")
    states = saved["per_process"]
    if len(states) == jax.process_count():
        return states[jax.process_index()]
    if all(s == states[0] for s in states) and states[0].get("kind") == "sampler":
        return states[0]  # in-memory samplers keep one global position
    raise ValueError(f"the input position was saved by {len(states)} processes and cannot be split over "
                     f"{jax.process_count()}: resume with the same number of processes")
