"""MaxSim against a float64 numpy loop, chunking, bf16, sharding, edge cases."""

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np
import pytest

from preflmr_jax.late_interaction import (chunk_sizes, default_tile_bytes, maxsim, maxsim_chunked,
                                         maxsim_pairwise)


def _naive(Q, D, D_mask):
  """Triple loop in float64; an empty document scores 0 (module convention)."""
  Q, D = np.asarray(Q, np.float64), np.asarray(D, np.float64)
  out = np.zeros((Q.shape[0], D.shape[0]))
  for b in range(Q.shape[0]):
    for n in range(D.shape[0]):
      valid = np.flatnonzero(np.asarray(D_mask[n]))
      for i in range(Q.shape[1]):
        if valid.size:
          out[b, n] += max(Q[b, i] @ D[n, j] for j in valid)
  return out


def _data(seed=0, b=3, lq=6, n=7, ld=5, dim=16, empty_doc=None):
  """Unit-norm tokens, some query tokens zeroed, random document masks."""
  rng = np.random.default_rng(seed)
  Q = rng.normal(size=(b, lq, dim)).astype(np.float32)
  D = rng.normal(size=(n, ld, dim)).astype(np.float32)
  Q /= np.linalg.norm(Q, axis=-1, keepdims=True)
  D /= np.linalg.norm(D, axis=-1, keepdims=True)
  Q *= rng.random((b, lq, 1)) > 0.3  # masked query tokens are exact zeros
  D_mask = rng.random((n, ld)) > 0.4
  D_mask[:, 0] = True  # at least one valid token unless asked otherwise
  if empty_doc is not None:
    D_mask[empty_doc] = False
  return Q, D, D_mask


def test_matches_naive_loop():
  Q, D, D_mask = _data()
  got = maxsim(Q, D, D_mask)
  assert got.shape == (3, 7) and got.dtype == jnp.float32
  np.testing.assert_allclose(got, _naive(Q, D, D_mask), atol=1e-5, rtol=1e-5)


def test_int_mask_equals_bool_mask():
  Q, D, D_mask = _data(seed=1)
  np.testing.assert_array_equal(maxsim(Q, D, D_mask.astype(np.int32)),
                                maxsim(Q, D, D_mask))


def test_masked_document_token_never_wins():
  Q, D, D_mask = _data(seed=2)
  before = maxsim(Q, D, D_mask)
  D_mask[:, -1] = False
  D_big = D.copy()
  # <Q[0, i], big> sums to 1e6 * |sum_i Q[0, i]|^2 over i: a valid big token
  # would raise every score of query 0.
  D_big[:, -1] = 1e6 * Q[0].sum(0)
  np.testing.assert_array_equal(maxsim(Q, D_big, D_mask), maxsim(Q, D, D_mask))
  # Sanity: valid, it would have dominated.
  valid = maxsim(Q, D_big, np.ones_like(D_mask))
  assert np.all(np.asarray(valid[0]) > np.asarray(before[0]) + 1e3)


def test_negative_scores_are_not_clipped_by_the_fill():
  # All products negative: the max must be the (negative) best, not the fill.
  Q = np.ones((1, 2, 4), np.float32)
  D = -np.ones((1, 3, 4), np.float32) * np.array([3.0, 1.0, 2.0])[:, None]
  mask = np.array([[True, False, True]])
  np.testing.assert_allclose(maxsim(Q, D, mask), [[2 * -8.0]])


@pytest.mark.slow
@pytest.mark.parametrize("chunk", [1, 2, 3, 4, 7, 8, 100])
@pytest.mark.parametrize("query_chunk", [None, 1, 2, 3, 5])
def test_chunked_equals_unchunked(chunk, query_chunk):
  Q, D, D_mask = _data(seed=3, empty_doc=4)
  np.testing.assert_allclose(
      maxsim_chunked(Q, D, D_mask, chunk, query_chunk),
      maxsim(Q, D, D_mask), atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize("tile_bytes", [1, 4 * 6 * 5 * 2, 4 * 6 * 5 * 7, None])
@pytest.mark.parametrize("query_chunk", [None, 2])
def test_chunk_sizes_from_tile_budget_equal_unchunked(tile_bytes, query_chunk):
  # tile 1: one query x one document per step; 2 pairs; everything in one tile; the default.
  Q, D, D_mask = _data(seed=5, empty_doc=2)
  np.testing.assert_allclose(
      maxsim_chunked(Q, D, D_mask, query_chunk_size=query_chunk, tile_bytes=tile_bytes),
      _naive(Q, D, D_mask), atol=1e-5)


def test_chunk_sizes():
  pair = 4 * 32 * 180  # bytes of one (query, document) pair's token scores
  # One query: documents up to the budget, a divisor of N (no padding copy).
  assert chunk_sizes(1, 32, 1000, 180, 2 << 20) == (50, 1)
  # No divisor of N near the budget (prime N): the budget's own size, 2 MiB // pair = 91
  # (the corpus is padded).
  assert chunk_sizes(1, 32, 997, 180, 2 << 20) == (91, 1)
  # Queries are split only when one document against all of them overflows the budget.
  assert chunk_sizes(8, 32, 1000, 180, 8 * pair) == (1, 8)
  assert chunk_sizes(9, 32, 1000, 180, 8 * pair) == (1, 8)
  assert chunk_sizes(32, 320, 256, 180, 2 << 20) == (1, 9)
  # Small corpora: one chunk; a budget below one pair still makes progress.
  assert chunk_sizes(4, 32, 7, 180, 1 << 30) == (7, 4)
  assert chunk_sizes(4, 32, 7, 180, 1) == (1, 1)
  assert default_tile_bytes() == 2 << 20  # the tests run on CPU


def test_pairwise_is_the_diagonal():
  Q, D, D_mask = _data(seed=4, b=5, n=5, empty_doc=1)
  got = maxsim_pairwise(Q, D, D_mask)
  assert got.shape == (5,) and got.dtype == jnp.float32
  np.testing.assert_allclose(got, np.diag(_naive(Q, D, D_mask)), atol=1e-5)


def test_bf16_inputs_accumulate_in_fp32():
  Q, D, D_mask = _data(seed=5, lq=32, ld=40, dim=128)
  ref = _naive(Q, D, D_mask)
  qb, db = jnp.asarray(Q, jnp.bfloat16), jnp.asarray(D, jnp.bfloat16)
  for got in (maxsim(qb, db, D_mask), maxsim_chunked(qb, db, D_mask, 3),
              maxsim_pairwise(qb, db[:3], D_mask[:3])):
    assert got.dtype == jnp.float32
  got = maxsim(qb, db, D_mask)
  # bf16 rounding of the inputs only (~3 significant digits per product);
  # a bf16 accumulator over 128 dims x 32 tokens would be far worse.
  np.testing.assert_allclose(got, ref, atol=0.05, rtol=1e-2)
  # Exactly the fp32 result on the bf16-rounded inputs, up to summation order.
  exact = _naive(np.asarray(qb, np.float32), np.asarray(db, np.float32), D_mask)
  np.testing.assert_allclose(got, exact, atol=1e-4, rtol=1e-5)


def test_empty_document_scores_zero_with_finite_grads():
  Q, D, D_mask = _data(seed=6, empty_doc=2)
  s = maxsim(Q, D, D_mask)
  np.testing.assert_array_equal(s[:, 2], 0.0)
  assert np.isfinite(np.asarray(s)).all()
  np.testing.assert_array_equal(maxsim_pairwise(Q, D[:3], D_mask[:3])[2], 0.0)
  gq, gd = jax.grad(lambda q, d: maxsim(q, d, D_mask).sum(), (0, 1))(Q, D)
  assert np.isfinite(np.asarray(gq)).all() and np.isfinite(np.asarray(gd)).all()
  np.testing.assert_array_equal(gd[2], 0.0)  # nothing flows into an empty doc
  # Degenerate shapes: no document tokens at all, no documents at all.
  np.testing.assert_array_equal(maxsim(Q, D[:, :0], D_mask[:, :0]), 0.0)
  assert maxsim_chunked(Q, D[:0], D_mask[:0], 4).shape == (3, 0)


def test_all_masked_everywhere_is_finite():
  Q, D, _ = _data(seed=7)
  mask = np.zeros(D.shape[:2], bool)
  np.testing.assert_array_equal(maxsim(Q, D, mask), 0.0)
  np.testing.assert_array_equal(maxsim_chunked(Q, D, mask, 3, 2), 0.0)


@pytest.mark.parametrize("fn", [
    maxsim, maxsim_pairwise, lambda q, d, m: maxsim_chunked(q, d, m, 2)])
def test_validation_errors(fn):
  Q, D, D_mask = _data(b=3, n=3)
  with pytest.raises(ValueError, match="Q must be"):
    fn(Q[0], D, D_mask)
  with pytest.raises(ValueError, match="D must be"):
    fn(Q, D[0], D_mask)
  with pytest.raises(ValueError, match="dim mismatch"):
    fn(Q, D[..., :8], D_mask)
  with pytest.raises(ValueError, match="D_mask must be"):
    fn(Q, D, D_mask[:, :-1])
  with pytest.raises(ValueError, match="D_mask must be"):
    fn(Q, D, D_mask[..., None])


def test_validation_errors_specific():
  Q, D, D_mask = _data(b=3, n=4)
  with pytest.raises(ValueError, match="as many documents as queries"):
    maxsim_pairwise(Q, D, D_mask)
  with pytest.raises(ValueError, match="chunk_size"):
    maxsim_chunked(Q, D, D_mask, 0)
  with pytest.raises(ValueError, match="query_chunk_size"):
    maxsim_chunked(Q, D, D_mask, 2, 0)
  with pytest.raises(ValueError, match="tile_bytes"):
    maxsim_chunked(Q, D, D_mask, tile_bytes=0)


def _meshes():
  devices = np.array(jax.devices())
  return [
      (Mesh(devices.reshape(8), ("data",)), P("data"), P("data")),
      # Queries over one axis, documents over the other.
      (Mesh(devices.reshape(2, 4), ("data", "model")), P("data"), P("model")),
  ]


@pytest.mark.parametrize("mesh,q_spec,d_spec", _meshes())
def test_sharded_equals_single_device(mesh, q_spec, d_spec):
  Q, D, D_mask = _data(seed=8, b=8, n=24, ld=6)
  want_all = np.asarray(maxsim(Q, D, D_mask))
  want_chunked = np.asarray(maxsim_chunked(Q, D, D_mask, 8, 4))
  want_pair = np.asarray(maxsim_pairwise(Q, D[:8], D_mask[:8]))

  qs = jax.device_put(Q, NamedSharding(mesh, q_spec))
  ds = jax.device_put(D, NamedSharding(mesh, d_spec))
  ms = jax.device_put(D_mask, NamedSharding(mesh, d_spec))
  dp = jax.device_put(D[:8], NamedSharding(mesh, q_spec))
  mp = jax.device_put(D_mask[:8], NamedSharding(mesh, q_spec))

  np.testing.assert_allclose(maxsim(qs, ds, ms), want_all, atol=1e-6)
  # chunk 8 divides N: D stays sharded inside each step; 5 forces padding.
  np.testing.assert_allclose(maxsim_chunked(qs, ds, ms, 8, 4), want_chunked,
                             atol=1e-6)
  np.testing.assert_allclose(maxsim_chunked(qs, ds, ms, 5), want_all,
                             atol=1e-5)
  np.testing.assert_allclose(maxsim_pairwise(qs, dp, mp), want_pair, atol=1e-6)
