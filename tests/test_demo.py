"""The sample encode-and-score demo on the tiny config, end to end in a subprocess."""

import json

import numpy as np
import pytest

from preflmr_jax import demo

pytestmark = pytest.mark.slow  # each test runs the demo in a subprocess


def test_demo_tiny_prints_and_writes_scores(tmp_path, cli):
  run = cli("preflmr_jax.demo", "--config", "configs/tiny.py", "--workdir", str(tmp_path))
  assert run.returncode == 0, run.stderr[-3000:]
  assert "MaxSim scores" in run.stdout
  with open(tmp_path / "scores.json") as f:
    out = json.load(f)
  scores = np.array(out["scores"])
  assert scores.shape == (len(demo.SAMPLE_QUERIES), len(demo.SAMPLE_PASSAGES))
  assert np.isfinite(scores).all() and scores.std() > 0
  # Each score is a sum of at most query_length cosine similarities.
  assert (np.abs(scores) <= 32 + 4 + 16).all()


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
