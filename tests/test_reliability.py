"""Issue 16: a failed or interrupted run never damages its workdir; one writer; full disks and SIGTERM end cleanly.

Fast tests drive the lock and the checkpoint error path in-process; the `slow` ones run train.py and
sample.py as a user would (debug config, a few steps).
"""
import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax.numpy as jnp
import numpy as np
import pytest
from editing_bundle import REPO

from maskgen import checkpoint as ckpt_lib
from maskgen import cli, workdir_lock
from maskgen.workdir_lock import LockInfo, WorkdirLock, WorkdirLocked


# ---------------------------------------------------------------- the workdir lock
def _write_lock(workdir, **fields):
    now = time.time()
    info = dict(host=socket.gethostname(), pid=os.getpid(), pid_start=None, started=now, heartbeat=now,
                token="other", command="train.py")
    info.update(fields)
    (workdir / workdir_lock.LOCK_NAME).write_text(json.dumps(info))


def test_lock_is_exclusive_names_the_holder_and_is_released(tmp_path):
    first = WorkdirLock(tmp_path).acquire()
    info = json.loads((tmp_path / workdir_lock.LOCK_NAME).read_text())
    assert info["pid"] == os.getpid() and info["host"] == socket.gethostname()
    with pytest.raises(WorkdirLocked) as err:
        WorkdirLock(tmp_path).acquire()
    message = str(err.value)
    assert "lock" in message and f"PID {os.getpid()}" in message and socket.gethostname() in message
    first.release()
    assert not (tmp_path / workdir_lock.LOCK_NAME).exists()
    with WorkdirLock(tmp_path):  # free again
        pass


def test_lock_of_a_live_process_on_this_host_is_refused(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _write_lock(tmp_path, pid=holder.pid, pid_start=workdir_lock._pid_start(holder.pid))
        with pytest.raises(WorkdirLocked, match=f"locked by another training run .*PID {holder.pid}"):
            WorkdirLock(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait()
    # Now the PID is dead: the lock is stale and taken over, with a message.
    lock = WorkdirLock(tmp_path)
    with pytest.MonkeyPatch.context() as mp:
        warnings = []
        mp.setattr(workdir_lock.log, "warning", lambda msg, *a: warnings.append(msg % a))
        lock.acquire()
    assert any("took over the stale workdir lock" in w and "no longer running" in w for w in warnings)
    assert json.loads((tmp_path / workdir_lock.LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()


def test_reused_pid_is_stale(tmp_path):
    start = workdir_lock._pid_start(os.getpid())
    if start is None:
        pytest.skip("no /proc: PID start ticks unavailable")
    _write_lock(tmp_path, pid=os.getpid(), pid_start=start + 12345)  # same PID, another process's start
    with WorkdirLock(tmp_path) as lock:
        assert lock.info.token != "other"


def test_lock_on_another_host_expires_after_the_lease(tmp_path, monkeypatch):
    _write_lock(tmp_path, host="elsewhere-host", pid=1, heartbeat=time.time() - 30)
    with pytest.raises(WorkdirLocked, match="host elsewhere-host, PID 1"):
        WorkdirLock(tmp_path, lease_s=600).acquire()
    monkeypatch.setenv(workdir_lock.LEASE_ENV, "10")
    lock = WorkdirLock(tmp_path)  # heartbeat 30 s old > 10 s lease
    assert lock.lease_s == 10
    lock.acquire()
    assert json.loads((tmp_path / workdir_lock.LOCK_NAME).read_text())["host"] == socket.gethostname()
    lock.release()


def test_heartbeat_refreshes_and_notices_a_takeover(tmp_path):
    lock = WorkdirLock(tmp_path, lease_s=0.3).acquire()
    try:
        before = LockInfo.from_json((tmp_path / workdir_lock.LOCK_NAME).read_text()).heartbeat
        time.sleep(0.5)
        after = LockInfo.from_json((tmp_path / workdir_lock.LOCK_NAME).read_text()).heartbeat
        assert after > before
        _write_lock(tmp_path, token="thief")
        deadline = time.time() + 5
        while not lock.lost and time.time() < deadline:
            time.sleep(0.05)
        assert lock.lost
    finally:
        lock.release()
    assert json.loads((tmp_path / workdir_lock.LOCK_NAME).read_text())["token"] == "thief"  # not ours to delete


# ---------------------------------------------------------------- checkpoint I/O failures
def _tree(step, n=16):
    return {"step": jnp.int32(step), "params": {"w": jnp.arange(n, dtype=jnp.float32) + step}}


def test_io_cause_reads_orbax_and_os_errors():
    orbax_text = ('RESOURCE_EXHAUSTED: Error writing "params.w/0" in OCDBT database at local file "/x/": '
                  'Failed writing: "/x/6.orbax-checkpoint-tmp/d/abc": Failed to write 5 bytes to file 12: '
                  "No space left on device [os_error_code='28']")
    assert ckpt_lib.io_cause(ValueError(orbax_text)) == \
        "No space left on device (/x/6.orbax-checkpoint-tmp/d/abc)"
    assert ckpt_lib.io_cause(PermissionError(errno.EACCES, "Permission denied", "/ckpt/3")) == \
        "Permission denied (/ckpt/3)"


def test_failed_save_is_one_error_naming_path_and_cause_and_earlier_steps_survive(tmp_path, monkeypatch):
    stage = tmp_path / "transformer"
    ckpt = ckpt_lib.StageCheckpoints(stage, best_metric=None)
    ckpt.save(1, _tree(1), {"kind": "sampler", "position": 1})
    ckpt.wait()

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(stage / "2.orbax-checkpoint-tmp"))
    monkeypatch.setattr(ckpt.manager, "save", full_disk)
    with pytest.raises(ckpt_lib.CheckpointIOError) as err:
        ckpt.save(2, _tree(2), {"kind": "sampler", "position": 2})
    message = str(err.value)
    assert "\n" not in message and "No space left on device" in message
    assert str(stage / "2") in message and "earlier steps [1] are intact" in message
    assert cli.is_user_error(err.value)
    ckpt.close()  # abandoned after a failure: returns at once
    tree, step = ckpt_lib.restore_subtree(stage, {"params": {"w": jnp.zeros(16, jnp.float32)}})
    assert step == 1
    np.testing.assert_array_equal(np.asarray(tree["params"]["w"]), np.arange(16) + 1)


def test_async_save_failure_is_seen_by_the_next_poll(tmp_path, monkeypatch):
    ckpt = ckpt_lib.StageCheckpoints(tmp_path / "s", best_metric=None)
    ckpt.save(1, _tree(1), {"kind": "sampler", "position": 1})
    monkeypatch.setattr(ckpt.manager, "is_saving_in_progress", lambda: False)

    def failed(*args, **kwargs):
        raise ValueError("Failed writing: \"/s/1.orbax-checkpoint-tmp/x\" [os_error_code='28']")
    monkeypatch.setattr(ckpt.manager, "wait_until_finished", failed)
    with pytest.raises(ckpt_lib.CheckpointIOError, match="step 1 could not be written.*No space left"):
        ckpt.poll()


def test_hung_save_times_out(tmp_path, monkeypatch):
    ckpt = ckpt_lib.StageCheckpoints(tmp_path / "s", best_metric=None)
    ckpt.save(1, _tree(1), {"kind": "sampler", "position": 1})
    ckpt.manager.wait_until_finished()
    monkeypatch.setattr(ckpt.manager, "wait_until_finished", lambda: time.sleep(30))
    started = time.monotonic()
    with pytest.raises(ckpt_lib.CheckpointIOError, match="did not finish within 1 s"):
        ckpt.wait(timeout=1.0)
    assert time.monotonic() - started < 5


# ---------------------------------------------------------------- end to end (train.py / sample.py)
def _env(**extra):
    env = dict(os.environ, JAX_DISABLE_MOST_OPTIMIZATIONS="1", PYTHONPATH=str(REPO),
               XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
    for key in (cli.VERBOSE_ENV, cli.PREEMPT_EXIT_ENV):
        env.pop(key, None)
    env.update(extra)
    return env


def _train(workdir, *overrides):
    return [sys.executable, str(REPO / "train.py"), f"--config={REPO / 'configs' / 'debug.py'}",
            f"--workdir={workdir}", *overrides]


TOKENS_ONLY = ["--config.stages=('transformer',)", "--config.dataset.name=synthetic_tokens",
               "--config.transformer.num_layers=1", "--config.log_every_steps=1000"]


def _steps(stage_dir):
    return sorted(int(p) for p in os.listdir(stage_dir) if p.isdigit()) if os.path.isdir(stage_dir) else []


@pytest.mark.slow
def test_rejected_resume_keeps_config_json_and_the_workdir_loadable(tmp_path):
    workdir = tmp_path / "run"
    first = subprocess.run(_train(workdir, "--config.num_train_steps=2"), env=_env(), cwd=REPO,
                           capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    config_before = (workdir / "config.json").read_bytes()
    listing = sorted(os.listdir(workdir))

    rejected = subprocess.run(_train(workdir, "--config.num_train_steps=2", "--config.transformer.hidden_size=64"),
                              env=_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert rejected.returncode == 1
    last = rejected.stderr.strip().splitlines()[-1]
    assert last.startswith("maskgen: error: ") and "does not match this config" in last and "(32,)" in last
    assert "Traceback" not in rejected.stderr
    assert (workdir / "config.json").read_bytes() == config_before
    assert sorted(os.listdir(workdir)) == listing  # no lock left, no config history, nothing new

    sample = subprocess.run([sys.executable, str(REPO / "sample.py"), f"--workdir={workdir}",
                             f"--out={tmp_path / 'samples'}", "--per_class=1", "--steps=2"],
                            env=_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert sample.returncode == 0, sample.stderr[-3000:]
    assert (tmp_path / "samples" / "grid.png").is_file()

    # Even a config.json replaced by hand with another shape still samples: each step carries its config.
    other = json.loads(config_before)
    other["transformer"]["hidden_size"] = 64
    (workdir / "config.json").write_text(json.dumps(other))
    sample = subprocess.run([sys.executable, str(REPO / "sample.py"), f"--workdir={workdir}",
                             f"--out={tmp_path / 'samples2'}", "--per_class=1", "--steps=2"],
                            env=_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert sample.returncode == 0, sample.stderr[-3000:]
    assert "loading with the step's config" in sample.stderr
    assert (tmp_path / "samples2" / "grid.png").is_file()


def _wait_until(predicate, proc, timeout, what, log):
    deadline = time.time() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"train.py exited ({proc.returncode}) before {what}:\n{log.read_text()[-3000:]}")
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.mark.slow
def test_second_writer_is_refused_and_sigterm_exits_75_then_the_rerun_resumes(tmp_path):
    workdir = tmp_path / "run"
    stage_dir = workdir / "transformer"
    every = 20
    cmd = _train(workdir, *TOKENS_ONLY, "--config.num_train_steps=100000",
                 f"--config.checkpoint_every_steps={every}")
    log = tmp_path / "first.stderr"  # a file, not a pipe: a full pipe would block the run
    with open(log, "w") as stderr:
        first = subprocess.Popen(cmd, env=_env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        _wait_until(lambda: bool(_steps(stage_dir)), first, 300, "the first checkpoint", log)
        assert (workdir / workdir_lock.LOCK_NAME).is_file()

        started = time.monotonic()
        second = subprocess.run(cmd, env=_env(), cwd=REPO, capture_output=True, text=True, timeout=120)
        assert time.monotonic() - started < 60
        assert second.returncode == 1, second.stderr[-2000:]
        last = second.stderr.strip().splitlines()[-1]
        assert "lock" in last and f"PID {first.pid}" in last and "Traceback" not in second.stderr
        assert first.poll() is None, "the first run must be unharmed"

        saved_before = _steps(stage_dir)[-1]
        first.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        first.wait(timeout=120)
        assert time.monotonic() - sent < 120
    finally:
        first.kill()
    err = log.read_text()
    assert first.returncode == cli.EXIT_PREEMPTED_DEFAULT, err[-3000:]
    stopped_at = _steps(stage_dir)[-1]
    assert stopped_at >= saved_before and f"stopped during stage transformer at step {stopped_at}" in err
    assert "rerun the same command to resume" in err
    assert not (workdir / workdir_lock.LOCK_NAME).exists()

    rerun = subprocess.run(_train(workdir, *TOKENS_ONLY, f"--config.num_train_steps={stopped_at + 2}",
                                  f"--config.checkpoint_every_steps={every}"),
                           env=_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resumed from step {stopped_at}" in rerun.stderr
    assert _steps(stage_dir)[-1] == stopped_at + 2


@pytest.mark.slow
def test_disk_full_during_a_save_exits_within_a_bound_and_keeps_earlier_steps(tmp_path):
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root to mount a small tmpfs (the in-process ENOSPC tests cover the rest)")
    mount = tmp_path / "small_disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(mount)],
                      capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        workdir = mount / "run"
        stage_dir = workdir / "transformer"
        # ~4.5 MB per step (hidden 128): steps 2 and 4 fit in 12 MB, step 6 does not.
        cli_args = [*TOKENS_ONLY, "--config.transformer.num_layers=2", "--config.transformer.hidden_size=128",
                    "--config.transformer.mlp_dim=256", "--config.checkpoint_every_steps=2"]
        started = time.monotonic()
        full = subprocess.run(_train(workdir, *cli_args, "--config.num_train_steps=40"), env=_env(), cwd=REPO,
                              capture_output=True, text=True, timeout=300)
        assert time.monotonic() - started < 240
        assert full.returncode == 1, full.stderr[-3000:]
        last = full.stderr.strip().splitlines()[-1]
        assert last.startswith("maskgen: error: checkpoint step") and "No space left on device" in last
        assert str(stage_dir) in last and "are intact" in last
        assert "Traceback" not in full.stderr and "Event loop is closed" not in full.stderr
        good = _steps(stage_dir)
        assert good, "no step fitted: the tmpfs is too small for this model"
        assert not (workdir / workdir_lock.LOCK_NAME).exists()

        subprocess.run(["mount", "-o", "remount,size=64m", str(mount)], check=True)
        rerun = subprocess.run(_train(workdir, *cli_args, f"--config.num_train_steps={good[-1] + 2}"),
                               env=_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
        assert rerun.returncode == 0, rerun.stderr[-3000:]
        assert f"resumed from step {good[-1]}" in rerun.stderr
        assert not [p for p in os.listdir(stage_dir) if "tmp" in p]  # the partial step was cleaned up
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)
