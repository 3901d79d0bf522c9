"""Evaluation under faults, on copies of the SAMPLE build: the eval binary checks its tasks and
outputs before any work, keeps each finished task, and writes files with the user's umask."""

import json
import os
import shutil
import stat

import pytest

from preflmr_jax import config_files, evaluate, evaluation, tokenization
from preflmr_jax.data import m2kr, pipeline
from preflmr_jax.models import model_config as mc
from preflmr_jax.models import preflmr


def _config(**overrides):
  return config_files.load_config("configs/tiny.py", overrides)


@pytest.fixture(scope="module")
def built():
  return pipeline.resolve_data_dir(_config())  # the SAMPLE build (tests/conftest.py's cache)


@pytest.fixture
def data_dir(built, tmp_path):
  """A copy of the SAMPLE build, to damage."""
  shutil.copytree(built, tmp_path / "tfds")
  return str(tmp_path / "tfds")


# ------------------------------------------------------------------ 7: evaluation loses nothing


@pytest.fixture
def two_tasks(data_dir):
  """SAMPLE and a copy of it built as OVEN."""
  for kind in ("queries", "passages"):
    shutil.copytree(m2kr.dataset_dir(data_dir, "SAMPLE", kind),
                    m2kr.dataset_dir(data_dir, "OVEN", kind))
  return data_dir


def test_tasks_and_output_are_checked_before_the_checkpoint_is_loaded(two_tasks, tmp_path,
                                                                       monkeypatch):
  def restore(*args, **kwargs):
    raise AssertionError("the checkpoint was loaded")
  monkeypatch.setattr(evaluate, "restore", restore)
  out = str(tmp_path / "out")
  with pytest.raises(m2kr.NotBuiltError, match="OKVQA passages are not built"):
    evaluate.run(_config(), "ckpt", ["SAMPLE", "OKVQA"], "test", two_tasks, out)
  (tmp_path / "file").write_text("")
  for flag, kwargs in (("--output", {"output": str(tmp_path / "file" / "out")}),
                       ("--embedding_cache", {"output": out,
                                              "cache_dir": str(tmp_path / "file" / "cache")})):
    with pytest.raises(OSError, match=rf"^{flag}={tmp_path}/file/\w+: cannot write there"):
      evaluate.run(_config(), "ckpt", ["SAMPLE", "OVEN"], "test", two_tasks, **kwargs)
  assert os.listdir(out) == []  # the probe is gone


def test_results_are_written_after_each_task_with_the_umask(two_tasks, tmp_path, monkeypatch):
  model_config = mc.PreFLMRConfig.from_dict(_config().model)
  tok = tokenization.tiny_tokenizer()
  monkeypatch.setattr(evaluate, "restore", lambda config, checkpoint, step, mesh: evaluate.Restored(
      model_config, preflmr.abstract_params(model_config), tok, tok, checkpoint, 7))

  def evaluate_task(encoder, data_dir, task, *args, **kwargs):
    if task == "OVEN":
      raise RuntimeError("OVEN crashed")
    return ({"Recall@1": 0.5, "headline": "Recall@1", "num_queries": 1, "num_passages": 2},
            [{"question_id": "q", "passage_ids": ["p"], "scores": [1.0]}])
  monkeypatch.setattr(evaluation, "evaluate_task", evaluate_task)
  out = tmp_path / "out"
  old = os.umask(0o022)
  try:
    with pytest.raises(RuntimeError, match="OVEN crashed"):
      evaluate.run(_config(), "ckpt", ["SAMPLE", "OVEN"], "test", two_tasks, str(out))
  finally:
    os.umask(old)
  results = json.loads((out / "results.json").read_text())
  assert list(results) == ["SAMPLE"] and results["SAMPLE"]["step"] == 7
  assert "| SAMPLE |" in (out / "results.md").read_text()
  for name in ("results.json", "results.md", "SAMPLE_rankings.jsonl"):
    assert stat.S_IMODE((out / name).stat().st_mode) == 0o644, name
