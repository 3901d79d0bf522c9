"""A real GCS endpoint on a loopback port: gcp-storage-emulator in a subprocess, in memory.

  with serve() as url:                       # STORAGE_EMULATOR_HOST for google-cloud-storage,
    bucket = Bucket(url, "test-bucket")      # gcsfs and tensorstore
    bucket.create(); bucket.names("run/")

tests/conftest.py runs one server per test session (fixture `gcs_server`) and gives each test a
fresh bucket (fixture `gcs`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import socket
import subprocess
import sys
import time
import urllib.request
from typing import Iterator

# gcp-storage-emulator leaves the x-goog-generation header out of object downloads; real GCS sends
# it and tensorstore (Orbax's array writer) requires it: reading back an OCDBT manifest (a save of
# many arrays) fails with "Malformed StorageGeneration". The server runs with the header added.
_SERVE = """
import sys
from gcp_storage_emulator.handlers import objects

_download = objects.download

def download(request, response, storage, *args, **kwargs):
    _download(request, response, storage, *args, **kwargs)
    try:
        obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
    except Exception:  # not found: the response says so already
        return
    response["x-goog-generation"] = str(obj["generation"])
    response["x-goog-metageneration"] = str(obj["metageneration"])

objects.download = download  # before the server module binds its routes
from gcp_storage_emulator.server import create_server
create_server("127.0.0.1", int(sys.argv[1]), in_memory=True).run()
"""


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@contextlib.contextmanager
def serve(start_timeout_s: float = 60) -> Iterator[str]:
  """Runs the emulator until the block ends; yields its URL."""
  port = _free_port()
  url = f"http://127.0.0.1:{port}"
  proc = subprocess.Popen([sys.executable, "-c", _SERVE, str(port)], stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  try:
    deadline = time.monotonic() + start_timeout_s
    while True:
      try:
        urllib.request.urlopen(url + "/", timeout=1).close()
        break
      except OSError:
        if proc.poll() is not None or time.monotonic() > deadline:
          raise RuntimeError(f"the GCS emulator did not start on {url}") from None
        time.sleep(0.1)
    yield url
  finally:
    proc.terminate()
    try:
      proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
      proc.kill()


@dataclasses.dataclass
class Bucket:
  """One bucket on the emulator at `url`, read through google-cloud-storage (not our path layer)."""
  url: str
  bucket: str

  def client(self):
    from google.auth.credentials import AnonymousCredentials  # pylint: disable=g-import-not-at-top
    from google.cloud import storage as gcs_client  # pylint: disable=g-import-not-at-top
    return gcs_client.Client(project="test", credentials=AnonymousCredentials(),
                             client_options={"api_endpoint": self.url})

  def create(self) -> None:
    self.client().create_bucket(self.bucket)

  def names(self, prefix: str = "") -> list[str]:
    return sorted(b.name for b in self.client().list_blobs(self.bucket, prefix=prefix))

  def read(self, name: str) -> bytes:
    return self.client().bucket(self.bucket).blob(name).download_as_bytes()

  def delete(self, name: str) -> None:
    self.client().bucket(self.bucket).blob(name).delete()
