"""The compile-only memory plan: real train step compiled from shapes for simulated meshes."""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from preflmr_jax import config_files
from preflmr_jax.tools import plan

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def plans(comparable_step):
  # test_train's sharded-step comparison compiles the mixed mesh's program too (conftest).
  return {name: plan.plan(comparable_step(), plan.parse_mesh(mesh), jax.devices())
          for name, mesh in (("data", "data=8"), ("mixed", "data=2,fsdp=2,tensor=2"))}


@pytest.mark.slow
def test_plan_reports_memory_flops_and_params(plans):
  for result in plans.values():
    assert result["devices"] == 8 and result["global_batch"] == config_files.load_config("configs/tiny.py").batch_size
    memory = result["memory_per_device"]
    for key in ("argument_bytes", "output_bytes", "temp_bytes", "total_bytes"):
      assert memory[key] > 0, (key, memory)
    assert result["flops_per_step"] > 0 and result["xla_flops_per_device"] > 0
    assert 0 < result["params_trainable"] <= result["params_total"]
    assert result["slices"] == 1 and result["slice_of_data_index"] == [0] * result["mesh"]["data"]
  assert plans["mixed"]["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}
  assert plans["data"]["params_total"] == plans["mixed"]["params_total"]


def test_custom_calls_counts_the_compiled_kernels():
  """CI's TPU plan finds the Pallas kernel this way (`tpu_custom_call`); on CPU, LAPACK's."""
  compile_ = lambda fn: jax.jit(fn).lower(jnp.eye(4)).compile()
  assert plan._custom_calls(compile_(lambda x: jnp.linalg.cholesky(x) + jnp.linalg.cholesky(2 * x))
                            ) == {"lapack_spotrf_ffi": 2}
  assert plan._custom_calls(compile_(lambda x: 2 * x)) == {}


def test_fsdp_shards_the_state(plans):
  # data-only replicates params and optimiser state; fsdp/tensor shard them across devices.
  data_only = plans["data"]["memory_per_device"]["argument_bytes"]
  sharded = plans["mixed"]["memory_per_device"]["argument_bytes"]
  assert sharded < 0.6 * data_only, (sharded, data_only)


@pytest.mark.parametrize("bad", ["data=2,fsdp", "batch=8", "data=0", "data=2,data=2", ""])
def test_bad_mesh_names_the_flag(bad):
  with pytest.raises(ValueError, match="--mesh"):
    plan.parse_mesh(bad)


@pytest.mark.slow
def test_cli_prints_json_last():
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                              if "device_count" not in f)  # the tool picks its own device count
  out = subprocess.run(
      [sys.executable, "-m", "preflmr_jax.tools.plan", "--config", "configs/tiny.py",
       "--mesh", "data=2,fsdp=2,tensor=1", "--batch_size", "4"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=True)
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert result["devices"] == 4 and result["global_batch"] == 4
  assert result["mesh"] == {"data": 2, "fsdp": 2, "tensor": 1}
  assert result["memory_per_device"]["total_bytes"] > 0


def test_cli_bad_mesh_fails():
  out = subprocess.run(
      [sys.executable, "-m", "preflmr_jax.tools.plan", "--config", "configs/tiny.py",
       "--mesh", "data=two"], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert out.returncode != 0 and "--mesh" in out.stderr


def test_cli_num_slices_needs_a_topology():
  out = subprocess.run(
      [sys.executable, "-m", "preflmr_jax.tools.plan", "--config", "configs/tiny.py",
       "--mesh", "data=2", "--num_slices", "2"], cwd=ROOT, capture_output=True, text=True,
      timeout=120)
  assert out.returncode != 0 and "--num_slices needs --topology" in out.stderr


# The TPU compile itself (one slice and two) runs in CI's jax[tpu] environment: .ci/run.
def test_topology_compiles_for_tpu_or_says_what_to_install():
  out = subprocess.run(
      [sys.executable, "-m", "preflmr_jax.tools.plan", "--config", "configs/tiny.py",
       "--mesh", "data=2,fsdp=2,tensor=1", "--batch_size", "4", "--topology", "v5e:2x2"],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  if importlib.util.find_spec("libtpu") is None:
    assert out.returncode != 0 and "requirements-tpu-plan.txt" in out.stderr
  else:
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["platform"] == "tpu" and result["devices"] == 4
    assert result["memory_per_device"]["argument_bytes"] > 0 and result["flops_per_step"] > 0
