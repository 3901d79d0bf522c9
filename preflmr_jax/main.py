"""Entry point: train a config in a workdir (evaluation: `python -m preflmr_jax.evaluate`).

  python -m preflmr_jax.main --config configs/tiny.py --workdir /tmp/preflmr_tiny [--config.key=value]

Running it again on the same workdir resumes from the last complete checkpoint (raise
`--config.num_train_steps` to train further). Exit status: 0 finished, 143 preempted (SIGTERM:
the current step is saved; rerun to resume), 130 interrupted (Ctrl-C, one process: the same; a
second Ctrl-C stops at once), 2 a user error (one line: a bad config value, flag or
path), 1 failed (exit_codes.py). What it prints: cli.py.
"""

import signal
import sys
import time

import jax
from absl import flags, logging
from ml_collections import config_flags

from preflmr_jax import cli, exit_codes, preemption, sharding, train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (path[:arg]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")


def main(argv):
  del argv  # cli.run refuses extra arguments
  config = _CONFIG.value
  if config.get("distributed"):
    sharding.initialize_distributed()
    logging.info("JAX process %d/%d, %d local devices, %d in all", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count())
  start = time.monotonic()
  try:
    last = train.train_and_evaluate(config, _WORKDIR.value)
    if last:  # else nothing to train, and the trainer said so
      shown = ", ".join(f"{k}={last[k]:.4g}" for k in ("loss", "accuracy") if k in last)
      logging.info("done: step %d in %s (%s); checkpoints, metrics.jsonl and TensorBoard events "
                   "in %s", config.num_train_steps, cli.duration(time.monotonic() - start), shown,
                   _WORKDIR.value)
  except preemption.Preempted as e:  # a scheduler restarts on this status, not on a failure
    logging.warning("%s", e)
    sys.exit(exit_codes.INTERRUPTED if e.signum == signal.SIGINT else exit_codes.PREEMPTED)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  cli.run(main, outputs=["workdir"])
