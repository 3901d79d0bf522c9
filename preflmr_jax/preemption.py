"""Preemption: a SIGTERM (a preemption or maintenance notice, SLURM's warning before the time
limit) becomes a stop at a step boundary that every process agrees on, after which the trainer
saves that step and exits with `exit_codes.PREEMPTED`. With one process, Ctrl-C (SIGINT) stops the
same way (status `exit_codes.INTERRUPTED`); a second Ctrl-C stops at once.

  with PreemptionWatcher() as watcher:
    ...
    if watcher.should_stop(step):  # on every process, once per step
      save(step); raise watcher.stopped(step)
"""

from __future__ import annotations

import signal

import jax
import orbax.checkpoint as ocp
from absl import logging


class Preempted(Exception):
  """Training stopped on a preemption notice (`signum` SIGTERM) or Ctrl-C (SIGINT); `step` is the
  step it saved (None: it stopped before taking a step, with nothing new to save).
  `python -m preflmr_jax.main` exits with `exit_codes.PREEMPTED` or `exit_codes.INTERRUPTED`."""

  def __init__(self, step: int | None, signum: int = signal.SIGTERM):
    self.step, self.signum = step, signum
    what = "interrupted" if signum == signal.SIGINT else "preempted"
    super().__init__(f"{what}: saved step {step}, rerun to resume" if step is not None else
                     f"{what} before the first step: nothing new to save, rerun to resume")


class PreemptionWatcher:
  """Turns a preemption notice (SIGTERM) into `should_stop(step)`, so the loop saves and exits.

  One process: SIGTERM and SIGINT (Ctrl-C) handlers set a flag. Several processes: all hosts must
  stop at the same step, so ask JAX's preemption sync service, which runs its own SIGTERM
  notifier; a Python handler would replace that notifier, so none is installed there (and Ctrl-C
  stops a process without saving).
  """

  def __init__(self):
    self._stop = self._interrupted = False
    self._signum = signal.SIGTERM
    self._multihost = jax.process_count() > 1
    self._previous = {}
    if not self._multihost:
      # A process started with Ctrl-C ignored (`nohup ... &`) keeps ignoring it.
      signals = [signal.SIGTERM] + [signal.SIGINT] * (
          signal.getsignal(signal.SIGINT) is not signal.SIG_IGN)
      self._previous = {s: signal.signal(s, self._on_signal) for s in signals}

  def _on_signal(self, signum, frame):
    del frame
    if signum == signal.SIGINT:
      if self._interrupted:
        raise KeyboardInterrupt  # a second Ctrl-C: no checkpoint, stop now
      self._interrupted = True
      logging.warning("Ctrl-C: checkpointing and stopping at the next step boundary (Ctrl-C "
                      "again to stop at once, without it)")
    else:  # schedulers may repeat it (SLURM's --signal, a second `kill`)
      logging.warning("SIGTERM received: %s at the next step boundary",
                      "already stopping" if self._stop else "checkpointing and stopping")
    if not self._stop:  # the first signal says what stopped the run (and its exit status)
      self._stop, self._signum = True, signum

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
      raise self.stopped(None)

  def stopped(self, step: int | None) -> Preempted:
    """The exception that ends training after `should_stop` (`step` saved)."""
    return Preempted(step, self._signum)

  def close(self) -> None:
    for signum, previous in self._previous.items():
      # None: the old handler was not set from Python; the default is the best we can put back.
      signal.signal(signum, signal.SIG_DFL if previous is None else previous)
    self._previous = {}

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
