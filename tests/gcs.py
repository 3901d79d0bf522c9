"""A real GCS endpoint for the tests: gcp-storage-emulator on a loopback port.

  from gcs import gcs  # noqa: F401  (the fixture)

  def test_x(gcs):
    url = f"gs://{gcs.bucket}/run"   # a fresh empty bucket per test
    gcs.names("run/")                # object names, read through google-cloud-storage

The server runs once per session in a subprocess (in memory, see _SERVE); the fixture sets
STORAGE_EMULATOR_HOST for the test (and the subprocesses it starts) and removes it after.
"""

import dataclasses
import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid

import pytest

from preflmr_jax import storage


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


@pytest.fixture(scope="session")
def gcs_server():
  port = _free_port()
  url = f"http://127.0.0.1:{port}"
  proc = subprocess.Popen([sys.executable, "-c", _SERVE, str(port)], stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  deadline = time.monotonic() + 60
  while True:
    try:
      urllib.request.urlopen(url + "/", timeout=1).close()
      break
    except OSError:
      if proc.poll() is not None or time.monotonic() > deadline:
        proc.kill()
        raise RuntimeError(f"the GCS emulator did not start on {url}")
      time.sleep(0.1)
  yield url
  proc.terminate()
  proc.wait(timeout=30)


@dataclasses.dataclass
class Emulator:
  url: str
  bucket: str

  def client(self):
    from google.auth.credentials import AnonymousCredentials  # pylint: disable=g-import-not-at-top
    from google.cloud import storage as gcs_client  # pylint: disable=g-import-not-at-top
    return gcs_client.Client(project="test", credentials=AnonymousCredentials(),
                             client_options={"api_endpoint": self.url})

  def names(self, prefix: str = "") -> list[str]:
    return sorted(b.name for b in self.client().list_blobs(self.bucket, prefix=prefix))

  def read(self, name: str) -> bytes:
    return self.client().bucket(self.bucket).blob(name).download_as_bytes()

  def delete(self, name: str) -> None:
    self.client().bucket(self.bucket).blob(name).delete()


@pytest.fixture
def gcs(gcs_server):
  before = os.environ.get(storage.EMULATOR_VAR)
  os.environ[storage.EMULATOR_VAR] = gcs_server
  storage.setup()
  emulator = Emulator(gcs_server, f"test-{uuid.uuid4().hex[:12]}")
  emulator.client().create_bucket(emulator.bucket)
  try:
    yield emulator
  finally:
    if before is None:
      os.environ.pop(storage.EMULATOR_VAR, None)
    else:
      os.environ[storage.EMULATOR_VAR] = before
    storage.setup()
