"""storage.py: path validation, writes that are never half-done (local and gs://), logs on object
storage, one-line errors naming the path; against a real GCS emulator (tests/gcs.py)."""

import os
import stat

import pytest
from etils import epath

from preflmr_jax import storage


@pytest.mark.parametrize("bad,message", [
    ("gs://", "needs a bucket"), ("gs:///x", "needs a bucket"), ("gs:x", "needs a bucket"),
    ("gs://Bad!Bucket/x", "not a valid bucket name"), ("s3://b/x", "only local paths and gs://"),
    ("", "empty path"),
])
def test_bad_paths_are_one_line_errors_naming_the_flag(bad, message, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  with pytest.raises(ValueError, match=message) as e:
    storage.path(bad, "--workdir")
  assert str(e.value).startswith("--workdir") and bad in str(e.value)
  assert "\n" not in str(e.value)
  assert os.listdir(tmp_path) == []  # no local "gs:" folder


def test_paths_local_and_gs():
  assert storage.path("gs://bucket-1/run", "x") == epath.Path("gs://bucket-1/run")
  assert os.fspath(storage.path("gs://bucket-1/run", "x") / "a") == "gs://bucket-1/run/a"
  assert os.fspath(storage.path("~/w", "x")) == os.path.expanduser("~/w")
  assert storage.is_remote("gs://b/x") and not storage.is_remote("/tmp/gs/x")


def test_local_writes_are_atomic_with_the_usual_mode(tmp_path):
  target = tmp_path / "sub" / "results.json"
  storage.write_text(target, "one")
  assert target.read_text() == "one"
  umask = os.umask(0)
  os.umask(umask)
  assert stat.S_IMODE(os.stat(target).st_mode) == 0o666 & ~umask  # not mkstemp's 0600

  def fails(f):
    f.write(b"half")
    raise RuntimeError("disk full")
  with pytest.raises(RuntimeError):
    storage.write_with(target, fails)
  assert target.read_text() == "one"  # the old content, no temporary file left
  assert os.listdir(target.parent) == ["results.json"]

  (tmp_path / "sub" / "run.json").mkdir()  # a folder where a file goes: one line, nothing left
  with pytest.raises(storage.NotWritable, match=r"run\.json: is a folder, not a file"):
    storage.write_text(tmp_path / "sub" / "run.json", "{}")
  assert sorted(os.listdir(target.parent)) == ["results.json", "run.json"]


def test_gs_writes_are_one_upload_and_failures_leave_nothing(gcs, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  base = storage.path(f"gs://{gcs.bucket}/run", "--output")
  storage.ensure_dir(base, "--output")
  storage.write_text(base / "results.json", '{"a": 1}')
  storage.write_with(base / "big.bin", lambda f: f.write(b"x" * (6 << 20)))  # resumable upload
  assert gcs.read("run/results.json") == b'{"a": 1}'
  assert len(gcs.read("run/big.bin")) == 6 << 20

  def fails(f):
    f.write(b"half")
    raise RuntimeError("interrupted")
  with pytest.raises(RuntimeError):
    storage.write_with(base / "results.json", fails)
  with pytest.raises(RuntimeError):
    storage.write_with(base / "new.json", fails)
  assert gcs.names("run/") == ["run/big.bin", "run/results.json"]
  assert gcs.read("run/results.json") == b'{"a": 1}'
  assert os.listdir(tmp_path) == []  # nothing local, no "gs:" folder


@pytest.mark.parametrize("remote", [False, True], ids=["local", "gs"])
def test_appender_grows_and_starts_from_initial(remote, tmp_path, request):
  if remote:
    emulator = request.getfixturevalue("gcs")
    target = storage.path(f"gs://{emulator.bucket}/log.jsonl", "log")
  else:
    target = epath.Path(tmp_path / "log.jsonl")
  storage.write_text(target, "old\n")
  log = storage.Appender(target, b"kept\n", min_interval_s=3600)
  log.append(b"a\n")
  log.append(b"b\n")
  assert target.read_text() == ("kept\n" if remote else "kept\na\nb\n")  # gs: at flush only
  log.close()
  assert target.read_text() == "kept\na\nb\n"


def test_missing_objects_and_buckets_are_one_line_errors(gcs):
  missing = storage.path(f"gs://{gcs.bucket}/nothing", "--checkpoint")
  with pytest.raises(FileNotFoundError, match=f"--checkpoint=gs://{gcs.bucket}/nothing: no such"):
    storage.must_exist(missing, "--checkpoint")
  with pytest.raises(FileNotFoundError, match=f"--checkpoint=gs://{gcs.bucket}/nothing: not found"):
    with storage.errors("--checkpoint", missing):
      (missing / "config.json").read_text()
  nobucket = storage.path(f"gs://{gcs.bucket}-absent/run", "--workdir")
  with pytest.raises(FileNotFoundError, match=r"--workdir=gs://\S+-absent/run: bucket gs://\S+ "
                     "does not exist"):
    storage.ensure_dir(nobucket, "--workdir")
  with pytest.raises(FileNotFoundError, match="bucket .* does not exist"):
    storage.must_exist(nobucket, "--checkpoint")


def test_library_failures_are_translated_and_ours_kept():
  from gcsfs.retry import HttpError  # pylint: disable=g-import-not-at-top
  where = "gs://b/run"

  def raise_(e):
    raise e
  cases = [(HttpError({"code": 401, "message": "Anonymous caller has no access"}), PermissionError,
            "access denied or no credentials"),
           (ValueError("UNAVAILABLE: connection refused\nmore"), ConnectionError, "cannot reach"),
           (ValueError("NOT_FOUND: Error opening"), FileNotFoundError, "not found")]
  for error, kind, message in cases:
    with pytest.raises(kind, match=f"^--workdir={where}: {message}") as e:
      with storage.errors("--workdir", where):
        raise_(error)
    assert "\n" not in str(e.value)
  with pytest.raises(ValueError, match="^shape mismatch$"):  # not a storage failure: untouched
    with storage.errors("--workdir", where):
      raise_(ValueError("shape mismatch"))


def test_local_copy_and_upload_of_a_folder(gcs, tmp_path):
  folder = storage.path(f"gs://{gcs.bucket}/tok", "tokenizer")
  storage.write_text(folder / "vocab.txt", "a\nb\n")
  storage.write_text(folder / "sub" / "x.json", "{}")
  with storage.local_copy(folder) as local:
    assert sorted(os.listdir(local)) == ["sub", "vocab.txt"]
    assert open(os.path.join(local, "vocab.txt")).read() == "a\nb\n"
  assert not os.path.exists(local)
  with storage.local_copy(tmp_path) as same:
    assert same == str(tmp_path)  # local paths are not copied
  (tmp_path / "d").mkdir()
  (tmp_path / "d" / "w.bin").write_bytes(b"w")
  (tmp_path / "config.json").write_text("{}")
  storage.upload_dir(str(tmp_path), storage.path(f"gs://{gcs.bucket}/up", "x"),
                     last=("config.json",))
  assert gcs.names("up/") == ["up/config.json", "up/d/w.bin"]
