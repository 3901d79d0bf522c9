"""M2KR TFDS builders, reading API and the prepare command: round trip, bad input, reruns."""

import ast
import io
import json
import os
import pathlib
import re
import subprocess
import sys
import textwrap

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from preflmr_jax import image_processing
from preflmr_jax.data import m2kr, m2kr_build, prepare, sample

ROOT = pathlib.Path(__file__).resolve().parents[1]
SMALL = {"train": 2, "valid": 1, "test": 1}  # Queries per class: 256 in all.

# The bad-input folder has an image over PIL's (lowered) MAX_IMAGE_PIXELS on purpose.
pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")


@pytest.fixture(scope="module")
def sample_dir(tmp_path_factory):
  return sample.write_sample(str(tmp_path_factory.mktemp("m2kr") / "sample"),
                             queries_per_class=SMALL)


@pytest.fixture(scope="module")
def built(sample_dir, tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("m2kr_tfds"))
  report = m2kr_build.build(sample_dir, os.path.join(sample_dir, sample.IMAGES), ["SAMPLE"],
                            data_dir)
  return data_dir, report


# ---------------------------------------------------------------------------
# Round trip.
# ---------------------------------------------------------------------------


def test_sample_round_trip_equals_the_source(sample_dir, built):
  data_dir, report = built
  assert not report.skipped and not report.converted and not report.notes
  for split in m2kr.SPLITS:
    source = pq.read_table(os.path.join(sample_dir, "SAMPLE_data",
                                        f"{split}-00000-of-00001.parquet")).to_pylist()
    records = m2kr.load_queries(data_dir, "SAMPLE", split)
    assert len(records) == len(source) == 64 * SMALL[split]
    for want, got in zip(source, records):  # Source order is kept.
      assert set(got) == set(m2kr.QUERY_KEYS)
      for key in ("question_id", "question", "instruction", "pos_item_ids", "answers"):
        assert got[key] == want[key], key
      with open(os.path.join(sample_dir, sample.IMAGES, want["img_path"]), "rb") as f:
        assert got["image"] == f.read()
    passages = pq.read_table(os.path.join(
        sample_dir, "SAMPLE_passages", f"{split}_passages-00000-of-00001.parquet")).to_pylist()
    assert m2kr.load_passages(data_dir, "SAMPLE", split)[:] == passages
    assert len(m2kr.load_passages(data_dir, "sample", f"{split}_passages")) == 64
  counts = {(w["kind"], w["split"]): w["count"] for w in report.written}
  assert counts[("queries", "train")] == 128 and counts[("passages", "test_passages")] == 64


def test_records_types_batched_reads_and_pickling(built):
  import pickle
  records = m2kr.load_queries(built[0], "SAMPLE", "test")
  first = records[0]
  assert isinstance(first["question_id"], str) and isinstance(first["image"], bytes)
  assert all(isinstance(p, str) for p in first["pos_item_ids"] + first["answers"])
  assert records.__getitems__([3, -1]) == [records[3], records[len(records) - 1]]
  assert pickle.loads(pickle.dumps(records))[5] == records[5]
  with pytest.raises(IndexError):
    records[len(records)]
  Image.open(io.BytesIO(first["image"])).load()


def test_build_and_read_without_tensorflow(sample_dir, tmp_path):
  code = textwrap.dedent(f"""
      import importlib.machinery
      import sys

      class NoTensorFlow(importlib.machinery.PathFinder):  # As if it were not installed.
        @classmethod
        def find_spec(cls, name, path=None, target=None):
          if name == "tensorflow" or name.startswith("tensorflow."):
            return None
          return super().find_spec(name, path, target)

      sys.meta_path[:] = [NoTensorFlow if f is importlib.machinery.PathFinder else f
                          for f in sys.meta_path]
      assert importlib.util.find_spec("tensorflow") is None
      from preflmr_jax.data import m2kr, m2kr_build
      report = m2kr_build.build({sample_dir!r}, {os.path.join(sample_dir, 'images')!r},
                                ["SAMPLE"], {str(tmp_path)!r})
      assert report.usable and not report.skipped, report.to_json()
      q = m2kr.load_queries({str(tmp_path)!r}, "SAMPLE", "valid")
      p = m2kr.load_passages({str(tmp_path)!r}, "SAMPLE", "valid")
      assert len(q) == 64 and len(p) == 64 and q[0]["pos_item_ids"][0].startswith("SAMPLE_p")
      assert "tensorflow" not in sys.modules
      try:
        import tensorflow
      except ImportError:
        print("OK")
  """)
  run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
  assert run.returncode == 0 and "OK" in run.stdout, run.stderr[-3000:]


def test_reading_what_is_not_built_names_data_dir_task_and_split(built, tmp_path):
  with pytest.raises(m2kr.NotBuiltError,
                     match=r"OVEN queries.*data_dir=.*python -m preflmr_jax.data.prepare"):
    m2kr.load_queries(str(tmp_path), "oven", "test")
  with pytest.raises(m2kr.NotBuiltError, match=r"passages are not built"):
    m2kr.load_passages(str(tmp_path), "SAMPLE", "test")
  with pytest.raises(ValueError, match="unknown query split"):
    m2kr.load_queries(built[0], "SAMPLE", "test_passages")
  with pytest.raises(ValueError, match="unknown M2KR task"):
    m2kr.load_queries(built[0], "NOPE", "test")


def test_task_table():
  assert m2kr.TASKS["CC3M"] == "CC" and m2kr.TASKS["E-VQA"] == "EVQA"
  assert m2kr.canonical_task("evqa") == m2kr.canonical_task("E-VQA") == "E-VQA"
  assert m2kr.passage_split("valid") == "valid_passages"
  assert len(m2kr.TASKS) == 11  # The ten published tasks and SAMPLE.


def test_the_reader_finds_the_builds_without_the_build_code():
  assert {kind: b.name for kind, b in m2kr_build._BUILDERS.items()} == m2kr.BUILDER_NAMES
  tree = ast.parse(pathlib.Path(m2kr.__file__).read_text())
  imported = [a.name for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
              for a in n.names] + [n.module for n in ast.walk(tree)
                                   if isinstance(n, ast.ImportFrom) and n.module]
  assert not [name for name in imported if "m2kr_build" in name], imported


def test_rerun_reuses_notes_changes_and_rebuilds_on_request(tmp_path, capfd):
  source = sample.write_sample(str(tmp_path / "s"), queries_per_class={"test": 1})
  images, data_dir = os.path.join(source, "images"), str(tmp_path / "d")
  first = m2kr_build.build(source, images, ["SAMPLE"], data_dir)
  assert "Downloading and preparing" not in capfd.readouterr().out  # TFDS's: log file only
  assert [w["split"] for w in first.written] == ["test_passages", "test"]
  assert {n.split for n in first.notes} == {"train", "valid", "train_passages", "valid_passages"}
  again = m2kr_build.build(source, images, ["SAMPLE"], data_dir)
  assert len(again.reused) == 2 and all(w["reused"] for w in again.written)
  assert not [n for n in again.notes if "different source" in n.reason]
  # Change the source: rows dropped from the test queries.
  path = os.path.join(source, "SAMPLE_data", "test-00000-of-00001.parquet")
  pq.write_table(pq.read_table(path).slice(0, 10), path)
  kept = m2kr_build.build(source, images, ["SAMPLE"], data_dir)
  assert [n.split for n in kept.notes if "different source" in n.reason] == ["*"]
  assert len(m2kr.load_queries(data_dir, "SAMPLE", "test")) == 64
  rebuilt = m2kr_build.build(source, images, ["SAMPLE"], data_dir, rebuild_changed=True)
  assert [w["reused"] for w in rebuilt.written] == [True, False]
  assert len(m2kr.load_queries(data_dir, "SAMPLE", "test")) == 10
  forced = m2kr_build.build(source, images, ["SAMPLE"], data_dir, overwrite=True)
  assert not any(w["reused"] for w in forced.written)


# ---------------------------------------------------------------------------
# Bad input.
# ---------------------------------------------------------------------------


def _png(image, **kwargs):
  buffer = io.BytesIO()
  image.save(buffer, format="PNG", **kwargs)
  return buffer.getvalue()


def _jpeg(image):
  buffer = io.BytesIO()
  image.save(buffer, format="JPEG")
  return buffer.getvalue()


def _write(path, columns, schema=None):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  pq.write_table(pa.table(columns, schema=schema), path)


def _images(root):
  """{img_path: bytes} of every case, written under `root`."""
  rng = np.random.default_rng(0)
  rgb = Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
  jpeg = io.BytesIO()
  Image.fromarray(rng.integers(0, 256, (30, 30, 3), dtype=np.uint8)).save(jpeg, "JPEG")
  cmyk = io.BytesIO()
  rgb.convert("CMYK").save(cmyk, "JPEG")
  palette = rgb.convert("P")
  sixteen = (np.arange(16 * 16).reshape(16, 16) * 250).astype(np.uint16)
  files = {
      "rgb.png": _png(rgb),
      "gray.png": _png(rgb.convert("L")),
      "rgba.png": _png(rgb.convert("RGBA")),
      "cmyk.jpg": cmyk.getvalue(),
      "palette.png": _png(palette, transparency=0),
      "sixteen.png": _png(Image.fromarray(sixteen)),
      "wide.png": _png(Image.new("RGB", (48, 12), (10, 200, 30))),
      "many_pixels.png": _png(Image.new("RGB", (40, 30), (200, 10, 30))),  # Over PIL's limit.
      "bomb.png": _png(Image.new("RGB", (50, 50), (1, 2, 3))),  # Over twice PIL's limit.
      "bomb.jpg": _jpeg(Image.new("RGB", (60, 40), (1, 2, 3))),  # Too, but a JPEG.
      "corrupt.jpg": b"not an image at all",
      "truncated.jpg": jpeg.getvalue()[:len(jpeg.getvalue()) * 3 // 4],  # Header intact.
  }
  for name, data in files.items():
    with open(os.path.join(root, name), "wb") as f:
      f.write(data)
  return files


def _bad_source(tmp_path):
  """An OKVQA-layout folder with every bad case; returns (source, image_root, images)."""
  source, root = str(tmp_path / "source"), str(tmp_path / "images")
  os.makedirs(root)
  images = _images(root)
  q, p = os.path.join(source, "OKVQA_data"), os.path.join(source, "OKVQA_passages")
  instruction = "Retrieve the passage:"

  def rows(*records):
    keys = ("question_id", "question", "instruction", "img_path", "pos_item_ids", "answers")
    return {k: [r.get(k, instruction if k == "instruction" else None) for r in records]
            for k in keys}

  # File A: string ids, most cases.
  a = rows(
      {"question_id": "good", "question": "what is it?", "img_path": "rgb.png",
       "pos_item_ids": ["p1"], "answers": ["one"]},
      {"question_id": "text_only", "question": "who wrote it?", "pos_item_ids": ["p2"],
       "answers": ["two"]},
      {"question_id": "image_only", "question": "  ", "img_path": "gray.png",
       "pos_item_ids": ["p1"]},
      {"question_id": "null_question", "img_path": "rgba.png", "pos_item_ids": ["p1"]},
      {"question_id": "nothing", "question": " \t", "pos_item_ids": ["p1"]},
      {"question_id": "missing_image", "question": "q", "img_path": "nope/missing.png",
       "pos_item_ids": ["p1"]},
      {"question_id": "corrupt", "question": "q", "img_path": "corrupt.jpg",
       "pos_item_ids": ["p1"]},
      {"question_id": "truncated", "question": "q", "img_path": "truncated.jpg",
       "pos_item_ids": ["p1"]},
      {"question_id": "cmyk", "question": "q", "img_path": "cmyk.jpg", "pos_item_ids": ["p1"]},
      {"question_id": "palette", "question": "q", "img_path": "palette.png",
       "pos_item_ids": ["p1"]},
      {"question_id": "sixteen", "question": "q", "img_path": "sixteen.png",
       "pos_item_ids": ["p1"]},
      {"question_id": "wide", "question": "q", "img_path": "wide.png", "pos_item_ids": ["p1"]},
      {"question_id": "many_pixels", "question": "q", "img_path": "many_pixels.png",
       "pos_item_ids": ["p1"]},
      {"question_id": "bomb", "question": "q", "img_path": "bomb.png", "pos_item_ids": ["p1"]},
      {"question_id": "jpeg_bomb", "question": "q", "img_path": "bomb.jpg",
       "pos_item_ids": ["p1"]},
      {"question_id": "some_missing", "question": "q", "pos_item_ids": ["p3", "nope", "p2"],
       "answers": ["three", "3"]},
      {"question_id": "none_left", "question": "q", "pos_item_ids": ["nope", "p4"]},
      {"question_id": "7", "question": "the first 7", "pos_item_ids": ["p2"], "answers": ["x"]},
      {"question_id": "", "question": "no id", "pos_item_ids": ["p2"]},
  )
  a["extra_column"] = list(range(len(a["question_id"])))  # Ignored.
  _write(os.path.join(q, "train-00000-of-00002.parquet"), a)
  # File B: int ids, the question as binary with invalid UTF-8, no answers column.
  _write(os.path.join(q, "train-00001-of-00002.parquet"), {
      "question_id": [7, 8, 9],
      "question": [b"the second 7", b"valid \xc3\xa9", b"bad \xff\xfe"],
      "instruction": [instruction] * 3,
      "img_path": [None, None, None],
      "pos_item_ids": [["p1"], ["p1"], ["p1"]],
  }, schema=pa.schema([("question_id", pa.int64()), ("question", pa.binary()),
                       ("instruction", pa.string()), ("img_path", pa.string()),
                       ("pos_item_ids", pa.list_(pa.string()))]))
  # valid: a required column is missing.
  _write(os.path.join(q, "valid-00000-of-00001.parquet"), {
      "question_id": ["v1"], "question": ["q"], "img_path": [None], "pos_item_ids": [["p1"]]})
  # test: every record is bad.
  _write(os.path.join(q, "test-00000-of-00001.parquet"), rows(
      {"question_id": "t1", "question": "q", "img_path": "nope.png", "pos_item_ids": ["p1"]}))
  # Passages: duplicates in a second file, and content that is not UTF-8.
  _write(os.path.join(p, "train_passages-00000-of-00002.parquet"), {
      "passage_id": ["p1", "p2", "p3"],
      "passage_content": ["passage one", "passage two", "passage three"]})
  _write(os.path.join(p, "train_passages-00001-of-00002.parquet"), {
      "passage_id": ["p2", "p3", "p4", "p5"],
      "passage_content": [b"passage two", b"another three", b"bad \xff", b"passage five"]},
      schema=pa.schema([("passage_id", pa.string()), ("passage_content", pa.binary())]))
  for split in ("valid", "test"):
    _write(os.path.join(p, f"{split}_passages-00000-of-00001.parquet"), {
        "passage_id": ["p1"], "passage_content": ["passage one"]})
  return source, root, images


@pytest.fixture()
def bad_build(tmp_path, monkeypatch):
  source, root, images = _bad_source(tmp_path)
  # PIL warns above MAX_IMAGE_PIXELS and raises DecompressionBombError above twice that.
  monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
  data_dir = str(tmp_path / "tfds")
  report = m2kr_build.build(source, root, ["OKVQA"], data_dir, max_image_side=44, num_workers=2)
  return source, root, images, data_dir, report


def _issues(issues, split):
  return {i.id: i for i in issues if i.split == split}


def test_bad_input_keeps_good_records_with_their_labels(bad_build):
  source, root, images, data_dir, _ = bad_build
  got = {r["question_id"]: r for r in m2kr.load_queries(data_dir, "OKVQA", "train")}
  assert list(got) == ["good", "text_only", "image_only", "null_question", "cmyk", "palette",
                       "sixteen", "wide", "many_pixels", "jpeg_bomb", "some_missing", "7", "8"]
  assert got["good"] == {"question_id": "good", "question": "what is it?",
                         "instruction": "Retrieve the passage:", "image": images["rgb.png"],
                         "pos_item_ids": ["p1"], "answers": ["one"]}
  assert got["text_only"]["image"] == b"" and got["text_only"]["pos_item_ids"] == ["p2"]
  assert got["image_only"]["question"] == "  " and got["null_question"]["question"] == ""
  kept = {"image_only": "gray.png", "null_question": "rgba.png", "cmyk": "cmyk.jpg",
          "palette": "palette.png"}
  for name, file in kept.items():  # Modes image_processing handles: kept byte for byte.
    assert got[name]["image"] == images[file], name
  assert got["some_missing"]["pos_item_ids"] == ["p3", "p2"]
  assert got["some_missing"]["answers"] == ["three", "3"]
  # The first "7" (file A, str id) wins over the int 7 of file B; ids are str.
  assert got["7"]["question"] == "the first 7" and got["7"]["pos_item_ids"] == ["p2"]
  assert got["8"] == {"question_id": "8", "question": "valid é", "instruction":
                      "Retrieve the passage:", "image": b"", "pos_item_ids": ["p1"],
                      "answers": []}
  passages = m2kr.load_passages(data_dir, "OKVQA", "train")[:]
  assert passages == [{"passage_id": "p1", "passage_content": "passage one"},
                      {"passage_id": "p2", "passage_content": "passage two"},
                      {"passage_id": "p3", "passage_content": "passage three"},
                      {"passage_id": "p5", "passage_content": "passage five"}]


def test_bad_input_images_are_converted_for_image_processing(bad_build):
  _, _, _, data_dir, report = bad_build
  got = {r["question_id"]: r for r in m2kr.load_queries(data_dir, "OKVQA", "train")}
  converted = _issues(report.converted, "train")
  sixteen = Image.open(io.BytesIO(got["sixteen"]["image"]))
  assert sixteen.format == "PNG" and sixteen.mode == "L"
  want = np.round((np.arange(16 * 16).reshape(16, 16) * 250) / 257)
  np.testing.assert_allclose(np.asarray(sixteen), want, atol=0.5)
  assert converted["sixteen"].reason == "image re-encoded as PNG: mode I;16 to 8-bit"
  wide = Image.open(io.BytesIO(got["wide"]["image"]))
  assert wide.format == "PNG" and wide.size == (44, 11)  # max_image_side=44, aspect kept.
  assert "downscaled from 48x12 to 44x11" in converted["wide"].reason
  # Over PIL.Image.MAX_IMAGE_PIXELS (1000 here): downscaled under it, never to warn readers.
  many = Image.open(io.BytesIO(got["many_pixels"]["image"]))
  assert many.size == (36, 27) and "downscaled from 40x30" in converted["many_pixels"].reason
  # Over twice the limit PIL refuses to open it; a JPEG is still decoded (at a fraction of
  # its size) and downscaled, anything else is skipped ("bomb").
  jpeg_bomb = Image.open(io.BytesIO(got["jpeg_bomb"]["image"]))
  assert jpeg_bomb.size == (38, 25) and jpeg_bomb.format == "PNG"
  assert "downscaled from 60x40 to 38x25" in converted["jpeg_bomb"].reason
  assert Image.MAX_IMAGE_PIXELS == 1000  # Restored.
  assert converted["wide"].file.endswith("wide.png") and converted["wide"].row == 11
  # Every written image goes through the pipeline's preprocessing.
  for record in got.values():
    if record["image"]:
      pixels = image_processing.preprocess_images([Image.open(io.BytesIO(record["image"]))], 8)
      assert np.isfinite(pixels).all()


def test_bad_input_report_names_each_record_file_and_reason(bad_build):
  source, root, _, data_dir, report = bad_build
  file_a = os.path.join(source, "OKVQA_data", "train-00000-of-00002.parquet")
  file_b = os.path.join(source, "OKVQA_data", "train-00001-of-00002.parquet")
  skipped = _issues(report.skipped, "train")
  assert set(skipped) == {"nothing", "missing_image", "corrupt", "truncated", "bomb",
                          "none_left", "", "7", "9"}
  expect = {
      "nothing": (file_a, "neither a question nor an image"),
      "missing_image": (os.path.join(root, "nope/missing.png"), "image file missing"),
      "corrupt": (os.path.join(root, "corrupt.jpg"), "corrupt image"),
      "truncated": (os.path.join(root, "truncated.jpg"), "corrupt image"),
      "bomb": (os.path.join(root, "bomb.png"), "decompression-bomb"),
      "none_left": (file_a, "no positive in train_passages: ['nope', 'p4']"),
      "": (file_a, "missing question_id"),
      "7": (file_b, "duplicate question_id: kept the first (train-00000-of-00002.parquet row 17)"),
      "9": (file_b, "invalid UTF-8 in question"),
  }
  for ident, (file, reason) in expect.items():
    assert skipped[ident].file == file and reason in skipped[ident].reason, skipped[ident]
  assert skipped["9"].row == 2
  converted = _issues(report.converted, "train")
  assert set(converted) == {"sixteen", "wide", "many_pixels", "jpeg_bomb", "some_missing"}
  assert converted["some_missing"].reason == "dropped positives not in train_passages: ['nope']"
  assert converted["some_missing"].file == file_a
  file_p2 = os.path.join(source, "OKVQA_passages", "train_passages-00001-of-00002.parquet")
  dropped = _issues(report.skipped, "train_passages")
  assert {k: (v.file, v.row) for k, v in dropped.items()} == {
      "p2": (file_p2, 0), "p3": (file_p2, 1), "p4": (file_p2, 2)}
  assert dropped["p2"].reason.startswith("duplicate passage_id, identical content: kept the")
  assert dropped["p3"].reason.startswith("duplicate passage_id, different content: kept the")
  assert "train_passages-00000-of-00002.parquet row 2" in dropped["p3"].reason
  assert dropped["p4"].reason == "invalid UTF-8 in passage_content"
  # Split level: a missing column names file and column; an all-bad split is not written.
  notes = {(n.split, n.reason.split(":")[0]): n for n in report.notes}
  valid = notes[("valid", "missing required column(s) ['instruction']")]
  assert valid.file.endswith(os.path.join("OKVQA_data", "valid-00000-of-00001.parquet"))
  assert ("test", "no usable queries record; split not written") in notes
  assert _issues(report.skipped, "test")["t1"].reason == "image file missing"
  with pytest.raises(m2kr.NotBuiltError, match=r"built: \['train'\]"):
    m2kr.load_queries(data_dir, "OKVQA", "test")
  assert len(m2kr.load_passages(data_dir, "OKVQA", "test")) == 1
  assert report.usable


def test_kept_image_modes_are_handled_by_image_processing():
  # The modes `m2kr` keeps byte for byte must come out of `preprocess_images` as PIL's RGB
  # conversion (alpha on white); 16-bit grayscale would be clipped, so the build converts it.
  rng = np.random.default_rng(1)
  rgb = Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8))
  for mode in sorted(m2kr_build._PIL_OK_MODES):
    converted = rgb.convert(mode)
    image = Image.open(io.BytesIO(_tiff(converted) if mode in ("CMYK", "PA") else
                                  _png(converted)))
    assert image.mode == mode
    expected = image.convert("RGBA") if "A" in mode else image.convert("RGB")
    if "A" in mode:
      white = Image.new("RGBA", expected.size, (255, 255, 255, 255))
      expected = Image.alpha_composite(white, expected).convert("RGB")
    np.testing.assert_allclose(image_processing.preprocess_images([image], 12),
                               image_processing.preprocess_images([expected], 12), atol=1e-6)
  sixteen = Image.fromarray((np.arange(144).reshape(12, 12) * 400).astype(np.uint16))
  assert sixteen.mode == "I;16" and sixteen.mode not in m2kr_build._PIL_OK_MODES
  assert np.asarray(sixteen.convert("RGB")).max() == 255 and (
      np.asarray(sixteen.convert("RGB")) == 255).mean() > 0.9  # Clipped: why it is converted.


def _tiff(image):
  buffer = io.BytesIO()
  image.save(buffer, format="TIFF")
  return buffer.getvalue()


# ---------------------------------------------------------------------------
# The prepare command.
# ---------------------------------------------------------------------------


def test_prepare_partial_data_exits_zero_and_names_skipped_ids(tmp_path, monkeypatch):
  source, root, _ = _bad_source(tmp_path)
  monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
  out = io.StringIO()
  data_dir = str(tmp_path / "tfds")
  code = prepare.run(source, root, ["okvqa"], data_dir, out=out, max_listed=3)
  text = out.getvalue()
  assert code == 0, text
  assert re.search(r"OKVQA\s+queries\s+train\s+13\s+written", text)
  assert "skipped records: 13" in text and "... and 10 more" in text
  assert "OKVQA/train_passages 'p2'" in text  # The first 3 in full, then counts per reason:
  assert re.search(r"\n\s+2  image file missing\n", text)
  assert re.search(r"\n\s+3  image re-encoded as PNG\n", text)  # sixteen, *_pixels, *bomb.
  assert "missing required column(s) ['instruction']" in text
  with open(os.path.join(data_dir, m2kr.REPORT_FILE)) as f:
    saved = json.load(f)
  assert saved["usable"] and len(saved["skipped"]) == 13 and saved["tasks"] == ["OKVQA"]
  assert {i["id"] for i in saved["skipped"]} >= {"bomb", "corrupt", "p3", "t1"}
  # A second run reuses the build.
  out = io.StringIO()
  assert prepare.run(source, root, ["OKVQA"], data_dir, out=out) == 0
  assert "reused" in out.getvalue() and "skipped records" not in out.getvalue()


def test_prepare_exits_non_zero_when_nothing_usable(tmp_path):
  source = tmp_path / "source"
  _write(str(source / "KVQA_data" / "test-00000-of-00001.parquet"), {
      "question_id": ["a"], "question": ["q"], "instruction": ["i"], "img_path": ["gone.jpg"],
      "pos_item_ids": [["p1"]], "answers": [["x"]]})
  _write(str(source / "KVQA_passages" / "test_passages-00000-of-00001.parquet"),
         {"passage_id": ["p1"], "passage_content": ["text"]})
  os.makedirs(tmp_path / "images")
  out = io.StringIO()
  code = prepare.run(str(source), str(tmp_path / "images"), ["KVQA", "OVEN"],
                     str(tmp_path / "tfds"), out=out)
  text = out.getvalue()
  assert code == 1, text
  assert "KVQA/test 'a'" in text and "image file missing" in text
  assert "no usable query split" in text and "OVEN/* " in text  # No OVEN folder at all.
  assert "task not in the source folder" in text
  assert prepare.run(str(source), None, ["NOPE"], str(tmp_path / "tfds"), out=out) == 2


def test_prepare_command_line(tmp_path):
  source = tmp_path / "source"
  _write(str(source / "MSMARCO_data" / "valid-00000-of-00001.parquet"), {
      "question_id": ["m1", "m2", "m1"], "question": ["what is a", "what is b", "again"],
      "instruction": ["Retrieve:"] * 3, "img_path": pa.nulls(3),
      "pos_item_ids": [["d1"], ["d9"], ["d1"]], "answers": [["a"], ["b"], ["a"]]})
  _write(str(source / "MSMARCO_passages" / "valid_passages-00000-of-00001.parquet"),
         {"passage_id": ["d1", "d2"], "passage_content": ["a is a letter", "b too"]})
  data_dir = tmp_path / "tfds"
  run = subprocess.run(
      [sys.executable, "-m", "preflmr_jax.data.prepare", f"--source={source}",
       "--tasks=MSMARCO", f"--data_dir={data_dir}"],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stdout + run.stderr[-3000:]
  # m2's positive is not in the corpus: an evaluation split keeps it (a Recall miss), with a note.
  assert re.search(r"MSMARCO\s+queries\s+valid\s+2\s+written", run.stdout), run.stdout
  assert "1 queries have no positive in valid_passages: kept" in run.stdout
  assert "MSMARCO/valid 'm1'" in run.stdout and "MSMARCO/valid 'm2'" not in run.stdout
  assert [r["question_id"] for r in m2kr.load_queries(str(data_dir), "MSMARCO", "valid")] == [
      "m1", "m2"]
