"""Orbax checkpoints for training runs: async saves, keep-N, resume, preemption.

  ckpt = Checkpointer(workdir.checkpoints_dir(path), max_to_keep=3, save_interval_steps=1000)
  if (step := ckpt.latest_step()) is not None:
    params, opt_state, meta = ckpt.restore(step, abstract_params, abstract_opt_state)
  ...
  ckpt.save(step, params, opt_state, {"step": step, "rng": [...], "data": it.get_state()})
  ckpt.close()                                       # waits for the last async save

  params = restore_params(path, abstract_params)  # eval: never reads opt_state

Layout: `<workdir>/checkpoints/<step>/{params,opt_state,meta}` (workdir.py), three separate Orbax
items so that parameters can be restored alone. Arrays come back with the shardings of the abstract
targets, so a run can resume on a different mesh than it saved from. Directories are local paths or
gs:// URLs (storage.py).
"""

from __future__ import annotations

import json
import signal
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from preflmr_jax import storage, workdir

ITEMS = ("params", "opt_state", "meta")

# Orbax 0.12 writes a step into `<step>.orbax-checkpoint-tmp/` and renames it when done (local
# disks), or writes `<step>/` in place and adds this file last (GCS). It writes the file in both
# modes, but on local disks treats any bare `<step>/` as complete; demanding the file as well
# means a half-copied or half-written folder is never restored, whatever the filesystem.
COMMIT_FILE = ocp.path.atomicity.COMMIT_SUCCESS_FILE


def _is_complete(step_dir: epath.Path) -> bool:
  return step_dir.name.isdigit() and (step_dir / COMMIT_FILE).exists()


def _complete_steps(directory: epath.Path) -> list[int]:
  if not directory.is_dir():
    return []
  return sorted(int(p.name) for p in directory.iterdir() if _is_complete(p))


def _latest_complete(directory: epath.Path) -> int | None:
  steps = _complete_steps(directory)
  # A save may commit between two hosts' listings: all hosts take process 0's answer.
  latest = int(multihost_utils.broadcast_one_to_all(np.int32(steps[-1] if steps else -1)))
  return None if latest < 0 else latest


def _key_name(path) -> str:
  return jax.tree_util.keystr(path, simple=True, separator="/")


def _check_against_checkpoint(item_dir: epath.Path, abstract, item: str) -> None:
  """Raises a ValueError naming the first array whose path or shape differs from the checkpoint.

  Orbax's own error gives the two shapes but not which array they belong to.
  """
  stored_tree = ocp.PyTreeCheckpointHandler().metadata(item_dir).tree
  # Keys are compared by name: Orbax stores a NamedTuple (optax state) as a dict.
  leaves = jax.tree_util.tree_leaves_with_path
  stored = {_key_name(p): tuple(m.shape) for p, m in leaves(stored_tree)}
  wanted = {_key_name(p): tuple(np.shape(x)) for p, x in leaves(abstract)}
  if missing := sorted(wanted.keys() - stored.keys()):
    raise ValueError(f"{item}/{missing[0]} is not in the checkpoint "
                     f"({len(missing)} missing; checkpoint {item_dir})")
  if extra := sorted(stored.keys() - wanted.keys()):
    raise ValueError(f"{item}/{extra[0]} is in the checkpoint but not in the model "
                     f"({len(extra)} such; checkpoint {item_dir})")
  for name, shape in wanted.items():
    if stored[name] != shape:
      raise ValueError(f"{item}/{name}: the checkpoint {item_dir} has shape {stored[name]}, "
                       f"the model expects {shape}")


class Checkpointer:
  """Saves and restores (params, opt_state, meta) per step with an Orbax CheckpointManager."""

  def __init__(self, directory: storage.PathLike, *, max_to_keep: int = 3,
               save_interval_steps: int = 1, async_save: bool = True):
    self.directory = storage.path(directory, "checkpoint directory")
    self.save_interval_steps = save_interval_steps
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, save_interval_steps=save_interval_steps,
        enable_async_checkpointing=async_save, create=True)
    self._manager = ocp.CheckpointManager(self.directory, item_names=ITEMS, options=options)

  def all_steps(self) -> list[int]:
    """Complete steps on disk, oldest first (saves still in flight are not listed)."""
    return _complete_steps(self.directory)

  def latest_step(self) -> int | None:
    """The last complete step, or None. Multi-host: a collective, all hosts get the same answer."""
    return _latest_complete(self.directory)

  def save(self, step: int, params, opt_state, meta: dict[str, Any], *,
           force: bool = False) -> bool:
    """Starts an async save; returns whether one was started.

    Returns once the arrays are copied to host memory (Orbax's default), so they may be donated or
    deleted right after.
    `force` saves off the interval (e.g. on preemption); a step already saved is never saved twice.
    """
    try:
      json.dumps(meta)  # fail here, not in Orbax's background thread
    except TypeError as e:
      raise TypeError(f"checkpoint meta must be JSON-serialisable: {e}") from e
    if step in self._manager.all_steps():
      return False
    if not force and step % self.save_interval_steps:
      return False
    # The interval is decided above: Orbax's own policy would also skip every step below a stray
    # step folder that it counts as complete.
    args = ocp.args.Composite(params=ocp.args.StandardSave(params),
                              opt_state=ocp.args.StandardSave(opt_state),
                              meta=ocp.args.JsonSave(meta))
    return self._manager.save(step, args=args, force=True)

  def restore(self, step: int | None, abstract_params, abstract_opt_state):
    """Returns (params, opt_state, meta) of `step` (None: the latest complete one).

    The abstract trees hold `jax.ShapeDtypeStruct`s with shardings; arrays come back sharded so.
    """
    if step is None:
      step = self.latest_step()
      if step is None:
        raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
    step_dir = self.directory / str(step)
    if not _is_complete(step_dir):
      raise FileNotFoundError(f"no complete checkpoint for step {step} in {self.directory} "
                              f"(complete steps: {self.all_steps()})")
    _check_against_checkpoint(step_dir / "params", abstract_params, "params")
    _check_against_checkpoint(step_dir / "opt_state", abstract_opt_state, "opt_state")
    out = self._manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract_params),
        opt_state=ocp.args.StandardRestore(abstract_opt_state),
        meta=ocp.args.JsonRestore()))
    return out.params, out.opt_state, out.meta

  def wait(self) -> None:
    """Blocks until every started save is committed."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def find_step_dir(path: epath.Path, step: int | None) -> epath.Path:
  """Resolves a run's workdir, its checkpoints directory or one step's folder to a step folder."""
  if (path / "params").is_dir():  # one step's folder
    if not _is_complete(path):
      raise FileNotFoundError(f"{path} is not a complete checkpoint (no {COMMIT_FILE}: an "
                              "interrupted or still running save)")
    if step is not None and step != int(path.name):
      raise ValueError(f"step={step} asked for, but {path} is step {path.name}")
    return path
  directory = workdir.checkpoints_dir(path) if workdir.checkpoints_dir(path).is_dir() else path
  if step is None:
    step = _latest_complete(directory)
    if step is None:
      raise FileNotFoundError(f"no complete checkpoint under {path}")
  if not _is_complete(directory / str(step)):
    raise FileNotFoundError(f"no complete checkpoint for step {step} under {path} "
                            f"(complete steps: {_complete_steps(directory)})")
  return directory / str(step)


def restore_params(path: storage.PathLike, abstract_params, step: int | None = None):
  """Restores the params item alone (opt_state is never read), sharded like `abstract_params`.

  `path` is a run's workdir, its `checkpoints` directory or one step's folder; step=None picks the
  latest complete step.
  """
  item_dir = find_step_dir(storage.path(path, "checkpoint"), step) / "params"
  _check_against_checkpoint(item_dir, abstract_params, "params")
  with ocp.StandardCheckpointer() as checkpointer:
    return checkpointer.restore(item_dir, abstract_params)


class PreemptionWatcher:
  """Turns a preemption notice (SIGTERM) into `should_stop(step)`, so the loop saves and exits.

  One process: a SIGTERM handler sets a flag. Several processes: all hosts must stop at the same
  step, so ask JAX's preemption sync service, which runs its own SIGTERM notifier; a Python handler
  would replace that notifier, so none is installed there.
  """

  def __init__(self):
    self._stop = False
    self._multihost = jax.process_count() > 1
    self._installed = False
    if not self._multihost:
      self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
      self._installed = True

  def _on_sigterm(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM received: checkpointing and stopping at the next step boundary")
    self._stop = True

  def should_stop(self, step: int) -> bool:
    """Call once per step, on every host; True from the step at which to save and stop."""
    if self._multihost and not self._stop:
      self._stop = ocp.multihost.reached_preemption(step)
    return self._stop

  def close(self) -> None:
    if self._installed:
      # None: the old handler was not set from Python; the default is the best we can put back.
      signal.signal(signal.SIGTERM, signal.SIG_DFL if self._previous is None else self._previous)
      self._installed = False

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
