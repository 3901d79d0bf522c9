"""The late-interaction token masks (pure jnp, jit-safe, also on numpy input) and the special ids
the model defaults to.

The model applies these masks itself, so they sit with it; `tokenization.py` (host side) imports
the ids from here.
"""

from typing import Optional, Sequence

import jax.numpy as jnp

PAD_ID = 0  # [PAD] in the BERT vocabs (bert-base-uncased and the tiny one)
TINY_VOCAB_SIZE = 768  # the tiny vocab (tokenization.tiny_vocab), a multiple of 128

# `tokenization.mask_token_ids(bert-base-uncased)`: ":" and the single-punctuation token ids, the
# released checkpoints' vocab; checked against the real vocab in the tests.
BERT_UNCASED_COLON_ID = 1024
BERT_UNCASED_PUNCTUATION_IDS = (
    999, 1000, 1001, 1002, 1003, 1004, 1005, 1006, 1007, 1008, 1009, 1010, 1011,
    1012, 1013, 1024, 1025, 1026, 1027, 1028, 1029, 1030, 1031, 1032, 1033, 1034,
    1035, 1036, 1063, 1064, 1065, 1066)


def query_token_mask(input_ids, instruction_token_id: Optional[int]) -> jnp.ndarray:
  """`[B, L]` float32 mask of the query text tokens that enter MaxSim.

  Keeps position i when id != 0 and (i < 2 or i > first ":" position): [CLS], [Q], the
  question and the [MASK] padding stay; the instruction up to and including its ":" goes.
  A row without ":" keeps everything (as the official model: its argmax is 0, clamped to 1).
  `instruction_token_id=None` disables instruction masking.
  """
  ids = jnp.asarray(input_ids)
  keep = ids != PAD_ID
  if instruction_token_id is None:
    return keep.astype(jnp.float32)
  end = jnp.maximum(jnp.argmax(ids == instruction_token_id, axis=1), 1)
  pos = jnp.arange(ids.shape[1])[None, :]
  keep &= (pos < 2) | (pos > end[:, None])
  return keep.astype(jnp.float32)


def document_token_mask(input_ids, skip_token_ids: Sequence[int]) -> jnp.ndarray:
  """`[B, L]` float32 mask: 0 on [PAD] and on single-punctuation tokens, else 1."""
  ids = jnp.asarray(input_ids)
  keep = ids != PAD_ID
  skip = tuple(int(t) for t in skip_token_ids)
  if skip:
    keep &= ~jnp.isin(ids, jnp.asarray(skip, dtype=ids.dtype))
  return keep.astype(jnp.float32)
