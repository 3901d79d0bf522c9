"""TensorBoard scalars written through `storage` (a local folder or gs://), without TensorFlow.

clu's SummaryWriter writes with `tf.summary`, i.e. TensorFlow's own GCS client, which neither
follows STORAGE_EMULATOR_HOST nor comes with the default install (no TensorFlow). This
writer builds the same event records (the `tensorboard` package's pure-Python protos and record
framing) and appends them to one `events.out.tfevents.*` file per run start with
`storage.Appender` (on gs:// the object is rewritten whole at most every few seconds and at flush).

  writer = EventWriter(workdir.tensorboard_dir(path))   # scalars only
  writer.write_scalars(step, {"loss": 0.3})
  writer.close()

It does not import clu's `metric_writers`, whose package imports TensorFlow (seconds per process).
"""

from __future__ import annotations

import io
import os
import socket
import time
from typing import Any, Mapping

from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.record_writer import RecordWriter

from preflmr_jax import storage


def _record(event: event_pb2.Event) -> bytes:
  buffer = io.BytesIO()
  RecordWriter(buffer).write(event.SerializeToString())
  return buffer.getvalue()


def event_file_name() -> str:
  """TensorBoard's naming: a new file per writer, ordered by start time."""
  return f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}.v2"


class EventWriter:
  """Scalars in one TensorBoard event file (the trainer logs nothing else)."""

  def __init__(self, logdir):
    header = event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2")
    self._out = storage.Appender(storage.path(logdir, "TensorBoard logdir") / event_file_name(),
                                 _record(header))

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    values = [summary_pb2.Summary.Value(tag=k, simple_value=float(v)) for k, v in scalars.items()]
    event = event_pb2.Event(wall_time=time.time(), step=int(step),
                            summary=summary_pb2.Summary(value=values))
    self._out.append(_record(event))

  def flush(self) -> None:
    self._out.flush()

  def close(self) -> None:
    self._out.close()
