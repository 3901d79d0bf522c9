"""gs:// end to end against a real GCS emulator (tests/gcs.py): checkpoints (an interrupted save is
never restored), the trainer into gs://BUCKET/run, a resume from it and the eval binary into
gs://BUCKET/run/eval, and bad gs:// input as one-line errors naming the path."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from gcs import gcs, gcs_server  # noqa: F401  (fixtures)
from preflmr_jax import checkpointing, storage, workdir

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _tree(seed):
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("data",))
  put = lambda x: jax.device_put(x, NamedSharding(mesh, P()))
  key = jax.random.key(seed)
  return {"w": put(jax.random.normal(key, (4, 4))), "b": put(jnp.arange(4.0) + seed)}


def _abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def test_checkpoints_on_gs_and_an_interrupted_save_is_never_restored(gcs, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  run = f"gs://{gcs.bucket}/run"
  trees = {step: _tree(step) for step in (1, 2)}
  with checkpointing.Checkpointer(workdir.checkpoints_dir(run)) as ckpt:
    for step, tree in trees.items():
      assert ckpt.save(step, tree, tree, {"step": step})
    ckpt.wait()
  names = gcs.names("run/checkpoints/")
  assert {"run/checkpoints/1/commit_success.txt", "run/checkpoints/2/commit_success.txt"} <= set(names)
  assert any(n.startswith("run/checkpoints/2/params/") for n in names)

  gcs.delete(f"run/checkpoints/2/{checkpointing.COMMIT_FILE}")  # step 2's save never finished
  abstract = _abstract(trees[1])
  with checkpointing.Checkpointer(workdir.checkpoints_dir(run)) as ckpt:
    assert ckpt.latest_step() == 1 and ckpt.all_steps() == [1]
    params, _, meta = ckpt.restore(None, abstract, abstract)
    assert meta == {"step": 1}
    jax.tree.map(np.testing.assert_array_equal, params, trees[1])
    with pytest.raises(FileNotFoundError, match="no complete checkpoint for step 2"):
      ckpt.restore(2, abstract, abstract)
    # The resumed run saves step 2 again, over the unfinished folder.
    assert ckpt.save(2, trees[2], trees[2], {"step": 2})
    ckpt.wait()
    assert ckpt.latest_step() == 2
  jax.tree.map(np.testing.assert_array_equal, checkpointing.restore_params(run, abstract), trees[2])
  assert os.listdir(tmp_path) == []  # no local "gs:" folder
