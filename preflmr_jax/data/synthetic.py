"""A synthetic, learnable image + question -> passage retrieval task (`config.data.source="synthetic"`).

Classes are (colour, shape) pairs: 8 colours x 8 shapes = 64. Each class has one passage (the
corpus, fixed and independent of the seed) that names its colour and shape among filler sentences,
in one of several templates. A query is a PIL drawing of the class's shape in its colour (jittered)
on a random light background at a random position and size, plus a question that names the shape
(with probability `SHAPE_QUESTION_PROB`, as in SAMPLE) or nothing at all, after an
M2KR-style instruction ending with ":". The colour is only in the image, so retrieval needs the
vision path; the shape is in the image and usually in the text.

Stream: step t of the global batch takes `batch_size * (1 + n)` distinct classes from a permutation
seeded by (seed, t): row i is query i's positive followed by its n negatives, so no document of the
global batch is another query's positive. Host p takes rows [p*b, (p+1)*b), and example i draws its
image and question from its own RNG seeded by (seed, t, i), so the global batch does not depend on
the number of processes and the iterator state is just the step. With the tiny vocab
(`tokenization.tiny_tokenizer`) no text becomes [UNK] and every colour and shape word is one token.
"""

import numpy as np
from PIL import Image, ImageDraw

from preflmr_jax import image_processing, tokenization
from preflmr_jax.data import batch as batch_lib
from preflmr_jax.user_errors import ConfigError, require_int

SOURCE = "synthetic"

# Far apart in RGB (>= 70 between any two) and dark or saturated enough to stand out on a light
# background; "dark x" keeps every colour word a single tiny-vocab token.
COLOURS = (
    ("red", (210, 30, 30)),
    ("dark red", (110, 10, 10)),
    ("green", (40, 170, 40)),
    ("dark green", (0, 85, 0)),
    ("blue", (40, 80, 230)),
    ("dark blue", (15, 20, 120)),
    ("black", (20, 20, 20)),
    ("gold", (225, 170, 0)),
)
SHAPES = ("sun", "box", "star", "cross", "wheel", "moon", "house", "tree")
NUM_CLASSES = len(COLOURS) * len(SHAPES)

_SHAPE_FACTS = {
    "sun": "it is a full round form",
    "box": "it has four equal sides",
    "star": "it has five points",
    "cross": "two bars meet at its center",
    "wheel": "it is a round ring that is open at the center",
    "moon": "it is a thin curved form like the moon at night",
    "house": "it has a roof on top of a body",
    "tree": "it is a tall point above a short trunk",
}
# Colour and shape come first so that a short doc_maxlen never cuts them.
_PASSAGE_TEMPLATES = (
    "the {c} {s} is a simple shape. {fact}. {filler}",
    "{c} {s}: a {s} with a {c} color. {fact}. {filler}",
    "this passage is about a {s} in {c}. {fact}. {filler}",
    "the color of this {s} is {c}. {fact}. {filler}",
)
# Mention no colour or shape.
_FILLERS = (
    "it is used in many games.",
    "you can find it in an old story book.",
    "children learn its name at school.",
    "many people like it.",
    "the picture was made by hand.",
    "it often appears in music and art.",
    "this kind of shape is common.",
    "people draw it on paper.",
    "it can be seen on a map.",
)
INSTRUCTIONS = (
    "Using the provided image, obtain documents that address the subsequent question:",
    "Using the given image, retrieve documents that answer the following question:",
    "Identify the document that is relevant to the image and the question:",
    "Based on the image, retrieve the passage that answers the question:",
    "Given the picture, find documents with knowledge to answer the question:",
)
SHAPE_QUESTIONS = (
    "what is this {s}?",
    "which {s} is in the picture?",
    "tell me about the {s} in this photo.",
    "what color is the {s}?",
    "can you find a passage about this {s}?",
)
GENERIC_QUESTIONS = (
    "what is shown in the picture?",
    "what is this object?",
    "what do you see in this image?",
    "tell me about this photo.",
    "which shape is this?",
)

_CORPUS_SEED = 20240213  # The corpus is the task, not a sample of it: fixed across seeds.
_STREAM = 0  # in every RNG seed of the stream: another value gives other batches
_MIN_IMAGE_SIZE = 16
_COLOUR_JITTER = 12
# Mostly shape-naming questions: a tiny model with a frozen random vision tower reads colour from
# the image quickly but shape slowly; generic questions keep some shape-from-image signal.
SHAPE_QUESTION_PROB = 0.9


def class_colour(class_id: int) -> int:
  return class_id // len(SHAPES)


def class_shape(class_id: int) -> int:
  return class_id % len(SHAPES)


def class_name(class_id: int) -> str:
  return f"{COLOURS[class_colour(class_id)][0]} {SHAPES[class_shape(class_id)]}"


def passage(class_id: int) -> str:
  """The passage of `class_id`: a template and fillers picked by a fixed per-class RNG."""
  rng = np.random.default_rng([_CORPUS_SEED, class_id])
  colour, shape = COLOURS[class_colour(class_id)][0], SHAPES[class_shape(class_id)]
  template = _PASSAGE_TEMPLATES[rng.integers(len(_PASSAGE_TEMPLATES))]
  fillers = rng.choice(len(_FILLERS), size=2, replace=False)
  filler = " ".join(_FILLERS[i] for i in fillers)
  return template.format(c=colour, s=shape, fact=_SHAPE_FACTS[shape], filler=filler)


def passages() -> list[str]:
  """The corpus: passage i describes class i."""
  return [passage(c) for c in range(NUM_CLASSES)]


# ---------------------------------------------------------------------------
# Queries.
# ---------------------------------------------------------------------------


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box, fill, background):
  x0, y0, s = box
  x1, y1 = x0 + s, y0 + s
  cx, cy = x0 + s / 2, y0 + s / 2
  if shape == "sun":
    draw.ellipse((x0, y0, x1, y1), fill=fill)
  elif shape == "box":
    draw.rectangle((x0, y0, x1, y1), fill=fill)
  elif shape == "star":
    angles = -np.pi / 2 + np.arange(10) * np.pi / 5
    radii = np.where(np.arange(10) % 2 == 0, s / 2, s / 5)
    draw.polygon(list(zip(cx + radii * np.cos(angles), cy + radii * np.sin(angles))), fill=fill)
  elif shape == "cross":
    t = s / 6
    draw.rectangle((x0, cy - t, x1, cy + t), fill=fill)
    draw.rectangle((cx - t, y0, cx + t, y1), fill=fill)
  elif shape == "wheel":
    draw.ellipse((x0, y0, x1, y1), outline=fill, width=max(2, round(s / 5)))
  elif shape == "moon":
    # A disc with an offset disc of background cut out of it.
    draw.ellipse((x0, y0, x1, y1), fill=fill)
    dx, dy = 0.35 * s, -0.1 * s
    draw.ellipse((x0 + dx, y0 + dy, x1 + dx, y1 + dy), fill=background)
  elif shape == "house":
    draw.polygon([(x0, y0 + 0.45 * s), (cx, y0), (x1, y0 + 0.45 * s)], fill=fill)
    draw.rectangle((x0 + 0.12 * s, y0 + 0.45 * s, x1 - 0.12 * s, y1), fill=fill)
  elif shape == "tree":
    draw.polygon([(cx, y0), (x0 + 0.08 * s, y0 + 0.75 * s), (x1 - 0.08 * s, y0 + 0.75 * s)],
                 fill=fill)
    draw.rectangle((cx - 0.1 * s, y0 + 0.75 * s, cx + 0.1 * s, y1), fill=fill)
  else:
    raise ValueError(f"unknown shape {shape!r}")


def draw_image(class_id: int, rng: np.random.Generator, image_size: int) -> Image.Image:
  """The class's shape in its (jittered) colour on a light background, `image_size` square."""
  if image_size < _MIN_IMAGE_SIZE:
    raise ConfigError(f"config.model.vision.image_size={image_size} is too small to draw shapes; "
                      f"the synthetic source needs >= {_MIN_IMAGE_SIZE}")
  background = tuple(int(v) for v in rng.integers(190, 256, size=3))
  base = np.asarray(COLOURS[class_colour(class_id)][1])
  fill = tuple(int(v) for v in np.clip(
      base + rng.integers(-_COLOUR_JITTER, _COLOUR_JITTER + 1, size=3), 0, 255))
  side = rng.uniform(0.45, 0.8) * image_size
  margin = max(1, image_size // 16)  # Keeps the corners background (tests read it there).
  x0, y0 = rng.uniform(margin, image_size - margin - side, size=2)
  image = Image.new("RGB", (image_size, image_size), background)
  _draw_shape(ImageDraw.Draw(image), SHAPES[class_shape(class_id)], (x0, y0, side), fill,
              background)
  return image


def make_question(class_id: int, rng: np.random.Generator) -> tuple[str, str]:
  """(question, instruction); the question names the shape or nothing, never the colour."""
  instruction = INSTRUCTIONS[rng.integers(len(INSTRUCTIONS))]
  if rng.random() < SHAPE_QUESTION_PROB:
    template = SHAPE_QUESTIONS[rng.integers(len(SHAPE_QUESTIONS))]
    return template.format(s=SHAPES[class_shape(class_id)]), instruction
  return GENERIC_QUESTIONS[rng.integers(len(GENERIC_QUESTIONS))], instruction


# ---------------------------------------------------------------------------
# The batch stream.
# ---------------------------------------------------------------------------


def global_classes(seed: int, step: int, batch_size: int, num_negatives: int) -> np.ndarray:
  """`[batch_size, 1 + n]` distinct class ids of a global step: column 0 positives, then negatives."""
  rng = np.random.default_rng([seed, _STREAM, step, 0, 0])
  return rng.permutation(NUM_CLASSES)[:batch_size * (1 + num_negatives)].reshape(
      batch_size, 1 + num_negatives)


class SyntheticIterator:
  """This host's batches of the synthetic task (the `preflmr_jax.data` iterator protocol)."""

  def __init__(self, config, model_config, tokenizer=None, *, process_index: int = 0,
               process_count: int = 1):
    self.batch_size = batch_lib.local_batch_size(config, process_count)
    self.global_batch_size = config.batch_size
    self.num_negatives = batch_lib.num_negatives(config)
    self.max_positives = batch_lib.max_positives(config)  # one per query here
    if config.batch_size * (1 + self.num_negatives) > NUM_CLASSES:
      raise ConfigError(
          f"config.batch_size={config.batch_size} with config.num_negatives={self.num_negatives} "
          f"needs {config.batch_size * (1 + self.num_negatives)} distinct documents per step but "
          f"the synthetic task has {NUM_CLASSES} classes")
    self.seed = require_int("seed", config.seed, 0)
    self.process_index = process_index
    self.image_size = model_config.vision.image_size
    if tokenizer is None:
      tokenizer = tokenization.tokenizer_from_config(config.tokenizer)
    self._query_tokenizer = tokenization.QueryTokenizer(tokenizer, model_config.query_maxlen)
    corpus = tokenization.DocumentTokenizer(tokenizer, model_config.doc_maxlen)(
        passages(), padding="max_length")
    self._check_corpus(tokenizer, corpus["input_ids"], model_config.doc_maxlen)
    self._corpus = corpus
    self._step = 0

  @staticmethod
  def _check_corpus(tokenizer, ids, doc_maxlen):
    # A passage cut before its colour or shape would make the task silently unlearnable.
    for c in range(NUM_CLASSES):
      words = COLOURS[class_colour(c)][0].split() + [SHAPES[class_shape(c)]]
      for w in words:
        wanted = tokenizer.encode(w, add_special_tokens=False)
        if not set(wanted) <= set(ids[c].tolist()):
          raise ConfigError(f"config.model.doc_maxlen={doc_maxlen} truncates the synthetic passage "
                            f"of {class_name(c)!r} before {w!r}")

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = self.batch_at(self._step)
    self._step += 1
    return batch

  def get_state(self) -> dict:
    return {"source": SOURCE, "step": self._step}

  def set_state(self, state: dict) -> None:
    step = state.get("step")
    if state.get("source") != SOURCE or not isinstance(step, (int, np.integer)) or step < 0:
      raise ValueError(f"not a {SOURCE!r} data iterator state: {state!r}")
    self._step = int(step)

  def classes_at(self, step: int) -> np.ndarray:
    """`[b, 1 + n]` class ids of this host's share of `step`: positive, then negatives."""
    rows = global_classes(self.seed, step, self.global_batch_size, self.num_negatives)
    start = self.process_index * self.batch_size
    return rows[start:start + self.batch_size]

  def batch_at(self, step: int) -> dict[str, np.ndarray]:
    classes = self.classes_at(step)
    images, questions, instructions = [], [], []
    for row, class_id in enumerate(classes[:, 0]):
      example = self.process_index * self.batch_size + row  # Index in the global batch.
      rng = np.random.default_rng([self.seed, _STREAM, step, 1, example])
      images.append(draw_image(int(class_id), rng, self.image_size))
      question, instruction = make_question(int(class_id), rng)
      questions.append(question)
      instructions.append(instruction)
    query = self._query_tokenizer(questions, instructions)
    docs = classes.reshape(-1)
    return {
        "query_input_ids": query["input_ids"],
        "query_attention_mask": query["attention_mask"],
        "pixel_values": image_processing.preprocess_images(images, self.image_size),
        "doc_input_ids": self._corpus["input_ids"][docs],
        "doc_attention_mask": self._corpus["attention_mask"][docs],
        "doc_labels": docs.astype(np.int32),
        "positive_labels": np.pad(classes[:, :1].astype(np.int32),
                                  ((0, 0), (0, self.max_positives - 1)), constant_values=-1),
    }

