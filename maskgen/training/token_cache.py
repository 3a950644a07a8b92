"""Pre-tokenisation: encode the training split once, train the transformer from tokens.

`WORKDIR/token_cache/train-<p>-of-<n>.npz` holds process p's shard of the
split (stored order, no augmentation):
    tokens          int32 [N, h*w]   codebook ids, row-major token grid
    tokens_flipped  int32 [N, h*w]   tokens of the mirrored images (when random_flip)
    labels          int32 [N]
    meta            JSON: dataset, image size, token grid, tokenizer directory and step
A file whose meta differs from the current run (e.g. a retrained tokenizer)
is rebuilt; otherwise it is reused as is. A tokenizer inside the workdir is
recorded relative to it, so a workdir that is copied or moved (to another disk,
to a bucket) keeps its cache.
"""
import io
import json
import logging
import os
from typing import Any, Callable, Dict, Iterator, Optional

import jax
import ml_collections
import numpy as np
import tqdm

from maskgen import paths
from maskgen import sharding as shd
from maskgen.training import iterators

log = logging.getLogger(__name__)


def cache_path(workdir: str) -> str:
    return os.path.join(workdir, "token_cache",
                        f"train-{jax.process_index():05d}-of-{jax.process_count():05d}.npz")


def _meta(cfg: ml_collections.ConfigDict, grid: tuple[int, int], tokenizer_dir: str, tokenizer_step: int) -> Dict:
    meta = dict(dataset=str(cfg.dataset.name), data_dir=cfg.dataset.data_dir,
                split=str(cfg.dataset.train_split), image_size=int(cfg.image_size),
                channels=int(cfg.image_channels), grid=list(grid), tokenizer_dir=str(tokenizer_dir),
                tokenizer_step=int(tokenizer_step), flipped=bool(cfg.dataset.random_flip),
                max_examples=cfg.dataset.get("max_examples"))
    if cfg.dataset.name == iterators.SYNTHETIC:  # generated from the seed
        meta.update(seed=int(cfg.seed), synthetic_examples=int(cfg.dataset.synthetic_examples))
    return meta


def tokenizer_reference(tokenizer_dir: str, workdir: str) -> str:
    """`tokenizer_dir` relative to `workdir` when inside it, else its canonical absolute form."""
    tokenizer_dir, root = paths.normalize(tokenizer_dir), paths.normalize(workdir).rstrip("/") + "/"
    return tokenizer_dir[len(root):] if tokenizer_dir.startswith(root) else tokenizer_dir


def _local_image_batches(cfg: ml_collections.ConfigDict, batch: int) -> Iterator[Dict[str, np.ndarray]]:
    """This process's shard of the train split, in stored order, unaugmented."""
    ds = cfg.dataset
    if ds.name == iterators.SYNTHETIC:
        n = int(ds.get("synthetic_examples", 256))
        per = n // jax.process_count()
        start = jax.process_index() * per
        for lo in range(start, start + per, batch):
            pairs = [iterators.synthetic_image(cfg.seed, i, cfg.num_classes, cfg.image_size,
                                                    cfg.image_channels)
                     for i in range(lo, min(lo + batch, start + per))]
            yield {"image": np.stack([p[0] for p in pairs]),
                   "label": np.array([p[1] for p in pairs], np.int32)}
        return
    grain_it = iterators.GrainImages(ds, batch * jax.process_count(), cfg.seed, cfg.image_size,
                                          cfg.image_channels, num_epochs=1, shuffle=False,
                                          augment=False, drop_remainder=False)
    yield from grain_it


def _encode_all(batches: Any, encode_fn: Callable, mesh: jax.sharding.Mesh, local_batch: int, flip: bool,
                check_stop: Optional[Callable[[], None]] = None) -> Any:
    """Encodes every batch; batch k+1 is read while batch k is encoded (one batch in flight)."""
    tokens, flipped, labels = [], [], []
    bar = tqdm.tqdm(desc="pre-tokenising", unit="img", disable=jax.process_index() != 0, mininterval=2.0)

    def collect(pending: Any) -> None:
        codes, n, label = pending
        rows = [shd.local_rows(c)[:n].reshape(n, -1) for c in codes]
        tokens.append(rows[0])
        if flip:
            flipped.append(rows[1])
        labels.append(label)
        bar.update(n)

    pending = None
    for batch in batches:
        if check_stop is not None:
            check_stop()  # preemption: give up now, the cache is rebuilt on restart
        images, n = batch["image"], len(batch["image"])
        pad = np.zeros((local_batch - n,) + images.shape[1:], images.dtype)
        views = [np.concatenate([images, pad])]
        if flip:
            views.append(views[0][:, :, ::-1])
        codes = [encode_fn(shd.global_batch(v, mesh)) for v in views]  # dispatched, not awaited
        if pending is not None:
            collect(pending)
        pending = (codes, n, batch["label"])
    if pending is not None:
        collect(pending)
    bar.close()
    if not tokens:
        raise ValueError("the training split gave no examples to pre-tokenise")
    out = dict(tokens=np.concatenate(tokens).astype(np.int32),
               labels=np.concatenate(labels).astype(np.int32))
    if flip:
        out["tokens_flipped"] = np.concatenate(flipped).astype(np.int32)
    return out


def build_or_load(cfg: ml_collections.ConfigDict, workdir: str, encode_fn: Callable, mesh: jax.sharding.Mesh,
                  global_batch: int, grid: tuple[int, int],
                  tokenizer_dir: str, tokenizer_step: int,
                  check_stop: Optional[Callable[[], None]] = None) -> Dict[str, Optional[np.ndarray]]:
    """Tokens of this process's shard of the train split, encoded once and cached on disk.

    `encode_fn(global images) -> global token ids [B, h, w]` (jitted, batch-sharded).
    """
    path = cache_path(workdir)
    meta = _meta(cfg, grid, tokenizer_reference(tokenizer_dir, workdir), tokenizer_step)
    if paths.exists(path):
        with np.load(io.BytesIO(paths.read_bytes(path))) as f:
            if json.loads(str(f["meta"])) == meta:
                log.info("using token cache %s (%d examples)", path, len(f["labels"]))
                return {k: f[k] for k in f.files if k != "meta"}
        log.warning("token cache %s was built for another setup; rebuilding it", path)
    local_batch = iterators.local_batch_size(global_batch)
    arrays = _encode_all(_local_image_batches(cfg, local_batch), encode_fn, mesh, local_batch,
                         bool(cfg.dataset.random_flip), check_stop)
    bad = arrays["labels"][(arrays["labels"] < 0) | (arrays["labels"] >= cfg.num_classes)]
    if bad.size:
        raise ValueError(f"label {int(bad[0])} in the training split is outside the config's "
                         f"{cfg.num_classes} classes")
    # Each process writes its own shard file (local: temp + rename; gs://: one object upload).
    paths.atomic_write(path, lambda tmp: np.savez(tmp, meta=json.dumps(meta), **arrays))
    log.info("wrote token cache %s (%d examples)", path, len(arrays["labels"]))
    return arrays
