"""Entry point.

  python -m preflmr_jax.main --config configs/tiny.py [--workdir DIR] [--config.key=value ...]

For now it encodes sample queries and passages and prints their scores (preflmr_jax/demo.py);
the trainer takes over this entry point when it lands.
"""

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from preflmr_jax import demo

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (path[:arg]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for outputs.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  if config.get("distributed"):
    jax.distributed.initialize()
  logging.info("JAX process %d/%d, %d local devices", jax.process_index(), jax.process_count(),
               jax.local_device_count())
  demo.run(config, _WORKDIR.value)


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  app.run(main)
