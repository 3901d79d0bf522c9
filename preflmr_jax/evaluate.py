"""The eval binary: a checkpoint -> passage corpus encoding -> exact MaxSim search -> M2KR metrics.

  python -m preflmr_jax.evaluate --config configs/tiny.py --checkpoint WORKDIR_OR_STEP_OR_FOLDER \
      --tasks SAMPLE --split test --data_dir DIR --output OUT [--ks 1,5,10] [--batch_size 64]

`--checkpoint` is a run's workdir (its latest complete step; `--step N` for another), one step's
folder, or a published PreFLMR folder (`config.json` + `model.safetensors`: its own config and
tokenizers are used, not `--config`'s model). Only parameters are restored, never the optimiser
state. Per task: the `<split>_passages` corpus is encoded in batches over all devices (the batch
sharded along `data`), queries are encoded with the dataset's own instructions, every query is
scored against the whole corpus with `search.exact_search` (the corpus sharded over the devices),
and Recall@K / PseudoRecall@K (`metrics.py`) are computed. Outputs in OUT: `results.json`
(`{task: {"Recall@5": ..., "PseudoRecall@5": ..., "headline": ..., "num_queries": ...,
"num_passages": ..., "checkpoint": ..., "step": ..., "params": ..., "train_flops": ...}}`;
training compute from the run's `run.json`, null for a published folder), `results.md` (one row
per task, the headline metric in bold) and `<task>_rankings.jsonl` (`{"question_id",
"passage_ids", "scores"}` per query, best first; the trainer can mine hard negatives from it,
`config.data.hard_negatives_dir`). Multi-host, each process evaluates on its own devices and
process 0 writes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import tempfile
import time
from typing import Any, Optional, Sequence

import jax
import numpy as np
from absl import app, flags, logging
from etils import epath
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from PIL import Image

from preflmr_jax import (checkpointing, image_processing, metrics, pretrained, search, sharding,
                         tokenization, train)
from preflmr_jax.data import m2kr, pipeline
from preflmr_jax.models import model_config as mc
from preflmr_jax.models import preflmr


@dataclasses.dataclass
class Restored:
  model_config: mc.PreFLMRConfig
  params: Any
  query_tokenizer: Any
  document_tokenizer: Any
  checkpoint: str
  step: Optional[int]  # None for a published folder


def _is_published(path: str) -> bool:
  return os.path.isfile(os.path.join(path, "config.json")) and any(
      name.startswith("model") and name.endswith((".safetensors", ".safetensors.index.json"))
      for name in os.listdir(path))


def restore(config, checkpoint: str, step: Optional[int] = None) -> Restored:
  """Parameters (only) and tokenizers from a workdir / step folder / published folder."""
  if not os.path.isdir(checkpoint):
    raise FileNotFoundError(f"--checkpoint={checkpoint}: no such folder")
  if _is_published(checkpoint):
    model = pretrained.load_pretrained(checkpoint)
    query_tok, doc_tok = model.query_tokenizer, model.document_tokenizer
    if query_tok is None or doc_tok is None:  # a folder without tokenizers: the config's
      query_tok = doc_tok = tokenization.tokenizer_from_config(config.tokenizer)
    return Restored(model.config, model.params, query_tok, doc_tok, checkpoint, None)
  model_config = mc.PreFLMRConfig.from_dict(config.model)
  step_dir = checkpointing.find_step_dir(epath.Path(checkpoint), step)
  # Replicated on this process's devices, whatever mesh the checkpoint was saved from.
  replicated = NamedSharding(encoder_mesh(), P())  # as the Encoder holds them: no second copy
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                          preflmr.abstract_params(model_config))
  params = checkpointing.restore_params(os.fspath(step_dir), abstract)
  tok = tokenization.tokenizer_from_config(config.tokenizer)
  return Restored(model_config, params, tok, tok, checkpoint, int(step_dir.name))


def encoder_mesh(devices: Optional[Sequence] = None) -> Mesh:
  """This process's devices along `data`, with the trainer's axis names so that its logical rules
  apply. Multi-host, every process evaluates everything on its own devices (no collectives across
  hosts; process 0 writes the outputs): simple, and exact search needs the whole corpus anyway."""
  devices = list(jax.local_devices() if devices is None else devices)
  return Mesh(np.asarray(devices).reshape(-1, 1, 1), sharding.MESH_AXES)


# Document batches are padded to a multiple of this: at most doc_maxlen / 64 compiled shapes.
DOC_LENGTH_MULTIPLE = 64


class Encoder:
  """Jitted query / document encoders, batches split over all devices (`data`)."""

  def __init__(self, restored: Restored, batch_size: int, devices: Optional[Sequence] = None):
    self.mesh = encoder_mesh(devices)
    n = self.mesh.devices.size
    self.batch_size = -(-batch_size // n) * n  # a multiple of the devices
    self.config = restored.model_config
    self.set_params(restored.params)
    self.query_tok = tokenization.QueryTokenizer(restored.query_tokenizer, self.config.query_maxlen)
    self.doc_tok = tokenization.DocumentTokenizer(restored.document_tokenizer,
                                                  self.config.doc_maxlen)
    model = preflmr.PreFLMR(self.config)
    self._queries = jax.jit(lambda p, *x: model.apply({"params": p}, *x,
                                                      method=preflmr.PreFLMR.encode_queries))
    self._documents = jax.jit(lambda p, *x: model.apply({"params": p}, *x,
                                                        method=preflmr.PreFLMR.encode_documents))

  def set_params(self, params) -> None:
    """New parameters of the same shapes (no recompile): the trainer's periodic evaluation."""
    self.params = jax.device_put(params, NamedSharding(self.mesh, P()))

  def _run(self, fn, arrays: Sequence[np.ndarray], n: int) -> tuple[np.ndarray, np.ndarray]:
    pad = self.batch_size - n  # fixed shapes: one compile
    arrays = [np.concatenate([a, np.repeat(a[-1:], pad, axis=0)]) if pad else a for a in arrays]
    arrays = [jax.device_put(a, NamedSharding(self.mesh, P("data"))) for a in arrays]
    emb, mask = fn(self.params, *arrays)
    return np.asarray(emb)[:n], np.asarray(mask)[:n]

  def documents(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings [n, L, dim] and mask [n, L], L = the batch's longest document rounded up to a
    multiple of DOC_LENGTH_MULTIPLE (at most doc_maxlen). Padding beyond a document's end changes
    nothing but float rounding ([PAD] keys are masked) and costs a full token's FLOPs."""
    t = self.doc_tok(list(texts), padding="longest", pad_to_multiple_of=DOC_LENGTH_MULTIPLE)
    return self._run(self._documents, [t["input_ids"], t["attention_mask"]], len(texts))

  def queries(self, questions, instructions, images) -> tuple[np.ndarray, np.ndarray]:
    t = self.query_tok(list(questions), list(instructions))
    size = self.config.vision.image_size
    pixels = image_processing.preprocess_images(
        [Image.open(io.BytesIO(b)) if b else Image.new("RGB", (size, size)) for b in images], size)
    return self._run(self._queries, [t["input_ids"], t["attention_mask"], pixels], len(questions))


def _batches(n: int, size: int):
  for start in range(0, n, size):
    yield range(start, min(start + size, n))


def _fingerprint(encoder: Encoder, passages) -> str:
  """Changes with the parameters, the model config and the corpus build."""
  h = hashlib.blake2b(digest_size=16)
  for leaf in jax.tree.leaves(encoder.params):
    h.update(np.ascontiguousarray(jax.device_get(leaf)).tobytes())
  h.update(json.dumps(encoder.config.to_dict(), sort_keys=True, default=str).encode())
  with open(os.path.join(passages.path, "dataset_info.json"), "rb") as f:
    h.update(f.read())
  return h.hexdigest()


def encode_corpus(encoder: Encoder, passages, task: str, cache_dir: Optional[str]):
  """(ids, texts, embeddings [N, L, dim], mask [N, L]) of a corpus, L = its longest document.

  With `cache_dir`, the valid tokens are stored packed (`<task>_<fingerprint>.npz`) and reused
  while the parameters, model config and corpus build are unchanged.
  """
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  ids, texts = [], []
  for rows in _batches(len(passages), 8192):
    records = passages.__getitems__(rows)
    ids += [r["passage_id"] for r in records]
    texts += [r["passage_content"] for r in records]
  path = (os.path.join(cache_dir, f"{task}_{_fingerprint(encoder, passages)}.npz")
          if cache_dir else None)
  if path and os.path.exists(path):
    with np.load(path) as cached:
      tokens, lengths = cached["tokens"], cached["lengths"]
    logging.info("corpus embeddings of %s from the cache %s", task, path)
  else:
    # Batches of similar lengths (sorted by characters), so that few are padded far past their
    # documents' ends; results go back to corpus order.
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    per_doc = [None] * len(texts)
    for rows in tqdm(list(_batches(len(texts), encoder.batch_size)), desc=f"{task} passages"):
      batch = [order[r] for r in rows]
      e, m = encoder.documents([texts[i] for i in batch])
      for i, x, row_mask in zip(batch, e, m.astype(bool)):
        per_doc[i] = x[row_mask]  # MaxSim ignores token positions
    lengths = np.asarray([len(x) for x in per_doc], np.int64)
    tokens = np.concatenate(per_doc)
    if path:
      _write_atomically(path, lambda f: np.savez(f, tokens=tokens, lengths=lengths))
  width = max(1, int(lengths.max()))
  corpus = np.zeros((len(lengths), width, tokens.shape[-1]), tokens.dtype)
  mask = np.arange(width)[None, :] < lengths[:, None]
  corpus[mask] = tokens
  return ids, texts, corpus, mask


@dataclasses.dataclass(frozen=True)
class IndexOptions:
  """`--index=nbits=2,centroids=256,nprobe=4,candidates=0` (index.py; candidates 0: no pruning)."""
  nbits: int = 2
  centroids: int = 256
  nprobe: int = 4
  candidates: int = 0

  @classmethod
  def parse(cls, text: str) -> Optional["IndexOptions"]:
    if not text:
      return None
    values = {}
    for part in text.split(","):
      key, eq, value = part.partition("=")
      if not eq or key.strip() not in {f.name for f in dataclasses.fields(cls)}:
        raise ValueError(f"--index={text!r}: expected KEY=INT pairs with KEY in "
                         f"{[f.name for f in dataclasses.fields(cls)]}")
      values[key.strip()] = int(value)
    return cls(**values)


def _index_search(options: IndexOptions, corpus: np.ndarray, corpus_mask: np.ndarray):
  """A PLAID-style index of the corpus and its search function (queries -> (scores, top))."""
  from preflmr_jax import index as plaid  # pylint: disable=g-import-not-at-top
  chunks = [(corpus[i:i + 4096], corpus_mask[i:i + 4096]) for i in range(0, len(corpus), 4096)]
  built = plaid.build(chunks, min(options.centroids, int(corpus_mask.sum())), options.nbits)
  return lambda q, k: plaid.search(built, q, None, k, options.nprobe, options.candidates or None)


def evaluate_task(encoder: Encoder, data_dir: str, task: str, split: str, ks: Sequence[int],
                  chunk_size: int = 256, cache_dir: Optional[str] = None,
                  max_queries: Optional[int] = None, index: Optional[IndexOptions] = None,
                  device_corpus_bytes: int = 8 << 30
                  ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
  """(metrics, rankings) of one task's split (its first `max_queries` queries, if given).

  A corpus larger than `device_corpus_bytes` stays in host memory and is streamed to the device
  chunk by chunk (`search.search_streaming`). With `index`, rankings come from the compressed index, and the result also reports its
  recall@k against exact search and the search time of both (exact search still runs, to compare).
  """
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  passages = m2kr.load_passages(data_dir, task, split)
  queries = m2kr.load_queries(data_dir, task, split)
  num_queries = min(len(queries), max_queries or len(queries))
  if len(passages) == 0 or num_queries == 0:
    raise ValueError(f"{task}/{split}: empty corpus or no queries ({len(passages)} passages, "
                     f"{len(queries)} queries)")
  k = min(max(ks), len(passages))
  ids, texts, host_corpus, host_mask = encode_corpus(encoder, passages, task, cache_dir)
  indexed = _index_search(index, host_corpus, host_mask) if index else None
  on_device = host_corpus.nbytes <= device_corpus_bytes
  if on_device:  # sharded over the devices
    corpus = jax.device_put(host_corpus, search.corpus_sharding(encoder.mesh))
    corpus_mask = jax.device_put(host_mask, search.corpus_sharding(encoder.mesh))
  else:
    logging.info("%s: corpus of %.1f GiB stays in host memory (streamed in chunks)", task,
                 host_corpus.nbytes / 2**30)
  rankings, positives, answers = [], [], []
  seconds, overlap = {"exact": 0.0, "index": 0.0}, []
  for rows in tqdm(list(_batches(num_queries, encoder.batch_size)), desc=f"{task} queries"):
    records = queries.__getitems__(rows)
    q, _ = encoder.queries([r["question"] for r in records], [r["instruction"] for r in records],
                           [r["image"] for r in records])
    start = time.perf_counter()
    if on_device:
      scores, top = search.exact_search(q, None, corpus, corpus_mask, k, chunk_size,
                                        mesh=encoder.mesh)
    else:
      stream = ((host_corpus[i:i + chunk_size], host_mask[i:i + chunk_size])
                for i in range(0, len(host_corpus), chunk_size))
      scores, top = search.search_streaming(q, stream, k)
    scores, top = jax.block_until_ready((scores, top))
    seconds["exact"] += time.perf_counter() - start
    if indexed:
      start = time.perf_counter()
      exact_top = np.asarray(top)
      scores, top = indexed(q, k)
      seconds["index"] += time.perf_counter() - start
      overlap += [len(set(a) & set(b)) / k for a, b in zip(exact_top, np.asarray(top))]
    for r, s, i in zip(records, np.asarray(scores), np.asarray(top)):
      rankings.append({"question_id": r["question_id"], "passage_ids": [ids[j] for j in i],
                       "scores": [float(x) for x in s]})
      positives.append(r["pos_item_ids"])
      answers.append(r["answers"])
  has_answers = any(answers)
  result = metrics.task_metrics(task, [r["passage_ids"] for r in rankings], positives, ks,
                                answers=answers if has_answers else None,
                                passage_text=dict(zip(ids, texts)) if has_answers else None)
  result.update(headline=metrics.HEADLINE[task], num_queries=num_queries,
                num_passages=len(passages), exact_search_seconds=seconds["exact"])
  if indexed:
    result.update({"index": dataclasses.asdict(index), f"IndexRecallVsExact@{k}":
                   float(np.mean(overlap)), "index_search_seconds": seconds["index"],
                   "index_speedup": seconds["exact"] / max(seconds["index"], 1e-9)})
  return result, rankings


def _write_atomically(path: str, write) -> None:
  """`write(binary file)` into a temporary file renamed to `path`: a half-written file is never
  found under its name."""
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".tmp_")
  try:
    with os.fdopen(fd, "wb") as f:
      write(f)
    os.replace(tmp, path)
  except BaseException:
    os.unlink(tmp)
    raise


def _write_text(path: str, text: str) -> None:
  _write_atomically(path, lambda f: f.write(text.encode("utf-8")))


def markdown(results: dict[str, dict[str, Any]]) -> str:
  """One row per task; the headline metric in bold."""
  names = sorted({k for r in results.values() for k in r if "@" in k},
                 key=lambda n: (n.split("@")[0], int(n.split("@")[1])))
  lines = ["| task | queries | passages | " + " | ".join(names) + " |",
           "| --- | --- | --- | " + " | ".join("---" for _ in names) + " |"]
  for task, r in results.items():
    cells = [(f"**{r[n]:.4f}**" if n == r["headline"] else f"{r[n]:.4f}") if n in r else ""
             for n in names]
    lines.append(f"| {task} | {r['num_queries']} | {r['num_passages']} | " + " | ".join(cells)
                 + " |")
  return "\n".join(lines) + "\n"


def run(config, checkpoint: str, tasks: Sequence[str], split: str, data_dir: str, output: str,
        ks: Sequence[int] = (1, 5, 10), batch_size: int = 64, step: Optional[int] = None,
        cache_dir: Optional[str] = None, index: Optional[IndexOptions] = None
        ) -> dict[str, dict[str, Any]]:
  """Evaluates `tasks` and writes results.json, results.md and <task>_rankings.jsonl to output."""
  if split not in m2kr.SPLITS:
    raise ValueError(f"--split={split!r}: expected one of {m2kr.SPLITS}")
  tasks = [m2kr.canonical_task(t) for t in tasks or
           [t for t, _ in pipeline.parse_tasks(config.data.tasks)]]
  if not tasks:
    raise ValueError("no tasks to evaluate: pass --tasks or set config.data.tasks")
  restored = restore(config, checkpoint, step)
  encoder = Encoder(restored, batch_size)
  size = {"params": sum(int(np.prod(x.shape)) for x in jax.tree.leaves(restored.params)),
          "train_flops": _train_flops(checkpoint, restored.step)}
  write = jax.process_index() == 0  # every process computes the same results
  if write:
    os.makedirs(output, exist_ok=True)
  results = {}
  for task in tasks:
    result, rankings = evaluate_task(encoder, data_dir, task, split, ks, cache_dir=cache_dir,
                                     index=index)
    result.update(checkpoint=restored.checkpoint, step=restored.step, split=split, **size)
    results[task] = result
    if write:
      _write_text(os.path.join(output, f"{task}_rankings.jsonl"),
                  "".join(json.dumps(r) + "\n" for r in rankings))
    logging.info("%s/%s: %s", task, split, {k: v for k, v in result.items() if "@" in k})
  if write:
    _write_text(os.path.join(output, "results.json"), json.dumps(results, indent=2) + "\n")
    _write_text(os.path.join(output, "results.md"), markdown(results))
  return results


def _train_flops(checkpoint: str, step: Optional[int]) -> Optional[float]:
  """Training compute up to `step`: the trainer's FLOPs per step (`run.json` in the workdir, found
  from the workdir or a step folder) times the step; None for a published folder or an older run."""
  if step is None:
    return None
  for folder in (checkpoint, os.path.join(checkpoint, os.pardir, os.pardir)):
    path = os.path.join(folder, train.RUN_INFO)
    if os.path.isfile(path):
      with open(path) as f:
        return float(json.load(f)["train_flops_per_step"]) * step
  return None


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  config = f.config
  if config.get("distributed"):
    sharding.initialize_distributed()
  data_dir = f.data_dir or pipeline.resolve_data_dir(config)
  try:
    ks = [int(k) for k in f.ks.split(",")]
  except ValueError:
    raise app.UsageError(f"--ks={f.ks!r}: expected comma-separated integers") from None
  cache_dir = {"": os.path.join(pipeline.cache_root(), "embeddings"), "off": None}.get(f.embedding_cache, f.embedding_cache)
  try:
    index = IndexOptions.parse(f.index)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  results = run(config, f.checkpoint, [t for t in f.tasks.split(",") if t], f.split, data_dir, f.output, ks,
                f.batch_size, f.step, cache_dir, index)
  if jax.process_index() == 0:
    print(markdown(results))


def define_flags():
  """Defined only when run as a program (tools are imported together in tests)."""
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file("config", None, "Experiment config file (path[:arg]).")
  flags.DEFINE_string("checkpoint", None, "Workdir, step folder or published PreFLMR folder.")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest complete one).")
  flags.DEFINE_string("tasks", "", "Comma-separated M2KR tasks (default: config.data.tasks).")
  flags.DEFINE_string("split", "test", "train, valid or test.")
  flags.DEFINE_string("data_dir", "", "TFDS data_dir (default: config.data.data_dir / the sample).")
  flags.DEFINE_string("output", None, "Output folder.")
  flags.DEFINE_string("ks", "1,5,10", "Recall@K cut-offs.")
  flags.DEFINE_integer("batch_size", 64, "Encoding batch size (all devices together).")
  flags.DEFINE_string("index", "", "Search a compressed index instead of exhaustively, e.g. "
                      "nbits=2,centroids=256,nprobe=4 (also reports its recall vs exact search).")
  flags.DEFINE_string("embedding_cache", "", "Corpus embedding cache folder ('' = "
                      "$XDG_CACHE_HOME/preflmr_jax/embeddings, 'off' = none).")


if __name__ == "__main__":
  define_flags()
  flags.mark_flags_as_required(["config", "checkpoint", "output"])
  app.run(main)
