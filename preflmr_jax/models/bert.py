"""BERT text encoder with HF `BertModel` semantics (post-LayerNorm), plus the cross-attention layer
that PreFLMR's transformer mapping network is made of (HF `BertLayer` with `add_cross_attention`)."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from preflmr_jax.models import layers
from preflmr_jax.models.layers import Execution
from preflmr_jax.models.model_config import TextConfig


class BertLayer(nn.Module):
  """One post-LN BERT layer; with `cross_attention`, a cross-attention block follows self-attention."""

  config: TextConfig
  cross_attention: bool = False
  execution: Execution = Execution()

  @nn.compact
  def __call__(self, x, mask, deterministic: bool, encoder_states=None, encoder_mask=None):
    c, ex = self.config, self.execution
    drop = lambda y: layers.Dropout(c.dropout_rate)(y, deterministic)

    def attention(name, q, kv, kv_mask):
      return layers.MultiHeadAttention(c.hidden_size, c.num_heads, c.attention_dropout_rate, ex,
                                       name=name)(q, kv, kv_mask, deterministic)

    x = layers.layer_norm(c.layer_norm_eps, ex, name="attention_norm")(
        x + drop(attention("attention", x, None, mask)))
    if self.cross_attention:
      x = layers.layer_norm(c.layer_norm_eps, ex, name="crossattention_norm")(
          x + drop(attention("crossattention", x, encoder_states, encoder_mask)))
    h = layers.Mlp(c.hidden_size, c.intermediate_size, c.hidden_act, ex, name="mlp")(x)
    x = layers.layer_norm(c.layer_norm_eps, ex, name="mlp_norm")(x + drop(h))
    return layers.constrain(x, "act_batch", "act_length", "act_embed")


class BertEmbeddings(nn.Module):
  config: TextConfig
  execution: Execution = Execution()

  @nn.compact
  def __call__(self, input_ids, token_type_ids, position_ids, deterministic: bool):
    c = self.config

    def embed(num, name, axes):
      return layers.Embed(num, c.hidden_size, axes, self.execution, name=name)

    x = (embed(c.vocab_size, "word_embeddings", ("vocab", "embed"))(input_ids)
         + embed(c.max_position_embeddings, "position_embeddings", ("position", "embed"))(position_ids)
         + embed(c.type_vocab_size, "token_type_embeddings", (None, "embed"))(token_type_ids))
    x = layers.layer_norm(c.layer_norm_eps, self.execution, name="layer_norm")(x)
    return layers.Dropout(c.dropout_rate)(x, deterministic)


class BertModel(nn.Module):
  """HF `BertModel`: returns (last_hidden_state [B, L, H], pooler_output [B, H])."""

  config: TextConfig
  execution: Execution = Execution()

  @nn.compact
  def __call__(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None,
               deterministic: bool = True):
    c, ex = self.config, self.execution
    length = input_ids.shape[-1]
    if length > c.max_position_embeddings:
      raise ValueError(f"sequence length {length} exceeds max_position_embeddings "
                       f"{c.max_position_embeddings}")
    if attention_mask is None:
      attention_mask = jnp.ones_like(input_ids)
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    if position_ids is None:
      position_ids = jnp.broadcast_to(jnp.arange(length), input_ids.shape)

    x = BertEmbeddings(c, ex, name="embeddings")(input_ids, token_type_ids, position_ids,
                                                deterministic)
    x = layers.constrain(x, "act_batch", "act_length", "act_embed")
    # static_argnums counts `self` as 0: (x=1, mask=2, deterministic=3).
    stack = layers.layer_stack(BertLayer, c.num_layers, ex, c, False, ex, static_argnums=(3,))
    x, _ = layers.apply_stack(stack, c.num_layers, x, attention_mask, deterministic)
    pooled = jnp.tanh(layers.dense(c.hidden_size, ("embed", None), ex, name="pooler")(x[:, 0]))
    return x, pooled


__all__ = ["BertEmbeddings", "BertLayer", "BertModel"]
