"""The compile-only memory plan: real train step compiled from shapes for simulated meshes."""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import types

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
    assert "peak_bytes" not in memory  # XLA's CPU estimate leaves the temporaries out
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


# The compiles themselves run in CI's side environments (.ci/run): for TPU, one slice and two; for
# GPUs, two hosts of two with the Triton kernel.
@pytest.mark.parametrize("topology, package, requirements, platform", [
    ("v5e:2x2", "libtpu", "requirements-tpu-plan.txt", "tpu"),
    ("h100:2x2", "jax_cuda12_plugin", "requirements-gpu-plan.txt", "gpu")])
def test_topology_compiles_or_says_what_to_install(topology, package, requirements, platform):
  out = subprocess.run(
      [sys.executable, "-m", "preflmr_jax.tools.plan", "--config", "configs/tiny.py",
       "--mesh", "data=2,fsdp=2,tensor=1", "--batch_size", "4", "--topology", topology],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  if importlib.util.find_spec(package) is None:
    assert out.returncode == 2 and requirements in out.stderr, out.stderr[-2000:]
    assert "Traceback" not in out.stderr, out.stderr[-2000:]
  else:
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["platform"] == platform and result["devices"] == 4
    assert result["memory_per_device"]["argument_bytes"] > 0 and result["flops_per_step"] > 0
    if platform == "gpu":  # read from XLA's dump of the step (tools/gpu_launches.py)
      assert 0 < result["gpu_launches"]["launches"] < result["gpu_launches"]["kernels"]


@pytest.mark.parametrize("name, expected", [("h100:8", ("h100", 1, 8)),
                                            ("H200:2x8", ("h200", 2, 8)),
                                            ("v5e:4x4", None), ("v5e:2x2x1", None)])
def test_gpu_topology_names(name, expected):
  assert plan.gpu_topology(name) == expected


@pytest.mark.parametrize("bad", ["h100", "h100:", "h100:0", "h100:0x8", "h100:2x", "h100:8x8x8"])
def test_bad_gpu_topology_names_the_flag(bad):
  with pytest.raises(ValueError, match=f"--topology={bad}: expected h100:GPUS or h100:HOSTSxGPUS"):
    plan.gpu_topology(bad)


@pytest.mark.parametrize("bad", ["a100:8", "tpu:4x4", "4x4"])
def test_unknown_topology_kinds_name_the_known_ones(bad):
  with pytest.raises(ValueError, match=f"--topology={bad}: expected a TPU topology such as "
                     r"v5e:4x4 or GPUs of a known kind \(h100, h200\)"):
    plan.topology_devices(bad)


def test_tpu_v7_names_pass_the_kind_check():
  try:  # libtpu, when installed, has the last word
    plan.topology_devices("tpu7x:2x2x1")
  except ValueError as e:
    assert "expected a TPU topology" not in str(e)


def test_gpu_target_config_is_text_proto():
  text = plan._text_proto({"a": 1, "b": {"c": "x", "d": {"e": 2.5}}})
  assert text == 'a: 1 b { c: "x" d { e: 2.5 } }'


def test_a_step_over_the_gpus_memory_is_one_line():
  """XLA's GPU compiler leaves the check to the plan: XLA's peak against the chip's memory."""
  h100 = types.SimpleNamespace(device_kind="NVIDIA H100 80GB HBM3")
  config = types.SimpleNamespace(batch_size=4096)
  plan.check_fits_gpu({"peak_bytes": 79 * 2**30}, h100, config, {"data": 8})
  plan.check_fits_gpu({"peak_bytes": 2**40}, types.SimpleNamespace(device_kind="cpu"), config, {})
  with pytest.raises(plan.UserError, match=r"^the train step does not fit on NVIDIA H100 80GB HBM3 "
                     r"at global batch 4096, mesh \{'data': 8\}: XLA's peak 80.00 GiB per device, "
                     r"79.65 GiB on the chip"):
    plan.check_fits_gpu({"peak_bytes": 80 * 2**30}, h100, config, {"data": 8})


def test_num_slices_is_for_tpus():
  with pytest.raises(ValueError, match="--num_slices is for TPU topologies, not --topology=h100:8"):
    plan.topology_devices("h100:8", num_slices=2)


@pytest.mark.parametrize("launches, shown", [
    ({"launches": 5, "kernels": 40, "by_kind": {"kCommandBuffer": 3}, "slice_copies": 2,
      "slice_copy_bytes": 3 * 2**20, "host_syncs": ["cond.1 (a conditional)"]},
     ["launches / step  5, of them 3 CUDA graphs (40 kernels in all)",
      "slice copies / step  2, 3.00 MiB", "host waits on  cond.1 (a conditional)"]),
    ({"error": "ValueError: line 7 does not follow"},
     ["launches / step  not counted: ValueError: line 7 does not follow"])])
def test_the_table_shows_the_gpu_launches(launches, shown):
  """A dump this XLA writes differently costs the counts, not the plan."""
  result = {"mesh": {"data": 1}, "devices": 1, "device_kind": "NVIDIA H100 80GB HBM3",
            "slices": 1, "global_batch": 8, "params_total": 10, "params_trainable": 5,
            "flops_per_step": 1e9, "xla_flops_per_device": 0.0, "compile_s": 1.0,
            "memory_per_device": {"total_bytes": 2**30}, "gpu_launches": launches}
  lines = [" ".join(line.split()) for line in plan._table(result).splitlines()]
  assert lines[-len(shown):] == [" ".join(line.split()) for line in shown]
