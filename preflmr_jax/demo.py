r"""Rank a few sample passages for a few image+question queries by MaxSim: run it after training.

  python -m preflmr_jax.demo --config configs/tiny.py --checkpoint /tmp/preflmr_tiny \
      [--step N] [--workdir DIR]

`--checkpoint` is what the eval binary takes, loaded by its loader (`evaluate.restore`): a run's
workdir (its latest complete step; `--step N` for another), one step's folder, or a published
PreFLMR folder (its own model config and tokenizers). Without it the model is the config's,
randomly initialised, or the published weights of `--config.init_from=FOLDER`, and the output says
so: the whole forward path (tokenizers, image preprocessing, sharded parameter init on the config's
mesh, both encoders, MaxSim) without a trained run.

The samples suit the vocabulary. With the built-in tiny vocab (configs/tiny.py, trained on the
SAMPLE task), the queries are SAMPLE queries, a coloured shape drawn and a question and instruction
worded by `data/synthetic.py` as the task's own, and the passages are SAMPLE passages: each query's
true one and some sharing its colour or shape. With a real vocabulary they are natural-language
questions about colour-field images and four encyclopedic passages.

For each query it prints the question, the instruction, what the image shows and its true passage,
then the passages best first: rank, score, passage id and the text cut to one line. `--workdir DIR`
also writes DIR/scores.json: the queries, the passages, the [queries, passages] scores and each
query's ranking (passage indices, best first).
"""

from __future__ import annotations

import functools
import json
import textwrap
from typing import NamedTuple, Optional

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from absl import flags, logging
from PIL import Image

from preflmr_jax import (cli, evaluate, image_processing, late_interaction, pretrained, sharding,
                         storage, tokenization)
from preflmr_jax.data import sample, synthetic
from preflmr_jax.models import model_config as mc
from preflmr_jax.models import preflmr
from preflmr_jax.user_errors import ConfigError


class Query(NamedTuple):
  instruction: str
  question: str
  image: Image.Image
  shows: str  # what the image shows, for the printout
  positive: str  # the id of its true passage


# Real vocabularies: (instruction, question, RGB of a colour-field image, true passage id).
NATURAL_QUERIES = (
    ("Using the image, answer the question:", "what colour is the sky in this picture?",
     (70, 130, 220), "sky"),
    ("Retrieve a passage that answers:", "which fruit is shown here?", (230, 40, 30), "apple"),
    ("Identify the document connected to this image", "", (30, 160, 60), "grass"),
)
NATURAL_PASSAGES = (  # (id, text)
    ("sky", "The sky appears blue because air scatters short wavelengths of sunlight more than "
     "long ones."),
    ("apple", "Apples are red or green fruits that grow on trees; the apple is one of the most "
     "cultivated fruits."),
    ("grass", "Grass is green because its cells contain chlorophyll, which reflects green light."),
    ("eiffel", "The Eiffel Tower, completed in 1889, is a wrought-iron lattice tower in Paris."),
)

# The tiny vocab: SAMPLE classes (synthetic.class_name) to query, and classes whose passages join
# theirs, each sharing a colour or a shape with a query: the colour is only in the image.
SHAPE_QUERIES = ("red star", "green moon", "dark blue wheel", "gold house")
SHAPE_DISTRACTORS = ("red box", "dark green moon", "blue wheel", "gold tree")
_SHAPE_SEED = 0  # of the queries' drawings and wordings

_LINE = 100  # characters of a printed ranking line


def _class_id(name: str) -> int:
  return [synthetic.class_name(c) for c in range(synthetic.NUM_CLASSES)].index(name)


def shape_items() -> tuple[list[Query], list[tuple[str, str]]]:
  """SAMPLE queries and (passage id, text) pairs, made by the sample task's own functions."""
  queries = []
  for name in SHAPE_QUERIES:
    c = _class_id(name)
    rng = np.random.default_rng([_SHAPE_SEED, c])
    # Drawn at the sample's size and resized by the model's preprocessing, as in training.
    image = synthetic.draw_image(c, rng, sample.DEFAULT_IMAGE_SIZE)
    question, instruction = synthetic.make_question(c, rng)
    queries.append(Query(instruction, question, image, f"a {name}", sample.passage_id(c)))
  classes = sorted(_class_id(name) for name in SHAPE_QUERIES + SHAPE_DISTRACTORS)
  return queries, [(sample.passage_id(c), synthetic.passage(c)) for c in classes]


def natural_items() -> tuple[list[Query], list[tuple[str, str]]]:
  """Natural-language queries on colour fields (a diagonal gradient, so that patches differ)."""
  ramp = np.linspace(0.6, 1.0, 64)[:, None] * np.linspace(0.6, 1.0, 64)[None, :]
  queries = [Query(instruction, question,
                   Image.fromarray((ramp[..., None] * np.array(rgb)).astype(np.uint8)),
                   f"a colour field, RGB {rgb}", positive)
             for instruction, question, rgb, positive in NATURAL_QUERIES]
  return queries, list(NATURAL_PASSAGES)


def is_tiny_vocab(tokenizer) -> bool:
  """Whether `tokenizer` has the built-in tiny vocab (config.tokenizer="tiny", or a published
  folder saved from such a model), whose models know only the SAMPLE task."""
  return tokenizer.get_vocab() == {t: i for i, t in enumerate(tokenization.tiny_vocab())}


def sample_items(query_tokenizer) -> tuple[list[Query], list[tuple[str, str]]]:
  return shape_items() if is_tiny_vocab(query_tokenizer) else natural_items()


def _load(config, checkpoint: Optional[str], step: Optional[int], mesh, rules):
  """(model config, params on `mesh`, query tokenizer, document tokenizer, what the weights are)."""
  if checkpoint:
    r = evaluate.restore(config, checkpoint, step, mesh)
    weights = f"checkpoint {r.checkpoint}" + (f", step {r.step}" if r.step is not None else "")
    return r.model_config, r.params, r.query_tokenizer, r.document_tokenizer, weights
  init_from = config.get("init_from")
  if init_from:
    loaded = pretrained.load_pretrained(init_from)
    return (loaded.config, loaded.params,
            *loaded.tokenizers(lambda: tokenization.tokenizer_from_config(config.tokenizer)),
            f"weights from config.init_from={init_from}, no --checkpoint")
  model_config = mc.PreFLMRConfig.from_dict(config.model)
  tokenizer = tokenization.tokenizer_from_config(config.tokenizer)
  tokenization.check_tokenizer(tokenizer, model_config)
  model_config.check_devices(mesh.devices.flat)
  params, _ = sharding.init_sharded(functools.partial(preflmr.random_params, model_config), mesh,
                                    rules, jax.random.key(config.seed),
                                    logical=preflmr.logical_params(model_config))
  return model_config, params, tokenizer, tokenizer, "random weights, no --checkpoint"


def _pad_rows(x: np.ndarray, multiple: int) -> np.ndarray:
  """Pads the batch axis to a multiple of the mesh's batch shards (repeating the last row)."""
  extra = -len(x) % multiple
  return np.concatenate([x, np.repeat(x[-1:], extra, axis=0)]) if extra else x


def _scores(model_config, params, query_tokenizer, doc_tokenizer, queries, passages, mesh,
            rules) -> np.ndarray:
  """The [queries, passages] MaxSim scores, encoded and scored on `mesh` in one jitted call."""
  q_tokens = tokenization.QueryTokenizer(query_tokenizer, model_config.query_maxlen)(
      [q.question for q in queries], [q.instruction for q in queries])
  pixels = image_processing.preprocess_images([q.image for q in queries],
                                              model_config.vision.image_size)
  d_tokens = tokenization.DocumentTokenizer(doc_tokenizer, model_config.doc_maxlen)(
      [text for _, text in passages], padding="longest")
  shards = sharding.num_batch_shards(mesh, rules)
  model = preflmr.PreFLMR(model_config)

  @jax.jit
  def encode_and_score(params, q_ids, q_mask, pixels, d_ids, d_mask):
    q, _ = model.apply({"params": params}, q_ids, q_mask, pixels, method=model.encode_queries)
    d, d_token_mask = model.apply({"params": params}, d_ids, d_mask, method=model.encode_documents)
    return late_interaction.maxsim(q, d, d_token_mask)

  def put(x):
    x = _pad_rows(np.asarray(x), shards)
    return jax.device_put(x, sharding.batch_sharding(mesh, x.ndim, rules))

  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    scores = encode_and_score(params, put(q_tokens["input_ids"]), put(q_tokens["attention_mask"]),
                              put(pixels), put(d_tokens["input_ids"]),
                              put(d_tokens["attention_mask"]))
  scores = np.asarray(scores)[:len(queries), :len(passages)]
  if not np.isfinite(scores).all():
    raise FloatingPointError(f"non-finite MaxSim scores: {scores}")
  return scores


def rankings(scores: np.ndarray) -> np.ndarray:
  """Each query's passage indices, best first (ties in passage order)."""
  return np.argsort(-scores, axis=1, kind="stable")


def report(queries, passages, scores: np.ndarray) -> str:
  """Each query, then its passages ranked: rank, score, id, the text on one line."""
  id_width = max(len("passage"), *(len(pid) for pid, _ in passages))
  lines = []
  for i, (query, order) in enumerate(zip(queries, rankings(scores))):
    lines += [f"query {i}: {query.question or '(no question)'}",
              f"  instruction: {query.instruction}",
              f"  image: {query.shows}; true passage: {query.positive}",
              f"  {'rank':>4s}  {'score':>8s}  {'passage':<{id_width}s}  text"]
    for rank, j in enumerate(order, 1):
      pid, text = passages[j]
      row = f"  {rank:>4d}  {scores[i, j]:8.3f}  {pid:<{id_width}s}  "
      lines.append(row + textwrap.shorten(text, max(_LINE - len(row), 20), placeholder=" ..."))
  return "\n".join(lines)


def run(config: ml_collections.ConfigDict, workdir: Optional[str] = None,
        checkpoint: Optional[str] = None, step: Optional[int] = None) -> np.ndarray:
  """Returns the [queries, passages] score matrix (also printed as rankings, and written to
  workdir/scores.json)."""
  folder = storage.path(workdir, "--workdir") if workdir else None
  if folder:  # before the work
    storage.check_writable(folder, "--workdir")
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.axis_rules(config.logical_axis_rules)
  model_config, params, query_tokenizer, doc_tokenizer, weights = _load(
      config, checkpoint, step, mesh, rules)
  logging.info("mesh %s, model %s", dict(mesh.shape), model_config, extra=cli.FILE_ONLY)
  queries, passages = sample_items(query_tokenizer)
  scores = _scores(model_config, params, query_tokenizer, doc_tokenizer, queries, passages, mesh,
                   rules)
  print(f"MaxSim scores of {len(queries)} queries x {len(passages)} passages ({weights}; "
        f"{jax.device_count()} device(s), mesh {dict(mesh.shape)})")
  print(report(queries, passages, scores))
  if folder:
    storage.write_text(folder / "scores.json", json.dumps({
        "weights": weights,
        "queries": [{"question": q.question, "instruction": q.instruction, "image": q.shows,
                     "positive": q.positive} for q in queries],
        "passages": [{"id": pid, "text": text} for pid, text in passages],
        "scores": scores.tolist(),
        "ranking": rankings(scores).tolist()}, indent=2) + "\n")
    logging.info("scores and rankings in %s", folder / "scores.json")
  return scores


def _main(argv):
  del argv  # cli.run refuses extra arguments
  f = flags.FLAGS
  if f.step is not None and not f.checkpoint:
    raise ConfigError("--step needs --checkpoint")
  run(f.config, f.workdir, f.checkpoint, f.step)


__all__ = ["NATURAL_PASSAGES", "NATURAL_QUERIES", "Query", "SHAPE_DISTRACTORS", "SHAPE_QUERIES",
           "is_tiny_vocab", "natural_items", "rankings", "report", "run", "sample_items",
           "shape_items"]

if __name__ == "__main__":
  for holder in evaluate.define_weights_flags("A run's workdir, one step's folder or a published "
                                              "PreFLMR folder (default: random weights, or "
                                              "config.init_from)."):
    flags.declare_key_flag(holder)
  flags.DEFINE_string("workdir", None, "Where to write scores.json (optional).")
  flags.mark_flag_as_required("config")
  cli.run(_main, outputs=["workdir"])
