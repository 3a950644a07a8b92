"""Train maskgen: the stages named in the config, resuming from WORKDIR.

    python train.py --config=configs/debug.py --workdir=/tmp/maskgen_debug \
        --config.num_train_steps=8 --config.checkpoint_every_steps=4 --config.seed=1

Overrides apply to every stage unless a stage block (`tokenizer_train.*`,
`transformer_train.*`) sets its own value. Rerunning the same command resumes
from the latest readable checkpoint of each stage. Multi-process runs (several
GPU hosts, TPU pods) set `--config.distributed=True`; every process runs the
same command with the same WORKDIR on a filesystem all hosts share or in a bucket
(`--workdir=gs://BUCKET/PATH`, README "Workdirs on Google Cloud Storage").
"""
import logging
import os

from absl import app
from absl import logging as absl_logging
from absl import flags
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "Training config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and config.json.")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    import jax
    cfg = FLAGS.config
    if cfg.distributed or os.environ.get("JAX_COORDINATOR_ADDRESS"):
        # SLURM, Open MPI and TPU pods are detected by JAX; a manual launch sets
        # JAX_COORDINATOR_ADDRESS=host:port, JAX_NUM_PROCESSES and JAX_PROCESS_ID.
        jax.distributed.initialize(**{
            arg: int(os.environ[env]) for arg, env in (("num_processes", "JAX_NUM_PROCESSES"),
                                                       ("process_id", "JAX_PROCESS_ID"))
            if env in os.environ})
    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax/grain chatter
    logging.getLogger("maskgen").setLevel(logging.INFO)
    log = logging.getLogger("maskgen")
    log.info("JAX %s: process %d of %d, %d devices (%s)", jax.__version__, jax.process_index(),
             jax.process_count(), jax.device_count(), jax.devices()[0].platform)
    from maskgen.training import trainer
    trainer.train_and_evaluate(cfg, FLAGS.workdir)
    if jax.process_index() == 0:
        print(trainer.summary(FLAGS.workdir), flush=True)


if __name__ == "__main__":
    app.run(main)
