"""Encode a few sample image+question queries and passages and print their MaxSim scores.

  python -m preflmr_jax.demo --config configs/tiny.py [--workdir DIR] [--config.init_from=FOLDER]

Exercises the whole forward path (tokenizers, image preprocessing, sharded parameter init on the
mesh, both encoders, MaxSim) with the config's model, randomly initialised, or with published weights
via `config.init_from`.
"""

from __future__ import annotations

import json

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags
from PIL import Image

from preflmr_jax import (image_processing, late_interaction, pretrained, sharding, storage,
                         tokenization)
from preflmr_jax.models import model_config as mc
from preflmr_jax.models import preflmr

SAMPLE_QUERIES = (  # (instruction, question, RGB colour of a synthetic image)
    ("Using the image, answer the question:", "what colour is the sky in this picture?",
     (70, 130, 220)),
    ("Retrieve a passage that answers:", "which fruit is shown here?", (230, 40, 30)),
    ("Identify the document connected to this image", "", (30, 160, 60)),
)
SAMPLE_PASSAGES = (
    "The sky appears blue because air scatters short wavelengths of sunlight more than long ones.",
    "Apples are red or green fruits that grow on trees; the apple is one of the most cultivated fruits.",
    "Grass is green because its cells contain chlorophyll, which reflects green light.",
    "The Eiffel Tower, completed in 1889, is a wrought-iron lattice tower in Paris.",
)


def _sample_images() -> list[Image.Image]:
  # A colour field with a diagonal gradient, so that patches differ.
  ramp = np.linspace(0.6, 1.0, 64)[:, None] * np.linspace(0.6, 1.0, 64)[None, :]
  return [Image.fromarray((ramp[..., None] * np.array(rgb)).astype(np.uint8))
          for _, _, rgb in SAMPLE_QUERIES]


def _pad_rows(x: np.ndarray, multiple: int) -> np.ndarray:
  """Pads the batch axis to a multiple of the mesh's batch shards (repeating the last row)."""
  extra = -len(x) % multiple
  return np.concatenate([x, np.repeat(x[-1:], extra, axis=0)]) if extra else x


def run(config: ml_collections.ConfigDict, workdir: str | None = None) -> np.ndarray:
  """Returns the [queries, passages] score matrix (also printed, and written to workdir)."""
  model_config = mc.PreFLMRConfig.from_dict(config.model)
  mesh = sharding.make_mesh(config.mesh)
  rules = tuple(config.logical_axis_rules)
  init_from = config.get("init_from")
  if init_from:
    loaded = pretrained.load_pretrained(init_from)
    model_config, params = loaded.config, loaded.params
    query_tokenizer = loaded.query_tokenizer or tokenization.tokenizer_from_config(config.tokenizer)
    doc_tokenizer = loaded.document_tokenizer or query_tokenizer
  else:
    query_tokenizer = doc_tokenizer = tokenization.tokenizer_from_config(config.tokenizer)
    tokenization.check_mask_ids(query_tokenizer, model_config.instruction_token_id,
                                model_config.skip_token_ids)
    model = preflmr.PreFLMR(model_config)
    init = lambda rng: model.init(rng, **preflmr.dummy_inputs(model_config))["params"]
    params, _ = sharding.init_sharded(init, mesh, rules, jax.random.key(config.seed))
  logging.info("mesh %s, model %s", dict(mesh.shape), model_config)

  queries = tokenization.QueryTokenizer(query_tokenizer, model_config.query_maxlen)(
      [q for _, q, _ in SAMPLE_QUERIES], [i for i, _, _ in SAMPLE_QUERIES])
  pixels = image_processing.preprocess_images(_sample_images(),
                                              model_config.vision.image_size)
  docs = tokenization.DocumentTokenizer(doc_tokenizer, model_config.doc_maxlen)(
      list(SAMPLE_PASSAGES), padding="longest")

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
    scores = encode_and_score(params, put(queries["input_ids"]), put(queries["attention_mask"]),
                              put(pixels), put(docs["input_ids"]), put(docs["attention_mask"]))
  scores = np.asarray(scores)[:len(SAMPLE_QUERIES), :len(SAMPLE_PASSAGES)]
  if not np.isfinite(scores).all():
    raise FloatingPointError(f"non-finite MaxSim scores: {scores}")

  print(f"MaxSim scores ({'weights from ' + init_from if init_from else 'random weights'}; "
        f"{jax.device_count()} device(s), mesh {dict(mesh.shape)})")
  print("query \\ passage " + "".join(f"{j:>9d}" for j in range(len(SAMPLE_PASSAGES))))
  for i, (_, question, _) in enumerate(SAMPLE_QUERIES):
    print(f"{i:>2d} {question[:30]:<30s}" + "".join(f"{s:9.3f}" for s in scores[i]))
  if workdir:
    folder = storage.path(workdir, "--workdir")
    storage.ensure_dir(folder, "--workdir")
    storage.write_text(folder / "scores.json", json.dumps(
        {"queries": [q for _, q, _ in SAMPLE_QUERIES], "passages": list(SAMPLE_PASSAGES),
         "scores": scores.tolist()}, indent=2))
  return scores


def _main(argv):
  del argv
  run(_CONFIG.value, flags.FLAGS.workdir)


__all__ = ["SAMPLE_PASSAGES", "SAMPLE_QUERIES", "run"]

if __name__ == "__main__":
  _CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                            lock_config=True)
  flags.DEFINE_string("workdir", None, "Where to write scores.json (optional).")
  flags.mark_flag_as_required("config")
  app.run(_main)
