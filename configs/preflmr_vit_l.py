"""The PreFLMR_ViT-L release shape: CLIP ViT-L/14, 543.2M parameters (both BERT-base text encoders included).

  python -m preflmr_jax.tools.count_params --config configs/preflmr_vit_l.py
"""

from preflmr_jax import config_defaults


def get_config(arg=None):
  del arg
  config = config_defaults.base_config()
  config.model = config_defaults.model_dict(text="base", vision="L/14")
  return config
