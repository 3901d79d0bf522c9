"""The demo on the tiny config, end to end in a subprocess: random weights, a trained checkpoint,
bad flags."""

import json
import re

import jax
import numpy as np
import pytest

from preflmr_jax import demo, sharding
from preflmr_jax.models import preflmr

pytestmark = pytest.mark.slow  # each test runs the demo in a subprocess


def _printed_rankings(stdout: str) -> dict[int, list[tuple[int, float, str, str]]]:
  """{query index: [(rank, score, passage id, text), ...]} read back from the demo's printout."""
  out, query = {}, None
  for line in stdout.splitlines():
    if m := re.match(r"query (\d+): ", line):
      query = int(m[1])
      out[query] = []
    elif query is not None and (m := re.match(r"\s+(\d+)\s+(-?\d+\.\d+)\s+(\S+)\s+(.+)$", line)):
      out[query].append((int(m[1]), float(m[2]), m[3], m[4]))
  return out


def _read_scores(folder):
  with open(folder / "scores.json") as f:
    return json.load(f)


def test_demo_tiny_prints_and_writes_scores(tmp_path, cli):
  run = cli("preflmr_jax.demo", "--config", "configs/tiny.py", "--workdir", str(tmp_path))
  assert run.returncode == 0, run.stderr[-3000:]
  assert "MaxSim scores" in run.stdout and "random weights, no --checkpoint" in run.stdout
  # The model config goes to the log file (named on the last line), not the console.
  log_file = run.stderr.strip().splitlines()[-1].split("full log: ")[1]
  assert "PreFLMRConfig(" not in run.stderr and "PreFLMRConfig(" in open(log_file).read()
  out = _read_scores(tmp_path)
  scores = np.array(out["scores"])
  assert scores.shape == (len(demo.SHAPE_QUERIES), len(demo.SHAPE_QUERIES + demo.SHAPE_DISTRACTORS))
  assert np.isfinite(scores).all() and scores.std() > 0
  # Each score is a sum of at most query_length cosine similarities.
  assert (np.abs(scores) <= 32 + 4 + 16).all()


@pytest.mark.parametrize("scan_layers", [False, True])
def test_demo_random_weights_are_the_seeds_random_params_sharded(tiny_config, scan_layers):
  """Without a checkpoint the demo draws `preflmr.random_params` (one layer's init per stack: the
  per-layer init compiles for minutes at ViT-L shapes) in the config's layout, created sharded."""
  config = tiny_config(**{"model.scan_layers": scan_layers, "mesh.fsdp": 2, "mesh.tensor": 2,
                          "seed": 3})
  mesh = sharding.make_mesh(config.mesh)
  model_config, params, *_, weights = demo._load(config, None, None, mesh,
                                                 tuple(config.logical_axis_rules))
  assert weights == "random weights, no --checkpoint"
  want = preflmr.init_params(model_config, jax.random.key(3))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8), params, want)
  split = [x for x in jax.tree.leaves(params) if x.addressable_shards[0].data.shape != x.shape]
  assert split and all(len(x.sharding.device_set) == 8 for x in jax.tree.leaves(params))


def test_demo_tiny_samples_are_sample_task_items():
  queries, passages = demo.shape_items()
  ids = [pid for pid, _ in passages]
  assert len(set(ids)) == len(ids) and all(pid.startswith("SAMPLE_p") for pid in ids)
  assert {q.positive for q in queries} <= set(ids)
  for q in queries:
    assert q.instruction.endswith(":") and q.image.size == (64, 64)
    colour, shape = q.shows.split(" ", 1)[1].rsplit(" ", 1)
    assert colour in dict(passages)[q.positive] and shape in dict(passages)[q.positive]


def test_demo_ranks_the_passages_of_a_trained_checkpoint(trained_workdir, tmp_path, cli):
  run = cli("preflmr_jax.demo", "--config=configs/tiny.py", f"--checkpoint={trained_workdir}",
            f"--workdir={tmp_path}")
  assert run.returncode == 0, run.stderr[-3000:]
  assert f"checkpoint {trained_workdir}, step 6" in run.stdout
  out = _read_scores(tmp_path)
  scores, ranking = np.array(out["scores"]), np.array(out["ranking"])
  texts = {p["id"]: p["text"] for p in out["passages"]}
  assert {q["positive"] for q in out["queries"]} <= set(texts)
  np.testing.assert_array_equal(ranking, np.argsort(-scores, axis=1, kind="stable"))
  printed = _printed_rankings(run.stdout)
  assert sorted(printed) == list(range(len(demo.SHAPE_QUERIES))) == list(range(len(scores)))
  for i, rows in printed.items():
    query = out["queries"][i]
    assert query["question"] in run.stdout and query["instruction"] in run.stdout
    assert [r[0] for r in rows] == list(range(1, len(texts) + 1))
    assert [r[2] for r in rows] == [out["passages"][j]["id"] for j in ranking[i]]
    ranked = scores[i, ranking[i]]
    assert (np.diff(ranked) <= 0).all()
    np.testing.assert_allclose([r[1] for r in rows], ranked, atol=1e-3)
    for _, _, pid, text in rows:  # the passage's own text, cut to fit one line
      assert texts[pid].startswith(text.removesuffix(" ...")) and len(text) > 20
  assert all(len(line) <= 100 for line in run.stdout.splitlines() if re.match(r"\s+\d+\s", line))


def test_demo_without_a_checkpoint_says_to_train_first(tmp_path, cli):
  for missing in (tmp_path / "absent", tmp_path):  # no folder; a folder without checkpoints
    run = cli("preflmr_jax.demo", "--config=configs/tiny.py", f"--checkpoint={missing}")
    assert run.returncode == 2
    error = run.stderr.strip().splitlines()[-1]
    assert f"--checkpoint={missing}" in error and "python -m preflmr_jax.main" in error, error


def test_demo_runs_on_a_mesh_with_overrides(tmp_path, cli):
  run = cli("preflmr_jax.demo", "--config", "configs/tiny.py", "--config.mesh.fsdp=2",
            "--config.mesh.tensor=2", "--config.model.text.num_layers=1", "--workdir", tmp_path,
            env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
  assert run.returncode == 0, run.stderr[-3000:]
  assert "'fsdp': 2" in run.stdout and "'tensor': 2" in run.stdout


def test_demo_bad_config_value_names_the_key(cli):
  run = cli("preflmr_jax.demo", "--config", "configs/tiny.py", "--config.model.vision.patch_size=7")
  assert run.returncode != 0
  assert "config.model.vision.image_size" in run.stderr
  run = cli("preflmr_jax.demo", "--config", "configs/tiny.py", "--config.mesh.data=3",
            env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
  assert run.returncode != 0 and "config.mesh" in run.stderr
  # No vocab folder given, none downloaded:
  run = cli("preflmr_jax.demo", "--config", "configs/release.py:vit_b")
  assert run.returncode != 0 and "config.tokenizer is not set" in run.stderr
  run = cli("preflmr_jax.demo", "--config", "configs/tiny.py", "--step=2")
  assert run.returncode != 0 and "--step needs --checkpoint" in run.stderr
