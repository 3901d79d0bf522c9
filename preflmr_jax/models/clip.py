"""CLIP vision transformer with HF `CLIPVisionModel` semantics (pre-LayerNorm), NHWC pixels."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from preflmr_jax.models import layers
from preflmr_jax.models.model_config import VisionConfig

Dtype = Any


class ClipLayer(nn.Module):
  config: VisionConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention: str = "xla"  # layers.ATTENTION_IMPLEMENTATIONS

  @nn.compact
  def __call__(self, x, mask, deterministic: bool):
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = layers.layer_norm(c.layer_norm_eps, name="layer_norm1", **kw)(x)
    x = x + layers.MultiHeadAttention(c.hidden_size, c.num_heads, c.attention_dropout_rate,
                                      attention=self.attention, name="attention", **kw)(
                                          h, None, mask, deterministic)
    h = layers.layer_norm(c.layer_norm_eps, name="layer_norm2", **kw)(x)
    x = x + layers.Mlp(c.hidden_size, c.intermediate_size, c.hidden_act, name="mlp", **kw)(h)
    return layers.constrain(x, "act_batch", "act_length", "act_embed")


class ClipVisionModel(nn.Module):
  """Returns (hidden_states, pooler_output).

  hidden_states is a tuple of num_layers + 1 arrays [B, 1 + patches, H]: index 0 is the embedding output
  after `pre_layrnorm`, the last is HF's `last_hidden_state` (no `post_layernorm`). pooler_output is
  `post_layernorm` of the last CLS state. Under jit, hidden states nobody reads cost nothing.
  """

  config: VisionConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: bool = False
  remat_policy: str = "nothing_saveable"
  attention: str = "xla"  # layers.ATTENTION_IMPLEMENTATIONS

  @nn.compact
  def __call__(self, pixel_values, deterministic: bool = True):
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    expected = (c.image_size, c.image_size, c.num_channels)
    if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != expected:
      raise ValueError(f"pixel_values must be NHWC [B, {c.image_size}, {c.image_size}, "
                       f"{c.num_channels}], got shape {tuple(pixel_values.shape)}")
    batch = pixel_values.shape[0]

    patches = nn.Conv(
        c.hidden_size, (c.patch_size, c.patch_size), strides=(c.patch_size, c.patch_size),
        padding="VALID", use_bias=False, name="patch_embedding",
        kernel_init=nn.with_logical_partitioning(layers.default_kernel_init,
                                                 (None, None, None, "embed")),
        **kw)(pixel_values.astype(self.dtype))
    patches = patches.reshape(batch, -1, c.hidden_size)
    cls = self.param("class_embedding",
                     nn.with_logical_partitioning(layers.default_kernel_init, ("embed",)),
                     (c.hidden_size,), self.param_dtype)
    positions = self.param("position_embedding",
                           nn.with_logical_partitioning(layers.default_kernel_init,
                                                        ("position", "embed")),
                           (c.num_patches + 1, c.hidden_size), self.param_dtype)
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (batch, 1, c.hidden_size)),
                         patches], axis=1)
    x = x + positions.astype(self.dtype)[None]
    x = layers.layer_norm(c.layer_norm_eps, name="pre_layrnorm", **kw)(x)
    x = layers.constrain(x, "act_batch", "act_length", "act_embed")

    layer_cls = layers.maybe_remat(ClipLayer, self.remat, self.remat_policy, static_argnums=(3,))
    hidden_states = [x]
    for i in range(c.num_layers):
      x = layer_cls(c, attention=self.attention, name=f"layer_{i}", **kw)(x, None, deterministic)
      hidden_states.append(x)
    pooled = layers.layer_norm(c.layer_norm_eps, name="post_layernorm", **kw)(x[:, 0])
    return tuple(hidden_states), pooled


__all__ = ["ClipLayer", "ClipVisionModel"]
