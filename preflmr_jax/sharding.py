"""Device mesh and logical-axis sharding.

Model code names logical axes only (models/layers.py); `config.logical_axis_rules` maps them to the
mesh axes `data`, `fsdp`, `tensor` built here from `config.mesh`.
"""

from __future__ import annotations

import math
import os
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")


def mesh_shape(mesh_config: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
  """Resolves `config.mesh` (one axis may be -1: the rest of the devices) to a full shape."""
  unknown = sorted(set(mesh_config) - set(MESH_AXES))
  if unknown:
    raise ValueError(f"config.mesh: unknown axis {unknown}; the axes are {MESH_AXES}")
  sizes = [int(mesh_config.get(a, 1)) for a in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f"config.mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
  for axis, size in zip(MESH_AXES, sizes):
    if size == 0 or size < -1:
      raise ValueError(f"config.mesh.{axis}={size}: must be a positive size or -1")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(f"config.mesh: {num_devices} devices are not divisible by the fixed axes "
                       f"{dict(zip(MESH_AXES, sizes))}")
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(f"config.mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
                     f"but {num_devices} are available")
  return tuple(sizes)


def initialize_distributed() -> None:
  """`jax.distributed.initialize()` for multi-host runs (`config.distributed=True`).

  Cloud TPU, GKE and SLURM are detected by JAX itself. Elsewhere (`launch/gpu.py --scheduler=none`)
  the coordinator comes from JAX_COORDINATOR_ADDRESS, which JAX reads, and the process count and
  index from JAX_NUM_PROCESSES / JAX_PROCESS_ID, which JAX does not.
  """
  kwargs = {}
  for arg, var in (("num_processes", "JAX_NUM_PROCESSES"), ("process_id", "JAX_PROCESS_ID")):
    if var in os.environ:
      if not os.environ[var].isdigit():
        raise ValueError(f"{var}={os.environ[var]!r}: expected a non-negative integer")
      kwargs[arg] = int(os.environ[var])
  jax.distributed.initialize(**kwargs)


def make_mesh(mesh_config: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ('data', 'fsdp', 'tensor') mesh with Auto axes (linen logical constraints need Auto)."""
  devices = jax.devices() if devices is None else list(devices)
  shape = mesh_shape(mesh_config, len(devices))
  try:  # topology-aware device order on real TPU / GPU slices
    from jax.experimental import mesh_utils  # pylint: disable=g-import-not-at-top
    grid = mesh_utils.create_device_mesh(shape, devices=devices)
  except (ValueError, NotImplementedError, AssertionError):
    grid = np.asarray(devices).reshape(shape)
  return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def logical_to_shardings(logical_tree: Any, mesh: Mesh, rules) -> Any:
  """Boxed (nn.Partitioned) abstract variables or PartitionSpecs of logical names -> NamedShardings."""
  specs = nn.get_partition_spec(logical_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, tuple(rules))


def batch_sharding(mesh: Mesh, rank: int) -> NamedSharding:
  """Leading (batch) axis over (`data`, `fsdp`), the rest replicated."""
  return NamedSharding(mesh, PartitionSpec(("data", "fsdp"), *([None] * (rank - 1))))


def init_sharded(init_fn, mesh: Mesh, rules, *args):
  """Runs `init_fn(*args)` (returning boxed variables) jitted so that every parameter is created
  directly in its sharding; returns (unboxed variables, their shardings)."""
  abstract = jax.eval_shape(init_fn, *args)
  shardings = logical_to_shardings(abstract, mesh, rules)
  with jax.set_mesh(mesh), nn.logical_axis_rules(tuple(rules)):
    variables = jax.jit(init_fn, out_shardings=shardings)(*args)
  return nn.meta.unbox(variables), nn.meta.unbox(shardings)


# Activation axes the model code constrains (models/layers.py, models/preflmr.py).
ACTIVATION_AXES = ("act_batch", "act_length", "act_embed", "act_heads", "act_mlp")


def check_rules(rules, param_axes: set[str]) -> None:
  """Fails before compiling when `config.logical_axis_rules` has a typo, an axis the model does not
  use, a mesh axis that does not exist, or misses an axis the model uses."""
  known = set(param_axes) | set(ACTIVATION_AXES)
  named = set()
  for rule in rules:
    if len(rule) != 2:
      raise ValueError(f"config.logical_axis_rules: {rule!r} is not a (logical, mesh) pair")
    logical, mesh_axes = rule
    if logical not in known:
      raise ValueError(f"config.logical_axis_rules: unknown logical axis {logical!r}; the model uses "
                       f"{sorted(known)}")
    for axis in (mesh_axes,) if isinstance(mesh_axes, (str, type(None))) else mesh_axes:
      if axis is not None and axis not in MESH_AXES:
        raise ValueError(f"config.logical_axis_rules: {logical!r} -> unknown mesh axis {axis!r}; "
                         f"mesh axes are {MESH_AXES}")
    named.add(logical)
  missing = sorted(known - named)
  if missing:
    raise ValueError(f"config.logical_axis_rules: no rule for logical axis {missing} (map it to "
                     "None to replicate)")


def logical_axis_names(boxed_tree: Any) -> set[str]:
  """Every logical axis name in a tree of `nn.Partitioned` boxes (e.g. abstract boxed params)."""
  names = set()
  for spec in jax.tree.leaves(nn.get_partition_spec(boxed_tree),
                              is_leaf=lambda x: isinstance(x, PartitionSpec)):
    names.update(a for a in spec if isinstance(a, str))
  return names


def state_shardings_like_params(abstract_tree: Any, abstract_params: Any, param_shardings: Any,
                                mesh: Mesh) -> Any:
  """Shardings for an optimiser state: a leaf whose key path ends with a parameter's path (Adam's mu
  and nu mirror the params) and has its shape takes that parameter's sharding; anything else (step
  counters, scalars) is replicated."""
  by_path = {}
  for (path, s), p in zip(jax.tree_util.tree_leaves_with_path(param_shardings),
                          jax.tree.leaves(abstract_params)):
    by_path[tuple(k.key for k in path)] = (s, p.shape)
  replicated = NamedSharding(mesh, PartitionSpec())

  def pick(path, leaf):
    keys = tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))
    for start in range(len(keys)):
      s, shape = by_path.get(keys[start:], (None, None))
      if s is not None and shape == leaf.shape:
        return s
    return replicated

  return jax.tree_util.tree_map_with_path(pick, abstract_tree)


def global_batch(mesh: Mesh, local_batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
  """This host's rows -> global arrays sharded over (`data`, `fsdp`) on the leading axis."""
  return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(v)), np.asarray(v))
          for k, v in local_batch.items()}
