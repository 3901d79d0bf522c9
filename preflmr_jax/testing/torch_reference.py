"""The PyTorch reference PreFLMR: `transformers` modules under the published checkpoint's names,
and the official encoding recipe over them. Tests compare our Flax model with it; the CPU
benchmarks time it.

  reference = TorchPreFLMR(config)           # random weights, any PreFLMRConfig shape
  params = flax_params(reference, config)    # the same weights as our params tree
  q, q_mask = reference.queries(ids, mask, pixels_nchw)

The BERT encoders and the CLIP tower run on PyTorch's fused (sdpa) attention by default. The
mapping layers keep eager attention: each is a decoder `BertLayer` (transformers needs `is_decoder`
for cross-attention), and sdpa would make its unmasked self-attention causal.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np
import torch
import transformers
from flax import traverse_util
from transformers.models.bert.modeling_bert import BertLayer

from preflmr_jax import conversion
from preflmr_jax.models import preflmr
from preflmr_jax.models.model_config import PreFLMRConfig, TextConfig, VisionConfig


def state_dict_numpy(module: torch.nn.Module) -> dict[str, np.ndarray]:
  return {k: v.detach().cpu().numpy() for k, v in module.state_dict().items()}


def abstract_shapes(module: nn.Module, *args, **kwargs) -> dict[str, tuple[int, ...]]:
  """Flat "/"-path -> shape of a Flax `module`'s params, computed without allocating."""
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


def randomize_(module: torch.nn.Module, std: float = 0.2, seed: int = 1) -> torch.nn.Module:
  """Non-trivial values everywhere (transformers' init leaves LayerNorms at 1/0 and biases at 0);
  returns the module in eval mode."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      offset = 1.0 if "norm" in name.lower() and name.endswith("weight") else 0.0
      p.copy_(torch.randn(p.shape, generator=gen) * std + offset)
  return module.eval()


def clip_state_dict_published(model: transformers.CLIPVisionModel) -> dict[str, np.ndarray]:
  """CLIPVisionModel weights named as the published checkpoints name them (`vision_model.` inner
  prefix, which transformers 5.x leaves out of `state_dict()`)."""
  return {k if k.startswith("vision_model.") else f"vision_model.{k}": v
          for k, v in state_dict_numpy(model).items()}


def to_torch(x) -> torch.Tensor:
  return torch.from_numpy(np.asarray(x))


def nchw(pixel_values_nhwc) -> torch.Tensor:
  """Our NHWC pixels as the NCHW tensor CLIP takes."""
  return to_torch(np.asarray(pixel_values_nhwc).transpose(0, 3, 1, 2).copy())


class TorchPreFLMR(torch.nn.Module):
  """PreFLMR's modules under the published checkpoint's names, and its two encoding paths."""

  def __init__(self, config: PreFLMRConfig, attention: str = "sdpa", std: float = 0.02):
    super().__init__()
    c = self.config = config
    if c.query_skip_token_ids:
      raise NotImplementedError("query_skip_token_ids are not part of the reference")
    self.qbert = transformers.BertModel(hf_bert_config(c.text))
    self.cbert = transformers.BertModel(hf_bert_config(c.text))
    self.qlin = torch.nn.Linear(c.text.hidden_size, c.dim, bias=False)
    self.clin = torch.nn.Linear(c.text.hidden_size, c.dim, bias=False)
    self.clip = transformers.CLIPVisionModel(hf_clip_config(c.vision))
    width = c.dim * c.mapping_prefix_length
    self.mlp = torch.nn.Sequential(torch.nn.Linear(c.vision.hidden_size, width // 2),
                                   torch.nn.Tanh(), torch.nn.Linear(width // 2, width))
    self.map_in = torch.nn.Linear(c.vision.hidden_size, c.mapping.hidden_size)
    layer_config = hf_bert_config(c.mapping, is_decoder=True, add_cross_attention=True)
    self.map_layers = torch.nn.ModuleList(
        [BertLayer(layer_config, layer_idx=i) for i in range(c.mapping.num_layers)])
    self.map_out = torch.nn.Linear(c.mapping.hidden_size, c.dim)
    randomize_(self, std=std)
    for model in (self.qbert, self.cbert, self.clip):
      model.set_attn_implementation(attention)

  def published_state_dict(self) -> dict[str, np.ndarray]:
    """The weights as NumPy arrays under the published PreFLMR names."""
    sd = lambda m, prefix: {f"{prefix}.{k}": v for k, v in state_dict_numpy(m).items()}
    state = {**sd(self.qbert, "query_text_encoder.bert_model"),
             **sd(self.cbert, "context_text_encoder.bert_model"),
             **sd(self.qlin, "query_text_encoder_linear"),
             **sd(self.clin, "context_text_encoder_linear"),
             **sd(self.mlp, "context_vision_projection.model"),
             **sd(self.map_in, "transformer_mapping_input_linear"),
             **sd(self.map_layers, "transformer_mapping_network.layer"),
             **sd(self.map_out, "transformer_mapping_output_linear")}
    for k, v in clip_state_dict_published(self.clip).items():
      state[f"context_vision_encoder.vision_model.{k}"] = v
    return state

  def text_token_mask(self, ids: torch.Tensor) -> torch.Tensor:
    """Keep position i when id != 0 and (i < 2 or i is after the first instruction token): the
    official query mask zeroes the instruction from position 2 to its first ":" inclusive."""
    keep = ids != 0
    if self.config.mask_instruction_token:
      is_colon = ids == self.config.instruction_token_id
      first = is_colon.int().argmax(1, keepdim=True)
      pos = torch.arange(ids.shape[1])[None]
      keep &= ~is_colon.any(1, keepdim=True) | (pos < 2) | (pos > first)
    return keep.float()

  @torch.inference_mode()
  def queries(self, ids: torch.Tensor, mask: torch.Tensor, pixels_nchw: torch.Tensor,
              output: str | None = None):
    """-> (Q [B, query_length, dim], Q_mask [B, query_length]), ids / mask int64. The text tokens
    lead unless `output` (default `config.output`) is "mapping_only" (stage 1)."""
    c = self.config
    hidden = self.qbert(input_ids=ids, attention_mask=mask).last_hidden_state
    keep = self.text_token_mask(ids)
    text = self.qlin(hidden) * keep[..., None]
    vision = self.clip(pixel_values=pixels_nchw, output_hidden_states=True)
    prefix = self.mlp(vision.last_hidden_state[:, 0]).view(len(ids), c.mapping_prefix_length, c.dim)
    m = self.map_in(vision.hidden_states[-2][:, 1:])
    cross = hidden[:, :c.mapping_cross_attention_length]
    for layer in self.map_layers:
      m = layer(m, encoder_hidden_states=cross)
      m = m[0] if isinstance(m, tuple) else m
    m = self.map_out(m)
    parts, masks = [prefix, m], [torch.ones(len(ids), prefix.shape[1] + m.shape[1])]
    if (output or c.output) != "mapping_only":
      parts, masks = [text] + parts, [keep] + masks
    q = torch.nn.functional.normalize(torch.cat(parts, 1), p=2, dim=2)
    return q, torch.cat(masks, 1)

  @torch.inference_mode()
  def documents(self, ids: torch.Tensor, mask: torch.Tensor):
    """-> (D [N, Ld, dim], D_mask [N, Ld]): [PAD] and single-punctuation tokens zeroed."""
    c = self.config
    hidden = self.cbert(input_ids=ids, attention_mask=mask).last_hidden_state
    keep = ids != 0
    if c.mask_punctuation:
      keep &= ~torch.isin(ids, torch.tensor(c.skip_token_ids, dtype=ids.dtype))
    keep = keep.float()
    d = self.clin(hidden) * keep[..., None]
    return torch.nn.functional.normalize(d, p=2, dim=2), keep


def flax_params(model: TorchPreFLMR, config: PreFLMRConfig):
  """Our params tree holding `model`'s weights (the checkpoint import path, shapes checked)."""
  abstract = traverse_util.flatten_dict(preflmr.abstract_params(config), sep="/")
  expected = {k: v.shape for k, v in abstract.items()}
  params = conversion.torch_to_flax(model.published_state_dict(), conversion.preflmr_rules(config),
                                    expected_shapes=expected)
  return jax.device_put(params)
