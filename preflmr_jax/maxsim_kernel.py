"""MaxSim as one fused Pallas kernel: the token scores never leave the chip.

`late_interaction.maxsim` writes every [Lq, Ld] token-score tile to memory (HBM on an accelerator)
and reads it back for the max and the sum. Here each program of the kernel's grid takes `bq`
queries and `bn` documents, computes their token scores on chip (bf16 or f32 in, f32
accumulation), masks the padding tokens, takes the max over document tokens and the sum over
query tokens, and writes only the [bq, bn] scores.

There are two kernels, and the platform the computation is compiled for picks one
(`lax.platform_dependent`, so a compile-only lowering for a TPU topology on a CPU host gets the
TPU kernel): Mosaic on TPU, Triton on GPUs (CUDA; ROCm too, where it lowers but has never run,
since interpreting the kernel there would be far slower than the einsum). Elsewhere (CPU) the TPU
kernel runs in interpret mode.

The gradient (`jax.custom_vjp`) is the XLA path's (`late_interaction.maxsim_chunked`,
rematerialised chunk by chunk), so that training with the kernel has the reference's gradients
exactly, ties included. Interpret mode is slow: it is there for tests, and so that every config
runs everywhere.

TPU layout: the [bn * Ld, Lq] score tile has the document tokens down the sublanes and the query
tokens across the lanes, so that the mask is a column and the max over a document's tokens
reduces sublanes. Every block's last two dimensions span the whole array dimension or are
multiples of the (8, 128) tiling (the queries [B, Lq, dim] blocked on B, the documents
[N, Ld, dim] on N, the mask a [N * Ld, 1] column, the scores [B-blocks, N-blocks, bn, bq]),
which Mosaic (TPU) accepts for any block size.

GPU (Triton): every array a program holds must have power-of-two dimensions, so the query and
document tokens are taken `tq` and `td` at a time (`[tq, td]` score tiles on the tensor cores),
with lengths padded (masked) to whole tiles and the embedding padded with zeros (which changes no
dot product); each program loops over its queries, their token tiles, its documents and their
token tiles, keeping a running max per query token.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton
from jax.sharding import PartitionSpec

from preflmr_jax import late_interaction

__all__ = ["GPU_BLOCKS", "KERNELS", "check_gpu_blocks", "maxsim_pallas", "maxsim_sharded"]

# Documents per program: bounded by the on-chip memory its [bn * Ld, Lq] float32 scores and its
# documents take (v5e: 16 MiB of scoped VMEM, blocks double-buffered); queries per program.
_TILE_BYTES = 2 << 20
_QUERY_BLOCK = 8
_LENGTH_MULTIPLE = 16  # document lengths padded (masked) to whole bf16 sublane tiles
KERNELS = ("tpu", "gpu")
# GPU programs: (queries, documents, query tokens, document tokens) per program / score tile;
# token tiles are capped by the padded lengths, and Triton's dots need every side >= 16.
GPU_BLOCKS = (8, 8, 64, 64)
_GPU_MIN_TILE = 16


def _blocks(b: int, lq: int, ld: int, dim: int, itemsize: int) -> tuple[int, int]:
  per_doc = ld * (4 * lq + 2 * dim * itemsize)
  return min(b, _QUERY_BLOCK), max(1, min(512, _TILE_BYTES // per_doc))


def _tpu_kernel(q_ref, d_ref, m_ref, o_ref):
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


_pad = late_interaction.pad_to_multiple


def _tpu_forward(Q, D, D_mask, interpret):
  (b, lq, dim), (n, _, _) = Q.shape, D.shape
  D = _pad(D, 1, _LENGTH_MULTIPLE)
  mask = _pad(D_mask.astype(jnp.float32), 1, _LENGTH_MULTIPLE)
  ld = D.shape[1]
  bq, bn = _blocks(b, lq, ld, dim, jnp.dtype(D.dtype).itemsize)
  Q, D, mask = _pad(Q, 0, bq), _pad(D, 0, bn), _pad(mask, 0, bn)  # padding scores 0, cut below
  nq, nd = Q.shape[0] // bq, D.shape[0] // bn
  scores = pl.pallas_call(
      _tpu_kernel,
      grid=(nq, nd),
      in_specs=[pl.BlockSpec((bq, lq, dim), lambda i, j: (i, 0, 0)),
                pl.BlockSpec((bn, ld, dim), lambda i, j: (j, 0, 0)),
                pl.BlockSpec((bn * ld, 1), lambda i, j: (j, 0))],
      out_specs=pl.BlockSpec((None, None, bn, bq), lambda i, j: (i, j, 0, 0)),
      out_shape=jax.ShapeDtypeStruct((nq, nd, bn, bq), jnp.float32),
      interpret=interpret,
  )(Q, D, mask.reshape(-1, 1))
  return scores.transpose(0, 3, 1, 2).reshape(nq * bq, nd * bn)[:b, :n]


def check_gpu_blocks(blocks) -> tuple[int, int, int, int]:
  """`blocks` as the GPU kernel takes them, or ValueError naming them."""
  blocks = tuple(blocks)
  if not (len(blocks) == 4 and all(isinstance(x, int) and x > 0 and x & (x - 1) == 0
                                   for x in blocks) and min(blocks[2:]) >= _GPU_MIN_TILE):
    raise ValueError(f"gpu_blocks={blocks}: four powers of two (queries, documents per program; "
                     f"query, document tokens per tile, each >= {_GPU_MIN_TILE})")
  return blocks


def _gpu_kernel(q_ref, d_ref, m_ref, o_ref, *, tq, td):
  bq, lq, _ = q_ref.shape
  bn, ld, _ = d_ref.shape
  docs = jnp.arange(bn)

  def per_query(i, out):  # out: [bq, bn]
    def per_query_tile(c, row):  # row: [bn], query i against the program's documents
      q = q_ref[i, pl.ds(c * tq, tq), :]  # [tq, dim], held across the documents

      def per_doc(t, row):
        def per_doc_tile(k, best):  # best: [tq], running max over document t's tokens
          d = d_ref[t, pl.ds(k * td, td), :]
          valid = m_ref[t, pl.ds(k * td, td)] > 0
          s = lax.dot_general(q, d, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
          return jnp.maximum(best, jnp.max(jnp.where(valid[None, :], s, -jnp.inf), axis=1))

        best = lax.fori_loop(0, ld // td, per_doc_tile, jnp.full((tq,), -jnp.inf, jnp.float32))
        best = jnp.where(best == -jnp.inf, 0.0, best)  # an empty document scores 0
        return row + jnp.where(docs == t, jnp.sum(best), 0.0)

      return lax.fori_loop(0, bn, per_doc, row)

    row = lax.fori_loop(0, lq // tq, per_query_tile, jnp.zeros((bn,), jnp.float32))
    return out + jnp.where(jnp.arange(bq)[:, None] == i, row[None, :], 0.0)

  o_ref[...] = lax.fori_loop(0, bq, per_query, jnp.zeros((bq, bn), jnp.float32))


def _gpu_forward(Q, D, D_mask, interpret, blocks=None):
  (b, lq, dim), (n, ld, _) = Q.shape, D.shape
  bq, bn, tq, td = blocks or GPU_BLOCKS
  # No larger than the padded inputs:
  bq, bn = min(bq, pl.next_power_of_2(b)), min(bn, pl.next_power_of_2(n))
  tq = max(_GPU_MIN_TILE, min(tq, pl.next_power_of_2(lq)))
  td = max(_GPU_MIN_TILE, min(td, pl.next_power_of_2(ld)))
  width = max(_GPU_MIN_TILE, pl.next_power_of_2(dim))
  Q = _pad(_pad(_pad(Q, 2, width), 1, tq), 0, bq)  # zero query tokens add 0 to every score
  D = _pad(_pad(_pad(D, 2, width), 1, td), 0, bn)
  mask = _pad(_pad(D_mask.astype(jnp.float32), 1, td), 0, bn)
  scores = pl.pallas_call(
      functools.partial(_gpu_kernel, tq=tq, td=td),
      grid=(Q.shape[0] // bq, D.shape[0] // bn),
      in_specs=[pl.BlockSpec((bq, Q.shape[1], width), lambda i, j: (i, 0, 0)),
                pl.BlockSpec((bn, D.shape[1], width), lambda i, j: (j, 0, 0)),
                pl.BlockSpec((bn, mask.shape[1]), lambda i, j: (j, 0))],
      out_specs=pl.BlockSpec((bq, bn), lambda i, j: (i, j)),
      out_shape=jax.ShapeDtypeStruct((Q.shape[0], D.shape[0]), jnp.float32),
      compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=2),
      interpret=interpret,
  )(Q, D, mask)
  return scores[:b, :n]


def _forward(Q, D, D_mask, interpret, kernel, blocks):
  gpu = functools.partial(_gpu_forward, blocks=blocks)
  if kernel is not None:
    return (gpu if kernel == "gpu" else _tpu_forward)(Q, D, D_mask, interpret)
  if interpret:
    return _tpu_forward(Q, D, D_mask, True)
  return lax.platform_dependent(
      Q, D, D_mask, tpu=functools.partial(_tpu_forward, interpret=False),
      cuda=functools.partial(gpu, interpret=False), rocm=functools.partial(gpu, interpret=False),
      default=functools.partial(_tpu_forward, interpret=True))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _maxsim(Q, D, D_mask, interpret, kernel, blocks):
  return _forward(Q, D, D_mask, interpret, kernel, blocks)


def _maxsim_fwd(Q, D, D_mask, interpret, kernel, blocks):
  return _forward(Q, D, D_mask, interpret, kernel, blocks), (Q, D, D_mask)


def _maxsim_bwd(interpret, kernel, blocks, residuals, g):
  del interpret, kernel, blocks
  Q, D, D_mask = residuals
  _, vjp = jax.vjp(lambda q, d: late_interaction.maxsim_chunked(q, d, D_mask), Q, D)
  return (*vjp(g), None)


_maxsim.defvjp(_maxsim_fwd, _maxsim_bwd)


@functools.partial(jax.jit, static_argnames=("interpret", "kernel", "gpu_blocks"))
def maxsim_pallas(Q, D, D_mask, interpret: bool = False, kernel: str | None = None,
                  gpu_blocks: tuple[int, int, int, int] | None = None):
  """`late_interaction.maxsim`'s [B, N] float32 scores from the fused kernel (same arguments;
  differentiable in Q and D).

  `kernel=None`: the kernel of the platform the call is compiled for (TPU: Mosaic; CUDA: Triton;
  elsewhere the TPU kernel in Pallas' interpret mode). `kernel="tpu"` / `"gpu"` lowers that one.
  `interpret=True` runs the kernel (the TPU one unless `kernel="gpu"`) in interpret mode on any
  platform (tests). `gpu_blocks`: the GPU kernel's queries and documents per program and query
  and document tokens per score tile (`check_gpu_blocks`), default `GPU_BLOCKS`.
  """
  late_interaction.check_shapes(Q, D, D_mask)
  if kernel not in (None, *KERNELS):
    raise ValueError(f"kernel={kernel!r}: must be None or one of {KERNELS}")
  if gpu_blocks is not None:
    check_gpu_blocks(gpu_blocks)
    if kernel == "tpu" or (interpret and kernel is None):
      raise ValueError(f"gpu_blocks={gpu_blocks} with kernel={kernel!r}, interpret={interpret}: "
                       "only the GPU kernel has them")
  if 0 in Q.shape[:2] or 0 in D.shape[:2]:  # nothing to launch: no pairs, or no tokens
    return jnp.zeros((Q.shape[0], D.shape[0]), jnp.float32)
  return _maxsim(Q, D, D_mask, interpret, kernel, gpu_blocks)


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
