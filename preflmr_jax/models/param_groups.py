"""The top-level groups of the PreFLMR params tree (the submodules of `preflmr.PreFLMR`).

Whatever names parameter groups takes them from here: the optimiser's mapping learning rate,
the stages' frozen groups (`recipe.FREEZE`), parameter counts (`tools/count_params.py`), the
checkpoint conversion table and the FLOP model (`models/flops.py`).
"""

from __future__ import annotations

import re

from preflmr_jax.models import layers

MAPPING_LAYER_PREFIX = "mapping_layer"  # mapping layer i is `mapping_layer_<i>`

# Group -> its top-level param key; "{i}" stands for a layer index (one key per layer, or with
# scanned layers one key for the stack, `layers.stack_name`).
GROUPS = {
    "query_text": "query_text",  # BertModel
    "document_text": "document_text",  # BertModel
    "query_head": "query_head",  # text states -> late-interaction space
    "document_head": "document_head",
    "vision": "vision",  # ClipVisionModel
    "vision_projection": "vision_projection",  # CLS state -> mapping_prefix_length tokens
    "mapping_input": "mapping_input",  # patches -> text width
    "mapping_layers": MAPPING_LAYER_PREFIX + "_{i}",  # cross-attention BERT layers
    "mapping_output": "mapping_output",  # mapping tokens -> late-interaction space
}

# Named unions of groups.
UNIONS = {
    "text": ("query_text", "document_text"),
    "heads": ("query_head", "document_head"),
    # What stage 1 freezes: everything but the mapping structures.
    "encoders": ("query_text", "document_text", "query_head", "document_head", "vision"),
    # The mapping structures, trained at `config.optimizer.mapping_learning_rate`.
    "mapping": ("vision_projection", "mapping_input", "mapping_layers", "mapping_output"),
    # What `encode_documents` runs.
    "document": ("document_text", "document_head"),
}


def members(name: str) -> tuple[str, ...]:
  """The groups that `name` (a group or a union) stands for."""
  if name in GROUPS:
    return (name,)
  if name in UNIONS:
    return UNIONS[name]
  raise KeyError(f"{name!r} is not a parameter group or union: groups {list(GROUPS)}, "
                 f"unions {list(UNIONS)}")


def key(group: str, i: int | None = None) -> str:
  """The top-level param key of `group` (of its layer `i` for a per-layer group)."""
  return GROUPS[group].format(i=i) if "{i}" in GROUPS[group] else GROUPS[group]


def pattern(name: str) -> str:
  """A regex of the top-level keys of `name`'s groups, e.g. a `config.freeze` pattern."""
  return "|".join(_group_pattern(g) for g in members(name))


def _group_pattern(group: str) -> str:
  if "{i}" not in GROUPS[group]:
    return GROUPS[group]
  prefix = GROUPS[group].removesuffix("_{i}")
  return rf"{prefix}_\d+|{layers.stack_name(prefix)}"


def patterns(name: str) -> tuple[str, ...]:
  """One regex per group of `name`."""
  return tuple(pattern(g) for g in members(name))


def group_of(top_level_key: str) -> str:
  """The group of a top-level param key; ValueError for a key that no group declares."""
  found = [g for g in GROUPS if re.fullmatch(pattern(g), top_level_key)]
  if len(found) != 1:
    raise ValueError(f"top-level param key {top_level_key!r} is in groups {found}; "
                     f"models/param_groups.py must declare it exactly once")
  return found[0]


def in_group(top_level_key: str, name: str) -> bool:
  """Whether a top-level param key belongs to `name` (a group or a union)."""
  return group_of(top_level_key) in members(name)
