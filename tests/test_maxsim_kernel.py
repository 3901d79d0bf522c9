"""The fused Pallas MaxSim (interpret mode on CPU) against `late_interaction.maxsim`: values,
gradients, ragged and empty documents, bf16, several blocks, and sharded on a mesh."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from preflmr_jax import late_interaction, losses, maxsim_kernel, sharding


def _inputs(b, lq, n, ld, dim, seed=0):
  rng = np.random.default_rng(seed)
  q = rng.normal(size=(b, lq, dim)).astype(np.float32)
  q[:, -2:] = 0  # masked query tokens are zeros
  d = rng.normal(size=(n, ld, dim)).astype(np.float32)
  mask = np.zeros((n, ld), bool)
  for i, length in enumerate(rng.integers(0, ld + 1, n)):  # ragged, some empty
    mask[i, :length] = True
  mask[1] = False  # at least one empty document
  mask[2] = True  # and one full
  return jnp.asarray(q), jnp.asarray(d), jnp.asarray(mask)


@pytest.mark.parametrize("tile_bytes", [None, 4096])  # one document block, then many
def test_scores_and_gradients_equal_the_einsum(tile_bytes, monkeypatch):
  if tile_bytes:
    monkeypatch.setattr(maxsim_kernel, "_TILE_BYTES", tile_bytes)
  q, d, mask = _inputs(b=11, lq=7, n=13, ld=21, dim=16)  # 2 query blocks; odd lengths
  got = maxsim_kernel.maxsim_pallas(q, d, mask)
  want = late_interaction.maxsim(q, d, mask)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  assert (got[:, 1] == 0).all()  # the empty document scores exactly 0
  weights = jnp.asarray(np.random.default_rng(1).normal(size=want.shape), jnp.float32)
  loss = lambda fn: lambda q, d: jnp.sum(fn(q, d, mask) * weights)
  grads = jax.grad(loss(maxsim_kernel.maxsim_pallas), argnums=(0, 1))(q, d)
  expected = jax.grad(loss(late_interaction.maxsim), argnums=(0, 1))(q, d)
  for g, e in zip(grads, expected):
    np.testing.assert_allclose(g, e, rtol=1e-6, atol=1e-6)
  assert np.abs(np.asarray(grads[1])[~np.asarray(mask)]).max() == 0  # padding gets no gradient


def test_bf16_inputs_accumulate_in_float32():
  q, d, mask = _inputs(b=3, lq=5, n=6, ld=9, dim=32)
  q, d = q.astype(jnp.bfloat16), d.astype(jnp.bfloat16)
  got = maxsim_kernel.maxsim_pallas(q, d, mask)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, late_interaction.maxsim(q, d, mask), rtol=1e-5, atol=1e-4)


def test_empty_shapes_and_bad_shapes():
  q, d, mask = _inputs(b=2, lq=3, n=4, ld=5, dim=8)
  assert maxsim_kernel.maxsim_pallas(q[:0], d, mask).shape == (0, 4)
  assert maxsim_kernel.maxsim_pallas(q, d[:0], mask[:0]).shape == (2, 0)
  np.testing.assert_array_equal(maxsim_kernel.maxsim_pallas(q, d[:, :0], mask[:, :0]), 0)
  with pytest.raises(ValueError, match="D_mask"):
    maxsim_kernel.maxsim_pallas(q, d, mask[:, :2])


def test_sharded_over_the_batch_axes_on_a_mesh():
  """Each device's queries against every document, through shard_map: the numbers and gradients
  of the unsharded einsum, and the loss of the default scorer."""
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  axes = sharding.batch_axes(sharding.LOGICAL_AXIS_RULES)
  q, d, mask = _inputs(b=8, lq=6, n=16, ld=11, dim=16)
  rows = lambda x: jax.device_put(x, NamedSharding(mesh, P(axes)))
  q, d, mask = rows(q), rows(d), rows(mask)
  scorer = functools.partial(maxsim_kernel.maxsim_sharded, batch_axes=axes)
  with jax.set_mesh(mesh):
    got = jax.jit(scorer)(q, d, mask)
    loss = lambda fn: lambda q, d: losses.contrastive_loss(q, d, mask, 1, maxsim=fn)[0]
    value, grads = jax.jit(jax.value_and_grad(loss(scorer), argnums=(0, 1)))(q, d)
    ref_value, ref_grads = jax.jit(jax.value_and_grad(loss(None), argnums=(0, 1)))(q, d)
    # Per-device in-batch negatives: the loss vmaps the plain kernel over the blocks.
    per_device = functools.partial(maxsim_kernel.maxsim_sharded, batch_axes=())
    blocks = lambda fn: jax.jit(lambda q, d: losses.contrastive_loss(q, d, mask, 1, groups=4,
                                                                     maxsim=fn)[0])(q, d)
    np.testing.assert_allclose(blocks(per_device), blocks(None), rtol=1e-6)
  np.testing.assert_allclose(got, late_interaction.maxsim(q, d, mask), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(value, ref_value, rtol=1e-6)
  for g, e in zip(grads, ref_grads):
    np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6)  # summation order across devices
