"""The two layouts of the encoders' layer parameters, and the table between them.

Per layer (the default, and the published checkpoints' layout): layer i of a stack is its own
subtree `<parent>/<prefix>_<i>`. Scanned (`config.model.scan_layers`): the stack is one subtree
`<parent>/<prefix>s` whose leaves carry a leading layer axis (logical axis `layers.STACK_AXIS`).
`stack` and `unstack` convert params trees (arrays, NumPy arrays or `jax.ShapeDtypeStruct`s, whose
shardings follow); the checkpoint readers use them so that either layout loads into either model.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from preflmr_jax.models import layers, param_groups

# (parent path, "" for the top level; layer prefix): every layer stack of the PreFLMR params tree.
STACKS = (
    (param_groups.key("query_text"), layers.LAYER_PREFIX),
    (param_groups.key("document_text"), layers.LAYER_PREFIX),
    (param_groups.key("vision"), layers.LAYER_PREFIX),
    ("", param_groups.MAPPING_LAYER_PREFIX),
)


def _nodes(params):
  """(stack's parent dict, prefix) pairs of `params`, a tree of fresh dicts."""
  for parent, prefix in STACKS:
    node = params if not parent else params.get(parent)
    if isinstance(node, dict):
      yield node, prefix


def is_stacked(params) -> bool:
  """Whether `params` is in the scanned layout."""
  return any(layers.stack_name(prefix) in node for node, prefix in _nodes(params))


def _stack_leaves(*xs):
  x = xs[0]
  if isinstance(x, jax.ShapeDtypeStruct):
    sharding = x.sharding
    if isinstance(sharding, NamedSharding):
      sharding = NamedSharding(sharding.mesh, PartitionSpec(None, *sharding.spec))
    return jax.ShapeDtypeStruct((len(xs),) + x.shape, x.dtype, sharding=sharding)
  return np.stack(xs) if isinstance(x, np.ndarray) else jnp.stack(xs)


def _layer_leaf(x, i: int):
  if isinstance(x, jax.ShapeDtypeStruct):
    sharding = x.sharding
    if isinstance(sharding, NamedSharding):
      sharding = NamedSharding(sharding.mesh, PartitionSpec(*sharding.spec[1:]))
    return jax.ShapeDtypeStruct(x.shape[1:], x.dtype, sharding=sharding)
  return x[i]


def stack(params) -> dict[str, Any]:
  """Per-layer -> scanned layout (a tree already scanned comes back as it is)."""
  params = jax.tree.map(lambda x: x, params)  # fresh dicts, the same leaves
  for node, prefix in _nodes(params):
    indices = sorted(int(m[1]) for k in node if (m := re.fullmatch(rf"{prefix}_(\d+)", k)))
    if not indices:
      continue
    if indices != list(range(len(indices))):
      raise ValueError(f"layers {prefix}_{indices} are not numbered 0..{len(indices) - 1}")
    per_layer = [node.pop(f"{prefix}_{i}") for i in indices]
    node[layers.stack_name(prefix)] = jax.tree.map(_stack_leaves, *per_layer)
  return params


def unstack(params) -> dict[str, Any]:
  """Scanned -> per-layer layout (a tree already per layer comes back as it is)."""
  params = jax.tree.map(lambda x: x, params)
  for node, prefix in _nodes(params):
    stacked = node.pop(layers.stack_name(prefix), None)
    if stacked is None:
      continue
    num_layers = jax.tree.leaves(stacked)[0].shape[0]
    for i in range(num_layers):
      node[f"{prefix}_{i}"] = jax.tree.map(lambda x, i=i: _layer_leaf(x, i), stacked)
  return params


def to_layout(params, scanned: bool) -> dict[str, Any]:
  """`params` in the scanned layout if `scanned`, else per layer."""
  return stack(params) if scanned else unstack(params)


__all__ = ["STACKS", "is_stacked", "stack", "to_layout", "unstack"]
