"""The training loop shared by both stages: `StageRun`, `run_stage`, preemption.

`run_stage` dispatches step n, then reads step n-1's metrics (so the host
never waits for the device inside a step), logs, checkpoints every
`checkpoint_every_steps`, at the end and on SIGTERM (preemption), after which
the process stops so the job can be restarted with the same command.
"""
import dataclasses
import logging
import os
import signal
import sys
import threading
import time
from typing import Any, Callable, Dict, Optional

import jax
import ml_collections
import numpy as np

from maskgen import checkpoint as ckpt_lib
from maskgen import image_grid
from maskgen.training import iterators, writers

log = logging.getLogger(__name__)

# Metrics on the progress bar (all go to TensorBoard): codebook usage and perplexity show a
# collapsing tokenizer while it trains.
PROGRESS_KEYS = ("loss", "masked_accuracy", "codebook_usage", "perplexity")


@dataclasses.dataclass
class StageRun:
    """Everything `run_stage` needs; built by a stage module."""
    name: str
    directory: str  # WORKDIR/<stage>
    state: Any  # TrainState (sharded)
    step_fn: Callable  # (state, batch) -> (state, metrics), jitted with donation
    next_batch: Callable[[], Any]  # -> global batch for step_fn
    data_iter: Any  # has get_state() -> JSON-able dict
    checkpoints: ckpt_lib.StageCheckpoints
    num_steps: int
    checkpoint_every: int
    examples_per_step: int
    tokens_per_example: int = 0
    sample_fn: Optional[Callable[[Any, int], Optional[np.ndarray]]] = None  # (state, step) -> grid
    eval_fn: Optional[Callable[[Any, int], Dict[str, Any]]] = None  # (state, step) -> quality report
    last_eval: Optional[Dict[str, Any]] = None  # the end-of-stage report, when eval_fn ran


class Preempted(Exception):
    """Raised by long set-up work (pre-tokenisation) when a stop was requested."""


STOP_TIMEOUT_ENV = "MASKGEN_STOP_TIMEOUT_S"
DEFAULT_STOP_TIMEOUT_S = 100.0


def stop_timeout_s() -> float:
    """Seconds from SIGTERM to exit, whatever happens (MASKGEN_STOP_TIMEOUT_S, default 100).

    Schedulers send SIGKILL some time after SIGTERM (SLURM's KillWait, Kubernetes' grace period); a
    run that has not exited by then loses its final checkpoint silently, so we bound it ourselves.
    """
    text = os.environ.get(STOP_TIMEOUT_ENV)
    return float(text) if text else DEFAULT_STOP_TIMEOUT_S


class StopSignal:
    """Preemption: the loop saves a checkpoint and stops at the next step.

    One process: our SIGTERM handler sets `requested`. Several processes: JAX's
    preemption service (started by jax.distributed.initialize) receives the
    notice and picks one step at which every host stops together.

    From the first SIGTERM a watchdog gives the process `stop_timeout_s()` to finish: the final save
    gets what is left of it (`remaining()`), and if the process is still alive at the deadline (a
    step or a save hangs) it exits with status 1 and a one-line message, never 0 or the preempted code.
    """

    def __init__(self) -> None:
        self.requested = False
        self.deadline: Optional[float] = None
        self._previous = None
        self._watchdog: Optional[threading.Timer] = None
        self.multi_process = jax.process_count() > 1
        if not self.multi_process and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            log.warning("SIGTERM received again: still stopping (at most %.0f s more)", self.remaining())
            return
        timeout = stop_timeout_s()
        log.warning("SIGTERM received: saving a checkpoint and stopping (within %.0f s)", timeout)
        self.requested = True
        self.deadline = time.monotonic() + timeout
        self._watchdog = threading.Timer(timeout, self._expire, args=(timeout,))
        self._watchdog.daemon = True
        self._watchdog.start()

    @staticmethod
    def _expire(timeout: float) -> None:
        from maskgen import cli
        print(f"{cli.PREFIX}did not stop within {timeout:.0f} s of SIGTERM ({STOP_TIMEOUT_ENV}); exiting "
              "without a final checkpoint (the last complete step is kept)", file=sys.stderr, flush=True)
        cli.exit_now(cli.EXIT_FAILURE)

    def remaining(self) -> Optional[float]:
        """Seconds left before the watchdog fires (a few kept back for exiting), None when not stopping."""
        if self.deadline is None:
            return None
        return max(self.deadline - time.monotonic() - 5.0, 1.0)

    def should_stop(self, step: int) -> bool:
        """Called once per step by every process with the same step number."""
        if self.multi_process:
            from jax.experimental import multihost_utils
            self.requested = self.requested or multihost_utils.reached_preemption_sync_point(step)
        return self.requested

    def check(self) -> None:
        """Raises Preempted when a stop was requested (for set-up loops outside the train loop)."""
        if self.requested:
            raise Preempted()

    def uninstall(self) -> None:
        """Puts back the SIGTERM handler that was active before this one (the watchdog keeps running)."""
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


def _fetch(metrics: Any) -> Dict[str, float]:
    return {k: float(v) for k, v in jax.device_get(metrics).items()}


def run_stage(run: StageRun, cfg: ml_collections.ConfigDict, stop: StopSignal) -> bool:
    """Trains `run` to `num_steps`; returns False when stopped early by SIGTERM."""
    writer = writers.MetricWriter(os.path.join(run.directory, "tb"))
    start = int(jax.device_get(run.state.step))
    progress = writers.Progress(run.name, start, run.num_steps)
    log_every = max(int(cfg.log_every_steps), 1)
    sample_every = int(cfg.sample_every_steps or 0)
    eval_every = int(cfg.eval_every_steps or 0)
    pending = None  # (step, metrics on device) of the last dispatched step
    window_losses, t_last, steps_since = [], None, 0
    last_saved = start if start in run.checkpoints.steps() else None
    state = run.state

    def record(step: int, metrics: Any) -> None:
        nonlocal t_last, steps_since
        values = _fetch(metrics)
        window_losses.append(values.get("loss", np.nan))
        if t_last is None:  # the first step includes compilation: time from its end
            t_last = time.perf_counter()
        else:
            steps_since += 1
        if step % log_every == 0 or step == run.num_steps:
            elapsed = time.perf_counter() - t_last
            if steps_since and elapsed > 0:
                values["images_per_s"] = steps_since * run.examples_per_step / elapsed
                if run.tokens_per_example:
                    values["tokens_per_s"] = values["images_per_s"] * run.tokens_per_example
                values["step_time_s"] = elapsed / steps_since
                t_last, steps_since = time.perf_counter(), 0
            writer.scalars(step, values)
            if jax.process_index() == 0:
                log.info("%s step %d: %s", run.name, step, writers.format_metrics(values))
        progress.update(1, {k: values[k] for k in PROGRESS_KEYS if k in values})

    def save(step: int) -> None:
        nonlocal last_saved, window_losses
        if last_saved == step:
            return
        losses = [x for x in window_losses if np.isfinite(x)]
        metrics = {"loss": float(np.mean(losses))} if losses else None
        data_state = iterators.gather_states(run.data_iter.get_state())
        run.checkpoints.save(step, state.to_tree(), data_state, metrics, timeout=stop.remaining())
        last_saved, window_losses = step, []

    completed = True
    try:
        for step in range(start, run.num_steps):
            run.checkpoints.poll()  # a failed async save stops training here, within a step
            batch = run.next_batch()
            state, metrics = run.step_fn(state, batch)
            if pending is not None:
                record(*pending)
            pending = (step + 1, metrics)
            done = step + 1
            stopping = stop.should_stop(done)
            if stopping or done % run.checkpoint_every == 0 or done == run.num_steps:
                record(*pending)
                pending = None
                save(done)
            if sample_every and run.sample_fn is not None and done % sample_every == 0:
                _write_samples(run, writer, state, done)
            if eval_every and run.eval_fn is not None and done % eval_every == 0 and done < run.num_steps:
                _evaluate(run, writer, state, done)
            if stopping:
                completed = done == run.num_steps
                break
        if pending is not None:
            record(*pending)
        if sample_every and run.sample_fn is not None and completed and start < run.num_steps \
                and run.num_steps % sample_every:
            _write_samples(run, writer, state, run.num_steps)
        if run.eval_fn is not None and completed and start < run.num_steps:
            run.last_eval = _evaluate(run, writer, state, run.num_steps)
    finally:
        try:
            run.checkpoints.close(timeout=stop.remaining())  # bounded after SIGTERM; raises if the save failed
        finally:
            progress.close()
            writer.close()
    run.state = state
    return completed


def _evaluate(run: StageRun, writer: Any, state: Any, step: int) -> Dict[str, Any]:
    """Runs the stage's quality evaluation; numeric results go to TensorBoard under eval/."""
    report = run.eval_fn(state, step)
    writer.scalars(step, {f"eval/{k}": v for k, v in report.items()
                          if isinstance(v, (int, float)) and not isinstance(v, bool)})
    return report


def _write_samples(run: StageRun, writer: Any, state: Any, step: int) -> None:
    grid = run.sample_fn(state, step)
    if grid is None or jax.process_index() != 0:
        return
    path = os.path.join(run.directory, "samples", f"step_{step:08d}.png")
    image_grid.save_png(grid, path)
    writer.image(step, "samples", grid)
    log.info("%s: wrote samples %s", run.name, path)
