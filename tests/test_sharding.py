"""Mesh construction, sharded parameter init, and a sharded forward equal to the single-device one."""

import dataclasses

import flax.linen as nn
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from preflmr_jax import config_defaults, sharding
from preflmr_jax.models import model_config as mc
from preflmr_jax.models import preflmr

RULES = config_defaults.LOGICAL_AXIS_RULES


def test_mesh_shape_resolves_minus_one_and_names_bad_axes():
  assert sharding.mesh_shape({"data": -1, "fsdp": 2, "tensor": 2}, 8) == (2, 2, 2)
  assert sharding.mesh_shape({"data": 1, "fsdp": -1, "tensor": 1}, 8) == (1, 8, 1)
  with pytest.raises(ValueError, match="config.mesh: unknown axis"):
    sharding.mesh_shape({"model": 2}, 8)
  with pytest.raises(ValueError, match="needs 12 devices"):
    sharding.mesh_shape({"data": 3, "fsdp": 4, "tensor": 1}, 8)
  with pytest.raises(ValueError, match="not divisible"):
    sharding.mesh_shape({"data": -1, "fsdp": 3, "tensor": 1}, 8)
  with pytest.raises(ValueError, match="at most one axis"):
    sharding.mesh_shape({"data": -1, "fsdp": -1, "tensor": 1}, 8)
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}


def _tiny():
  t = mc.TextConfig(**mc.text_shape("tiny"))
  return mc.PreFLMRConfig(
      text=t, vision=mc.VisionConfig(**mc.vision_shape("tiny")),
      mapping=dataclasses.replace(t, num_layers=1), query_maxlen=16, doc_maxlen=24,
      mapping_cross_attention_length=16, mapping_prefix_length=4, dim=16)


def _inputs(config, batch):
  rng = np.random.default_rng(0)
  v = config.vision
  q_ids = rng.integers(104, config.text.vocab_size, (batch, config.query_maxlen)).astype(np.int32)
  d_ids = rng.integers(104, config.text.vocab_size, (batch, config.doc_maxlen)).astype(np.int32)
  q_mask, d_mask = np.ones_like(q_ids), np.ones_like(d_ids)
  q_mask[:, 10:] = 0
  d_mask[::2, 15:] = 0
  d_ids[d_mask == 0] = 0
  pixels = rng.normal(size=(batch, v.image_size, v.image_size, v.num_channels)).astype(np.float32)
  return q_ids, q_mask, pixels, d_ids, d_mask


@pytest.mark.parametrize("mesh_config", [
    {"data": 8, "fsdp": 1, "tensor": 1},
    {"data": 2, "fsdp": 2, "tensor": 2},
])
def test_sharded_forward_equals_single_device(mesh_config):
  config = _tiny()
  model = preflmr.PreFLMR(config)
  batch = 8
  inputs = _inputs(config, batch)
  params = preflmr.init_params(config, jax.random.key(0))
  fwd = lambda p, *x: model.apply({"params": p}, *x)
  (q_ref, qm_ref), (d_ref, dm_ref) = jax.jit(fwd)(params, *inputs)

  mesh = sharding.make_mesh(mesh_config)
  init = lambda rng: model.init(rng, *_inputs(config, 1))["params"]
  sharded_params, shardings = sharding.init_sharded(init, mesh, RULES, jax.random.key(0))
  # Created sharded, with the same values as the unsharded init (up to float rounding of the
  # initialiser's arithmetic under a different compilation).
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8),
               sharded_params, params)
  kernel = sharded_params["query_text"]["layer_0"]["mlp"]["wi"]["kernel"]
  assert kernel.sharding.spec == P("fsdp", "tensor")
  if mesh.shape["fsdp"] * mesh.shape["tensor"] > 1:
    assert len({s.data.shape for s in kernel.addressable_shards}) == 1
    assert kernel.addressable_shards[0].data.shape != kernel.shape

  placed = [jax.device_put(x, sharding.batch_sharding(mesh, x.ndim)) for x in inputs]
  with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
    (q, qm), (d, dm) = jax.jit(fwd)(sharded_params, *placed)
  assert q.sharding.is_equivalent_to(sharding.batch_sharding(mesh, 3), 3)
  np.testing.assert_allclose(q, q_ref, atol=2e-5, rtol=0)
  np.testing.assert_allclose(d, d_ref, atol=2e-5, rtol=0)
  np.testing.assert_array_equal(qm, qm_ref)
  np.testing.assert_array_equal(dm, dm_ref)
