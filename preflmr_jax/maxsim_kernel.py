"""MaxSim as one fused Pallas kernel: the token scores never leave the chip.

`late_interaction.maxsim` writes every [Lq, Ld] token-score tile to memory (HBM on an accelerator)
and reads it back for the max and the sum. Here each program of the kernel's grid takes `bq`
queries and `bn` documents, computes their token scores on chip (bf16 or f32 in, f32
accumulation), masks the padding tokens, takes the max over document tokens and the sum over
query tokens, and writes only the [bq, bn] scores.

The gradient (`jax.custom_vjp`) is the XLA path's (`late_interaction.maxsim_chunked`,
rematerialised chunk by chunk), so that training with the kernel has the reference's gradients
exactly, ties included. On CPU the kernel runs in Pallas' interpret mode: slow, for tests, so that
every config runs everywhere.

Layout: the [bn * Ld, Lq] score tile has the document tokens down the sublanes and the query
tokens across the lanes, so that the mask is a column and the max over a document's tokens
reduces sublanes. Every block's last two dimensions span the whole array dimension or are
multiples of the (8, 128) tiling (the queries [B, Lq, dim] blocked on B, the documents
[N, Ld, dim] on N, the mask a [N * Ld, 1] column, the scores [B-blocks, N-blocks, bn, bq]),
which Mosaic (TPU) accepts for any block size.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.sharding import PartitionSpec

from preflmr_jax import late_interaction

__all__ = ["maxsim_pallas", "maxsim_sharded"]

# Documents per program: bounded by the on-chip memory its [bn * Ld, Lq] float32 scores and its
# documents take (v5e: 16 MiB of scoped VMEM, blocks double-buffered); queries per program.
_TILE_BYTES = 2 << 20
_QUERY_BLOCK = 8
_LENGTH_MULTIPLE = 16  # document lengths padded (masked) to whole bf16 sublane tiles


def _blocks(b: int, lq: int, ld: int, dim: int, itemsize: int) -> tuple[int, int]:
  per_doc = ld * (4 * lq + 2 * dim * itemsize)
  return min(b, _QUERY_BLOCK), max(1, min(512, _TILE_BYTES // per_doc))


def _kernel(q_ref, d_ref, m_ref, o_ref):
  bq, lq, dim = q_ref.shape
  bn, ld, _ = d_ref.shape
  docs = d_ref[...].reshape(bn * ld, dim)
  valid = m_ref[...] > 0  # [bn * Ld, 1]: document tokens down the sublanes
  for i in range(bq):  # static: one [bn * Ld, Lq] tile at a time
    s = lax.dot_general(docs, q_ref[i], (((1,), (1,)), ((), ())),
                        preferred_element_type=jnp.float32)
    best = jnp.max(jnp.where(valid, s, -jnp.inf).reshape(bn, ld, lq), axis=1)  # [bn, Lq]
    best = jnp.where(best == -jnp.inf, 0.0, best)  # an empty document scores 0
    o_ref[:, i:i + 1] = jnp.sum(best, axis=1, keepdims=True)


def _pad(x, axis, multiple):
  pad = -x.shape[axis] % multiple
  if not pad:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, pad)
  return jnp.pad(x, widths)


def _forward(Q, D, D_mask, interpret):
  (b, lq, dim), (n, _, _) = Q.shape, D.shape
  D = _pad(D, 1, _LENGTH_MULTIPLE)
  mask = _pad(D_mask.astype(jnp.float32), 1, _LENGTH_MULTIPLE)
  ld = D.shape[1]
  bq, bn = _blocks(b, lq, ld, dim, jnp.dtype(D.dtype).itemsize)
  Q, D, mask = _pad(Q, 0, bq), _pad(D, 0, bn), _pad(mask, 0, bn)  # padding scores 0, cut below
  nq, nd = Q.shape[0] // bq, D.shape[0] // bn
  scores = pl.pallas_call(
      _kernel,
      grid=(nq, nd),
      in_specs=[pl.BlockSpec((bq, lq, dim), lambda i, j: (i, 0, 0)),
                pl.BlockSpec((bn, ld, dim), lambda i, j: (j, 0, 0)),
                pl.BlockSpec((bn * ld, 1), lambda i, j: (j, 0))],
      out_specs=pl.BlockSpec((None, None, bn, bq), lambda i, j: (i, j, 0, 0)),
      out_shape=jax.ShapeDtypeStruct((nq, nd, bn, bq), jnp.float32),
      interpret=interpret,
  )(Q, D, mask.reshape(-1, 1))
  return scores.transpose(0, 3, 1, 2).reshape(nq * bq, nd * bn)[:b, :n]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _maxsim(Q, D, D_mask, interpret):
  return _forward(Q, D, D_mask, interpret)


def _maxsim_fwd(Q, D, D_mask, interpret):
  return _forward(Q, D, D_mask, interpret), (Q, D, D_mask)


def _maxsim_bwd(interpret, residuals, g):
  del interpret
  Q, D, D_mask = residuals
  _, vjp = jax.vjp(lambda q, d: late_interaction.maxsim_chunked(q, d, D_mask), Q, D)
  return (*vjp(g), None)


_maxsim.defvjp(_maxsim_fwd, _maxsim_bwd)


@functools.partial(jax.jit, static_argnames=("interpret",))
def maxsim_pallas(Q, D, D_mask, interpret: bool | None = None):
  """`late_interaction.maxsim`'s [B, N] float32 scores from the fused kernel (same arguments;
  differentiable in Q and D). `interpret=None`: Pallas' interpret mode on CPU only."""
  late_interaction.check_shapes(Q, D, D_mask)
  if interpret is None:
    interpret = jax.default_backend() == "cpu"
  if 0 in Q.shape[:2] or 0 in D.shape[:2]:  # nothing to launch: no pairs, or no tokens
    return jnp.zeros((Q.shape[0], D.shape[0]), jnp.float32)
  return _maxsim(Q, D, D_mask, interpret)


def maxsim_sharded(Q, D, D_mask, batch_axes: tuple[str, ...] = ()):
  """`maxsim_pallas` inside a jit on the current mesh (`jax.set_mesh`): each device runs the
  kernel on its own queries (Q sharded over `batch_axes`) against every document (D gathered),
  as XLA partitions `late_interaction.maxsim`. A kernel has no partitioning rule of its own: left
  to XLA it would score the whole batch on every device. No mesh or no `batch_axes`: the plain
  call."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not batch_axes:
    return maxsim_pallas(Q, D, D_mask)
  rows = PartitionSpec(batch_axes)
  # check_vma=False: a pallas_call's result declares no varying axes.
  return jax.shard_map(maxsim_pallas, mesh=mesh, in_specs=(rows, PartitionSpec(), PartitionSpec()),
                       out_specs=rows, check_vma=False)(Q, D, D_mask)
