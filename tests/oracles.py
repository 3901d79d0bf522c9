"""PyTorch oracles (transformers modules) and helpers to compare them with our Flax modules."""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np
import torch
import transformers
from flax import traverse_util

from preflmr_jax.models.model_config import TextConfig, VisionConfig

torch.manual_seed(0)


def state_dict_numpy(module: torch.nn.Module) -> dict[str, np.ndarray]:
  return {k: v.detach().cpu().numpy() for k, v in module.state_dict().items()}


def abstract_shapes(module: nn.Module, *args, **kwargs) -> dict[str, tuple[int, ...]]:
  """Flat "/"-path -> shape of `module`'s params, computed without allocating."""
  variables = jax.eval_shape(lambda: module.init(jax.random.key(0), *args, **kwargs))
  params = nn.meta.unbox(variables["params"])
  return {k: v.shape for k, v in traverse_util.flatten_dict(params, sep="/").items()}


def hf_bert_config(c: TextConfig, **kwargs) -> transformers.BertConfig:
  return transformers.BertConfig(
      vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_hidden_layers=c.num_layers,
      num_attention_heads=c.num_heads, intermediate_size=c.intermediate_size,
      max_position_embeddings=c.max_position_embeddings, type_vocab_size=c.type_vocab_size,
      layer_norm_eps=c.layer_norm_eps, hidden_act=c.hidden_act, attn_implementation="eager",
      **kwargs)


def hf_clip_config(c: VisionConfig) -> transformers.CLIPVisionConfig:
  return transformers.CLIPVisionConfig(
      hidden_size=c.hidden_size, num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
      intermediate_size=c.intermediate_size, patch_size=c.patch_size, image_size=c.image_size,
      num_channels=c.num_channels, hidden_act=c.hidden_act, layer_norm_eps=c.layer_norm_eps,
      attn_implementation="eager")


def randomize_(module: torch.nn.Module, std: float = 0.2) -> torch.nn.Module:
  """Non-trivial values everywhere (HF init leaves LayerNorms at 1/0 and biases at 0)."""
  gen = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for name, p in module.named_parameters():
      offset = 1.0 if "norm" in name.lower() and name.endswith("weight") else 0.0
      p.copy_(torch.randn(p.shape, generator=gen) * std + offset)
  return module.eval()


def clip_state_dict_published(model: transformers.CLIPVisionModel) -> dict[str, np.ndarray]:
  """CLIPVisionModel weights named as transformers 4.x saved them (`vision_model.` inner prefix).

  transformers 5.x drops that prefix in `state_dict()`; the published checkpoints have it.
  """
  out = {}
  for k, v in state_dict_numpy(model).items():
    out[k if k.startswith("vision_model.") else f"vision_model.{k}"] = v
  return out


def to_torch(x) -> torch.Tensor:
  return torch.from_numpy(np.asarray(x))


def nchw(pixel_values_nhwc) -> torch.Tensor:
  return to_torch(np.asarray(pixel_values_nhwc).transpose(0, 3, 1, 2).copy())
