"""`train_and_evaluate(cfg, workdir)`: run the configured stages, resuming where they stopped.

    WORKDIR/config.json        the resolved config (each checkpoint step has a copy: what `maskgen.bundle` reads)
    WORKDIR/tokenizer/         orbax checkpoints of the VQGAN stage (+ tb/ events, samples/)
    WORKDIR/decoder/           optional decoder fine-tuning on frozen tokens (decoder_stage)
    WORKDIR/transformer/       orbax checkpoints of the transformer stage (+ tb/, samples/)
    WORKDIR/token_cache/       pre-tokenised train split (transformer stage, optional)

Each stage module (`tokenizer_stage`, `transformer_stage`) builds a
`loop.StageRun`: sharded state (restored from the stage's latest readable
checkpoint when there is one, else initialised, see `stage_setup`), a jitted
step, and an input iterator whose position was restored with the state;
`loop.run_stage` trains it.
"""
import json
import logging
import os
import time
from typing import Any, Dict, Sequence

import jax
import ml_collections
from jax.sharding import Mesh

from maskgen import config_io, cpu_host, paths, prng
from maskgen import sharding as shd
from maskgen.models.factory import accelerator_summary
from maskgen.training import decoder_stage, preflight, quality, tokenizer_stage, transformer_stage
from maskgen.training.loop import Preempted, StopSignal, run_stage
from maskgen.workdir_lock import WorkdirLock

log = logging.getLogger(__name__)

STAGES = ("tokenizer", "decoder", "transformer")
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


def summary(workdir: str) -> str:
    """Where a run's outputs are, for the end of train.py."""
    workdir = paths.normalize(workdir)
    lines = [f"workdir {workdir}", "  config.json          the resolved config"]
    for stage in STAGES:
        directory = os.path.join(workdir, stage)
        names = paths.listdir(directory)
        if not names:
            continue
        steps = sorted(int(d) for d in names if d.isdigit())
        lines.append(f"  {stage + '/':<20} orbax checkpoints, steps {steps}; tb/ TensorBoard events"
                     + ("; samples/ grids" if "samples" in names else ""))
    if paths.is_dir(os.path.join(workdir, "token_cache")):
        lines.append("  token_cache/         the pre-tokenised training split")
    accel = paths.join(workdir, ACCELERATOR_FILE)
    if paths.exists(accel):
        a = json.loads(paths.read_bytes(accel))
        lines.append(f"  {ACCELERATOR_FILE:<20} attention {a['attention_train']} (training), "
                     f"{a['attention_decode']} (decoding) on {a['platform']}; remat {a['remat']}; "
                     f"prng {a['prng_impl']}")
    report = os.path.join(workdir, "quality.json")
    if paths.exists(report):
        lines.append(f"  quality.json         {quality.format_report(json.loads(paths.read_bytes(report)))}")
    lines.append(f"sample with: python sample.py --workdir={workdir} --out={os.path.join(workdir, 'samples')}")
    return "\n".join(lines)


ACCELERATOR_FILE = "accelerator.json"


def record_accelerator_settings(cfg: ml_collections.ConfigDict, mesh: Mesh, workdir: str) -> Dict[str, Any]:
    """Logs the attention kernel (training / decoding), remat and PRNG of this run; writes accelerator.json."""
    prng.check_prng_impl(cfg.get("prng_impl", prng.DEFAULT))
    info = accelerator_summary(cfg, mesh.devices.flat[0].platform)
    info["cpu_hugepages"] = cpu_host.active()  # maskgen.cpu_host: XLA:CPU buffers on huge pages,
    info["cpu_xla_convs"] = cpu_host.xla_convs_active()  # convolutions off YNNPACK
    log.info("attention: transformer.attention=%s trains with %s (%s), decodes with %s (%s); remat=%s, "
             "prng_impl=%s; cpu_hugepages=%s, cpu_xla_convs=%s", info["attention"], info["attention_train"],
             info["attention_train_reason"], info["attention_decode"], info["attention_decode_reason"],
             info["remat"], info["prng_impl"], info["cpu_hugepages"], info["cpu_xla_convs"])
    if jax.process_index() == 0:
        paths.write_text(paths.join(workdir, ACCELERATOR_FILE), json.dumps(info, indent=1))
    return info


def make_mesh(cfg: ml_collections.ConfigDict) -> Mesh:
    """The device mesh `cfg.mesh` describes (data, fsdp, tensor axes)."""
    return shd.make_mesh(cfg.mesh)


class TrainResult(dict):
    """{stage: final TrainState}, plus `preempted`: True when SIGTERM stopped the run (rerun to resume)."""

    preempted: bool = False


def _lock(workdir: str) -> Any:
    """The workdir lock (a file locally, one object on gs://), held by process 0 only; every process
    learns whether it was taken."""
    lock, error = None, None
    if jax.process_index() == 0:
        try:
            lock = WorkdirLock(workdir).acquire()
        except Exception as err:  # noqa: BLE001 - re-raised below, after telling the other processes
            error = err
    if jax.process_count() > 1:
        import numpy as np
        from jax.experimental import multihost_utils
        ok = int(multihost_utils.broadcast_one_to_all(np.int32(error is None)))
        if not ok and error is None:
            raise RuntimeError(f"process 0 could not lock the workdir {workdir} (see its log)")
    if error is not None:
        raise error
    return lock


def train_and_evaluate(cfg: ml_collections.ConfigDict, workdir: str,
                       overrides: Sequence[str] = ()) -> Dict[str, Any]:
    """Runs `cfg.stages` in order in `workdir`; returns a TrainResult {stage: final TrainState}.

    Nothing is written before every check passed (`preflight`: settings, mesh and batch, data
    directory, existing checkpoints against this config); then the workdir is locked (one writer)
    and `config.json` written (the previous one kept as `config.<time>.json` when it differs).
    Stops after the current stage (returning what finished, `preempted=True`) when SIGTERM arrives.
    `overrides`: the config keys set on the command line, to warn about ones a stage block shadows.
    """
    builders = {"tokenizer": tokenizer_stage.build, "decoder": decoder_stage.build,
                "transformer": transformer_stage.build}
    stages = tuple(cfg.stages)
    bad = [s for s in stages if s not in STAGES]
    if not stages or bad:
        raise ValueError(f"config.stages must name stages from {STAGES}, got {stages}")
    # Local path or gs://; an unsupported scheme, a missing bucket, no credentials or no write
    # permission fail here, before any training work (every process checks its own credentials).
    workdir = paths.check_storage(workdir, write=True)
    from maskgen.data.builders import check_local_data_dir
    if cfg.dataset.get("data_dir"):
        check_local_data_dir(cfg.dataset.data_dir)
    check_local_data_dir(str(cfg.dataset.name), "dataset.name")
    stage_configs = {stage: stage_config(cfg, stage) for stage in stages}
    mesh = make_mesh(cfg)
    log.info("mesh %s over %d devices (%d processes)", dict(mesh.shape), mesh.size, jax.process_count())
    preflight.preflight(cfg, workdir, mesh, stage_configs, overrides, _INHERITED)
    lock = _lock(workdir)
    try:
        if jax.process_index() == 0:
            config_io.write_config(cfg, workdir)
        record_accelerator_settings(cfg, mesh, workdir)
        return _run_stages(cfg, workdir, mesh, stages, builders)
    finally:
        if lock is not None:
            lock.release()


def _run_stages(cfg: ml_collections.ConfigDict, workdir: str, mesh: Mesh, stages: Sequence[str],
                builders: Any) -> "TrainResult":
    stop = StopSignal()
    results = TrainResult()
    try:
        for stage in stages:
            started = time.perf_counter()
            try:
                run = builders[stage](cfg, stage_config(cfg, stage), workdir, mesh, stop)
            except Preempted:
                log.warning("stopped while preparing stage %s; rerun the same command to continue", stage)
                results.preempted = True
                break
            completed = run_stage(run, cfg, stop)
            results[stage] = run.state
            log.info("stage %s: %.1f s in this run (set-up, training, evaluation)", stage,
                     time.perf_counter() - started)
            if not completed:
                log.warning("stopped during stage %s at step %d; rerun the same command to resume",
                            stage, int(jax.device_get(run.state.step)))
                results.preempted = True
                break
    finally:
        stop.uninstall()
    return results
