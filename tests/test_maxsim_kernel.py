"""The fused Pallas MaxSim against `late_interaction.maxsim`: both kernels (TPU's and GPU's) in
interpret mode for values, gradients, ragged and empty documents, bf16, several blocks, and sharded
on a mesh; and lowered for TPU (Mosaic) and CUDA (Triton) on this CPU host, alone and inside the
train step, so that a kernel that cannot lower fails here and not on the first accelerator."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from preflmr_jax import late_interaction, losses, maxsim_kernel, sharding, train


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


# (kernel, TPU score-tile bytes or GPU blocks): one document block, then many; the GPU's also
# several query and document token tiles, and an embedding width padded to 16.
CASES = [("tpu", None), ("tpu", 4096), ("gpu", None), ("gpu", (4, 2, 16, 16))]


def _kernel(kernel, blocks, monkeypatch):
  if kernel == "tpu" and blocks:
    monkeypatch.setattr(maxsim_kernel, "_TILE_BYTES", blocks)
  return functools.partial(maxsim_kernel.maxsim_pallas, interpret=True, kernel=kernel,
                           gpu_blocks=blocks if kernel == "gpu" else None)


@pytest.mark.parametrize("kernel,blocks", CASES)
def test_scores_and_gradients_equal_the_einsum(kernel, blocks, monkeypatch):
  fn = _kernel(kernel, blocks, monkeypatch)
  q, d, mask = _inputs(b=11, lq=37, n=13, ld=21, dim=12)  # several query blocks; odd lengths
  got = fn(q, d, mask)
  want = late_interaction.maxsim(q, d, mask)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=5e-5)  # sums of 37 terms, scores ~200
  assert (got[:, 1] == 0).all()  # the empty document scores exactly 0
  weights = jnp.asarray(np.random.default_rng(1).normal(size=want.shape), jnp.float32)
  loss = lambda fn: lambda q, d: jnp.sum(fn(q, d, mask) * weights)
  grads = jax.grad(loss(fn), argnums=(0, 1))(q, d)
  expected = jax.grad(loss(late_interaction.maxsim), argnums=(0, 1))(q, d)
  for g, e in zip(grads, expected):
    np.testing.assert_allclose(g, e, rtol=1e-6, atol=1e-6)
  assert np.abs(np.asarray(grads[1])[~np.asarray(mask)]).max() == 0  # padding gets no gradient


def test_the_default_is_the_tpu_kernel_interpreted_on_cpu(monkeypatch):
  q, d, mask = _inputs(b=3, lq=5, n=6, ld=9, dim=8)  # shapes of no other test: a fresh trace
  # Every platform's branch is traced; the CPU's result is the interpreted one's.
  monkeypatch.setattr(maxsim_kernel, "_tpu_forward",
                      lambda Q, D, m, interpret: jnp.full((3, 6), 7.0 if interpret else 8.0))
  np.testing.assert_array_equal(maxsim_kernel.maxsim_pallas(q, d, mask), 7.0)


def test_bad_kernel_and_gpu_blocks_are_refused():
  q, d, mask = _inputs(b=3, lq=5, n=6, ld=9, dim=8)
  with pytest.raises(ValueError, match="kernel='cpu'"):
    maxsim_kernel.maxsim_pallas(q, d, mask, kernel="cpu")
  for blocks in [(6, 8, 64, 64), (8, 8, 8, 64), (8, 8, 64)]:
    with pytest.raises(ValueError, match="four powers of two .* each >= 16"):
      maxsim_kernel.maxsim_pallas(q, d, mask, True, "gpu", gpu_blocks=blocks)
  with pytest.raises(ValueError, match="only the GPU kernel has them"):
    maxsim_kernel.maxsim_pallas(q, d, mask, True, gpu_blocks=(8, 8, 64, 64))


@pytest.mark.parametrize("kernel", maxsim_kernel.KERNELS)
def test_bf16_inputs_accumulate_in_float32(kernel):
  q, d, mask = _inputs(b=3, lq=5, n=6, ld=9, dim=32)
  q, d = q.astype(jnp.bfloat16), d.astype(jnp.bfloat16)
  got = maxsim_kernel.maxsim_pallas(q, d, mask, interpret=True, kernel=kernel)
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
    # Per-device in-batch negatives: each device's queries against its own documents, with
    # duplicate positives masked (documents 0 and 1 are one passage, left out of query 0's
    # softmax; document 4, query 2's positive, is that passage too, in another group).
    labels = np.asarray([0, 0, 2, 3, 0, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15])
    doc_labels, positive_labels = rows(jnp.asarray(labels)), rows(jnp.asarray(labels[::2, None]))
    loss = lambda fn, **kw: jax.jit(jax.value_and_grad(lambda q, d: fn(
        q, d, mask, 1, doc_labels=doc_labels, positive_labels=positive_labels, **kw), (0, 1),
                                                       has_aux=True))
    (value_per_shard, metrics_per_shard), grads_per_shard = loss(
        losses.contrastive_loss_per_shard, batch_axes=axes,
        maxsim=maxsim_kernel.maxsim_pallas)(q, d)
    (value_groups, metrics_groups), grads_groups = loss(losses.contrastive_loss, groups=4)(q, d)
    with pytest.raises(ValueError, match="6 queries do not split into 4 groups"):
      losses.contrastive_loss_per_shard(q[:6], d[:12], mask[:12], 1, axes)
  with pytest.raises(ValueError, match="need a mesh and batch axes"):
    losses.contrastive_loss_per_shard(q, d, mask, 1, axes)
  np.testing.assert_allclose(value_per_shard, value_groups, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), metrics_per_shard,
               metrics_groups)
  for g, e in zip(grads_per_shard, grads_groups):
    np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got, late_interaction.maxsim(q, d, mask), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(value, ref_value, rtol=1e-6)
  for g, e in zip(grads, ref_grads):
    np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6)  # summation order across devices


KERNEL_CALLS = {"tpu": "tpu_custom_call", "cuda": "__gpu$xla.gpu.triton",
                "rocm": "__gpu$xla.gpu.triton"}


@pytest.mark.parametrize("platform", KERNEL_CALLS)
def test_the_kernel_lowers_for_each_accelerator(platform):
  """The benchmark's shapes (32 x 320 query tokens against documents of 180) and odd ones lower to
  the platform's kernel (interpretation would be a while loop), with its gradient."""
  shapes = lambda b, lq, n, ld, dim, dtype: (
      jax.ShapeDtypeStruct((b, lq, dim), dtype), jax.ShapeDtypeStruct((n, ld, dim), dtype),
      jax.ShapeDtypeStruct((n, ld), jnp.int32))
  lower = lambda fn, args: jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()
  for args in [shapes(32, 320, 4096, 180, 128, jnp.bfloat16), shapes(3, 7, 5, 9, 24, jnp.float32)]:
    text = lower(maxsim_kernel.maxsim_pallas, args)
    assert text.count(KERNEL_CALLS[platform]) == 1 and "while" not in text
  loss = jax.value_and_grad(lambda q, d, m: maxsim_kernel.maxsim_pallas(q, d, m).sum(), (0, 1))
  assert KERNEL_CALLS[platform] in lower(loss, shapes(16, 32, 64, 512, 128, jnp.bfloat16))


@pytest.mark.parametrize("negatives", ["global", "per_device"])
def test_the_train_step_lowers_with_the_kernel(negatives, tiny_config):
  """`maxsim_impl='pallas'` in the tiny train step on a 2 x 2 mesh, lowered for each accelerator:
  one kernel per device program, inside a shard_map (Mosaic refuses to be partitioned by XLA)."""
  config = tiny_config(maxsim_impl="pallas", in_batch_negatives=negatives, batch_size=8)
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 1}, jax.devices()[:4])
  setup = train.setup_train_step(config, mesh)
  with jax.set_mesh(mesh), nn.logical_axis_rules(setup.rules):
    traced = setup.train_step.trace(setup.abstract_state, setup.abstract_batch)
    for platform, call in KERNEL_CALLS.items():
      assert traced.lower(lowering_platforms=(platform,)).as_text().count(call) == 1, platform
