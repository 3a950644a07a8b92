"""User errors are one clear line (issue 16, item 5): each message by substring, no traceback, exit codes."""
import io
import json
import os
import subprocess
import sys
from contextlib import redirect_stderr

import ml_collections
import numpy as np
import pytest
from editing_bundle import REPO

from maskgen import cli, config_io, convert, editing, official
from maskgen.eval import __main__ as eval_main
from maskgen.eval import inception
from maskgen.sampling import recap_config_from
from maskgen.training import preflight, trainer


def _env(**extra):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    env.pop(cli.VERBOSE_ENV, None)
    env.update(extra)
    return env


# ---------------------------------------------------------------- cli.report / exit codes
def test_user_error_is_one_line_without_traceback(monkeypatch):
    monkeypatch.delenv(cli.VERBOSE_ENV, raising=False)
    err = io.StringIO()
    with redirect_stderr(err):
        code = cli.report(ValueError("--thing must be\n positive"), argv=[])
    assert code == cli.EXIT_FAILURE
    assert err.getvalue() == "maskgen: error: --thing must be positive\n"
    with redirect_stderr(io.StringIO()):
        assert cli.report(cli.UsageError("--batch_size must be >= 1"), argv=[]) == cli.EXIT_USAGE


def test_verbose_shows_the_traceback_and_internal_errors_always_do(monkeypatch):
    monkeypatch.delenv(cli.VERBOSE_ENV, raising=False)

    def boom():
        raise ValueError("bad value")
    try:
        boom()
    except ValueError as e:
        user = e
    err = io.StringIO()
    with redirect_stderr(err):
        cli.report(user, argv=["--verbose"])
    assert "Traceback" in err.getvalue() and err.getvalue().endswith("maskgen: error: bad value\n")
    monkeypatch.setenv(cli.VERBOSE_ENV, "1")
    assert cli.verbose([])
    monkeypatch.delenv(cli.VERBOSE_ENV)
    try:
        {}["internal"]
    except KeyError as e:
        internal = e
    err = io.StringIO()
    with redirect_stderr(err):
        assert cli.report(internal, argv=[]) == cli.EXIT_FAILURE
    assert "Traceback" in err.getvalue() and "internal error" in err.getvalue()


def test_preempt_exit_code_is_75_unless_configured(monkeypatch):
    monkeypatch.delenv(cli.PREEMPT_EXIT_ENV, raising=False)
    assert cli.preempt_exit_code() == 75 == cli.Preempted("x").exit_code
    monkeypatch.setenv(cli.PREEMPT_EXIT_ENV, "143")
    assert cli.preempt_exit_code() == 143
    monkeypatch.setenv(cli.PREEMPT_EXIT_ENV, "nonsense")
    with redirect_stderr(io.StringIO()):
        assert cli.preempt_exit_code() == 75


# ---------------------------------------------------------------- config.json
def test_garbage_config_json_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_bytes(b"\xff\xfe\x00garbage\x89PNG")
    with pytest.raises(ValueError, match="not a text file"):
        config_io.read_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        config_io.read_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"seed": 1}))
    with pytest.raises(ValueError, match="is not a maskgen config: it lacks"):
        config_io.read_config(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a maskgen config"):
        config_io.read_config(tmp_path)


def test_write_config_keeps_the_previous_one(tmp_path):
    cfg = config_io.load_config_file(str(REPO / "configs" / "debug.py"))
    config_io.write_config(cfg, tmp_path)
    first = (tmp_path / "config.json").read_text()
    config_io.write_config(cfg, tmp_path)  # unchanged: no history entry
    assert sorted(os.listdir(tmp_path)) == ["config.json"]
    cfg.seed = 7
    config_io.write_config(cfg, tmp_path)
    history = [f for f in os.listdir(tmp_path) if f.startswith("config.") and f != "config.json"]
    assert len(history) == 1 and (tmp_path / history[0]).read_text() == first
    assert config_io.read_config(tmp_path).seed == 7
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


# ---------------------------------------------------------------- messages of item 5
def test_recap_errors_name_the_flags():
    with pytest.raises(ValueError, match="--recap_cheap_per_full") as err:
        recap_config_from({"recap_cheap_per_full": -1})
    assert "cheap_steps" not in str(err.value)
    with pytest.raises(ValueError, match="recap_full_only_steps.*larger than the decoding steps"):
        recap_config_from({"steps": 8, "recap_full_only_steps": 12, "recap_cheap_per_full": 1})
    assert recap_config_from({"steps": 8, "recap_full_only_steps": 8, "recap_cheap_per_full": 1}) is not None


def test_resize_hint_names_the_cli_flag():
    assert "--resize" in str(editing._size_error((10, 12), (8, 8)))


def test_convert_official_directory_is_named_as_a_directory(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(cli.VERBOSE_ENV, raising=False)
    (tmp_path / "ckpts").mkdir()
    (tmp_path / "ckpts" / "maskgit_imagenet256_checkpoint").write_bytes(b"x")
    with pytest.raises(ValueError, match="is a directory; pass the checkpoint file itself"):
        official.read_official(tmp_path / "ckpts")
    code = convert.main(["--official", str(tmp_path / "ckpts"), "--kind", "transformer",
                         "--config", "imagenet256", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "is a directory" in err and "Traceback" not in err
    assert "maskgit_imagenet256_checkpoint" in err
    assert not (tmp_path / "out").exists()


def test_inception_and_samples_that_are_not_npz(tmp_path):
    bad = tmp_path / "weights.npz"
    bad.write_text("this is not an npz")
    with pytest.raises(ValueError, match="is not an .npz of weights") as err:
        inception.load_params(str(bad))
    assert "allow_pickle" not in str(err.value)
    np.save(tmp_path / "one.npy", np.zeros(3))
    with pytest.raises(ValueError, match="is not an .npz of weights"):
        inception.load_params(str(tmp_path / "one.npy"))
    with pytest.raises(ValueError, match="--samples .* is not an .npz file"):
        eval_main._load_samples(str(bad), need_labels=False)


# ---------------------------------------------------------------- start-up report, data_dir
def test_shadowed_top_level_override_is_reported():
    cfg = config_io.load_config_file(str(REPO / "configs" / "fashion_mnist.py"))
    keys = preflight.override_keys(["--config=x.py", "--config.num_train_steps=10", "--workdir=w"])
    assert keys == ["num_train_steps"]
    messages = preflight.shadowed_overrides(cfg, ["tokenizer", "transformer"], keys,
                                            ("num_train_steps", "batch_size", "checkpoint_every_steps"))
    assert messages and all("does not apply" in m for m in messages)
    assert any("--config.transformer_train.num_train_steps" in m for m in messages)
    assert preflight.shadowed_overrides(cfg, ["tokenizer"], [], ("num_train_steps",)) == []


def test_an_ema_that_would_end_mostly_at_its_start_is_reported():
    stages = {"decoder": ml_collections.ConfigDict(dict(ema_decay=0.999, num_train_steps=400)),
              "transformer": ml_collections.ConfigDict(dict(ema_decay=0.999, num_train_steps=100_000)),
              "tokenizer": ml_collections.ConfigDict(dict(ema_decay=None, num_train_steps=10))}
    messages = preflight.ema_lag_warnings(stages)
    assert len(messages) == 1, messages
    # 0.999 ** 400 = 0.670: two thirds of the decoder stage's EMA would still be the tokenizer's decoder.
    assert "decoder_train.ema_decay=0.999 over 400 steps leaves 67% of the starting weights" in messages[0]
    assert "e.g. 0.99)" in messages[0]
    assert preflight.ema_lag_warnings({"transformer": ml_collections.ConfigDict(
        dict(ema_decay=0.995, num_train_steps=2400))}) == []


def test_the_default_job_ends_every_stage_with_a_settled_ema():
    cfg = config_io.load_config_file(str(REPO / "configs" / "fashion_mnist.py"))
    stages = {stage: trainer.stage_config(cfg, stage) for stage in cfg.stages}
    assert preflight.ema_lag_warnings(stages) == []


def test_mistyped_data_dir_is_refused_not_created(tmp_path):
    cfg = config_io.load_config_file(str(REPO / "configs" / "fashion_mnist.py"))
    preflight.check_data_dir(cfg)  # None: the tfds default, created on a fresh machine as before
    cfg.dataset.data_dir = str(tmp_path / "typo" / "tfds")
    with pytest.raises(ValueError, match="does not exist, nor does its parent"):
        preflight.check_data_dir(cfg)
    assert not (tmp_path / "typo").exists()
    cfg.dataset.data_dir = str(tmp_path / "tfds")  # parent exists: prepared there, with a message
    preflight.check_data_dir(cfg)
    cfg.dataset.name = "imagenet2012"
    with pytest.raises(ValueError, match="must already be prepared there"):
        preflight.check_data_dir(cfg)


# ---------------------------------------------------------------- sample.py flags (before any model loads)
def _sample(*args):
    return subprocess.run([sys.executable, str(REPO / "sample.py"), *args], env=_env(), capture_output=True,
                          text=True, timeout=300)


def test_sample_py_flag_errors_exit_2_with_one_line(tmp_path):
    missing = tmp_path / "no_such_workdir"  # flags are checked before the workdir is even read
    result = _sample(f"--workdir={missing}", "--batch_size=0", f"--out={tmp_path / 'o'}")
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().count("\n") == 0 and "--batch_size" in result.stderr
    assert "Traceback" not in result.stderr
    existing = tmp_path / "taken.png"
    existing.write_bytes(b"x")
    result = _sample(f"--workdir={missing}", f"--out={existing}")
    assert result.returncode == 2 and "is an existing file" in result.stderr and "Traceback" not in result.stderr
    assert existing.read_bytes() == b"x"
    result = _sample(f"--workdir={missing}", "--recap_cheap_per_full=-1")
    assert result.returncode == 2 and "--recap_cheap_per_full" in result.stderr
    result = _sample(f"--workdir={missing}", "--no_such_flag=1")
    assert result.returncode == 2 and "no_such_flag" in result.stderr and "Traceback" not in result.stderr
    result = _sample(f"--workdir={missing}")
    assert result.returncode == 1 and result.stderr.strip().splitlines()[-1].startswith("maskgen: error: ")
    assert "Traceback" not in result.stderr
