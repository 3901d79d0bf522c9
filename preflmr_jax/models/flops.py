"""Analytic model FLOPs of PreFLMR: 2 per multiply-accumulate of every matmul, at padded lengths.

Keys are the parameter groups (models/param_groups.py). Attention softmax, norms,
activations and the embedding lookups are not counted; MFU figures divide these by step time.
"""

from __future__ import annotations

import jax

from preflmr_jax.models import param_groups


def _attention(q_len, kv_len, h):
  """MACs of one attention block, one sequence: q/o over q_len, k/v over kv_len, QK^T and AV."""
  return 2 * q_len * h * h + 2 * kv_len * h * h + 2 * q_len * kv_len * h


def forward_macs(mc, queries, docs):
  """Forward matmul MACs per parameter group of `mc` (a PreFLMRConfig) for `queries` queries
  and `docs` documents (padded lengths; the last vision layer is counted whole, as written, though
  only its CLS output is read)."""
  t, v, m, p = mc.text, mc.vision, mc.mapping, mc.vision.num_patches
  bert = lambda n: t.num_layers * (_attention(n, n, t.hidden_size)
                                   + 2 * n * t.hidden_size * t.intermediate_size)
  vision = p * v.patch_size ** 2 * v.num_channels * v.hidden_size + v.num_layers * (
      _attention(p + 1, p + 1, v.hidden_size) + 2 * (p + 1) * v.hidden_size * v.intermediate_size)
  width, cross = mc.dim * mc.mapping_prefix_length, min(mc.mapping_cross_attention_length,
                                                         mc.query_maxlen)
  return {
      "query_text": queries * bert(mc.query_maxlen),
      "query_head": 0 if mc.output == "mapping_only" else
                    queries * mc.query_maxlen * t.hidden_size * mc.dim,
      "vision": queries * vision,
      "vision_projection": queries * (v.hidden_size + width) * width // 2,
      "mapping_input": queries * p * v.hidden_size * m.hidden_size,
      "mapping_layers": queries * m.num_layers * (
          _attention(p, p, m.hidden_size) + _attention(p, cross, m.hidden_size)
          + 2 * p * m.hidden_size * m.intermediate_size),
      "mapping_output": queries * p * m.hidden_size * mc.dim,
      "document_text": docs * bert(mc.doc_maxlen),
      "document_head": docs * mc.doc_maxlen * t.hidden_size * mc.dim,
  }


def trainable_groups(labels) -> set[str]:
  """The parameter groups with any parameter that trains (labels: optimizer.param_labels)."""
  return {param_groups.group_of(k) for k, tree in labels.items()
          if any(label != "frozen" for label in jax.tree.leaves(tree))}


def train_flops(mc, queries, docs, trainable, negative_groups=1):
  """One train step: forward + 2x forward for the `trainable` groups + the loss's MaxSim
  (backward: 1x per side that needs a gradient), each query scored against the documents of its
  share of the batch (`negative_groups` equal shares: config.in_batch_negatives="per_device").

  Unlike XLA's cost analysis, which counts the body of a loop once (with scanned layers, a
  tenth of ViT-B's step), this counts every layer."""
  macs = forward_macs(mc, queries, docs)
  total = sum(n * (3 if key in trainable else 1) for key, n in macs.items())
  document = set(param_groups.members("document"))
  d_grad = bool(document & trainable)
  q_grad = bool(trainable - document)
  score = queries * docs // negative_groups * mc.query_length * mc.doc_maxlen * mc.dim
  return 2 * (total + score * (1 + q_grad + d_grad))


def encode_flops(mc, kind, n):
  """Encoding `n` "documents" or (any other `kind`) queries."""
  macs = forward_macs(mc, n, n)
  docs = sum(macs[g] for g in param_groups.members("document"))
  return 2 * (docs if kind == "documents" else sum(macs.values()) - docs)
