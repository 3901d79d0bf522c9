r"""Compile-only memory plan: lowers and compiles the real train step from shapes alone.

  python -m preflmr_jax.tools.plan --config configs/release.py:vit_l --mesh data=1,fsdp=8,tensor=1 \
      [--batch_size N] [--topology v5e:4x4 [--num_slices 2] | --topology h100:8]

Without --topology it simulates the mesh's devices on the CPU; with it, it compiles for a real TPU
topology (needs `pip install -r requirements-tpu-plan.txt`), of `--num_slices` slices joined by the
data-center network (the mesh's `data` axis is split over them: `slice_of_data_index`), or for
NVIDIA GPUs, `KIND:GPUS` or `KIND:HOSTSxGPUS` (needs `pip install -r requirements-gpu-plan.txt`;
XLA compiles for the chip without one, so it skips autotuning). Nothing is allocated: parameters,
optimiser state and the batch are ShapeDtypeStructs. Prints a table, then one JSON object as the
last line of stdout (memory is per device).
"""

from __future__ import annotations

import collections
import contextlib
import importlib.util
import json
import math
import os
import re
import tempfile
import time
from typing import Mapping, Sequence

from absl import app, flags
from ml_collections import config_flags

from preflmr_jax import cli
from preflmr_jax.tools import gpu_launches
from preflmr_jax.user_errors import ConfigError, UserError

def define_flags():
  """Defined only when run as a program, so that importing the module defines no absl flags."""
  config_flags.DEFINE_config_file("config", None, "Experiment config file (path[:arg]).",
                                  lock_config=True)
  flags.DEFINE_string("mesh", None, "Mesh shape, e.g. data=1,fsdp=8,tensor=1.")
  flags.DEFINE_integer("batch_size", None, "Global batch size (default: the config's).")
  flags.DEFINE_string("topology", None, "TPU topology, e.g. v5e:4x4 (needs libtpu), or GPUs, e.g. "
                      f"h100:8 or h100:2x8 (hosts x GPUs; kinds {sorted(GPU_KINDS)}).")
  flags.DEFINE_integer("num_slices", 1, "With --topology: that many slices of it (multislice).")

MESH_AXES = ("data", "fsdp", "tensor")  # = sharding.MESH_AXES (not imported: keeps jax unloaded)
TPU_REQUIREMENTS = "pip install -r requirements-tpu-plan.txt"
GPU_REQUIREMENTS = "pip install -r requirements-gpu-plan.txt"

# What XLA's GPU compiler must know of a chip it cannot query (stream_executor's
# GpuTargetConfigProto): NVIDIA's figures for the SXM parts; memory as the driver reports it.
_HOPPER = dict(core_count=132, fpus_per_core=128, clock_rate_ghz=1.98, threads_per_warp=32,
               threads_per_block_limit=1024, threads_per_core_limit=2048,
               registers_per_block_limit=65536, registers_per_core_limit=65536,
               shared_memory_per_block=48 * 2**10, shared_memory_per_block_optin=227 * 2**10,
               shared_memory_per_core=228 * 2**10, l2_cache_size=50 * 2**20,
               block_dim_limit_x=2**31 - 1, block_dim_limit_y=65535, block_dim_limit_z=65535,
               cuda_compute_capability=dict(major=9, minor=0))
GPU_KINDS = {  # --topology name: (device kind, chip)
    "h100": ("NVIDIA H100 80GB HBM3",
             dict(_HOPPER, device_memory_size=81559 * 2**20, memory_bandwidth=3_350 * 10**9)),
    "h200": ("NVIDIA H200",
             dict(_HOPPER, device_memory_size=143771 * 2**20, memory_bandwidth=4_800 * 10**9)),
}


def parse_mesh(text: str) -> dict[str, int]:
  """'data=2,fsdp=4' -> {'data': 2, 'fsdp': 4}; errors name --mesh."""
  mesh = {}
  for part in (text or "").split(","):
    axis, eq, size = part.strip().partition("=")
    if not eq or axis not in MESH_AXES or not size.strip().isdigit() or int(size) < 1:
      raise ConfigError(f"--mesh={text!r}: expected comma-separated AXIS=SIZE with AXIS in "
                        f"{MESH_AXES} and SIZE >= 1, e.g. data=1,fsdp=8,tensor=1")
    if axis in mesh:
      raise ConfigError(f"--mesh={text!r}: axis {axis!r} given twice")
    mesh[axis] = int(size)
  return mesh


def _text_proto(fields: Mapping) -> str:
  return " ".join(f"{k} {{ {_text_proto(v)} }}" if isinstance(v, Mapping)
                  else f"{k}: {json.dumps(v)}" for k, v in fields.items())


def gpu_topology(name: str) -> tuple[str, int, int] | None:
  """'h100:8' -> ('h100', 1, 8); 'h100:2x8' -> ('h100', 2, 8) (hosts, GPUs per host); None for a
  name that is not a GPU kind's."""
  kind, _, shape = name.partition(":")
  if kind.lower() not in GPU_KINDS:
    return None
  match = re.fullmatch(r"(?:(\d+)x)?(\d+)", shape)
  if not match or int(match[2]) < 1 or int(match[1] or 1) < 1:
    raise ConfigError(f"--topology={name}: expected {kind}:GPUS or {kind}:HOSTSxGPUS, e.g. "
                      f"{kind}:8 or {kind}:2x8")
  return kind.lower(), int(match[1] or 1), int(match[2])


def topology_devices(name: str, num_slices: int = 1):
  """The devices of `num_slices` slices of a TPU topology such as 'v5e:4x4', or of GPUs such as
  'h100:2x8' (compile-only; nothing runs on them). Each device has the `process_index` of its
  host; a TPU device its `slice_index`."""
  gpus = gpu_topology(name)
  if gpus:
    if num_slices != 1:
      raise ConfigError(f"--num_slices is for TPU topologies, not --topology={name}")
    return _gpu_devices(*gpus)
  if not re.match(r"(v|tpu)\d", name.lower()):  # v5e:4x4, tpu7x:2x2x1
    raise ConfigError(f"--topology={name}: expected a TPU topology such as v5e:4x4 or GPUs of a "
                      f"known kind ({', '.join(GPU_KINDS)}) such as h100:8")
  try:
    import libtpu  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    raise ConfigError(f"--topology={name} needs jax[tpu] (libtpu); {TPU_REQUIREMENTS}") from None
  # Silence libtpu's warnings about the missing TPU (any value works for a compile-only run).
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-16")
  # Compile-only: several plans may run at once (libtpu otherwise locks /tmp/libtpu_lockfile).
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  import jax  # pylint: disable=g-import-not-at-top
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  try:
    return topologies.get_topology_desc(platform="tpu", topology_name=name,
                                        num_slices=num_slices).devices
  except jax.errors.JaxRuntimeError as e:  # libtpu's word on a name it does not take
    raise ConfigError(f"--topology={name}: {str(e).splitlines()[0]}") from None


def _gpu_devices(kind: str, hosts: int, per_host: int):
  if importlib.util.find_spec("jax_cuda12_plugin") is None:
    raise ConfigError(f"--topology={kind}:... needs jax's CUDA plugin; {GPU_REQUIREMENTS}")
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  description, chip = GPU_KINDS[kind]
  target = {"gpu_device_info": chip, "platform_name": "CUDA", "device_description_str": description}
  return topologies.get_topology_desc(platform="cuda", topology=f"1x{hosts}x{per_host}",
                                      target_config=_text_proto(target)).devices


def _memory(compiled, platform: str) -> dict[str, int]:
  m = compiled.memory_analysis()
  fields = ("argument", "output", "temp", "generated_code", "alias")
  out = {f"{k}_bytes": int(getattr(m, f"{k}_size_in_bytes", 0) or 0) for k in fields}
  # Donated (aliased) outputs reuse their argument buffers.
  out["total_bytes"] = (out["argument_bytes"] + out["output_bytes"] + out["temp_bytes"]
                        + out["generated_code_bytes"] - out["alias_bytes"])
  # XLA's own peak estimate: meaningful on TPU and GPU; on CPU it leaves out temporaries.
  peak = getattr(m, "peak_memory_in_bytes", None)
  if peak and platform != "cpu":
    out["peak_bytes"] = int(peak)
  return out


def _custom_calls(compiled) -> dict[str, int]:
  """Custom-call targets in the compiled step, with counts (a Pallas kernel is `tpu_custom_call`
  on TPU): what runs outside XLA's own fusions."""
  targets = re.findall(r'custom_call_target="([^"]+)"', compiled.as_text())
  return dict(sorted(collections.Counter(targets).items()))


def _flops(compiled) -> float:
  return float((compiled.cost_analysis() or {}).get("flops", 0.0))


def plan(config, mesh_config: Mapping[str, int], devices: Sequence | None = None) -> dict:
  """Compiles `config`'s train step for `mesh_config` on `devices` (default: all); returns the plan."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top

  from preflmr_jax import sharding, train  # pylint: disable=g-import-not-at-top

  devices = list(jax.devices() if devices is None else devices)
  size = math.prod(int(mesh_config.get(a, 1)) for a in MESH_AXES)
  if size > len(devices):
    raise ConfigError(f"--mesh {dict(mesh_config)} needs {size} devices, {len(devices)} available")
  devices = devices[:size]
  mesh = sharding.make_mesh(mesh_config, devices)
  train.validate(config, mesh)  # the trainer's own checks, e.g. the hosts can feed the batch
  shape = dict(zip(sharding.MESH_AXES, mesh.devices.shape))

  setup = train.setup_train_step(config, mesh)  # the trainer's own construction
  gpu = devices[0].platform == "gpu"
  start = time.perf_counter()
  with (tempfile.TemporaryDirectory() if gpu else contextlib.nullcontext() as dump,
        jax.set_mesh(mesh),
        nn.logical_axis_rules(setup.rules)):
    try:  # on GPUs XLA also writes its executable's thunks, to count the launches of a step
      compiled = setup.train_step.lower(setup.abstract_state, setup.abstract_batch).compile(
          gpu_launches.dump_options(dump) if gpu else None)
    except jax.errors.JaxRuntimeError as e:  # the answer a plan exists to give, not a crash
      why = str(e).partition("RESOURCE_EXHAUSTED:")[2].strip()
      if not why:
        raise
      raise _does_not_fit(devices[0], config, shape, why.splitlines()[0]) from e
    compile_s = time.perf_counter() - start
    # A dump this XLA writes differently costs the counts, not the plan.
    launches = {"gpu_launches": gpu_launches.read_or_error(dump)} if gpu else {}
  memory = _memory(compiled, devices[0].platform)
  check_fits_gpu(memory, devices[0], config, shape)

  info = train.run_info(config, setup)
  return {
      "mesh": shape,
      "devices": size,
      "platform": devices[0].platform,
      "slices": sharding.num_slices(devices),
      "slice_of_data_index": _slice_of_data_index(mesh),
      "device_kind": devices[0].device_kind,
      "global_batch": int(config.batch_size),
      "params_total": info["params_total"],
      "params_trainable": info["params_trainable"],
      "flops_per_step": info["train_flops_per_step"],  # the model's, all devices
      # XLA's count for one device after partitioning: a loop's body counts once (scanned layers).
      "xla_flops_per_device": _flops(compiled),
      "memory_per_device": memory,
      "custom_calls": _custom_calls(compiled),
      "compile_s": round(compile_s, 2),  # tracing, lowering and XLA's compile (and its dump)
      **launches,  # per step, on one GPU: see tools/gpu_launches.py
  }


def _does_not_fit(device, config, shape, why: str) -> UserError:
  return UserError(f"the train step does not fit on {device.device_kind} at global batch "
                   f"{config.batch_size}, mesh {shape}: {why} (model.remat, model.scan_layers, a "
                   "larger fsdp or a smaller batch need less)")


def check_fits_gpu(memory: Mapping[str, int], device, config, shape) -> None:
  """XLA's GPU compiler does not check its peak against the chip's memory (the TPU's does): the
  plan does, for the GPU kinds it knows."""
  hbm = next((chip["device_memory_size"] for kind, chip in GPU_KINDS.values()
              if kind == device.device_kind), None)
  if hbm and memory.get("peak_bytes", 0) > hbm:
    raise _does_not_fit(device, config, shape, f"XLA's peak {memory['peak_bytes'] / 2**30:.2f} "
                        f"GiB per device, {hbm / 2**30:.2f} GiB on the chip")


def _slice_of_data_index(mesh) -> list:
  """For each index along `data`, the slice holding it (None if it spans slices): the check that
  fsdp and tensor collectives stay within a slice."""
  out = []
  for row in mesh.devices:
    slices = {getattr(d, "slice_index", 0) for d in row.flat}
    out.append(slices.pop() if len(slices) == 1 else None)
  return out


def _table(result: dict) -> str:
  def size(n):
    for unit, k in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
      if n >= 2**k:
        return f"{n / 2**k:10.2f} {unit}"
    return f"{n:10d} B"

  rows = [("mesh", ",".join(f"{k}={v}" for k, v in result["mesh"].items())),
          ("devices", f"{result['devices']} x {result['device_kind']}, {result['slices']} slice(s)"),
          ("global batch", result["global_batch"]),
          ("params total", f"{result['params_total']:,}"),
          ("params trainable", f"{result['params_trainable']:,}"),
          ("flops / step", f"{result['flops_per_step']:.4g} (model), "
                           f"{result['xla_flops_per_device']:.4g} / device (XLA)"),
          ("compile", f"{result['compile_s']:.1f} s")]
  rows += [(f"{k[:-6]} / device", size(v)) for k, v in result["memory_per_device"].items()]
  launches = result.get("gpu_launches")
  if launches and "error" in launches:
    rows.append(("launches / step", f"not counted: {launches['error']}"))
  elif launches:
    rows += [("launches / step", f"{launches['launches']}, of them "
                                 f"{launches['by_kind'].get('kCommandBuffer', 0)} CUDA graphs "
                                 f"({launches['kernels']} kernels in all)"),
             ("slice copies / step", f"{launches['slice_copies']}, "
                                     f"{size(launches['slice_copy_bytes']).strip()}")]
    rows += [("host waits on", sync) for sync in launches["host_syncs"]]
  return "\n".join(f"{name:>22s}  {value}" for name, value in rows)


def main(argv):
  del argv  # cli.run refuses extra arguments
  try:
    mesh_config = parse_mesh(flags.FLAGS.mesh)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  size = math.prod(mesh_config.values())
  import jax  # pylint: disable=g-import-not-at-top
  # A step loaded from a persistent compilation cache is not compiled: no compile time to report,
  # no dump of it to count GPU launches from.
  jax.config.update("jax_enable_compilation_cache", False)
  if flags.FLAGS.topology:
    if gpu_topology(flags.FLAGS.topology):  # compiled for; the host's own backend is the CPU
      jax.config.update("jax_platforms", "cpu")
    devices = topology_devices(flags.FLAGS.topology, flags.FLAGS.num_slices)
    if size != len(devices):
      raise app.UsageError(f"--mesh {mesh_config} has {size} devices; --topology="
                           f"{flags.FLAGS.topology} x --num_slices={flags.FLAGS.num_slices} has "
                           f"{len(devices)}")
  elif flags.FLAGS.num_slices != 1:
    raise app.UsageError("--num_slices needs --topology (CPU devices have no slices)")
  else:  # simulate the mesh's devices (must precede the first device query)
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", size)
    devices = jax.devices()
  config = flags.FLAGS.config
  if flags.FLAGS.batch_size is not None:
    config.batch_size = flags.FLAGS.batch_size
  result = plan(config, mesh_config, devices)
  print(_table(result))
  print(json.dumps(result))


if __name__ == "__main__":
  define_flags()
  flags.mark_flags_as_required(["config", "mesh"])
  cli.run(main)
