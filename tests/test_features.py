"""One query featurizer: training examples and evaluation see the same ids, mask and pixels."""

import numpy as np
import pytest

from preflmr_jax import evaluation, image_processing, tokenization
from preflmr_jax.data import features, m2kr, pipeline
from preflmr_jax.models import model_config as mc


@pytest.mark.parametrize("with_image", [True, False])
def test_training_and_evaluation_featurise_a_query_alike(sample_data_dir, tiny_config,
                                                         with_image):
  model_config = mc.PreFLMRConfig.from_dict(tiny_config().model)
  tok = tokenization.tiny_tokenizer()
  record = m2kr.load_queries(sample_data_dir, "SAMPLE", "train")[0]
  assert record["image"]
  if not with_image:
    record = {**record, "image": b""}
  corpus = pipeline._Corpus.load(sample_data_dir, "SAMPLE", "train")
  # SAMPLE has no instruction templates: training keeps the record's own, as evaluation does.
  train = pipeline._MakeExample("SAMPLE", corpus, 1, tok, model_config).random_map(
      record, np.random.default_rng(0))
  encoder = evaluation.Encoder(model_config, None, tok, tok, evaluation.eval_mesh(), batch_size=8)
  evaluated = encoder.query_inputs([record["question"]], [record["instruction"]],
                                   [record["image"]])
  for key in ("query_input_ids", "query_attention_mask", "pixel_values"):
    assert evaluated[key].dtype == train[key].dtype, key
    np.testing.assert_array_equal(evaluated[key][0], train[key], key)
  black = image_processing.black_image(model_config.vision.image_size)
  assert np.array_equal(train["pixel_values"], black) != with_image


def test_an_undecodable_image_names_why(tiny_config):
  featurize = features.QueryFeaturizer(tokenization.tiny_tokenizer(),
                                       mc.PreFLMRConfig.from_dict(tiny_config().model))
  with pytest.raises(features.UndecodableImageError, match="undecodable image"):
    featurize(["what?"], ["Own:"], [b"not an image"])
