"""PreFLMR training stage 2: intermediate KB-VQA training (E-VQA in the paper; DESIGN.md section 2).

  python -m preflmr_jax.main --config configs/stage2.py:<shape> --workdir DIR

<shape>: "tiny" (default; configs/tiny.py's model, a CPU smoke run) or "vit_b" / "vit_l" / "vit_g"
(the release shapes of configs/preflmr_vit_*.py). Everything but the vision tower trains (text
encoders and heads at learning_rate, mapping structures at mapping_learning_rate); the full
[text; MLP; mapping] query output is used. Start from a stage-1 run with
`--config.init_params_from=STAGE1_DIR`.
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
  config.model.output = "full"
  config.freeze = ("vision",)
  # Learning rates: DESIGN.md section 2 ("1e-5 typical" for the rest). The paper's per-stage values
  # were not found in the sources searchable here; the official FLMR fine-tuning example
  # (LinWeizheDragon/FLMR examples/example_finetune_preflmr.py) uses AdamW at 1e-5 with a linear
  # schedule and an optional frozen ViT. The mapping structures' 1e-5 is unverified.
  config.optimizer.learning_rate = 1e-5
  config.optimizer.mapping_learning_rate = 1e-5
  return config
