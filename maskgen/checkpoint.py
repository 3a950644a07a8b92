"""Orbax checkpoints of one training stage, with safe resume.

A stage directory (e.g. `WORKDIR/transformer/`) is an orbax CheckpointManager
directory; step `S` is saved atomically as `WORKDIR/<stage>/<S>/` with three items:

    state/   (orbax StandardSave pytree)
        step          int32 []          optimizer steps taken
        params        the model's `params` collection (flax names)
        ema_params    EMA of params, same tree (used for sampling)
        opt_state     optax state (clip + AdamW: count, mu, nu trees)
        disc_params, disc_opt_state, lecam_ema      tokenizer stage only
    data/    (orbax JsonSave) the input position of every process:
        {"process_count": n, "per_process": [state_0, ..., state_n-1]} with
        state_i = {"kind": "grain", "state": <grain iterator state JSON>} or
                  {"kind": "sampler", "position": <global batches taken>, ...}
    config/  (orbax JsonSave) the run's resolved config (config.json's content when the step was
             written), committed with the arrays, so a step is loadable by the config it was written
             with even after config.json changed. Steps written before it existed lack it
             (`saved_config` returns None; readers fall back to config.json).

Plain orbax reads it without maskgen:
`ocp.CheckpointManager(dir).restore(step)["state"]["ema_params"]`.

Resume order: the newest step whose files read back; a step that fails to read
(truncated or corrupt files) is logged, moved aside to `corrupt.<step>` and
the previous step is tried. A checkpoint whose parameter tree or shapes differ
from the model being trained is an error naming the first mismatched path.
Steps are kept by recency (`keep` newest) plus the best by a metric.
"""
import errno
import json
import logging
import os
import re
import shutil
import threading
import time
from typing import Any, Dict, Never, Optional, Tuple

import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers as ocm

from maskgen import config_io, paths
from maskgen.cli import UserError

log = logging.getLogger(__name__)

CONFIG_ITEM = "config"
TIMEOUT_ENV = "MASKGEN_CHECKPOINT_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 900.0


class CheckpointMismatchError(ValueError):
    """A checkpoint was written for a different model/config than the one restoring it."""


class CheckpointIOError(UserError):
    """A checkpoint could not be written (no space, permission, vanished directory, timeout).

    Raised on the main thread within a step of the failure so training stops instead of running on
    without checkpoints; the message is one line naming the path, the cause and what survives.
    """


def save_timeout_s() -> float:
    """How long to wait for a save to finish before calling it hung (MASKGEN_CHECKPOINT_TIMEOUT_S)."""
    text = os.environ.get(TIMEOUT_ENV)
    return float(text) if text else DEFAULT_TIMEOUT_S


_OS_CODE = re.compile(r"os_error_code='?(\d+)")
_FAILED_PATH = re.compile(r'(?:Failed writing|Failed to \w+|local file): "([^"]+)"')


def io_cause(err: BaseException) -> str:
    """The OS-level cause of a failed write, as short text ("No space left on device", ...).

    orbax / tensorstore wrap errno in a ValueError text (`... [os_error_code='28']`); plain OSErrors
    carry it as `errno`.
    """
    for e in (err, err.__cause__, err.__context__):
        if isinstance(e, OSError) and e.errno:
            where = f" ({e.filename})" if e.filename else ""
            return f"{os.strerror(e.errno)}{where}"
    text = str(err)
    code = _OS_CODE.search(text)
    if code:
        path = _FAILED_PATH.search(text)
        return os.strerror(int(code.group(1))) + (f" ({path.group(1)})" if path else "")
    if "RESOURCE_EXHAUSTED" in text:
        return os.strerror(errno.ENOSPC)
    return f"{type(err).__name__}: {_short(' '.join(text.split()), 240)}"


def _path_str(path: Any) -> str:
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def _flat_shapes(tree: Any) -> Dict[str, Tuple[Tuple[int, ...], str]]:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {_path_str(p): (tuple(getattr(x, "shape", ())), str(getattr(x, "dtype", "")))
            for p, x in flat}


def _short(err: BaseException, limit: int = 400) -> str:
    text = str(err)
    return text if len(text) <= limit else text[:limit] + " ..."


def check_compatible(saved_tree: Any, target_tree: Any, where: str = "checkpoint") -> None:
    """Raises CheckpointMismatchError naming the first path whose presence or shape differs."""
    saved, target = _flat_shapes(saved_tree), _flat_shapes(target_tree)
    for path in sorted(target, key=lambda p: (not p.startswith("params/"), p)):
        if path not in saved:
            raise CheckpointMismatchError(
                f"{where} does not match this config: parameter {path!r} with shape "
                f"{target[path][0]} is missing from the checkpoint (written by another config?)")
        if saved[path][0] != target[path][0]:
            raise CheckpointMismatchError(
                f"{where} does not match this config: {path!r} has shape {saved[path][0]} in the "
                f"checkpoint but {target[path][0]} in the model being restored")
    extra = sorted(set(saved) - set(target))
    if extra:
        raise CheckpointMismatchError(
            f"{where} does not match this config: the checkpoint has {extra[0]!r} with shape "
            f"{saved[extra[0]][0]}, which this model lacks ({len(extra)} such entries)")


class StageCheckpoints:
    """The CheckpointManager of one stage directory.

    `config`: the run's resolved config, saved with every step as the `config` item (None saves none).
    """

    def __init__(self, directory: str, keep: int = 3, best_metric: Optional[str] = "loss",
                 async_save: bool = True, read_only: bool = False,
                 config: Optional[ml_collections.ConfigDict] = None) -> None:
        self.directory = paths.normalize(directory)  # local or gs:// (orbax: tensorstore's gcs driver)
        self.best_metric = best_metric
        policies = [ocm.LatestN(n=max(int(keep), 1))]
        if best_metric:
            policies.append(ocm.BestN(get_metric_fn=lambda m: m[best_metric], reverse=True, n=1,
                                      keep_checkpoints_without_metrics=False))
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocm.AnyPreservationPolicy(policies),
            enable_async_checkpointing=async_save, cleanup_tmp_directories=not read_only,
            create=not read_only, read_only=read_only)
        self.manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler(),
                           CONFIG_ITEM: ocp.JsonCheckpointHandler()})
        # The same JSON as config.json (tuples as lists, non-JSON values as text).
        self._config = None if config is None else json.loads(config_io.to_json(config))
        self._pending: Optional[int] = None  # step of the async save not yet confirmed on disk
        self.failed = False  # after a failure the manager is abandoned (its threads may never finish)

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> Optional[int]:
        steps = self.steps()
        return steps[-1] if steps else None

    def save(self, step: int, state_tree: Dict[str, Any], data_state: Dict[str, Any],
             metrics: Optional[Dict[str, float]] = None, timeout: Optional[float] = None) -> bool:
        """Starts an (async) save of `state_tree`, the input position and the run's config at `step`.

        Waits (at most `timeout` s) for the previous save first, so its failure is reported as its own.
        """
        if step in self.manager.all_steps():
            return False
        metrics = {k: float(v) for k, v in (metrics or {}).items()} or None
        if self.best_metric and (metrics is None or self.best_metric not in metrics):
            metrics = None
        if self.failed:
            raise CheckpointIOError(f"checkpoint step {step} not saved to {self.directory}: an earlier save "
                                    "failed")
        self.wait(timeout)  # the previous save: its failure is reported as such, not as this step's
        items = dict(state=ocp.args.StandardSave(state_tree), data=ocp.args.JsonSave(data_state))
        if self._config is not None:  # in the same orbax commit as the arrays: atomic with the step
            items[CONFIG_ITEM] = ocp.args.JsonSave(self._config)
        try:
            started = self.manager.save(int(step), metrics=metrics, force=True,
                                        args=ocp.args.Composite(**items))
        except Exception as err:  # noqa: BLE001 - any write failure stops training with its cause
            self._fail(step, err)
        self._pending = int(step) if started else None
        return started

    def _fail(self, step: int, err: BaseException) -> Never:
        self.failed, self._pending = True, None
        intact = [s for s in self._finalized_steps() if s != step]
        survivors = (f"earlier steps {intact} are intact" if intact else "no earlier step exists")
        raise CheckpointIOError(
            f"checkpoint step {step} could not be written to {os.path.join(self.directory, str(step))}: "
            f"{io_cause(err)}; {survivors}. Fix the cause (free space, permissions, the directory) and "
            "rerun the same command to resume") from err

    def _finalized_steps(self) -> list[int]:
        try:
            return sorted(int(p.name) for p in epath.Path(self.directory).iterdir() if p.name.isdigit())
        except OSError:
            return []

    def poll(self) -> None:
        """Raises CheckpointIOError as soon as the last async save has failed (cheap: called every step)."""
        if self._pending is not None and not self.manager.is_saving_in_progress():
            self.wait()

    def wait(self, timeout: Optional[float] = None) -> None:
        """Waits for the last save; CheckpointIOError if it failed, did not land, or took over `timeout` s.

        The wait runs on a helper thread joined in short slices, so a SIGTERM handler still runs on
        the main thread and a hung writer (a full disk can wedge orbax's event loops) cannot block
        the process forever.
        """
        if self.failed:
            return
        step = self._pending
        timeout = save_timeout_s() if timeout is None else timeout
        outcome: Dict[str, BaseException] = {}

        def target() -> None:
            try:
                self.manager.wait_until_finished()
            except BaseException as err:  # noqa: BLE001 - re-raised on the main thread
                outcome["error"] = err

        waiter = threading.Thread(target=target, name="maskgen-checkpoint-wait", daemon=True)
        waiter.start()
        deadline = time.monotonic() + timeout
        while waiter.is_alive() and time.monotonic() < deadline:
            waiter.join(timeout=min(0.2, max(deadline - time.monotonic(), 0.0)))
        if waiter.is_alive():
            self._fail(step if step is not None else -1,
                       TimeoutError(f"the save did not finish within {timeout:.0f} s ({TIMEOUT_ENV})"))
        if "error" in outcome:
            self._fail(step if step is not None else -1, outcome["error"])
        if step is not None and jax.process_index() == 0 and \
                not (epath.Path(self.directory) / str(step)).exists():
            self._fail(step, FileNotFoundError(errno.ENOENT, "the step directory did not appear after the "
                                               "save (the stage directory was removed?)"))
        self._pending = None

    def close(self, timeout: Optional[float] = None) -> None:
        """Waits for the last save (bounded) and closes; after a failure the manager is left to die."""
        if self.failed:
            return
        self.wait(timeout)
        self.manager.close()

    def saved_tree(self, step: int) -> Any:
        """The saved state's metadata tree (shapes and dtypes), read without the arrays."""
        meta = self.manager.item_metadata(step)["state"]
        if meta is None:
            raise ValueError(f"step {step} in {self.directory} has no readable state metadata")
        return getattr(meta, "tree", meta)

    def saved_config(self, step: int) -> Optional[Dict[str, Any]]:
        """The config saved with `step` (a JSON dict), or None for a step written before steps carried one.

        Errors reading an existing `config` item propagate (the caller decides whether to fall back).
        """
        if not paths.is_dir(paths.join(self.directory, str(step), CONFIG_ITEM)):
            return None
        restored = self.manager.restore(int(step), args=ocp.args.Composite(
            **{CONFIG_ITEM: ocp.args.JsonRestore()}))
        return restored[CONFIG_ITEM]

    def _quarantine(self, step: int) -> None:
        src = paths.join(self.directory, str(step))
        dst = paths.join(self.directory, f"corrupt.{step}.{int(time.time())}")
        if jax.process_index() == 0 and paths.is_dir(src):
            if paths.is_gcs(src):
                # GCS has no directory rename: epath copies, then deletes, each object. Not atomic;
                # a move cut short by a kill leaves a still-unreadable step that the next run
                # finds unreadable and moves aside again.
                paths.as_path(src).rename(dst)
            else:
                shutil.move(src, dst)
            log.error("moved unreadable checkpoint %s aside to %s", src, dst)
        self.manager.reload()

    def restore(self, target_tree: Any, step: Optional[int] = None) -> tuple[Any, Any, int] | None:
        """(state tree, data state, step) of the newest readable step, or None when there is none.

        `target_tree` holds `jax.ShapeDtypeStruct`s with shardings (any mesh):
        arrays come back already sharded that way. Unreadable steps are logged,
        moved aside and skipped; a tree/shape mismatch raises CheckpointMismatchError.
        """
        candidates = [step] if step is not None else self.steps()[::-1]
        failures = []
        for s in candidates:
            where = f"checkpoint {self.directory} step {s}"
            try:
                saved = self.saved_tree(s)
            except Exception as err:  # noqa: BLE001 - any read failure means "unusable step"
                failures.append((s, err))
                log.error("%s is unreadable (%s: %s); falling back to the previous step",
                          where, type(err).__name__, _short(err))
                self._quarantine(s)
                continue
            check_compatible(saved, target_tree, where)
            try:
                restored = self.manager.restore(
                    s, args=ocp.args.Composite(state=ocp.args.StandardRestore(target_tree),
                                               data=ocp.args.JsonRestore()))
                state = restored["state"]
                jax.block_until_ready(state)
            except Exception as err:  # noqa: BLE001
                failures.append((s, err))
                log.error("%s is corrupt or truncated (%s: %s); falling back to the previous step",
                          where, type(err).__name__, _short(err))
                self._quarantine(s)
                continue
            if failures:
                log.warning("resumed from step %d after skipping unreadable steps %s",
                            s, [f for f, _ in failures])
            return state, restored["data"], s
        if failures:
            first = failures[0]
            raise ValueError(f"no readable checkpoint in {self.directory}: step {first[0]} failed with "
                             f"{type(first[1]).__name__}: {_short(first[1])}")
        return None


def has_steps(stage_dir: str) -> bool:
    """Whether `stage_dir` holds a checkpoint step (a missing directory holds none)."""
    stage_dir = paths.normalize(stage_dir)
    return paths.is_dir(stage_dir) and any(d.isdigit() for d in paths.listdir(stage_dir))


def restore_subtree(stage_dir: str, target_subtree: Dict[str, Any], step: Optional[int] = None) -> tuple[Any, int]:
    """(subtree, step): only the entries of `target_subtree` (e.g. {"ema_params": ...}).

    For consumers of a finished stage (the transformer stage reading the
    tokenizer, `maskgen.bundle`): no optimizer state is built or read. Unreadable
    steps fall back to older ones as in `StageCheckpoints.restore`, without
    moving anything (the directory may belong to a running job).
    """
    if not paths.is_dir(stage_dir):
        raise ValueError(f"no checkpoint directory {paths.normalize(stage_dir)}")
    ckpt = StageCheckpoints(stage_dir, best_metric=None, read_only=True)
    steps = [step] if step is not None else ckpt.steps()[::-1]
    if not steps:
        raise ValueError(f"no checkpoint found in {ckpt.directory}")
    errors = []
    for s in steps:
        where = f"checkpoint {ckpt.directory} step {s}"
        try:
            saved = ckpt.saved_tree(s)
        except Exception as err:  # noqa: BLE001
            errors.append(f"step {s}: {type(err).__name__}: {_short(err)}")
            log.error("%s is unreadable (%s); trying the previous step", where, errors[-1])
            continue
        missing = [k for k in target_subtree if k not in saved]
        if missing:
            raise CheckpointMismatchError(f"{where} has no {missing[0]!r} entry")
        check_compatible({k: saved[k] for k in target_subtree}, target_subtree, where)
        try:
            tree = ocp.PyTreeCheckpointer().restore(
                paths.join(ckpt.directory, str(s), "state"),
                args=ocp.args.PyTreeRestore(
                    item=target_subtree, partial_restore=True,
                    restore_args=ocp.checkpoint_utils.construct_restore_args(target_subtree)))
            jax.block_until_ready(tree)
        except Exception as err:  # noqa: BLE001
            errors.append(f"step {s}: {type(err).__name__}: {_short(err)}")
            log.error("%s is corrupt or truncated (%s); trying the previous step", where, errors[-1])
            continue
        return tree, s
    raise ValueError(f"no readable checkpoint in {ckpt.directory}: " + "; ".join(errors))
