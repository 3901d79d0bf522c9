"""A task of the user's own (data/tasks.py), end to end: described, prepared, trained and evaluated
under its own name; bad names and descriptions are one clear error naming the file and field."""

import io
import json
import re

import pytest

from preflmr_jax import config_files, evaluate, train
from preflmr_jax.data import instructions, m2kr, pipeline, prepare, sample


@pytest.fixture(scope="module")
def source(tmp_path_factory):
  """The sample's parquet and images, as a task named MyShapes."""
  root = tmp_path_factory.mktemp("own") / "src"
  sample.write_sample(str(root), queries_per_class={"train": 1, "valid": 1, "test": 1})
  for kind in ("data", "passages"):
    (root / f"SAMPLE_{kind}").rename(root / f"MyShapes_{kind}")
  return root


def _prepare(source, tasks, data_dir, **kwargs):
  out = io.StringIO()
  code = prepare.run(str(source), str(source / sample.IMAGES), tasks, str(data_dir), out=out,
                     **kwargs)
  return code, out.getvalue()


@pytest.mark.slow
def test_a_task_of_ones_own_prepares_trains_and_evaluates(source, tmp_path, monkeypatch):
  (source / "MyShapes_task.json").write_text(json.dumps({"type": "vqa", "headline": "Recall@5"}))
  data_dir = tmp_path / "tfds"
  code, out = _prepare(source, ["MyShapes"], data_dir)
  assert code == 0, out
  assert m2kr.canonical_task("MyShapes", str(data_dir)) == "MyShapes"
  with pytest.raises(ValueError, match="unknown M2KR task 'myshapes'"):  # its exact name only
    m2kr.canonical_task("myshapes", str(data_dir))
  drawn = []
  templates = instructions.training_instructions
  monkeypatch.setattr(instructions, "training_instructions",
                      lambda task, kind=None: drawn.append((task, kind)) or templates(task, kind))
  config = config_files.load_config("configs/tiny.py", {
      "data.tasks": "MyShapes", "data.data_dir": str(data_dir), "num_train_steps": 2,
      "checkpoint_every_steps": 2, "log_every_steps": 1, "optimizer.warmup_steps": 0})
  metrics = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert ("MyShapes", "vqa") in drawn and metrics["loss"] > 0
  result = evaluate.run(config, str(tmp_path / "run"), ["MyShapes"], "test", str(data_dir),
                        str(tmp_path / "eval"), ks=(1,))["MyShapes"]
  assert result["headline"] == "Recall@5" and 0 <= result["Recall@5"] <= 1
  assert result["num_queries"] == 64
  assert "**" in (tmp_path / "eval" / "results.md").read_text()


def test_the_flags_describe_a_task_without_a_file(source, tmp_path):
  code, out = _prepare(source, ["MyShapes"], tmp_path / "tfds", task_type="caption",
                       headline="Recall@10")
  assert code == 0, out
  assert m2kr.task_type(str(tmp_path / "tfds"), "MyShapes") == "caption"
  assert m2kr.task_headline(str(tmp_path / "tfds"), "MyShapes") == "Recall@10"


@pytest.mark.parametrize("name,file_text,message", [
    ("Nope", None, "unknown task 'Nope': not one of the published M2KR tasks"),
    ("BadType", '{"type": "poem", "headline": "Recall@5"}',
     r"BadType_task.json: type='poem' is not one of \('vqa'"),
    ("BadMetric", '{"type": "vqa", "headline": "MRR@10"}',
     r"BadMetric_task.json: headline='MRR@10' is not 'Recall@K' or 'PseudoRecall@K'"),
    ("Extra", '{"type": "vqa", "headline": "Recall@5", "metric": "x"}',
     r"Extra_task.json: unknown field\(s\) \['metric'\]"),
    ("Broken", '{"type": ', "Broken_task.json: not JSON"),
    ("bad/name", None, "task name 'bad/name'"),
])
def test_bad_task_descriptions_name_the_file_and_field(source, tmp_path, name, file_text, message):
  if file_text is not None:
    (source / f"{name}_task.json").write_text(file_text)
  code, out = _prepare(source, [name], tmp_path / "tfds")
  assert code == 2 and out.startswith("error: ") and len(out.splitlines()) == 1, out
  assert re.search(message, out), out
  assert not (tmp_path / "tfds").exists()  # nothing half-built


def test_training_on_a_task_nobody_described_names_the_key(tmp_path):
  config = config_files.load_config("configs/tiny.py", {"data.tasks": "MyShapes",
                                                        "data.data_dir": str(tmp_path)})
  with pytest.raises(ValueError, match=r"config.data.tasks='MyShapes': unknown M2KR task "
                     r"'MyShapes': not one of .* nor described in"):
    pipeline.resolve_data_dir(config)
