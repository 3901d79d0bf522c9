"""PreFLMR training stage 2: intermediate KB-VQA training (E-VQA in the paper; docs/recipe.md).

  python -m preflmr_jax.main --config configs/stage2.py:<shape> --workdir DIR

<shape>: "tiny" (default; configs/tiny.py's model, a CPU smoke run) or "vit_b" / "vit_l" / "vit_g"
(the release shapes of configs/preflmr_vit_*.py). Everything but the vision tower trains (text
encoders and heads at learning_rate, mapping structures at mapping_learning_rate); the full
[text; MLP; mapping] query output is used. Start from a stage-1 run with
`--config.init_params_from=STAGE1_DIR`.
"""

import os

from preflmr_jax import config_files


def get_config(arg=None):
  # The model shape by name: configs/shapes.py.
  config = config_files.load_config(f"{os.path.dirname(__file__)}/shapes.py:{arg or 'tiny'}")
  config.model.output = "full"
  config.freeze = ("vision",)
  # E-VQA only: the official stage-2 config trains and validates (PseudoRecall@5) on it.
  config.data.tasks = "E-VQA" if arg not in (None, "tiny") else "SAMPLE"
  config_files.load_module(f"{os.path.dirname(__file__)}/stage1.py").published(config)
  return config
