"""The SAMPLE M2KR folder: published layout, determinism, answers, atomic writes, ensure_sample."""

import os
import pathlib
import subprocess
import sys
import threading

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from preflmr_jax.data import m2kr, sample, synthetic

ROOT = pathlib.Path(__file__).resolve().parents[1]
SMALL = {"train": 2, "valid": 1, "test": 1}


def _read(folder):
  """{relative path: table or bytes} of a sample folder."""
  out = {}
  for path in sorted(pathlib.Path(folder).rglob("*")):
    if path.is_file():
      rel = str(path.relative_to(folder))
      out[rel] = pq.read_table(path) if path.suffix == ".parquet" else path.read_bytes()
  return out


@pytest.fixture(scope="module")
def small(tmp_path_factory):
  return sample.write_sample(str(tmp_path_factory.mktemp("sample") / "a"),
                             queries_per_class=SMALL)


def test_layout_is_the_published_one(small):
  names = sorted(os.listdir(small))
  assert names == ["SAMPLE_data", "SAMPLE_passages", "images", "sample.json"]
  assert sorted(os.listdir(os.path.join(small, "SAMPLE_data"))) == [
      f"{s}-00000-of-00001.parquet" for s in ("test", "train", "valid")]
  assert sorted(os.listdir(os.path.join(small, "SAMPLE_passages"))) == [
      f"{s}_passages-00000-of-00001.parquet" for s in ("test", "train", "valid")]
  corpus = None
  for split in m2kr.SPLITS:
    queries = pq.read_table(os.path.join(small, "SAMPLE_data", f"{split}-00000-of-00001.parquet"))
    assert queries.schema == pa.schema([
        ("question_id", pa.string()), ("question", pa.string()), ("instruction", pa.string()),
        ("img_path", pa.string()), ("pos_item_ids", pa.list_(pa.string())),
        ("answers", pa.list_(pa.string()))])
    assert queries.num_rows == 64 * SMALL[split]
    rows = queries.to_pylist()
    assert len({r["question_id"] for r in rows}) == len(rows)
    for r in rows:
      image = Image.open(os.path.join(small, sample.IMAGES, r["img_path"]))
      assert image.format == "PNG" and image.size == (64, 64) and image.mode == "RGB"
      assert not os.path.isabs(r["img_path"]) and r["img_path"].startswith(f"{split}/")
      assert r["instruction"] in synthetic.INSTRUCTIONS and r["question"]
    passages = pq.read_table(os.path.join(small, "SAMPLE_passages",
                                          f"{split}_passages-00000-of-00001.parquet"))
    assert passages.column_names == ["passage_id", "passage_content"]
    corpus = passages if corpus is None else corpus
    assert passages.equals(corpus)  # The same corpus in every passage split.
  assert corpus.column("passage_id").to_pylist() == [f"SAMPLE_p{c:02d}" for c in range(64)]
  assert corpus.column("passage_content").to_pylist() == synthetic.passages()


def test_each_query_is_its_class(small):
  rows = pq.read_table(os.path.join(small, "SAMPLE_data", "train-00000-of-00001.parquet"))
  rows = rows.to_pylist()
  per_class = {}
  for r in rows:
    class_id = int(r["pos_item_ids"][0][len("SAMPLE_p"):])
    per_class[class_id] = per_class.get(class_id, 0) + 1
    # The drawn colour (median of the pixels unlike the corner background) is the class's.
    pixels = np.asarray(Image.open(os.path.join(small, sample.IMAGES, r["img_path"])), np.float32)
    fg = np.abs(pixels - pixels[:1, :1]).sum(-1) > 60
    colour = np.median(pixels[fg], axis=0)
    palette = np.asarray([rgb for _, rgb in synthetic.COLOURS], np.float32)
    assert np.argmin(((palette - colour) ** 2).sum(-1)) == synthetic.class_colour(class_id)
    words = set(r["question"].replace("?", " ").replace(".", " ").split())
    assert words & set(synthetic.SHAPES) <= {synthetic.SHAPES[synthetic.class_shape(class_id)]}
  assert per_class == {c: SMALL["train"] for c in range(64)}


def test_answers_match_only_their_positive_passage(small):
  corpus = dict(zip(*pq.read_table(os.path.join(
      small, "SAMPLE_passages", "test_passages-00000-of-00001.parquet")).to_pydict().values()))
  for split in m2kr.SPLITS:
    rows = pq.read_table(os.path.join(small, "SAMPLE_data", f"{split}-00000-of-00001.parquet"))
    for r in rows.to_pylist():
      # PseudoRecall: an answer, stripped and lower-cased, in a passage lower-cased.
      hits = {pid for pid, text in corpus.items()
              if any(a.strip().lower() in text.lower() for a in r["answers"])}
      assert hits == set(r["pos_item_ids"]), (r["question_id"], r["answers"])


def test_deterministic_for_a_seed(small, tmp_path):
  again = sample.write_sample(str(tmp_path / "b"), queries_per_class=SMALL)
  first, second = _read(small), _read(again)
  assert first.keys() == second.keys()
  for key in first:
    same = first[key].equals(second[key]) if key.endswith(".parquet") else (
        first[key] == second[key])
    assert same, key
  other = _read(sample.write_sample(str(tmp_path / "c"), seed=1, queries_per_class=SMALL))
  assert other["images/test/00_00.png"] != first["images/test/00_00.png"]
  assert other["SAMPLE_passages/test_passages-00000-of-00001.parquet"].equals(
      first["SAMPLE_passages/test_passages-00000-of-00001.parquet"])


def test_write_is_atomic(tmp_path, monkeypatch):
  calls = []

  def failing_draw(*args):
    calls.append(1)
    if len(calls) > 70:
      raise RuntimeError("disk full")
    return draw(*args)

  draw = synthetic.draw_image
  monkeypatch.setattr(synthetic, "draw_image", failing_draw)
  with pytest.raises(RuntimeError, match="disk full"):
    sample.write_sample(str(tmp_path / "s"), queries_per_class=SMALL)
  assert os.listdir(tmp_path) == []  # Neither the folder nor its temporary twin.
  os.makedirs(tmp_path / "full")
  (tmp_path / "full" / "x").write_text("")
  with pytest.raises(FileExistsError):
    sample.write_sample(str(tmp_path / "full"))


def test_ensure_sample_is_idempotent_and_safe_concurrently(tmp_path):
  out, data_dir = str(tmp_path / "sample"), str(tmp_path / "tfds")
  errors = []

  def call():
    try:
      sample.ensure_sample(out, data_dir)
    except Exception as e:  # pylint: disable=broad-except
      errors.append(e)

  threads = [threading.Thread(target=call) for _ in range(2)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert not errors, errors
  counts = {s: 64 * n for s, n in sample.QUERIES_PER_CLASS.items()}
  for split, count in counts.items():
    assert len(m2kr.load_queries(data_dir, "SAMPLE", split)) == count
    assert len(m2kr.load_passages(data_dir, "SAMPLE", split)) == 64
  marker = os.path.join(out, sample.MARKER)
  stamp = os.stat(marker).st_mtime_ns
  built = os.stat(m2kr.dataset_dir(data_dir, "SAMPLE", "queries")).st_mtime_ns
  sample.ensure_sample(out, data_dir)  # Nothing to do.
  assert os.stat(marker).st_mtime_ns == stamp
  assert os.stat(m2kr.dataset_dir(data_dir, "SAMPLE", "queries")).st_mtime_ns == built
  with pytest.raises(ValueError, match="holds a sample written with"):
    sample.ensure_sample(out, data_dir, seed=3)


def test_ensure_sample_rebuilds_a_data_dir_built_from_another_sample(tmp_path):
  data_dir = str(tmp_path / "tfds")
  sample.ensure_sample(str(tmp_path / "a"), data_dir, queries_per_class={"test": 1})
  sample.ensure_sample(str(tmp_path / "b"), data_dir, queries_per_class={"test": 2})
  assert len(m2kr.load_queries(data_dir, "SAMPLE", "test")) == 128


def test_command_line(tmp_path):
  run = subprocess.run(
      [sys.executable, "-m", "preflmr_jax.data.sample", f"--out={tmp_path / 's'}",
       f"--data_dir={tmp_path / 'd'}", "--train_per_class=1", "--valid_per_class=1",
       "--test_per_class=1", "--image_size=32"],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stderr[-3000:]
  records = m2kr.load_queries(str(tmp_path / "d"), "SAMPLE", "valid")
  assert len(records) == 64
  assert Image.open(__import__("io").BytesIO(records[0]["image"])).size == (32, 32)
