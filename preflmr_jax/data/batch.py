"""The batch interface every training data source implements.

Batch: a dict of NumPy arrays, this host's share of the global batch
(`b = local_batch_size(config, process_count) = config.batch_size // process_count`,
`n = config.num_negatives`):

  query_input_ids       int32   [b, query_maxlen]          `tokenization.QueryTokenizer`
  query_attention_mask  int32   [b, query_maxlen]
  pixel_values          float32 [b, image_size, image_size, 3]
                                NHWC, CLIP-normalised (`image_processing.preprocess_images`)
  doc_input_ids         int32   [b * (1 + n), doc_maxlen]  `tokenization.DocumentTokenizer`,
                                padding="max_length"
  doc_attention_mask    int32   [b * (1 + n), doc_maxlen]
  doc_labels            int32   [b * (1 + n)]              which passage each document is (equal
                                labels: the same passage)
  positive_labels       int32   [b, config.data.max_positives]  the labels of each query's
                                positives (its first max_positives; -1 pads), so that the loss can
                                leave any of them found elsewhere in the batch out of its negatives

Documents are ordered `[pos_0, neg_0_1 .. neg_0_n, pos_1, neg_1_1 .., ...]`: query i's positive is
document `i * (1 + n)` (`losses.py`). A negative is never of its query's positive
class/passage. Lengths and `image_size` come from the model config (`PreFLMRConfig`).
"""

from typing import Optional

import jax
import numpy as np

BATCH_KEYS = ("query_input_ids", "query_attention_mask", "pixel_values", "doc_input_ids",
              "doc_attention_mask", "doc_labels", "positive_labels")


def local_batch_size(config, process_count: int) -> int:
  """`config.batch_size` (global queries per step) split over `process_count` hosts."""
  if config.batch_size < 1:
    raise ValueError(f"config.batch_size must be positive, got {config.batch_size}")
  if config.batch_size % process_count:
    raise ValueError(f"config.batch_size={config.batch_size} is not divisible by the "
                     f"{process_count} processes")
  return config.batch_size // process_count


def num_negatives(config) -> int:
  n = config.num_negatives
  if not isinstance(n, (int, np.integer)) or n < 0:
    raise ValueError(f"config.num_negatives must be a non-negative int, got {n!r}")
  return int(n)


def max_positives(config) -> int:
  """`config.data.max_positives`: how many of a query's positives its batch row lists."""
  p = config.data.max_positives
  if not isinstance(p, (int, np.integer)) or isinstance(p, bool) or p < 1:
    raise ValueError(f"config.data.max_positives={p!r} must be an integer >= 1")
  return int(p)


def batch_spec(config, model_config, num_queries: Optional[int] = None
               ) -> dict[str, jax.ShapeDtypeStruct]:
  """Shapes and dtypes of a batch of `num_queries` queries (default: the global batch).

  For shape-only lowering (the memory planner) and for checking what a source yields.
  """
  b = config.batch_size if num_queries is None else num_queries
  d = b * (1 + num_negatives(config))
  size = model_config.vision.image_size
  lq, ld = model_config.query_maxlen, model_config.doc_maxlen
  return {
      "query_input_ids": jax.ShapeDtypeStruct((b, lq), np.int32),
      "query_attention_mask": jax.ShapeDtypeStruct((b, lq), np.int32),
      "pixel_values": jax.ShapeDtypeStruct((b, size, size, 3), np.float32),
      "doc_input_ids": jax.ShapeDtypeStruct((d, ld), np.int32),
      "doc_attention_mask": jax.ShapeDtypeStruct((d, ld), np.int32),
      "doc_labels": jax.ShapeDtypeStruct((d,), np.int32),
      "positive_labels": jax.ShapeDtypeStruct((b, max_positives(config)), np.int32),
  }
