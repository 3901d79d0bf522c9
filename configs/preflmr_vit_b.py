"""The PreFLMR_ViT-B release shape: CLIP ViT-B/32, 326.7M parameters (both BERT-base text encoders included).

  python -m preflmr_jax.tools.count_params --config configs/preflmr_vit_b.py
"""

from preflmr_jax import config_defaults


def get_config(arg=None):
  del arg
  config = config_defaults.base_config()
  config.model = config_defaults.model_dict(text="base", vision="B/32")
  return config
