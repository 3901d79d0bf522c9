"""The PreFLMR_ViT-G release shape: OpenCLIP ViT-bigG/14, 2.085B parameters (both BERT-base text encoders included).

  python -m preflmr_jax.tools.count_params --config configs/preflmr_vit_g.py
"""

from preflmr_jax import config_defaults


def get_config(arg=None):
  del arg
  config = config_defaults.base_config()
  config.model = config_defaults.model_dict(text="base", vision="bigG/14")
  return config
