"""A training run's workdir, defined once: what lives where. Every reader and writer uses it.

  <workdir>/                      a local folder or a gs:// prefix (docs/storage.md)
    run.json                      size and compute of the run (train.run_info), its config, start_id
    metrics.jsonl                 one JSON object per logged step: read_metrics()
    events.out.tfevents.*         TensorBoard scalars (tensorboard_events.py)
    checkpoints/<step>/           Orbax: params/, opt_state/, meta/, and commit_success.txt last
    eval/                         the eval binary's output (--output, by convention):
      results.json  results.md  <task>_rankings.jsonl

The functions take a workdir (or an eval output folder) as a str, os.PathLike or epath.Path and
return epath.Paths; nothing here touches storage except the readers and `MetricsFile`.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional, Union

from absl import logging
from etils import epath

from preflmr_jax import storage
from preflmr_jax.user_errors import MissingPath

PathLike = Union[str, os.PathLike]

RUN_INFO = "run.json"
METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
EVAL = "eval"
RESULTS = "results.json"
RESULTS_TABLE = "results.md"
RANKINGS_SUFFIX = "_rankings.jsonl"


def run_info_path(workdir: PathLike) -> epath.Path:
  return epath.Path(workdir) / RUN_INFO


def metrics_path(workdir: PathLike) -> epath.Path:
  return epath.Path(workdir) / METRICS


def checkpoints_dir(workdir: PathLike) -> epath.Path:
  return epath.Path(workdir) / CHECKPOINTS


def tensorboard_dir(workdir: PathLike) -> epath.Path:
  """TensorBoard's logdir: the workdir itself (`tensorboard --logdir` on a workdir or a sweep)."""
  return epath.Path(workdir)


def eval_dir(workdir: PathLike) -> epath.Path:
  return epath.Path(workdir) / EVAL


def results_path(output: PathLike) -> epath.Path:
  return epath.Path(output) / RESULTS


def results_table_path(output: PathLike) -> epath.Path:
  return epath.Path(output) / RESULTS_TABLE


def rankings_path(output: PathLike, task: str) -> epath.Path:
  """The eval binary's rankings of `task` (also the trainer's mined negatives)."""
  return epath.Path(output) / f"{task}{RANKINGS_SUFFIX}"


def read_run_info(workdir: PathLike) -> Optional[dict[str, Any]]:
  """The run's `run.json`, or None when the folder has none."""
  path = run_info_path(workdir)
  return json.loads(path.read_text()) if path.is_file() else None


def _parse_metrics(text: str, path) -> list[dict[str, Any]]:
  try:
    return [json.loads(line) for line in text.splitlines() if line.strip()]
  except ValueError as e:
    raise ValueError(f"{path}: not a metrics log ({e})") from None


def read_metrics(workdir: PathLike) -> list[dict[str, Any]]:
  """The logged steps of a run, in order: `[{"step": ..., "loss": ..., ...}, ...]`."""
  path = metrics_path(workdir)
  if not path.exists():
    raise MissingPath(f"{path}: no metrics log (has the run logged a step yet?)")
  return _parse_metrics(path.read_text(), path)


class MetricsFile:
  """Writes `metrics.jsonl`, one line per logged step (one process does).

  A run resumed at step s keeps the lines up to s: the lines a crashed run logged after its last
  checkpoint are logged again by the resumed run. Locally each line is appended as it comes; on
  object storage (no append) the log is kept in memory and the object rewritten whole, at most every
  few seconds, at `flush()` (the trainer flushes with each checkpoint) and at `close()`
  (`storage.Appender`).
  """

  def __init__(self, workdir: PathLike, resume_step: int = 0):
    path = metrics_path(workdir)
    kept = []
    if resume_step and path.exists():
      for line in path.read_text().splitlines():
        try:
          metrics = json.loads(line)
        except ValueError:  # the torn last line of a crashed run
          logging.warning("%s: dropped an unreadable line: %r", path, line[:80])
          continue
        if metrics["step"] <= resume_step:
          kept.append(metrics)
    self._out = storage.Appender(path, b"".join(self._line(m) for m in kept))

  @staticmethod
  def _line(metrics: dict[str, Any]) -> bytes:
    return (json.dumps(metrics) + "\n").encode("utf-8")

  def write(self, step: int, scalars: dict[str, float]) -> None:
    self._out.append(self._line({"step": step, **scalars}))

  def flush(self) -> None:
    self._out.flush()

  def close(self) -> None:
    self._out.close()
