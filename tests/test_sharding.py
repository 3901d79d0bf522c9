"""Mesh construction, sharded parameter init, and a sharded forward equal to the single-device one."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from preflmr_jax import sharding
from preflmr_jax.models import layers
from preflmr_jax.models import model_config as mc
from preflmr_jax.models import preflmr
from preflmr_jax.user_errors import ConfigError

RULES = sharding.LOGICAL_AXIS_RULES


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
@pytest.mark.slow
def test_sharded_forward_equals_single_device(mesh_config):
  config = _tiny()
  model = preflmr.PreFLMR(config)
  batch = 8
  inputs = _inputs(config, batch)
  init = lambda rng: model.init(rng, *_inputs(config, 1))["params"]
  params = nn.meta.unbox(jax.jit(init)(jax.random.key(0)))
  fwd = lambda p, *x: model.apply({"params": p}, *x)
  (q_ref, qm_ref), (d_ref, dm_ref) = jax.jit(fwd)(params, *inputs)

  mesh = sharding.make_mesh(mesh_config)
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

  placed = [jax.device_put(x, sharding.batch_sharding(mesh, x.ndim, RULES)) for x in inputs]
  with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
    (q, qm), (d, dm) = jax.jit(fwd)(sharded_params, *placed)
  assert q.sharding.is_equivalent_to(sharding.batch_sharding(mesh, 3, RULES), 3)
  np.testing.assert_allclose(q, q_ref, atol=2e-5, rtol=0)
  np.testing.assert_allclose(d, d_ref, atol=2e-5, rtol=0)
  np.testing.assert_array_equal(qm, qm_ref)
  np.testing.assert_array_equal(dm, dm_ref)


@pytest.mark.parametrize("one_hot_grad", [False, True])
def test_embedding_lookups_gather_the_table_not_the_rows(one_hot_grad, monkeypatch):
  """Rows looked up in a table sharded over its width would take an all-to-all to reach the batch
  sharding, forward and backward (libtpu compiles each for ~10 s on 256 chips); the lookup gathers
  the table's width like any FSDP weight instead."""
  # Both gradients: the scatter-add (CPU's default) and accelerators' one-hot matmul.
  monkeypatch.setattr(layers, "embed_lookup",
                      functools.partial(layers.embed_lookup, one_hot_grad=one_hot_grad))
  embed = layers.Embed(64, 32, ("vocab", "embed"))
  ids = np.random.default_rng(0).integers(0, 64, (8, 16)).astype(np.int32)
  mesh = sharding.make_mesh({"data": 1, "fsdp": 8, "tensor": 1})
  init = lambda rng: embed.init(rng, ids[:1])["params"]
  params, _ = sharding.init_sharded(init, mesh, RULES, jax.random.key(0))
  # The model's layers constrain their activations to the batch sharding, as here.
  rows = lambda p, i: layers.constrain(embed.apply({"params": p}, i), "act_batch", "act_length",
                                       "act_embed")
  loss = lambda p, i: jnp.sum(jnp.square(rows(p, i)))
  placed = jax.device_put(ids, sharding.batch_sharding(mesh, 2, RULES))
  with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
    step = jax.jit(jax.value_and_grad(loss))
    hlo = step.lower(params, placed).compile().as_text()
    value, grad = step(params, placed)
  assert "all-to-all" not in hlo
  want_value, want_grad = jax.value_and_grad(loss)(jax.device_get(params), ids)
  np.testing.assert_allclose(value, want_value, rtol=1e-6)
  np.testing.assert_allclose(grad["embedding"], want_grad["embedding"], rtol=1e-6)


# ------------------------------------------------ multi-slice meshes and multi-host batches

@dataclasses.dataclass(frozen=True, eq=False)
class FakeTpu:
  """What mesh construction reads of a TPU device (a v5e chip: one core)."""
  id: int
  process_index: int
  coords: tuple[int, int, int]
  slice_index: int = 0
  core_on_chip: int = 0
  platform: str = "tpu"
  device_kind: str = "TPU v5 lite"


def _v5e_4x4(num_slices=1):
  """Slices of 4x4 chips, 4 hosts each of a 2x2 block, in jax.devices() order."""
  devices = []
  for s in range(num_slices):
    for host in range(4):
      hx, hy = host % 2, host // 2
      for dy, dx in ((0, 0), (0, 1), (1, 0), (1, 1)):
        devices.append(FakeTpu(len(devices), s * 4 + host, (2 * hx + dx, 2 * hy + dy, 0), s))
  return devices


def _mesh(grid):
  return jax.sharding.Mesh(grid, sharding.MESH_AXES)


@pytest.fixture
def warnings_logged(monkeypatch):
  logged = []
  monkeypatch.setattr(sharding.logging, "warning", lambda msg, *args: logged.append(msg % args))
  return logged


@pytest.mark.parametrize("shape", [(2, 16, 1), (4, 8, 1), (2, 4, 4)])
def test_data_axis_spans_slices_and_the_rest_stays_within_one(shape, warnings_logged):
  devices = _v5e_4x4(num_slices=2)
  grid = sharding.device_grid(shape, devices[::-1])  # any input order
  per_slice = shape[0] // 2
  for i in range(shape[0]):
    assert {d.slice_index for d in grid[i].flat} == {i // per_slice}, (shape, i)
  assert sorted(d.id for d in grid.flat) == list(range(32))
  assert not warnings_logged  # topology-aware, not the plain order


def test_data_not_divisible_by_the_slices_names_the_key(warnings_logged):
  with pytest.raises(ValueError, match=r"config.mesh.data=1 is not divisible by the 2 slices"):
    sharding.device_grid((1, 32, 1), _v5e_4x4(num_slices=2))
  # GPU nodes are slices too; FSDP across nodes is common there: a warning, JAX's order.
  gpus = [dataclasses.replace(d, platform="gpu", device_kind="H100") for d in _v5e_4x4(2)]
  grid = sharding.device_grid((1, 32, 1), gpus[::-1])
  assert [d.id for d in grid.flat] == list(range(32))
  assert len(warnings_logged) == 1 and "config.mesh.data=1 is not a multiple" in warnings_logged[0]
  grid = sharding.device_grid((2, 16, 1), gpus)  # divisible: data over the nodes
  assert [{d.slice_index for d in grid[i].flat} for i in range(2)] == [{0}, {1}]


def test_fallback_to_the_plain_order_warns_and_keeps_slices_apart(warnings_logged):
  # Coordinates that do not form a box: no topology-aware order exists.
  devices = [FakeTpu(i, i // 2, (i // 2, i // 2, 0), slice_index=i % 2) for i in range(8)]
  grid = sharding.device_grid((2, 2, 2), devices)
  assert len(warnings_logged) == 1 and "config.mesh" in warnings_logged[0]
  assert [{d.slice_index for d in grid[i].flat} for i in range(2)] == [{0}, {1}]
  sharding.device_grid((1, 8, 1), jax.devices())  # CPU: JAX's own order, no warning
  assert len(warnings_logged) == 1


def test_batch_shards_follow_the_devices_of_each_process():
  cpu_like = np.array([FakeTpu(i, i // 4, (0, 0, 0)) for i in range(8)], dtype=object)
  mesh = _mesh(cpu_like.reshape(2, 4, 1))
  sharding.check_batch_sharding(mesh, RULES)
  assert sharding.batch_shards_by_process(mesh, RULES) == {0: [0, 1, 2, 3], 1: [4, 5, 6, 7]}
  np.testing.assert_array_equal(sharding.process_batch_rows(mesh, 16, 1, RULES), np.arange(8, 16))
  sharding.check_batch_sharding(_mesh(cpu_like.reshape(1, 4, 2)), RULES)  # tensor within a process
  # A TPU ring order: each host's shards are not one block, which make_array_from_process_local_data
  # accepts (the host supplies the rows of its shards).
  mesh = _mesh(sharding.device_grid((1, 16, 1), _v5e_4x4()))
  sharding.check_batch_sharding(mesh, RULES)
  shards = sharding.batch_shards_by_process(mesh, RULES)
  assert sorted(sum(shards.values(), [])) == list(range(16)) and shards[0] != [0, 1, 2, 3]
  np.testing.assert_array_equal(sharding.process_batch_rows(mesh, 32, 0, RULES),
                                np.concatenate([[2 * k, 2 * k + 1] for k in shards[0]]))


@pytest.mark.parametrize("grid, message", [
    # the tensor axis crosses hosts: JAX's topology order on a 4-host v5e-16 with tensor=4
    (lambda: sharding.device_grid((1, 4, 4), _v5e_4x4()), r"batch shard 0 .* processes \[0, 1\]"),
    (lambda: np.array([FakeTpu(i, i % 2, (0, 0, 0)) for i in range(8)]).reshape(1, 2, 4),
     r"processes \[0, 1\].*config.mesh.tensor"),
    (lambda: np.array([FakeTpu(i, i // 4, (0, 0, 0)) for i in range(6)]).reshape(1, 6, 1),
     r"unequal numbers of batch shards \{0: 4, 1: 2\}"),
])
def test_meshes_the_processes_cannot_feed_are_refused(grid, message):
  with pytest.raises(ValueError, match=r"config.mesh \{'data': 1.*" + message):
    sharding.check_batch_sharding(_mesh(grid()), RULES)


def test_a_parameter_its_mesh_axes_do_not_divide_is_named_before_compiling():
  """The tiny model's `embed` (32) goes to fsdp: fsdp=2 splits it, fsdp=3 cannot."""
  config = _tiny()
  model = preflmr.PreFLMR(config)
  boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), *_inputs(config, 1))["params"])
  devices = np.array(jax.devices())
  sharding.check_divisible(boxed, jax.sharding.Mesh(devices[:4].reshape(1, 2, 2),
                                                    sharding.MESH_AXES), RULES)
  with pytest.raises(ConfigError, match=r"parameter \[.*\] \[.*\]: dimension \d \('embed', 32\) "
                     r"is split over mesh axes \['fsdp'\] into 3 shards, which do not divide it"):
    sharding.check_divisible(boxed, jax.sharding.Mesh(devices[:3].reshape(1, 3, 1),
                                                      sharding.MESH_AXES), RULES)


def test_the_act_batch_rule_decides_the_batch_axes():
  """A batch over `data` only (fsdp then holds whole copies of each shard): the input sharding,
  the shard count and each process's rows follow the rule."""
  rules = tuple((k, "data" if k == "act_batch" else v) for k, v in RULES)
  assert sharding.batch_axes(rules) == ("data",) and sharding.batch_axes(RULES) == ("data", "fsdp")
  mesh = sharding.make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
  assert sharding.num_batch_shards(mesh, rules) == 2
  batch = sharding.global_batch(mesh, {"q": np.arange(8).reshape(8, 1)}, rules)
  assert batch["q"].sharding.spec == P("data", None)
  np.testing.assert_array_equal(batch["q"], np.arange(8).reshape(8, 1))
  cpu_like = np.array([FakeTpu(i, i // 4, (0, 0, 0)) for i in range(8)], dtype=object)
  with pytest.raises(ValueError, match=r"processes \[0, 1\]"):  # fsdp copies span both hosts
    sharding.check_batch_sharding(_mesh(cpu_like.reshape(2, 4, 1).transpose(1, 0, 2).reshape(
        2, 4, 1)), rules)
  with pytest.raises(ValueError, match="'act_batch' -> unknown mesh axis \\['dat'\\]"):
    sharding.batch_axes(tuple((k, "dat" if k == "act_batch" else v) for k, v in RULES))


def test_global_batch_has_the_explicit_global_shape():
  mesh = sharding.make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
  batch = sharding.global_batch(mesh, {"q": np.zeros((8, 3)), "d": np.arange(24).reshape(24, 1)},
                                RULES)
  assert batch["q"].shape == (8, 3) and batch["d"].shape == (24, 1)
  assert batch["d"].sharding.spec == P(("data", "fsdp"), None)
  np.testing.assert_array_equal(batch["d"], np.arange(24).reshape(24, 1))
  with pytest.raises(ValueError, match=r"batch\['q'\]: 4 rows do not split evenly over .* 8"):
    sharding.global_batch(mesh, {"q": np.zeros((4, 3))}, RULES)


def test_rules_a_config_file_writes_as_lists_work_like_tuples():
  config = ml_collections.ConfigDict({"logical_axis_rules": RULES})
  config.logical_axis_rules = [[k, list(v) if isinstance(v, tuple) else v] for k, v in RULES]
  as_lists = config.logical_axis_rules
  assert isinstance(as_lists[0], list)  # ml_collections keeps what the file wrote
  assert sharding.axis_rules(as_lists) == sharding.axis_rules(RULES) == RULES
  mesh = sharding.make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
  batch = sharding.global_batch(mesh, {"d": np.arange(24).reshape(24, 1)}, as_lists)
  assert batch["d"].sharding.spec == P(("data", "fsdp"), None)
