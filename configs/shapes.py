"""The model shapes the stage presets (configs/stage1.py .. stage3.py) train, by name.

  python -m preflmr_jax.main --config configs/shapes.py:vit_l --workdir DIR

"tiny" (default; configs/tiny.py, a CPU smoke run) or "vit_b" / "vit_l" / "vit_g" (the release
shapes of configs/preflmr_vit_*.py): that file's config, unchanged.
"""

import os

from preflmr_jax import config_files

SHAPES = {"tiny": "tiny.py", "vit_b": "preflmr_vit_b.py", "vit_l": "preflmr_vit_l.py",
          "vit_g": "preflmr_vit_g.py"}


def get_config(arg=None):
  shape = arg or "tiny"
  if shape not in SHAPES:
    raise ValueError(f"unknown model shape {shape!r} (configs/shapes.py); use one of {list(SHAPES)}")
  return config_files.load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                               SHAPES[shape]))
