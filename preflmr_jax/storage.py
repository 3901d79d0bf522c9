"""The one place that knows about object storage: every user path is a local path or a gs:// URL.

  folder = storage.path(flag_value, "--output")     # an epath.Path; "gs://" (no bucket) refused
  storage.ensure_dir(folder, "--output")            # local: mkdir -p; gs://: the bucket must exist
  storage.write_text(folder / "results.json", text) # never half-written under its name
  with storage.errors("--checkpoint", folder):      # storage failures -> one line naming the path
    ...

gs:// goes through `etils.epath` with its fsspec backend (gcsfs), never TensorFlow's gfile; Orbax
writes arrays with tensorstore, and TFDS data files are read by array_record (google-cloud-cpp).
When STORAGE_EMULATOR_HOST (the standard variable of GCS emulators) is set, `setup()` points every
one of these libraries at that endpoint, without credentials (docs/storage.md).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import tempfile
import time
import uuid
from typing import BinaryIO, Callable, Iterator, Optional, Union

from etils import epath

from preflmr_jax.user_errors import (ConfigError, MissingPath, NoAccess, NotAFolder, NotWritable,
                                     Unreachable, UserError)

PathLike = Union[str, os.PathLike]

EMULATOR_VAR = "STORAGE_EMULATOR_HOST"

# Bucket names: 3-222 lowercase letters, digits, '-', '_' and '.' (GCS's rules, loosely).
_BUCKET = re.compile(r"[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]")
# The variables `setup()` derives from EMULATOR_VAR, and what it last derived them from.
_DERIVED = ("TENSORSTORE_GCS_HTTP_URL", "GOOGLE_AUTH_TOKEN_FOR_TESTING",
            "CLOUD_STORAGE_EMULATOR_ENDPOINT", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT")
_configured_for: Optional[str] = None


def setup() -> None:
  """Configures the storage libraries from the environment; cheap, called by `path()`.

  Re-reads STORAGE_EMULATOR_HOST on each call, so that a test fixture may set it after import.
  """
  global _configured_for
  # epath picks TensorFlow's gfile for gs:// whenever TF is installed; gfile has no emulator
  # support and TF is optional here. fsspec (gcsfs) follows STORAGE_EMULATOR_HOST by itself.
  os.environ["EPATH_USE_TF"] = "false"
  host = os.environ.get(EMULATOR_VAR) or None
  if host == _configured_for:
    return
  import fsspec  # pylint: disable=g-import-not-at-top
  gcs_options = fsspec.config.conf.setdefault("gcs", {})
  if host is None:  # the emulator was set before (tests): back to the real endpoint
    for name in _DERIVED:
      os.environ.pop(name, None)
    gcs_options.pop("token", None)
  else:
    url = host if "://" in host else f"http://{host}"
    os.environ.update({
        "TENSORSTORE_GCS_HTTP_URL": url,  # Orbax's arrays (tensorstore)
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",  # tensorstore: no credentials lookup
        "CLOUD_STORAGE_EMULATOR_ENDPOINT": url,  # array_record's reader (TFDS data files)
        # gcsfs would ask the storage-control gRPC API (absent in emulators) each bucket's
        # layout, waiting 60 s per bucket. Read when gcsfs is first imported (by fsspec, lazily).
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
    })
    gcs_options["token"] = "anon"  # gcsfs: no credentials lookup (metadata server, gcloud)
  _configured_for = host


def is_remote(p: PathLike) -> bool:
  """Whether `p` is in object storage (no folders, no append, no rename)."""
  return os.fspath(p).startswith("gs://")


def path(p: PathLike, what: str) -> epath.Path:
  """`p` (a user's local path or gs:// URL) as an epath.Path; a ValueError naming `what` for a
  gs:// URL without a bucket or another scheme (they would become local folders named `gs:`)."""
  setup()
  text = os.fspath(p)
  if not text:
    raise ConfigError(f"{what}: empty path")
  if text.startswith("gs:"):
    bucket = text[len("gs://"):].split("/", 1)[0] if text.startswith("gs://") else ""
    if not bucket:
      raise ConfigError(f"{what}={text}: a gs:// URL needs a bucket (gs://BUCKET/...)")
    if not _BUCKET.fullmatch(bucket):
      raise ConfigError(f"{what}={text}: {bucket!r} is not a valid bucket name")
  elif re.match(r"[A-Za-z][A-Za-z0-9+.-]*://", text):
    raise ConfigError(f"{what}={text}: only local paths and gs:// URLs are supported")
  else:
    text = os.path.expanduser(text)
  return epath.Path(text)


def bucket_of(p: PathLike) -> Optional[str]:
  """The bucket of a gs:// path; None for a local one."""
  return os.fspath(p)[len("gs://"):].split("/", 1)[0] if is_remote(p) else None


# ------------------------------------------------------------------------------------ errors

def _kind(e: BaseException) -> Optional[str]:
  """What a storage library's exception means: missing / denied / unreachable, or None."""
  module, text = type(e).__module__, str(e)
  code = getattr(e, "code", None)  # gcsfs HttpError, google.api_core errors
  # tensorstore (Orbax arrays) raises ValueErrors that start with an absl status code.
  if isinstance(e, FileNotFoundError) or code == 404 or text.startswith("NOT_FOUND"):
    return "missing"
  if (isinstance(e, PermissionError) or code in (401, 403) or module.startswith("google.auth")
      or text.startswith(("Forbidden", "PERMISSION_DENIED", "UNAUTHENTICATED"))):
    return "denied"
  if (isinstance(e, (ConnectionError, TimeoutError)) or module.startswith(("aiohttp", "requests"))
      or text.startswith(("UNAVAILABLE", "DEADLINE_EXCEEDED"))):
    return "unreachable"
  return None


def is_access_failure(e: BaseException) -> bool:
  """Denied or unreachable storage: a fault of access, not of the data, which a retry may cure."""
  return _kind(e) in ("denied", "unreachable")


def _raised_by_us(e: BaseException) -> bool:
  """Our own errors already name the path: only the libraries' are translated."""
  tb = e.__traceback__
  while tb is not None and tb.tb_next is not None:
    tb = tb.tb_next
  return tb is not None and tb.tb_frame.f_globals.get("__name__", "").startswith("preflmr_jax")


def _endpoint() -> str:
  return os.environ.get(EMULATOR_VAR) or "https://storage.googleapis.com"


def describe(e: BaseException, what: str, p: PathLike) -> Optional[OSError]:
  """A one-line error naming `what`=`p` for a failure `e` of object storage; None if `e` is not
  one (local OSErrors name their file already)."""
  kind = _kind(e) if is_remote(p) else None
  if kind is None:
    return None
  detail = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
  where = f"{what}={os.fspath(p)}"
  if kind == "missing":
    return MissingPath(f"{where}: not found ({detail})")
  if kind == "denied":
    hint = ("" if os.environ.get(EMULATOR_VAR) else "; outside an emulator, give this machine "
            "credentials (`gcloud auth application-default login` or a service account)")
    return NoAccess(f"{where}: access denied or no credentials ({detail}){hint}")
  return Unreachable(f"{where}: cannot reach the storage endpoint {_endpoint()} ({detail})")


@contextlib.contextmanager
def errors(what: str, p: PathLike) -> Iterator[None]:
  """Turns storage failures inside the block (a missing object, no credentials, an unreachable
  endpoint) into one-line errors naming `what`=`p`. Used at the project's boundaries (opening a
  workdir, restoring a checkpoint, reading an init folder), not around every call."""
  try:
    yield
  except Exception as e:  # pylint: disable=broad-except
    clear = None if _raised_by_us(e) else describe(e, what, p)
    if clear is None:
      raise
    raise clear from e


def ensure_dir(p: epath.Path, what: str) -> None:
  """A folder to write into: created locally; on gs:// (no folders) its bucket must exist."""
  with errors(what, p):
    if is_remote(p):
      bucket = bucket_of(p)
      if not epath.Path(f"gs://{bucket}").exists():
        raise MissingPath(f"{what}={p}: bucket gs://{bucket} does not exist")
    elif p.is_file():
      raise NotAFolder(f"{what}={p}: is a file, not a folder")
    else:
      try:
        p.mkdir(parents=True, exist_ok=True)
      except OSError as e:  # no permission, a read-only filesystem, a file on the way
        raise NotWritable(f"{what}={p}: cannot create it ({e.strerror}: {e.filename})") from None


def check_writable(p: epath.Path, what: str) -> None:
  """`ensure_dir`, then a probe file written and deleted there: an output that cannot be written
  fails before any work rather than after it."""
  probe = p / f".write_probe_{uuid.uuid4().hex}"
  try:
    ensure_dir(p, what)
    with errors(what, p):
      write_bytes(probe, b"")
      probe.unlink()
  except OSError as e:
    if is_remote(p) or isinstance(e, UserError):  # named the path already
      raise
    raise NotWritable(f"{what}={p}: cannot write there ({e})") from None


def must_exist(p: epath.Path, what: str, noun: str = "folder") -> None:
  """FileNotFoundError naming `what`=`p` when `p` (a `noun`) is absent, or its bucket is."""
  with errors(what, p):
    present = p.is_dir() if noun == "folder" else p.exists()
    if present:
      return
    bucket = bucket_of(p)
    if bucket and not epath.Path(f"gs://{bucket}").exists():
      raise MissingPath(f"{what}={p}: bucket gs://{bucket} does not exist")
  raise MissingPath(f"{what}={p}: no such {noun}")


# ------------------------------------------------------------------------------------ writes

def _upload(source: BinaryIO, dest: epath.Path) -> None:
  """Streams `source` into the object `dest`; on failure nothing is committed (an fsspec file
  uploads its buffer when closed or garbage-collected, even after an error)."""
  out = dest.open("wb")
  try:
    shutil.copyfileobj(source, out, 16 << 20)
  except BaseException:
    with contextlib.suppress(Exception):
      out.discard()  # gcsfs: cancels a resumable upload already started
    out.closed = True
    raise
  out.close()


def write_with(p: PathLike, write: Callable[[BinaryIO], None]) -> None:
  """`write(binary file)` to `p` so that no reader finds a half-written file under its name.

  Local: a temporary file in the same folder, renamed over `p` (removed on failure). gs://: one
  object upload of the finished content (an object appears whole or not at all; a file object
  open on gs:// would upload its buffer even when `write` fails).
  """
  p = epath.Path(p)
  if is_remote(p):
    with tempfile.TemporaryFile() as tmp:
      write(tmp)
      tmp.seek(0)
      _upload(tmp, p)
    return
  p.parent.mkdir(parents=True, exist_ok=True)
  tmp = os.path.join(p.parent, f".{p.name}.tmp{uuid.uuid4().hex}")
  # Mode 0666 less the umask in force now, as open() creates files (mkstemp's are 0600).
  fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
  try:
    with os.fdopen(fd, "wb") as f:
      write(f)
    os.replace(tmp, p)
  except BaseException as e:
    with contextlib.suppress(FileNotFoundError):
      os.unlink(tmp)
    if isinstance(e, IsADirectoryError):
      raise NotWritable(f"{p}: is a folder, not a file; cannot write a file in its place") from None
    raise


def write_bytes(p: PathLike, data: bytes) -> None:
  """`data` to `p`, never half-written (`write_with`)."""
  if is_remote(p):
    _upload(io.BytesIO(data), epath.Path(p))
  else:
    write_with(p, lambda f: f.write(data))


def write_text(p: PathLike, text: str) -> None:
  write_bytes(p, text.encode("utf-8"))


class Appender:
  """A file that only grows (a log). Local files are appended to, a write at a time. Object
  storage has no append: the content is kept in memory and the whole object rewritten, at most
  every `min_interval_s` seconds (GCS takes about one write per second to an object) and at
  `flush()` / `close()`; a crash loses what was appended since the last rewrite.

  The file starts as `initial` (written at once, replacing any earlier content).
  """

  def __init__(self, p: PathLike, initial: bytes = b"", min_interval_s: float = 5.0):
    self.path = epath.Path(p)
    self._remote = is_remote(self.path)
    self._content = bytearray(initial)
    self._dirty = False
    self._min_interval_s = min_interval_s
    write_bytes(self.path, initial)
    self._written_at = time.monotonic()

  def append(self, data: bytes) -> None:
    if not self._remote:
      with self.path.open("ab") as f:
        f.write(data)
      return
    self._content += data
    self._dirty = True
    if time.monotonic() - self._written_at >= self._min_interval_s:
      self.flush()

  def flush(self) -> None:
    if self._dirty:
      write_bytes(self.path, bytes(self._content))
      self._dirty = False
      self._written_at = time.monotonic()

  def close(self) -> None:
    self.flush()


# ------------------------------------------------------------------------- local copies

def _copy_down(src: epath.Path, dest: str) -> None:
  if src.is_dir():
    os.makedirs(dest, exist_ok=True)
    for child in src.iterdir():
      _copy_down(child, os.path.join(dest, child.name))
  else:
    with src.open("rb") as r, open(dest, "wb") as w:
      shutil.copyfileobj(r, w, 16 << 20)


@contextlib.contextmanager
def local_copy(p: PathLike) -> Iterator[str]:
  """A local path holding `p` (a file or a folder), for libraries that read only local files
  (transformers' tokenizers, safetensors): `p` itself when local, else a temporary copy."""
  p = epath.Path(p)
  if not is_remote(p):
    yield os.fspath(p)
    return
  with tempfile.TemporaryDirectory(prefix="preflmr_jax_") as tmp:
    dest = os.path.join(tmp, p.name)
    _copy_down(p, dest)
    yield dest


def upload_dir(local: str, dest: epath.Path, last: tuple[str, ...] = ()) -> None:
  """Copies the files of the local folder `local` under `dest` (gs://), the relative paths in
  `last` after all others: a reader that looks for them (a marker) finds the folder complete."""
  files = sorted(os.path.relpath(os.path.join(root, name), local)
                 for root, _, names in os.walk(local) for name in names)
  for rel in sorted(files, key=lambda r: r in last):
    with open(os.path.join(local, rel), "rb") as r:
      _upload(r, dest / rel)


setup()
