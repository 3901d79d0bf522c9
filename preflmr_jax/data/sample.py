"""A small M2KR-format folder (task SAMPLE) with a learnable signal, for smoke runs and tests.

  python -m preflmr_jax.data.sample --out /tmp/m2kr_sample [--data_dir /tmp/m2kr_tfds]

writes, in the published layout:

  OUT/SAMPLE_data/{train,valid,test}-00000-of-00001.parquet
  OUT/SAMPLE_passages/{train,valid,test}_passages-00000-of-00001.parquet
  OUT/images/<split>/<class>_<k>.png       (img_path is relative to OUT/images)
  OUT/sample.json                          (the parameters; written last)

The task is the synthetic one (`data/synthetic.py`): 64 colour x shape classes, one passage
each (`SAMPLE_p00` .. `SAMPLE_p63`, the same corpus in every passage split). A query is the
class's shape drawn in its colour plus a synthetic question and instruction; its positive is
its class passage, and its answer is a phrase of that passage found in no other (so
PseudoRecall agrees with Recall). The folder appears complete or not at all (written
aside, then renamed), and the output depends only on the parameters.

`ensure_sample(out_dir, data_dir)` writes the folder if absent and builds it into data_dir
with `m2kr_build.build` if not built; concurrent callers wait on a file lock.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import json
import os
import shutil
import tempfile
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from preflmr_jax.data import m2kr, m2kr_build, synthetic

TASK = "SAMPLE"
QUERIES_PER_CLASS = {"train": 24, "valid": 2, "test": 4}
DEFAULT_IMAGE_SIZE = 64
IMAGES = "images"
MARKER = "sample.json"


def passage_id(class_id: int) -> str:
  return f"{TASK}_p{class_id:02d}"


@functools.lru_cache(maxsize=None)
def answer(class_id: int) -> str:
  """A phrase naming the class that its passage contains and no other passage does.

  "red box" alone would also match "dark red box": the candidates carry the words around
  the colour and shape in the synthetic passage templates.
  """
  corpus = _corpus()
  colour = synthetic.COLOURS[synthetic.class_colour(class_id)][0]
  shape = synthetic.SHAPES[synthetic.class_shape(class_id)]
  candidates = (f"the {colour} {shape}", f"a {shape} with a {colour} color",
                f"a {shape} in {colour}.", f"this {shape} is {colour}.")
  for phrase in candidates:
    hits = [c for c, text in enumerate(corpus) if phrase in text.lower()]
    if hits == [class_id]:
      return phrase
  raise AssertionError(f"no phrase of the synthetic passage of {synthetic.class_name(class_id)!r} "
                       f"is unique to it: {corpus[class_id]!r}")


@functools.lru_cache(maxsize=None)
def _corpus() -> tuple[str, ...]:
  return tuple(synthetic.passages())


def _queries(split: str, count: int, seed: int, image_size: int, images_dir: str) -> pa.Table:
  rows = {name: [] for name in ("question_id", "question", "instruction", "img_path",
                                "pos_item_ids", "answers")}
  stream = m2kr.SPLITS.index(split)
  for k in range(count):  # k-major: any prefix of the file covers every class.
    for class_id in range(synthetic.NUM_CLASSES):
      rng = np.random.default_rng([seed, stream, class_id, k])
      image = synthetic.draw_image(class_id, rng, image_size)
      question, instruction = synthetic.make_question(class_id, rng)
      img_path = f"{split}/{class_id:02d}_{k:02d}.png"
      image.save(os.path.join(images_dir, img_path), format="PNG")
      rows["question_id"].append(f"{TASK}_{split}_{class_id:02d}_{k:02d}")
      rows["question"].append(question)
      rows["instruction"].append(instruction)
      rows["img_path"].append(img_path)
      rows["pos_item_ids"].append([passage_id(class_id)])
      rows["answers"].append([answer(class_id)])
  return pa.table(rows)


def _passages() -> pa.Table:
  corpus = list(_corpus())
  return pa.table({"passage_id": [passage_id(c) for c in range(len(corpus))],
                   "passage_content": corpus})


def _parameters(seed: int, image_size: int, queries_per_class: dict[str, int]) -> dict:
  return {"task": TASK, "seed": seed, "image_size": image_size,
          "queries_per_class": dict(queries_per_class)}


def write_sample(out_dir: str, *, seed: int = 0, image_size: int = DEFAULT_IMAGE_SIZE,
                 queries_per_class: Optional[dict[str, int]] = None) -> str:
  """Writes the sample folder at `out_dir` (which must not exist, or be empty); returns it."""
  queries_per_class = dict(QUERIES_PER_CLASS if queries_per_class is None else queries_per_class)
  if image_size < 16:
    raise ValueError(f"image_size={image_size} is too small to draw the shapes (>= 16)")
  unknown = set(queries_per_class) - set(m2kr.SPLITS)
  if unknown:
    raise ValueError(f"queries_per_class has unknown splits {sorted(unknown)}; "
                     f"expected some of {m2kr.SPLITS}")
  out_dir = os.path.abspath(out_dir)
  if os.path.exists(out_dir) and os.listdir(out_dir):
    raise FileExistsError(f"{out_dir} exists and is not empty")
  parent = os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
  try:
    data_dir = os.path.join(tmp, f"{TASK}_data")
    passages_dir = os.path.join(tmp, f"{TASK}_passages")
    os.makedirs(data_dir)
    os.makedirs(passages_dir)
    corpus = _passages()
    for split, count in queries_per_class.items():
      if count < 1:
        continue  # No such split, as CC3M has no valid / test.
      os.makedirs(os.path.join(tmp, IMAGES, split))
      table = _queries(split, count, seed, image_size, os.path.join(tmp, IMAGES))
      pq.write_table(table, os.path.join(data_dir, f"{split}-00000-of-00001.parquet"))
      pq.write_table(corpus, os.path.join(passages_dir,
                                          f"{m2kr.passage_split(split)}-00000-of-00001.parquet"))
    with open(os.path.join(tmp, MARKER), "w") as f:
      json.dump(_parameters(seed, image_size, queries_per_class), f, indent=2)
    if os.path.isdir(out_dir):
      os.rmdir(out_dir)  # Empty (checked above): rename needs the name free.
    try:
      os.rename(tmp, out_dir)
    except OSError as e:
      if e.errno in (errno.ENOTEMPTY, errno.EEXIST):  # Another writer finished first.
        raise FileExistsError(f"{out_dir} appeared while writing the sample") from e
      raise
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return out_dir


def ensure_sample(out_dir: str, data_dir: str, *, seed: int = 0,
                  image_size: int = DEFAULT_IMAGE_SIZE,
                  queries_per_class: Optional[dict[str, int]] = None) -> None:
  """Writes the sample folder at `out_dir` unless there, and builds it into `data_dir` unless
  built from it (a different sample there is rebuilt). Safe to call from several processes."""
  wanted = _parameters(seed, image_size, QUERIES_PER_CLASS if queries_per_class is None
                       else queries_per_class)
  os.makedirs(data_dir, exist_ok=True)
  with open(os.path.join(data_dir, ".sample.lock"), "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # Released when the file closes.
    marker = os.path.join(out_dir, MARKER)
    if not os.path.exists(marker):
      try:
        write_sample(out_dir, seed=seed, image_size=image_size,
                     queries_per_class=queries_per_class)
      except FileExistsError:
        if not os.path.exists(marker):  # Not a sample (else: another process wrote it).
          raise
    with open(marker) as f:
      found = json.load(f)
    if found != wanted:
      raise ValueError(f"{out_dir} holds a sample written with {found}, not {wanted}; "
                       f"delete it or pass another folder")
    report = m2kr_build.build(out_dir, os.path.join(out_dir, IMAGES), [TASK], data_dir,
                        rebuild_changed=True)
    if report.skipped or not report.usable:
      raise RuntimeError(f"building the sample in {data_dir} dropped records: "
                         f"{[str(i) for i in report.skipped[:5]]} {report.notes[:5]}")


def main(argv):
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  queries = {split: getattr(f, f"{split}_per_class") for split in m2kr.SPLITS}
  if f.data_dir:
    ensure_sample(f.out, f.data_dir, seed=f.seed, image_size=f.image_size,
                  queries_per_class=queries)
    print(f"sample in {f.out}, built into {f.data_dir}")
  else:
    write_sample(f.out, seed=f.seed, image_size=f.image_size, queries_per_class=queries)
    print(f"sample written to {f.out}")


if __name__ == "__main__":
  from absl import flags  # pylint: disable=g-import-not-at-top
  from preflmr_jax import cli  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("out", None, "Folder to write (must not exist, or be empty).")
  flags.DEFINE_string("data_dir", None, "Also build it there (TFDS), as ensure_sample does.")
  flags.DEFINE_integer("seed", 0, "Seed of the queries (the corpus is fixed).")
  flags.DEFINE_integer("image_size", DEFAULT_IMAGE_SIZE, "Side of the square images, in px.",
                       lower_bound=16)
  for _split, _count in QUERIES_PER_CLASS.items():
    flags.DEFINE_integer(f"{_split}_per_class", _count, f"{_split} queries per class.",
                         lower_bound=1)
  flags.mark_flag_as_required("out")
  cli.run(main, outputs=["out"])
