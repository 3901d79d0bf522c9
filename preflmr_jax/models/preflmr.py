"""The PreFLMR assembly: query and document encoders producing per-token
128-d embeddings for late interaction.

Query:    [text (query_maxlen); vision MLP (mapping_prefix_length); mapping network (patches)]
Document: text tokens with [PAD] and punctuation zeroed.
All tokens are L2-normalised (zeroed tokens stay zero). Stage 1 (`output="mapping_only"`) keeps only
the two vision-derived groups; text still reaches them through the mapping network's cross-attention.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from preflmr_jax.models import layer_stacks, layers, param_groups, token_masks
from preflmr_jax.models.bert import BertLayer, BertModel
from preflmr_jax.models.clip import ClipVisionModel
from preflmr_jax.models.model_config import PreFLMRConfig


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """torch.nn.functional.normalize semantics, x / max(||x||, eps), in float32.

  Written with rsqrt(max(|x|^2, eps^2)) so that the gradient at the zeroed (masked) tokens is finite:
  d sqrt(s)/ds is infinite at s = 0, and 0 * inf would put NaN into every gradient.
  """
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


class VisionProjection(nn.Module):
  """The MLP from the CLIP CLS state to `prefix_length` tokens: Linear -> tanh -> Linear."""

  config: PreFLMRConfig

  @nn.compact
  def __call__(self, cls_state):
    c, ex = self.config, self.config.execution
    width = c.dim * c.mapping_prefix_length
    h = jnp.tanh(layers.dense(width // 2, ("embed", "mlp"), ex, name="dense_0")(cls_state))
    out = layers.dense(width, ("mlp", "proj"), ex, name="dense_1")(h)
    # Row-major reshape, as torch's .view(B, prefix_length, dim).
    return out.reshape(cls_state.shape[0], c.mapping_prefix_length, c.dim)


class PreFLMR(nn.Module):
  """Use `encode_queries` / `encode_documents` via `model.apply(..., method=...)`; `__call__` runs both
  (for `init`)."""

  config: PreFLMRConfig

  def setup(self):
    # The attribute names are the params tree's top-level keys: models/param_groups.py declares
    # each one's group.
    c, ex = self.config, self.config.execution
    self.query_text = BertModel(c.text, ex)
    self.document_text = BertModel(c.text, ex)
    self.query_head = layers.dense(c.dim, ("embed", "proj"), ex, use_bias=False)
    self.document_head = layers.dense(c.dim, ("embed", "proj"), ex, use_bias=False)
    self.vision = ClipVisionModel(c.vision, ex)
    self.vision_projection = VisionProjection(c)
    self.mapping_input = layers.dense(c.mapping.hidden_size, ("embed", None), ex)
    self.mapping = layers.layer_stack(BertLayer, c.mapping.num_layers, ex, c.mapping, True, ex,
                                      static_argnums=(3,), prefix=param_groups.MAPPING_LAYER_PREFIX)
    self.mapping_output = layers.dense(c.dim, ("embed", "proj"), ex)

  def encode_queries(self, input_ids, attention_mask, pixel_values, deterministic: bool = True):
    """-> (Q [B, query_length, dim] float32, Q_mask [B, query_length] float32)."""
    c = self.config
    if input_ids.shape[-1] != c.query_maxlen:
      raise ValueError(f"query input_ids have length {input_ids.shape[-1]}, expected "
                       f"config.model.query_maxlen={c.query_maxlen}")
    batch = input_ids.shape[0]
    text_mask = token_masks.query_token_mask(
        input_ids, c.instruction_token_id if c.mask_instruction_token else None)
    kept = jnp.ones(input_ids.shape, jnp.float32)
    if c.query_skip_token_ids:
      kept = 1.0 - jnp.isin(input_ids, jnp.asarray(c.query_skip_token_ids)).astype(jnp.float32)
    text_mask = text_mask * kept
    hidden, _ = self.query_text(input_ids, attention_mask, deterministic=deterministic)

    last, penultimate, _ = self.vision(pixel_values, deterministic=deterministic)
    prefix = self.vision_projection(last[:, 0])
    # Mapping network: penultimate-layer patch tokens (CLS dropped) cross-attend to the query
    # encoder's raw hidden states; no self-attention mask, and the cross-attention mask drops only
    # `query_skip_token_ids` (all ones by default; [MASK] padding is attended, as published).
    length = c.mapping_cross_attention_length
    m = self.mapping_input(penultimate[:, 1:])
    m, _ = layers.apply_stack(self.mapping, c.mapping.num_layers, m, None, deterministic,
                              hidden[:, :length], kept[:, :length])
    mapped = self.mapping_output(m)

    vision_tokens = jnp.concatenate([prefix, mapped], axis=1).astype(jnp.float32)
    vision_mask = jnp.ones(vision_tokens.shape[:2], jnp.float32)
    # Computed in stage 1 too, so that the head's parameters exist (they are in every checkpoint);
    # jit drops the unused computation.
    text = self.query_head(hidden).astype(jnp.float32) * text_mask[..., None]
    if c.output == "mapping_only":
      q, q_mask = vision_tokens, vision_mask
    else:
      q = jnp.concatenate([text, vision_tokens], axis=1)
      q_mask = jnp.concatenate([text_mask, vision_mask], axis=1)
    q = layers.constrain(l2_normalize(q), "act_batch", "act_length", None)
    return q, jnp.broadcast_to(q_mask, (batch, q.shape[1]))

  def encode_documents(self, input_ids, attention_mask, deterministic: bool = True):
    """-> (D [N, Ld, dim] float32, D_mask [N, Ld] float32)."""
    c = self.config
    if input_ids.shape[-1] > c.doc_maxlen:
      raise ValueError(f"document input_ids have length {input_ids.shape[-1]} > "
                       f"config.model.doc_maxlen={c.doc_maxlen}")
    hidden, _ = self.document_text(input_ids, attention_mask, deterministic=deterministic)
    d_mask = token_masks.document_token_mask(input_ids,
                                             c.skip_token_ids if c.mask_punctuation else ())
    d = self.document_head(hidden).astype(jnp.float32) * d_mask[..., None]
    return layers.constrain(l2_normalize(d), "act_batch", "act_length", None), d_mask

  def __call__(self, query_ids, query_mask, pixel_values, doc_ids, doc_mask,
               deterministic: bool = True):
    q = self.encode_queries(query_ids, query_mask, pixel_values, deterministic)
    return q, self.encode_documents(doc_ids, doc_mask, deterministic)


def dummy_inputs(config: PreFLMRConfig, batch: int = 1, doc_length: int | None = None):
  """Zero inputs of the right shapes, for `init` and `jax.eval_shape`."""
  v = config.vision
  doc_length = doc_length or min(config.doc_maxlen, 16)
  ids = jnp.zeros((batch, config.query_maxlen), jnp.int32)
  return dict(
      query_ids=ids, query_mask=jnp.ones_like(ids),
      pixel_values=jnp.zeros((batch, v.image_size, v.image_size, v.num_channels), jnp.float32),
      doc_ids=jnp.zeros((batch, doc_length), jnp.int32),
      doc_mask=jnp.ones((batch, doc_length), jnp.int32))


def abstract_params(config: PreFLMRConfig):
  """The params tree as `jax.ShapeDtypeStruct`s (no allocation), in `config`'s layer layout."""
  # Traced through the scanned model, one layer per stack: the 400m/800m shape in 0.3 s, not 2 s.
  scanned = dataclasses.replace(config, scan_layers=True)
  shapes = jax.eval_shape(lambda: _init(scanned, jax.random.key(0)))
  return layer_stacks.to_layout(shapes, config.scan_layers)


def logical_params(config: PreFLMRConfig):
  """The params tree as `jax.ShapeDtypeStruct`s boxed with their logical axis names (no
  allocation), in `config`'s layer layout: what shardings are made from."""
  return jax.eval_shape(
      lambda: PreFLMR(config).init(jax.random.key(0), **dummy_inputs(config))["params"])


def _init(config: PreFLMRConfig, rng: jax.Array):
  """The model's own init, unboxed, in `config`'s layout."""
  return nn.meta.unbox(PreFLMR(config).init(rng, **dummy_inputs(config))["params"])


def random_params(config: PreFLMRConfig, rng: jax.Array):
  """Random parameters (no logical axis boxes) for `config`, the same for one `rng` in either
  layer layout: drawn by the scanned model (one layer's init per stack: jitted for ViT-L on a GPU
  it compiles in ~20 s, every layer's in ~4 minutes), then split per layer unless `scan_layers`.
  Traceable (jit it)."""
  scanned = dataclasses.replace(config, scan_layers=True)
  return layer_stacks.to_layout(_init(scanned, rng), config.scan_layers)


def init_params(config: PreFLMRConfig, rng: jax.Array):
  """`random_params`, jitted."""
  return jax.jit(functools.partial(random_params, config))(rng)


__all__ = ["PreFLMR", "VisionProjection", "abstract_params", "dummy_inputs", "init_params", "l2_normalize",
           "logical_params", "random_params"]
