"""PLAID-style compressed late-interaction index (ColBERTv2 residual compression + centroid IVF).

  index = build(chunks, num_centroids=1024, nbits=2)     # chunks: list or callable -> iterable
  scores, indices = search(index, q, q_mask, k=10, nprobe=4, ncandidates=256)
  save(index, "corpus.plaid.npz"); index = load("corpus.plaid.npz")

Build streams the corpus twice, one chunk of (docs [n, Ld, dim], mask [n, Ld]) at a time: pass 1
keeps a uniform sample of valid tokens (the `sample_size` smallest of per-token random keys) for
spherical k-means (jitted Lloyd iterations, inner-product assignment: embeddings are L2-normalised);
pass 2 stores every valid token as its nearest centroid id plus its residual (token - centroid)
quantised to `nbits` per dimension and packed into uint8. Bucket cutoffs are per-dimension
quantiles of the sample's residuals (as ColBERTv2), bucket values the mean residual in each bucket.
Decompressed tokens are re-normalised (as ColBERTv2). Inverted lists map each centroid to the sorted
ids of the documents with a token assigned to it (CSR: ivf_offsets + ivf_docs).

Search: score query tokens against the centroids, probe the top `nprobe` centroids of every valid
query token, take the union of their documents (host side, NumPy); optionally keep the
`ncandidates` best of those by MaxSim against centroid-only reconstructions; then rerank on the
decompressed embeddings with `late_interaction.maxsim`. The compressed index stays in host memory;
only the candidates' codes and residuals go to the device.

Differences from `search.exact_search`: documents with no valid token are in no inverted list and
are never returned; when a query has fewer than k candidates the tail is score -inf, index -1.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import zipfile
from typing import Callable, Iterable, Optional, Sequence, Union

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from preflmr_jax import late_interaction, storage

__all__ = ["PlaidIndex", "build", "search", "decompress", "save", "load", "NBITS"]

NBITS = (1, 2, 4, 8)
FORMAT = "preflmr_jax.plaid_index"
VERSION = 1
_ARRAYS = ("centroids", "bucket_cutoffs", "bucket_weights", "codes", "residuals", "doc_offsets",
           "ivf_offsets", "ivf_docs")

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
  return b.reshape(*p.shape[:-1], -1)


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


def _maxsim_per_query(q, d, mask, precision):
  """q [B, Lq, dim] against its own documents d [B, M, Ld, dim] -> [B, M]."""
  return jax.vmap(
      lambda qb, db, mb: late_interaction.maxsim(qb[None], db, mb, precision=precision)[0])(
          q, d, mask)


@functools.partial(jax.jit, static_argnames=("nprobe",))
def _probe(q, centroids, nprobe):
  s = jnp.einsum("bqd,cd->bqc", q, centroids, preferred_element_type=jnp.float32)
  return lax.top_k(s, nprobe)[1]


@functools.partial(jax.jit, static_argnames=("n", "precision"))
def _prune(q, codes, mask, valid, centroids, n, precision):
  """Positions of the n best candidates by MaxSim against centroid-only documents."""
  s = _maxsim_per_query(q, centroids[codes], mask, precision)
  return lax.top_k(jnp.where(valid, s, -jnp.inf), n)[1]


@functools.partial(jax.jit, static_argnames=("k", "nbits", "precision"))
def _rerank(q, codes, packed, mask, valid, centroids, weights, k, nbits, precision):
  d = _decompress(codes, packed, centroids, weights, nbits)
  s = _maxsim_per_query(q, d, mask, precision)
  return lax.top_k(jnp.where(valid, s, -jnp.inf), k)


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


def _pow2(n, minimum):
  return max(minimum, 1 << (max(n, 1) - 1).bit_length())


def build(corpus_chunks: Chunks, num_centroids: int, nbits: int = 2, *, kmeans_iters: int = 10,
          sample_size: int = 1 << 16, seed: int = 0) -> PlaidIndex:
  """Builds a PlaidIndex, streaming the corpus twice.

  Args:
    corpus_chunks: a sequence of (docs [n, Ld, dim], mask [n, Ld]) NumPy chunks in corpus order, or
      a zero-argument callable returning a fresh iterable of them (Ld may differ between chunks).
    num_centroids: k-means clusters C (needs at least C valid tokens in the corpus).
    nbits: bits per residual dimension, one of 1, 2, 4, 8.
    kmeans_iters: Lloyd iterations; sample_size: tokens k-means and the quantiles see.
    seed: sampling and initialisation seed.
  """
  if nbits not in NBITS:  # before streaming anything
    raise ValueError(f"nbits must be one of {NBITS}, got {nbits!r}")
  source = _chunk_source(corpus_chunks)
  rng = np.random.default_rng(seed)
  # Pass 1: uniform sample = the sample_size tokens with the smallest random keys.
  sample, keys, dim = None, np.zeros((0,)), None
  for docs, mask in source():
    tokens, _ = _valid_tokens(docs, mask)
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

  # Pass 2: encode every chunk (token count padded to a power of two: few compiled shapes).
  codes, residuals, lengths = [], [], []
  for docs, mask in source():
    tokens, lens = _valid_tokens(docs, mask)
    t = tokens.shape[0]
    padded = np.zeros((_pow2(t, 256), dim), np.float32)
    padded[:t] = tokens
    c, r = _encode(padded, centroids, cutoffs, nbits)
    codes.append(np.asarray(c)[:t])
    residuals.append(np.asarray(r)[:t])
    lengths.append(lens)
  codes = np.concatenate(codes).astype(np.int32)
  lengths = np.concatenate(lengths)
  n = lengths.shape[0]
  doc_offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)

  # Inverted lists: unique (centroid, doc) pairs, sorted by centroid then document.
  pairs = np.unique(codes.astype(np.int64) * n + np.repeat(np.arange(n), lengths))
  counts = np.bincount(pairs // n, minlength=num_centroids)
  return PlaidIndex(
      nbits=int(nbits), centroids=np.asarray(centroids, np.float32),
      bucket_cutoffs=np.asarray(cutoffs), bucket_weights=np.asarray(weights), codes=codes,
      residuals=np.concatenate(residuals), doc_offsets=doc_offsets,
      ivf_offsets=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
      ivf_docs=(pairs % n).astype(np.int32))


# ---------------------------------------------------------------- search

def _gather(index: PlaidIndex, docs):
  """Host gather of documents docs [...] (-1 = padding) -> codes, residuals, mask [..., Ld]."""
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


def _candidates(index: PlaidIndex, probed, valid_q, width):
  """Union of the probed inverted lists per query -> [B, M] doc ids, -1 padded (M >= width)."""
  out = []
  for ids, v in zip(probed, valid_q):
    cents = np.unique(ids[v])
    lists = [index.ivf_docs[index.ivf_offsets[c]:index.ivf_offsets[c + 1]] for c in cents]
    out.append(np.unique(np.concatenate(lists)) if lists else np.zeros((0,), np.int32))
  m = _pow2(max(len(o) for o in out), width)
  docs = np.full((len(out), m), -1, np.int64)
  for b, o in enumerate(out):
    docs[b, :len(o)] = o
  return docs


def search(index: PlaidIndex, q, q_mask, k: int, nprobe: int = 4,
           ncandidates: Optional[int] = None, precision=None) -> tuple[np.ndarray, np.ndarray]:
  """Approximate top-k documents by MaxSim.

  Args:
    index: from `build` or `load`.
    q: [B, Lq, dim] query token embeddings; q_mask: [B, Lq] valid tokens, or None when masked
      tokens are exact zeros (all-zero tokens are then treated as masked).
    k: results per query.
    nprobe: centroids probed per valid query token.
    ncandidates: if set, keep only this many candidates (by centroid-only MaxSim) for the rerank;
      the rerank holds [B, candidates, Ld_max, dim] float32 decompressed tokens on the device.
    precision: `jax.lax.Precision` for the MaxSim einsums.

  Returns:
    (scores [B, k] float32 best first, indices [B, k] int32); -inf / -1 past the candidates found.
  """
  q = np.asarray(q, np.float32)
  if q.ndim != 3 or q.shape[-1] != index.dim:
    raise ValueError(f"q must be [B, Lq, {index.dim}], got {q.shape}")
  if k < 1:
    raise ValueError(f"k must be >= 1, got {k}")
  if nprobe < 1 or (ncandidates is not None and ncandidates < 1):
    raise ValueError(f"nprobe and ncandidates must be >= 1, got {nprobe}, {ncandidates}")
  if q_mask is None:
    valid_q = np.any(q != 0, axis=-1)
  else:
    valid_q = np.asarray(q_mask, bool)
    if valid_q.shape != q.shape[:2]:
      raise ValueError(f"q_mask must be [B, Lq] = {q.shape[:2]}, got {valid_q.shape}")
    q = np.where(valid_q[..., None], q, 0.0).astype(np.float32)  # MaxSim needs zeros there

  probed = np.asarray(_probe(q, index.centroids, min(nprobe, index.num_centroids)))
  docs = _candidates(index, probed, valid_q, k)
  if ncandidates is not None and docs.shape[1] > max(ncandidates, k):
    n = max(ncandidates, k)
    codes, _, mask = _gather(index, docs)
    pos = np.asarray(_prune(q, codes, mask, docs >= 0, index.centroids, n, precision))
    docs = np.take_along_axis(docs, pos, axis=1)  # padding stays -1 (it ranks last)
  codes, packed, mask = _gather(index, docs)
  scores, pos = _rerank(q, codes, packed, mask, docs >= 0, index.centroids,
                        index.bucket_weights, k, index.nbits, precision)
  ids = np.take_along_axis(docs, np.asarray(pos), axis=1)
  scores = np.asarray(scores)
  return scores, np.where(np.isneginf(scores), -1, ids).astype(np.int32)


# ---------------------------------------------------------------- save / load

def save(index: PlaidIndex, path) -> None:
  """Writes one uncompressed .npz (arrays + a JSON `meta`), local or gs://, never half-written
  under its name (storage.write_with)."""
  meta = {"format": FORMAT, "version": VERSION, "nbits": index.nbits, "dim": index.dim,
          "num_centroids": index.num_centroids, "num_docs": index.num_docs,
          "num_tokens": int(index.codes.shape[0])}
  # A file object: savez must not append ".npz" to the name.
  storage.write_with(storage.path(path, "index path"), lambda f: np.savez(
      f, meta=np.array(json.dumps(meta)), **{name: getattr(index, name) for name in _ARRAYS}))


def load(path) -> PlaidIndex:
  """Reads a `save`d index; ValueError naming `path` if it is not a valid index of this version."""
  path = storage.path(path, "index path")
  try:
    with path.open("rb") as f, np.load(f, allow_pickle=False) as z:
      files = {name: z[name] for name in z.files}
  except FileNotFoundError:
    raise
  except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
    raise ValueError(f"{path}: not a readable PLAID index (.npz) file: {e}") from e
  try:
    meta = json.loads(str(files.pop("meta")))
  except (KeyError, ValueError) as e:
    raise ValueError(f"{path}: missing or unreadable index metadata") from e
  if meta.get("format") != FORMAT or meta.get("version") != VERSION:
    raise ValueError(f"{path}: expected {FORMAT} version {VERSION}, got "
                     f"{meta.get('format')} version {meta.get('version')}")
  missing = set(_ARRAYS) - set(files)
  if missing:
    raise ValueError(f"{path}: missing arrays {sorted(missing)}")
  try:
    index = PlaidIndex(nbits=meta.get("nbits"), **{name: files[name] for name in _ARRAYS})
  except ValueError as e:
    raise ValueError(f"{path}: corrupt index: {e}") from e
  for key in ("dim", "num_centroids", "num_docs"):
    if meta.get(key) != getattr(index, key):
      raise ValueError(f"{path}: corrupt index: metadata {key}={meta.get(key)} but the arrays "
                       f"give {getattr(index, key)}")
  return index
