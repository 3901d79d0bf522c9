"""ColBERT late interaction (MaxSim) between token embeddings.

  score(q, d) = sum_i max_j <Q_i, D_j>,   j over the valid tokens of d.

Masked query tokens are exact zeros (the encoders zero them), so they add
nothing and need no mask here. Masked document tokens can never win the max.
No temperature, no length normalisation. Products accumulate in float32 even
for bf16 inputs, and every function returns float32.

Empty documents: a document with no valid token has no max; its contribution
is defined as 0 for every query token, so it scores exactly 0.0 (the same
score as a document whose token embeddings are all zero). Callers that must
never retrieve such documents should drop them or mask the score to -inf.

Nothing here names a mesh: inputs may be global jax.Arrays sharded any way
(e.g. queries over batch, documents over N) and XLA partitions the
computation; the numbers match the unsharded ones.
"""

import functools
from typing import Optional

import jax
from jax import lax
import jax.numpy as jnp

__all__ = ["check_shapes", "chunk_sizes", "default_tile_bytes", "maxsim", "maxsim_chunked",
           "maxsim_pairwise"]


def check_shapes(Q, D, D_mask):
  """Raises ValueError on bad ranks/shapes (at trace time: shapes are static)."""
  if Q.ndim != 3:
    raise ValueError(f"Q must be [B, Lq, dim], got shape {Q.shape}")
  if D.ndim != 3:
    raise ValueError(f"D must be [N, Ld, dim], got shape {D.shape}")
  if Q.shape[-1] != D.shape[-1]:
    raise ValueError(
        f"embedding dim mismatch: Q has {Q.shape[-1]}, D has {D.shape[-1]}")
  if tuple(D_mask.shape) != tuple(D.shape[:2]):
    raise ValueError(
        f"D_mask must be [N, Ld] = {tuple(D.shape[:2])}, got {D_mask.shape}")


def _max_over_doc_tokens(s, mask, axis):
  """max over `axis` of `s` restricted to `mask`; 0 where no token is valid."""
  s = jnp.where(mask, s, -jnp.inf)
  m = jnp.max(s, axis=axis, initial=-jnp.inf)  # initial: Ld == 0 is empty too
  # Empty max is -inf; define it as 0 so empty documents score a finite 0.
  # Its gradient is 0 too (the cotangent into masked positions is dropped).
  return jnp.where(jnp.isneginf(m), 0.0, m)


def _maxsim_nb(Q, D, D_mask, precision):
  """Unchecked all-pairs MaxSim, transposed: -> [N, B]."""
  # Token scores laid out [N, Ld, B, Lq]: the max over Ld is then an
  # elementwise max of contiguous [B, Lq] rows (vectorises on CPU), which
  # measured faster than reducing a trailing Ld axis. Written as one 2-D
  # matmul: XLA:CPU ran the equivalent einsum 5-15% slower.
  (n, ld, dim), (b, lq, _) = D.shape, Q.shape
  s = jnp.dot(D.reshape(n * ld, dim), Q.reshape(b * lq, dim).T,
              precision=precision, preferred_element_type=jnp.float32)
  s = s.reshape(n, ld, b, lq)
  m = _max_over_doc_tokens(s, D_mask.astype(bool)[:, :, None, None], axis=1)
  return jnp.sum(m, axis=-1)  # over query tokens


@functools.partial(jax.jit, static_argnames=("precision",))
def maxsim(Q, D, D_mask, precision=None):
  """All-pairs MaxSim scores.

  Args:
    Q: [B, Lq, dim] query token embeddings (masked tokens are zeros).
    D: [N, Ld, dim] document token embeddings.
    D_mask: [N, Ld] bool or 0/1, True/1 on valid document tokens.
    precision: optional `jax.lax.Precision` for the einsum (e.g. HIGHEST to
      avoid TF32/bf16 passes for fp32 inputs on GPU/TPU).

  Returns:
    [B, N] float32 scores. Materialises all B*Lq*N*Ld token scores; use
    `maxsim_chunked` for large N (it is also faster on CPU).
  """
  check_shapes(Q, D, D_mask)
  return _maxsim_nb(Q, D, D_mask, precision).T


def pad_to_multiple(x, axis: int, multiple: int, value=0):
  """Pads `axis` of x up to a multiple of `multiple` with `value`."""
  pad = -x.shape[axis] % multiple
  if pad == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, pad)
  return jnp.pad(x, widths, constant_values=value)


def _chunked_over_docs(Q, D, D_mask, chunk_size, precision):
  """[B, N] scores computed `chunk_size` documents at a time."""
  n, ld, dim = D.shape
  if n == 0:
    return jnp.zeros((Q.shape[0], 0), jnp.float32)
  chunk = min(chunk_size, n)
  # Padding documents are fully masked (score 0) and sliced off below.
  D = pad_to_multiple(D, 0, chunk, 0)
  D_mask = pad_to_multiple(D_mask.astype(bool), 0, chunk, False)
  steps = D.shape[0] // chunk
  # Strided chunks: step k scores documents {c * steps + k}. Splitting N as
  # (chunk, steps) keeps the leading factor, so a D sharded over N stays
  # sharded inside every step (each device scores its own documents) instead
  # of being gathered chunk by chunk.
  D = D.reshape(chunk, steps, ld, dim)
  D_mask = D_mask.reshape(chunk, steps, ld)

  # Rematerialised: under a gradient, the backward pass recomputes each chunk's token scores
  # instead of keeping every chunk's (which is the whole unchunked tensor again: 85 GiB per chip
  # for ViT-L's loss at 4096 queries on v5e-256).
  @functools.partial(jax.checkpoint, prevent_cse=False)
  def step(k):
    d = lax.dynamic_index_in_dim(D, k, axis=1, keepdims=False)
    dm = lax.dynamic_index_in_dim(D_mask, k, axis=1, keepdims=False)
    return _maxsim_nb(Q, d, dm, precision)  # [chunk, B]

  s = lax.map(step, jnp.arange(steps))  # [steps, chunk, B]
  s = jnp.transpose(s, (2, 1, 0)).reshape(Q.shape[0], chunk * steps)
  return s[:, :n]


def default_tile_bytes() -> int:
  """Score-tile budget of `maxsim_chunked` on the default backend.

  CPU: ~2 MiB of float32 token scores stays in this machine's L2/L3: over 0.5-8 MiB and the
  MaxSim shapes of benchmarks/run.py it was the best tile or within 10% of it for each shape
  (1 MiB lost up to 18%). Accelerators: large tiles, so that few loop steps each keep the matmul
  units busy (on an H100, 1 GiB ran 8% faster than 256 MiB; benchmarks/RESULTS_GPU.md).
  """
  return 2 << 20 if jax.default_backend() == "cpu" else 256 << 20


def _largest_divisor_at_most(n: int, limit: int) -> int:
  return max(d for d in range(1, min(n, limit) + 1) if n % d == 0)


def chunk_sizes(num_queries: int, query_len: int, num_docs: int, doc_len: int,
                tile_bytes: int) -> tuple[int, int]:
  """(document chunk, query chunk) whose float32 token scores fit about `tile_bytes`.

  Queries are chunked only when one document's scores against all of them exceed the
  budget. The document chunk is the largest divisor of `num_docs` within the budget (no
  padding copy of the corpus) unless that is under half the budget's size.
  """
  per_pair = 4 * query_len * doc_len  # bytes of one (query, document) pair's token scores
  if num_queries * per_pair <= tile_bytes:
    query_chunk = max(num_queries, 1)
  else:
    query_chunk = max(1, tile_bytes // per_pair)
  target = max(1, tile_bytes // (query_chunk * per_pair))
  if num_docs == 0:
    return target, query_chunk
  divisor = _largest_divisor_at_most(num_docs, target)
  return (divisor if 2 * divisor >= min(target, num_docs) else target), query_chunk


@functools.partial(
    jax.jit, static_argnames=("chunk_size", "query_chunk_size", "precision", "tile_bytes"))
def maxsim_chunked(Q, D, D_mask, chunk_size: Optional[int] = None,
                   query_chunk_size: Optional[int] = None, precision=None,
                   tile_bytes: Optional[int] = None):
  """`maxsim` holding at most [qchunk, Lq, chunk_size, Ld] token scores at once.

  Loops (lax.map) over document chunks, and over query chunks when
  `query_chunk_size` is set. N and B need not be multiples of the chunk sizes
  (the corpus is then padded: a copy); chunk sizes >= N (or >= B) mean one
  chunk. Same arguments and result as `maxsim`, up to float32 summation order.

  `chunk_size=None` picks both chunk sizes from a score-tile budget
  (`tile_bytes`, default `default_tile_bytes()`; see `chunk_sizes`) unless
  `query_chunk_size` is given. The tile, not the FLOPs, sets the speed: on CPU
  a tile that stays in cache runs near the matmul limit, while one that spills
  to memory, or a tiny one (loop overhead), runs at a third of it.
  """
  check_shapes(Q, D, D_mask)
  if chunk_size is not None and chunk_size < 1:
    raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
  if query_chunk_size is not None and query_chunk_size < 1:
    raise ValueError(f"query_chunk_size must be >= 1, got {query_chunk_size}")
  if tile_bytes is not None and tile_bytes < 1:
    raise ValueError(f"tile_bytes must be >= 1, got {tile_bytes}")
  if chunk_size is None:
    (b, lq, _), (n, ld, _) = Q.shape, D.shape
    budget = tile_bytes or default_tile_bytes()
    if query_chunk_size is None:
      chunk_size, query_chunk_size = chunk_sizes(b, lq, n, ld, budget)
    else:
      chunk_size, _ = chunk_sizes(min(b, query_chunk_size), lq, n, ld, budget)
  if query_chunk_size is None or query_chunk_size >= Q.shape[0]:
    return _chunked_over_docs(Q, D, D_mask, chunk_size, precision)

  b, lq, dim = Q.shape
  qc = query_chunk_size
  # Zero padding queries score 0 and are sliced off. Strided split as above.
  Qp = pad_to_multiple(Q, 0, qc, 0)
  steps = Qp.shape[0] // qc
  Qp = Qp.reshape(qc, steps, lq, dim)

  def step(k):
    q = lax.dynamic_index_in_dim(Qp, k, axis=1, keepdims=False)
    return _chunked_over_docs(q, D, D_mask, chunk_size, precision)  # [qc, N]

  s = lax.map(step, jnp.arange(steps))  # [steps, qc, N]
  s = jnp.transpose(s, (1, 0, 2)).reshape(qc * steps, -1)
  return s[:b]


@functools.partial(jax.jit, static_argnames=("precision",))
def maxsim_pairwise(Q, D, D_mask, precision=None):
  """MaxSim of Q[i] against D[i] only: [B, Lq, dim] x [B, Ld, dim] -> [B]."""
  check_shapes(Q, D, D_mask)
  if Q.shape[0] != D.shape[0]:
    raise ValueError(
        f"pairwise scoring needs as many documents as queries: "
        f"{Q.shape[0]} vs {D.shape[0]}")
  s = jnp.einsum("bqd,bld->bql", Q, D, precision=precision,
                 preferred_element_type=jnp.float32)
  m = _max_over_doc_tokens(s, D_mask.astype(bool)[:, None], axis=-1)
  return jnp.sum(m, axis=1)
