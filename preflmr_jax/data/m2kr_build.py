"""M2KR's TFDS builds, written: the published parquet export scanned, images repaired, the
builders (`M2krQueries`, `M2krPassages`) and `build`, which `prepare.py` runs. `m2kr.py` reads
the builds.

Input, per task, under a source folder, with images under an image root:

  <PREFIX>_data/{train,valid,test}-*.parquet
      question_id, question, instruction, img_path, pos_item_ids [, answers] (more are ignored)
  <PREFIX>_passages/{train,valid,test}_passages-*.parquet
      passage_id, passage_content

`TASKS` maps task names to folder prefixes. Queries of split X are retrieved from (and their
positives checked against) passage split `PASSAGE_SPLITS[X]` = "X_passages".

  report = build(source_dir, image_root, ["OVEN"], data_dir)   # what prepare.py runs

Bad input never becomes a wrong label silently. Each dropped or changed record is reported
(task, split, id, file, row, reason) in the `BuildReport`:
  skipped:   missing or corrupt image file; a non-JPEG image over PIL's decompression-bomb
             limit; neither question nor image; no positive left in the split's corpus
             (train only: evaluation splits keep such queries, as the official evaluation
             does, and their count is a split-level note);
             duplicated question_id (the first is kept); duplicated passage_id (the first is
             kept, whether the content is identical or not); invalid UTF-8 or a missing id /
             passage text.
  converted: written with a change: positives absent from the corpus dropped (train); an image
             re-encoded as PNG, downscaled (Lanczos, aspect kept: longest side over
             max_image_side, or more pixels than PIL.Image.MAX_IMAGE_PIXELS) and/or turned
             to 8 bit (16-bit / 32-bit / float / LAB / HSV modes, which `image_processing`
             would clip or mis-convert).
  notes:     split-level: a missing split, a file without a required column, a split left with
             no usable record, a reused build whose source changed since.
Grayscale, palette, RGBA and CMYK images are kept byte for byte: `image_processing` converts
them to RGB correctly (transparency composited on white).
"""

from __future__ import annotations

import bisect
import concurrent.futures
import contextlib
import dataclasses
import glob
import hashlib
import io
import json
import logging
import math
import os
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from preflmr_jax import cli, storage
from preflmr_jax.data import m2kr
from preflmr_jax.data.m2kr import (PASSAGE_SPLITS, SPLITS, TASKS, TRAIN_SPLIT, VERSION, PathLike,
                                   canonical_task, dataset_dir, passage_split)

_log = logging.getLogger(__name__)

# Published columns. `answers` is absent from some tasks (CC3M): it then reads as [].
QUERY_COLUMNS = ("question_id", "question", "instruction", "img_path", "pos_item_ids")
OPTIONAL_QUERY_COLUMNS = ("answers",)
PASSAGE_COLUMNS = ("passage_id", "passage_content")

DEFAULT_MAX_IMAGE_SIDE = 2048

# Modes that `image_processing.preprocess_images` turns into the right RGB (checked in
# tests/test_m2kr.py); others are re-encoded at build time.
_PIL_OK_MODES = frozenset({"1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK"})
_BATCH_ROWS = 256


# ---------------------------------------------------------------------------
# Source files.
# ---------------------------------------------------------------------------


def _prefix(task: str) -> str:
  """The source folders' prefix of a canonical task (a user's task: its name)."""
  return TASKS.get(task, task)


_FOLDER = {"queries": "data", "passages": "passages"}


def source_files(source_dir: PathLike, task: str, kind: str, split: str) -> list[str]:
  """Sorted parquet files of one split: `<PREFIX>_data/<split>-*.parquet` (kind "queries") or
  `<PREFIX>_passages/<split>-*.parquet` (kind "passages", split "X_passages")."""
  folder = os.path.join(os.fspath(source_dir), f"{_prefix(task)}_{_FOLDER[kind]}")
  files = glob.glob(os.path.join(glob.escape(folder), f"{split}-*.parquet"))
  # The HF parquet converter's layout, <folder>/<split>/*.parquet, is accepted too.
  files += glob.glob(os.path.join(glob.escape(folder), split, "*.parquet"))
  return sorted(files)


# ---------------------------------------------------------------------------
# The report.
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class Issue:
  """One dropped or changed record (or, with id "", one split-level note)."""
  task: str
  split: str
  id: str
  file: str
  reason: str
  row: Optional[int] = None  # Row in `file` (parquet); None for split-level notes.

  def __str__(self):
    where = self.file if self.row is None else f"{self.file} row {self.row}"
    ident = f" {self.id!r}" if self.id else ""
    return f"{self.task}/{self.split}{ident} ({where}): {self.reason}"


@dataclasses.dataclass
class BuildReport:
  """What `build` wrote and what it dropped or changed, record by record."""
  written: list[dict] = dataclasses.field(default_factory=list)  # task, kind, split, count, path
  skipped: list[Issue] = dataclasses.field(default_factory=list)
  converted: list[Issue] = dataclasses.field(default_factory=list)
  notes: list[Issue] = dataclasses.field(default_factory=list)
  reused: list[dict] = dataclasses.field(default_factory=list)  # task, kind, path

  @property
  def usable(self) -> bool:
    """Whether at least one query split has records (its passage split then has some too)."""
    return any(w["kind"] == "queries" and w["count"] > 0 for w in self.written)

  def extend(self, other: "BuildReport") -> None:
    for field in dataclasses.fields(self):
      getattr(self, field.name).extend(getattr(other, field.name))

  def to_json(self) -> dict:
    return {
        "usable": self.usable,
        "written": self.written,
        "reused": self.reused,
        "notes": [dataclasses.asdict(i) for i in self.notes],
        "skipped": [dataclasses.asdict(i) for i in self.skipped],
        "converted": [dataclasses.asdict(i) for i in self.converted],
    }


class _Skip(Exception):
  """A record that cannot be written; the message is the reason."""


# ---------------------------------------------------------------------------
# Parquet values.
# ---------------------------------------------------------------------------


def _binary_type(t: pa.DataType) -> pa.DataType:
  # Read strings as bytes and decode them here: pyarrow does not validate UTF-8, and a
  # binary column (no UTF8 annotation) must read the same as a string one.
  if pa.types.is_string(t):
    return pa.binary()
  if pa.types.is_large_string(t):
    return pa.large_binary()
  if pa.types.is_string_view(t):
    return pa.binary_view()
  if pa.types.is_dictionary(t):  # E.g. pandas categoricals.
    return _binary_type(t.value_type)
  if pa.types.is_list(t):
    return pa.list_(_binary_type(t.value_type))
  if pa.types.is_large_list(t):
    return pa.large_list(_binary_type(t.value_type))
  return t


def _batches(path: str, columns: Sequence[str]) -> Iterator[tuple[int, dict[str, list]]]:
  """(first row, {column: python values}) per batch; strings come as bytes."""
  file = pq.ParquetFile(path)
  names = set(file.schema_arrow.names)
  present = [c for c in columns if c in names]
  row = 0
  for batch in file.iter_batches(batch_size=_BATCH_ROWS, columns=present):
    values = {}
    for name in present:
      column = batch.column(name)
      values[name] = column.cast(_binary_type(column.type)).to_pylist()
    for name in columns:
      if name not in values:
        values[name] = [None] * batch.num_rows
    yield row, values
    row += batch.num_rows


def _text(value: Any, column: str) -> Optional[str]:
  """A parquet value as str (ids may be ints); None stays None."""
  if value is None or isinstance(value, str):
    return value
  if isinstance(value, bytes):
    try:
      return value.decode("utf-8")
    except UnicodeDecodeError:
      raise _Skip(f"invalid UTF-8 in {column}") from None
  if isinstance(value, bool):
    raise _Skip(f"{column} is a bool, not text")
  if isinstance(value, (int, np.integer)):
    return str(int(value))
  if isinstance(value, float) and value.is_integer():  # Ids written by pandas next to NaNs.
    return str(int(value))
  raise _Skip(f"{column} has a value of type {type(value).__name__}, not text")


def _text_list(value: Any, column: str) -> list[str]:
  if value is None:
    return []
  if isinstance(value, (str, bytes, int, float, np.integer)):
    value = [value]
  texts = [_text(v, column) for v in value]
  return [t for t in texts if t is not None]


def _id_repr(value: Any) -> str:
  """An id for the report, even when it is not valid text."""
  if isinstance(value, bytes):
    return value.decode("utf-8", errors="backslashreplace")
  return "" if value is None else str(value)


def _digest(text: str) -> bytes:
  return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


# ---------------------------------------------------------------------------
# Images.
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class ImageOptions:
  max_image_side: Optional[int] = DEFAULT_MAX_IMAGE_SIDE  # None: no limit on the side.


def _to_8bit(image: Image.Image) -> Image.Image:
  """16-bit, 32-bit int and float grayscale as 8-bit "L" (PIL's convert would clip it)."""
  a = np.asarray(image, dtype=np.float64)
  if image.mode.startswith("I;16"):
    a = a / 257  # The 16-bit range.
  elif image.mode == "F" and a.min() >= 0 and a.max() <= 1:
    a = a * 255
  elif a.min() < 0 or a.max() > 255:  # Another range: stretched.
    a = (a - a.min()) * (255 / max(a.max() - a.min(), 1e-12))
  return Image.fromarray(np.clip(np.round(a), 0, 255).astype(np.uint8), mode="L")


def _normalised_mode(image: Image.Image) -> Image.Image:
  if image.mode in _PIL_OK_MODES:
    if image.mode in ("1", "P", "PA", "CMYK"):
      # Resampling needs a plain mode; keep transparency for `image_processing` to composite.
      has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
      return image.convert("RGBA" if has_alpha else "RGB")
    return image
  if image.mode.startswith("I") or image.mode == "F":
    return _to_8bit(image)
  return image.convert("RGBA" if "A" in image.getbands() else "RGB")


# PIL's decompression-bomb limit is a process global: it is lifted (for huge JPEGs) and read
# only under this lock, which every open in the build takes (opening parses just the header).
_OPEN_LOCK = threading.Lock()


def _open(data: bytes) -> tuple[Image.Image, Optional[int]]:
  """(image, PIL.Image.MAX_IMAGE_PIXELS) for encoded `data`; raises `_Skip` for a bomb.

  Over twice PIL's limit, PIL raises DecompressionBombError. A JPEG can still be decoded at
  1/8 scale (draft mode) with bounded memory, so it is opened without the limit and
  downscaled; any other format would need all of its pixels in memory, and is skipped.
  """
  with _OPEN_LOCK:
    limit = Image.MAX_IMAGE_PIXELS
    try:
      return Image.open(io.BytesIO(data)), limit
    except Image.DecompressionBombError as e:
      bomb = f"image over PIL's decompression-bomb limit: {e}"
    Image.MAX_IMAGE_PIXELS = None
    try:
      image = Image.open(io.BytesIO(data))
    finally:
      Image.MAX_IMAGE_PIXELS = limit
  width, height = image.size
  if image.format != "JPEG" or width * height / 64 > limit:
    image.close()
    raise _Skip(bomb)
  return image, limit


def load_image(path: str, options: ImageOptions) -> tuple[bytes, Optional[str]]:
  """(encoded bytes, conversion note or None) of the image file at `path`; raises `_Skip`.

  The file's own bytes when `image_processing` can use them as they are; otherwise a PNG
  (downscaled with Lanczos, aspect ratio kept, and/or converted to 8 bit).
  """
  try:
    with open(path, "rb") as f:
      data = f.read()
  except FileNotFoundError:
    raise _Skip("image file missing") from None
  except OSError as e:
    raise _Skip(f"image file unreadable: {e}") from None
  image = None
  try:
    image, limit = _open(data)
    width, height = image.size
    if width < 1 or height < 1:
      raise _Skip(f"image has an empty side: {width}x{height}")
    scale = 1.0
    if options.max_image_side and max(width, height) > options.max_image_side:
      scale = options.max_image_side / max(width, height)
    if limit and width * height > limit:
      # Stay under PIL's limit so that readers never see a DecompressionBombWarning.
      scale = min(scale, math.sqrt(limit / (width * height)))
    size = (max(1, int(width * scale)), max(1, int(height * scale)))
    reasons = []
    if image.mode not in _PIL_OK_MODES:
      reasons.append(f"mode {image.mode} to 8-bit")
    if scale < 1:
      reasons.append(f"downscaled from {width}x{height} to {size[0]}x{size[1]}")
    if not reasons:
      # Decode everything to catch truncated or corrupt files; a JPEG decodes at 1/8 scale
      # (all of the data is still read) as the pixels are not used.
      image.draft(None, (max(1, width // 8), max(1, height // 8)))
      image.load()
      return data, None
    if scale < 1:
      image.draft(None, size)  # JPEG: decode at the smallest scale >= size.
    image.load()
    out = _normalised_mode(image)
    if out.size != size:
      out = out.resize(size, resample=Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    out.save(buffer, format="PNG")
    return buffer.getvalue(), "image re-encoded as PNG: " + ", ".join(reasons)
  except Image.DecompressionBombError as e:  # From a later frame or plugin check.
    raise _Skip(f"image over PIL's decompression-bomb limit: {e}") from None
  except (OSError, ValueError, SyntaxError, EOFError, IndexError, TypeError) as e:
    raise _Skip(f"corrupt image: {type(e).__name__}: {e}") from None
  finally:
    if image is not None:
      image.close()


# ---------------------------------------------------------------------------
# Passages: one scan (validity, duplicates, the id index), then the writing pass.
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class _PassageScan:
  drop: dict[int, str]  # Global row -> why it is not written.
  ids: np.ndarray  # Sorted unique 16-byte digests of the written passage ids.

  def contains(self, passage_ids: Sequence[str]) -> list[bool]:
    if not passage_ids or not len(self.ids):
      return [False] * len(passage_ids)
    wanted = np.array([_digest(p) for p in passage_ids], dtype="S16")
    at = np.minimum(np.searchsorted(self.ids, wanted), len(self.ids) - 1)
    return (self.ids[at] == wanted).tolist()


def _passage_rows(files: Sequence[str]) -> Iterator[tuple[int, str, int, dict[str, list], int]]:
  """(global row, file, row in file, batch values, index in batch) for every passage row."""
  start = 0
  for path in files:
    rows = 0
    for first, values in _batches(path, PASSAGE_COLUMNS):
      n = len(values["passage_id"])
      for i in range(n):
        yield start + first + i, path, first + i, values, i
      rows = first + n
    start += rows


def _passage(values: dict[str, list], i: int) -> tuple[str, str]:
  pid = _text(values["passage_id"][i], "passage_id")
  if pid is None or not pid.strip():
    raise _Skip("missing passage_id")
  content = _text(values["passage_content"][i], "passage_content")
  if content is None:
    raise _Skip("missing passage_content")
  return pid, content


def _scan_passages(files: Sequence[str]) -> _PassageScan:
  """Which rows of a passage split are written, and the index of the written ids.

  Digests (16-byte blake2b) keep this at ~40 bytes a passage: MSMARCO's 8.8M fit easily.
  """
  drop = {}
  id_digests, content_digests, valid = bytearray(), bytearray(), bytearray()
  starts = []  # (first global row, file): where a kept duplicate is, for the report.
  for row, path, file_row, values, i in _passage_rows(files):
    if file_row == 0:
      starts.append((row, path))
    try:
      pid, content = _passage(values, i)
    except _Skip as e:
      drop[row] = str(e)
      valid.append(0)
      id_digests += bytes(16)
      content_digests += bytes(16)
    else:
      valid.append(1)
      id_digests += _digest(pid)
      content_digests += _digest(content)
  ids = np.frombuffer(bytes(id_digests), dtype="S16")
  contents = np.frombuffer(bytes(content_digests), dtype="S16")
  keep = np.frombuffer(bytes(valid), dtype=np.uint8).astype(bool)
  rows = np.flatnonzero(keep)
  if len(rows):
    order = rows[np.argsort(ids[rows], kind="stable")]
    sorted_ids = ids[order]
    first = np.ones(len(order), dtype=bool)
    first[1:] = sorted_ids[1:] != sorted_ids[:-1]
    group_start = np.maximum.accumulate(np.where(first, np.arange(len(order)), 0))
    for k in np.flatnonzero(~first):
      row, kept = int(order[k]), int(order[group_start[k]])
      keep[row] = False
      same = contents[row] == contents[kept]
      start, path = starts[bisect.bisect_right(starts, (kept, "\uffff")) - 1]
      drop[row] = (f"duplicate passage_id, {'identical' if same else 'different'} content: "
                   f"kept the first ({os.path.basename(path)} row {kept - start})")
  kept_ids = np.unique(ids[keep])
  return _PassageScan(drop=drop, ids=kept_ids)


# ---------------------------------------------------------------------------
# TFDS builders.
# ---------------------------------------------------------------------------

_CONFIGS = [tfds.core.BuilderConfig(name=task, description=f"M2KR {task} "
                                    f"({_prefix(task)}_data / {_prefix(task)}_passages)")
            for task in TASKS]


class _M2krBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Common part: the plan of splits to write, the report, and the source fingerprint."""

  VERSION = tfds.core.Version(VERSION)
  BUILDER_CONFIGS = _CONFIGS
  KIND = ""
  # Nothing is downloaded, so no checksums file; TFDS's lookup of one for a class in a package
  # also imports `importlib_resources`, which TFDS does not install.
  code_path = None

  def __init__(self, *, plan: Optional[dict[str, list[str]]] = None,
               fingerprint: str = "", **kwargs):
    self._plan = plan or {}
    self._fingerprint = fingerprint
    self.report = BuildReport()
    self.counts: dict[str, int] = {}
    super().__init__(**kwargs)

  def _dataset_info(self, features: dict) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=f"M2KR {self.builder_config.name} {self.KIND}, from the published parquet "
                    f"export (preflmr_jax.data.m2kr).",
        features=tfds.features.FeaturesDict(features),
        disable_shuffling=True,  # Source order: reproducible, and eval keeps the file order.
        metadata=tfds.core.MetadataDict(),
    )

  def _download_and_prepare(self, dl_manager, download_config=None):
    super()._download_and_prepare(dl_manager, download_config)
    # Each shard's size, checked when the build is opened (`_check_shards`); the files are still
    # in TFDS's temporary folder here, so the sizes land in metadata.json with the rest.
    for name, split in self.info.splits.items():
      self.info.metadata["splits"][name]["shard_bytes"] = [
          epath.Path(f).stat().length for f in split.filepaths]

  def _split_generators(self, dl_manager):
    del dl_manager  # Local files only.
    self.info.metadata.update({"source_fingerprint": self._fingerprint, "splits": {}})
    return {split: self._generate_examples(split, files) for split, files in self._plan.items()}

  def _issue(self, kind: str, split: str, ident: str, file: str, reason: str,
             row: Optional[int] = None) -> None:
    getattr(self.report, kind).append(Issue(self.builder_config.name, split, ident, file,
                                            reason, row))

  def _finish_split(self, split: str, files: Sequence[str], count: int) -> None:
    self.counts[split] = count
    task = self.builder_config.name
    skipped = sum(i.split == split for i in self.report.skipped)
    converted = sum(i.split == split for i in self.report.converted)
    self.info.metadata["splits"][split] = {"files": list(files), "count": count,
                                           "skipped": skipped, "converted": converted}
    if skipped or converted:
      _log.warning("M2KR %s %s %s: %d written, %d skipped, %d converted", task, self.KIND, split,
                   count, skipped, converted)


class M2krPassages(_M2krBuilder):
  """M2KR passage corpora: splits train_passages / valid_passages / test_passages."""

  KIND = "passages"

  def __init__(self, *, scans: Optional[dict[str, _PassageScan]] = None, **kwargs):
    self._scans = {} if scans is None else scans  # Shared with the query builder.
    super().__init__(**kwargs)

  def _info(self):
    return self._dataset_info({"passage_id": tfds.features.Text(),
                               "passage_content": tfds.features.Text()})

  def _generate_examples(self, split, files):
    scan = self._scans.get(split)
    if scan is None:
      scan = self._scans[split] = _scan_passages(files)
    count = 0
    for row, path, file_row, values, i in _passage_rows(files):
      if row in scan.drop:
        self._issue("skipped", split, _id_repr(values["passage_id"][i]), path, scan.drop[row],
                    file_row)
        continue
      pid, content = _passage(values, i)
      count += 1
      yield pid, {"passage_id": pid, "passage_content": content}
    self._finish_split(split, files, count)


class M2krQueries(_M2krBuilder):
  """M2KR queries: splits train / valid / test, positives checked against X_passages."""

  KIND = "queries"

  def __init__(self, *, image_root: Optional[PathLike] = None,
               scan_for: Optional[Callable[[str], _PassageScan]] = None,
               image_options: Optional[ImageOptions] = None, num_workers: Optional[int] = None,
               **kwargs):
    self._image_root = None if image_root is None else os.fspath(image_root)
    self._scan_for = scan_for
    self._image_options = image_options or ImageOptions()
    self._num_workers = num_workers or min(8, os.cpu_count() or 1)
    super().__init__(**kwargs)

  def _info(self):
    text = tfds.features.Text
    return self._dataset_info({
        "question_id": text(),
        "question": text(),
        "instruction": text(),
        # Encoded image bytes, b"" for text-only queries; decoded by the input pipeline.
        "image": tfds.features.Tensor(shape=(), dtype=np.object_),
        "pos_item_ids": tfds.features.Sequence(text()),
        "answers": tfds.features.Sequence(text()),
    })

  def _query(self, split: str, scan: _PassageScan, values: dict[str, list], i: int,
             seen: dict[str, tuple[str, int]], where: tuple[str, int]
             ) -> tuple[dict, Optional[str], list[str]]:
    """(example without image, image path or None, positives dropped); raises `_Skip`."""
    qid = _text(values["question_id"][i], "question_id")
    if qid is None or not qid.strip():
      raise _Skip("missing question_id")
    if qid in seen:
      path, row = seen[qid]
      raise _Skip(f"duplicate question_id: kept the first ({os.path.basename(path)} row {row})")
    seen[qid] = where
    question = _text(values["question"][i], "question") or ""
    instruction = _text(values["instruction"][i], "instruction") or ""
    img_path = (_text(values["img_path"][i], "img_path") or "").strip()
    positives = _text_list(values["pos_item_ids"][i], "pos_item_ids")
    answers = _text_list(values["answers"][i], "answers")
    if not img_path and not question.strip():
      raise _Skip("neither a question nor an image")
    found = scan.contains(positives)
    missing = [p for p, ok in zip(positives, found) if not ok]
    if split == TRAIN_SPLIT:  # nothing to learn from a positive the corpus lacks
      positives = [p for p, ok in zip(positives, found) if ok]
      if not positives:
        raise _Skip(f"no positive in {passage_split(split)}: {missing}" if missing
                    else "no pos_item_ids")
    elif not positives:
      raise _Skip("no pos_item_ids")
    # Evaluation keeps its queries as published: a positive outside the corpus is a Recall miss.
    example = {"question_id": qid, "question": question, "instruction": instruction,
               "pos_item_ids": positives, "answers": answers}
    if not img_path:
      return example, None, missing
    if self._image_root is None:
      raise _Skip("has an img_path but no image root was given")
    return example, os.path.join(self._image_root, img_path), missing

  def _generate_examples(self, split, files):
    scan = self._scan_for(passage_split(split))
    seen: dict[str, tuple[str, int]] = {}
    count = unmatched = 0
    pool = concurrent.futures.ThreadPoolExecutor(self._num_workers)
    try:
      for path in files:
        for first, values in _batches(path, QUERY_COLUMNS + OPTIONAL_QUERY_COLUMNS):
          ready = []
          for i in range(len(values["question_id"])):
            row = first + i
            try:
              example, image_path, missing = self._query(split, scan, values, i, seen,
                                                         (path, row))
            except _Skip as e:
              self._issue("skipped", split, _id_repr(values["question_id"][i]), path, str(e),
                          row)
              continue
            ready.append((row, example, image_path, missing))
          # Image checks decode whole files: threads (PIL releases the GIL) keep up with IO.
          images = pool.map(self._image, [r[2] for r in ready])
          for (row, example, image_path, missing), (image, error) in zip(ready, images):
            qid = example["question_id"]
            if error is not None:
              self._issue("skipped", split, qid, image_path, error, row)
              continue
            image_bytes, note = image
            if note:
              self._issue("converted", split, qid, image_path, note, row)
            if missing and split == TRAIN_SPLIT:
              self._issue("converted", split, qid, path,
                          f"dropped positives not in {passage_split(split)}: {missing}", row)
            unmatched += len(missing) == len(example["pos_item_ids"])
            count += 1
            yield qid, {**example, "image": image_bytes}
    finally:
      pool.shutdown(cancel_futures=True)
    if unmatched and split != TRAIN_SPLIT:
      self._issue("notes", split, "", files[0] if files else "",
                  f"{unmatched} queries have no positive in {passage_split(split)}: kept, each "
                  "counts as a Recall miss")
    self._finish_split(split, files, count)

  def _image(self, path: Optional[str]) -> tuple[Optional[tuple[bytes, Optional[str]]],
                                                 Optional[str]]:
    if path is None:
      return (b"", None), None
    try:
      return load_image(path, self._image_options), None
    except _Skip as e:
      return None, str(e)


_BUILDERS = {"queries": M2krQueries, "passages": M2krPassages}


# ---------------------------------------------------------------------------
# build().
# ---------------------------------------------------------------------------


def _plan(source_dir: PathLike, task: str, kind: str, report: BuildReport
          ) -> dict[str, list[str]]:
  """{split: parquet files} of the splits that exist and have the required columns."""
  splits = SPLITS if kind == "queries" else tuple(PASSAGE_SPLITS.values())
  required = QUERY_COLUMNS if kind == "queries" else PASSAGE_COLUMNS
  plan = {}
  for split in splits:
    files = source_files(source_dir, task, kind, split)
    if not files:
      pattern = os.path.join(f"{_prefix(task)}_{_FOLDER[kind]}", f"{split}-*.parquet")
      _note(report, task, split, os.path.join(os.fspath(source_dir), pattern),
            f"no {kind} files for split {split!r}: skipped")
      continue
    bad = []
    for path in files:
      try:
        names = set(pq.read_schema(path).names)
      except (OSError, pa.ArrowException) as e:
        bad.append((path, f"unreadable parquet file ({e})"))
        continue
      missing = [c for c in required if c not in names]
      if missing:
        bad.append((path, f"missing required column(s) {missing}"))
    for path, reason in bad:
      _note(report, task, split, path, f"{reason}: split {split!r} skipped")
    if not bad:
      plan[split] = files
  return plan


def _note(report: BuildReport, task: str, split: str, file: str, reason: str) -> None:
  report.notes.append(Issue(task, split, "", file, reason))
  _log.warning("M2KR %s/%s: %s (%s)", task, split, reason, file)


def _fingerprint(plan: dict[str, list[str]], source_dir: PathLike, options: dict) -> str:
  """Changes when a planned file changes (name, size, mtime) or a build option does."""
  entries = []
  for split in sorted(plan):
    for path in plan[split]:
      stat = os.stat(path)
      entries.append([split, os.path.relpath(path, source_dir), stat.st_size, stat.st_mtime_ns])
  text = json.dumps({"files": entries, "options": options}, sort_keys=True)
  return hashlib.sha256(text.encode()).hexdigest()


def _built_counts(path: str) -> dict[str, int]:
  info = json.loads((epath.Path(path) / "dataset_info.json").read_text())
  return {s["name"]: sum(int(n) for n in s.get("shardLengths", [])) for s in info.get("splits", [])}


def _build_one(kind: str, task: str, plan: dict[str, list[str]], data_dir: PathLike,
               fingerprint: str, overwrite: bool, rebuild_changed: bool, report: BuildReport,
               **builder_kwargs) -> dict[str, int]:
  """Builds (or reuses) one task's queries or passages; returns {split: count}."""
  path = dataset_dir(data_dir, task, kind)
  if (epath.Path(path) / "dataset_info.json").exists() and not overwrite:
    built = m2kr.read_metadata(path).get("source_fingerprint")
    if built == fingerprint or not rebuild_changed:
      if built != fingerprint:
        _note(report, task, "*", path, f"{kind} already built from a different source or with "
              f"other options; kept as is (rebuild: overwrite / rebuild_changed)")
      report.reused.append({"task": task, "kind": kind, "path": path})
      counts = _built_counts(path)
      earlier = m2kr.read_metadata(path).get("splits", {})
      for split, count in counts.items():
        report.written.append({"task": task, "kind": kind, "split": split, "count": count,
                               "path": path, "reused": True,
                               "skipped_then": earlier.get(split, {}).get("skipped"),
                               "converted_then": earlier.get(split, {}).get("converted")})
      return counts
    overwrite = True
  plan = dict(plan)
  attempt = BuildReport()
  # Object storage has no rename (TFDS writes aside, then renames): build locally, then upload.
  with (tempfile.TemporaryDirectory(prefix="m2kr_build_") if storage.is_remote(data_dir)
        else contextlib.nullcontext(os.fspath(data_dir))) as build_dir:
    counts = _build_into(build_dir, kind, task, plan, fingerprint, overwrite, attempt, report,
                         path, **builder_kwargs)
    if counts and build_dir != os.fspath(data_dir):
      if epath.Path(path).exists():
        epath.Path(path).rmtree()  # an overwritten build is deleted first
      # dataset_info.json last: readers take a folder without it for not built.
      storage.upload_dir(dataset_dir(build_dir, task, kind), epath.Path(path),
                         last=("dataset_info.json",))
  return counts


def _build_into(build_dir: str, kind: str, task: str, plan: dict[str, list[str]],
                fingerprint: str, overwrite: bool, attempt: BuildReport, report: BuildReport,
                path: str, **builder_kwargs) -> dict[str, int]:
  """Runs the TFDS build in the local `build_dir`, dropping splits that turn out empty."""
  while plan:
    config = task if task in TASKS else tfds.core.BuilderConfig(  # a user's task
        name=task, description=f"{task} ({task}_data / {task}_passages)")
    builder = _BUILDERS[kind](config=config, data_dir=build_dir,
                              file_format="array_record", plan=plan, fingerprint=fingerprint,
                              **builder_kwargs)
    mode = (tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS if overwrite
            else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS)
    # TFDS draws progress bars straight to the terminal: only when debugging (--verbosity=1).
    tfds.display_progress_bar(logging.getLogger().isEnabledFor(logging.DEBUG))
    # TFDS prints "Downloading and preparing" lines of its own.
    with tempfile.TemporaryDirectory() as downloads, cli.prints_to_log_file():
      try:
        builder.download_and_prepare(
            download_dir=downloads,
            download_config=tfds.download.DownloadConfig(download_mode=mode))
      except Exception:  # pylint: disable=broad-except
        # TFDS cannot write an empty split: drop the splits where every record was skipped
        # (reported below) and write the others.
        empty = [s for s, n in builder.counts.items() if n == 0]
        if not empty:
          raise
        for split in empty:
          del plan[split]
          _note(attempt, task, split, path, f"no usable {kind} record; split not written")
        attempt.skipped += [i for i in builder.report.skipped if i.split in empty]
        continue
    report.extend(attempt)
    report.extend(builder.report)
    for split, count in builder.counts.items():
      report.written.append({"task": task, "kind": kind, "split": split, "count": count,
                             "path": path, "reused": False})
    return dict(builder.counts)
  report.extend(attempt)
  return {}


def build(source_dir: PathLike, image_root: Optional[PathLike], tasks: Iterable[str],
          data_dir: PathLike, *, overwrite: bool = False, rebuild_changed: bool = False,
          max_image_side: Optional[int] = DEFAULT_MAX_IMAGE_SIDE,
          num_workers: Optional[int] = None) -> BuildReport:
  """Builds the queries and passages of `tasks` from `source_dir` into `data_dir`.

  A task already built is reused as it is (TFDS keeps existing versions), with a note if its
  source files or options changed since; `overwrite=True` rebuilds it, `rebuild_changed=True`
  rebuilds it only when they changed. Images are read under `image_root` (None: text-only
  tasks); `num_workers` threads check them (default min(8, CPUs)).
  """
  report = BuildReport()
  options = {"max_image_side": max_image_side, "version": VERSION}
  for name in tasks:
    task = canonical_task(name, data_dir)
    folders = [os.path.join(os.fspath(source_dir), f"{_prefix(task)}_{f}") for f in _FOLDER.values()]
    if not any(os.path.isdir(f) for f in folders):
      _note(report, task, "*", " / ".join(folders), "task not in the source folder: skipped")
      continue
    passage_plan = _plan(source_dir, task, "passages", report)
    query_plan = _plan(source_dir, task, "queries", report)
    scans: dict[str, _PassageScan] = {}
    passage_counts = _build_one(
        "passages", task, passage_plan, data_dir,
        _fingerprint(passage_plan, source_dir, options), overwrite, rebuild_changed, report,
        scans=scans)
    for split in list(query_plan):
      if not passage_counts.get(passage_split(split)):
        _note(report, task, split, dataset_dir(data_dir, task, "passages"),
              f"no {passage_split(split)} corpus to retrieve from; queries not written")
        del query_plan[split]

    def scan_for(psplit, task=task, scans=scans):
      # Passages reused from an earlier build are scanned from the source again.
      if psplit not in scans:
        scans[psplit] = _scan_passages(source_files(source_dir, task, "passages", psplit))
      return scans[psplit]

    # Positives are checked against the passages: their files count in the fingerprint.
    query_fingerprint = _fingerprint(
        {**query_plan, **{s: passage_plan.get(s, []) for s in map(passage_split, query_plan)}},
        source_dir, options)
    _build_one("queries", task, query_plan, data_dir, query_fingerprint, overwrite,
               rebuild_changed, report, image_root=image_root, scan_for=scan_for,
               image_options=ImageOptions(max_image_side), num_workers=num_workers)
  return report
