"""Query features, one definition for training (`data/pipeline.py`) and evaluation
(`evaluation.py`), so that the two cannot drift apart:

  featurize = QueryFeaturizer(tokenizer, model_config)
  f = featurize(questions, instructions, images)  # images: encoded bytes, b"" for none
  f["query_input_ids"], f["query_attention_mask"]  # int32 [n, query_maxlen]
  f["pixel_values"]                                # float32 [n, image_size, image_size, 3]

Text goes through `tokenization.QueryTokenizer`; images through
`image_processing.preprocess_images`, and a text-only query gets the black image.
"""

import io
from typing import Optional, Sequence

import numpy as np
from PIL import Image

from preflmr_jax import image_processing, tokenization

# What PIL and image_processing raise for bytes that are no decodable image (as the builder's
# `m2kr_build.load_image` catches).
IMAGE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, IndexError, TypeError,
                Image.DecompressionBombError)


class UndecodableImageError(ValueError):
  """Image bytes that do not decode; the message says why."""


class QueryFeaturizer:
  """Questions, instructions and encoded images -> the query part of a batch (`data/batch.py`).

  Holds a tokenizer, whose padding settings are per object: give each thread its own.
  """

  def __init__(self, tokenizer, model_config):
    self.tokenizer = tokenization.QueryTokenizer(tokenizer, model_config.query_maxlen)
    self.image_size = model_config.vision.image_size

  def pixels(self, image: bytes) -> np.ndarray:
    """`[image_size, image_size, 3]` of encoded image bytes; b"" (a text-only query): black."""
    if not image:
      return image_processing.black_image(self.image_size)
    try:  # PIL decodes lazily: in preprocess_images
      return image_processing.preprocess_images([Image.open(io.BytesIO(image))],
                                                self.image_size)[0]
    except IMAGE_ERRORS as e:
      raise UndecodableImageError(f"undecodable image ({type(e).__name__}: {e})") from None

  def __call__(self, questions: Sequence[str], instructions: Sequence[Optional[str]],
               images: Sequence[bytes]) -> dict[str, np.ndarray]:
    if len(images) != len(questions):
      raise ValueError(f"{len(images)} images for {len(questions)} questions")
    tokens = self.tokenizer(questions, instructions)
    return {"query_input_ids": tokens["input_ids"],
            "query_attention_mask": tokens["attention_mask"],
            "pixel_values": np.stack([self.pixels(image) for image in images])}
