"""Compatibility shim: `from maskgen import trainer; trainer.train_and_evaluate(cfg, workdir)`.

Kept because scripts written against the first release call training this way
(the flax examples' `main -> train_and_evaluate` pattern); the code lives in
`maskgen.training.trainer`.
"""
from maskgen.training.trainer import STAGES, stage_config, summary, train_and_evaluate  # noqa: F401
