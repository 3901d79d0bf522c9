"""CLIP vision transformer with HF `CLIPVisionModel` semantics (pre-LayerNorm), NHWC pixels."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from preflmr_jax.models import layers
from preflmr_jax.models.layers import Execution
from preflmr_jax.models.model_config import VisionConfig


class ClipLayer(nn.Module):
  config: VisionConfig
  execution: Execution = Execution()

  @nn.compact
  def __call__(self, x, mask, deterministic: bool):
    c, ex = self.config, self.execution
    h = layers.layer_norm(c.layer_norm_eps, ex, name="layer_norm1")(x)
    x = x + layers.MultiHeadAttention(c.hidden_size, c.num_heads, c.attention_dropout_rate, ex,
                                      name="attention")(h, None, mask, deterministic)
    h = layers.layer_norm(c.layer_norm_eps, ex, name="layer_norm2")(x)
    x = x + layers.Mlp(c.hidden_size, c.intermediate_size, c.hidden_act, ex, name="mlp")(h)
    return layers.constrain(x, "act_batch", "act_length", "act_embed")


class ClipVisionModel(nn.Module):
  """Returns (last_hidden_state, penultimate_hidden_state, pooler_output).

  The hidden states are [B, 1 + patches, H]: HF's `last_hidden_state` (no `post_layernorm`) and
  HF's `hidden_states[-2]` (the last layer's input). pooler_output is `post_layernorm` of the last
  CLS state.
  """

  config: VisionConfig
  execution: Execution = Execution()

  @nn.compact
  def __call__(self, pixel_values, deterministic: bool = True):
    c, ex = self.config, self.execution
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
        dtype=ex.compute_dtype, param_dtype=ex.weight_dtype)(pixel_values.astype(ex.compute_dtype))
    patches = patches.reshape(batch, -1, c.hidden_size)
    cls = self.param("class_embedding",
                     nn.with_logical_partitioning(layers.default_kernel_init, ("embed",)),
                     (c.hidden_size,), ex.weight_dtype)
    positions = self.param("position_embedding",
                           nn.with_logical_partitioning(layers.default_kernel_init,
                                                        ("position", "embed")),
                           (c.num_patches + 1, c.hidden_size), ex.weight_dtype)
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(ex.compute_dtype), (batch, 1, c.hidden_size)),
                         patches], axis=1)
    x = x + positions.astype(ex.compute_dtype)[None]
    x = layers.layer_norm(c.layer_norm_eps, ex, name="pre_layrnorm")(x)
    x = layers.constrain(x, "act_batch", "act_length", "act_embed")

    # static_argnums counts `self` as 0: (x=1, mask=2, deterministic=3).
    stack = layers.layer_stack(ClipLayer, c.num_layers, ex, c, ex, static_argnums=(3,))
    last, penultimate = layers.apply_stack(stack, c.num_layers, x, None, deterministic)
    pooled = layers.layer_norm(c.layer_norm_eps, ex, name="post_layernorm")(last[:, 0])
    return last, penultimate, pooled


__all__ = ["ClipLayer", "ClipVisionModel"]
