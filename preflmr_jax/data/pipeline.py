"""The M2KR input pipeline (`config.data.source="m2kr"`): grain over the TFDS array_record builds.

One global stream, the same on every host: per task (`config.data.tasks`, e.g. "OVEN=2,OKVQA=1";
weights default to 1) its queries shuffled with a seed per task and re-shuffled every epoch,
endlessly repeated; the tasks mixed with the weights; cut into global batches of
`config.batch_size`. Host p of P reads and decodes only rows [p * b, (p + 1) * b) of each global
batch (b = batch_size / P), so the global batch at step s does not depend on the number of hosts.
Each example draws its instruction (`instructions.py`; the dataset's own for tasks without
templates), one of its positives and `config.num_negatives` negatives (first from its mined hard
negatives when `config.data.hard_negatives_dir` holds the task's `<task>_rankings.jsonl`, then at
random from the task's passage corpus; never one of its positives), with an RNG seeded by (seed,
its index in the global stream), then is tokenised and its image preprocessed (a black image for
text-only queries). With `config.data.num_workers > 0` batches are produced in worker processes.
Batches follow the interface of `preflmr_jax.data`; labels (`doc_labels`, `positive_labels`)
number the passage ids of the tasks' corpora, so a passage that several tasks hold (by id) has
one label.

`config.data.max_train_examples=N` trains on a fixed subset of about N queries of the mixture (split
by weight; `train_subset`): nested across N for one `config.data.subset_seed`.

A record that does not decode (a corrupt chunk of its shard, an image that PIL cannot open) is
replaced by its task's next record that does, the same on every host; each is logged with a count
per task and shard file, and past `config.data.max_bad_records` of them (0: at the first) the run
stops with one line naming the last record and its file.

The iterator's state is the number of global batches taken (it goes into the checkpoint):
restoring it continues the stream exactly, with any number of hosts or workers.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import functools
import json
import os
import signal
import threading
import zlib
from typing import Any, Optional, Sequence

import grain
import numpy as np
from absl import flags, logging

from preflmr_jax import storage, tokenization
from preflmr_jax import workdir as layout
from preflmr_jax.data import batch as batch_lib
from preflmr_jax.data import features, instructions, m2kr
from preflmr_jax.user_errors import BadFile, ConfigError, NotAFolder, require_int

SOURCE = "m2kr"


def parse_tasks(spec: str, data_dir: Optional[str] = None) -> list[tuple[str, float]]:
  """"OVEN=2,OKVQA" -> [("OVEN", 2.0), ("OKVQA", 1.0)]; errors name config.data.tasks. With
  `data_dir`, the tasks of a user's own described there are known too (`tasks.py`).

  "WIT*0.15,OKVQA*40,OVEN" weighs each task by that multiple of its number of queries (a bare
  name: once), which is how the official configs mix tasks (concatenating each dataset's
  fraction or copies); `sized(spec)` tells the two forms apart, which do not mix.
  """
  tasks, forms = [], set()
  for part in filter(None, (p.strip() for p in str(spec or "").split(","))):
    sep = "*" if "*" in part else "="
    name, given, weight = part.partition(sep)
    forms.add(sep if given else None)
    try:
      task = m2kr.canonical_task(name, data_dir)
      w = float(weight) if given else 1.0
    except ValueError as e:
      raise ConfigError(f"config.data.tasks={spec!r}: {e}") from None
    if forms >= {"*", "="}:
      raise ConfigError(f"config.data.tasks={spec!r}: mixes weights (TASK=w) and multiples of "
                        "the task's size (TASK*f); use one form")
    if not w > 0 or not np.isfinite(w):
      raise ConfigError(f"config.data.tasks={spec!r}: weight of {task} must be positive, got {w}")
    if task in dict(tasks):
      raise ConfigError(f"config.data.tasks={spec!r}: {task} given twice")
    tasks.append((task, w))
  if not tasks:
    raise ConfigError("config.data.tasks is empty; e.g. 'OVEN=1,OKVQA=1'")
  return tasks


def sized(spec: str) -> bool:
  """Whether `config.data.tasks` weighs tasks by multiples of their sizes ("WIT*0.15,...")."""
  return "*" in str(spec or "")


def cache_root() -> str:
  """$XDG_CACHE_HOME/preflmr_jax (~/.cache/preflmr_jax when unset): the sample, embedding caches."""
  cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(cache, "preflmr_jax")


def resolve_data_dir(config) -> str:
  """`config.data.data_dir`; for the SAMPLE task with none set, builds the sample on first use."""
  data_dir = config.data.data_dir
  tasks = [t for t, _ in parse_tasks(config.data.tasks, data_dir or None)]
  if data_dir:
    return os.fspath(storage.path(data_dir, "config.data.data_dir"))
  if tasks != ["SAMPLE"]:
    raise ConfigError(f"config.data.data_dir is not set; build the tasks {tasks} with "
                      "python -m preflmr_jax.data.prepare (docs/data.md)")
  from preflmr_jax.data import sample  # pylint: disable=g-import-not-at-top
  root = os.path.expanduser(config.data.sample_dir
                            or os.path.join(cache_root(), "m2kr_sample"))
  for folder in (root, os.path.join(root, "source"), os.path.join(root, "tfds")):
    if os.path.isfile(folder):
      unset = "" if config.data.sample_dir else " (unset: the default)"
      raise NotAFolder(f"config.data.sample_dir={root}{unset}: {folder} is a file, not a folder")
  sample.ensure_sample(os.path.join(root, "source"), os.path.join(root, "tfds"))
  return os.path.join(root, "tfds")


# ---------------------------------------------------------------------------
# Examples.
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class _Corpus:
  """A task's passages with an id -> index map (built once, in the main process)."""
  passages: Any
  index: dict[str, int]
  labels: np.ndarray  # int32 [passages]: each passage's label, one per passage id across tasks

  @classmethod
  def load(cls, data_dir: str, task: str, split: str,
           label_of: Optional[dict[str, int]] = None) -> "_Corpus":
    """`label_of` (passage id -> label), shared by the tasks of a mixture, gives a passage that
    several tasks' corpora hold the same label in each; new ids get the next labels."""
    passages = m2kr.load_passages(data_dir, task, split)
    index, chunk = {}, 8192
    for start in range(0, len(passages), chunk):  # batched reads: ~10x faster than one by one
      records = passages.__getitems__(range(start, min(start + chunk, len(passages))))
      index.update((r["passage_id"], start + i) for i, r in enumerate(records))
    label_of = {} if label_of is None else label_of
    labels = np.fromiter((label_of.setdefault(p, len(label_of)) for p in index), np.int32,
                         len(index))
    return cls(passages, index, labels)


class _MakeExample(grain.transforms.RandomMap):
  """Record -> one query with its positive and negatives, tokenised, fixed shapes."""

  def __init__(self, task: str, corpus: _Corpus, num_negatives: int, tokenizer, model_config,
               hard_negatives: Optional[dict[str, list[int]]] = None,
               max_positives: int = 1, task_type: Optional[str] = None):
    self.task, self.corpus, self.n = task, corpus, num_negatives
    self.max_positives = max_positives
    self.hard_negatives = hard_negatives or {}
    self.templates = instructions.training_instructions(task, task_type)
    self.tokenizer, self.model_config = tokenizer, model_config
    self._per_thread = {}

  def __getstate__(self):  # worker processes make their own tokenizers
    return {**self.__dict__, "_per_thread": {}}

  def _tokenizers(self):
    # grain reads with several threads, and a fast tokenizer's padding / truncation settings are
    # per object: shared, one thread's query padding leaks into another's documents.
    key = threading.get_ident()
    if key not in self._per_thread:
      tokenizer = copy.deepcopy(self.tokenizer)
      self._per_thread[key] = (
          features.QueryFeaturizer(tokenizer, self.model_config),
          tokenization.DocumentTokenizer(tokenizer, self.model_config.doc_maxlen))
    return self._per_thread[key]

  def _positives(self, record) -> list[int]:
    found = [self.corpus.index[p] for p in record["pos_item_ids"] if p in self.corpus.index]
    if not found:  # The builder drops such records; a mismatched build must not train silently.
      raise ValueError(f"{self.task} query {record['question_id']!r}: none of its positives "
                       f"{record['pos_item_ids']} is in the passage corpus")
    return found

  def _negatives(self, question_id: str, positives: Sequence[int],
                 rng: np.random.Generator) -> list[int]:
    size, excluded, negatives = len(self.corpus.index), set(positives), []
    hard = [i for i in self.hard_negatives.get(question_id, ()) if i not in excluded]
    for j in rng.permutation(len(hard))[:self.n]:  # mined ones first, then random passages
      negatives.append(hard[j])
      excluded.add(hard[j])
    if size - len(excluded) < self.n - len(negatives):  # would never finish
      raise ConfigError(f"{self.task} query {question_id!r}: its corpus of {size} passages has "
                        f"fewer than config.num_negatives={self.n} that are not its positives")
    while len(negatives) < self.n:
      i = int(rng.integers(size))
      if i not in excluded:
        negatives.append(i)
        excluded.add(i)
    return negatives

  def random_map(self, record, rng: np.random.Generator) -> dict[str, np.ndarray]:
    positives = self._positives(record)
    docs = ([positives[int(rng.integers(len(positives)))]]
            + self._negatives(record["question_id"], positives, rng))
    instruction = (record["instruction"] if self.templates is None
                   else self.templates[int(rng.integers(len(self.templates)))])
    featurize, doc_tok = self._tokenizers()
    query = featurize([record["question"]], [instruction], [record["image"]])
    texts = [r["passage_content"] for r in self.corpus.passages.__getitems__(docs)]
    doc = doc_tok(texts, padding="max_length")
    return {
        "query_input_ids": query["query_input_ids"][0],
        "query_attention_mask": query["query_attention_mask"][0],
        "pixel_values": query["pixel_values"][0],
        "doc_input_ids": doc["input_ids"],
        "doc_attention_mask": doc["attention_mask"],
        "doc_labels": self.corpus.labels[docs],
        "positive_labels": _pad(self.corpus.labels[positives][:self.max_positives],
                                self.max_positives),
    }


def _pad(labels: np.ndarray, size: int) -> np.ndarray:
  return np.concatenate([labels, np.full(size - len(labels), -1, np.int32)])


def _flatten_documents(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  # [b, 1 + n, ...] -> [b * (1 + n), ...]: query i's positive lands at i * (1 + n).
  for key in ("doc_input_ids", "doc_attention_mask", "doc_labels"):
    batch[key] = batch[key].reshape((-1,) + batch[key].shape[2:])
  return batch


# ---------------------------------------------------------------------------
# Datasets.
# ---------------------------------------------------------------------------


def _check(config, tasks, corpora, queries) -> None:
  n = batch_lib.num_negatives(config)
  for (task, _), corpus, records in zip(tasks, corpora, queries):
    if len(records) == 0:
      raise ConfigError(f"config.data.tasks: {task} has no queries in this split")
    if len(corpus.index) < n + 1:
      raise ConfigError(f"config.num_negatives={n}: {task}'s corpus has only {len(corpus.index)} "
                        "passages")


def _global_stream(tasks, sizes: Sequence[int], seed: int) -> grain.MapDataset:
  """The mixture as `(task, record index)` pairs, the same on every host: per task its records
  shuffled anew each epoch, endless, mixed by weight. Indices only, so that a host can skip the
  rows of other hosts without reading them."""
  streams = []
  for t, size in enumerate(sizes):
    ds = grain.MapDataset.range(size).shuffle(seed=_seed(seed, t, 0))
    streams.append(ds.repeat().map(functools.partial(_tagged, t)))
  return streams[0] if len(streams) == 1 else grain.MapDataset.mix(streams,
                                                                   [w for _, w in tasks])


def _tagged(task: int, record: int) -> tuple[int, int]:
  return task, record


# A host batch's entry that lists the records replaced in it (`m2kr.CorruptRecordError`s); the
# iterator takes it out and counts them (`_BadRecords`).
_BAD = "bad_records"


def _too_many(error: m2kr.CorruptRecordError, count: int, limit: int) -> ValueError:
  return ValueError(f"{count} training records do not decode, over "
                    f"config.data.max_bad_records={limit} (0: stop at the first); the last: {error}")


class _BadRecords:
  """The records replaced in this process's batches, each counted once, per task and file; past
  `config.data.max_bad_records` of them, a one-line stop naming the last one."""

  def __init__(self, limit: int):
    self.limit, self.seen, self.per_file = limit, set(), collections.Counter()

  def add(self, errors: Sequence[m2kr.CorruptRecordError]) -> None:
    for e in errors:
      if (e.file, e.position) in self.seen:  # met again in a later epoch
        continue
      self.seen.add((e.file, e.position))
      self.per_file[e.task, e.file] += 1
      if len(self.seen) > self.limit:
        raise _too_many(e, len(self.seen), self.limit)
      logging.warning("m2kr: %s; replaced by the next record (%d so far in %s %s, %d of "
                      "config.data.max_bad_records=%d)", e, self.per_file[e.task, e.file],
                      e.task, e.file, len(self.seen), self.limit)


class _HostRows(grain.transforms.MapWithIndex):
  """Global batch `step` of `(task, record)` pairs -> this host's rows, as examples.

  Host p reads and decodes rows [p * b, (p + 1) * b) only. Example g of the global stream
  (g = step * batch_size + row) draws from an RNG seeded by (seed, g), so the global batch is the
  same whatever the number of hosts that materialise it. A record that does not decode (its read,
  or its image) is replaced by its task's next record r + 1, r + 2, ...: the substitute depends
  on the record alone, so batches stay full and the same for any number of hosts or workers, and
  a resumed run meets the same substitutes. The batch lists the records replaced (`_BAD`).
  """

  def __init__(self, makers, records, seed: int, global_size: int, size: int, process_index: int,
               max_bad_records: int):
    self.makers, self.records, self.seed = makers, records, seed
    self.global_size, self.size, self.first = global_size, size, process_index * size
    self.max_bad_records = max_bad_records

  def _read(self, t: int, rows: Sequence[int]) -> list:
    """Task t's records `rows`; an `m2kr.CorruptRecordError` in place of each that is bad."""
    try:
      return list(self.records[t].__getitems__(rows))
    except m2kr.CorruptRecordError:
      pass  # read them one by one: only the bad one is replaced
    out = []
    for r in rows:
      try:
        out.append(self.records[t][r])
      except m2kr.CorruptRecordError as e:
        out.append(e)
    return out

  def _example(self, t: int, r: int, record, g: int, bad: list) -> dict[str, np.ndarray]:
    size = len(self.records[t])
    for k in range(size):
      if not isinstance(record, m2kr.CorruptRecordError):
        try:
          return self.makers[t].random_map(record, np.random.default_rng([self.seed, g]))
        except features.UndecodableImageError as e:
          record = self.records[t].error((r + k) % size, str(e))
      bad.append(record)
      if len(bad) > self.max_bad_records:  # the iterator would stop at this batch anyway
        raise _too_many(record, len(bad), self.max_bad_records)
      record = self._read(t, [(r + k + 1) % size])[0]
    raise AssertionError("unreachable: more bad records than records")

  def map_with_index(self, step: int, pairs) -> dict[str, Any]:
    tasks, rows = (np.asarray(a)[self.first:self.first + self.size] for a in pairs)
    records = [None] * len(rows)
    for t in np.unique(tasks):  # batched reads per task
      at = np.flatnonzero(tasks == t)
      for i, r in zip(at, self._read(int(t), [int(rows[i]) for i in at])):
        records[i] = r
    examples, bad = [], []
    for row, (t, r, record) in enumerate(zip(tasks, rows, records)):
      g = step * self.global_size + self.first + row
      examples.append(self._example(int(t), int(r), record, g, bad))
    batch = _flatten_documents({k: np.stack([e[k] for e in examples]) for k in examples[0]})
    batch[_BAD] = bad
    return batch


def _host_batches(config, model_config, tokenizer, *, process_index: int,
                  process_count: int) -> grain.MapDataset:
  """This host's rows of every global training batch: element s is step s's share."""
  split = m2kr.TRAIN_SPLIT
  data_dir = resolve_data_dir(config)
  tasks = parse_tasks(config.data.tasks, data_dir)
  seed = int(config.seed)
  label_of = {}
  corpora = [_Corpus.load(data_dir, task, split, label_of) for task, _ in tasks]
  del label_of  # each corpus keeps its labels array
  queries = [m2kr.load_queries(data_dir, task, split) for task, _ in tasks]
  if sized(config.data.tasks):
    tasks = [(task, f * len(records)) for (task, f), records in zip(tasks, queries)]
  limit = require_int("data.max_train_examples", config.data.max_train_examples, 0, " (0: all)")
  if limit:
    seed = require_int("data.subset_seed", config.data.subset_seed, 0)
    queries = [_Subset(records, train_subset(len(records), task, share, seed))
               for (task, _), records, share in zip(tasks, queries, subset_shares(tasks, limit))]
  _check(config, tasks, corpora, queries)
  makers = []
  for (task, _), corpus, records in zip(tasks, corpora, queries):
    makers.append(_MakeExample(task, corpus, batch_lib.num_negatives(config), tokenizer,
                               model_config, hard_negatives=_hard_negatives(config, task, corpus),
                               max_positives=batch_lib.max_positives(config),
                               task_type=m2kr.task_type(data_dir, task)))
    logging.info("m2kr %s/%s: %d queries, %d passages", task, split, len(records),
                 len(corpus.passages))
  stream = _global_stream(tasks, [len(r) for r in queries], seed)
  rows = _HostRows(makers, queries, _seed(seed, 0, 1), config.batch_size,
                   batch_lib.local_batch_size(config, process_count), process_index,
                   max_bad_records(config))
  return stream.batch(config.batch_size, drop_remainder=True).map_with_index(rows)


def max_bad_records(config) -> int:
  """`config.data.max_bad_records`: how many records that do not decode a process replaces."""
  return require_int("data.max_bad_records", config.data.max_bad_records, 0,
                     " (0: stop at the first record that does not decode)")


def subset_shares(tasks: Sequence[tuple[str, float]], total: int) -> list[int]:
  """`config.data.max_train_examples` split over the mixture by weight (rounded up per task)."""
  if total < 0:
    raise ConfigError(f"config.data.max_train_examples={total} must be >= 0 (0: all)")
  weight = sum(w for _, w in tasks)
  return [int(np.ceil(total * w / weight)) for _, w in tasks]


def train_subset(num_records: int, task: str, share: int, seed: int) -> np.ndarray:
  """The indices of `task`'s training subset: the first `share` of a permutation fixed by (`seed`,
  task name). The same seed gives the same subset, and a smaller subset lies inside a larger one,
  so a sweep over the amount of data nests its training sets."""
  if share > num_records:
    logging.warning("config.data.max_train_examples asks %d examples of %s, which has %d: using "
                    "all of them", share, task, num_records)
  order = np.random.default_rng([seed, zlib.crc32(task.encode())]).permutation(num_records)
  return np.sort(order[:share])


class _Subset:
  """Records restricted to `indices` (a random-access source for grain)."""

  def __init__(self, records, indices: np.ndarray):
    self._records, self._indices = records, indices

  def __len__(self) -> int:
    return len(self._indices)

  def __getitem__(self, i: int):
    return self._records[int(self._indices[i])]

  def __getitems__(self, rows: Sequence[int]):
    return self._records.__getitems__([int(self._indices[i]) for i in rows])

  def error(self, i: int, reason: str):
    return self._records.error(int(self._indices[i]), reason)


def _hard_negatives(config, task: str, corpus: _Corpus) -> Optional[dict[str, list[int]]]:
  """`config.data.hard_negatives_dir/<task>_rankings.jsonl` (the eval binary's rankings: one
  `{"question_id", "passage_ids": [best first]}` per line), top `hard_negatives_depth` kept as
  corpus indices; None when the folder is unset or has no file for `task`. A folder that does not
  exist is an error (a typo would quietly train without the mined negatives)."""
  key = "config.data.hard_negatives_dir"
  folder = config.data.hard_negatives_dir
  if not folder:
    return None
  folder = storage.path(folder, key)
  storage.must_exist(folder, key)
  path = layout.rankings_path(folder, task)
  if not path.exists():
    logging.info("%s: no %s, so no hard negatives for it", task, path)
    return None
  depth = require_int("data.hard_negatives_depth", config.data.hard_negatives_depth, 0,
                      " (0: all)") or None
  mined = {}
  with path.open() as f:
    for line_number, line in enumerate(f, 1):
      try:
        row = json.loads(line)
        ids = [str(i) for i in row["passage_ids"][:depth]]
        qid = str(row["question_id"])
      except (ValueError, KeyError, TypeError) as e:
        raise BadFile(f"{path}:{line_number}: not a rankings line ({e!r}); expected "
                      '{"question_id": ..., "passage_ids": [...]}') from None
      unknown = [i for i in ids if i not in corpus.index]
      if unknown:  # rankings of another split or build would train on the wrong passages
        raise BadFile(
            f"{path}:{line_number}: passage_ids holds {unknown[:3]}, not in {task}'s train "
            "corpus: mine from the eval binary's rankings of this build's train split "
            "(python -m preflmr_jax.evaluate ... --split=train)")
      mined[qid] = [corpus.index[i] for i in ids]
  logging.info("%s: hard negatives for %d queries", path, len(mined))
  return mined


def _seed(seed: int, task: int, stream: int) -> int:
  return int(np.random.SeedSequence([seed, task, stream]).generate_state(1)[0])


def _leave_ctrl_c_to_the_trainer(worker_index: int, worker_count: int) -> None:
  """Grain workers ignore Ctrl-C (sent to the whole process group): the trainer saves its step and
  closes them (preemption.py)."""
  del worker_index, worker_count
  signal.signal(signal.SIGINT, signal.SIG_IGN)


class M2KRIterator:
  """This host's training batches (the `preflmr_jax.data` iterator protocol).

  The state is the number of global batches taken, the same on every host and for any number of
  hosts or workers: a run resumes with the same stream on a pod of another size.
  """

  def __init__(self, config, model_config, tokenizer=None, *, process_index: int = 0,
               process_count: int = 1):
    if tokenizer is None:
      tokenizer = tokenization.tokenizer_from_config(config.tokenizer)
    self._workers = require_int("data.num_workers", config.data.num_workers, 0)
    self._prefetch = require_int("data.prefetch_batches", config.data.prefetch_batches, 0)
    self._batches = _host_batches(config, model_config, tokenizer, process_index=process_index,
                                  process_count=process_count)
    self._bad = _BadRecords(max_bad_records(config))
    self._step, self._it = 0, None

  def _open(self):
    ds = self._batches[self._step:].to_iter_dataset(grain.ReadOptions(
        num_threads=self._prefetch, prefetch_buffer_size=self._prefetch))
    if self._workers:
      if not flags.FLAGS.is_parsed():  # grain's workers read its absl flags; outside an absl app
        flags.FLAGS.mark_as_parsed()   # (tests, notebooks) their defaults stand
      ds = ds.mp_prefetch(grain.multiprocessing.MultiprocessingOptions(
          num_workers=self._workers), worker_init_fn=_leave_ctrl_c_to_the_trainer)
    return iter(ds)

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._it is None:  # opened lazily: set_state before the first batch starts no workers
      self._it = self._open()
    batch = next(self._it)
    self._bad.add(batch.pop(_BAD))
    self._step += 1
    return batch

  def get_state(self) -> dict:
    return {"source": SOURCE, "step": self._step}

  def set_state(self, state: dict) -> None:
    ok = isinstance(state, dict) and state.get("source") == SOURCE
    step = state.get("step") if ok else None
    if not isinstance(step, (int, np.integer)) or step < 0:
      raise ValueError(f"not a {SOURCE!r} data iterator state: {state!r}")
    self.close()
    self._step = int(step)

  def close(self) -> None:
    close = getattr(self._it, "close", None)
    if close is not None:
      close()
    self._it = None


__all__ = ["M2KRIterator", "cache_root", "parse_tasks", "resolve_data_dir"]
