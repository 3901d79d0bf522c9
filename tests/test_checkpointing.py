"""Orbax checkpoints: sharded round trips, keep-N and intervals, async commits, interrupted saves,
params-only restore, and the SIGTERM watcher."""

import asyncio
import os
import shutil
import signal
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from preflmr_jax import checkpointing
from preflmr_jax.models import layer_stacks
from preflmr_jax.checkpointing import Checkpointer, restore_params
from preflmr_jax.preemption import PreemptionWatcher

META = {"step": 0, "rng": [0, 42], "data": {"epoch": 1, "position": 17, "order": [3, 1, 2]},
        "config": {"model": "tiny", "lr": 1e-4}}


def _mesh(shape):
  return Mesh(np.array(jax.devices()).reshape(shape), ("data", "fsdp"),
              axis_types=(AxisType.Auto,) * 2)


def _spec(ndim, transpose):
  """Matrices over both axes (swapped when `transpose`), vectors over fsdp, scalars replicated."""
  return {2: P("fsdp", "data") if transpose else P("data", "fsdp"), 1: P("fsdp"), 0: P()}[ndim]


def _abstract(tree, mesh, transpose=False):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(
      x.shape, x.dtype, sharding=NamedSharding(mesh, _spec(x.ndim, transpose))), tree)


def _state(mesh, seed=0):
  """Sharded params and an Adam state with non-zero moments."""
  k1, k2 = jax.random.split(jax.random.key(seed))
  params = {"dense": {"kernel": jax.random.normal(k1, (8, 8)), "bias": jax.random.normal(k2, (8,))},
            "scale": jnp.float32(2.0)}
  params = jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, _spec(x.ndim, False))),
                        params)
  tx = optax.adam(1e-2)
  opt_state = tx.init(params)
  _, opt_state = tx.update(jax.tree.map(jnp.ones_like, params), opt_state, params)
  return params, opt_state


def _assert_same(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def _save(ckpt, step, params, opt_state, **kw):
  return ckpt.save(step, params, opt_state, dict(META, step=step), **kw)


def test_round_trip_onto_same_and_other_sharding(tmp_path):
  mesh = _mesh((2, 4))
  params, opt_state = _state(mesh)
  with Checkpointer(str(tmp_path / "checkpoints")) as ckpt:
    assert _save(ckpt, 5, params, opt_state)
    ckpt.wait()
    assert ckpt.latest_step() == 5

    abstract = _abstract(params, mesh), _abstract(opt_state, mesh)
    got_params, got_opt, meta = ckpt.restore_latest(*abstract)[1:]
    _assert_same(got_params, params)
    _assert_same(got_opt, opt_state)
    assert meta == dict(META, step=5)
    assert got_params["dense"]["kernel"].sharding == NamedSharding(mesh, P("data", "fsdp"))
    assert isinstance(got_opt[0], optax.ScaleByAdamState) and int(got_opt[0].count) == 1

    # Another mesh shape and the matrices' axes swapped: the layout comes from the targets.
    other = _mesh((4, 2))
    abstract_params = _abstract(params, other, transpose=True)
    got_params, got_opt, _ = ckpt.restore(5, abstract_params, _abstract(opt_state, other, True))
    _assert_same(got_params, params)
    _assert_same(got_opt, opt_state)
    for got, want in zip(jax.tree.leaves(got_params), jax.tree.leaves(abstract_params)):
      assert got.sharding == want.sharding


def test_arrays_may_be_donated_once_save_returns(tmp_path):
  mesh = _mesh((2, 4))
  params, opt_state = _state(mesh)
  on_host = jax.tree.map(np.asarray, (params, opt_state))
  with Checkpointer(str(tmp_path)) as ckpt:
    assert _save(ckpt, 1, params, opt_state)
    jax.tree.map(lambda x: x.delete(), (params, opt_state))  # what donation to the next step does
    ckpt.wait()
    got = ckpt.restore(1, _abstract(on_host[0], mesh), _abstract(on_host[1], mesh))
  _assert_same(got[:2], on_host)


def test_keep_n_interval_and_force(tmp_path):
  mesh = _mesh((2, 4))
  params, opt_state = _state(mesh)
  with Checkpointer(str(tmp_path), max_to_keep=2, save_interval_steps=3) as ckpt:
    saved = [s for s in range(1, 8) if _save(ckpt, s, params, opt_state)]
    assert saved == [3, 6]
    assert _save(ckpt, 7, params, opt_state, force=True)      # e.g. on preemption
    assert not _save(ckpt, 7, params, opt_state, force=True)  # never twice
    ckpt.wait()
    assert ckpt.all_steps() == [6, 7]
    assert sorted(os.listdir(tmp_path)) == ["6", "7"]


def test_meta_must_be_json(tmp_path):
  mesh = _mesh((2, 4))
  params, opt_state = _state(mesh)
  with Checkpointer(str(tmp_path)) as ckpt:
    with pytest.raises(TypeError, match="JSON-serialisable"):
      ckpt.save(1, params, opt_state, {"step": np.int64(1)})


def test_async_save_is_listed_only_once_committed(tmp_path, monkeypatch):
  """Holds Orbax's commit (the rename of `<step>.orbax-checkpoint-tmp`) until released."""
  mesh = _mesh((2, 4))
  params, opt_state = _state(mesh)
  abstract = _abstract(params, mesh), _abstract(opt_state, mesh)
  release, reached = threading.Event(), threading.Event()
  finalize = ocp.path.atomicity.AtomicRenameTemporaryPath.finalize

  async def held_finalize(self, *args, **kwargs):
    if self.get().name.startswith("2."):
      reached.set()
      await asyncio.to_thread(release.wait, 30)
    return await finalize(self, *args, **kwargs)

  monkeypatch.setattr(ocp.path.atomicity.AtomicRenameTemporaryPath, "finalize", held_finalize)
  with Checkpointer(str(tmp_path)) as ckpt:
    _save(ckpt, 1, params, opt_state)
    ckpt.wait()
    start = time.perf_counter()
    assert _save(ckpt, 2, params, opt_state)
    assert time.perf_counter() - start < 10
    assert reached.wait(30), "the commit did not start"
    # Step 2 is written but not committed: as if the process died now. A restarted reader sees 1.
    assert (tmp_path / "2.orbax-checkpoint-tmp").is_dir() and not (tmp_path / "2").exists()
    assert ckpt.latest_step() == 1 and ckpt.all_steps() == [1]
    with Checkpointer(str(tmp_path)) as reader:
      assert reader.latest_step() == 1
      assert reader.restore_latest(*abstract)[3]["step"] == 1
    assert restore_params(str(tmp_path), abstract[0]) is not None
    release.set()
    ckpt.wait()
    assert ckpt.latest_step() == 2 and ckpt.all_steps() == [1, 2]


def test_interrupted_saves_are_never_restored(tmp_path):
  mesh = _mesh((2, 4))
  params, opt_state = _state(mesh)
  other_params, _ = _state(mesh, seed=1)
  workdir = tmp_path
  directory = workdir / "checkpoints"
  with Checkpointer(str(directory)) as ckpt:
    _save(ckpt, 1, other_params, opt_state)
    _save(ckpt, 2, params, opt_state)
  # How Orbax leaves an interrupted save: on local disks the step never left its temporary folder;
  # on GCS the step folder exists but its commit file (written last) does not.
  shutil.copytree(directory / "2", directory / "3.orbax-checkpoint-tmp")
  shutil.copytree(directory / "2", directory / "4")
  (directory / "4" / checkpointing.COMMIT_FILE).unlink()

  abstract = _abstract(params, mesh), _abstract(opt_state, mesh)
  with Checkpointer(str(directory)) as ckpt:
    assert ckpt.latest_step() == 2 and ckpt.all_steps() == [1, 2]
    got_params, _, meta = ckpt.restore_latest(*abstract)[1:]
    assert meta["step"] == 2
    _assert_same(got_params, params)
    with pytest.raises(FileNotFoundError, match="step 4"):
      ckpt.restore(4, *abstract)
    _assert_same(restore_params(str(workdir), abstract[0]), params)
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
      restore_params(str(directory / "4"), abstract[0])
    # The resumed run saves step 3 again over the leftover temporary folder.
    assert _save(ckpt, 3, params, opt_state)
    ckpt.wait()
    assert ckpt.latest_step() == 3
    assert not (directory / "3.orbax-checkpoint-tmp").exists()


def test_restore_params_alone_from_any_path(tmp_path):
  mesh = _mesh((2, 4))
  params, opt_state = _state(mesh)
  old_params, _ = _state(mesh, seed=1)
  directory = tmp_path / "checkpoints"
  with Checkpointer(str(directory), async_save=False) as ckpt:
    _save(ckpt, 1, old_params, opt_state)
    _save(ckpt, 2, params, opt_state)
  for step in (1, 2):  # params alone: the optimiser state is never read
    shutil.rmtree(directory / str(step) / "opt_state")

  abstract = _abstract(params, _mesh((4, 2)), transpose=True)
  for path in (tmp_path, directory, directory / "2"):
    got = restore_params(str(path), abstract)
    _assert_same(got, params)
    assert got["dense"]["kernel"].sharding == abstract["dense"]["kernel"].sharding
  _assert_same(restore_params(str(tmp_path), abstract, step=1), old_params)

  wrong = dict(abstract, dense=dict(abstract["dense"], kernel=jax.ShapeDtypeStruct(
      (8, 4), jnp.float32, sharding=abstract["dense"]["kernel"].sharding)))
  with pytest.raises(ValueError, match=r"params/dense/kernel.*\(8, 8\).*\(8, 4\)"):
    restore_params(str(tmp_path), wrong)
  extra = dict(abstract, dense=dict(abstract["dense"], gain=abstract["scale"]))
  with pytest.raises(ValueError, match="params/dense/gain is not in the checkpoint"):
    restore_params(str(tmp_path), extra)
  with pytest.raises(ValueError, match="params/scale is in the checkpoint .* but not in the model"):
    restore_params(str(tmp_path), {"dense": abstract["dense"]})


def test_params_restore_into_either_layer_layout(tmp_path):
  """Per-layer params restore into a model with scanned layers and back (models/layer_stacks.py);
  a run resumes only in its own layout."""
  mesh = _mesh((2, 4))
  rng = np.random.default_rng(0)
  layer = lambda: {"wi": {"kernel": jnp.asarray(rng.normal(size=(8, 8)), jnp.float32)}}
  per_layer = {"vision": {"layer_0": layer(), "layer_1": layer(), "class_embedding": jnp.ones(8)},
               "mapping_layer_0": layer(), "mapping_layer_1": layer(), "mapping_layer_2": layer()}
  stacked = layer_stacks.stack(per_layer)
  assert stacked["mapping_layers"]["wi"]["kernel"].shape == (3, 8, 8)
  sharded = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct(
      x.shape, x.dtype, sharding=NamedSharding(mesh, P(*([None] * (x.ndim - 2)), "data", "fsdp")
                                               if x.ndim >= 2 else P())), tree)
  tx = optax.adam(1e-2)
  for saved, other in ((per_layer, stacked), (stacked, per_layer)):
    directory = tmp_path / ("scanned" if saved is stacked else "per_layer")
    with Checkpointer(str(directory), async_save=False) as ckpt:
      _save(ckpt, 1, saved, tx.init(saved))
    abstract = sharded(other)
    got = restore_params(str(directory), abstract)
    _assert_same(got, other)
    assert jax.tree.map(lambda x: x.sharding, got) == jax.tree.map(lambda a: a.sharding, abstract)
    with Checkpointer(str(directory)) as ckpt, pytest.raises(
        checkpointing.CheckpointMismatchError, match="scan_layers"):
      ckpt.restore(1, abstract, jax.eval_shape(tx.init, abstract))


def test_missing_checkpoints_name_the_path(tmp_path):
  mesh = _mesh((2, 4))
  params, opt_state = _state(mesh)
  empty = tmp_path / "run" / "checkpoints"
  with Checkpointer(str(empty)) as ckpt:
    assert empty.is_dir() and ckpt.latest_step() is None and ckpt.all_steps() == []
    with pytest.raises(FileNotFoundError, match=str(empty)):
      ckpt.restore_latest(_abstract(params, mesh), _abstract(opt_state, mesh))
  for path in (tmp_path / "run", tmp_path / "nowhere"):
    with pytest.raises(FileNotFoundError, match=str(path)):
      restore_params(str(path), _abstract(params, mesh))


def test_preemption_watcher_sigterm_and_restores_handler(caplog):
  previous = signal.getsignal(signal.SIGTERM)
  watcher = PreemptionWatcher()
  try:
    assert not watcher.should_stop(0)
    os.kill(os.getpid(), signal.SIGTERM)
    for _ in range(100):  # Python runs the handler between bytecodes of the main thread
      if watcher.should_stop(1):
        break
      time.sleep(0.01)
    assert watcher.should_stop(1)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.1)
  finally:
    watcher.close()
  assert signal.getsignal(signal.SIGTERM) == previous
  assert [r.getMessage() for r in caplog.records] == [
      "SIGTERM received: checkpointing and stopping at the next step boundary",
      "SIGTERM received: already stopping at the next step boundary"]


def test_preemption_watcher_ctrl_c_once_saves_twice_stops():
  previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal
  watcher = PreemptionWatcher()
  try:
    os.kill(os.getpid(), signal.SIGTERM)
    for _ in range(100):
      if watcher.should_stop(1):
        break
      time.sleep(0.01)
    os.kill(os.getpid(), signal.SIGINT)  # the first Ctrl-C, after a SIGTERM: still a save
    time.sleep(0.1)
    assert watcher.should_stop(1) and watcher.stopped(1).signum == signal.SIGTERM
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)  # the second: at once
      time.sleep(1)
  finally:
    watcher.close()
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
  signal.signal(signal.SIGINT, signal.SIG_IGN)  # started with Ctrl-C ignored: left ignored
  try:
    watcher = PreemptionWatcher()
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    watcher.close()
  finally:
    signal.signal(signal.SIGINT, previous)


def test_preemption_watcher_multihost_follows_the_sync_point(monkeypatch):
  """Several processes: no Python handler (JAX's notifier owns SIGTERM); all stop at one step."""
  previous = signal.getsignal(signal.SIGTERM)
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(ocp.multihost, "reached_preemption", lambda step: step == 3)
  watcher = PreemptionWatcher()
  assert signal.getsignal(signal.SIGTERM) == previous
  assert [watcher.should_stop(s) for s in range(5)] == [False, False, False, True, True]
  watcher.close()
  assert signal.getsignal(signal.SIGTERM) == previous
