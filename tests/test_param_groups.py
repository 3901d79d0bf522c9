"""models/param_groups.py: the group table matches the params tree of every model shape."""

import pytest

from preflmr_jax import config_files
from preflmr_jax.models import model_config as mc
from preflmr_jax.models import flops, param_groups, preflmr
from preflmr_jax.tools import count_params


def top_level_keys(spec, **overrides):
  config = config_files.load_config(spec, overrides)
  return set(preflmr.abstract_params(mc.PreFLMRConfig.from_dict(config.model)))


@pytest.mark.parametrize("spec,overrides", [
    ("configs/tiny.py", {}),
    ("configs/tiny.py", {"model.mapping.num_layers": 3}),
    ("configs/tiny.py", {"model.mapping.num_layers": 3, "model.scan_layers": True}),
    ("configs/release.py:vit_b", {}),
    ("configs/release.py:vit_l", {}),
    ("configs/release.py:vit_g", {}),
])
@pytest.mark.slow
def test_every_top_level_key_is_in_exactly_one_group(spec, overrides):
  keys = top_level_keys(spec, **overrides)
  groups = [param_groups.group_of(k) for k in keys]  # raises unless exactly one
  assert set(groups) == set(param_groups.GROUPS), spec  # and every group is there
  layers = overrides.get("model.mapping.num_layers", 1)
  assert {k for k in keys if param_groups.in_group(k, "mapping_layers")} == (
      {"mapping_layers"} if overrides.get("model.scan_layers") else
      {param_groups.key("mapping_layers", i) for i in range(layers)})


def test_unions_partition_the_groups():
  for union in param_groups.UNIONS.values():
    assert set(union) <= set(param_groups.GROUPS)
  # Stage 1 freezes exactly what is not a mapping structure.
  encoders, mapping = param_groups.UNIONS["encoders"], param_groups.UNIONS["mapping"]
  assert sorted(encoders + mapping) == sorted(param_groups.GROUPS)
  counted = [g for c in count_params.COMPONENTS for g in param_groups.members(c)]
  assert sorted(counted) == sorted(param_groups.GROUPS)


def test_lookups():
  assert param_groups.key("mapping_layers", 2) == "mapping_layer_2"
  assert param_groups.pattern("heads") == "query_head|document_head"
  assert param_groups.group_of("mapping_layer_11") == "mapping_layers"
  assert param_groups.group_of("mapping_layers") == "mapping_layers"  # scanned: one stack
  assert not param_groups.in_group("vision_projection", "vision")
  with pytest.raises(ValueError, match="'mapping_layer_x'"):
    param_groups.group_of("mapping_layer_x")
  with pytest.raises(KeyError, match="'texts'"):
    param_groups.members("texts")


def test_the_flop_model_counts_every_group():
  config = config_files.load_config("configs/tiny.py", {"model.mapping.num_layers": 2})
  model_config = mc.PreFLMRConfig.from_dict(config.model)
  macs = flops.forward_macs(model_config, 2, 3)
  assert set(macs) == set(param_groups.GROUPS)
  everything = flops.train_flops(model_config, 2, 3, set(macs))
  assert flops.train_flops(model_config, 2, 3, set()) < everything
  assert (flops.encode_flops(model_config, "documents", 3)
          == 2 * (macs["document_text"] + macs["document_head"]))
