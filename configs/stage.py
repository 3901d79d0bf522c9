"""PreFLMR training stage N on a model shape (preflmr_jax/recipe.py; docs/recipe.md).

  python -m preflmr_jax.main --config configs/stage.py:N[,shape] --workdir DIR

N: 1 (only the mapping structures train), 2 (intermediate KB-VQA training on E-VQA) or 3
(multi-task training on all M2KR training sets); start stage N+1 from stage N's run with
`--config.init_params_from=DIR`. shape: "tiny" (default; configs/tiny.py's model on SAMPLE, a CPU
smoke run) or "vit_b" / "vit_l" / "vit_g" (the release shapes of configs/release.py, on the
official task mixture of the stage). Every stage carries the official training's settings
(recipe.published).
"""

from preflmr_jax import config_defaults, config_files, recipe

SHAPES = ("tiny", *config_defaults.RELEASE_SHAPES)


def get_config(arg=None):
  arg = config_files.parse_arg(arg, where="configs/stage.py", stage=0, shape="tiny")
  if arg.stage not in recipe.STAGES:
    raise ValueError(f"configs/stage.py: stage={arg.stage} is not one of {list(recipe.STAGES)}; "
                     "use configs/stage.py:N[,shape]")
  if arg.shape not in SHAPES:
    raise ValueError(f"configs/stage.py: shape={arg.shape!r} is not one of {list(SHAPES)}")
  if arg.shape == "tiny":
    config = config_defaults.tiny_config()
  else:
    config = config_defaults.release_config(arg.shape)
    config.data.tasks = recipe.TASKS[arg.stage]
  return recipe.published(recipe.apply(config, arg.stage))
