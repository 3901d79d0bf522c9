"""PreFLMR training stage 1: only the mapping structures train (DESIGN.md section 2).

  python -m preflmr_jax.main --config configs/stage1.py:<shape> --workdir DIR

<shape>: "tiny" (default; configs/tiny.py's model, a CPU smoke run) or "vit_b" / "vit_l" / "vit_g"
(the release shapes of configs/preflmr_vit_*.py). The vision MLP, the mapping network and their
input / output linears train at mapping_learning_rate; vision, both text encoders and both text
heads are frozen (no optimiser state). The late-interaction output is the [MLP; mapping] tokens
only: text reaches it through the mapping network's cross-attention.
"""

import importlib.util
import os

SHAPES = {"tiny": "tiny.py", "vit_b": "preflmr_vit_b.py", "vit_l": "preflmr_vit_l.py",
          "vit_g": "preflmr_vit_g.py"}


def shape_config(arg):
  """get_config() of the config file in this folder that holds the model shape `arg`."""
  shape = arg or "tiny"
  if shape not in SHAPES:
    raise ValueError(f"{os.path.basename(__file__)}: unknown shape {shape!r}; "
                     f"use one of {list(SHAPES)}")
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), SHAPES[shape])
  spec = importlib.util.spec_from_file_location(f"preflmr_configs_{shape}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def get_config(arg=None):
  config = shape_config(arg)
  config.model.output = "mapping_only"
  config.freeze = ("query_text", "document_text", "query_head", "document_head", "vision")
  config.optimizer.mapping_learning_rate = 1e-4  # DESIGN.md section 2
  return config
