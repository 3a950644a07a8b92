"""`train_and_evaluate(cfg, workdir)`: run the configured stages, resuming where they stopped.

    WORKDIR/config.json        the resolved config (what `maskgen.bundle` reads)
    WORKDIR/tokenizer/         orbax checkpoints of the VQGAN stage (+ tb/ events, samples/)
    WORKDIR/transformer/       orbax checkpoints of the transformer stage (+ tb/, samples/)
    WORKDIR/token_cache/       pre-tokenised train split (transformer stage, optional)

Each stage module (`stage_tokenizer`, `stage_transformer`) builds a `StageRun`:
sharded state (restored from the stage's latest readable checkpoint when
there is one, else initialised), a jitted step, and an input iterator whose
position was restored with the state. `run_stage` is the shared loop: dispatch
step n, then read step n-1's metrics (so the host never waits for the device
inside a step), log, checkpoint every `checkpoint_every_steps`, at the end and
on SIGTERM (preemption), after which the process stops so the job can be
restarted with the same command.
"""
import dataclasses
import logging
import os
import signal
import threading
import time
from typing import Any, Callable, Dict, Optional

import jax
import ml_collections
import numpy as np

from maskgen import checkpoint as ckpt_lib
from maskgen import config_io
from maskgen import input_pipeline
from maskgen import logging_utils
from maskgen import sharding as shd

log = logging.getLogger(__name__)

STAGES = ("tokenizer", "transformer")
_INHERITED = ("num_train_steps", "batch_size", "checkpoint_every_steps")


def stage_config(cfg: ml_collections.ConfigDict, stage: str) -> ml_collections.ConfigDict:
    """The stage's `<stage>_train` block with None entries inherited from the top level."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; stages are {STAGES}")
    block = cfg[f"{stage}_train"].to_dict()
    for key in _INHERITED:
        if block.get(key) is None:
            block[key] = cfg[key]
    for key in _INHERITED:
        if not isinstance(block[key], int) or block[key] < 1:
            raise ValueError(f"{stage}: {key} must be a positive int, got {block[key]!r}")
    return ml_collections.ConfigDict(block)


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


class StopSignal:
    """Preemption: the loop saves a checkpoint and stops at the next step.

    One process: our SIGTERM handler sets `requested`. Several processes: JAX's
    preemption service (started by jax.distributed.initialize) receives the
    notice and picks one step at which every host stops together.
    """

    def __init__(self):
        self.requested = False
        self._previous = None
        self.multi_process = jax.process_count() > 1
        if not self.multi_process and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        log.warning("SIGTERM received: saving a checkpoint and stopping")
        self.requested = True

    def should_stop(self, step: int) -> bool:
        """Called once per step by every process with the same step number."""
        if self.multi_process:
            from jax.experimental import multihost_utils
            self.requested = self.requested or multihost_utils.reached_preemption_sync_point(step)
        return self.requested

    def check(self):
        """Raises Preempted when a stop was requested (for set-up loops outside the train loop)."""
        if self.requested:
            raise Preempted()

    def restore(self):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def with_key(step_fn, seed: int, salt: int):
    """step(state, batch) calling step_fn(state, batch, key) with a key made inside the program.

    The key is a compile-time constant, so nothing is transferred per step and
    multi-process runs need no replicated key array.
    """
    def step(state, batch):
        return step_fn(state, batch, jax.random.fold_in(jax.random.key(seed), salt))
    return step


def _fetch(metrics) -> Dict[str, float]:
    return {k: float(v) for k, v in jax.device_get(metrics).items()}


def run_stage(run: StageRun, cfg, stop: StopSignal) -> bool:
    """Trains `run` to `num_steps`; returns False when stopped early by SIGTERM."""
    writer = logging_utils.MetricWriter(os.path.join(run.directory, "tb"))
    start = int(jax.device_get(run.state.step))
    progress = logging_utils.Progress(run.name, start, run.num_steps)
    log_every = max(int(cfg.log_every_steps), 1)
    sample_every = int(cfg.sample_every_steps or 0)
    eval_every = int(cfg.eval_every_steps or 0)
    pending = None  # (step, metrics on device) of the last dispatched step
    window_losses, t_last, steps_since = [], None, 0
    last_saved = start if start in run.checkpoints.steps() else None
    state = run.state

    def record(step, metrics):
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
                log.info("%s step %d: %s", run.name, step, logging_utils.format_metrics(values))
        progress.update(1, {k: values[k] for k in ("loss", "masked_accuracy") if k in values})

    def save(step):
        nonlocal last_saved, window_losses
        if last_saved == step:
            return
        losses = [x for x in window_losses if np.isfinite(x)]
        metrics = {"loss": float(np.mean(losses))} if losses else None
        data_state = input_pipeline.gather_states(run.data_iter.get_state())
        run.checkpoints.save(step, state.to_tree(), data_state, metrics)
        last_saved, window_losses = step, []

    completed = True
    try:
        for step in range(start, run.num_steps):
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
        run.checkpoints.wait()
        run.checkpoints.close()
        progress.close()
        writer.close()
    run.state = state
    return completed


def _evaluate(run: StageRun, writer, state, step: int) -> Dict[str, Any]:
    """Runs the stage's quality evaluation; numeric results go to TensorBoard under eval/."""
    report = run.eval_fn(state, step)
    writer.scalars(step, {f"eval/{k}": v for k, v in report.items()
                          if isinstance(v, (int, float)) and not isinstance(v, bool)})
    return report


def _write_samples(run: StageRun, writer, state, step: int):
    grid = run.sample_fn(state, step)
    if grid is None or jax.process_index() != 0:
        return
    path = os.path.join(run.directory, "samples", f"step_{step:08d}.png")
    logging_utils.save_png(path, grid)
    writer.image(step, "samples", grid)
    log.info("%s: wrote samples %s", run.name, path)


def summary(workdir: str) -> str:
    """Where a run's outputs are, for the end of train.py."""
    workdir = os.path.abspath(workdir)
    lines = [f"workdir {workdir}", f"  config.json          the resolved config"]
    for stage in STAGES:
        directory = os.path.join(workdir, stage)
        if not os.path.isdir(directory):
            continue
        steps = sorted(int(d) for d in os.listdir(directory) if d.isdigit())
        lines.append(f"  {stage + '/':<20} orbax checkpoints, steps {steps}; tb/ TensorBoard events"
                     + ("; samples/ grids" if os.path.isdir(os.path.join(directory, "samples")) else ""))
    if os.path.isdir(os.path.join(workdir, "token_cache")):
        lines.append("  token_cache/         the pre-tokenised training split")
    report = os.path.join(workdir, "quality.json")
    if os.path.exists(report):
        import json
        from maskgen import quality
        with open(report) as f:
            lines.append(f"  quality.json         {quality.format_report(json.load(f))}")
    lines.append(f"sample with: python sample.py --workdir={workdir} --out={os.path.join(workdir, 'samples')}")
    return "\n".join(lines)


def make_mesh(cfg):
    return shd.make_mesh(cfg.mesh)


def train_and_evaluate(cfg: ml_collections.ConfigDict, workdir: str) -> Dict[str, Any]:
    """Runs `cfg.stages` in order in `workdir`; returns {stage: final TrainState}.

    Stops after the current stage (returning what finished) when SIGTERM arrives.
    """
    from maskgen import stage_tokenizer, stage_transformer  # the stages import this module
    builders = {"tokenizer": stage_tokenizer.build, "transformer": stage_transformer.build}
    stages = tuple(cfg.stages)
    bad = [s for s in stages if s not in STAGES]
    if not stages or bad:
        raise ValueError(f"config.stages must name stages from {STAGES}, got {stages}")
    workdir = os.path.abspath(workdir)
    if jax.process_index() == 0:
        config_io.write_config(cfg, workdir)
    mesh = make_mesh(cfg)
    log.info("mesh %s over %d devices (%d processes)", dict(mesh.shape), mesh.size, jax.process_count())
    stop = StopSignal()
    results = {}
    try:
        for stage in stages:
            started = time.perf_counter()
            try:
                run = builders[stage](cfg, stage_config(cfg, stage), workdir, mesh, stop)
            except Preempted:
                log.warning("stopped while preparing stage %s; rerun the same command to continue", stage)
                break
            completed = run_stage(run, cfg, stop)
            results[stage] = run.state
            log.info("stage %s: %.1f s in this run (set-up, training, evaluation)", stage,
                     time.perf_counter() - started)
            if not completed:
                log.warning("stopped during stage %s at step %d; rerun the same command to resume",
                            stage, int(jax.device_get(run.state.step)))
                break
    finally:
        stop.restore()
    return results
