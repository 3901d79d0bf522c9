"""Entry point: train (and, as later issues land, evaluate) a config in a workdir.

  python -m preflmr_jax.main --config configs/tiny.py --workdir /tmp/preflmr_tiny [--config.key=value]

Running it again on the same workdir resumes from the last complete checkpoint (raise
`--config.num_train_steps` to train further). Exit status: 0 finished, 143 preempted (SIGTERM:
the current step is saved; rerun to resume), 1 failed (exit_codes.py).
"""

import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from preflmr_jax import checkpointing, exit_codes, sharding, train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (path[:arg]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  if config.get("distributed"):
    sharding.initialize_distributed()
  logging.info("JAX process %d/%d, %d local devices, %d in all", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  try:
    train.train_and_evaluate(config, _WORKDIR.value)
  except checkpointing.Preempted as e:  # a scheduler restarts on this status, not on a failure
    logging.warning("%s", e)
    sys.exit(exit_codes.PREEMPTED)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
