"""PreFLMR training stage 1: only the mapping structures train (DESIGN.md section 2).

  python -m preflmr_jax.main --config configs/stage1.py:<shape> --workdir DIR

<shape>: "tiny" (default; configs/tiny.py's model, a CPU smoke run) or "vit_b" / "vit_l" / "vit_g"
(the release shapes of configs/preflmr_vit_*.py). The vision MLP, the mapping network and their
input / output linears train at mapping_learning_rate; vision, both text encoders and both text
heads are frozen (no optimiser state). The late-interaction output is the [MLP; mapping] tokens
only: text reaches it through the mapping network's cross-attention.
"""

import os

from preflmr_jax import config_files


def apply(config):
  """The stage-1 recipe on any model config (also used by the sweeps in configs/sweeps/)."""
  config.model.output = "mapping_only"
  config.freeze = ("query_text", "document_text", "query_head", "document_head", "vision")
  config.optimizer.mapping_learning_rate = 1e-4  # DESIGN.md section 2
  return config


def get_config(arg=None):
  # The model shape by name: configs/shapes.py.
  return apply(config_files.load_config(f"{os.path.dirname(__file__)}/shapes.py:{arg or 'tiny'}"))
