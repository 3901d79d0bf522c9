"""The PreFLMR training loss: in-batch contrastive cross-entropy over MaxSim scores.

Documents are ordered [pos_0, neg_0_1..neg_0_n, pos_1, ...]; every query is scored against all
B(1+n) documents of the batch (with global, sharded arrays under jit that is the *global* batch: XLA
gathers what each device needs), and the target of query i is document i(1+n). Temperature 1.
`groups` gives the official training's per-device scope instead (config.in_batch_negatives).

With `doc_labels` (one passage id per document), another copy of query i's positive elsewhere in the
batch (another query's positive or negative: common when many queries share a passage, as in OVEN)
is left out of query i's softmax instead of being pushed down as a negative; with
`positive_labels`, so is any other positive of query i (multi-positive tasks such as OKVQA).
Without them (or with no duplicates) the loss is exactly the reference's.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec

from preflmr_jax import late_interaction


def contrastive_loss(q: jax.Array, d: jax.Array, d_mask: jax.Array, num_negatives: int,
                     chunk_size: int = 0, doc_labels: Optional[jax.Array] = None,
                     groups: int = 1, positive_labels: Optional[jax.Array] = None,
                     maxsim: Optional[Callable] = None
                     ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Returns (mean cross-entropy, metrics). `chunk_size` > 0 scores documents chunk by chunk so that
  at most that many documents' token scores are live at once (same numbers). `maxsim` (q, d,
  d_mask) -> [queries, documents] scores replaces `late_interaction`'s (e.g. the fused kernel).
  `doc_labels` int `[documents]`: copies of a query's positive are masked out of its softmax; with
  `positive_labels` int `[queries, P]` (-1 pads), copies of any of its positives.

  `groups` > 1 splits the batch into that many equal consecutive blocks of queries with their
  documents, scores each block only against its own documents and averages the blocks' losses
  and metrics: with one block per device, the official training's per-device in-batch negatives.
  """
  batch, docs = q.shape[0], d.shape[0]
  group = 1 + num_negatives
  if docs != batch * group:
    raise ValueError(f"{docs} documents for {batch} queries; expected batch * (1 + num_negatives) = "
                     f"{batch * group} (config.num_negatives={num_negatives})")
  if batch % groups:
    raise ValueError(f"{batch} queries do not split into {groups} groups of in-batch negatives")
  if maxsim is None:
    maxsim = (functools.partial(late_interaction.maxsim_chunked, chunk_size=chunk_size)
              if chunk_size > 0 else late_interaction.maxsim)
  one = lambda *args: _loss(*args, group=group, maxsim=maxsim)
  if groups == 1:
    return one(q, d, d_mask, doc_labels, positive_labels)
  split = lambda x: None if x is None else x.reshape(groups, x.shape[0] // groups, *x.shape[1:])
  losses, metrics = jax.vmap(one)(split(q), split(d), split(d_mask), split(doc_labels),
                                  split(positive_labels))
  return jnp.mean(losses), jax.tree.map(jnp.mean, metrics)


def contrastive_loss_per_shard(q: jax.Array, d: jax.Array, d_mask: jax.Array, num_negatives: int,
                               batch_axes: tuple[str, ...], doc_labels: Optional[jax.Array] = None,
                               positive_labels: Optional[jax.Array] = None,
                               maxsim: Optional[Callable] = None
                               ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """`contrastive_loss` with one group per shard of the batch over `batch_axes` of the current
  mesh (`jax.set_mesh`), each device scoring its own group (shard_map): the per-device in-batch
  negatives for a `maxsim` that XLA cannot partition, such as a Pallas kernel, which `groups`
  would vmap over the sharded blocks. The same loss and metrics as `groups` = the number of
  shards."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not batch_axes:
    raise ValueError(f"per-shard groups need a mesh and batch axes; got batch_axes={batch_axes} "
                     f"on mesh {dict(mesh.shape) if not mesh.empty else None}")
  shards = math.prod(mesh.shape[a] for a in batch_axes)
  if q.shape[0] % shards:
    raise ValueError(f"{q.shape[0]} queries do not split into {shards} groups of in-batch "
                     f"negatives (the shards of {batch_axes})")
  rows = PartitionSpec(batch_axes)

  def local(q, d, d_mask, doc_labels, positive_labels):
    loss, metrics = contrastive_loss(q, d, d_mask, num_negatives, doc_labels=doc_labels,
                                     positive_labels=positive_labels, maxsim=maxsim)
    return jax.tree.map(lambda x: x[None], (loss, metrics))

  # check_vma=False: a pallas_call's result declares no varying axes. Every input is sharded, so
  # the backward pass needs no reduction across devices.
  losses, metrics = jax.shard_map(local, mesh=mesh, in_specs=rows, out_specs=rows,
                                  check_vma=False)(q, d, d_mask, doc_labels, positive_labels)
  return jnp.mean(losses), jax.tree.map(jnp.mean, metrics)


def _loss(q, d, d_mask, doc_labels, positive_labels, *, group: int, maxsim: Callable):
  batch, docs = q.shape[0], d.shape[0]
  scores = maxsim(q, d, d_mask)
  targets = jnp.arange(batch) * group
  positive = jax.nn.one_hot(targets, docs, dtype=bool)
  if doc_labels is not None:
    own = doc_labels[targets][:, None] if positive_labels is None else positive_labels
    duplicate = jnp.any(doc_labels[None, :, None] == own[:, None, :], axis=-1) & ~positive
    scores = jnp.where(duplicate, -jnp.inf, scores)
    metrics_mask = ~duplicate
  else:
    metrics_mask = jnp.ones_like(positive)
  loss = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(scores, targets))

  negative = metrics_mask & ~positive
  metrics = {
      "loss": loss,
      "accuracy": jnp.mean(jnp.argmax(scores, axis=-1) == targets),
      "positive_score": jnp.sum(jnp.where(positive, scores, 0.0)) / batch,
      "negative_score": (jnp.sum(jnp.where(negative, scores, 0.0))
                         / jnp.maximum(jnp.sum(negative), 1)),
  }
  return loss, metrics


__all__ = ["contrastive_loss", "contrastive_loss_per_shard"]
