"""PLAID in JAX: ColBERTv2's residual compression, inverted lists and PLAID's staged search.

  index = build(chunks, default_num_centroids(num_tokens), nbits=2)  # chunks: list or callable
  scores, ids = search(index, q, q_mask, k=10)                      # PLAID's settings for k
  scores, ids = search(index, q, q_mask, k=100, options=SearchOptions(nprobe=4, threshold=0.4))
  save(index, "corpus.plaid.npz"); index = load("corpus.plaid.npz")
  save(index, "gs://b/corpus.plaid", num_shards=8)                   # a folder of 8 shards
  build_sharded(chunks, "gs://b/corpus.plaid", 8, C, nbits=2)        # the same, one shard in memory
  mine = load_shards("gs://b/corpus.plaid", which=[0, 1])            # a host's shards
  scores, ids = search_sharded(mine, q, q_mask, k=10)               # corpus ids, merged top-k

Build streams the corpus twice, one chunk of (docs [n, Ld, dim], mask [n, Ld]) at a time: pass 1
keeps a uniform sample of valid tokens (the `sample_size` smallest of per-token random keys) for
spherical k-means (jitted Lloyd iterations, inner-product assignment: embeddings are L2-normalised);
pass 2 stores every valid token as its nearest centroid id plus its residual (token - centroid)
quantised to `nbits` per dimension and packed into uint8. Bucket cutoffs are per-dimension
quantiles of the sample's residuals (as ColBERTv2), bucket values the mean residual in each bucket.
Decompressed tokens are re-normalised (as ColBERTv2). Inverted lists map each centroid to the sorted
ids of the documents with a token assigned to it (CSR: ivf_offsets + ivf_docs). Memory: the
sample, one chunk, and the compressed corpus (`build`) or one shard of it (`build_sharded`).

Search follows PLAID (Santhanam et al. 2022), a group of queries at a time: (1) query-centroid
scores [Lq, C] on the device, each query token's `nprobe` best centroids, the documents of their
inverted lists gathered on the host and capped at `candidates`; (2) centroid interaction: each
candidate's approximate MaxSim from its tokens' centroid ids by lookup into the query-centroid
scores, without the centroids whose best score is under `threshold`, keeping `keep`; (3) the same
unpruned, keeping `rerank`; (4) those decompressed and scored by exact MaxSim. Memory is bounded
by the group, the candidate cap and the longest document, never by the corpus size times the
batch. Unlike ColBERT's searcher, every valid query token takes part in stages 1-3 (ColBERT's
uses the first 32), and a document's score is the plain MaxSim (ColBERT's CPU scorer clamps each
query token's best at 0).

Differences from `search.exact_search`: documents with no valid token are in no inverted list and
are never returned; when a query has fewer than k candidates the tail is score -inf, index -1.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import json
import zipfile
from typing import Callable, Iterable, NamedTuple, Optional, Sequence, Union

import jax
from jax import lax
from jax.experimental import pallas as pl
import jax.numpy as jnp
import numpy as np

from preflmr_jax import cli, storage
from preflmr_jax.user_errors import ConfigError, is_int

__all__ = ["PlaidIndex", "SearchOptions", "build", "build_sharded", "search", "shard",
           "search_sharded", "decompress", "save", "load", "load_shards", "default_num_centroids",
           "default_sample_size", "NBITS"]

NBITS = (1, 2, 4, 8)
FORMAT = "preflmr_jax.plaid_index"
VERSION = 1
# A sharded index is a folder: the arrays every shard shares in SHARED_FILE, each shard's own in
# shard_file(i, n), and META_FILE, written last (a folder without it is incomplete).
_SHARED = ("centroids", "bucket_cutoffs", "bucket_weights")
_OWN = ("codes", "residuals", "doc_offsets", "ivf_offsets", "ivf_docs")
_ARRAYS = _SHARED + _OWN
META_FILE, SHARED_FILE = "meta.json", "shared.npz"


def shard_file(i: int, num_shards: int) -> str:
  return f"shard_{i:05d}-of-{num_shards:05d}.npz"

Chunks = Union[Sequence[tuple[np.ndarray, np.ndarray]],
               Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]]]


def _check_nbits(nbits, dim):
  if nbits not in NBITS:
    raise ValueError(f"nbits must be one of {NBITS}, got {nbits!r}")
  if dim * nbits % 8:
    raise ValueError(f"dim * nbits must be a multiple of 8 to pack into bytes: {dim} * {nbits}")


@dataclasses.dataclass(frozen=True, eq=False)
class PlaidIndex:
  """Compressed corpus; all NumPy (host) arrays. T = valid tokens, N = documents, C = centroids.

  Tokens of document n are codes/residuals[doc_offsets[n]:doc_offsets[n + 1]], in corpus order.
  """
  nbits: int
  centroids: np.ndarray        # [C, dim] float32, unit norm
  bucket_cutoffs: np.ndarray   # [dim, 2**nbits - 1] float32, per-dimension residual cutoffs
  bucket_weights: np.ndarray   # [dim, 2**nbits] float32, per-dimension bucket values
  codes: np.ndarray            # [T] int32 centroid id per token
  residuals: np.ndarray        # [T, dim * nbits // 8] uint8 packed bucket ids
  doc_offsets: np.ndarray      # [N + 1] int64
  ivf_offsets: np.ndarray      # [C + 1] int64
  ivf_docs: np.ndarray         # [nnz] int32 document ids, sorted within each list
  corpus_key: str = ""         # names the corpus it was built from (checked by `load`)
  first_doc: int = 0           # corpus id of document 0 (a shard's offset; `search_sharded`)

  def __post_init__(self):
    _validate(self)

  @property
  def dim(self) -> int:
    return self.centroids.shape[1]

  @property
  def num_centroids(self) -> int:
    return self.centroids.shape[0]

  @property
  def num_docs(self) -> int:
    return self.doc_offsets.shape[0] - 1

  @property
  def max_doc_len(self) -> int:
    return int(np.max(np.diff(self.doc_offsets), initial=0))


def _validate(ix: PlaidIndex):
  """Raises ValueError unless shapes, dtypes and offsets are consistent."""
  if not isinstance(ix.nbits, (int, np.integer)):
    raise ValueError(f"nbits must be an int, got {ix.nbits!r}")
  if ix.centroids.ndim != 2:
    raise ValueError(f"centroids must be [C, dim], got {ix.centroids.shape}")
  c, dim = ix.centroids.shape
  _check_nbits(ix.nbits, dim)
  t = ix.codes.size
  want = {
      "bucket_cutoffs": ((dim, 2**ix.nbits - 1), np.float32),
      "bucket_weights": ((dim, 2**ix.nbits), np.float32),
      "codes": ((t,), np.int32),
      "residuals": ((t, dim * ix.nbits // 8), np.uint8),
      "ivf_offsets": ((c + 1,), np.int64),
      "ivf_docs": ((ix.ivf_docs.size,), np.int32),
  }
  if ix.centroids.dtype != np.float32:
    raise ValueError(f"centroids must be float32, got {ix.centroids.dtype}")
  if ix.doc_offsets.ndim != 1 or ix.doc_offsets.dtype != np.int64 or ix.doc_offsets.size < 1:
    raise ValueError(f"doc_offsets must be int64 [N + 1], got {ix.doc_offsets.dtype} "
                     f"{ix.doc_offsets.shape}")
  for name, (shape, dtype) in want.items():
    a = getattr(ix, name)
    if tuple(a.shape) != shape or a.dtype != dtype:
      raise ValueError(f"{name} must be {np.dtype(dtype).name} {shape}, got {a.dtype} {a.shape}")
  for name, last in (("doc_offsets", t), ("ivf_offsets", ix.ivf_docs.shape[0])):
    off = getattr(ix, name)
    if off[0] != 0 or off[-1] != last or np.any(np.diff(off) < 0):
      raise ValueError(f"{name} must rise from 0 to {last}")
  if t and (ix.codes.min() < 0 or ix.codes.max() >= c):
    raise ValueError(f"codes must lie in [0, {c})")
  n = ix.doc_offsets.shape[0] - 1
  if ix.ivf_docs.size and (ix.ivf_docs.min() < 0 or ix.ivf_docs.max() >= n):
    raise ValueError(f"ivf_docs must lie in [0, {n})")


# ---------------------------------------------------------------- device kernels (jitted)

def _normalise(x):
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _assign(x, centroids, rows=4096):
  """Nearest centroid by inner product, `rows` tokens at a time (bounds the [rows, C] scores)."""
  n = x.shape[0]
  rows = min(rows, max(n, 1))
  xp = jnp.pad(x, [(0, -n % rows), (0, 0)])

  def one(xc):
    s = jnp.dot(xc, centroids.T, preferred_element_type=jnp.float32)
    return jnp.argmax(s, axis=-1).astype(jnp.int32)

  return lax.map(one, xp.reshape(-1, rows, x.shape[1])).reshape(-1)[:n]


@functools.partial(jax.jit, static_argnames=("iters",))
def _kmeans(x, init, iters):
  """Spherical Lloyd iterations; an empty cluster keeps its previous centroid."""
  c = init.shape[0]

  def step(_, cent):
    a = _assign(x, cent)
    sums = jax.ops.segment_sum(x, a, num_segments=c)
    counts = jnp.bincount(a, length=c)
    return _normalise(jnp.where(counts[:, None] > 0, sums, cent))

  return lax.fori_loop(0, iters, step, _normalise(init))


def _bucket_means(r, cut, fallback):
  """[dim, levels] mean residual of each per-dimension bucket; `fallback` where one is empty."""
  dim, levels = fallback.shape
  b = _bucketize(cut, r)  # [S, dim]
  seg = (jnp.arange(dim) * levels + b).reshape(-1)  # O(S * dim), no [S, dim, levels] one-hot
  sums = jax.ops.segment_sum(r.reshape(-1), seg, num_segments=dim * levels).reshape(dim, levels)
  counts = jnp.bincount(seg, length=dim * levels).reshape(dim, levels)
  return jnp.where(counts > 0, sums / jnp.maximum(counts, 1), fallback)


@functools.partial(jax.jit, static_argnames=("nbits",))
def _bucket_params(x, centroids, nbits):
  """Per-dimension residual buckets -> (cutoffs [dim, 2^b - 1], values [dim, 2^b]).

  Cutoffs are quantiles at i/2^b as ColBERTv2; values are the mean residual in each bucket (the
  MSE-optimal value for those cutoffs) rather than ColBERTv2's (i + 0.5)/2^b quantiles, which
  remain the fallback for an empty bucket.
  """
  r = x - centroids[_assign(x, centroids)]
  levels = 2**nbits
  cut = jnp.quantile(r, jnp.arange(1, levels) / levels, axis=0).T.astype(jnp.float32)
  val = jnp.quantile(r, (jnp.arange(levels) + 0.5) / levels, axis=0).T.astype(jnp.float32)
  return cut, _bucket_means(r, cut, val)


def _bucketize(cutoffs, r):
  """Bucket id per dimension: r [T, dim] against sorted cutoffs [dim, levels - 1] -> [T, dim]."""
  return jax.vmap(jnp.searchsorted, in_axes=(0, 1), out_axes=1)(cutoffs, r)


def _pack(b, nbits):
  """[..., dim] bucket ids < 2^nbits -> [..., dim * nbits / 8] uint8 (low bits first)."""
  per = 8 // nbits
  b = b.astype(jnp.uint8).reshape(*b.shape[:-1], -1, per)
  shifts = jnp.arange(per, dtype=jnp.uint8) * nbits
  return jnp.sum(b << shifts, axis=-1, dtype=jnp.uint8)  # disjoint bits: sum == or


def _unpack(p, nbits):
  per = 8 // nbits
  shifts = jnp.arange(per, dtype=jnp.uint8) * nbits
  b = (p[..., None] >> shifts) & jnp.uint8(2**nbits - 1)
  return b.reshape(*p.shape[:-1], p.shape[-1] * per)


@functools.partial(jax.jit, static_argnames=("nbits",))
def _encode(x, centroids, cutoffs, nbits):
  """Tokens [T, dim] -> (centroid ids [T], packed residual buckets [T, dim * nbits / 8])."""
  codes = _assign(x, centroids)
  r = x - centroids[codes]
  return codes, _pack(_bucketize(cutoffs, r), nbits)


def _decompress(codes, packed, centroids, weights, nbits):
  buckets = _unpack(packed, nbits).astype(jnp.int32)
  # Unit norm again, as ColBERTv2: the encoders' embeddings are L2-normalised.
  return _normalise(centroids[codes] + weights[jnp.arange(weights.shape[0]), buckets])


_decompress_jit = jax.jit(_decompress, static_argnames="nbits")


# Stage 1 scores the centroids a tile at a time, so that each [G, Lq, tile] block of scores is
# reduced while it is in cache: the full scores are written once, as the lookup table, and never
# read back whole (on a 2-core CPU, 320-token queries and 32k centroids: 2-3x faster than top_k,
# max and transpose each over the whole [G, Lq, C]).
_CENTROID_TILE = 256


@functools.partial(jax.jit, static_argnames=("nprobe", "precision"))
def _query_centroid_scores(q, valid_q, centroids, nprobe, precision):
  """Stage 1. q [G, Lq, dim] -> the scores as a lookup table by centroid [G, C, Lq] (0 for masked
  tokens), each valid token's `nprobe` best centroids and their scores [G, Lq, nprobe], and each
  centroid's best score over the valid tokens [G, C] (what PLAID's pruning compares with its
  threshold).

  A token's best centroids lie in its `nprobe` tiles with the highest maximum, so top-k runs over
  those tiles' scores only, gathered back from the table."""
  g, lq, dim = q.shape
  c = centroids.shape[0]
  tile = min(_CENTROID_TILE, pl.next_power_of_2(c))
  tiles = -(-c // tile)
  padded = jnp.pad(centroids, [(0, tiles * tile - c), (0, 0)]).reshape(tiles, tile, dim)
  real = (jnp.arange(tiles * tile) < c).reshape(tiles, tile)

  def body(table, x):
    i, cents, real_c = x
    s = jnp.einsum("gqd,cd->gcq", q, cents, precision=precision,
                   preferred_element_type=jnp.float32)
    s = jnp.where(valid_q[:, None, :], s, 0.0)
    tile_best = jnp.max(jnp.where(real_c[None, :, None], s, -jnp.inf), axis=1)
    centroid_best = jnp.max(jnp.where(valid_q[:, None, :], s, -jnp.inf), axis=2)
    return lax.dynamic_update_slice_in_dim(table, s, i * tile, axis=1), (tile_best,
                                                                         centroid_best)

  table = jnp.zeros((g, tiles * tile, lq), jnp.float32)
  table, (tile_best, centroid_best) = lax.scan(body, table, (jnp.arange(tiles), padded, real))
  top_tiles = lax.top_k(jnp.moveaxis(tile_best, 0, -1), min(nprobe, tiles))[1]  # [G, Lq, n]
  ids = (top_tiles[..., None] * tile + jnp.arange(tile)).reshape(g, lq, -1)
  scores = jnp.take_along_axis(table, jnp.swapaxes(ids, 1, 2), axis=1, mode="clip")
  scores = jnp.where(ids < c, jnp.swapaxes(scores, 1, 2), -jnp.inf)
  best, pos = lax.top_k(scores, nprobe)
  centroid_best = jnp.moveaxis(centroid_best, 0, 1).reshape(g, -1)[:, :c]
  return table[:, :c], best, jnp.take_along_axis(ids, pos, axis=-1), centroid_best


# Stages 2-4 walk a group's candidate tokens this many at a time: the [step, Lq] scores stay in
# cache (50k corpus, 320-token queries: 512 is ~20% faster than 4096).
_TOKENS_PER_STEP = 512


class _Tokens(NamedTuple):
  """A group's candidate tokens, flat: each query's run padded to a multiple of _TOKENS_PER_STEP,
  so that every step holds one query's tokens. codes, seg [T] (the token's candidate as
  query * M + position; G * M for padding); step_query [T / _TOKENS_PER_STEP]; residuals
  [T, bytes] or None."""
  codes: np.ndarray
  seg: np.ndarray
  step_query: np.ndarray
  residuals: Optional[np.ndarray]


def _doc_max(token_scores, seg, num_docs):
  """Per candidate and query token, the best score of its tokens: token_scores(step) gives the
  [_TOKENS_PER_STEP, Lq] scores of that step's tokens, whose candidates are in seg [T] (num_docs:
  padding) -> [num_docs, Lq], -inf for a candidate without tokens."""
  step = _TOKENS_PER_STEP
  lq = jax.eval_shape(token_scores, 0).shape[-1]

  def body(i, best):
    return best.at[lax.dynamic_slice_in_dim(seg, i * step, step)].max(token_scores(i),
                                                                      mode="drop")

  best = jnp.full((num_docs + 1, lq), -jnp.inf, jnp.float32)
  return lax.fori_loop(0, seg.shape[0] // step, body, best)[:num_docs]


def _ranked(doc_max, has_tokens):
  """Sum over query tokens of each candidate's best [G, M, Lq] -> [G, M]: a real candidate with
  every token left out ranks after every other real one, padding last."""
  s = jnp.sum(doc_max, axis=-1)
  return jnp.where(has_tokens, jnp.where(jnp.isfinite(s), s, -1e30), -jnp.inf)


@functools.partial(jax.jit, static_argnames=("keep",))
def _centroid_interaction(table, codes, seg, step_query, has_tokens, keep):
  """Stages 2 and 3 for a group of queries: approximate MaxSim of each candidate from its tokens'
  centroid ids, looked up in the query-centroid scores, then its `keep` best. Pruning happens
  before: `_flat` leaves out the tokens of pruned centroids.

  table [G, C, Lq]; codes, seg, step_query as in `_Tokens`; has_tokens [G, M] -> positions into
  M [G, keep]."""
  g, c, lq = table.shape
  rows = table.reshape(g * c, lq)
  step = _TOKENS_PER_STEP

  def token_scores(i):
    return rows[step_query[i] * c + lax.dynamic_slice_in_dim(codes, i * step, step)]

  doc_max = _doc_max(token_scores, seg, has_tokens.size).reshape(*has_tokens.shape, lq)
  return lax.top_k(_ranked(doc_max, has_tokens), keep)[1]


@functools.partial(jax.jit, static_argnames=("k", "nbits", "precision"))
def _rerank(q, codes, packed, seg, step_query, has_tokens, centroids, weights, k, nbits,
            precision):
  """Stage 4: exact MaxSim of the decompressed candidates (q [G, Lq, dim], the rest as in
  `_centroid_interaction`) and the k best -> (scores, positions into M) [G, k]."""
  step = _TOKENS_PER_STEP

  def token_scores(i):
    d = _decompress(lax.dynamic_slice_in_dim(codes, i * step, step),
                    lax.dynamic_slice_in_dim(packed, i * step, step), centroids, weights, nbits)
    return jnp.einsum("td,qd->tq", d, q[step_query[i]], precision=precision,
                      preferred_element_type=jnp.float32)

  doc_max = _doc_max(token_scores, seg, has_tokens.size).reshape(*has_tokens.shape, -1)
  return lax.top_k(_ranked(doc_max, has_tokens), k)


# ---------------------------------------------------------------- build

def _chunk_source(corpus_chunks: Chunks):
  if callable(corpus_chunks):
    return corpus_chunks
  if iter(corpus_chunks) is corpus_chunks:
    raise TypeError("build reads the corpus twice: pass a sequence of chunks or a callable "
                    "returning a fresh iterable, not an iterator/generator")
  return lambda: corpus_chunks


def _valid_tokens(docs, mask):
  docs, mask = np.asarray(docs, np.float32), np.asarray(mask, bool)
  if docs.ndim != 3 or mask.shape != docs.shape[:2]:
    raise ValueError(f"chunk {docs.shape} / mask {mask.shape}: expected [n, Ld, dim] / [n, Ld]")
  return docs[mask], mask.sum(1)  # row-major: tokens in document order


def default_num_centroids(num_tokens: int) -> int:
  """PLAID's number of centroids for a corpus of `num_tokens` tokens: the power of two at or
  below 16 sqrt(num_tokens)."""
  return 1 << int(np.floor(np.log2(max(16 * np.sqrt(max(num_tokens, 1)), 1))))


@dataclasses.dataclass(frozen=True)
class _Codec:
  """What pass 1 learns: the centroids and residual buckets every shard shares."""
  nbits: int
  centroids: np.ndarray
  bucket_cutoffs: np.ndarray
  bucket_weights: np.ndarray
  num_docs: int


def default_sample_size(num_centroids: int) -> int:
  """Tokens sampled for k-means: 16 per centroid, at least 65,536. With 4 per centroid 2-bit
  recall@10 was 0.01-0.03 lower on the search benchmark's 10k corpus (docs/index.md)."""
  return max(1 << 16, 16 * num_centroids)


def _train(source, num_centroids, nbits, kmeans_iters, sample_size, seed, progress) -> _Codec:
  """Pass 1: a uniform sample (the `sample_size` tokens with the smallest random keys), k-means
  on it, and the residual buckets."""
  if nbits not in NBITS:  # before streaming anything
    raise ValueError(f"nbits must be one of {NBITS}, got {nbits!r}")
  if sample_size is None:
    sample_size = default_sample_size(num_centroids)
  if not is_int(sample_size) or sample_size < 1:
    raise ConfigError(f"sample_size={sample_size!r}: must be an integer >= 1")
  rng = np.random.default_rng(seed)
  sample, keys, dim, num_docs = None, np.zeros((0,)), None, 0
  for docs, mask in cli.progress(source(), "index: sampling", " chunks", progress):
    tokens, lens = _valid_tokens(docs, mask)
    num_docs += lens.shape[0]
    dim = tokens.shape[1] if dim is None else dim
    if tokens.shape[1] != dim:
      raise ValueError(f"embedding dim changed between chunks: {dim} -> {tokens.shape[1]}")
    sample = tokens if sample is None else np.concatenate([sample, tokens])
    keys = np.concatenate([keys, rng.random(tokens.shape[0])])
    if keys.shape[0] > sample_size:
      keep = np.argpartition(keys, sample_size)[:sample_size]
      sample, keys = sample[keep], keys[keep]
  if dim is None:
    raise ValueError("empty corpus: no chunks")
  _check_nbits(nbits, dim)
  if num_centroids < 1 or sample.shape[0] < num_centroids:
    raise ValueError(f"num_centroids={num_centroids} needs 1 <= C <= sampled valid tokens "
                     f"({sample.shape[0]})")
  init = sample[rng.choice(sample.shape[0], num_centroids, replace=False)]
  centroids = _kmeans(jnp.asarray(sample), jnp.asarray(init), kmeans_iters)
  cutoffs, weights = _bucket_params(jnp.asarray(sample), centroids, nbits)
  return _Codec(int(nbits), np.asarray(centroids, np.float32), np.asarray(cutoffs),
                np.asarray(weights), num_docs)


def _encoded(source, codec: _Codec, progress):
  """Pass 2: (codes [t], packed residuals [t, dim * nbits / 8], lengths [n]) per chunk (token
  count padded to a power of two: few compiled shapes)."""
  dim = codec.centroids.shape[1]
  for docs, mask in cli.progress(source(), "index: encoding", " chunks", progress):
    tokens, lens = _valid_tokens(docs, mask)
    t = tokens.shape[0]
    padded = np.zeros((max(256, pl.next_power_of_2(t)), dim), np.float32)
    padded[:t] = tokens
    c, r = _encode(padded, codec.centroids, codec.bucket_cutoffs, codec.nbits)
    yield np.asarray(c)[:t].astype(np.int32), np.asarray(r)[:t], lens


def _assemble(codec: _Codec, codes, residuals, lengths, corpus_key, first_doc) -> PlaidIndex:
  """An index of encoded documents, with their inverted lists: the unique (centroid, document)
  pairs, sorted by centroid then document."""
  n, c = lengths.shape[0], codec.centroids.shape[0]
  pairs = np.unique(codes.astype(np.int64) * n + np.repeat(np.arange(n), lengths))
  counts = np.bincount(pairs // max(n, 1), minlength=c)
  return PlaidIndex(
      nbits=codec.nbits, centroids=codec.centroids, bucket_cutoffs=codec.bucket_cutoffs,
      bucket_weights=codec.bucket_weights, codes=codes, residuals=residuals,
      doc_offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
      ivf_offsets=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
      ivf_docs=(pairs % max(n, 1)).astype(np.int32), corpus_key=corpus_key, first_doc=first_doc)


def build(corpus_chunks: Chunks, num_centroids: int, nbits: int = 2, *, kmeans_iters: int = 10,
          sample_size: Optional[int] = None, seed: int = 0, corpus_key: str = "",
          progress: bool = False) -> PlaidIndex:
  """Builds a PlaidIndex in memory, streaming the corpus twice (`build_sharded` writes a folder
  instead, holding one shard at a time).

  Args:
    corpus_chunks: a sequence of (docs [n, Ld, dim], mask [n, Ld]) NumPy chunks in corpus order, or
      a zero-argument callable returning a fresh iterable of them (Ld may differ between chunks).
    num_centroids: k-means clusters C (needs at least C valid tokens in the corpus).
    nbits: bits per residual dimension, one of 1, 2, 4, 8.
    kmeans_iters: Lloyd iterations.
    sample_size: tokens k-means and the bucket quantiles see; None: `default_sample_size`.
    seed: sampling and initialisation seed.
    corpus_key: recorded in the index, for `load` to check.
    progress: show a progress bar over the chunks of each pass.
  """
  source = _chunk_source(corpus_chunks)
  codec = _train(source, num_centroids, nbits, kmeans_iters, sample_size, seed, progress)
  codes, residuals, lengths = zip(*_encoded(source, codec, progress))
  return _assemble(codec, np.concatenate(codes), np.concatenate(residuals),
                   np.concatenate(lengths), corpus_key, 0)


def build_sharded(corpus_chunks: Chunks, path, num_shards: int, num_centroids: int,
                  nbits: int = 2, *, kmeans_iters: int = 10, sample_size: Optional[int] = None,
                  seed: int = 0, corpus_key: str = "", progress: bool = False) -> None:
  """`save(build(...), path, num_shards)` without the whole index in memory: pass 2 writes each
  shard (the same document ranges as `shard`) as soon as its documents are encoded, so memory is
  the sample, one chunk and one shard. Same arguments as `build`; `path` local or gs://."""
  if not is_int(num_shards) or num_shards < 1:
    raise ConfigError(f"num_shards={num_shards!r}: must be an integer >= 1")
  path = storage.path(path, "index path")
  source = _chunk_source(corpus_chunks)
  codec = _train(source, num_centroids, nbits, kmeans_iters, sample_size, seed, progress)
  if num_shards > codec.num_docs:
    raise ConfigError(f"num_shards={num_shards}: must be in [1, {codec.num_docs}] (documents)")
  bounds = _shard_bounds(codec.num_docs, num_shards)

  def shards():
    pending, done = [], 0  # encoded chunks not yet in a shard; documents already written
    for hi in bounds[1:].tolist():
      while sum(len(p[2]) for p in pending) < hi - done:
        if (chunk := next(chunks, None)) is None:
          raise ValueError(f"{path}: the corpus yielded fewer documents in pass 2 than in "
                           f"pass 1 ({codec.num_docs}); it must give the same chunks each time")
        pending.append(chunk)
      codes, residuals, lengths = (np.concatenate(a) for a in zip(*pending))
      n = hi - done
      t = int(lengths[:n].sum())
      yield _assemble(codec, codes[:t], residuals[:t], lengths[:n], corpus_key, done)
      pending = [(codes[t:], residuals[t:], lengths[n:])] if lengths.shape[0] > n else []
      done = hi

  chunks = _encoded(source, codec, progress)
  _save_folder(path, shards(), num_shards)
  if next(chunks, None) is not None:
    raise ValueError(f"{path}: the corpus yielded more documents in pass 2 than in pass 1 "
                     f"({codec.num_docs}); it must give the same chunks each time")


# ---------------------------------------------------------------- search

def _ranges(starts, lens):
  """The positions starts[i]..starts[i] + lens[i] of every range, concatenated in order."""
  return np.repeat(starts - np.cumsum(lens) + lens, lens) + np.arange(lens.sum())


def _token_bucket(n):
  """A token count rounded up to one of at most 8 sizes per octave, so that a handful of compiled
  programs serve every query group: a multiple of the larger of _TOKENS_PER_STEP and 1/16 of the
  next power of two."""
  granule = max(_TOKENS_PER_STEP, pl.next_power_of_2(n) // 16)
  return max(-(-n // granule), 1) * granule


def _flat(index: PlaidIndex, docs, residuals: bool, live_centroids=None) -> _Tokens:
  """The tokens of candidates docs [G, M] (-1: none) as `_Tokens`, T a `_token_bucket`.
  live_centroids [G, C] bool, if given, drops each query's tokens whose centroid it marks False
  (what pruned centroid interaction would score -inf)."""
  g, m = docs.shape
  step = _TOKENS_PER_STEP
  starts = index.doc_offsets[np.maximum(docs, 0)]
  lens = np.where(docs >= 0, index.doc_offsets[np.maximum(docs, 0) + 1] - starts, 0)
  rows = []
  for i in range(g):  # a query at a time: small temporaries are ~1.5x faster than one big pass
    pos = _ranges(starts[i], lens[i])
    seg = np.repeat(np.arange(i * m, (i + 1) * m, dtype=np.int32), lens[i])
    codes = index.codes[pos]
    if live_centroids is not None:
      live = live_centroids[i][codes]
      pos, seg, codes = pos[live], seg[live], codes[live]
    rows.append((pos, seg, codes))
  padded = np.array([-(-len(r[0]) // step) * step for r in rows])
  t = _token_bucket(int(padded.sum()))
  out = _Tokens(np.zeros(t, np.int32), np.full(t, g * m, np.int32),
                np.zeros(t // step, np.int32),
                np.zeros((t, index.residuals.shape[1]), np.uint8) if residuals else None)
  out.step_query[:padded.sum() // step] = np.repeat(np.arange(g), padded // step)
  for (pos, seg, codes), start in zip(rows, np.cumsum(padded) - padded):
    out.codes[start:start + len(pos)] = codes
    out.seg[start:start + len(pos)] = seg
    if residuals:
      out.residuals[start:start + len(pos)] = index.residuals[pos]
  return out


def _gather(index: PlaidIndex, docs):
  """Host gather of documents docs [...] (-1 = padding) -> codes, residuals, mask [..., Ld] with
  Ld the index's longest document."""
  lens = np.diff(index.doc_offsets)
  safe = np.maximum(docs, 0)
  pos = np.arange(max(index.max_doc_len, 1))
  mask = (pos < lens[safe][..., None]) & (docs >= 0)[..., None]
  tok = np.where(mask, index.doc_offsets[safe][..., None] + pos, 0)
  return index.codes[tok], index.residuals[tok], mask


def decompress(index: PlaidIndex, doc_ids) -> tuple[jax.Array, np.ndarray]:
  """Reconstructed token embeddings of documents doc_ids [n]: ([n, Ld_max, dim], mask [n, Ld_max])
  with Ld_max the longest document of the index; masked positions hold garbage."""
  codes, packed, mask = _gather(index, np.asarray(doc_ids, np.int64))
  d = _decompress_jit(codes, packed, index.centroids, index.bucket_weights, nbits=index.nbits)
  return d, mask


@dataclasses.dataclass(frozen=True)
class SearchOptions:
  """How hard `search` looks; `for_k(k)` gives PLAID's settings for k results.

  nprobe: centroids probed per query token (PLAID's ncells).
  threshold: centroid score threshold. A probed centroid under it adds no candidates (a token's
    best centroid always does), and centroid interaction's first pass leaves out every centroid
    whose best score over the query tokens is under it (PLAID's centroid_score_threshold).
  candidates: at most this many candidates per query enter centroid interaction: those with the
    highest sum over query tokens of their best probed centroid's score.
  keep: candidates kept by the pruned centroid interaction (PLAID's ndocs).
  rerank: of those, the best by unpruned centroid interaction are decompressed and scored exactly
    (PLAID: ndocs / 4).
  group: queries searched together; memory grows with it (scores [group, Lq, C]).
  """
  nprobe: int = 2
  threshold: float = 0.45
  candidates: int = 4096
  keep: int = 1024
  rerank: int = 256
  group: int = 4

  @classmethod
  def for_k(cls, k: int, **overrides) -> "SearchOptions":
    """PLAID's defaults by k (ColBERT's searcher): k <= 10, <= 100, larger."""
    if k <= 10:
      base = dict(nprobe=1, threshold=0.5, keep=256, rerank=64)
    elif k <= 100:
      base = dict(nprobe=2, threshold=0.45, keep=1024, rerank=256)
    else:
      base = dict(nprobe=4, threshold=0.4, keep=max(4 * k, 4096), rerank=max(4 * k, 4096) // 4)
    base["candidates"] = max(4 * base["keep"], 4096)
    return cls(**{**base, **overrides})

  def check(self, k: int, prefix: str = "SearchOptions.") -> None:
    """ConfigError naming the field (`<prefix><field>=<value>`) unless each count is a positive
    int, candidates >= keep >= rerank >= k and the threshold is a number."""
    for name in ("nprobe", "candidates", "keep", "rerank", "group"):
      value = getattr(self, name)
      if not is_int(value) or value < 1:
        raise ConfigError(f"{prefix}{name}={value!r}: must be an integer >= 1")
    if not self.candidates >= self.keep >= self.rerank >= k:
      raise ConfigError(f"{prefix}candidates={self.candidates}, keep={self.keep}, rerank="
                        f"{self.rerank}: need candidates >= keep >= rerank >= k={k}")
    if not isinstance(self.threshold, (int, float, np.floating)) or np.isnan(self.threshold):
      raise ConfigError(f"{prefix}threshold={self.threshold!r}: must be a number (-inf: no "
                        "pruning)")


def _candidates(index: PlaidIndex, ids, best, valid_q, threshold, cap):
  """Stage 1 on the host: the documents of each query's probed inverted lists, at most `cap`.

  ids, best [Lq, nprobe]: each token's probed centroids, best first; valid_q [Lq]. A document's
  stage-1 score is the sum over query tokens of the best score among the token's probed centroids
  that list it; the `cap` best documents are returned (ascending ids). Memory grows with the
  probed lists, not with the corpus."""
  take = valid_q[:, None] & ((best >= threshold) | (np.arange(ids.shape[1]) == 0))
  token = np.broadcast_to(np.arange(ids.shape[0])[:, None], ids.shape)[take]
  cents, s = ids[take], best[take]
  starts, ends = index.ivf_offsets[cents], index.ivf_offsets[cents + 1]
  lens = ends - starts
  if not lens.sum():
    return np.zeros((0,), np.int64)
  docs = index.ivf_docs[_ranges(starts, lens)].astype(np.int64)
  # Row-major order keeps each token's lists best first: the first (token, document) is its best.
  _, first = np.unique(np.repeat(token, lens) * index.num_docs + docs, return_index=True)
  found, which = np.unique(docs[first], return_inverse=True)
  if len(found) <= cap:
    return found
  score = np.bincount(which, weights=np.repeat(s, lens)[first])
  return np.sort(found[np.argpartition(-score, cap - 1)[:cap]])


def search(index: PlaidIndex, q, q_mask, k: int, options: Optional[SearchOptions] = None,
           precision=None) -> tuple[np.ndarray, np.ndarray]:
  """Approximate top-k documents by MaxSim, PLAID's way.

  Queries go `options.group` at a time through: query-centroid scores and candidate generation
  from the probed inverted lists (stage 1, capped at `options.candidates`); centroid interaction
  with pruning (stage 2, keeps `options.keep`), and without (stage 3, keeps `options.rerank`),
  both from the documents' centroid ids and the query-centroid scores, nothing decompressed; then
  decompression and exact MaxSim of the `rerank` survivors (stage 4). Shapes are bucketed to
  powers of two: a few compiled programs serve every query.

  Args:
    index: from `build` or `load`.
    q: [B, Lq, dim] query token embeddings; q_mask: [B, Lq] valid tokens, or None when masked
      tokens are exact zeros (all-zero tokens are then treated as masked).
    k: results per query.
    options: `SearchOptions`; default `SearchOptions.for_k(k)`.
    precision: `jax.lax.Precision` for the einsums.

  Returns:
    (scores [B, k] float32 best first, indices [B, k] int32); -inf / -1 past the candidates found.
  """
  q = np.asarray(q, np.float32)
  if q.ndim != 3 or q.shape[-1] != index.dim:
    raise ValueError(f"q must be [B, Lq, {index.dim}] for this index, got {q.shape}")
  if not isinstance(k, (int, np.integer)) or k < 1:
    raise ValueError(f"k must be >= 1, got {k}")
  options = options or SearchOptions.for_k(k)
  options.check(k)
  if q_mask is None:
    valid_q = np.any(q != 0, axis=-1)
  else:
    valid_q = np.asarray(q_mask, bool)
    if valid_q.shape != q.shape[:2]:
      raise ValueError(f"q_mask must be [B, Lq] = {q.shape[:2]}, got {valid_q.shape}")
    q = np.where(valid_q[..., None], q, 0.0).astype(np.float32)  # MaxSim needs zeros there
  g = options.group
  b = q.shape[0]
  q = np.pad(q, [(0, -b % g), (0, 0), (0, 0)])
  valid_q = np.pad(valid_q, [(0, -b % g), (0, 0)])
  nprobe = min(options.nprobe, index.num_centroids)
  out_scores, out_ids = [], []
  for start in range(0, q.shape[0], g):
    qg, vg = q[start:start + g], valid_q[start:start + g]
    table, best, ids, centroid_best = _query_centroid_scores(qg, vg, index.centroids, nprobe,
                                                             precision)
    best, ids = np.asarray(best), np.asarray(ids)
    # Pruned centroid interaction scores a token under the threshold -inf: such tokens are left
    # on the host (82-99% of them at thresholds 0.4-0.5 on the benchmark's corpus), as PLAID's
    # own kernel skips them.
    live_centroids = np.asarray(centroid_best) >= options.threshold
    cands = [_candidates(index, ids[i], best[i], vg[i], options.threshold, options.candidates)
             for i in range(g)]
    most = max(len(c) for c in cands)
    docs = np.full((g, max(64, k, pl.next_power_of_2(most))), -1, np.int64)
    for i, c in enumerate(cands):
      docs[i, :len(c)] = c

    def interact(docs, keep, live=None):
      tokens = _flat(index, docs, residuals=False, live_centroids=live)
      pos = _centroid_interaction(table, tokens.codes, tokens.seg, tokens.step_query, docs >= 0,
                                  keep)
      return np.take_along_axis(docs, np.asarray(pos), axis=1)  # padding stays -1

    if most > options.keep:  # stage 2, pruned
      docs = interact(docs, options.keep, live_centroids)
    if most > options.rerank:  # stage 3
      docs = interact(docs, options.rerank)
    tokens = _flat(index, docs, residuals=True)
    s, pos = _rerank(qg, tokens.codes, tokens.residuals, tokens.seg, tokens.step_query, docs >= 0,
                     index.centroids, index.bucket_weights, k, index.nbits, precision)
    s = np.asarray(s)
    out_scores.append(s)
    out_ids.append(np.where(np.isneginf(s), -1, np.take_along_axis(docs, np.asarray(pos), 1)))
  return (np.concatenate(out_scores)[:b].astype(np.float32),
          np.concatenate(out_ids)[:b].astype(np.int32))


def _shard_bounds(num_docs: int, num_shards: int) -> np.ndarray:
  """[num_shards + 1] document bounds of contiguous shards, as equal as can be."""
  return np.linspace(0, num_docs, num_shards + 1).round().astype(np.int64)


def shard(index: PlaidIndex, num_shards: int) -> list[PlaidIndex]:
  """The index split into `num_shards` contiguous ranges of documents (as equal as can be), each
  a PlaidIndex of its own with the same centroids and buckets and its documents numbered from 0;
  for `search_sharded`."""
  if not is_int(num_shards) or not 1 <= num_shards <= max(index.num_docs, 1):
    raise ConfigError(f"num_shards={num_shards!r}: must be an integer in [1, {index.num_docs}]")
  bounds = _shard_bounds(index.num_docs, num_shards)
  pairs_doc = index.ivf_docs.astype(np.int64)
  pairs_centroid = np.repeat(np.arange(index.num_centroids), np.diff(index.ivf_offsets))
  shards = []
  for lo, hi in zip(bounds[:-1], bounds[1:]):
    t0, t1 = index.doc_offsets[lo], index.doc_offsets[hi]
    mine = (pairs_doc >= lo) & (pairs_doc < hi)  # stays sorted by centroid, then document
    counts = np.bincount(pairs_centroid[mine], minlength=index.num_centroids)
    shards.append(dataclasses.replace(
        index, codes=index.codes[t0:t1], residuals=index.residuals[t0:t1],
        doc_offsets=index.doc_offsets[lo:hi + 1] - t0,
        ivf_offsets=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
        ivf_docs=(pairs_doc[mine] - lo).astype(np.int32), first_doc=index.first_doc + int(lo)))
  return shards


def _join(shards: Sequence[PlaidIndex]) -> PlaidIndex:
  """The inverse of `shard`: contiguous shards of one corpus as one index."""
  first = shards[0]
  docs = np.cumsum([0] + [s.num_docs for s in shards])
  tokens = np.cumsum([0] + [s.codes.shape[0] for s in shards])
  centroid_of = lambda s: np.repeat(np.arange(s.num_centroids), np.diff(s.ivf_offsets))
  centroid = np.concatenate([centroid_of(s) for s in shards])
  doc = np.concatenate([s.ivf_docs.astype(np.int64) + d for s, d in zip(shards, docs)])
  order = np.lexsort((doc, centroid))
  counts = np.bincount(centroid, minlength=first.num_centroids)
  return dataclasses.replace(
      first, codes=np.concatenate([s.codes for s in shards]),
      residuals=np.concatenate([s.residuals for s in shards]),
      doc_offsets=np.concatenate([[0]] + [s.doc_offsets[1:] + t for s, t in zip(shards, tokens)]
                                 ).astype(np.int64),
      ivf_offsets=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
      ivf_docs=doc[order].astype(np.int32))


def search_sharded(shards: Sequence[PlaidIndex], q, q_mask, k: int,
                   options: Optional[SearchOptions] = None, devices=None,
                   precision=None) -> tuple[np.ndarray, np.ndarray]:
  """`search` over shards of one corpus (`shard`, `load_shards`: all of them, or a host's):
  shard i searched on devices[i] (default: the local devices, in turn), all at once, and their
  top-k merged by score (ties: lower id). Ids are corpus ids (each shard's `first_doc` added).
  Each shard applies `options` to its own documents; with every list probed and nothing pruned,
  all the shards give `search` on the whole index."""
  devices = list(devices or jax.local_devices())
  offsets = [s.first_doc for s in shards]

  def one(i):
    with jax.default_device(devices[i % len(devices)]):
      return search(shards[i], q, q_mask, k, options, precision)

  with concurrent.futures.ThreadPoolExecutor(len(shards)) as pool:
    found = list(pool.map(one, range(len(shards))))
  scores = np.concatenate([s for s, _ in found], axis=1)
  ids = np.concatenate([np.where(i >= 0, i + off, -1) for (_, i), off in zip(found, offsets)],
                       axis=1)
  order = np.lexsort((np.where(ids >= 0, ids, np.iinfo(np.int32).max), -scores), axis=1)[:, :k]
  return (np.take_along_axis(scores, order, 1).astype(np.float32),
          np.take_along_axis(ids, order, 1).astype(np.int32))


# ---------------------------------------------------------------- save / load

def _meta(index: PlaidIndex) -> dict:
  return {"format": FORMAT, "version": VERSION, "nbits": index.nbits, "dim": index.dim,
          "num_centroids": index.num_centroids, "num_docs": index.num_docs,
          "num_tokens": int(index.codes.shape[0]), "corpus_key": index.corpus_key,
          "first_doc": index.first_doc}


def _write_npz(path, arrays: dict) -> None:
  # A file object: savez must not append ".npz" to the name.
  storage.write_with(path, lambda f: np.savez(f, **arrays))


def _read_npz(path, names) -> dict:
  try:
    with path.open("rb") as f, np.load(f, allow_pickle=False) as z:
      files = {name: z[name] for name in z.files}
  except FileNotFoundError:
    raise
  except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
    raise ValueError(f"{path}: not a readable PLAID index (.npz) file: {e}") from e
  if missing := set(names) - set(files):
    raise ValueError(f"{path}: missing arrays {sorted(missing)}")
  return files


def save(index: PlaidIndex, path, num_shards: int = 1) -> None:
  """Writes the index, local or gs://, never half-written under its name (storage.write_with).
  num_shards=1: one uncompressed .npz (arrays + a JSON `meta`). More: a folder of that many
  document shards (`shard`), one file each, for `load_shards` to read a host's share; its
  META_FILE is written last."""
  path = storage.path(path, "index path")
  if num_shards == 1:
    _write_npz(path, {"meta": np.array(json.dumps(_meta(index))),
                      **{name: getattr(index, name) for name in _ARRAYS}})
    return
  _save_folder(path, shard(index, num_shards), num_shards)


def _save_folder(path, shards: Iterable[PlaidIndex], num_shards: int) -> None:
  """A sharded index folder from its shards, in order; an earlier META_FILE goes first, so that
  the folder reads as incomplete until the new one is written, last."""
  if (path / META_FILE).exists():
    (path / META_FILE).unlink()
  listed, first = [], None
  for i, part in enumerate(shards):
    if first is None:
      first = part
      _write_npz(path / SHARED_FILE, {name: getattr(part, name) for name in _SHARED})
    _write_npz(path / shard_file(i, num_shards), {name: getattr(part, name) for name in _OWN})
    listed.append({"first_doc": part.first_doc, "num_docs": part.num_docs,
                   "num_tokens": int(part.codes.shape[0])})
  meta = {**_meta(first), "num_docs": sum(p["num_docs"] for p in listed),
          "num_tokens": sum(p["num_tokens"] for p in listed), "shards": listed}
  storage.write_with(path / META_FILE, lambda f: f.write(json.dumps(meta, indent=1).encode()))


def _check_meta(path, meta: dict, corpus_key, dim) -> None:
  if meta.get("format") != FORMAT or meta.get("version") != VERSION:
    raise ValueError(f"{path}: expected {FORMAT} version {VERSION}, got "
                     f"{meta.get('format')} version {meta.get('version')}")
  if corpus_key is not None and meta.get("corpus_key", "") != corpus_key:
    raise ValueError(f"{path}: built for another corpus ({meta.get('corpus_key') or 'unnamed'}, "
                     f"not {corpus_key or 'unnamed'})")
  if dim is not None and meta.get("dim") != dim:
    raise ValueError(f"{path}: built for {meta.get('dim')}-dimensional embeddings, not {dim}")


def _index(path, meta: dict, arrays: dict, expect: dict) -> PlaidIndex:
  """A PlaidIndex from `arrays`, checked against `expect` (metadata the arrays must give)."""
  try:
    index = PlaidIndex(nbits=meta.get("nbits"), **{name: arrays[name] for name in _ARRAYS},
                       corpus_key=str(meta.get("corpus_key", "")),
                       first_doc=int(expect.get("first_doc", 0)))
  except ValueError as e:
    raise ValueError(f"{path}: corrupt index: {e}") from e
  for key in ("dim", "num_centroids", "num_docs"):
    if key in expect and expect[key] != getattr(index, key):
      raise ValueError(f"{path}: corrupt index: metadata {key}={expect[key]} but the arrays "
                       f"give {getattr(index, key)}")
  return index


def load_shards(path, which: Optional[Sequence[int]] = None, corpus_key: Optional[str] = None,
                dim: Optional[int] = None) -> list[PlaidIndex]:
  """Shards `which` (default: all) of an index `save`d with num_shards > 1, for `search_sharded`
  (a host's share: e.g. which=range(jax.process_index(), n, jax.process_count())). ValueError
  naming the file for a damaged or incomplete folder, another corpus or dim (as `load`)."""
  path = storage.path(path, "index path")
  if not (path / META_FILE).exists():
    raise ValueError(f"{path}: not a sharded PLAID index (no {META_FILE}: incomplete, or a "
                     "single-file index, which `load` reads)")
  try:
    meta = json.loads((path / META_FILE).read_text())
  except ValueError as e:
    raise ValueError(f"{path / META_FILE}: unreadable index metadata: {e}") from e
  _check_meta(path, meta, corpus_key, dim)
  parts = meta.get("shards") or []
  which = range(len(parts)) if which is None else which
  if bad := [i for i in which if not is_int(i) or not 0 <= i < len(parts)]:
    raise ConfigError(f"which={list(which)}: {path} has shards 0..{len(parts) - 1}, not {bad}")
  shared = _read_npz(path / SHARED_FILE, _SHARED)
  out = []
  for i in which:
    file = path / shard_file(i, len(parts))
    own = _read_npz(file, _OWN)
    out.append(_index(file, meta, {**shared, **own},
                      {**parts[i], "dim": meta.get("dim"),
                       "num_centroids": meta.get("num_centroids")}))
  return out


def load(path, corpus_key: Optional[str] = None, dim: Optional[int] = None) -> PlaidIndex:
  """Reads a `save`d index (one file, or a sharded folder as one index); ValueError naming `path`
  if it is not a valid index of this version, or was built for another corpus (`corpus_key`) or
  embedding size (`dim`) than given."""
  path = storage.path(path, "index path")
  if (path / META_FILE).exists():
    return _join(load_shards(path, corpus_key=corpus_key, dim=dim))
  files = _read_npz(path, ("meta",) + _ARRAYS)
  try:
    meta = json.loads(str(files.pop("meta")))
  except ValueError as e:
    raise ValueError(f"{path}: missing or unreadable index metadata") from e
  _check_meta(path, meta, corpus_key, dim)
  return _index(path, meta, files, meta)
