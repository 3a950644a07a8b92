"""One writer per workdir: `WORKDIR/maskgen.lock`, taken before a training run writes anything.

Why: two `train.py` on one workdir race on orbax's renames (one dies on `manifest.ocdbt.__lock`) or,
with different configs, interleave checkpoints without a word (issue 16). The lock is a small JSON file

    {"host": ..., "pid": ..., "pid_start": <kernel start tick of that PID>, "started": <unix time>,
     "heartbeat": <unix time>, "token": <random id>, "command": ...}

created *exclusively* (O_CREAT | O_EXCL: exactly one creator succeeds, also on NFS v3+). While held, a
daemon thread refreshes `heartbeat` every `lease / 3` seconds. A second writer finds the file and is
refused with `WorkdirLocked` naming the holder's host, PID and start time. The lock is *stale*, and
is taken over with a logged message, when

  * the holder is on this host and its PID is dead (or the PID was reused: a different start tick), or
  * the holder is on another host and its heartbeat is older than the lease (default 900 s,
    `MASKGEN_LOCK_LEASE_S` or `lease_s=`): a crashed host cannot be asked whether its PID lives.

Locally, takeover is serialised by a second exclusive file, `maskgen.lock.takeover` (itself stale
after 60 s), so two processes that both judge the lock stale cannot both win. Multi-host training: only
process 0 holds the lock (the caller decides; `maskgen.training.trainer` does it).

Storage backends. All file access goes through `LockStore` (create-exclusive / read / replace /
delete). `LocalLockStore` uses POSIX semantics. `GcsLockStore` (`gs://` workdirs, issue 17) does the
same four operations on one object with generation preconditions (google-cloud-storage):
`create_exclusive` = upload with `if_generation_match=0`; `read` returns the content *and* its
generation (kept in `LockInfo.version`); `replace(path, data, expected_version)` = upload with
`if_generation_match=expected_version`, so a heartbeat or takeover fails if anybody rewrote the object
meanwhile (a *versioned* store: no takeover file); `delete(path, expected_version)` = delete with
`if_generation_match`. `store_for(path)` picks the store from the path's scheme.
"""
import abc
import dataclasses
import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from typing import Optional, Tuple

from etils import epath

from maskgen import paths
from maskgen.cli import UserError

log = logging.getLogger(__name__)

LOCK_NAME = "maskgen.lock"
LEASE_ENV = "MASKGEN_LOCK_LEASE_S"
DEFAULT_LEASE_S = 900.0
TAKEOVER_STALE_S = 60.0


class WorkdirLocked(UserError):
    """Another live process holds the workdir lock (a user error: the CLIs print it as one line)."""


@dataclasses.dataclass(frozen=True)
class LockInfo:
    host: str
    pid: int
    pid_start: Optional[int]
    started: float
    heartbeat: float
    token: str
    command: str = ""
    version: Optional[str] = None  # backend's content version (GCS generation); not serialised

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        data.pop("version")
        return json.dumps(data, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, version: Optional[str] = None) -> "LockInfo":
        data = json.loads(text)
        return cls(host=str(data["host"]), pid=int(data["pid"]), pid_start=data.get("pid_start"),
                   started=float(data["started"]), heartbeat=float(data.get("heartbeat", data["started"])),
                   token=str(data["token"]), command=str(data.get("command", "")), version=version)

    def describe(self) -> str:
        started = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(self.started))
        return f"host {self.host}, PID {self.pid}, started {started}"


class LockStore(abc.ABC):
    """The storage operations the lock needs."""

    # True when `replace` honours `expected_version` (compare-and-swap): takeover needs no extra file.
    versioned = False

    @abc.abstractmethod
    def create_exclusive(self, path: epath.Path, data: str) -> bool:
        """Writes `data` to `path` only if it does not exist; False when it already existed."""

    @abc.abstractmethod
    def read(self, path: epath.Path) -> Optional[Tuple[str, Optional[str]]]:
        """(content, version) or None when missing."""

    @abc.abstractmethod
    def replace(self, path: epath.Path, data: str, expected_version: Optional[str]) -> bool:
        """Overwrites `path` atomically; a versioned store fails (False) on a version mismatch."""

    @abc.abstractmethod
    def delete(self, path: epath.Path, expected_version: Optional[str] = None) -> None:
        """Removes `path`; a versioned store only when it still has `expected_version`."""

    @abc.abstractmethod
    def mtime(self, path: epath.Path) -> Optional[float]:
        """Last modification time of `path` in seconds since the epoch, None when missing."""


class LocalLockStore(LockStore):
    """POSIX files: O_EXCL creation, write-to-temporary + rename for replacement."""

    def create_exclusive(self, path: epath.Path, data: str) -> bool:
        try:
            fd = os.open(os.fspath(path), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return True

    def read(self, path: epath.Path) -> Optional[Tuple[str, Optional[str]]]:
        try:
            with open(os.fspath(path)) as f:
                return f.read(), None
        except FileNotFoundError:
            return None

    def replace(self, path: epath.Path, data: str, expected_version: Optional[str]) -> bool:
        tmp = f"{os.fspath(path)}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            f.write(data)
        os.replace(tmp, os.fspath(path))
        return True

    def delete(self, path: epath.Path, expected_version: Optional[str] = None) -> None:
        try:
            os.unlink(os.fspath(path))
        except FileNotFoundError:
            pass

    def mtime(self, path: epath.Path) -> Optional[float]:
        try:
            return os.stat(os.fspath(path)).st_mtime
        except FileNotFoundError:
            return None


class GcsLockStore(LockStore):
    """One `gs://` object; its generation is the version, every write and delete conditioned on it.

    GCS checks `ifGenerationMatch` atomically on the server, so of two writers with the same expected
    generation (0 = "does not exist") exactly one succeeds and the other gets 412 Precondition Failed.
    The client is google-cloud-storage's, created as tensorboardX's gs:// writer creates it:
    `storage.Client()` finds Application Default Credentials, or, with STORAGE_EMULATOR_HOST set,
    talks to the emulator with anonymous credentials.
    """

    versioned = True

    def __init__(self, client: Optional[object] = None) -> None:
        self._client = client

    def _blob(self, path: epath.Path) -> object:
        from google.cloud import storage
        if self._client is None:
            self._client = storage.Client()
        bucket, _, name = os.fspath(path)[len("gs://"):].partition("/")
        return self._client.bucket(bucket).blob(name)

    def create_exclusive(self, path: epath.Path, data: str) -> bool:
        from google.api_core.exceptions import PreconditionFailed
        try:
            self._blob(path).upload_from_string(data, content_type="application/json", if_generation_match=0)
        except PreconditionFailed:
            return False
        return True

    def read(self, path: epath.Path) -> Optional[Tuple[str, Optional[str]]]:
        from google.api_core.exceptions import NotFound
        blob = self._blob(path)
        try:
            data = blob.download_as_bytes()  # one GET: content + x-goog-generation of that content
        except NotFound:
            return None
        return data.decode("utf-8", "replace"), str(blob.generation)

    def replace(self, path: epath.Path, data: str, expected_version: Optional[str]) -> bool:
        from google.api_core.exceptions import PreconditionFailed
        if expected_version is None:
            raise ValueError(f"{path}: a GCS lock is only replaced at a known generation")
        try:
            self._blob(path).upload_from_string(data, content_type="application/json",
                                                if_generation_match=int(expected_version))
        except PreconditionFailed:
            return False
        return True

    def delete(self, path: epath.Path, expected_version: Optional[str] = None) -> None:
        from google.api_core.exceptions import NotFound, PreconditionFailed
        match = None if expected_version is None else int(expected_version)
        try:
            self._blob(path).delete(if_generation_match=match)
        except (NotFound, PreconditionFailed):
            pass  # gone, or rewritten by someone else: not ours to delete

    def mtime(self, path: epath.Path) -> Optional[float]:
        from google.api_core.exceptions import NotFound
        blob = self._blob(path)
        try:
            blob.reload()
        except NotFound:
            return None
        return blob.updated.timestamp() if blob.updated else None


def store_for(path: epath.Path) -> LockStore:
    """The store for `path`'s filesystem: GCS for `gs://`, POSIX files otherwise."""
    if os.fspath(path).startswith("gs://"):
        return GcsLockStore()
    return LocalLockStore()


def _pid_start(pid: int) -> Optional[int]:
    """The kernel start tick of `pid` (field 22 of /proc/PID/stat), to detect PID reuse; None off Linux."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _pid_alive(pid: int, start: Optional[int]) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    if start is not None:
        now = _pid_start(pid)
        if now is not None and now != start:
            return False  # the PID was reused by another process
    return True


def lease_seconds(lease_s: Optional[float] = None) -> float:
    """The lease: `lease_s`, else MASKGEN_LOCK_LEASE_S, else 900 s."""
    if lease_s is not None:
        return float(lease_s)
    text = os.environ.get(LEASE_ENV)
    if text:
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"{LEASE_ENV}={text!r} is not a number of seconds") from None
        if value <= 0:
            raise ValueError(f"{LEASE_ENV} must be > 0 seconds, got {text}")
        return value
    return DEFAULT_LEASE_S


class WorkdirLock:
    """The single-writer lock of one workdir; `with WorkdirLock(w): ...` or `acquire()` / `release()`."""

    def __init__(self, workdir: str | os.PathLike, lease_s: Optional[float] = None,
                 store: Optional[LockStore] = None) -> None:
        self.directory = epath.Path(workdir)
        self.path = self.directory / LOCK_NAME
        self.lease_s = lease_seconds(lease_s)
        self.store = store or store_for(self.path)
        self.info: Optional[LockInfo] = None
        self.lost = False  # set when someone else took the lock over while we held it
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    # ---- judging the current holder
    def holder(self) -> Optional[LockInfo]:
        """The current holder, or None when unlocked (an unreadable lock file counts as a holder from
        its modification time, on an unknown host, so it expires after the lease)."""
        got = self.store.read(self.path)
        if got is None:
            return None
        text, version = got
        try:
            return LockInfo.from_json(text, version)
        except (ValueError, KeyError, TypeError):
            mtime = self.store.mtime(self.path) or 0.0
            return LockInfo(host="<unreadable lock file>", pid=-1, pid_start=None, started=mtime,
                            heartbeat=mtime, token="", version=version)

    def stale_reason(self, info: LockInfo) -> Optional[str]:
        """Why `info`'s holder no longer holds the workdir, or None when it is alive."""
        if info.host == socket.gethostname():
            if not _pid_alive(info.pid, info.pid_start):
                return f"its process {info.pid} on this host is no longer running"
            return None
        age = time.time() - info.heartbeat
        if age > self.lease_s:
            return (f"its heartbeat is {age:.0f} s old, longer than the {self.lease_s:.0f} s lease "
                    f"({LEASE_ENV})")
        return None

    # ---- taking and giving back
    def _new_info(self) -> LockInfo:
        now = time.time()
        return LockInfo(host=socket.gethostname(), pid=os.getpid(), pid_start=_pid_start(os.getpid()),
                        started=now, heartbeat=now, token=uuid.uuid4().hex,
                        command=" ".join(sys.argv)[:500])

    def acquire(self) -> "WorkdirLock":
        """Takes the lock or raises WorkdirLocked naming the live holder."""
        paths.makedirs(self.directory)  # a no-op on gs://, where folders are name prefixes
        for _ in range(5):
            info = self._new_info()
            if self.store.create_exclusive(self.path, info.to_json()):
                self._hold(info)
                return self
            holder = self.holder()
            if holder is None:
                continue  # released between our attempt and the read
            if holder.token == info.token:  # our create landed, its reply was lost and the retry refused
                self._hold(info)
                return self
            reason = self.stale_reason(holder)
            if reason is None:
                raise WorkdirLocked(
                    f"workdir {self.directory} is locked by another training run ({holder.describe()}; "
                    f"lock file {self.path}): only one run may write a workdir. Wait for it to finish, "
                    f"or stop it (kill {holder.pid}) and rerun")
            if self._take_over(holder, reason):
                return self
        raise WorkdirLocked(f"could not take the workdir lock {self.path}: it keeps changing hands")

    def _take_over(self, stale: LockInfo, reason: str) -> bool:
        if self.store.versioned:  # replace only if still the stale object: one of two takers wins
            return self._replace_stale(stale, reason)
        takeover = self.directory / (LOCK_NAME + ".takeover")
        if not self.store.create_exclusive(takeover, str(os.getpid())):
            mtime = self.store.mtime(takeover)
            if mtime is not None and time.time() - mtime > TAKEOVER_STALE_S:
                self.store.delete(takeover)
            time.sleep(0.2)
            return False
        try:
            current = self.holder()
            if current is None or current.token != stale.token:
                return False  # somebody else took it or released it meanwhile: start again
            return self._replace_stale(current, reason)
        finally:
            self.store.delete(takeover)

    def _replace_stale(self, stale: LockInfo, reason: str) -> bool:
        info = self._new_info()
        if not self.store.replace(self.path, info.to_json(), stale.version):
            return False  # rewritten since we read it (another taker, or the holder's heartbeat)
        log.warning("took over the stale workdir lock %s (%s; %s)", self.path, stale.describe(), reason)
        self._hold(info)
        return True

    def _hold(self, info: LockInfo) -> None:
        self.info = info
        self._stop.clear()
        self._thread = threading.Thread(target=self._heartbeat, name="maskgen-workdir-lock", daemon=True)
        self._thread.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(max(self.lease_s / 3.0, 0.05)):
            try:
                if not self._refresh():
                    return
            # A full disk or a GCS outage must not kill the run from this thread: retried next beat.
            except Exception as err:  # noqa: BLE001 - OSError locally, google.api_core errors on GCS
                log.warning("could not refresh the workdir lock %s: %s", self.path, err)

    def _refresh(self) -> bool:
        """One heartbeat; False (and `lost` set) when the lock is no longer ours."""
        for _ in range(2):  # a refused conditional write means the object changed: read it again
            current = self.holder()
            if current is None or current.token != self.info.token:
                self.lost = True
                log.error("the workdir lock %s was taken by %s while this run held it", self.path,
                          current.describe() if current else "nobody (deleted)")
                return False
            info = dataclasses.replace(self.info, heartbeat=time.time())
            if self.store.replace(self.path, info.to_json(), current.version):
                self.info = info
                return True
        return True

    def release(self) -> None:
        """Stops the heartbeat and deletes the lock file if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self.info is None:
            return
        try:
            current = self.holder()
            if current is not None and current.token == self.info.token:
                self.store.delete(self.path, current.version)
        except OSError as err:
            log.warning("could not remove the workdir lock %s: %s", self.path, err)
        self.info = None

    def __enter__(self) -> "WorkdirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
