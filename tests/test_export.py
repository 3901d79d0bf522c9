"""The export binary: a trained run -> a published folder that loads with its tokenizers and holds
the run's parameters exactly."""

import jax
import numpy as np
import pytest

import preflmr_jax
from preflmr_jax import evaluate, export, tokenization

pytestmark = pytest.mark.slow


def test_export_writes_the_runs_parameters_and_tokenizers(trained_workdir, tmp_path, tiny_config):
  folder = tmp_path / "pub"
  restored = export.export(tiny_config(), str(trained_workdir), str(folder), step=4)
  assert restored.step == 4
  model = preflmr_jax.load_pretrained(str(folder))
  assert model.config == restored.model_config
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(model.params),
               jax.device_get(evaluate.restore(tiny_config(), str(trained_workdir), 4).params))
  # The README's API works on it as on a published folder: the run's vocab on both sides.
  run_vocab = tokenization.tokenizer_from_config(tiny_config().tokenizer).get_vocab()
  assert model.query_tokenizer.get_vocab() == model.document_tokenizer.get_vocab() == run_vocab
  q = tokenization.QueryTokenizer(model.query_tokenizer, model.config.query_maxlen)(
      ["what colour is the circle?"], ["Using the image, answer:"])
  assert q["input_ids"].shape == (1, model.config.query_maxlen)


def test_export_refuses_a_folder_in_the_way(trained_workdir, tmp_path, cli):
  (tmp_path / "notes").mkdir()
  (tmp_path / "notes" / "keep.txt").write_text("keep me")
  run = cli("preflmr_jax.export", "--config=configs/tiny.py", f"--checkpoint={trained_workdir}",
            f"--output={tmp_path / 'notes'}", "--overwrite")
  assert run.returncode == 2 and run.stderr.strip() == (
      f"error: --output={tmp_path / 'notes'}: is not a published folder (no config.json); not "
      "replacing it"), run.stderr[-3000:]
  assert (tmp_path / "notes" / "keep.txt").read_text() == "keep me"
  run = cli("preflmr_jax.export", "--config=configs/tiny.py", f"--checkpoint={trained_workdir}",
            f"--output={tmp_path / 'pub'}")
  assert run.returncode == 0, run.stderr[-3000:]
  assert f"exported {trained_workdir}, step 6 to {tmp_path / 'pub'}" in run.stderr
  run = cli("preflmr_jax.export", "--config=configs/tiny.py", f"--checkpoint={trained_workdir}",
            f"--output={tmp_path / 'pub'}", "--step=2")
  assert run.returncode == 2 and "exists and is not empty; pass --overwrite" in run.stderr
  run = cli("preflmr_jax.export", "--config=configs/tiny.py", f"--checkpoint={trained_workdir}",
            f"--output={tmp_path / 'pub'}", "--step=2", "--overwrite")  # a published folder: replaced
  assert run.returncode == 0 and "step 2 to" in run.stderr, run.stderr[-3000:]
  assert sorted(p.name for p in tmp_path.iterdir()) == ["notes", "pub"]
