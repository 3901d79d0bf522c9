"""Parameter counts of a config, computed with `jax.eval_shape` (nothing is allocated).

  python -m preflmr_jax.tools.count_params --config configs/release.py:vit_l

Prints a table, then one JSON object as the last line of stdout.
"""

from __future__ import annotations

import json
import math

import jax
from absl import flags
from ml_collections import config_flags

from preflmr_jax import cli
from preflmr_jax.models import model_config as mc
from preflmr_jax.models import param_groups, preflmr

# Reported components: groups and unions of models/param_groups.py that cover every group once.
COMPONENTS = ("vision", "query_text", "document_text", "mapping", "heads")


def count_params(model_config: mc.PreFLMRConfig) -> dict[str, int]:
  """{"total": n, <component>: n, ...} from abstract shapes."""
  shapes = preflmr.abstract_params(model_config)
  counts = dict.fromkeys(COMPONENTS, 0)
  for name, subtree in shapes.items():
    owner = [c for c in COMPONENTS if param_groups.in_group(name, c)]
    if len(owner) != 1:
      raise AssertionError(f"top-level param key {name!r} is in components {owner}, not one")
    counts[owner[0]] += sum(math.prod(x.shape) for x in jax.tree.leaves(subtree))
  return {"total": sum(counts.values()), **counts}


def main(argv):
  del argv
  counts = count_params(mc.PreFLMRConfig.from_dict(flags.FLAGS.config.model))
  for name, n in counts.items():
    print(f"{name:>14s} {n:>15,d}  ({n / 1e6:9.2f}M)")
  print(json.dumps(counts))


if __name__ == "__main__":
  config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
  flags.mark_flag_as_required("config")
  cli.run(main)
