"""Exact top-k search against NumPy MaxSim + stable argsort: chunking, sharding, streaming, ties."""

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from preflmr_jax import search
from preflmr_jax import sharding

B, LQ, DIM, N, LD, K = 3, 5, 8, 203, 7, 10


def _data(seed=0, integer=False):
  """Random queries/documents; `integer`: entries in {-1, 0, 1}, so scores are exact small integers
  with many ties."""
  rng = np.random.default_rng(seed)
  if integer:
    q = rng.integers(-1, 2, (B, LQ, DIM)).astype(np.float32)
    d = rng.integers(-1, 2, (N, LD, DIM)).astype(np.float32)
  else:
    q = rng.normal(size=(B, LQ, DIM)).astype(np.float32)
    d = rng.normal(size=(N, LD, DIM)).astype(np.float32)
  mask = rng.random((N, LD)) > 0.3
  mask[:, 0] = True
  return q, d, mask


def _reference(q, d, mask, k):
  """float64 MaxSim, then the best k with ties to the lower index (stable sort of -score)."""
  s = np.einsum("bqe,nle->bnql", q.astype(np.float64), d.astype(np.float64))
  s = np.where(mask[None, :, None, :], s, -np.inf).max(-1)
  s = np.where(np.isneginf(s), 0.0, s).sum(-1)  # empty documents score 0 (late_interaction)
  order = np.argsort(-s, axis=1, kind="stable")[:, :k]
  return np.take_along_axis(s, order, 1), order


def _assert_same(got, want, exact_scores=False):
  scores, indices = got
  assert scores.shape == (B, K) and indices.shape == (B, K)
  assert scores.dtype == np.float32 and indices.dtype == np.int32
  np.testing.assert_array_equal(indices, want[1])
  tol = 0 if exact_scores else 1e-5
  np.testing.assert_allclose(scores, want[0], rtol=tol, atol=tol)


@pytest.mark.parametrize("chunk", [1, 7, 64, 203, 500])
def test_matches_numpy_for_any_chunk_size(chunk):
  q, d, mask = _data()
  _assert_same(search.exact_search(q, None, d, mask, K, chunk), _reference(q, d, mask, K))


@pytest.mark.parametrize("chunk", [6, 50])
def test_ties_go_to_the_lower_index(chunk):
  q, d, mask = _data(seed=1, integer=True)
  d[[40, 120, 202]] = d[5]  # exact duplicates across chunks (and devices below)
  mask[[40, 120, 202]] = mask[5]
  want = _reference(q, d, mask, K)
  assert any(len(set(row)) < K for row in want[0])  # the data has ties inside the top-k
  _assert_same(search.exact_search(q, None, d, mask, K, chunk), want, exact_scores=True)
  mesh = Mesh(np.asarray(jax.devices()), ("docs",))
  _assert_same(search.exact_search(q, None, d, mask, K, chunk, mesh=mesh), want, exact_scores=True)


@pytest.mark.parametrize("devices,chunk", [(8, 5), (8, 64), (2, 13)])
def test_sharded_equals_unsharded(devices, chunk):
  q, d, mask = _data(seed=2)
  mesh = Mesh(np.asarray(jax.devices()[:devices]), ("docs",))
  want = search.exact_search(q, None, d, mask, K, chunk)
  got = search.exact_search(q, None, d, mask, K, chunk, mesh=mesh)
  np.testing.assert_array_equal(got[1], want[1])
  np.testing.assert_allclose(got[0], want[0], rtol=1e-6, atol=1e-6)


def test_sharded_over_the_project_mesh_with_query_chunks():
  q, d, mask = _data(seed=3)
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  got = search.exact_search(q, None, d, mask, K, 9, mesh=mesh, query_chunk_size=2)
  _assert_same(got, _reference(q, d, mask, K))


def test_query_mask_zeroes_masked_tokens():
  q, d, mask = _data(seed=4)
  q_mask = np.random.default_rng(4).random((B, LQ)) > 0.4
  want = _reference(q * q_mask[..., None], d, mask, K)
  _assert_same(search.exact_search(q, q_mask, d, mask, K, 32), want)


@pytest.mark.parametrize("sizes", [(64, 64, 64, 11), (50, 50, 50, 53), (203,)])
def test_streaming_equals_in_memory(sizes):
  q, d, mask = _data(seed=5)
  bounds = np.cumsum((0,) + sizes)
  chunks = ((d[a:b], mask[a:b]) for a, b in zip(bounds[:-1], bounds[1:]))
  got = search.search_streaming(q, chunks, K)
  want = search.exact_search(q, None, d, mask, K, 64)
  np.testing.assert_array_equal(got[1], want[1])
  np.testing.assert_allclose(got[0], want[0], rtol=1e-6, atol=1e-6)


def test_padding_is_never_returned_even_against_negative_scores():
  # Every real score is negative, so a padding document scoring 0 would win; k = N returns all.
  q, d, mask = _data(seed=6)
  q = np.abs(q)
  d = -np.abs(d)
  mesh = Mesh(np.asarray(jax.devices()), ("docs",))
  for got in (search.exact_search(q, None, d, mask, N, 64),
              search.exact_search(q, None, d, mask, N, 10, mesh=mesh),
              search.search_streaming(q, [(d[:150], mask[:150]), (d[150:], mask[150:])], N)):
    scores, indices = map(np.asarray, got)
    assert np.all(np.isfinite(scores)) and np.all(scores < 0)
    assert all(sorted(row) == list(range(N)) for row in indices)


def test_real_empty_document_scores_zero_and_can_be_returned():
  # Unlike padding, a corpus document with no valid token follows late_interaction: score 0.
  q, d, mask = _data(seed=7)
  q, d = np.abs(q), -np.abs(d)
  mask[17] = False
  scores, indices = search.exact_search(q, None, d, mask, 1, 64)
  np.testing.assert_array_equal(indices[:, 0], 17)
  np.testing.assert_array_equal(scores[:, 0], 0.0)


def test_bad_k_and_chunk_size_raise():
  q, d, mask = _data()
  with pytest.raises(ValueError, match="k=204 is larger than the corpus"):
    search.exact_search(q, None, d, mask, N + 1, 64)
  with pytest.raises(ValueError, match="k must be >= 1"):
    search.exact_search(q, None, d, mask, 0, 64)
  with pytest.raises(ValueError, match="chunk_size must be >= 1"):
    search.exact_search(q, None, d, mask, K, 0)
  with pytest.raises(ValueError, match="k=12 is larger than the corpus"):
    search.search_streaming(q, [(d[:11], mask[:11])], 12)
  with pytest.raises(ValueError, match="q_mask must be"):
    search.exact_search(q, np.ones((B, LQ + 1), bool), d, mask, K, 64)


def test_corpus_placed_with_corpus_sharding():
  q, d, mask = _data(seed=8)
  d, mask = d[:200], mask[:200]  # 200 = 8 devices x 25 documents: no padding, no reshard
  mesh = Mesh(np.asarray(jax.devices()), ("docs",))
  placed = jax.device_put((d, mask), search.corpus_sharding(mesh))
  got = search.exact_search(q, None, *placed, K, 25, mesh=mesh)
  _assert_same(got, _reference(d=d, q=q, mask=mask, k=K))


@pytest.mark.parametrize("sharded", [False, True])
def test_rows_marked_invalid_are_never_returned(sharded):
  # Placeholder rows (a device's padding in a corpus laid out per device) are skipped even when
  # they would win: here they are copies of the best documents.
  q, d, mask = _data(seed=9)
  want = _reference(q, d, mask, K)
  valid = np.ones(N, bool)
  placeholders = np.arange(N - 20, N)
  d[placeholders], mask[placeholders] = d[want[1][0, :1]], mask[want[1][0, :1]]
  valid[placeholders] = False
  mesh = Mesh(np.asarray(jax.devices()), ("docs",)) if sharded else None
  got = search.exact_search(q, None, d, mask, K, 16, mesh=mesh, corpus_valid=valid)
  _assert_same(got, _reference(q, d[:N - 20], mask[:N - 20], K))
