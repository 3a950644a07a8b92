"""Train maskgen: the stages named in the config, resuming from WORKDIR.

    python train.py --config=configs/debug.py --workdir=/tmp/maskgen_debug \
        --config.num_train_steps=8 --config.checkpoint_every_steps=4 --config.seed=1

Overrides apply to every stage unless a stage block (`tokenizer_train.*`,
`transformer_train.*`) sets its own value. Rerunning the same command resumes
from the latest readable checkpoint of each stage. Multi-process runs (several
GPU hosts, TPU pods) set `--config.distributed=True`; every process runs the
same command with the same WORKDIR on a filesystem all hosts share or in a bucket
(`--workdir=gs://BUCKET/PATH`, README "Workdirs on Google Cloud Storage").

Exit status (README, "Exit codes and failures"): 0 finished; 75 stopped by SIGTERM after writing a
checkpoint, rerun to resume (MASKGEN_PREEMPT_EXIT_CODE changes it); 2 a bad flag; 1 anything else.
Errors are one line on stderr (`--verbose` or MASKGEN_VERBOSE=1 adds the traceback).
"""
import logging
import os
import sys
from typing import Sequence

from absl import flags
from absl import logging as absl_logging
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "Training config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and config.json.")
flags.DEFINE_boolean("verbose", False, "print tracebacks of user errors too (also MASKGEN_VERBOSE=1)")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        from maskgen import cli
        raise cli.UsageError(f"unexpected arguments: {argv[1:]}")
    import jax

    from maskgen import prng
    cfg = FLAGS.config
    # Before any backend starts: libtpu reads its flags (unsafe_rbg's) once, at start-up.
    prng.configure(cfg.get("prng_impl", prng.DEFAULT))
    if cfg.distributed or os.environ.get("JAX_COORDINATOR_ADDRESS"):
        # SLURM, Open MPI and TPU pods are detected by JAX; a manual launch sets
        # JAX_COORDINATOR_ADDRESS=host:port, JAX_NUM_PROCESSES and JAX_PROCESS_ID.
        jax.distributed.initialize(**{
            arg: int(os.environ[env]) for arg, env in (("num_processes", "JAX_NUM_PROCESSES"),
                                                       ("process_id", "JAX_PROCESS_ID"))
            if env in os.environ})
    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax/grain chatter
    from maskgen import cli
    cli.quiet_library_errors()  # a failed save is reported once, as one line, by maskgen
    logging.getLogger("maskgen").setLevel(logging.INFO)
    log = logging.getLogger("maskgen")
    log.info("JAX %s: process %d of %d, %d devices (%s)", jax.__version__, jax.process_index(),
             jax.process_count(), jax.device_count(), jax.devices()[0].platform)
    from maskgen.training import preflight, trainer
    result = trainer.train_and_evaluate(cfg, FLAGS.workdir, overrides=preflight.override_keys(sys.argv[1:]))
    if jax.process_index() == 0:
        print(trainer.summary(FLAGS.workdir), flush=True)
    if getattr(result, "preempted", False):
        raise cli.Preempted(f"preempted: checkpoint written in {os.path.abspath(FLAGS.workdir)}; rerun the "
                            f"same command to resume (exit status {cli.preempt_exit_code()})")


if __name__ == "__main__":
    from maskgen import cpu_host
    cpu_host.restart_with_cpu_settings()  # XLA:CPU hosts only; before JAX starts
    from maskgen import cli
    cli.run_absl(main)
