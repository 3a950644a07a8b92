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

Takeover is serialised by a second exclusive file, `maskgen.lock.takeover` (itself stale after 60 s),
so two processes that both judge the lock stale cannot both win. Multi-host training: only process 0
holds the lock (the caller decides; `maskgen.training.trainer` does it).

Storage backends. All file access goes through `LockStore` (create-exclusive / read / replace /
delete). `LocalLockStore` uses POSIX semantics. A GCS store for `gs://` workdirs (issue 17) implements
the same four operations with object generation preconditions: `create_exclusive` = upload with
`if_generation_match=0`; `read` returns the content *and* its generation (kept in `LockInfo.version`);
`replace(path, data, expected_version)` = upload with `if_generation_match=expected_version` (so a
heartbeat or takeover fails if anybody rewrote the object meanwhile - the takeover file is then not
needed); `delete(path, expected_version)` = delete with `if_generation_match`. `store_for(path)` picks
the store from the path's scheme and is the one place to register it.
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
    """The storage operations the lock needs (see the module docstring for a GCS version)."""

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


def store_for(path: epath.Path) -> LockStore:
    """The store for `path`'s filesystem. A `gs://` store registers here (issue 17)."""
    if str(path).startswith("gs://"):
        raise ValueError(f"{path}: workdir locks on gs:// need a GCS lock store, which maskgen does not have yet "
                         "(issue 17); train.py runs gs:// workdirs without a lock and says so")
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

    def __init__(self, workdir: str | os.PathLike, lease_s: Optional[float] = None, store: Optional[LockStore] = None):
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
        self.directory.mkdir(parents=True, exist_ok=True)
        for _ in range(5):
            info = self._new_info()
            if self.store.create_exclusive(self.path, info.to_json()):
                self._hold(info)
                return self
            holder = self.holder()
            if holder is None:
                continue  # released between our attempt and the read
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
            info = self._new_info()
            if not self.store.replace(self.path, info.to_json(), stale.version):
                return False
            log.warning("took over the stale workdir lock %s (%s; %s)", self.path, stale.describe(), reason)
            self._hold(info)
            return True
        finally:
            self.store.delete(takeover)

    def _hold(self, info: LockInfo) -> None:
        self.info = info
        self._stop.clear()
        self._thread = threading.Thread(target=self._heartbeat, name="maskgen-workdir-lock", daemon=True)
        self._thread.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(max(self.lease_s / 3.0, 0.05)):
            try:
                current = self.holder()
                if current is None or current.token != self.info.token:
                    self.lost = True
                    log.error("the workdir lock %s was taken by %s while this run held it", self.path,
                              current.describe() if current else "nobody (deleted)")
                    return
                self.info = dataclasses.replace(self.info, heartbeat=time.time())
                self.store.replace(self.path, self.info.to_json(), current.version)
            except OSError as err:  # a full disk must not kill the run from this thread
                log.warning("could not refresh the workdir lock %s: %s", self.path, err)

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
