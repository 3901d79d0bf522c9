"""The PreFLMR release shapes, by name (both BERT-base text encoders included in the counts):

  vit_b: PreFLMR_ViT-B, CLIP ViT-B/32, 326.7M parameters
  vit_l: PreFLMR_ViT-L, CLIP ViT-L/14, 543.2M parameters (default)
  vit_g: PreFLMR_ViT-G, OpenCLIP ViT-bigG/14, 2.085B parameters

  python -m preflmr_jax.tools.count_params --config configs/release.py:vit_l

Training them: configs/stage.py:N,vit_l (docs/recipe.md).
"""

from preflmr_jax import config_defaults, config_files


def get_config(arg=None):
  arg = config_files.parse_arg(arg, where="configs/release.py", shape="vit_l")
  if arg.shape not in config_defaults.RELEASE_SHAPES:
    raise ValueError(f"configs/release.py: shape={arg.shape!r} is not one of "
                     f"{list(config_defaults.RELEASE_SHAPES)}")
  return config_defaults.release_config(arg.shape)
