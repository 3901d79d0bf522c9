"""Device mesh and logical-axis sharding.

Model code names logical axes only (models/layers.py); `config.logical_axis_rules` (default
`LOGICAL_AXIS_RULES`) maps them to the mesh axes `data`, `fsdp`, `tensor` built here from
`config.mesh`. The batch is split over the mesh axes of the `act_batch` rule (`batch_axes`), in
the model and in the input pipeline alike.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from absl import logging
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from preflmr_jax.models import layers
from preflmr_jax.user_errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axis. Parameters shard their model width over `fsdp` and their heads / FFN /
# vocab over `tensor`; activations shard the batch over (`data`, `fsdp`) and heads / FFN over
# `tensor`. Axes not named here (or mapped to None) are replicated.
LOGICAL_AXIS_RULES = (
    ("act_batch", ("data", "fsdp")),
    ("act_length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("position", None),
    ("norm", None),
    ("proj", None),
    (layers.STACK_AXIS, None),  # scanned layers: each device holds every layer's slice
)


def mesh_shape(mesh_config: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
  """Resolves `config.mesh` (one axis may be -1: the rest of the devices) to a full shape."""
  unknown = sorted(set(mesh_config) - set(MESH_AXES))
  if unknown:
    raise ConfigError(f"config.mesh: unknown axis {unknown}; the axes are {MESH_AXES}")
  sizes = [int(mesh_config.get(a, 1)) for a in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ConfigError(f"config.mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
  for axis, size in zip(MESH_AXES, sizes):
    if size == 0 or size < -1:
      raise ConfigError(f"config.mesh.{axis}={size}: must be a positive size or -1")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ConfigError(f"config.mesh: {num_devices} devices are not divisible by the fixed axes "
                        f"{dict(zip(MESH_AXES, sizes))}")
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ConfigError(f"config.mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
                      f"but {num_devices} are available")
  return tuple(sizes)


def initialize_distributed() -> None:
  """`jax.distributed.initialize()` for multi-host runs (`config.distributed=True`).

  Cloud TPU, GKE and SLURM are detected by JAX itself. Elsewhere (`launch/gpu.py hosts`)
  the coordinator comes from JAX_COORDINATOR_ADDRESS, which JAX reads, and the process count and
  index from JAX_NUM_PROCESSES / JAX_PROCESS_ID, which JAX does not.
  """
  kwargs = {}
  for arg, var in (("num_processes", "JAX_NUM_PROCESSES"), ("process_id", "JAX_PROCESS_ID")):
    if var in os.environ:
      if not os.environ[var].isdigit():
        raise ConfigError(f"{var}={os.environ[var]!r}: expected a non-negative integer")
      kwargs[arg] = int(os.environ[var])
  try:
    jax.distributed.initialize(**kwargs)
  except ValueError as e:  # e.g. no cluster found and no coordinator given
    hint = (" (JAX found no Cloud TPU, GKE or SLURM cluster; elsewhere set "
            "JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID, or run one process "
            "with config.distributed=False)") if "coordinator_address" in str(e) else ""
    raise ConfigError(f"config.distributed=True: {e}{hint}") from None


def make_mesh(mesh_config: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ('data', 'fsdp', 'tensor') mesh with Auto axes (linen logical constraints need Auto)."""
  devices = jax.devices() if devices is None else list(devices)
  grid = device_grid(mesh_shape(mesh_config, len(devices)), devices)
  return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def num_slices(devices: Sequence[Any]) -> int:
  """Slices the devices span: TPU slices, or GPU nodes (devices without `slice_index`, e.g. CPU,
  are one slice)."""
  return len({getattr(d, "slice_index", 0) for d in devices})


def device_grid(shape: Sequence[int], devices: Sequence[Any]) -> np.ndarray:
  """Devices arranged as `shape` (data, fsdp, tensor) in a topology-aware order.

  Across TPU slices (and GPU nodes, which JAX also gives a `slice_index`) only the slower network
  connects devices, so `data` (one gradient all-reduce per step) is the axis split over slices;
  `fsdp` and `tensor` (collectives in every layer) stay within a slice.
  """
  slices = num_slices(devices)
  one_slice = lambda split: mesh_utils.create_device_mesh(shape, devices,
                                                          allow_split_physical_axes=split)
  if slices == 1:
    return _topology_grid(shape, devices, one_slice)
  data, *inner = shape
  if data % slices:
    if devices[0].platform == "tpu":  # per-layer collectives over the data-center network: refused
      raise ConfigError(f"config.mesh.data={data} is not divisible by the {slices} slices the "
                        "devices span: the data axis is split over slices, fsdp and tensor stay "
                        "within one")
    # GPU nodes (JAX's slices there) commonly run FSDP over their network: allowed, but said.
    logging.warning("config.mesh.data=%d is not a multiple of the %d nodes: fsdp / tensor "
                    "collectives cross nodes", data, slices)
    return _topology_grid(shape, devices, one_slice)
  per_slice, across = (data // slices, *inner), (slices,) + (1,) * len(inner)
  # Slice-major device order: a plain reshape still keeps fsdp and tensor within a slice.
  by_slice = sorted(devices, key=lambda d: d.slice_index)
  return _topology_grid(shape, by_slice, lambda split: mesh_utils.create_hybrid_device_mesh(
      per_slice, across, devices, allow_split_physical_axes=split))


def _topology_grid(shape, devices, make) -> np.ndarray:
  """`make(allow_split_physical_axes)`, first keeping physical axes whole; otherwise (a shape the
  topology cannot host, or devices whose coordinates do not form a box) `devices` in their order,
  with a warning."""
  for split in (False, True):
    try:
      return make(split)
    except (ValueError, NotImplementedError, AssertionError) as e:
      reason = str(e)
  logging.warning("config.mesh %s: no topology-aware device order (%s); using the plain device "
                  "order, so collectives may take slower links", dict(zip(MESH_AXES, shape)),
                  reason)
  return np.asarray(devices).reshape(shape)


def axis_rules(rules) -> tuple:
  """`config.logical_axis_rules` as nested tuples: a config file may write lists, and jit, flax's
  rule context and the cached shard counts below need the rules hashable."""
  return tuple(map(axis_rules, rules)) if isinstance(rules, (list, tuple)) else rules


def logical_to_shardings(logical_tree: Any, mesh: Mesh, rules) -> Any:
  """Boxed (nn.Partitioned) abstract variables or PartitionSpecs of logical names -> NamedShardings."""
  specs = nn.get_partition_spec(logical_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, axis_rules(rules))


def batch_axes(rules) -> tuple[str, ...]:
  """The mesh axes a batch's rows are split over: those of the `act_batch` rule, in order."""
  axes = dict(tuple(r) for r in rules).get("act_batch")
  axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
  unknown = [a for a in axes if a not in MESH_AXES]
  if unknown:
    raise ConfigError(f"config.logical_axis_rules: 'act_batch' -> unknown mesh axis {unknown}; "
                      f"mesh axes are {MESH_AXES}")
  return axes


def num_batch_shards(mesh: Mesh, rules) -> int:
  return math.prod(mesh.shape[a] for a in batch_axes(rules))


def batch_sharding(mesh: Mesh, rank: int, rules) -> NamedSharding:
  """Leading (batch) axis over `batch_axes(rules)`, the rest replicated."""
  return NamedSharding(mesh, PartitionSpec(batch_axes(rules) or None, *([None] * (rank - 1))))


def init_sharded(init_fn, mesh: Mesh, rules, *args, logical=None):
  """Runs `init_fn(*args)` jitted so that every parameter is created directly in its sharding;
  returns (unboxed variables, their shardings). `init_fn` returns boxed variables, or unboxed ones
  when `logical` (their boxed abstract tree, which names the logical axes) is given."""
  if logical is None:
    logical = jax.eval_shape(init_fn, *args)
  shardings = logical_to_shardings(logical, mesh, rules)
  with jax.set_mesh(mesh), nn.logical_axis_rules(axis_rules(rules)):
    variables = jax.jit(init_fn, out_shardings=nn.meta.unbox(shardings))(*args)
  return nn.meta.unbox(variables), nn.meta.unbox(shardings)


def check_rules(rules, param_axes: set[str]) -> None:
  """Fails before compiling when `config.logical_axis_rules` has a typo, an axis the model does not
  use, a mesh axis that does not exist, or misses an axis the model uses."""
  used = set(param_axes) | set(layers.ACTIVATION_AXES)
  known = used | {layers.STACK_AXIS}  # a rule for it is harmless when nothing is scanned
  named = set()
  for rule in rules:
    if len(rule) != 2:
      raise ConfigError(f"config.logical_axis_rules: {rule!r} is not a (logical, mesh) pair")
    logical, mesh_axes = rule
    if logical not in known:
      raise ConfigError(f"config.logical_axis_rules: unknown logical axis {logical!r}; the model uses "
                        f"{sorted(known)}")
    for axis in (mesh_axes,) if isinstance(mesh_axes, (str, type(None))) else mesh_axes:
      if axis is not None and axis not in MESH_AXES:
        raise ConfigError(f"config.logical_axis_rules: {logical!r} -> unknown mesh axis {axis!r}; "
                          f"mesh axes are {MESH_AXES}")
    named.add(logical)
  missing = sorted(used - named)
  if missing:
    raise ConfigError(f"config.logical_axis_rules: no rule for logical axis {missing} (map it to "
                      "None to replicate)")


def check_divisible(boxed_tree: Any, mesh: Mesh, rules) -> None:
  """Fails before compiling when a parameter's dimension is split over mesh axes whose size does
  not divide it (XLA's own error comes from deep inside the lowering), naming the parameter, its
  logical axis and the mesh axes."""
  is_spec = lambda x: isinstance(x, PartitionSpec)
  logical = nn.get_partition_spec(boxed_tree)
  on_mesh = nn.logical_to_mesh(logical, axis_rules(rules))
  leaves = jax.tree_util.tree_flatten_with_path(nn.meta.unbox(boxed_tree))[0]
  for (path, leaf), names, axes in zip(leaves, jax.tree.leaves(logical, is_leaf=is_spec),
                                       jax.tree.leaves(on_mesh, is_leaf=is_spec)):
    for dim, (size, name, axis) in enumerate(zip(leaf.shape, names, axes)):
      axis = () if axis is None else (axis,) if isinstance(axis, str) else tuple(axis)
      shards = math.prod(mesh.shape[a] for a in axis)
      if size % shards:
        raise ConfigError(
            f"parameter {jax.tree_util.keystr(path)} {list(leaf.shape)}: dimension {dim} "
            f"({name!r}, {size}) is split over mesh axes {list(axis)} into {shards} shards, which "
            "do not divide it; change config.mesh, or map "
            f"{name!r} elsewhere in config.logical_axis_rules")


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


def batch_shards_by_process(mesh: Mesh, rules) -> dict[int, list[int]]:
  """Process index -> the batch shards its devices hold, ascending. Shard k is the k-th block of
  rows along the batch axes (`batch_sharding`); the devices at one position along them hold the
  same shard. Assumes `check_batch_sharding(mesh, rules)` passed."""
  by_process: dict[int, set[int]] = {}
  for k, processes in _batch_shard_processes(mesh, rules).items():
    for p in processes:
      by_process.setdefault(p, set()).add(k)
  return {p: sorted(shards) for p, shards in sorted(by_process.items())}


def _batch_shard_processes(mesh: Mesh, rules) -> dict[int, set[int]]:
  """Batch shard -> the processes whose devices hold it."""
  axes = batch_axes(rules)
  where = [mesh.axis_names.index(a) for a in axes]
  sizes = [mesh.shape[a] for a in axes]
  processes: dict[int, set[int]] = {}
  for position, device in np.ndenumerate(mesh.devices):
    k = int(np.ravel_multi_index([position[i] for i in where], sizes)) if axes else 0
    processes.setdefault(k, set()).add(device.process_index)
  return processes


def check_batch_sharding(mesh: Mesh, rules) -> None:
  """Refuses a mesh whose batch the processes cannot feed by each reading its own rows.

  Every process supplies the rows of the batch shards its devices hold (`global_batch`). A shard
  held by devices of two processes (an axis outside the batch axes, e.g. `tensor`, crossing a
  process boundary) would need both to supply the same rows, but they read different ones: the
  replicas would silently differ. And each process reads `batch_size / process_count` rows, so
  every process must hold as many shards.
  """
  shape, axes = dict(mesh.shape), batch_axes(rules)
  for k, processes in sorted(_batch_shard_processes(mesh, rules).items()):
    if len(processes) > 1:
      index = np.unravel_index(k, [shape[a] for a in axes]) if axes else ()
      where = ", ".join(f"{a}={int(i)}" for a, i in zip(axes, index))
      raise ConfigError(
          f"config.mesh {shape}: batch shard {k} ({where}) lies on devices of processes "
          f"{sorted(processes)}, which read different rows; the axes outside the batch axes "
          f"{axes} (tensor) must stay within one process (a smaller config.mesh.tensor, or fsdp "
          "instead)")
  counts = {p: len(shards) for p, shards in batch_shards_by_process(mesh, rules).items()}
  if len(set(counts.values())) > 1:
    raise ConfigError(f"config.mesh {shape}: processes hold unequal numbers of batch shards "
                      f"{counts}, but each reads batch_size / process_count rows")


def process_batch_rows(mesh: Mesh, batch_size: int, process_index: int, rules) -> np.ndarray:
  """The rows of a global batch of `batch_size` that process `process_index` supplies to
  `global_batch`, in the order it must supply them: its batch shards' rows, ascending. With the
  plain device order (CPU, GPU) process p's rows are [p * b, (p + 1) * b); a TPU topology order may
  give a process shards that are not one block (e.g. a ring: shards 0, 1, 6, 15 of 16)."""
  shards = batch_shards_by_process(mesh, rules)[process_index]
  num_shards = num_batch_shards(mesh, rules)
  if batch_size % num_shards:
    raise ConfigError(f"config.batch_size={batch_size} is not divisible by the {num_shards} batch "
                      f"shards (mesh axes {batch_axes(rules)})")
  rows = batch_size // num_shards
  return np.concatenate([np.arange(k * rows, (k + 1) * rows) for k in shards])


@functools.lru_cache(maxsize=16)  # once per run, not once per step: a pod's mesh has many devices
def _process_shard_counts(mesh: Mesh, rules, process_index: int) -> tuple[int, int]:
  """(batch shards process `process_index` holds, batch shards in all)."""
  shards = batch_shards_by_process(mesh, rules)
  return len(shards[process_index]), sum(len(s) for s in shards.values())


def global_batch(mesh: Mesh, local_batch: Mapping[str, np.ndarray], rules) -> dict[str, jax.Array]:
  """This process's rows -> global arrays sharded over the batch axes on the leading axis.

  The global shape is explicit: the local rows times the number of batch shards over this
  process's. The local rows fill this process's shards in ascending order (`process_batch_rows`).
  """
  mine, total = _process_shard_counts(mesh, axis_rules(rules), jax.process_index())
  out = {}
  for key, value in local_batch.items():
    value = np.asarray(value)
    rows = value.shape[0]
    if rows % mine:
      raise ValueError(f"batch[{key!r}]: {rows} rows do not split evenly over this process's "
                       f"{mine} batch shards")
    out[key] = jax.make_array_from_process_local_data(
        batch_sharding(mesh, value.ndim, rules), value, (rows // mine * total, *value.shape[1:]))
  return out
