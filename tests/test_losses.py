"""The contrastive loss against its definition, chunked and sharded."""

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from preflmr_jax import losses, sharding


def _data(batch=4, n=2, lq=5, ld=7, dim=8, seed=0):
  rng = np.random.default_rng(seed)
  q = rng.normal(size=(batch, lq, dim)).astype(np.float32)
  d = rng.normal(size=(batch * (1 + n), ld, dim)).astype(np.float32)
  mask = (rng.random((batch * (1 + n), ld)) > 0.3).astype(np.float32)
  mask[:, 0] = 1
  return q, d, mask


def _reference(q, d, mask, n):
  scores = np.einsum("bqk,nlk->bnql", q.astype(np.float64), d.astype(np.float64))
  scores = np.where(mask[None, :, None, :] > 0, scores, -np.inf).max(-1).sum(-1)
  targets = np.arange(len(q)) * (1 + n)
  logz = np.log(np.exp(scores - scores.max(1, keepdims=True)).sum(1)) + scores.max(1)
  loss = np.mean(logz - scores[np.arange(len(q)), targets])
  return loss, scores, targets


@pytest.mark.parametrize("n", [0, 2])
def test_loss_and_metrics_match_the_definition(n):
  q, d, mask = _data(n=n)
  loss, metrics = losses.contrastive_loss(q, d, mask, n)
  ref, scores, targets = _reference(q, d, mask, n)
  np.testing.assert_allclose(loss, ref, rtol=1e-5)
  np.testing.assert_allclose(metrics["accuracy"], np.mean(scores.argmax(1) == targets))
  pos = scores[np.arange(len(q)), targets]
  neg = scores.sum() - pos.sum()
  np.testing.assert_allclose(metrics["positive_score"], pos.mean(), rtol=1e-5)
  np.testing.assert_allclose(metrics["negative_score"], neg / (scores.size - len(q)), rtol=1e-5)


def test_duplicates_of_a_positive_leave_its_softmax():
  """Query 0's positive (label 7) also sits at 3 (query 1's negative) and 4 (query 2's positive)."""
  n = 1
  q, d, mask = _data(batch=3, n=n)
  labels = np.array([7, 1, 2, 7, 7, 5])
  loss, metrics = losses.contrastive_loss(q, d, mask, n, doc_labels=labels)
  _, scores, targets = _reference(q, d, mask, n)
  keep = ~((labels[None, :] == labels[targets][:, None]) & (np.arange(6)[None] != targets[:, None]))
  assert keep.sum() == 18 - 4  # rows 0 and 2 each lose two duplicates
  logz = [np.log(np.exp(row[k]).sum()) for row, k in zip(scores, keep)]
  np.testing.assert_allclose(loss, np.mean(logz - scores[np.arange(3), targets]), rtol=1e-5)
  neg = keep.copy()
  neg[np.arange(3), targets] = False
  np.testing.assert_allclose(metrics["negative_score"], scores[neg].mean(), rtol=1e-5)
  grads = jax.grad(lambda q: losses.contrastive_loss(q, d, mask, n, doc_labels=labels)[0])(q)
  assert np.isfinite(grads).all()
  distinct, _ = losses.contrastive_loss(q, d, mask, n, doc_labels=np.arange(6))
  np.testing.assert_allclose(distinct, losses.contrastive_loss(q, d, mask, n)[0], rtol=1e-6)


def test_every_positive_of_a_query_leaves_its_softmax():
  """Query 0 has positives 7 (sampled) and 9, found at 2 (query 1's positive) and 5 (query 2's
  negative); query 1's positive 9 is also at 5; query 2 (positives 5 and 7) meets 7 at 0."""
  n = 1
  q, d, mask = _data(batch=3, n=n)
  q = q * 0.05  # scores of similar size: every masked entry moves the loss
  labels = np.array([7, 1, 9, 2, 5, 9])
  positives = np.array([[7, 9], [9, -1], [5, 7]])
  loss, _ = losses.contrastive_loss(q, d, mask, n, doc_labels=labels, positive_labels=positives)
  _, scores, targets = _reference(q, d, mask, n)

  def expected(masked):
    keep = np.array([[(i, j) not in masked for j in range(6)] for i in range(3)])
    logz = [np.log(np.exp(row[k]).sum()) for row, k in zip(scores, keep)]
    return np.mean(logz - scores[np.arange(3), targets])
  masked = {(0, 2), (0, 5), (1, 5), (2, 0)}
  np.testing.assert_allclose(loss, expected(masked), rtol=1e-6)
  for entry in masked:  # none of them is left in by accident
    assert abs(loss - expected(masked - {entry})) > 1e-3
  # Per-device groups split the positives with their queries.
  grouped, _ = losses.contrastive_loss(q[:2], d[:4], mask[:4], n, doc_labels=labels[:4],
                                       positive_labels=positives[:2], groups=2)
  halves = [losses.contrastive_loss(q[i:i + 1], d[2 * i:2 * i + 2], mask[2 * i:2 * i + 2], n,
                                    doc_labels=labels[2 * i:2 * i + 2],
                                    positive_labels=positives[i:i + 1])[0] for i in range(2)]
  np.testing.assert_allclose(grouped, np.mean(halves), rtol=1e-6)


def test_chunked_equals_unchunked_with_gradients():
  q, d, mask = _data()
  f = lambda q, d, c: losses.contrastive_loss(q, d, mask, 2, chunk_size=c)[0]
  np.testing.assert_allclose(f(q, d, 5), f(q, d, 0), rtol=1e-6)
  g0 = jax.grad(f, argnums=(0, 1))(q, d, 0)
  g5 = jax.grad(f, argnums=(0, 1))(q, d, 5)
  for a, b in zip(g0, g5):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_global_batch_sharded_equals_single_device():
  """Sharded over the batch, each query still sees every document of the global batch."""
  q, d, mask = _data(batch=8, n=1)
  mesh = sharding.make_mesh({"data": 4, "fsdp": 2, "tensor": 1})
  spec = lambda x: NamedSharding(mesh, P(("data", "fsdp"), *[None] * (x.ndim - 1)))
  qs, ds, ms = (jax.device_put(x, spec(x)) for x in (q, d, mask))
  fn = jax.jit(lambda q, d, m: losses.contrastive_loss(q, d, m, 1))
  with jax.set_mesh(mesh):
    loss, metrics = fn(qs, ds, ms)
  ref, _, _ = _reference(q, d, mask, 1)
  np.testing.assert_allclose(loss, ref, rtol=1e-5)
  assert set(metrics) == {"loss", "accuracy", "positive_score", "negative_score"}


def test_per_device_negatives_average_each_devices_own_loss():
  """groups=8 on an 8-device mesh: each device's queries against its own documents only, the
  official DDP training's loss: the mean of the 8 losses computed separately, values and grads."""
  q, d, mask = _data(batch=16, n=2)
  mesh = sharding.make_mesh({"data": 4, "fsdp": 2, "tensor": 1})
  spec = lambda x: NamedSharding(mesh, P(("data", "fsdp"), *[None] * (x.ndim - 1)))
  f = lambda q, d: losses.contrastive_loss(q, d, jax.device_put(mask, spec(mask)), 2, groups=8)[0]
  with jax.set_mesh(mesh):
    loss, grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(
        *(jax.device_put(x, spec(x)) for x in (q, d)))
  per_device = [(q[2 * i:2 * i + 2], d[6 * i:6 * i + 6], mask[6 * i:6 * i + 6]) for i in range(8)]
  np.testing.assert_allclose(loss, np.mean([_reference(*x, 2)[0] for x in per_device]), rtol=1e-5)
  mean = lambda q, d: sum(losses.contrastive_loss(q[2 * i:2 * i + 2], d[6 * i:6 * i + 6],
                                                  mask[6 * i:6 * i + 6], 2)[0]
                          for i in range(8)) / 8
  for a, b in zip(grads, jax.grad(mean, argnums=(0, 1))(q, d)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  assert not np.isclose(loss, _reference(q, d, mask, 2)[0])  # not the global batch's loss
  with pytest.raises(ValueError, match="16 queries do not split into 3 groups"):
    losses.contrastive_loss(q, d, mask, 2, groups=3)


def test_wrong_document_count_names_num_negatives():
  q, d, mask = _data(n=2)
  with pytest.raises(ValueError, match="num_negatives"):
    losses.contrastive_loss(q, d, mask, 1)
