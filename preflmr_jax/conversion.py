"""Conversion between our Flax parameter trees and the published PyTorch (HF) layout, as data tables.

A rule says: this Flax leaf <-> these PyTorch names (the first is canonical and used on export; the
others are accepted aliases on import), with a transform. Rules for a component are generated from
the component's config (layer counts); nothing else branches on the layout.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Mapping

import numpy as np
from flax import traverse_util

from preflmr_jax import user_errors
from preflmr_jax.models import param_groups
from preflmr_jax.models.model_config import PreFLMRConfig


@dataclasses.dataclass(frozen=True)
class Transform:
  to_flax: Callable[[np.ndarray], np.ndarray]
  to_torch: Callable[[np.ndarray], np.ndarray]


IDENTITY = Transform(lambda x: x, lambda x: x)
# torch Linear weight is [out, in]; flax Dense kernel is [in, out].
LINEAR = Transform(lambda x: x.T, lambda x: x.T)
# torch Conv2d weight is [out, in, kh, kw]; flax Conv kernel (NHWC) is [kh, kw, in, out].
CONV = Transform(lambda x: x.transpose(2, 3, 1, 0), lambda x: x.transpose(3, 2, 0, 1))


@dataclasses.dataclass(frozen=True)
class Rule:
  flax: str  # "/"-separated path in the params tree
  torch: tuple[str, ...]  # accepted PyTorch names; the first is written on export
  transform: Transform = IDENTITY


# Buffers that some published checkpoints carry and that hold no parameters.
IGNORED_SUFFIXES = ("embeddings.position_ids", "embeddings.token_type_ids")


def _linear(flax: str, torch: str, bias: bool = True) -> list[tuple[str, str, Transform]]:
  rules = [(f"{flax}/kernel", f"{torch}.weight", LINEAR)]
  if bias:
    rules.append((f"{flax}/bias", f"{torch}.bias", IDENTITY))
  return rules


def _norm(flax: str, torch: str) -> list[tuple[str, str, Transform]]:
  return [(f"{flax}/scale", f"{torch}.weight", IDENTITY), (f"{flax}/bias", f"{torch}.bias", IDENTITY)]


def bert_layer_table(cross_attention: bool) -> list[tuple[str, str, Transform]]:
  """One BertLayer, relative names (ours, HF `BertLayer`)."""
  blocks = [("attention", "attention")]
  if cross_attention:
    blocks.append(("crossattention", "crossattention"))
  table = []
  for ours, theirs in blocks:
    for proj in ("query", "key", "value"):
      table += _linear(f"{ours}/{proj}", f"{theirs}.self.{proj}")
    table += _linear(f"{ours}/out", f"{theirs}.output.dense")
    table += _norm(f"{ours}_norm", f"{theirs}.output.LayerNorm")
  table += _linear("mlp/wi", "intermediate.dense") + _linear("mlp/wo", "output.dense")
  table += _norm("mlp_norm", "output.LayerNorm")
  return table


def bert_table(num_layers: int) -> list[tuple[str, str, Transform]]:
  """HF `BertModel` (relative names)."""
  table = [(f"embeddings/{n}/embedding", f"embeddings.{n}.weight", IDENTITY)
           for n in ("word_embeddings", "position_embeddings", "token_type_embeddings")]
  table += _norm("embeddings/layer_norm", "embeddings.LayerNorm")
  for i in range(num_layers):
    table += [(f"layer_{i}/{f}", f"encoder.layer.{i}.{t}", tr)
              for f, t, tr in bert_layer_table(cross_attention=False)]
  return table + _linear("pooler", "pooler.dense")


def clip_table(num_layers: int) -> list[tuple[str, str, Transform]]:
  """HF `CLIPVisionTransformer` (relative names, i.e. below `vision_model.`)."""
  table = [("patch_embedding/kernel", "embeddings.patch_embedding.weight", CONV),
           ("class_embedding", "embeddings.class_embedding", IDENTITY),
           ("position_embedding", "embeddings.position_embedding.weight", IDENTITY)]
  table += _norm("pre_layrnorm", "pre_layrnorm")
  for i in range(num_layers):
    p = f"encoder.layers.{i}"
    for ours, theirs in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj"),
                         ("out", "out_proj")):
      table += _linear(f"layer_{i}/attention/{ours}", f"{p}.self_attn.{theirs}")
    table += _norm(f"layer_{i}/layer_norm1", f"{p}.layer_norm1")
    table += _norm(f"layer_{i}/layer_norm2", f"{p}.layer_norm2")
    table += _linear(f"layer_{i}/mlp/wi", f"{p}.mlp.fc1") + _linear(f"layer_{i}/mlp/wo", f"{p}.mlp.fc2")
  return table + _norm("post_layernorm", "post_layernorm")


def _join(prefix: str, name: str, sep: str) -> str:
  return f"{prefix}{sep}{name}" if prefix else name


def _prefixed(table, flax_prefix: str, torch_prefixes: Iterable[str]) -> list[Rule]:
  return [Rule(_join(flax_prefix, f, "/"), tuple(_join(p, t, ".") for p in torch_prefixes), tr)
          for f, t, tr in table]


def table_rules(table, flax_prefix: str = "", torch_prefix: str = "") -> list[Rule]:
  """Rules for one component table (e.g. `bert_table(6)` for a bare `BertModel` state dict)."""
  return _prefixed(table, flax_prefix, [torch_prefix])


def preflmr_rules(config: PreFLMRConfig) -> list[Rule]:
  """The published PreFLMR checkpoint."""
  key = param_groups.key
  text = bert_table(config.text.num_layers)
  vision = clip_table(config.vision.num_layers)
  rules = _prefixed(text, key("query_text"), ["query_text_encoder.bert_model",
                                              "query_text_encoder.text_model"])
  rules += _prefixed(text, key("document_text"), ["context_text_encoder.bert_model",
                                                  "context_text_encoder.text_model"])
  rules += [Rule(f"{key('query_head')}/kernel", ("query_text_encoder_linear.weight",), LINEAR),
            Rule(f"{key('document_head')}/kernel", ("context_text_encoder_linear.weight",), LINEAR)]
  # The vision tower and its MLP are shared by the query and context sides; HF saves one copy
  # under either name.
  rules += _prefixed(vision, key("vision"), ["context_vision_encoder.vision_model.vision_model",
                                             "query_vision_encoder.vision_model.vision_model"])
  for i, torch_index in ((0, 0), (1, 2)):
    rules += _prefixed(_linear(f"dense_{i}", f"model.{torch_index}"), key("vision_projection"),
                       ["context_vision_projection", "query_vision_projection"])
  rules += _prefixed(_linear(key("mapping_input"), "transformer_mapping_input_linear"), "", [""])
  for i in range(config.mapping.num_layers):
    rules += _prefixed(bert_layer_table(cross_attention=True), key("mapping_layers", i),
                       [f"transformer_mapping_network.layer.{i}"])
  rules += _prefixed(_linear(key("mapping_output"), "transformer_mapping_output_linear"), "", [""])
  return rules


# ----------------------------------------------------------------------------------------------
# Applying a table.
# ----------------------------------------------------------------------------------------------


class ConversionError(user_errors.UserError, ValueError):
  pass


def torch_to_flax(state: Mapping[str, np.ndarray], rules: list[Rule],
                  expected_shapes: Mapping[str, tuple[int, ...]] | None = None,
                  dtype=np.float32) -> dict[str, Any]:
  """Builds a nested Flax params dict from a PyTorch state dict (NumPy arrays).

  Raises ConversionError naming the key for: a missing key, an unexpected key, a shape that differs
  from `expected_shapes` (flat "/"-paths, e.g. from `jax.eval_shape`), or two aliases of one
  parameter that hold different values.
  """
  used, flat = set(), {}
  for rule in rules:
    present = [k for k in rule.torch if k in state]
    if not present:
      raise ConversionError(f"missing key {rule.torch[0]!r} (for parameter {rule.flax!r}; "
                            f"also accepted: {list(rule.torch[1:])})")
    value = np.asarray(state[present[0]])
    for alias in present[1:]:
      if not np.array_equal(value, np.asarray(state[alias])):
        raise ConversionError(f"keys {present[0]!r} and {alias!r} both present with different "
                              "values; separate query/context copies are not supported")
    used.update(present)
    value = rule.transform.to_flax(value)
    if expected_shapes is not None:
      want = tuple(expected_shapes[rule.flax])
      if tuple(value.shape) != want:
        raise ConversionError(f"shape mismatch for key {present[0]!r}: checkpoint has "
                              f"{tuple(np.asarray(state[present[0]]).shape)}, the config expects "
                              f"{want} after conversion to parameter {rule.flax!r}")
    flat[rule.flax] = np.ascontiguousarray(value, dtype=dtype)
  known_prefixes = {t.rsplit("embeddings.", 1)[0] for r in rules for t in r.torch if "embeddings." in t}
  ignored = lambda k: k.endswith(IGNORED_SUFFIXES) and k.rsplit("embeddings.", 1)[0] in known_prefixes
  unexpected = sorted(k for k in state if k not in used and not ignored(k))
  if unexpected:
    more = f" (and {len(unexpected) - 5} more)" if len(unexpected) > 5 else ""
    raise ConversionError(f"unexpected key(s) {unexpected[:5]}{more}: not part of this config's "
                          "model; check the config (layer counts, mapping network)")
  if expected_shapes is not None:
    missing = sorted(set(expected_shapes) - set(flat))
    if missing:  # a table bug, not a user error
      raise AssertionError(f"conversion table does not cover {missing[:5]}")
  return traverse_util.unflatten_dict(flat, sep="/")


def flax_to_torch(params: Mapping[str, Any], rules: list[Rule]) -> dict[str, np.ndarray]:
  """The inverse: a flat PyTorch state dict with the canonical (first) names."""
  flat = traverse_util.flatten_dict(dict(params), sep="/")
  out = {}
  for rule in rules:
    out[rule.torch[0]] = np.ascontiguousarray(rule.transform.to_torch(np.asarray(flat[rule.flax])))
  leftover = sorted(set(flat) - {r.flax for r in rules})
  if leftover:
    raise AssertionError(f"conversion table does not cover {leftover[:5]}")
  return out

