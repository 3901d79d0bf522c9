"""Test setup and the fixtures the test files share.

Every test sees 8 simulated CPU devices (set before JAX initialises). pytest-xdist runs the tests
in worker processes (pyproject.toml's addopts: `-n auto`, at most 4; `-n 0` runs them in this one).
Each worker has a temporary cache (never the user's ~/.cache) holding the SAMPLE M2KR task that the
tiny config trains on, written and built once; XLA's compilation cache is shared by the workers and
their subprocesses, so that the many tests compiling the same tiny train step compile it once.
TMPDIR points into the controller's temporary folder too: nothing is left in the system's.

Fixtures: `tiny_config` / `short_run` / `comparable_step` (configs), `sample_data_dir`, `trained_workdir` (a tiny run,
trained once per session), `one_device_env` and `cli` (subprocesses), `gcs_server` / `gcs` (a GCS
emulator and a fresh bucket).
"""

import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import uuid

# The tests compile far more than they run (a few steps each of many configs): LLVM at -O0 halves
# XLA's CPU compile time for steps about twice as slow. No fast math either way, so the numbers are
# the same. A long run (the learning check) sets XLA_FLAGS="" in its subprocess.
_XLA_FLAGS = "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
if _XLA_FLAGS not in os.environ.get("XLA_FLAGS", ""):  # xdist's workers inherit them
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _XLA_FLAGS).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
_CACHE = tempfile.TemporaryDirectory(prefix="preflmr_jax_test_cache_")
os.environ["XDG_CACHE_HOME"] = _CACHE.name  # subprocesses (python -m ...) inherit it
if "PYTEST_XDIST_WORKER" not in os.environ:  # pytest-xdist's workers share the controller's
  os.environ["JAX_COMPILATION_CACHE_DIR"] = os.path.join(_CACHE.name, "jax_compilation_cache")
  # What the binaries and libraries leave in the temporary folder (log files, TFDS's scratch
  # folders) goes where the session removes it.
  os.environ["TMPDIR"] = os.path.join(_CACHE.name, "tmp")
  os.mkdir(os.environ["TMPDIR"])
  tempfile.tempdir = None  # gettempdir() reads TMPDIR again
  # A size limit turns on JAX's file lock around the cache: workers write it concurrently.
  os.environ["JAX_COMPILATION_CACHE_MAX_SIZE"] = str(16 << 30)

import filelock  # noqa: E402
import jax  # noqa: E402  (must come after XLA_FLAGS)
import pytest  # noqa: E402

from preflmr_jax import config_files, storage, train  # noqa: E402
from preflmr_jax.data import pipeline  # noqa: E402
from preflmr_jax.testing import gcs_emulator  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = "configs/tiny.py"


@pytest.fixture(scope="session", autouse=True)
def _eight_devices():
  assert jax.device_count() == 8, jax.devices()


# ------------------------------------------------------------------------------------ configs

def _load(spec=TINY, **overrides):
  return config_files.load_config(spec, overrides)


def _short(spec=TINY, **overrides):
  return _load(spec, **{"optimizer.warmup_steps": 0, "optimizer.schedule": "constant",
                        "log_every_steps": 1, **overrides})


@pytest.fixture(scope="session")
def tiny_config():
  """tiny_config(spec="configs/tiny.py", **{"dotted.key": value}) -> that config, overridden."""
  return _load


# The tiny config of the sharded-step comparisons (test_train) and of the compile-only plans
# (test_plan), which compile the same programs and so share them through the compilation cache.
# Adam's first steps are ~lr * sign(g): rounding noise in a near-zero gradient would flip whole
# updates. A large eps makes the update ~linear in g, so that comparisons are well conditioned.
COMPARABLE_STEP = {"optimizer.learning_rate": 1e-2, "optimizer.mapping_learning_rate": 1e-2,
                   "optimizer.eps": 1.0, "optimizer.warmup_steps": 0,
                   "optimizer.schedule": "constant"}


@pytest.fixture(scope="session")
def comparable_step():
  """comparable_step(**{"dotted.key": value}) -> the tiny config with COMPARABLE_STEP, overridden."""
  return lambda **overrides: _load(**{**COMPARABLE_STEP, **overrides})


@pytest.fixture(scope="session")
def short_run():
  """Like `tiny_config`, for a run of a few steps: no warmup (it would outlast the run), a
  constant learning rate (a decaying one depends on the run's length), metrics every step."""
  return _short


# --------------------------------------------------------------------------- data and a run

@pytest.fixture(scope="session")
def sample_data_dir():
  """The SAMPLE task's TFDS builds (in the session cache)."""
  return pipeline.resolve_data_dir(_load())


@pytest.fixture(scope="session")
def trained_workdir(tmp_path_factory):
  """A tiny run of 6 steps with checkpoints at 2, 4 and 6 (`short_run`), trained once for all
  workers. Shared: copy it before changing anything in it."""
  # The workers' base folders share a parent in the session's TMPDIR; the lock makes one train.
  path = tmp_path_factory.getbasetemp().parent / "trained_workdir"
  with filelock.FileLock(f"{path}.lock"):
    done = path.with_suffix(".done")
    if not done.exists():
      shutil.rmtree(path, ignore_errors=True)
      train.train_and_evaluate(_short(num_train_steps=6, checkpoint_every_steps=2), str(path))
      done.touch()
  return path


# ------------------------------------------------------------------------------ subprocesses

@pytest.fixture(scope="session")
def one_device_env():
  """The environment for a subprocess that runs on one CPU device: end-to-end runs compile quicker
  than on the 8 simulated ones."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = env["XLA_FLAGS"].replace("--xla_force_host_platform_device_count=8", "")
  return env


@pytest.fixture(scope="session")
def cli(one_device_env):
  """cli("preflmr_jax.main", "--config=...", ..., env=None, cwd=ROOT, timeout=900) ->
  CompletedProcess of `python -m <module> <args>` on one device (text, output captured); `env`
  adds to or overrides the variables."""
  def run(module, *args, env=None, cwd=ROOT, timeout=900):
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=cwd,
                          env={**one_device_env, **(env or {})}, capture_output=True, text=True,
                          timeout=timeout, check=False)
  return run


# ------------------------------------------------------------------------------------- GCS

@pytest.fixture(scope="session")
def gcs_server():
  """The URL of a GCS emulator that runs for the whole session."""
  with gcs_emulator.serve() as url:
    yield url


@pytest.fixture
def gcs(gcs_server):
  """A fresh bucket on the emulator; STORAGE_EMULATOR_HOST points at it for this test (and the
  subprocesses it starts)."""
  before = os.environ.get(storage.EMULATOR_VAR)
  os.environ[storage.EMULATOR_VAR] = gcs_server
  storage.setup()
  bucket = gcs_emulator.Bucket(gcs_server, f"test-{uuid.uuid4().hex[:12]}")
  bucket.create()
  try:
    yield bucket
  finally:
    if before is None:
      os.environ.pop(storage.EMULATOR_VAR, None)
    else:
      os.environ[storage.EMULATOR_VAR] = before
    storage.setup()
