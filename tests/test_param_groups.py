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
  # per-device negatives: each query scores half the documents
  score = 2 * 3 * model_config.query_length * model_config.doc_maxlen * model_config.dim
  assert everything - flops.train_flops(model_config, 2, 3, set(macs), 2) == 2 * 3 * score // 2
  assert (flops.encode_flops(model_config, "documents", 3)
          == 2 * (macs["document_text"] + macs["document_head"]))


@pytest.mark.slow
def test_run_info_flops_match_xlas_count_of_the_looped_step_and_ignore_scanning():
  """run.json's training compute is the analytic model: within 5% of XLA's cost analysis of the
  looped ViT-B step (softmax, norms and the optimiser are what XLA adds), and the same with
  scanned layers, where XLA counts a loop's body once."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top

  from preflmr_jax import sharding, train  # pylint: disable=g-import-not-at-top
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  got = {}
  for scan in (False, True):
    config = config_files.load_config("configs/release.py:vit_b",
                                      {"batch_size": 2, "model.scan_layers": scan})
    setup = train.setup_train_step(config, mesh)
    with jax.set_mesh(mesh), nn.logical_axis_rules(setup.rules):
      cost = setup.train_step.lower(setup.abstract_state, setup.abstract_batch).cost_analysis()
    got[scan] = (train.run_info(config, setup)["train_flops_per_step"], float(cost["flops"]))
  (model, xla), (model_scanned, xla_scanned) = got[False], got[True]
  assert model == model_scanned
  assert 1.0 <= xla / model <= 1.05, (xla, model)
  assert xla_scanned < 0.5 * model  # why run.json does not take XLA's count
