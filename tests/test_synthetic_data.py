"""The synthetic retrieval source and the batch interface of `preflmr_jax.data`."""

import json

import numpy as np
import pytest
from PIL import Image

from preflmr_jax import config_files, data, image_processing, tokenization
from preflmr_jax.data import synthetic
from preflmr_jax.models import model_config as mc



def _tiny_config(**overrides):
  return config_files.load_config("configs/tiny.py", {"data.source": "synthetic", **overrides})


@pytest.fixture(scope="module")
def tok():
  return tokenization.tiny_tokenizer()


@pytest.fixture(scope="module")
def config():
  return _tiny_config()


@pytest.fixture(scope="module")
def model_config(config):
  return mc.PreFLMRConfig.from_dict(config.model)


def _iterator(config, model_config, tok, **kwargs):
  kwargs.setdefault("process_index", 0)
  kwargs.setdefault("process_count", 1)
  return data.make_train_iterator(config, model_config, tok, **kwargs)


def _take(it, k):
  return [next(it) for _ in range(k)]


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def _doc_classes(batch, it):
  """Class of each document row, read back through the tokenised corpus."""
  corpus = it._corpus["input_ids"]
  matches = (batch["doc_input_ids"][:, None, :] == corpus[None]).all(-1)
  assert (matches.sum(1) == 1).all()
  return matches.argmax(1)


def _rgb(pixel_values):
  """CLIP-normalised NHWC back to 0..255 RGB."""
  mean = np.asarray(image_processing.OPENAI_CLIP_MEAN, np.float32)
  std = np.asarray(image_processing.OPENAI_CLIP_STD, np.float32)
  return (pixel_values * std + mean) * 255


def _foreground(rgb):
  """`[B, H, W]` mask of the pixels away from the background (read at a corner)."""
  return np.abs(rgb - rgb[:, :1, :1, :]).sum(-1) > 60


def _colour_feature(pixel_values):
  """Hand-made feature: the mean colour of the drawn shape, `[B, 3]`."""
  rgb = _rgb(pixel_values)
  fg = _foreground(rgb)
  return (rgb * fg[..., None]).sum((1, 2)) / fg.sum((1, 2))[:, None]


def _nearest_colour(features):
  palette = np.asarray([rgb for _, rgb in synthetic.COLOURS], np.float32)
  return np.argmin(((features[:, None] - palette[None]) ** 2).sum(-1), axis=1)


def _shape_feature(pixel_values, size=12):
  """Hand-made feature: the foreground mask cropped to its bounding box, resized to `size`^2."""
  out = []
  for mask in _foreground(_rgb(pixel_values)):
    ys, xs = np.nonzero(mask)
    crop = mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    img = Image.fromarray((crop * 255).astype(np.uint8)).resize((size, size), Image.BILINEAR)
    out.append(np.asarray(img, np.float32).ravel() / 255)
  return np.stack(out)


def _labelled_batches(config, model_config, tok, steps):
  it = _iterator(config, model_config, tok)
  pixels, classes = [], []
  for step in range(steps):
    pixels.append(it.batch_at(step)["pixel_values"])
    classes.append(it.classes_at(step)[:, 0])
  return np.concatenate(pixels), np.concatenate(classes)


# ---------------------------------------------------------------------------
# Vocabulary and text.
# ---------------------------------------------------------------------------


def test_colour_and_shape_words_are_single_tiny_tokens(tok):
  words = {w for name, _ in synthetic.COLOURS for w in name.split()} | set(synthetic.SHAPES)
  for w in words:
    assert len(tok.tokenize(w)) == 1, (w, tok.tokenize(w))


def test_every_query_text_fits_and_keeps_its_instruction_end(tok, model_config):
  qt = tokenization.QueryTokenizer(tok, model_config.query_maxlen)
  questions = [q.format(s=s) for q in synthetic.SHAPE_QUESTIONS for s in synthetic.SHAPES]
  questions += list(synthetic.GENERIC_QUESTIONS)
  for instruction in synthetic.INSTRUCTIONS:
    ids = qt(questions, [instruction] * len(questions))["input_ids"]
    colon = tokenization.first_token_id(tok, ":")
    assert (ids == colon).any(1).all(), instruction
    assert (ids == tokenization.SEP_ID).any(1).all(), instruction  # Nothing truncated.
    assert not (ids == tokenization.UNK_ID).any()


def test_passages_name_their_own_colour_and_shape_only(tok, model_config):
  attribute = {w: tok.convert_tokens_to_ids(w)
               for w in {w for name, _ in synthetic.COLOURS for w in name.split()}
               | set(synthetic.SHAPES)}
  corpus = tokenization.DocumentTokenizer(tok, model_config.doc_maxlen)(synthetic.passages())
  ids = corpus["input_ids"]
  assert len(set(synthetic.passages())) == synthetic.NUM_CLASSES
  assert (ids == tokenization.SEP_ID).any(1).all()  # No passage is truncated at doc_maxlen 64.
  assert not (ids == tokenization.UNK_ID).any()
  for c in range(synthetic.NUM_CLASSES):
    own = set(synthetic.class_name(c).split())
    present = {w for w, i in attribute.items() if i in ids[c]}
    assert present == own, (synthetic.passage(c), present)
  # Several templates, so passages are not one sentence with two words swapped.
  openings = {p.split()[0] for p in synthetic.passages()}
  assert len(openings) >= 3


def test_queries_never_name_the_colour(config, model_config, tok):
  it = _iterator(config, model_config, tok)
  colour_ids = {tok.convert_tokens_to_ids(w) for name, _ in synthetic.COLOURS for w in name.split()}
  shape_ids = [tok.convert_tokens_to_ids(s) for s in synthetic.SHAPES]
  named_shape = 0
  for step in range(20):
    batch, classes = it.batch_at(step), it.classes_at(step)[:, 0]
    ids = batch["query_input_ids"]
    assert not np.isin(ids, list(colour_ids)).any()
    for row, c in zip(ids, classes):
      present = [s for s, i in enumerate(shape_ids) if i in row]
      assert present in ([], [synthetic.class_shape(c)])  # Only its own shape, if any.
      named_shape += bool(present)
  assert 0.8 < named_shape / (20 * config.batch_size) < 0.98  # Default probability 0.9.


# ---------------------------------------------------------------------------
# The batch interface.
# ---------------------------------------------------------------------------


def test_batch_shapes_dtypes_and_document_order(config, model_config, tok):
  it = _iterator(config, model_config, tok)
  batch = next(it)
  spec = data.batch_spec(config, model_config)
  assert set(batch) == set(data.BATCH_KEYS) == set(spec)
  for key, s in spec.items():
    assert batch[key].shape == s.shape and batch[key].dtype == s.dtype, key
  assert batch["query_input_ids"].shape == (8, 32)
  assert batch["pixel_values"].shape == (8, 32, 32, 3)
  assert batch["doc_input_ids"].shape == (16, 64)
  # Tokenizer conventions: [CLS] [Q] ... and [CLS] [D] ..., [MASK]-padded queries, [PAD]-padded docs.
  q, d = batch["query_input_ids"], batch["doc_input_ids"]
  assert (q[:, 0] == tokenization.CLS_ID).all() and (q[:, 1] == tokenization.Q_MARKER_ID).all()
  assert (d[:, 0] == tokenization.CLS_ID).all() and (d[:, 1] == tokenization.D_MARKER_ID).all()
  assert not (q == tokenization.PAD_ID).any()
  np.testing.assert_array_equal(batch["doc_attention_mask"], d != tokenization.PAD_ID)
  # [pos_0, neg_0, pos_1, neg_1, ...]: document i * (1 + n) is query i's positive.
  classes = it.classes_at(0)
  np.testing.assert_array_equal(_doc_classes(batch, it), classes.reshape(-1))
  np.testing.assert_array_equal(_colour_feature(batch["pixel_values"]).shape, (8, 3))
  np.testing.assert_array_equal(_nearest_colour(_colour_feature(batch["pixel_values"])),
                                [synthetic.class_colour(c) for c in classes[:, 0]])


@pytest.mark.parametrize("num_negatives", [0, 3])
def test_other_negative_counts(model_config, tok, num_negatives):
  config = _tiny_config(num_negatives=num_negatives)
  it = _iterator(config, model_config, tok)
  batch = next(it)
  assert batch["doc_input_ids"].shape == (8 * (1 + num_negatives), 64)
  np.testing.assert_array_equal(_doc_classes(batch, it), it.classes_at(0).reshape(-1))


def test_negatives_never_of_the_positive_class_and_positives_distinct(config, model_config, tok):
  it = _iterator(config, model_config, tok)
  for step in range(200):
    classes = it.classes_at(step)
    # Every document of the global batch is a different class: no negative (own or in-batch)
    # ever duplicates a positive.
    assert len(np.unique(classes)) == classes.size
  # The same on real batches, through the documents' tokens.
  for batch in _take(it, 5):
    docs = _doc_classes(batch, it).reshape(8, 2)
    assert (docs[:, 1] != docs[:, 0]).all()
    assert len(set(docs[:, 0])) == 8


def test_deterministic_given_the_seed(config, model_config, tok):
  a = _take(_iterator(config, model_config, tok), 3)
  b = _take(_iterator(config, model_config, tok), 3)
  _assert_batches_equal(a, b)
  c = _take(_iterator(_tiny_config(seed=1), model_config, tok), 3)
  assert not np.array_equal(a[0]["pixel_values"], c[0]["pixel_values"])
  assert not np.array_equal(a[0]["doc_input_ids"], c[0]["doc_input_ids"])
  # Consecutive steps differ.
  assert not np.array_equal(a[0]["doc_input_ids"], a[1]["doc_input_ids"])


def test_state_resumes_exactly(config, model_config, tok):
  it = _iterator(config, model_config, tok)
  _take(it, 3)
  state = it.get_state()
  assert json.loads(json.dumps(state)) == state
  expected = _take(it, 4)
  resumed = _iterator(config, model_config, tok)
  resumed.set_state(json.loads(json.dumps(state)))
  _assert_batches_equal(_take(resumed, 4), expected)
  assert resumed.get_state() == it.get_state()


def test_bad_state_is_rejected(config, model_config, tok):
  it = _iterator(config, model_config, tok)
  for bad in ({"step": 3}, {"source": "m2kr", "step": 3}, {"source": "synthetic", "step": -1}):
    with pytest.raises(ValueError, match="state"):
      it.set_state(bad)


def test_processes_get_disjoint_shares_of_the_global_batch(config, model_config, tok):
  whole = _iterator(config, model_config, tok)
  parts = [_iterator(config, model_config, tok, process_index=p, process_count=2) for p in (0, 1)]
  for step in range(3):
    full = next(whole)
    halves = [next(p) for p in parts]
    assert halves[0]["query_input_ids"].shape == (4, 32)
    assert halves[0]["doc_input_ids"].shape == (8, 64)
    c0, c1 = parts[0].classes_at(step), parts[1].classes_at(step)
    assert not set(c0.ravel()) & set(c1.ravel())
    assert not np.array_equal(halves[0]["pixel_values"], halves[1]["pixel_values"])
    # The global batch does not depend on the number of processes.
    for key in full:
      np.testing.assert_array_equal(np.concatenate([h[key] for h in halves]), full[key], key)


def test_default_process_arguments(config, model_config, tok):
  batch = next(data.make_train_iterator(config, model_config, tok))  # One process here.
  assert batch["query_input_ids"].shape[0] == config.batch_size
  positional = next(data.make_train_iterator(config, model_config, tok, 1, 2))
  assert positional["query_input_ids"].shape[0] == config.batch_size // 2


# ---------------------------------------------------------------------------
# Bad configs.
# ---------------------------------------------------------------------------


def test_unknown_source_names_the_key(model_config, tok):
  config = _tiny_config()
  config.data.source = "nope"
  with pytest.raises(ValueError, match=r"config\.data\.source"):
    _iterator(config, model_config, tok)


def test_too_few_classes_names_the_keys(model_config, tok):
  config = _tiny_config(batch_size=40, num_negatives=1)  # 80 documents > 64 classes.
  with pytest.raises(ValueError, match=r"config\.batch_size=40.*config\.num_negatives=1"):
    _iterator(config, model_config, tok)


def test_batch_not_divisible_by_processes_names_the_key(model_config, tok):
  with pytest.raises(ValueError, match=r"config\.batch_size"):
    _iterator(_tiny_config(batch_size=6), model_config, tok, process_index=0, process_count=4)


def test_truncating_doc_maxlen_names_the_key(config, tok):
  model_config = mc.PreFLMRConfig.from_dict({**config.model.to_dict(), "doc_maxlen": 5})
  with pytest.raises(ValueError, match=r"doc_maxlen"):
    _iterator(config, model_config, tok)


# ---------------------------------------------------------------------------
# Learnability: hand-made features solve the task; text alone does not.
# ---------------------------------------------------------------------------


def test_images_differ_by_colour_class(config, model_config, tok):
  pixels, classes = _labelled_batches(config, model_config, tok, 40)
  colours = np.asarray([synthetic.class_colour(c) for c in classes])
  means = np.stack([pixels[colours == k].mean((0, 1, 2)) for k in range(len(synthetic.COLOURS))])
  gaps = np.abs(means[:, None] - means[None]).max(-1)
  assert gaps[~np.eye(len(means), dtype=bool)].min() > 0.03
  # The colour feature classifies every image's colour.
  assert (_nearest_colour(_colour_feature(pixels)) == colours).mean() == 1.0


def _shape_centroids(pixels, shapes):
  features = _shape_feature(pixels)
  return np.stack([features[shapes == s].mean(0) for s in range(len(synthetic.SHAPES))])


def _nearest_shape(pixel_values, centroids):
  features = _shape_feature(pixel_values)
  return np.argmin(((features[:, None] - centroids[None]) ** 2).sum(-1), axis=1)


def test_shape_is_recoverable_from_the_image(config, model_config, tok):
  pixels, classes = _labelled_batches(config, model_config, tok, 60)
  shapes = np.asarray([synthetic.class_shape(c) for c in classes])
  centroids = _shape_centroids(pixels[:240], shapes[:240])
  accuracy = (_nearest_shape(pixels[240:], centroids) == shapes[240:]).mean()
  assert accuracy > 0.9, accuracy  # Chance is 1/8.


def test_hand_made_retriever_needs_the_image(config, model_config, tok):
  """In-batch recall@1 of oracles on hand-made features: text alone cannot solve the task."""
  pixels, classes = _labelled_batches(config, model_config, tok, 30)
  centroids = _shape_centroids(pixels, np.asarray([synthetic.class_shape(c) for c in classes]))
  colour_ids = [[tok.convert_tokens_to_ids(w) for w in name.split()]
                for name, _ in synthetic.COLOURS]
  shape_ids = np.asarray([tok.convert_tokens_to_ids(s) for s in synthetic.SHAPES])
  rng = np.random.default_rng(0)
  hits = {"text": 0, "image colour + text": 0, "image + text": 0}
  # Held out from the centroids' images: another seed draws other images.
  batches = _take(_iterator(_tiny_config(seed=config.seed + 1), model_config, tok), 30)
  for batch in batches:
    docs = batch["doc_input_ids"]
    # A document's colour: the longest colour name whose tokens it holds ("dark red" over "red").
    doc_colour = np.asarray([max((k for k, ids in enumerate(colour_ids) if set(ids) <= set(row)),
                                 key=lambda k: len(colour_ids[k])) for row in docs])
    doc_shape = np.asarray([np.flatnonzero(np.isin(shape_ids, row))[0] for row in docs])
    image_colour = _nearest_colour(_colour_feature(batch["pixel_values"]))
    image_shape = _nearest_shape(batch["pixel_values"], centroids)
    for i, q in enumerate(batch["query_input_ids"]):
      named = np.flatnonzero(np.isin(shape_ids, q))
      text = (doc_shape == named[0]) if len(named) else np.zeros(len(docs), bool)
      colour = doc_colour == image_colour[i]
      shape = doc_shape == image_shape[i]
      for name, scores in (("text", 1.0 * text), ("image colour + text", 1.0 * text + colour),
                           ("image + text", 1.0 * text + colour + shape)):
        best = np.flatnonzero(scores == scores.max())
        hits[name] += rng.choice(best) == i * (1 + config.num_negatives)  # Random tie-break.
  recall = {k: v / (len(batches) * config.batch_size) for k, v in hits.items()}
  assert recall["text"] < 0.6, recall
  assert recall["image colour + text"] > 0.9, recall
  assert recall["image + text"] > 0.95, recall
