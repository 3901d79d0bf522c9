"""Fault injection on the trainer's side (docs/reliability.md): damaged and half-written checkpoint
steps, updates that overflow, preemption during set-up and from the command line, and config values
that used to pass validation and fail late. Each test makes the fault happen and checks that nothing
is lost: the run resumes from the newest intact step and ends where an undisturbed run ends.
Data and evaluation faults: tests/test_faults_data.py."""

import glob
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from preflmr_jax import checkpointing, data, exit_codes, preemption, train
from preflmr_jax import workdir as layout
from preflmr_jax.checkpointing import Checkpointer, restore_params
from preflmr_jax.models import model_config as mc
from preflmr_jax.models import preflmr

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A restore that fails on a damaged file ends Orbax's asyncio loop while TensorStore still has reads
# in flight; as they finish, their callbacks meet the closed loop (nothing is lost: the restore
# has already raised). Any other exception in a thread still warns.
pytestmark = pytest.mark.filterwarnings(
    r"ignore:(?s)Exception ignored in.*Event loop is closed"
    ":pytest.PytestUnraisableExceptionWarning")


def _params(workdir, config, step=None):
  abstract = preflmr.abstract_params(mc.PreFLMRConfig.from_dict(config.model))
  return restore_params(str(workdir), abstract, step=step)


# ------------------------------------------------------------------ damaged checkpoint steps

_TREE = {"dense": {"kernel": np.arange(800, dtype=np.float32).reshape(8, 100),
                   "bias": np.ones(8, np.float32)}, "count": np.int32(3)}


def _abstract(tree):
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=one), tree)


def _largest_array_file(step_dir):
  return max(glob.glob(f"{step_dir}/params/**/d/*", recursive=True), key=os.path.getsize)


def _truncate(step_dir):
  """Halves every data file of the params item (Orbax's data files can include superseded ones
  that a restore never reads, so damaging only one may damage nothing)."""
  for path in glob.glob(f"{step_dir}/params/**/d/*", recursive=True):
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) // 2)


def _flip_a_bit(step_dir):
  path = _largest_array_file(step_dir)
  raw = bytearray(open(path, "rb").read())
  raw[len(raw) // 2] ^= 0x04
  open(path, "wb").write(bytes(raw))


def _garbage_metadata(step_dir):
  (step_dir / "params" / "_METADATA").write_text("{not json")


def _missing_item(step_dir):
  shutil.rmtree(step_dir / "opt_state")


def _garbage_meta_item(step_dir):
  (step_dir / "meta" / "metadata").write_text("{not json")


DAMAGE = [_truncate, _flip_a_bit, _garbage_metadata, _missing_item, _garbage_meta_item]


@pytest.mark.parametrize("damage", DAMAGE, ids=lambda f: f.__name__.strip("_"))
def test_a_damaged_latest_step_is_skipped_for_the_one_before(tmp_path, damage, caplog):
  newer = jax.tree.map(lambda x: x + 1, _TREE)
  with Checkpointer(tmp_path) as ckpt:
    ckpt.save(1, _TREE, _TREE, {"step": 1})
    ckpt.save(2, newer, newer, {"step": 2})
  damage(tmp_path / "2")
  with Checkpointer(tmp_path) as ckpt:
    assert ckpt.all_steps() == [1, 2]  # complete, but damaged
    step, params, opt_state, meta = ckpt.restore_latest(_abstract(_TREE), _abstract(_TREE))
    assert step == 1 and meta == {"step": 1}
    jax.tree.map(np.testing.assert_array_equal, params, _TREE)
    assert f"checkpoint step 2 in {tmp_path} does not restore" in caplog.text
    # The run goes on from step 1 and reaches step 2 again: written anew over the damaged one.
    assert ckpt.save(2, newer, newer, {"step": 2})
  with Checkpointer(tmp_path) as ckpt:
    step, params, _, _ = ckpt.restore_latest(_abstract(_TREE), _abstract(_TREE))
    assert step == 2
    jax.tree.map(np.testing.assert_array_equal, params, newer)
  if damage is not _missing_item:  # params alone: the eval binary names the step, never falls back
    damage(tmp_path / "2")
    with pytest.raises(checkpointing.CheckpointDamagedError, match=f"checkpoint {tmp_path}/2 "):
      restore_params(str(tmp_path), _abstract(_TREE))


@pytest.mark.parametrize("file,content,why", [
    ("params/_METADATA", "", "the array metadata in {step}/params does not read"),
    ("params/_METADATA", "[]", "the array metadata in {step}/params does not read"),
    ("meta/metadata", "", "{step}/meta/metadata is not JSON"),
    ("meta/metadata", "[1]", "{step}/meta/metadata holds a list, not a JSON object"),
])
def test_a_damaged_metadata_file_is_named(tmp_path, file, content, why, caplog):
  """Orbax's own errors for these do not name the file."""
  with Checkpointer(tmp_path) as ckpt:
    ckpt.save(1, _TREE, _TREE, {"step": 1})
    ckpt.save(2, _TREE, _TREE, {"step": 2})
  (tmp_path / "2" / file).write_text(content)
  with Checkpointer(tmp_path) as ckpt:
    assert ckpt.restore_latest(_abstract(_TREE), _abstract(_TREE))[0] == 1
  assert why.format(step=tmp_path / "2") in caplog.text


def test_no_step_restores_names_each_step_and_why(tmp_path):
  with Checkpointer(tmp_path) as ckpt:
    ckpt.save(1, _TREE, _TREE, {"step": 1})
    ckpt.save(2, _TREE, _TREE, {"step": 2})
  _flip_a_bit(tmp_path / "1")
  _truncate(tmp_path / "2")
  with Checkpointer(tmp_path) as ckpt:
    with pytest.raises(checkpointing.CheckpointDamagedError,
                       match=r"step 2: ValueError: OUT_OF_RANGE.*; step 1: CheckpointCorruptError"):
      ckpt.restore_latest(_abstract(_TREE), _abstract(_TREE))


def test_a_config_mismatch_is_not_taken_for_damage(tmp_path):
  with Checkpointer(tmp_path) as ckpt:
    ckpt.save(1, _TREE, _TREE, {"step": 1})
    ckpt.save(2, _TREE, _TREE, {"step": 2})
  other = {**_TREE, "count": np.zeros(2, np.int32)}
  with Checkpointer(tmp_path) as ckpt:
    with pytest.raises(checkpointing.CheckpointMismatchError, match="params/count"):
      ckpt.restore_latest(_abstract(other), _abstract(other))
    assert ckpt.all_steps() == [1, 2]


def test_non_finite_parameters_are_not_evaluated(tmp_path):
  bad = {**_TREE, "dense": {**_TREE["dense"], "bias": np.full(8, np.nan, np.float32)}}
  with Checkpointer(tmp_path) as ckpt:
    ckpt.save(1, bad, bad, {"step": 1})
  with pytest.raises(FloatingPointError, match="non-finite parameters .first: dense/bias"):
    restore_params(str(tmp_path), _abstract(_TREE))


def test_keep_zero_checkpoints_is_refused(tmp_path):
  with pytest.raises(ValueError, match="max_to_keep=0"):
    Checkpointer(tmp_path, max_to_keep=0)


@pytest.mark.slow
def test_resume_walks_back_past_a_half_written_and_a_damaged_step(trained_workdir, tmp_path, caplog,
                                                                  short_run):
  """Step 6 lost its commit file (an interrupted save on object storage), step 4 an array file:
  the run resumes from step 2, writes 4 and 6 again and ends exactly where the straight run did."""
  workdir = tmp_path / "w"
  shutil.copytree(trained_workdir, workdir)
  steps = workdir / "checkpoints"
  (steps / "6" / checkpointing.COMMIT_FILE).unlink()
  _truncate(steps / "4")
  train.train_and_evaluate(short_run(num_train_steps=6, checkpoint_every_steps=2), str(workdir))
  assert "resumed from step 2, not 4" in caplog.text
  with Checkpointer(steps) as ckpt:
    assert ckpt.all_steps() == [2, 4, 6]
  assert [m["step"] for m in layout.read_metrics(workdir)] == [1, 2, 3, 4, 5, 6]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-6),
               _params(workdir, short_run()), _params(trained_workdir, short_run()))


# ------------------------------------------------------------------------ non-finite updates

@pytest.mark.slow
def test_an_overflowing_update_is_never_applied_nor_saved(tmp_path, short_run):
  """A learning rate finite in float32 whose update is not (lr * (1 + decay * p) overflows): the
  loss and gradient of step 1 are finite, its result is not."""
  overflow = {"optimizer.learning_rate": 3e38, "optimizer.mapping_learning_rate": 3e38,
              "optimizer.weight_decay": 10.0}
  config = short_run(num_train_steps=2, checkpoint_every_steps=1, **overflow)
  with pytest.raises(FloatingPointError, match="non-finite loss, gradient or update at step 1"):
    train.train_and_evaluate(config, str(tmp_path / "stop"))
  assert not glob.glob(str(tmp_path / "stop" / "checkpoints" / "[0-9]*"))
  config = short_run(num_train_steps=3, checkpoint_every_steps=1, nan_policy="skip",
                   max_nonfinite_steps=1, **overflow)
  with pytest.raises(FloatingPointError, match="2 non-finite steps skipped .first: step 1., more "
                     "than config.max_nonfinite_steps=1"):
    train.train_and_evaluate(config, str(tmp_path / "skip"))
  params = _params(tmp_path / "skip", config)  # step 1, skipped: the initial parameters, all finite
  assert checkpointing.first_nonfinite(params) is None


# ---------------------------------------------------------------------------------- preemption

class _SigtermWhileBuilding:
  """make_train_iterator that gets SIGTERM while it builds the pipeline (set-up)."""

  def __init__(self, make):
    self.make = make

  def __call__(self, *args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)
    return self.make(*args, **kwargs)


def test_sigterm_during_set_up_stops_before_the_first_step(tmp_path, monkeypatch, short_run):
  monkeypatch.setattr(data, "make_train_iterator", _SigtermWhileBuilding(data.make_train_iterator))
  calls = []
  setup = train.setup_train_step
  monkeypatch.setattr(train, "setup_train_step", lambda *a: calls.append(1) or setup(*a))
  with pytest.raises(preemption.Preempted, match="before the first step"):
    train.train_and_evaluate(short_run(num_train_steps=4), str(tmp_path))
  assert calls and not (tmp_path / "metrics.jsonl").exists()
  assert not glob.glob(str(tmp_path / "checkpoints" / "[0-9]*"))


@pytest.mark.slow
def test_main_exits_143_on_sigterm_and_a_rerun_finishes(tmp_path, one_device_env):
  cmd = [sys.executable, "-m", "preflmr_jax.main", "--config", "configs/tiny.py", "--workdir",
         str(tmp_path), "--config.num_train_steps=100000", "--config.checkpoint_every_steps=100000",
         "--config.optimizer.warmup_steps=0"]
  proc = subprocess.Popen(cmd, cwd=ROOT, env=one_device_env, stderr=subprocess.PIPE, text=True)
  deadline = time.monotonic() + 600
  while not (tmp_path / "run.json").exists():  # set-up under way
    assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-3000:]
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  _, stderr = proc.communicate(timeout=600)
  assert proc.returncode == exit_codes.PREEMPTED, stderr[-3000:]
  assert "preempted" in stderr
  saved = glob.glob(str(tmp_path / "checkpoints" / "[0-9]*"))
  finish = [c for c in cmd if "num_train_steps" not in c] + [
      f"--config.num_train_steps={max([int(os.path.basename(s)) for s in saved] + [0]) + 2}"]
  rerun = subprocess.run(finish, cwd=ROOT, env=one_device_env, capture_output=True, text=True,
                         timeout=600)
  assert rerun.returncode == 0, rerun.stderr[-3000:]


@pytest.mark.slow
def test_ctrl_c_saves_the_step_and_exits_130(tmp_path, one_device_env):
  """Ctrl-C reaches the trainer and its grain workers (one process group): the step is saved, no
  worker prints a traceback, and no batch's shared memory outlives the run."""
  cmd = [sys.executable, "-m", "preflmr_jax.main", "--config", "configs/tiny.py", "--workdir",
         str(tmp_path), "--config.num_train_steps=100000", "--config.checkpoint_every_steps=100000",
         "--config.data.num_workers=2", "--config.optimizer.warmup_steps=0"]
  proc = subprocess.Popen(cmd, cwd=ROOT, env=one_device_env, stderr=subprocess.PIPE, text=True,
                          start_new_session=True)
  deadline = time.monotonic() + 600
  metrics = tmp_path / "metrics.jsonl"
  while not (metrics.exists() and metrics.stat().st_size):  # training, past its first log step
    assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-3000:]
    time.sleep(0.2)
  os.killpg(proc.pid, signal.SIGINT)
  _, stderr = proc.communicate(timeout=600)
  assert proc.returncode == exit_codes.INTERRUPTED, stderr[-3000:]
  [saved] = glob.glob(str(tmp_path / "checkpoints" / "[0-9]*"))
  assert f"interrupted: saved step {os.path.basename(saved)}, rerun to resume" in stderr
  assert "Traceback" not in stderr, stderr[-3000:]
  assert "leaked shared_memory" not in stderr, stderr[-3000:]
  assert stderr.strip().splitlines()[-1].split(" ", 1)[1].startswith("full log: "), stderr[-3000:]


# ------------------------------------------------------------------ config values that failed late

@pytest.mark.parametrize("overrides,message", [
    ({"keep_checkpoints": 0}, "config.keep_checkpoints=0: must be an integer >= 1"),
    ({"keep_checkpoints": -1}, "config.keep_checkpoints=-1"),
    ({"seed": -1}, r"config.seed=-1: must be an integer in \[0, 2\*\*32\)"),
    ({"score_chunk_size": -1}, "config.score_chunk_size=-1"),
    ({"max_nonfinite_steps": -1}, "config.max_nonfinite_steps=-1"),
    ({"batch_size": 2**36}, "config.batch_size=68719476736: one process's share of a batch takes"),
    ({"model.text.hidden_size": 0}, "config.model.text.hidden_size: must be a positive integer"),
    ({"model.doc_maxlen": 0}, "config.model.doc_maxlen: must be a positive integer"),
    ({"optimizer.learning_rate": float("inf")}, "config.optimizer.learning_rate=inf"),
    ({"optimizer.weight_decay": 1e39}, "config.optimizer.weight_decay=1e.39: must be >= 0 and finite"),
    ({"init_from": "/nonexistent/preflmr"}, "config.init_from=/nonexistent/preflmr: no such folder"),
    ({"init_params_from": "/nonexistent/run"}, "config.init_params_from=/nonexistent/run"),
])
def test_bad_values_fail_before_compiling_naming_the_key(tmp_path, monkeypatch, overrides, message,
                                                         short_run):
  monkeypatch.setattr(train, "setup_train_step", lambda *a: pytest.fail("got to set-up"))
  with pytest.raises((ValueError, FileNotFoundError), match=message):
    train.train_and_evaluate(short_run(**overrides), str(tmp_path))


def test_init_from_a_folder_that_is_not_published_is_refused_up_front(tmp_path, monkeypatch,
                                                                      short_run):
  monkeypatch.setattr(train, "setup_train_step", lambda *a: pytest.fail("got to set-up"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="not a published PreFLMR folder"):
    train.train_and_evaluate(short_run(init_from=str(tmp_path / "empty")), str(tmp_path / "w"))
  (tmp_path / "empty" / "config.json").write_text("{}")
  with pytest.raises(FileNotFoundError, match="config.init_from=.*empty: .*empty: no model.safetensors"):
    train.train_and_evaluate(short_run(init_from=str(tmp_path / "empty")), str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()
