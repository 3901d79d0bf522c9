"""M2KR's TFDS builds, read: task names, where a build lives, random access to its records.

The builds (`m2kr_build.py`, run by `prepare.py`) are two TFDS builders, `m2kr_queries` and
`m2kr_passages`, one config per task, written as array_record under
`<data_dir>/m2kr_{queries,passages}/<TASK>/<VERSION>/`, records in the source order. Reading needs
no TensorFlow and never imports the build code.

  queries = load_queries(data_dir, "OVEN", "test")   # len(), [i] -> dict (QUERY_KEYS)
  passages = load_passages(data_dir, "OVEN", "test")  # the "test_passages" corpus

Query records: question_id, question, instruction (str), image (bytes of an encoded image that
PIL opens; b"" for text-only queries), pos_item_ids, answers (list[str]). Passage records:
passage_id, passage_content (str). Queries of split X are retrieved from passage split
`PASSAGE_SPLITS[X]` = "X_passages".

A damaged build is never read as data. Opening a split checks each shard file against the build:
present, of the size recorded in metadata.json (`shard_bytes`), holding the record count of
dataset_info.json; otherwise `DamagedBuildError`. A record whose chunk fails its hash, that does
not decode, or that lacks a field raises `CorruptRecordError`. Both name the file (and record) and
the prepare command that rebuilds the task.
"""

from __future__ import annotations

import bisect
import concurrent.futures
import json
import os
from collections.abc import Sequence
from typing import Optional, Union

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from preflmr_jax import metrics, storage, user_errors
from preflmr_jax.data import tasks as tasks_lib

PathLike = Union[str, os.PathLike]

# Task -> folder prefix of the published export (BByrneLab/multi_task_multi_modal_knowledge_
# retrieval_benchmark_M2KR; FLMR's example_use_preflmr.py loads "<prefix>_data"). SAMPLE is
# the small synthetic task written by `preflmr_jax.data.sample`.
TASKS = {
    "WIT": "WIT",
    "IGLUE": "IGLUE",
    "KVQA": "KVQA",
    "CC3M": "CC",
    "MSMARCO": "MSMARCO",
    "OVEN": "OVEN",
    "LLaVA": "LLaVA",
    "OKVQA": "OKVQA",
    "Infoseek": "Infoseek",
    "E-VQA": "EVQA",
    "SAMPLE": "SAMPLE",
}
SPLITS = ("train", "valid", "test")
TRAIN_SPLIT = "train"
PASSAGE_SPLITS = {split: f"{split}_passages" for split in SPLITS}

QUERY_KEYS = ("question_id", "question", "instruction", "image", "pos_item_ids", "answers")
PASSAGE_KEYS = ("passage_id", "passage_content")

# 1.1.0: evaluation splits keep queries whose positives are not in their corpus (1.0.0 dropped them).
VERSION = "1.1.0"
REPORT_FILE = "m2kr_prepare_report.json"
# The TFDS names of `m2kr_build`'s builders (from their class names): the folders of the builds.
BUILDER_NAMES = {"queries": "m2kr_queries", "passages": "m2kr_passages"}
_PREPARE = ("python -m preflmr_jax.data.prepare --source DIR --image_root DIR --tasks {task} "
            "--data_dir {data_dir}")


# ---------------------------------------------------------------------------
# Tasks and splits.
# ---------------------------------------------------------------------------


def canonical_task(name: str, data_dir: Optional[PathLike] = None) -> str:
  """The `TASKS` key for a task name or folder prefix, any case ("evqa", "E-VQA", "cc"), or the
  name of a user's task described in `data_dir` (`tasks.py`)."""
  wanted = name.strip().lower()
  for task, prefix in TASKS.items():
    if wanted in (task.lower(), prefix.lower()):
      return task
  if data_dir is not None and tasks_lib.described(data_dir, name.strip()) is not None:
    return name.strip()
  where = f" nor described in {os.fspath(data_dir)}" if data_dir is not None else ""
  raise ValueError(f"unknown M2KR task {name!r}: not one of {sorted(TASKS)}{where}; a task of "
                   "your own needs a <NAME>_task.json in the source folder (or prepare's "
                   "--task_type and --headline) when it is prepared")


def task_headline(data_dir: PathLike, task: str) -> str:
  """The metric results put first for `task`: the published one, or its description's."""
  return metrics.HEADLINE[task] if task in TASKS else tasks_lib.described(data_dir, task)["headline"]


def task_type(data_dir: PathLike, task: str) -> Optional[str]:
  """A user's task's type (`tasks.TYPES`); None for a published task (typed by name)."""
  return None if task in TASKS else tasks_lib.described(data_dir, task)["type"]


def passage_split(split: str) -> str:
  """The passage split a query split is retrieved from ("test" -> "test_passages")."""
  if split in PASSAGE_SPLITS.values():
    return split
  if split not in PASSAGE_SPLITS:
    raise ValueError(f"unknown split {split!r}; expected one of {SPLITS} or "
                     f"{tuple(PASSAGE_SPLITS.values())}")
  return PASSAGE_SPLITS[split]


# ---------------------------------------------------------------------------
# Errors.
# ---------------------------------------------------------------------------


class NotBuiltError(user_errors.UserError, FileNotFoundError):
  """A task or split that is not in data_dir."""


class DamagedBuildError(user_errors.UserError, ValueError):
  """A built shard that does not match what the build wrote (missing, truncated, resized)."""


class CorruptRecordError(user_errors.UserError, ValueError):
  """One built record that cannot be read or decoded: record `position` of the shard `file`."""

  def __init__(self, task: str, file: str, position: int, reason: str, hint: str):
    self.task, self.file, self.position, self.reason, self.hint = task, file, position, reason, hint
    super().__init__(f"M2KR {task}: {file} record {position}: {reason}; {hint}")

  def __reduce__(self):  # made in grain workers, unpickled in the main process
    return type(self), (self.task, self.file, self.position, self.reason, self.hint)


# ---------------------------------------------------------------------------
# Reading.
# ---------------------------------------------------------------------------


def dataset_dir(data_dir: PathLike, task: str, kind: str) -> str:
  """Where the built `kind` ("queries" / "passages") of `task` lives."""
  return os.path.join(os.fspath(data_dir), BUILDER_NAMES[kind], canonical_task(task, data_dir),
                      VERSION)


def read_metadata(path: str) -> dict:
  """A build's metadata.json ({} when absent or unreadable)."""
  try:
    return json.loads((epath.Path(path) / "metadata.json").read_text())
  except (OSError, ValueError):
    return {}


class Records(Sequence):
  """Random access to built records as plain Python values (str, bytes, list[str]).

  `len(records)`, `records[i]`, and `records.__getitems__(indices)` (batched reads, as grain
  uses them). Picklable, for grain workers. A record that cannot be read (its chunk's hash does
  not match) or decoded, or that lacks a field, raises `CorruptRecordError` naming its shard
  file and position; `error(i, reason)` makes that error for record `i` (the input pipeline's
  reason: an undecodable image).
  """

  def __init__(self, source, text_keys: Sequence[str], list_keys: Sequence[str], path: str,
               task: str, shards: Sequence[tuple[str, int]], hint: str):
    self._source = source
    self._text_keys = tuple(text_keys)
    self._list_keys = tuple(list_keys)
    self.path, self.task, self._hint = path, task, hint
    self._files = [f for f, _ in shards]
    self._starts = np.cumsum([0] + [n for _, n in shards])[:-1].tolist()

  def __len__(self) -> int:
    return len(self._source)

  def where(self, index) -> tuple[str, int]:
    """(shard file, position in it) of record `index`."""
    i = self._index(index)
    shard = bisect.bisect_right(self._starts, i) - 1
    return self._files[shard], i - self._starts[shard]

  def error(self, index, reason: str) -> CorruptRecordError:
    """The error for record `index`, which does not decode for `reason`."""
    return CorruptRecordError(self.task, *self.where(index), reason, self._hint)

  def _convert(self, i: int, raw: bytes) -> dict:
    if not raw:  # what array_record returns for a record it does not have
      raise self.error(i, "empty record")
    try:
      out = self._source.dataset_info.features.deserialize_example_np(raw)
    except Exception as e:  # pylint: disable=broad-except  (protobuf's DecodeError, TFDS's)
      raise self.error(i, f"does not decode ({type(e).__name__}: {e})") from None
    missing = [k for k, v in out.items() if v is None]
    if missing:  # str(None) would be the text "None"
      raise self.error(i, f"no {', '.join(sorted(missing))}")
    try:
      for key in self._text_keys:
        value = out[key]
        out[key] = value.decode("utf-8") if isinstance(value, bytes) else str(value)
      for key in self._list_keys:
        out[key] = [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in out[key]]
    except UnicodeDecodeError as e:
      raise self.error(i, f"invalid UTF-8 ({e})") from None
    if "image" in out:
      out["image"] = bytes(out["image"])
    return out

  def _index(self, index) -> int:
    i = int(index)
    n = len(self._source)
    if i < 0:
      i += n
    if not 0 <= i < n:
      raise IndexError(f"record {index} out of range for {n} records ({self.path})")
    return i

  def _read(self, indices: list[int]) -> list[bytes]:
    # The bytes from array_record, decoded in `_convert`: a read error and a decode error are
    # then told apart, and each is attributed to its record.
    source = self._source.data_source
    try:
      return list(source.__getitems__(indices))
    except RuntimeError:
      pass  # one record is unreadable: read them one by one to name it
    raws = []
    for i in indices:
      try:
        raws.append(source[i])
      except RuntimeError as e:
        # Riegeli's data-loss errors ("Corrupted Riegeli/records file: chunk data hash mismatch")
        # belong to the record; any other (an I/O failure) is raised as it is.
        if "Corrupted" not in str(e):
          raise
        raise self.error(i, str(e).splitlines()[0]) from None
    return raws

  def __getitem__(self, index):
    if isinstance(index, slice):
      return [self[i] for i in range(*index.indices(len(self)))]
    i = self._index(index)
    return self._convert(i, self._read([i])[0])

  def __getitems__(self, indices: Sequence[int]) -> list[dict]:
    indices = [self._index(i) for i in indices]
    return [self._convert(i, raw) for i, raw in zip(indices, self._read(indices))]


def _check_shards(builder: tfds.core.DatasetBuilder, split: str, what: str,
                  rebuild: str) -> list[tuple[str, int]]:
  """The split's (shard file, records), each checked against what the build wrote: present, of
  the size recorded in metadata.json (builds that recorded it), holding the record count of
  dataset_info.json. A shard truncated at a block boundary opens without an error as zero
  records while TFDS still reports the recorded length: the count is read from each file's own
  index (its footer, which array_record reads anyway to open it)."""
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  info = builder.info.splits[split]
  files = [os.fspath(f) for f in info.filepaths]
  counts = [int(n) for n in info.shard_lengths]
  sizes = (read_metadata(os.fspath(builder.data_dir)).get("splits", {}).get(split, {})
           .get("shard_bytes") or [None] * len(files))

  def problem(k: int) -> Optional[str]:
    path = epath.Path(files[k])
    if not path.exists():
      return "missing"
    size = path.stat().length
    if sizes[k] is not None and size != sizes[k]:
      return f"{size} bytes, the build wrote {sizes[k]}"
    try:
      reader = array_record_module.ArrayRecordReader(files[k], "readahead_buffer_size:0")
      found = reader.num_records()
      reader.close()  # raises when the reader met an error on the way
    except RuntimeError as e:
      return f"unreadable ({(str(e).splitlines() or ['no record index'])[0]})"
    if found != counts[k]:
      return f"{found} records, the build wrote {counts[k]}"
    return None

  with concurrent.futures.ThreadPoolExecutor(min(16, len(files)) or 1) as pool:
    for k, bad in enumerate(pool.map(problem, range(len(files)))):
      if bad:
        raise DamagedBuildError(f"{what}: {files[k]}: {bad}; the build is damaged: {rebuild}")
  return list(zip(files, counts))


def _load(data_dir: PathLike, task: str, kind: str, split: str, text_keys: Sequence[str],
          list_keys: Sequence[str]) -> Records:
  task = canonical_task(task, data_dir)
  path = dataset_dir(storage.path(data_dir, "data_dir"), task, kind)
  command = _PREPARE.format(task=task, data_dir=os.fspath(data_dir))
  hint = f"run {command}"
  if not (epath.Path(path) / "dataset_info.json").exists():
    if task == "SAMPLE":  # written, not prepared from a download
      hint = ("leave config.data.data_dir (or the eval binary's --data_dir) unset: the sample is "
              "built on first use; or build it there: python -m preflmr_jax.data.sample --out DIR "
              f"--data_dir {os.fspath(data_dir)}")
    raise NotBuiltError(f"M2KR {task} {kind} are not built in data_dir={os.fspath(data_dir)!r} "
                        f"(no {path}): {hint}")
  builder = tfds.builder_from_directory(path)
  if split not in builder.info.splits:
    built = sorted(builder.info.splits)
    raise NotBuiltError(f"M2KR {task} {kind} split {split!r} is not built in "
                        f"data_dir={os.fspath(data_dir)!r} (built: {built}; the source may lack "
                        f"it, or every record was skipped: see {REPORT_FILE}): {hint}")
  rebuild = f"rebuild it: {command} --overwrite"
  shards = _check_shards(builder, split, f"M2KR {task} {kind} {split}", rebuild)
  return Records(builder.as_data_source(split=split), text_keys, list_keys,
                 os.fspath(builder.data_dir), task, shards, rebuild)


def load_queries(data_dir: PathLike, task: str, split: str) -> Records:
  """The queries of `task`'s `split` ("train" / "valid" / "test"): records with `QUERY_KEYS`.

  Raises `NotBuiltError` for what is not built and `DamagedBuildError` for a shard that does not
  match the build (both name the file and the prepare command)."""
  if split not in SPLITS:
    raise ValueError(f"unknown query split {split!r}; expected one of {SPLITS}")
  return _load(data_dir, task, "queries", split, ("question_id", "question", "instruction"),
               ("pos_item_ids", "answers"))


def load_passages(data_dir: PathLike, task: str, split: str) -> Records:
  """The passage corpus for query split `split` ("test" or "test_passages"): `PASSAGE_KEYS`.
  Errors as `load_queries`."""
  return _load(data_dir, task, "passages", passage_split(split), PASSAGE_KEYS, ())
