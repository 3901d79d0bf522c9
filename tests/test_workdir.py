"""workdir.py: the metrics log (resume keeps the steps up to the checkpoint, local and gs://) and
the TensorBoard scalars written without TensorFlow."""

import pytest
from tensorboard.backend.event_processing import event_accumulator

from preflmr_jax import storage, tensorboard_events, workdir


@pytest.mark.parametrize("remote", [False, True], ids=["local", "gs"])
def test_metrics_log_resumes_at_the_checkpoint_step(remote, tmp_path, request):
  run = (storage.path(f"gs://{request.getfixturevalue('gcs').bucket}/run", "--workdir") if remote
         else tmp_path)
  log = workdir.MetricsFile(run)
  for step in (1, 2, 3, 4):
    log.write(step, {"loss": 1.0 / step})
  log.close()
  assert [m["step"] for m in workdir.read_metrics(run)] == [1, 2, 3, 4]
  # The run crashed after step 4 and resumes from its checkpoint at step 2: 3, 4 are logged again.
  log = workdir.MetricsFile(run, resume_step=2)
  assert [m["step"] for m in workdir.read_metrics(run)] == [1, 2]
  log.write(3, {"loss": 0.5})
  log.close()
  assert workdir.read_metrics(run) == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5},
                                       {"step": 3, "loss": 0.5}]
  log = workdir.MetricsFile(run)  # a fresh start (no checkpoint): an empty log
  log.close()
  assert workdir.read_metrics(run) == []


def test_metrics_log_drops_a_torn_last_line_and_reader_names_the_file(tmp_path):
  workdir.metrics_path(tmp_path).write_text('{"step": 1, "loss": 1}\n{"step": 2, "lo')
  workdir.MetricsFile(tmp_path, resume_step=5).close()
  assert workdir.read_metrics(tmp_path) == [{"step": 1, "loss": 1}]
  with pytest.raises(FileNotFoundError, match="metrics.jsonl: no metrics log"):
    workdir.read_metrics(tmp_path / "other")


def test_layout():
  assert str(workdir.checkpoints_dir("gs://b/run")) == "gs://b/run/checkpoints"
  assert str(workdir.rankings_path(workdir.eval_dir("/w"), "OVEN")) == "/w/eval/OVEN_rankings.jsonl"
  assert str(workdir.results_path("/w/eval")) == "/w/eval/results.json"


@pytest.mark.parametrize("remote", [False, True], ids=["local", "gs"])
def test_tensorboard_scalars_without_tensorflow(remote, tmp_path, request):
  logdir = (storage.path(f"gs://{request.getfixturevalue('gcs').bucket}/run", "logdir") if remote
            else tmp_path)
  writer = tensorboard_events.EventWriter(logdir)
  writer.write_scalars(1, {"loss": 0.5})
  writer.write_scalars(2, {"loss": 0.25, "accuracy": 1})
  writer.close()
  with storage.local_copy(logdir) as local:
    events = event_accumulator.EventAccumulator(local)
    events.Reload()
  assert sorted(events.Tags()["scalars"]) == ["accuracy", "loss"]
  assert [(s.step, s.value) for s in events.Scalars("loss")] == [(1, 0.5), (2, 0.25)]
