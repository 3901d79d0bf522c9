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

from preflmr_jax.user_errors import require, require_int

BATCH_KEYS = ("query_input_ids", "query_attention_mask", "pixel_values", "doc_input_ids",
              "doc_attention_mask", "doc_labels", "positive_labels")


def local_batch_size(config, process_count: int) -> int:
  """`config.batch_size` (global queries per step) split over `process_count` hosts."""
  b = require_int("batch_size", config.batch_size, 1)
  require(b % process_count == 0, "batch_size", b,
          f"must be divisible by the {process_count} processes")
  return b // process_count


def num_negatives(config) -> int:
  return require_int("num_negatives", config.num_negatives, 0)


def max_positives(config) -> int:
  """`config.data.max_positives`: how many of a query's positives its batch row lists."""
  return require_int("data.max_positives", config.data.max_positives, 1)


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
