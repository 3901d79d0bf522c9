"""Orbax checkpoints for training runs: async saves, keep-N, resume.

  ckpt = Checkpointer(workdir.checkpoints_dir(path), max_to_keep=3, save_interval_steps=1000)
  if ckpt.latest_step() is not None:  # the newest step that restores, walking back past damage
    step, params, opt_state, meta = ckpt.restore_latest(abstract_params, abstract_opt_state)
  ...
  ckpt.save(step, params, opt_state, {"step": step, "rng": [...], "data": it.get_state()})
  ckpt.close()                                       # waits for the last async save

  params = restore_params(path, abstract_params)  # eval: never reads opt_state

Layout: `<workdir>/checkpoints/<step>/{params,opt_state,meta}` (workdir.py), three separate Orbax
items so that parameters can be restored alone. Arrays come back with the shardings of the abstract
targets, so a run can resume on a different mesh than it saved from. Directories are local paths or
gs:// URLs (storage.py).

What survives faults (docs/reliability.md): a step counts only once its commit file is written
(`_is_complete`, for resume and save alike); a step folder this run did not write (an interrupted
save, or a damaged step resumed past) is cleared before that step is saved again; resume walks back
from the newest complete step to the newest one that restores, logging each step it skips and why.
"""

from __future__ import annotations

import functools
import json
import logging as std_logging
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from preflmr_jax import storage, workdir
from preflmr_jax.models import layer_stacks
from preflmr_jax.user_errors import MissingPath, UserError

ITEMS = ("params", "opt_state", "meta")

# Orbax 0.12 writes a step into `<step>.orbax-checkpoint-tmp/` and renames it when done (local
# disks), or writes `<step>/` in place and adds this file last (GCS). It writes the file in both
# modes, but on local disks treats any bare `<step>/` as complete; demanding the file as well
# means a half-copied or half-written folder is never restored, whatever the filesystem.
COMMIT_FILE = ocp.path.atomicity.COMMIT_SUCCESS_FILE

# Orbax splits each replicated array between its replicas to write it in parallel, one eager slice
# per replica. Below this many bytes per slice the slicing costs more than the write it shares out
# (a small model's ~1000 arrays on 8 devices: 8000 dispatches, seconds per save), so one replica
# writes such an array whole.
MIN_REPLICA_SLICE_BYTES = 1 << 20


def _register_array_handler() -> None:
  absl_logger = std_logging.getLogger("absl")
  level = absl_logger.level
  absl_logger.setLevel(std_logging.ERROR)  # Orbax warns on every override, as it is meant here
  try:
    ocp.type_handlers.register_type_handler(
        jax.Array, ocp.type_handlers.ArrayHandler(
            min_slice_bytes_for_replica_parallel=MIN_REPLICA_SLICE_BYTES), override=True)
  finally:
    absl_logger.setLevel(level)


_register_array_handler()


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


class CheckpointMismatchError(UserError, ValueError):
  """The checkpoint is intact but holds other arrays than the model (a config change)."""


class CheckpointDamagedError(UserError, RuntimeError):
  """No complete step restores: each one's failure is in the message."""


class CheckpointCorruptError(UserError, ValueError):
  """A checkpoint file reads back damaged: an array's bits differ from what was saved (checksums),
  or its metadata does not parse."""


def _stored_tree(item_dir: epath.Path):
  """The tree of array metadata that an item's folder holds."""
  try:
    return ocp.PyTreeCheckpointHandler().metadata(item_dir).tree
  except Exception as e:  # pylint: disable=broad-except
    if storage.is_access_failure(e) or str(item_dir) in str(e):  # named already (a missing file)
      raise
    # Orbax's errors for a damaged JSON file do not name it ("KeyError: 'tree_metadata'").
    raise CheckpointCorruptError(f"the array metadata in {item_dir} does not read "
                                 f"({type(e).__name__}: {_first_line(e)})") from None


def _read_meta(step_dir: epath.Path) -> dict[str, Any]:
  """A step's meta item: the JSON file that Orbax's JsonSave wrote."""
  meta_file = step_dir / "meta" / "metadata"
  try:
    meta = json.loads(meta_file.read_text())
  except ValueError as e:  # also bytes that are not UTF-8
    raise CheckpointCorruptError(f"{meta_file} is not JSON ({e})") from None
  if not isinstance(meta, dict):
    raise CheckpointCorruptError(f"{meta_file} holds a {type(meta).__name__}, not a JSON object")
  return meta


def _check_against_checkpoint(item_dir: epath.Path, abstract, item: str,
                              stored_tree=None) -> None:
  """Raises CheckpointMismatchError naming the first array whose path or shape differs.

  Orbax's own error gives the two shapes but not which array they belong to. `stored_tree`: the
  item's `_stored_tree`, when the caller has read it already.
  """
  stored_tree = _stored_tree(item_dir) if stored_tree is None else stored_tree
  if item == "params" and layer_stacks.is_stacked(stored_tree) != layer_stacks.is_stacked(abstract):
    layout = "scanned" if layer_stacks.is_stacked(stored_tree) else "per-layer"
    raise CheckpointMismatchError(
        f"the checkpoint {item_dir} holds {layout} layers, unlike config.model.scan_layers: a run "
        "resumes in its own layout (config.init_params_from and evaluation convert the params)")
  # Keys are compared by name: Orbax stores a NamedTuple (optax state) as a dict.
  difference = first_difference(abstract, stored_tree, f"the checkpoint {item_dir}", item)
  if difference:
    raise CheckpointMismatchError(difference)


def first_difference(wanted, got, source: str, item: str = "params", dtypes: bool = False
                     ) -> str | None:
  """The first array whose path or shape (and dtype, with `dtypes`) differs between the trees
  `wanted` (the model's) and `got` (from `source`), described; None when they agree."""
  def table(tree):
    return {_key_name(p): f"{tuple(np.shape(x))} {np.dtype(x.dtype).name}" if dtypes
            else tuple(np.shape(x)) for p, x in jax.tree_util.tree_leaves_with_path(tree)}
  stored, wanted = table(got), table(wanted)
  if missing := sorted(wanted.keys() - stored.keys()):
    return f"{item}/{missing[0]} is not in {source} ({len(missing)} missing)"
  if extra := sorted(stored.keys() - wanted.keys()):
    return f"{item}/{extra[0]} is in {source} but not in the model ({len(extra)} such)"
  for name, want in wanted.items():
    if stored[name] != want:
      return f"{item}/{name}: {source} has shape {stored[name]}, the model expects {want}"
  return None


# meta's key for the arrays' checksums: OCDBT files carry none, so a flipped bit would restore.
CHECKSUMS = "checksums"


@jax.jit
def _checksums(tree):
  """Per array, the wrapping uint32 sum of its elements' bit patterns: any one flipped bit
  changes it. Computed where the arrays live; a few scalars come back."""
  def one(x):
    x = x.astype(jnp.uint8) if x.dtype == jnp.bool_ else x
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]
    return jnp.sum(jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32), dtype=jnp.uint32)
  return jax.tree.map(one, tree)


def _checksum_table(tree) -> dict[str, int]:
  return {_key_name(p): int(v)
          for p, v in jax.tree_util.tree_leaves_with_path(jax.device_get(_checksums(tree)))}


def _verify(tree, expected: dict[str, int] | None, item_dir: epath.Path) -> None:
  """Raises CheckpointCorruptError naming the first array whose checksum differs from the one
  recorded at save time (checkpoints saved without checksums are not checked)."""
  if expected is None:
    return
  got = _checksum_table(tree)
  for name, value in expected.items():
    if got.get(name) != value:
      raise CheckpointCorruptError(f"{item_dir}: array {name} differs from what was saved "
                                   "(checksum mismatch)")


def _why(e: BaseException) -> str:
  """One line for a restore failure: its root cause (for TensorStore the one naming the file), as
  the libraries' own messages run to many lines."""
  while (e.__cause__ or (None if e.__suppress_context__ else e.__context__)) is not None:
    e = e.__cause__ or e.__context__
  first = _first_line(e)
  return f"{type(e).__name__}: {first}" if first else type(e).__name__


def _first_line(e: BaseException) -> str:
  return (str(e).strip().splitlines() or [""])[0][:300]


def _restore_failure_is_damage(e: BaseException) -> bool:
  """Whether a failed restore means this step is damaged, so an older step should be tried.

  A config mismatch would fail on every step, and a denied or unreachable store says nothing
  about the data: walking back past either would resume from an older step for no reason.
  """
  return not isinstance(e, CheckpointMismatchError) and not storage.is_access_failure(e)


def _all_agree(ok: bool) -> bool:
  """True when every process says ok (each reads its own shards of a step, so one may fail)."""
  return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


class Checkpointer:
  """Saves and restores (params, opt_state, meta) per step with an Orbax CheckpointManager."""

  def __init__(self, directory: storage.PathLike, *, max_to_keep: int = 3,
               save_interval_steps: int = 1, async_save: bool = True):
    if max_to_keep < 1:  # Orbax would delete each checkpoint right after writing it
      raise ValueError(f"max_to_keep={max_to_keep}: keep at least one checkpoint")
    self.directory = storage.path(directory, "checkpoint directory")
    self.save_interval_steps = save_interval_steps
    self._saved: set[int] = set()  # steps this object wrote
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
    if step in self._saved:
      return False
    if not force and step % self.save_interval_steps:
      return False
    self._clear_stale(step)
    meta = {**meta, CHECKSUMS: {"params": _checksum_table(params),
                                "opt_state": _checksum_table(opt_state)}}
    # The interval is decided above: Orbax's own policy would also skip every step below a stray
    # step folder that it counts as complete.
    args = ocp.args.Composite(params=ocp.args.StandardSave(params),
                              opt_state=ocp.args.StandardSave(opt_state),
                              meta=ocp.args.JsonSave(meta))
    started = self._manager.save(step, args=args, force=True)
    if started:
      self._saved.add(step)
    return started

  def _clear_stale(self, step: int) -> None:
    """Removes a `step` folder this object did not write, so that the step is written anew.

    A run that reaches a step again resumed from an older one, so a folder already there is
    incomplete (an interrupted save) or was skipped as damaged; Orbax would keep it and skip the
    save.
    """
    step_dir = self.directory / str(step)
    exists = int(multihost_utils.broadcast_one_to_all(np.int32(step_dir.exists())))
    if not exists:
      return
    if jax.process_index() == 0:
      logging.warning("replacing %s, left by an earlier attempt (%s)", step_dir,
                      "complete but not restored" if _is_complete(step_dir) else "incomplete")
      step_dir.rmtree(missing_ok=True)
    multihost_utils.sync_global_devices(f"preflmr_jax:cleared_step_{step}")
    self._manager.reload()

  def restore(self, step: int, abstract_params, abstract_opt_state):
    """Returns (params, opt_state, meta) of complete step `step`.

    The abstract trees hold `jax.ShapeDtypeStruct`s with shardings; arrays come back sharded so.
    """
    step_dir = self.directory / str(step)
    if not _is_complete(step_dir):
      raise MissingPath(f"no complete checkpoint for step {step} in {self.directory} "
                        f"(complete steps: {self.all_steps()})")
    _check_against_checkpoint(step_dir / "params", abstract_params, "params")
    _check_against_checkpoint(step_dir / "opt_state", abstract_opt_state, "opt_state")
    meta = _read_meta(step_dir)
    out = self._manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract_params),
        opt_state=ocp.args.StandardRestore(abstract_opt_state)))
    checksums = meta.pop(CHECKSUMS, {})
    _verify(out.params, checksums.get("params"), step_dir / "params")
    _verify(out.opt_state, checksums.get("opt_state"), step_dir / "opt_state")
    return out.params, out.opt_state, meta

  def restore_latest(self, abstract_params, abstract_opt_state):
    """(step, params, opt_state, meta) of the newest complete step that restores.

    A damaged step (a truncated or missing array file, unreadable metadata) is logged and skipped
    for the one before it; a config mismatch or a storage access failure is raised at once.
    """
    steps = [int(s) for s in multihost_utils.broadcast_one_to_all(
        np.asarray(self.all_steps() or [-1], np.int64)) if s >= 0]
    skipped = []
    for step in reversed(steps):
      error = None
      try:
        out = self.restore(step, abstract_params, abstract_opt_state)
      except Exception as e:  # pylint: disable=broad-except
        if not _restore_failure_is_damage(e):
          raise
        error = e
      if _all_agree(error is None):
        for s, why in skipped:
          logging.warning("resumed from step %d, not %d: %s", step, s, why)
        return (step, *out)
      why = _why(error) if error else "another process could not read it"
      logging.warning("checkpoint step %d in %s does not restore (%s); trying the one before",
                      step, self.directory, why)
      skipped.append((step, why))
    if not skipped:
      raise MissingPath(f"no complete checkpoint in {self.directory}")
    raise CheckpointDamagedError(
        f"no checkpoint in {self.directory} restores: " +
        "; ".join(f"step {s}: {why}" for s, why in skipped))

  def wait(self) -> None:
    """Blocks until every started save is committed."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """`wait`, then releases the manager's threads."""
    self._manager.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def train_first(workdir) -> str:
  """The hint for a checkpoint that is not there."""
  return f"train first: python -m preflmr_jax.main --config CONFIG --workdir {workdir}"


def find_step_dir(path: epath.Path, step: int | None) -> epath.Path:
  """Resolves a run's workdir, its checkpoints directory or one step's folder to a step folder."""
  if (path / "params").is_dir():  # one step's folder
    if not _is_complete(path):
      raise MissingPath(f"{path} is not a complete checkpoint (no {COMMIT_FILE}: an "
                        "interrupted or still running save)")
    if step is not None and step != int(path.name):
      raise MissingPath(f"step {step} asked for, but {path} is step {path.name}'s folder")
    return path
  if path.name in ITEMS and (path.parent / "params").is_dir():
    raise MissingPath(f"{path} is one item of a checkpoint: pass its step folder {path.parent}")
  directory = workdir.checkpoints_dir(path) if workdir.checkpoints_dir(path).is_dir() else path
  if step is None:
    step = _latest_complete(directory)
    if step is None:
      raise MissingPath(f"no complete checkpoint under {path}; {train_first(path)}")
  if not _is_complete(directory / str(step)):
    raise MissingPath(f"no complete checkpoint for step {step} under {path} "
                      f"(complete steps: {_complete_steps(directory)})")
  return directory / str(step)


def first_nonfinite(tree) -> str | None:
  """The path of the first floating-point array holding a NaN or an infinity, or None."""
  flags = jax.tree.map(lambda x: jnp.isfinite(x).all() if jnp.issubdtype(x.dtype, jnp.inexact)
                       else jnp.bool_(True), tree)
  for path, ok in jax.tree_util.tree_leaves_with_path(jax.device_get(flags)):
    if not ok:
      return _key_name(path)
  return None


def restore_params(path: storage.PathLike, abstract_params, step: int | None = None):
  """Restores the params item alone (opt_state is never read), sharded like `abstract_params`.

  `path` is a run's workdir, its `checkpoints` directory or one step's folder; step=None picks the
  latest complete step. A step that does not restore, or holds NaN / infinite parameters, is an
  error naming it: this never falls back to another step than the one asked for.
  """
  step_dir = find_step_dir(storage.path(path, "checkpoint"), step)
  item_dir = step_dir / "params"
  scanned = layer_stacks.is_stacked(abstract_params)
  try:
    # Read in the layout it was written in (config.model.scan_layers), converted below.
    stored_tree = _stored_tree(item_dir)
    stored = layer_stacks.to_layout(abstract_params, layer_stacks.is_stacked(stored_tree))
    _check_against_checkpoint(item_dir, stored, "params", stored_tree)
    with ocp.StandardCheckpointer() as checkpointer:
      params = checkpointer.restore(item_dir, stored)
    recorded = (_read_meta(step_dir).get(CHECKSUMS, {})
                if (step_dir / "meta").exists() else {})
    _verify(params, recorded.get("params"), item_dir)
  except Exception as e:  # pylint: disable=broad-except
    if not _restore_failure_is_damage(e):
      raise
    raise CheckpointDamagedError(
        f"checkpoint {step_dir} does not restore ({_why(e)}); complete steps: "
        f"{_complete_steps(step_dir.parent)}") from e
  if (bad := first_nonfinite(params)) is not None:
    raise FloatingPointError(f"checkpoint {step_dir} holds non-finite parameters (first: {bad})")
  if layer_stacks.is_stacked(params) != scanned:
    params = convert_layout(params, abstract_params)
  return params


def convert_layout(params, abstract_params):
  """`params` in the layer layout of `abstract_params` (models/layer_stacks.py), placed with its
  shardings."""
  scanned = layer_stacks.is_stacked(abstract_params)
  shardings = jax.tree.map(lambda a: getattr(a, "sharding", None), abstract_params)
  if any(s is None for s in jax.tree.leaves(shardings, is_leaf=lambda s: s is None)):
    shardings = None
  convert = jax.jit(functools.partial(layer_stacks.to_layout, scanned=scanned),
                    out_shardings=shardings)
  return convert(params)
