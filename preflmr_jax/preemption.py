"""Preemption: a SIGTERM (a preemption or maintenance notice, SLURM's warning before the time
limit) becomes a stop at a step boundary that every process agrees on, after which the trainer
saves that step and exits with `exit_codes.PREEMPTED`.

  with PreemptionWatcher() as watcher:
    ...
    if watcher.should_stop(step):  # on every process, once per step
      save(step); raise Preempted(step)
"""

from __future__ import annotations

import signal

import jax
import orbax.checkpoint as ocp
from absl import logging


class Preempted(Exception):
  """Training stopped on a preemption notice; `step` is the step it saved (None: it stopped
  before taking a step, with nothing new to save). `python -m preflmr_jax.main` exits with
  `exit_codes.PREEMPTED`."""

  def __init__(self, step: int | None):
    self.step = step
    super().__init__(f"preempted: saved step {step}, rerun to resume" if step is not None else
                     "preempted before the first step: nothing new to save, rerun to resume")


class PreemptionWatcher:
  """Turns a preemption notice (SIGTERM) into `should_stop(step)`, so the loop saves and exits.

  One process: a SIGTERM handler sets a flag. Several processes: all hosts must stop at the same
  step, so ask JAX's preemption sync service, which runs its own SIGTERM notifier; a Python handler
  would replace that notifier, so none is installed there.
  """

  def __init__(self):
    self._stop = False
    self._multihost = jax.process_count() > 1
    self._installed = False
    if not self._multihost:
      self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
      self._installed = True

  def _on_sigterm(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM received: checkpointing and stopping at the next step boundary")
    self._stop = True

  def should_stop(self, step: int) -> bool:
    """Call once per step, on every host; True from the step at which to save and stop."""
    if self._multihost and not self._stop:
      self._stop = ocp.multihost.reached_preemption(step)
    return self._stop

  def stop_before_start(self, step: int | None = None) -> None:
    """Raises Preempted(None) if a notice came during set-up. `step` (the step training resumes
    from, the same on every host) lets several processes agree; without it only this process's
    own signal is seen, which is all there is with one process."""
    if (self._stop if step is None else self.should_stop(step)):
      raise Preempted(None)

  def close(self) -> None:
    if self._installed:
      # None: the old handler was not set from Python; the default is the best we can put back.
      signal.signal(signal.SIGTERM, signal.SIG_DFL if self._previous is None else self._previous)
      self._installed = False

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
