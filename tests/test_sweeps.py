"""The paper's stage-1 sweeps (configs/sweeps/): every point builds a valid config, the recipe is
stage 1, the data-amount points scale their steps, and each smoke variant's train steps trace."""

import flax.linen as nn
import jax
import pytest

from launch import sweep
from preflmr_jax import config_files, optimizer, sharding, train
from preflmr_jax.models import model_config as mc
from preflmr_jax.models import preflmr

SWEEPS = ("vision_scaling", "mapping_depth", "pretraining_data")


def _points(name, arg=""):
  return sweep.load_points(f"configs/sweeps/{name}.py" + (f":{arg}" if arg else ""))[1]


@pytest.mark.slow
@pytest.mark.parametrize("name", SWEEPS)
@pytest.mark.parametrize("arg", ["", "smoke"])
def test_every_point_builds_a_stage1_model(name, arg):
  points = _points(name, arg)
  assert len(points) >= 3
  for point in points:
    config = config_files.load_config(point.config, dict(point.overrides))
    model_config = mc.PreFLMRConfig.from_dict(config.model)
    assert model_config.output == "mapping_only"
    shapes = preflmr.abstract_params(model_config)  # jax.eval_shape: nothing is allocated
    labels = optimizer.param_labels(shapes, config.freeze)
    trainable = {str(path[0].key) for path, label in jax.tree_util.tree_flatten_with_path(labels)[0]
                 if label != "frozen"}
    encoders = {"vision", "query_text", "document_text", "query_head", "document_head"}
    if arg:  # the smoke runs' random encoders train too (frozen they would teach nothing)
      assert encoders <= trainable
    else:  # stage 1: only the mapping structures train
      assert trainable and not trainable & encoders, trainable


def test_vision_scaling_varies_only_the_vision_tower():
  configs = [mc.PreFLMRConfig.from_dict(config_files.load_config(p.config).model)
             for p in _points("vision_scaling")]
  assert [c.vision.hidden_size for c in configs] == [768, 1024, 1152]
  assert len({(c.text, c.mapping) for c in configs}) == 1


def test_mapping_depth_varies_only_the_mapping_layers():
  configs = [config_files.load_config(p.config, dict(p.overrides)) for p in _points("mapping_depth")]
  assert [c.model.mapping.num_layers for c in configs] == [1, 2, 4, 6, 12]
  base = configs[0].to_dict()
  for c in configs[1:]:
    c = c.to_dict()
    c["model"]["mapping"]["num_layers"] = 1
    assert c == base


def test_pretraining_data_scales_steps_with_the_data():
  configs = [config_files.load_config(p.config, dict(p.overrides))
             for p in _points("pretraining_data")]
  amounts = [c.data.max_train_examples for c in configs]
  assert amounts == [10_000, 100_000, 1_000_000]
  epochs = {round(c.num_train_steps * c.batch_size / c.data.max_train_examples) for c in configs}
  assert epochs == {4}  # a fixed number of epochs
  for c in configs:
    optimizer.validate(c.optimizer, c.num_train_steps)


def test_sweeps_print_their_pod_commands(capsys):
  for name in SWEEPS:
    sweep.main([f"configs/sweeps/{name}.py", "--backend=tpu-vm", "--dry-run"])
  out = capsys.readouterr().out
  assert out.count("gcloud compute tpus tpu-vm ssh") == 3  # one detached job per sweep
  for points, name in zip((3, 5, 3), SWEEPS):
    assert f"# {points} points, one after another" in out
    assert out.count(f"--config=configs/sweeps/{name}.py") >= 2 * points  # train and eval each


@pytest.mark.slow
@pytest.mark.parametrize("name", SWEEPS)
def test_smoke_points_pass_validation_and_trace_their_train_step(name):
  """Each CPU stand-in point is a valid run whose train step traces (its shapes agree). The sweep
  machinery (train -> eval -> fit -> plot per point) runs end to end in test_launch.py, on
  configs/scaling.py:smoke; the data subsets of pretraining_data in test_pipeline.py."""
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  for point in _points(name, "smoke"):
    config = config_files.load_config(point.config, dict(point.overrides))
    train.validate(config, mesh)
    setup = train.setup_train_step(config, mesh)
    with jax.set_mesh(mesh), nn.logical_axis_rules(setup.rules):
      setup.train_step.trace(setup.abstract_state, setup.abstract_batch)
