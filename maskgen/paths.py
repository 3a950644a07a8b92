"""Every path maskgen reads or writes: local files or `gs://` objects, through `etils.epath`.

Why one module: a TPU pod's hosts share no filesystem, so the workdir is a
bucket (`--workdir=gs://bucket/run`), and the same code must read and write
both kinds of path. orbax already goes through `etils.epath`; so does
everything else here (epath's `gs://` backend is gcsfs when TensorFlow is not
installed, which is maskgen's case; tensorstore's own `gcs` driver writes the
checkpoint arrays).

* `normalize` / `as_path`: a local path becomes absolute; `gs://` stays a URL;
  any other scheme (`s3://`, `az://`, `hf://`, `http://` ...) is refused up
  front, before a folder literally named `s3:` could be created in the cwd.
* `atomic_write`: a reader never sees half a file. Locally: a temp file beside
  the target, then `os.replace`. On GCS a rename is a copy + delete (not
  atomic), so the file is written to a local temp file and uploaded as *one*
  object: GCS makes an object visible only once its upload is complete (for
  simple and resumable uploads alike), and an overwrite replaces the whole
  object, so readers see the old or the new file, never a mix.
* `check_storage`: bucket missing, no credentials, permission denied -- each
  an error naming the path and the fix, raised before any training work.

Testing against an emulator (fake-gcs-server): `STORAGE_EMULATOR_HOST` points
gcsfs (and google-cloud-storage, used by tensorboardX) at it,
`TENSORSTORE_GCS_HTTP_URL` points tensorstore at it, and
`GOOGLE_AUTH_TOKEN_FOR_TESTING` gives tensorstore a token without a credential
search. With an emulator set, gcsfs is configured to send no credentials (an
emulator takes none) and its bucket-type probe of Google's control-plane API
is turned off, so nothing talks to any host but the emulator.
"""
import os
import posixpath
import re
import tempfile
import uuid
from typing import Callable, Optional, Union

from etils import epath

PathLike = Union[str, os.PathLike]

SUPPORTED_SCHEMES = ("gs",)
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_GCS_CONFIGURED = False


class StorageError(ValueError):
    """A workdir or output path that cannot be used: the message names the path and the fix."""


def scheme(path: PathLike) -> Optional[str]:
    """The URL scheme of `path` ('gs'), or None for a local path."""
    match = _SCHEME.match(os.fspath(path))
    return match.group(1).lower() if match else None


def is_gcs(path: PathLike) -> bool:
    return scheme(path) == "gs"


def normalize(path: PathLike) -> str:
    """The canonical string form: an absolute local path or a `gs://bucket/...` URL.

    Raises StorageError for a scheme maskgen does not support, so the path is
    never treated as a relative local folder called `s3:`.
    """
    text = os.fspath(path)
    kind = scheme(text)
    if kind is None:
        return os.path.abspath(os.path.expanduser(text))
    if kind not in SUPPORTED_SCHEMES:
        raise StorageError(
            f"{text}: the {kind}:// scheme is not supported; use a local or shared-filesystem path, "
            f"or a gs://bucket/path (Google Cloud Storage)")
    bucket = text[len("gs://"):].split("/", 1)[0]
    if not bucket:
        raise StorageError(f"{text}: no bucket name; write gs://BUCKET/PATH")
    _configure_gcs()
    return "gs://" + posixpath.normpath(text[len("gs://"):]).lstrip("/")


def as_path(path: PathLike) -> epath.Path:
    """`normalize(path)` as an `epath.Path` (pathlib API for local files and gs:// objects)."""
    return epath.Path(normalize(path))


def join(base: PathLike, *parts: str) -> str:
    """`base/part/...` as a normalized string (posix separators for gs://)."""
    return os.fspath(as_path(base).joinpath(*parts))


def bucket_of(path: PathLike) -> str:
    return normalize(path)[len("gs://"):].split("/", 1)[0]


def _configure_gcs() -> None:
    """With an emulator set: gcsfs sends no credentials and skips Google's bucket-type probe.

    gcsfs reads `STORAGE_EMULATOR_HOST` itself. Without this it would first
    search for Google credentials (metadata-server probe included) and, with
    credentials found, ask the real control-plane API for the bucket's layout.
    Runs once, before epath creates its (cached) gcsfs filesystem.
    """
    global _GCS_CONFIGURED
    if _GCS_CONFIGURED or not os.environ.get("STORAGE_EMULATOR_HOST"):
        return
    _GCS_CONFIGURED = True
    os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    import fsspec.config
    fsspec.config.conf.setdefault("gcs", {}).setdefault("token", "anon")


def atomic_write(path: PathLike, write: Callable[[str], None]) -> None:
    """Calls `write(tmp)` on a local temporary file, then publishes it at `path` in one step.

    Local: the temp file sits beside `path` and is renamed onto it
    (`os.replace`, atomic on POSIX). gs://: one object upload of the finished
    file (atomic on GCS, see the module docstring); the temp file is local.
    """
    target = normalize(path)
    suffix = os.path.splitext(target)[1]
    if not is_gcs(target):
        folder = os.path.dirname(target)
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=suffix)
        os.close(fd)
        try:
            write(tmp)
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return
    with tempfile.TemporaryDirectory(prefix="maskgen-upload-") as folder:
        tmp = os.path.join(folder, "file" + suffix)
        write(tmp)
        with open(tmp, "rb") as f:
            data = f.read()
    epath.Path(target).write_bytes(data)  # gcsfs: a single-object upload, published on close


def write_text(path: PathLike, text: str) -> None:
    """Writes `text` (UTF-8) atomically: see `atomic_write`."""
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    atomic_write(path, write)


def read_bytes(path: PathLike) -> bytes:
    return as_path(path).read_bytes()


def exists(path: PathLike) -> bool:
    return as_path(path).exists()


def is_dir(path: PathLike) -> bool:
    return as_path(path).is_dir()


def is_file(path: PathLike) -> bool:
    p = as_path(path)
    return p.exists() and not p.is_dir()


def listdir(path: PathLike) -> list[str]:
    """Names (not paths) of the entries of a directory; [] when it does not exist."""
    p = as_path(path)
    if not p.is_dir():
        return []
    return sorted(child.name for child in p.iterdir())


def makedirs(path: PathLike) -> None:
    """Creates a local directory; a no-op on GCS, where "directories" are object-name prefixes."""
    if not is_gcs(path):
        os.makedirs(normalize(path), exist_ok=True)


def _credentials_problem() -> Optional[str]:
    """Why no Google credentials can be found (None when some are), without contacting GCS.

    `GOOGLE_AUTH_TOKEN_FOR_TESTING` (tensorstore's test token, set with an
    emulator) counts as credentials; otherwise Application Default Credentials
    must resolve: `GOOGLE_APPLICATION_CREDENTIALS`, `gcloud auth
    application-default login`, or a GCE/TPU VM's service account.
    """
    if os.environ.get("GOOGLE_AUTH_TOKEN_FOR_TESTING"):
        return None
    try:
        import google.auth
        import google.auth.exceptions
    except ImportError as err:  # pragma: no cover - gcsfs depends on google-auth
        return f"google-auth is not installed ({err})"
    try:
        google.auth.default(scopes=["https://www.googleapis.com/auth/devstorage.read_write"])
    except google.auth.exceptions.DefaultCredentialsError as err:
        return str(err).split("\n")[0]
    return None


def _fix_for_permission(bucket: str, write: bool) -> str:
    role = "roles/storage.objectAdmin" if write else "roles/storage.objectViewer"
    return (f"grant the account this job runs as {role} on the bucket (gcloud storage buckets "
            f"add-iam-policy-binding gs://{bucket} --member=serviceAccount:ACCOUNT --role={role}); on a "
            f"TPU VM also check the VM was created with the storage (or cloud-platform) access scope")


def _is_permission_error(err: BaseException) -> bool:
    text = str(err)
    return isinstance(err, PermissionError) or "Forbidden" in text or "403" in text or "401" in text \
        or "Unauthorized" in text


def check_storage(path: PathLike, write: bool, what: str = "workdir") -> str:
    """Checks `path` can be used before any work starts; returns `normalize(path)`.

    Local paths: only the scheme check. gs:// paths, in the order a user would
    fix them: credentials exist; the bucket exists; with `write`, a probe object
    can be written and deleted under `path` (the permissions training needs:
    create, overwrite, delete), else the prefix can be listed. Each failure is a
    StorageError naming the path and what to do. Every process of a pod runs
    it: each host has its own credentials.
    """
    target = normalize(path)
    if not is_gcs(target):
        return target
    bucket = bucket_of(target)
    problem = _credentials_problem()
    if problem:
        raise StorageError(
            f"{what} {target}: no Google Cloud credentials ({problem}). Fix: on a TPU/GCE VM use a VM "
            f"whose service account can use the bucket; elsewhere run `gcloud auth application-default "
            f"login` or set GOOGLE_APPLICATION_CREDENTIALS=/path/to/key.json. For an emulator set "
            f"STORAGE_EMULATOR_HOST, TENSORSTORE_GCS_HTTP_URL and GOOGLE_AUTH_TOKEN_FOR_TESTING (README)")
    fs = epath.Path(target)._backend.fs(target)  # the gcsfs filesystem epath itself uses
    try:
        bucket_found = fs.exists(bucket)
    except Exception as err:  # noqa: BLE001 - classify below
        if _is_permission_error(err):
            raise StorageError(f"{what} {target}: permission denied reading bucket gs://{bucket} "
                               f"({_first_line(err)}). Fix: {_fix_for_permission(bucket, write)}") from err
        raise StorageError(f"{what} {target}: cannot reach bucket gs://{bucket}: "
                           f"{type(err).__name__}: {_first_line(err)}") from err
    if not bucket_found:
        raise StorageError(
            f"{what} {target}: bucket gs://{bucket} does not exist (or this account cannot see it). Fix: "
            f"create it (gcloud storage buckets create gs://{bucket} --location=REGION, in the TPU's "
            f"region) or correct the name")
    try:
        if write:
            probe = posixpath.join(target, f".maskgen-write-check-{uuid.uuid4().hex}")
            fs.pipe_file(probe, b"maskgen write check")
            fs.rm_file(probe)
        else:
            fs.ls(target, detail=False)
    except FileNotFoundError:
        if write:
            raise
    except Exception as err:  # noqa: BLE001
        if _is_permission_error(err):
            action = "writing to" if write else "reading"
            raise StorageError(f"{what} {target}: permission denied {action} gs://{bucket} "
                               f"({_first_line(err)}). Fix: {_fix_for_permission(bucket, write)}") from err
        raise
    return target


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.split("\n")[0] if text else type(err).__name__
