"""Retrieval evaluation: a task's corpus and queries encoded over every device of every process,
exact MaxSim search sharded over the devices, M2KR metrics.

  encoder = Encoder(model_config, params, query_tokenizer, doc_tokenizer, mesh, batch_size=64)
  result, rankings = evaluate_task(encoder, data_dir, "OKVQA", "test", ks=(1, 5, 10))

The trainer's periodic evaluation (parameters sharded as in training) and the eval binary
(`evaluate.py`, parameters replicated) both call this. With several processes every process makes
the same calls (SPMD): each tokenises, decodes and encodes only the rows of a batch that its own
devices hold and keeps the embeddings of those rows; the corpus is assembled on each process's own
devices (no embedding crosses hosts) and searched there; the top-k candidates are merged on device,
so every process gets the same rankings and metrics.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
import zipfile
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding

from preflmr_jax import cli, metrics, search, sharding, storage, tokenization
from preflmr_jax.data import features, m2kr
from preflmr_jax.models import model_config as mc
from preflmr_jax.models import preflmr
from preflmr_jax.user_errors import ConfigError

# Document batches are padded to a multiple of this: at most doc_maxlen / 64 compiled shapes.
DOC_LENGTH_MULTIPLE = 64


def eval_mesh(devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """Every device (of every process) along `data`: the eval binary's mesh."""
  return sharding.make_mesh({"data": -1}, devices)


def _allgather(x: np.ndarray) -> np.ndarray:
  """[processes, ...]: `x` of every process (the same shape on each)."""
  return np.asarray(multihost_utils.process_allgather(np.asarray(x)))


def _rows_held(batch_sharding: NamedSharding, n: int) -> np.ndarray:
  """Sorted rows of an [n, ...] batch that this process's devices hold."""
  rows = set()
  for index in batch_sharding.addressable_devices_indices_map((n,)).values():
    rows.update(range(n)[index[0]])
  return np.asarray(sorted(rows), np.int64)


def _shards_owned(x: jax.Array) -> list[tuple[range, np.ndarray]]:
  """(rows, values) of this process's shards of `x`; over all processes each row comes once."""
  return [(range(x.shape[0])[s.index[0]], np.asarray(s.data))
          for s in x.addressable_shards if s.replica_id == 0]


class Encoder:
  """Jitted query / document encoders on `mesh`; a batch's rows split over all its devices.

  `params` must already be placed on `mesh` (any sharding: the trainer's state shardings or
  replicated); `set_params` swaps in new values of the same shapes without a recompile.
  """

  def __init__(self, model_config: mc.PreFLMRConfig, params, query_tokenizer, document_tokenizer,
               mesh: Mesh, batch_size: int = 64, rules: Sequence = sharding.LOGICAL_AXIS_RULES):
    self.config, self.mesh, self.rules = model_config, mesh, sharding.axis_rules(rules)
    self.batch_sharding = sharding.batch_sharding(mesh, 1, self.rules)
    shards = sharding.num_batch_shards(mesh, self.rules)
    self.batch_size = -(-batch_size // shards) * shards  # a multiple of the batch shards
    self.rows = _rows_held(self.batch_sharding, self.batch_size)
    self.params = params
    self.query_features = features.QueryFeaturizer(query_tokenizer, model_config)
    self.doc_tok = tokenization.DocumentTokenizer(document_tokenizer, model_config.doc_maxlen)
    model = preflmr.PreFLMR(model_config)
    out = tuple(sharding.batch_sharding(mesh, rank, self.rules) for rank in (3, 2))
    self._queries = jax.jit(lambda p, *x: model.apply(
        {"params": p}, *x, method=preflmr.PreFLMR.encode_queries), out_shardings=out)
    self._documents = jax.jit(lambda p, *x: model.apply(
        {"params": p}, *x, method=preflmr.PreFLMR.encode_documents), out_shardings=out)

  def set_params(self, params) -> None:
    self.params = params

  def _global(self, local: np.ndarray) -> jax.Array:
    """This process's rows (`self.rows`, in order) -> a global [batch_size, ...] array."""
    spec = sharding.batch_sharding(self.mesh, local.ndim, self.rules)
    position = {int(r): i for i, r in enumerate(self.rows)}
    return jax.make_array_from_callback(
        (self.batch_size,) + local.shape[1:], spec,
        lambda index: local[[position[r] for r in range(self.batch_size)[index[0]]]])

  def _encode(self, fn, local_inputs: Sequence[np.ndarray]) -> tuple[jax.Array, jax.Array]:
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      return fn(self.params, *[self._global(a) for a in local_inputs])

  def _local(self, n: int) -> np.ndarray:
    """This process's rows of a batch of `n` items; rows past the end repeat the last item."""
    if not 0 < n <= self.batch_size:
      raise ValueError(f"a batch holds 1 to {self.batch_size} items, got {n}")
    return np.minimum(self.rows, n - 1)

  def encode_documents(self, texts: Sequence[str], width: Optional[int] = None):
    """Global (embeddings [batch_size, L, dim], mask [batch_size, L]) of `texts` (all of the
    batch's, the same on every process; only this process's rows are tokenised). L = `width`,
    which must then be agreed by every process, or this batch's longest rounded up to
    DOC_LENGTH_MULTIPLE (one process)."""
    t = self.doc_tok([texts[i] for i in self._local(len(texts))], padding="longest")
    width = width or _round_width(t["input_ids"].shape[1], self.config.doc_maxlen)
    t = _pad_tokens(t, width, self.doc_tok.tokenizer.pad_token_id)
    return self._encode(self._documents, [t["input_ids"], t["attention_mask"]])

  def query_inputs(self, questions, instructions, images) -> dict[str, np.ndarray]:
    """This process's rows (`data.features.QueryFeaturizer`) of a batch of queries."""
    rows = self._local(len(questions))
    return self.query_features([questions[i] for i in rows], [instructions[i] for i in rows],
                               [images[i] for i in rows])

  def encode_queries(self, questions, instructions, images):
    """Global (embeddings, mask) of a batch of queries; `images` holds encoded image bytes (b""
    for a text-only query: a black image), decoded only for this process's rows."""
    f = self.query_inputs(questions, instructions, images)
    return self._encode(self._queries, [f["query_input_ids"], f["query_attention_mask"],
                                        f["pixel_values"]])

  def documents(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Host (embeddings [n, L, dim], mask [n, L]) of `texts` (one process)."""
    e, m = self.encode_documents(texts)
    return np.asarray(e)[:len(texts)], np.asarray(m)[:len(texts)]

  def queries(self, questions, instructions, images) -> tuple[np.ndarray, np.ndarray]:
    """Host (embeddings, mask) of a batch of queries (one process)."""
    e, m = self.encode_queries(questions, instructions, images)
    return np.asarray(e)[:len(questions)], np.asarray(m)[:len(questions)]


def _round_width(longest: int, maxlen: int) -> int:
  return min(-(-longest // DOC_LENGTH_MULTIPLE) * DOC_LENGTH_MULTIPLE, maxlen)


def _pad_tokens(t: dict[str, np.ndarray], width: int, pad_id: int) -> dict[str, np.ndarray]:
  extra = ((0, 0), (0, width - t["input_ids"].shape[1]))
  return {"input_ids": np.pad(t["input_ids"], extra, constant_values=pad_id),
          "attention_mask": np.pad(t["attention_mask"], extra)}


def _batches(n: int, size: int):
  for start in range(0, n, size):
    yield range(start, min(start + size, n))


# ---------------------------------------------------------------------------
# The corpus.
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class Corpus:
  """A task's passages and this process's share of their embeddings, packed on the host:
  `passages` (corpus indices), `tokens` [sum of lengths, dim] (valid tokens only), `lengths`."""
  ids: list[str]
  texts: list[str]
  passages: np.ndarray
  tokens: np.ndarray
  lengths: np.ndarray
  key: str = ""  # the cache's fingerprint of parameters, model and passages ('' without a cache)

  def padded(self, take: Sequence[int], width: int) -> tuple[np.ndarray, np.ndarray]:
    """(embeddings [len(take), width, dim], mask) of this process's entries `take`."""
    starts = np.concatenate([[0], np.cumsum(self.lengths)])
    emb = np.zeros((len(take), width, self.tokens.shape[-1]), self.tokens.dtype)
    mask = np.zeros((len(take), width), bool)
    for row, i in enumerate(take):
      emb[row, :self.lengths[i]] = self.tokens[starts[i]:starts[i + 1]]
      mask[row, :self.lengths[i]] = True
    return emb, mask


@dataclasses.dataclass
class DeviceCorpus:
  """Embeddings laid out over the encoder's devices: row r is passage `passage[r]` (-1: a
  device's padding, `valid` False, never returned by the search)."""
  embeddings: jax.Array
  mask: jax.Array
  valid: jax.Array
  passage: np.ndarray


def _fingerprint(params, model_config, ids: Sequence[str], texts: Sequence[str]) -> str:
  """Changes with the parameters, the model config and the passages themselves.

  The passages are hashed as read (ids, texts, in order), not the build's files or metadata: a
  rebuilt or repaired shard whose records changed gets a new key even when dataset_info.json,
  the sizes and the counts are the same, and encode_corpus reads every passage anyway (hashing
  them costs a fraction of that read)."""
  h = hashlib.blake2b(digest_size=16)
  for leaf in jax.tree.leaves(params):  # replicated (the eval binary): one copy is all of it
    h.update(np.ascontiguousarray(np.asarray(leaf.addressable_data(0))).tobytes())
  h.update(json.dumps(model_config.to_dict(), sort_keys=True, default=str).encode())
  for column in (ids, texts):
    h.update(np.asarray([len(x) for x in column], np.int64).tobytes())  # where each one ends
    for rows in _batches(len(column), 8192):
      h.update("".join(column[i] for i in rows).encode("utf-8"))
  return h.hexdigest()


def _encode_own_passages(encoder: Encoder, texts: Sequence[str], task: str):
  """This process's rows of the corpus, encoded: (passage indices, packed tokens, lengths)."""
  # Batches of similar lengths (sorted by characters) so that few are padded far past their
  # documents' ends. Every process tokenises its rows of every batch first: the batch widths must
  # be agreed before encoding.
  order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
  batches = [[order[r] for r in rows] for rows in _batches(len(texts), encoder.batch_size)]
  widths = _allgather(np.asarray(
      [encoder.doc_tok([texts[batch[r]] for r in encoder._local(len(batch))],  # pylint: disable=protected-access
                       padding="longest")["input_ids"].shape[1] for batch in batches])).max(0)
  passages, tokens, lengths = [], [], []
  for batch, width in cli.progress(list(zip(batches, widths)), f"{task} passages", " batches"):
    e, m = encoder.encode_documents([texts[i] for i in batch],
                                    _round_width(int(width), encoder.config.doc_maxlen))
    for (rows, emb), (_, mask) in zip(_shards_owned(e), _shards_owned(m)):
      for r, x, row_mask in zip(rows, emb, mask.astype(bool)):
        if r < len(batch):  # not a repeat of the last document
          passages.append(batch[r])
          tokens.append(x[row_mask])  # MaxSim ignores token positions
          lengths.append(len(tokens[-1]))
  dim = encoder.config.dim
  return (np.asarray(passages, np.int64),
          np.concatenate(tokens) if tokens else np.zeros((0, dim), np.float32),
          np.asarray(lengths, np.int64))


def _lay_out(encoder: Encoder, corpus: Corpus) -> DeviceCorpus:
  """Each process's passages onto its own devices, in `search.corpus_sharding`'s row blocks."""
  mesh = encoder.mesh
  devices = list(mesh.devices.flat)
  mine = [d for d in devices if d.process_index == jax.process_index()]
  counts = _allgather(np.asarray([len(corpus.passages), int(corpus.lengths.max(initial=1))]))
  per_device = max(1, max(-(-int(n) // len(mine)) for n in counts[:, 0]))
  width = int(counts[:, 1].max())
  row_passage = np.full(len(devices) * per_device, -1, np.int64)
  blocks = {}
  for j, device in enumerate(mine):
    take = range(j * per_device, min((j + 1) * per_device, len(corpus.passages)))
    blocks[device] = corpus.padded(take, width)
    start = devices.index(device) * per_device
    row_passage[start:start + len(take)] = corpus.passages[take.start:take.stop]
  row_passage = _allgather(row_passage).max(0)  # each row is set by exactly one process
  if sorted(row_passage[row_passage >= 0].tolist()) != list(range(len(corpus.ids))):
    raise AssertionError("the processes' passages do not cover the corpus exactly once")
  corpus_sharding = search.corpus_sharding(mesh)
  rows = len(devices) * per_device

  def assemble(part, shape):
    return jax.make_array_from_single_device_arrays(
        shape, corpus_sharding, [jax.device_put(blocks[d][part], d) for d in mine])

  return DeviceCorpus(
      embeddings=assemble(0, (rows, width, corpus.tokens.shape[-1])),
      mask=assemble(1, (rows, width)),
      valid=jax.make_array_from_callback((rows,), corpus_sharding,
                                         lambda index: row_passage[index] >= 0),
      passage=row_passage)


def encode_corpus(encoder: Encoder, passages, task: str, cache_dir=None) -> Corpus:
  """The task's passages, and this process's share of them encoded.

  With `cache_dir`, each process stores the valid tokens of its passages packed
  (`<task>_<fingerprint>_<process>of<processes>_b<batch>.npz`) and reuses them while the
  parameters, model config, passages (their ids and texts), number of processes and batch size
  are unchanged.
  """
  ids, texts = [], []
  for rows in _batches(len(passages), 8192):
    records = passages.__getitems__(rows)
    ids += [r["passage_id"] for r in records]
    texts += [r["passage_content"] for r in records]
  path, key = None, ""
  if cache_dir:
    key = (f"{task}_{_fingerprint(encoder.params, encoder.config, ids, texts)}_"
           f"{jax.process_index()}of{jax.process_count()}_b{encoder.batch_size}")
    path = storage.path(cache_dir, "--embedding_cache") / f"{key}.npz"
  local = None
  if path and path.exists():
    try:
      with path.open("rb") as f, np.load(f) as cached:
        local = (cached["passages"], cached["tokens"], cached["lengths"])
    except (OSError, EOFError, KeyError, ValueError, zipfile.BadZipFile) as e:
      if storage.is_access_failure(e):  # not damage: encoding again would not help
        raise
      logging.warning("%s: cached corpus embeddings that do not load (%s: %s); encoding again",
                      path, type(e).__name__, e)
  if _allgather(np.asarray(local is not None)).all():  # every process reuses its share, or none
    logging.info("corpus embeddings of %s from the cache %s", task, path)
  else:
    local = _encode_own_passages(encoder, texts, task)
    if path:  # never read half-written (a gs:// rename would be a copy)
      storage.write_with(path, lambda f: np.savez(f, passages=local[0], tokens=local[1],
                                                  lengths=local[2]))
  return Corpus(ids, texts, *local, key=key)


# ---------------------------------------------------------------------------
# Search and metrics.
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class IndexOptions:
  """`--index=plaid` or `--index=nbits=2,nprobe=4,...`: how to build the compressed index (`nbits`; `centroids`, 0:
  PLAID's choice from the corpus's token count) and any `index.SearchOptions` field to change
  from PLAID's settings for the largest k (`search`, (name, value) pairs)."""
  nbits: int = 2
  centroids: int = 0
  search: tuple[tuple[str, Any], ...] = ()

  @classmethod
  def parse(cls, text: str) -> Optional["IndexOptions"]:
    """None for '', the defaults for 'plaid'; ConfigError naming `--index` for an unknown key or
    a value of the wrong kind."""
    from preflmr_jax import index as plaid  # pylint: disable=g-import-not-at-top
    if not text:
      return None
    if text.strip() == "plaid":
      return cls()
    search_keys = [f.name for f in dataclasses.fields(plaid.SearchOptions)]
    keys = ["nbits", "centroids"] + search_keys
    values, search_values = {}, []
    for part in text.split(","):
      key, eq, value = (x.strip() for x in part.partition("="))
      if not eq or key not in keys:
        raise ConfigError(f"--index={text!r}: expected KEY=VALUE pairs with KEY in {keys}")
      try:
        number = float(value) if key == "threshold" else int(value)
      except ValueError:
        raise ConfigError(f"--index={text!r}: {key} takes "
                          f"{'a number' if key == 'threshold' else 'an integer'}, got {value!r}"
                          ) from None
      if key in search_keys:
        search_values.append((key, number))
      else:
        values[key] = number
    return cls(**values, search=tuple(search_values))

  def search_options(self, k: int):
    """The `index.SearchOptions` for k results; ConfigError naming `--index` if they cannot work."""
    from preflmr_jax import index as plaid  # pylint: disable=g-import-not-at-top
    options = plaid.SearchOptions.for_k(k, **dict(self.search))
    # A smaller cap than PLAID's keep/rerank lowers those too, rather than failing.
    options = dataclasses.replace(options, keep=min(options.keep, options.candidates))
    options = dataclasses.replace(options, rerank=max(min(options.rerank, options.keep), k))
    options.check(k, prefix="--index=")
    return options

  def check(self, k: int) -> None:
    from preflmr_jax import index as plaid  # pylint: disable=g-import-not-at-top
    if self.nbits not in plaid.NBITS:
      raise ConfigError(f"--index=nbits={self.nbits}: must be one of {plaid.NBITS}")
    if self.centroids < 0:
      raise ConfigError(f"--index=centroids={self.centroids}: must be >= 1 (0: chosen from the "
                        "corpus size)")
    self.search_options(k)


def _replicated_value(x: jax.Array) -> np.ndarray:
  return np.asarray(x.addressable_data(0))


def _exact_search(encoder: Encoder, corpus: Corpus, k: int, chunk_size: int,
                  device_corpus_bytes: int) -> Callable:
  """queries (global array) -> host (scores [B, k], corpus indices [B, k]) by exact MaxSim.

  The corpus is searched on the devices; with one process, one larger than
  `device_corpus_bytes` stays in host memory and is streamed to the device chunk by chunk.
  """
  width = int(corpus.lengths.max(initial=1))
  size = len(corpus.ids) * width * corpus.tokens.shape[-1] * corpus.tokens.dtype.itemsize
  if jax.process_count() > 1 or size <= device_corpus_bytes:
    placed = _lay_out(encoder, corpus)

    def on_device(q):
      with jax.set_mesh(encoder.mesh):
        scores, top = search.exact_search(q, None, placed.embeddings, placed.mask, k, chunk_size,
                                          mesh=encoder.mesh, corpus_valid=placed.valid)
      return _replicated_value(scores), placed.passage[_replicated_value(top)]
    return on_device
  logging.info("corpus of %.1f GiB stays in host memory (streamed in chunks)", size / 2**30)

  def streamed(q):
    n = len(corpus.passages)
    chunks = (corpus.padded(range(i, min(i + chunk_size, n)), width)
              for i in range(0, n, chunk_size))
    scores, top = search.search_streaming(np.asarray(q), chunks, k)
    return np.asarray(scores), corpus.passages[np.asarray(top)]
  return streamed


def _index_search(options: IndexOptions, corpus: Corpus, k: int,
                  cache_dir=None) -> tuple[Callable, int]:
  """A PLAID index of the corpus (one process): its search (queries -> host (scores, corpus
  indices)) and its number of centroids. With `cache_dir`, the index is kept next to the corpus
  embeddings, keyed the same way plus its build options, and reused."""
  from preflmr_jax import index as plaid  # pylint: disable=g-import-not-at-top
  if jax.process_count() > 1:
    raise ConfigError("--index: the compressed index runs on one process")
  search_options = options.search_options(k)
  num_tokens = int(corpus.lengths.sum())
  centroids = min(options.centroids or plaid.default_num_centroids(num_tokens), num_tokens)
  path = None
  if cache_dir and corpus.key:
    path = (storage.path(cache_dir, "--embedding_cache") /
            f"{corpus.key}_nbits{options.nbits}_c{centroids}.plaid.npz")
  built = None
  if path and path.exists():
    try:
      built = plaid.load(path, corpus_key=corpus.key)
      logging.info("index from the cache %s", path)
    except ValueError as e:  # a damaged cache entry is rebuilt, not fatal
      logging.warning("rebuilding the index: %s", e)
  if built is None:
    n, width = len(corpus.passages), int(corpus.lengths.max(initial=1))
    chunks = lambda: (corpus.padded(range(i, min(i + 4096, n)), width) for i in range(0, n, 4096))
    built = plaid.build(chunks, centroids, options.nbits, corpus_key=corpus.key,
                        progress=jax.process_index() == 0)
    if path:
      plaid.save(built, path)

  def find(q):
    scores, top = plaid.search(built, np.asarray(q), None, k, search_options)
    top = np.asarray(top)  # -1 past the candidates found: stays -1, never a passage
    return np.asarray(scores), np.where(top >= 0, corpus.passages[top], -1)
  return find, built.num_centroids


def evaluate_task(encoder: Encoder, data_dir: str, task: str, split: str, ks: Sequence[int],
                  chunk_size: int = 256, cache_dir: Optional[str] = None,
                  max_queries: Optional[int] = None, index: Optional[IndexOptions] = None,
                  device_corpus_bytes: int = 8 << 30
                  ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
  """(metrics, rankings) of one task's split (its first `max_queries` queries, if given); every
  process gets the same.

  With `index` (one process), rankings come from the compressed index, and the result also
  reports its recall@k against exact search and the search time of both (exact search still
  runs, to compare).
  """
  passages = m2kr.load_passages(data_dir, task, split)
  queries = m2kr.load_queries(data_dir, task, split)
  num_queries = min(len(queries), max_queries or len(queries))
  if len(passages) == 0 or num_queries == 0:
    raise ValueError(f"{task}/{split}: empty corpus or no queries ({len(passages)} passages, "
                     f"{len(queries)} queries)")
  k = min(max(ks), len(passages))
  if k < max(ks):
    logging.warning("%s/%s has %d passages: Recall@K for K >= %d ranks all of them", task, split,
                    len(passages), len(passages))
  corpus = encode_corpus(encoder, passages, task, cache_dir)
  exact = _exact_search(encoder, corpus, k, chunk_size, device_corpus_bytes)
  indexed, centroids = _index_search(index, corpus, k, cache_dir) if index else (None, 0)
  rankings, positives, answers = [], [], []
  seconds, overlap = {"exact": 0.0, "index": 0.0}, []
  for rows in cli.progress(list(_batches(num_queries, encoder.batch_size)), f"{task} queries",
                          " batches"):
    records = queries.__getitems__(rows)
    q, _ = encoder.encode_queries([r["question"] for r in records],
                                  [r["instruction"] for r in records],
                                  [r["image"] for r in records])
    start = time.perf_counter()
    scores, top = exact(q)
    seconds["exact"] += time.perf_counter() - start
    if indexed:
      start = time.perf_counter()
      exact_top = top
      scores, top = indexed(q)
      seconds["index"] += time.perf_counter() - start
      overlap += [len(set(a) & set(b)) / k for a, b in zip(exact_top[:len(rows)], top)]
    for r, s, i in zip(records, scores, top):
      found = [(j, x) for j, x in zip(i, s) if j >= 0]  # a shorter ranking: the rest are misses
      rankings.append({"question_id": r["question_id"],
                       "passage_ids": [corpus.ids[j] for j, _ in found],
                       "scores": [float(x) for _, x in found]})
      positives.append(r["pos_item_ids"])
      answers.append(r["answers"])
  has_answers = any(answers)
  headline = m2kr.task_headline(data_dir, task)
  result = metrics.task_metrics(task, [r["passage_ids"] for r in rankings], positives, ks,
                                headline=headline,
                                answers=answers if has_answers else None,
                                passage_text=dict(zip(corpus.ids, corpus.texts))
                                if has_answers else None)
  in_corpus = set(corpus.ids)
  result.update(headline=headline, num_queries=num_queries,
                num_passages=len(passages), exact_search_seconds=seconds["exact"],
                # Kept and counted as misses, as in the official evaluation.
                queries_without_positive_in_corpus=sum(
                    in_corpus.isdisjoint(p) for p in positives))
  if indexed:
    result.update({"index": {"nbits": index.nbits, "centroids": centroids,
                             **dataclasses.asdict(index.search_options(k))},
                   f"IndexRecallVsExact@{k}":
                   float(np.mean(overlap)), "index_search_seconds": seconds["index"],
                   "index_speedup": seconds["exact"] / max(seconds["index"], 1e-9)})
  return result, rankings


def check_tasks(data_dir: str, tasks: Sequence[str], split: str) -> None:
  """Opens every task's queries and passages of `split`: a task or split that is not built, or a
  damaged shard (`m2kr.load_passages`), fails here, before any work is done."""
  for task in tasks:
    m2kr.load_passages(data_dir, task, split)
    m2kr.load_queries(data_dir, task, split)


def evaluate_tasks(encoder: Encoder, data_dir: str, tasks: Sequence[str], split: str,
                   ks: Sequence[int], **kwargs) -> dict[str, tuple[dict[str, Any], list]]:
  """{task: (metrics, rankings)}; every task is checked first (`check_tasks`)."""
  check_tasks(data_dir, tasks, split)
  return {task: evaluate_task(encoder, data_dir, task, split, ks, **kwargs) for task in tasks}


__all__ = ["DOC_LENGTH_MULTIPLE", "Corpus", "Encoder", "IndexOptions", "check_tasks",
           "encode_corpus", "eval_mesh", "evaluate_task", "evaluate_tasks"]
