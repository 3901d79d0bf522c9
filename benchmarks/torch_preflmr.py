"""A PyTorch PreFLMR of any shape, assembled from `transformers` modules, and our params from it.

The reference side of `benchmarks/run.py`'s encoding rows: the same recipe
as the tiny oracle in tests/test_pretrained.py, written for any `PreFLMRConfig` and vectorised
(no per-row Python), with the BERT encoders and the CLIP tower on PyTorch's fused (sdpa)
attention. The mapping layer keeps eager attention: it is a decoder `BertLayer` (HF needs
`is_decoder` for cross-attention), and sdpa would make its unmasked self-attention causal.

  model = TorchPreFLMR(config)          # random weights (N(0, 0.02); LayerNorm scales ~1)
  params = flax_params(model, config)   # the same weights as our params tree
"""

from __future__ import annotations

import os
import sys

import jax
import numpy as np
import torch
import transformers
from flax import traverse_util
from transformers.models.bert.modeling_bert import BertLayer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run from a checkout without installing the package
sys.path.insert(0, os.path.join(ROOT, "tests"))  # tests/oracles.py: HF configs from ours

import oracles  # noqa: E402
from preflmr_jax import conversion  # noqa: E402
from preflmr_jax.models import preflmr  # noqa: E402
from preflmr_jax.models.model_config import PreFLMRConfig  # noqa: E402


class TorchPreFLMR(torch.nn.Module):
  """PreFLMR's modules under the published checkpoint's names, and its two encoding paths."""

  def __init__(self, config: PreFLMRConfig, attention: str = "sdpa", std: float = 0.02):
    super().__init__()
    c = self.config = config
    if c.query_skip_token_ids:
      raise NotImplementedError("query_skip_token_ids are not part of the reference")
    self.qbert = transformers.BertModel(oracles.hf_bert_config(c.text))
    self.cbert = transformers.BertModel(oracles.hf_bert_config(c.text))
    self.qlin = torch.nn.Linear(c.text.hidden_size, c.dim, bias=False)
    self.clin = torch.nn.Linear(c.text.hidden_size, c.dim, bias=False)
    self.clip = transformers.CLIPVisionModel(oracles.hf_clip_config(c.vision))
    width = c.dim * c.mapping_prefix_length
    self.mlp = torch.nn.Sequential(torch.nn.Linear(c.vision.hidden_size, width // 2),
                                   torch.nn.Tanh(), torch.nn.Linear(width // 2, width))
    self.map_in = torch.nn.Linear(c.vision.hidden_size, c.mapping.hidden_size)
    layer_config = oracles.hf_bert_config(c.mapping, is_decoder=True, add_cross_attention=True)
    self.map_layers = torch.nn.ModuleList(
        [BertLayer(layer_config, layer_idx=i) for i in range(c.mapping.num_layers)])
    self.map_out = torch.nn.Linear(c.mapping.hidden_size, c.dim)
    oracles.randomize_(self, std=std)  # non-trivial biases and LayerNorms; also sets eval()
    for model in (self.qbert, self.cbert, self.clip):
      model.set_attn_implementation(attention)

  def published_state_dict(self) -> dict[str, np.ndarray]:
    """The weights as NumPy arrays under the published PreFLMR names."""
    sd = lambda m, prefix: {f"{prefix}.{k}": v for k, v in oracles.state_dict_numpy(m).items()}
    state = {**sd(self.qbert, "query_text_encoder.bert_model"),
             **sd(self.cbert, "context_text_encoder.bert_model"),
             **sd(self.qlin, "query_text_encoder_linear"),
             **sd(self.clin, "context_text_encoder_linear"),
             **sd(self.mlp, "context_vision_projection.model"),
             **sd(self.map_in, "transformer_mapping_input_linear"),
             **sd(self.map_layers, "transformer_mapping_network.layer"),
             **sd(self.map_out, "transformer_mapping_output_linear")}
    for k, v in oracles.clip_state_dict_published(self.clip).items():
      state[f"context_vision_encoder.vision_model.{k}"] = v
    return state

  def text_token_mask(self, ids: torch.Tensor) -> torch.Tensor:
    """Keep position i when id != 0 and (i < 2 or i is after the first instruction ":")."""
    keep = ids != 0
    if self.config.mask_instruction_token:
      is_colon = ids == self.config.instruction_token_id
      first = is_colon.int().argmax(1, keepdim=True)
      pos = torch.arange(ids.shape[1])[None]
      keep &= ~is_colon.any(1, keepdim=True) | (pos < 2) | (pos > first)
    return keep.float()

  @torch.inference_mode()
  def queries(self, ids: torch.Tensor, mask: torch.Tensor, pixels_nchw: torch.Tensor):
    """-> (Q [B, query_length, dim], Q_mask [B, query_length]), ids / mask int64."""
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
    if c.output != "mapping_only":
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
