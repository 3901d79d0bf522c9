"""Building blocks shared by the BERT and CLIP encoders, annotated with logical axis names.

Parameter axes: `embed` (model width), `heads` (the joined heads x head_dim width of q/k/v), `mlp`
(feed-forward width), `vocab`, `position`, `norm` (LayerNorm vectors), `proj` (the 128-d output heads and
the vision MLP's outputs). Activation axes carry an `act_` prefix so that the mesh rules can shard
parameters and activations differently (sharding.py holds the rules).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import flax.linen as nn
import jax
from jax.ad_checkpoint import checkpoint_name
import jax.numpy as jnp

# HF BERT and CLIP initialise linears with N(0, 0.02); only the shapes matter for converted checkpoints.
default_kernel_init = nn.initializers.normal(stddev=0.02)


def gelu(x: jax.Array) -> jax.Array:
  """HF's "gelu": the exact erf form, computed as PyTorch does, in float32 for bfloat16 / float16
  inputs and rounded once (in bfloat16 arithmetic it is a rounding step off, values and gradients).
  `jax.nn.gelu(x, approximate=False)` goes through erfc, which XLA expands into ~90 elementwise ops
  (erf: ~10); fused into the MLP's matmuls, that made XLA:TPU fail and retry two fusions of the
  scanned ViT-L train step for v5e-256 (docs/performance.md)."""
  y = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  return (0.5 * y * (1.0 + jax.lax.erf(y * 0.5**0.5))).astype(x.dtype)


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": gelu,
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "relu": jax.nn.relu,
}

# `attention` values: "xla" is the formulation in MultiHeadAttention (any backend,
# attention-probability dropout); "cudnn" is cuDNN's fused attention through
# `jax.nn.dot_product_attention` (NVIDIA GPUs, no attention dropout): the [B, H, L, L]
# probabilities never reach memory.
ATTENTION_IMPLEMENTATIONS = ("xla", "cudnn")
# The compute dtypes each fused implementation takes.
FUSED_DTYPES = {"cudnn": ("bfloat16", "float16")}
# What `jax.nn.dot_product_attention` is asked for per fused value (tests on CPU swap in "xla").
_FUSED_BACKEND = {"cudnn": "cudnn"}
# Layer i of a stack is the module `{prefix}_{i}`; with `Execution.scan_layers` the stack is one
# scanned module `stack_name(prefix)` whose parameters carry a leading layer axis, STACK_AXIS.
LAYER_PREFIX = "layer"
STACK_AXIS = "layers"
# Named `jax.checkpoint_policies` for `Execution.remat_policy`.
REMAT_POLICIES = (
    "nothing_saveable", "everything_saveable", "dots_saveable", "dots_with_no_batch_dims_saveable",
)


def _cudnn_attention_forward(prim, *_, **__) -> bool:
  # jax's cuDNN attention (a custom VJP) binds this primitive for its output and softmax
  # statistics; unsaved, the backward pass would run the fused forward again.
  return prim.name.startswith("dot_product_attention_fwd")


# What a scanned stack saves for its backward pass without remat: the weight matmuls' outputs, the
# attention probabilities and context, cuDNN attention's forward, and the dropout masks (so no
# random bits are drawn twice). The norms, activations and dropout's scaling are recomputed from
# these, as XLA's fusions do in the unrolled program; saving everything (`remat=True,
# remat_policy="everything_saveable"`) stacks each layer's elementwise intermediates too: 1.42x
# the looped step's memory for the ViT-L train step on v5e-16.
scanned_residuals = jax.checkpoint_policies.save_from_both_policies(
    jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
        jax.checkpoint_policies.save_only_these_names(
            "attention_probs", "attention_context", "dropout_mask")),
    _cudnn_attention_forward)


def attention_dropout_error(attention: str, dropout_rate: float) -> str | None:
  """Why `attention` cannot train with attention-probability dropout `dropout_rate`, else None."""
  if attention != "xla" and dropout_rate > 0:
    return (f"attention={attention!r} has no attention dropout: set attention_dropout_rate to 0 "
            f"(got {dropout_rate})")
  return None


@dataclasses.dataclass(frozen=True)
class Execution:
  """How the blocks compute, not what: compute and parameter dtypes, per-layer remat with a named
  policy, the attention implementation, layer stacks as a loop or one scan (which also changes
  the params' layout: models/layer_stacks.py converts). Every module takes it as one field;
  `PreFLMRConfig.execution` builds it from `config.model`."""

  dtype: str = "float32"
  param_dtype: str = "float32"
  remat: bool = False
  remat_policy: str = "nothing_saveable"  # one of REMAT_POLICIES
  attention: str = "xla"  # one of ATTENTION_IMPLEMENTATIONS
  scan_layers: bool = False

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  @property
  def weight_dtype(self):
    return jnp.dtype(self.param_dtype)


def dense(features: int, axes: tuple[str | None, str | None], execution: Execution, *,
          use_bias: bool = True, name: str | None = None) -> nn.Dense:
  """An `nn.Dense` whose kernel is annotated `axes` = (input axis, output axis)."""
  return nn.Dense(
      features,
      use_bias=use_bias,
      dtype=execution.compute_dtype,
      param_dtype=execution.weight_dtype,
      kernel_init=nn.with_logical_partitioning(default_kernel_init, axes),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (axes[1],)),
      name=name,
  )


def embed_lookup(table: jax.Array, ids: jax.Array, one_hot_grad: bool | None = None) -> jax.Array:
  """table[ids]; with `one_hot_grad` its gradient is a one-hot matmul rather than a scatter-add.

  On a GPU a scatter-add serialises on repeated ids: documents padded to 512 tokens repeat [PAD]
  ~20k times per batch and every token type is 0, and on an H100 those scatters took 48 of a
  ViT-L train step's 137 ms of device time (benchmarks/RESULTS_GPU.md). one_hot(ids)^T @ g costs
  2 * tokens * vocab * width FLOPs on the matrix units, has no contention and is deterministic.
  None (default): one-hot off CPU; on CPU the scatter is ~15x cheaper than that matmul.
  """
  if one_hot_grad is None:
    one_hot_grad = jax.default_backend() != "cpu"
  if not one_hot_grad:
    return jnp.take(table, ids, axis=0)
  return _lookup(table.shape[0], jnp.dtype(table.dtype), table, ids)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _lookup(num, dtype, table, ids):
  del num, dtype
  return jnp.take(table, ids, axis=0)


def _lookup_fwd(num, dtype, table, ids):
  del num, dtype
  return jnp.take(table, ids, axis=0), ids


_ONE_HOT_BYTES = 256 << 20  # the one-hot operand is built this many bytes at a time


def _lookup_bwd(num, dtype, ids, g):
  ids, g = ids.reshape(-1), g.reshape(-1, g.shape[-1])
  chunk = max(1, _ONE_HOT_BYTES // (num * g.dtype.itemsize))
  grad_of = lambda i, x: jnp.einsum("nv,nh->vh", jax.nn.one_hot(i, num, dtype=x.dtype), x,
                                    preferred_element_type=jnp.float32)
  if ids.shape[0] <= chunk:
    grad = grad_of(ids, g)
  else:  # padding ids of -1 have an all-zero one-hot row
    pad = -ids.shape[0] % chunk
    ids = jnp.pad(ids, (0, pad), constant_values=-1).reshape(-1, chunk)
    g = jnp.pad(g, ((0, pad), (0, 0))).reshape(ids.shape[0], chunk, -1)
    grad, _ = jax.lax.scan(lambda acc, x: (acc + grad_of(*x), None),
                           jnp.zeros((num, g.shape[-1]), jnp.float32), (ids, g))
  return grad.astype(dtype), None


_lookup.defvjp(_lookup_fwd, _lookup_bwd)


class Embed(nn.Module):
  """`nn.Embed` (same parameter: `embedding`, cast to `dtype` before the lookup) through
  `embed_lookup` (its default gradient for the backend)."""

  num_embeddings: int
  features: int
  axes: tuple[str | None, str | None]
  execution: Execution = Execution()

  @nn.compact
  def __call__(self, ids):
    ex = self.execution
    table = self.param("embedding", nn.with_logical_partitioning(default_kernel_init, self.axes),
                       (self.num_embeddings, self.features), ex.weight_dtype)
    # The lookup reads whole rows, gathered over the width's mesh axes like any FSDP kernel before
    # its matmul: rows looked up in a width-sharded table would need an all-to-all to reach the
    # batch sharding, and libtpu spends ~10 s compiling each all-to-all's routing on 256 chips.
    table = nn.with_logical_constraint(table.astype(ex.compute_dtype), (self.axes[0], None))
    return embed_lookup(table, ids)


def layer_norm(eps: float, execution: Execution, *, name: str | None = None):
  # use_fast_variance=False: E[(x - mean)^2] like PyTorch, not E[x^2] - mean^2.
  return nn.LayerNorm(
      epsilon=eps,
      dtype=execution.compute_dtype,
      param_dtype=execution.weight_dtype,
      use_fast_variance=False,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)),
      name=name,
  )


# The logical axes of activations (`constrain`); config.logical_axis_rules needs a rule for each
# (sharding.check_rules), `act_batch`'s also splits the input batch (sharding.batch_axes).
ACTIVATION_AXES = ("act_batch", "act_length", "act_embed", "act_heads", "act_mlp")


def constrain(x: jax.Array, *axes: str | None) -> jax.Array:
  unknown = [a for a in axes if a is not None and a not in ACTIVATION_AXES]
  if unknown:  # at trace time: a new axis is declared above, so the rules cover it
    raise ValueError(f"activation axes {unknown} are not in layers.ACTIVATION_AXES")
  return nn.with_logical_constraint(x, axes)


class Dropout(nn.Module):
  """`nn.Dropout` (the same bits) whose keep-mask is named "dropout_mask" for remat policies.

  With `own_fusion` the mask is computed behind an optimisation barrier, so XLA cannot fuse
  threefry's hash into the producer's matmul: one such fusion took XLA:TPU 2.5 minutes (the
  400m/800m train step for v5e-256: 196 s to compile without the barrier). The attention
  probabilities' dropout goes without: there the barrier keeps a byte per probability for the
  backward pass that XLA otherwise recomputes (+0.38 GiB per chip for the looped 400m/800m step).
  """

  rate: float
  own_fusion: bool = True

  @nn.compact
  def __call__(self, x, deterministic: bool):
    if self.rate == 0.0 or deterministic:
      return x
    if self.rate == 1.0:
      return jnp.zeros_like(x)
    keep = 1.0 - self.rate
    mask = jax.random.bernoulli(self.make_rng("dropout"), keep, x.shape)
    if self.own_fusion:
      mask = jax.lax.optimization_barrier(mask)
    mask = checkpoint_name(mask, "dropout_mask")
    return jax.lax.select(mask, x / keep, jnp.zeros_like(x))


class MultiHeadAttention(nn.Module):
  """Multi-head attention with separate q/k/v/out linears (the HF BERT and CLIP layout).

  `kv` defaults to `x` (self-attention); `mask` is [B, Lkv] with 1 = attend. Softmax runs in float32.
  """

  hidden_size: int
  num_heads: int
  dropout_rate: float = 0.0
  execution: Execution = Execution()

  @nn.compact
  def __call__(self, x, kv=None, mask=None, deterministic: bool = True):
    kv = x if kv is None else kv
    head_dim = self.hidden_size // self.num_heads
    proj = functools.partial(dense, self.hidden_size, ("embed", "heads"), self.execution)
    if self.execution.attention != "xla":
      return self._fused(proj, x, kv, mask, deterministic)
    # [B, L, H*D] -> [B, H, L, D]: with heads leading, both attention matmuls are plain batched
    # matmuls (the [B, L, H, D] einsums made XLA:CPU transpose outputs; ~18% of BERT-base time).
    split = lambda t: t.reshape(t.shape[:2] + (self.num_heads, head_dim)).transpose(0, 2, 1, 3)
    q = split(proj(name="query")(x))
    k = split(proj(name="key")(kv))
    v = split(proj(name="value")(kv))
    q = constrain(q, "act_batch", "act_heads", "act_length", None)
    logits = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32)
    logits = logits / jnp.sqrt(jnp.float32(head_dim))
    if mask is not None:
      big_neg = jnp.finfo(jnp.float32).min
      logits = jnp.where(mask[:, None, None, :].astype(bool), logits, big_neg)
    weights = jax.nn.softmax(logits, axis=-1).astype(self.execution.compute_dtype)
    weights = checkpoint_name(weights, "attention_probs")
    weights = Dropout(self.dropout_rate, own_fusion=False)(weights, deterministic)
    out = checkpoint_name(jnp.einsum("bhqk,bhkd->bhqd", weights, v), "attention_context")
    out = out.transpose(0, 2, 1, 3)
    out = out.reshape(out.shape[:2] + (self.hidden_size,))
    return dense(self.hidden_size, ("heads", "embed"), self.execution, name="out")(out)

  def _fused(self, proj, x, kv, mask, deterministic):
    attention = self.execution.attention
    if attention not in _FUSED_BACKEND:
      raise ValueError(f"attention={attention!r} is not one of {ATTENTION_IMPLEMENTATIONS}")
    error = attention_dropout_error(attention, self.dropout_rate)
    if error and not deterministic:
      raise ValueError(error)
    heads = lambda t: t.reshape(t.shape[:2] + (self.num_heads, -1))  # [B, L, H, D]
    q = constrain(heads(proj(name="query")(x)), "act_batch", "act_length", "act_heads", None)
    k, v = heads(proj(name="key")(kv)), heads(proj(name="value")(kv))
    if mask is not None:  # cuDNN takes a mask only as a full [B, 1, Lq, Lkv] bias
      mask = jnp.broadcast_to(mask[:, None, None, :].astype(bool),
                              (x.shape[0], 1, x.shape[1], kv.shape[1]))
    out = jax.nn.dot_product_attention(q, k, v, mask=mask,
                                       implementation=_FUSED_BACKEND[attention])
    out = out.reshape(out.shape[:2] + (self.hidden_size,))
    return dense(self.hidden_size, ("heads", "embed"), self.execution, name="out")(out)


class Mlp(nn.Module):
  """Transformer feed-forward block: Dense(intermediate) -> act -> Dense(hidden)."""

  hidden_size: int
  intermediate_size: int
  activation: str  # a key of ACTIVATIONS
  execution: Execution = Execution()

  @nn.compact
  def __call__(self, x):
    h = dense(self.intermediate_size, ("embed", "mlp"), self.execution, name="wi")(x)
    h = constrain(ACTIVATIONS[self.activation](h), "act_batch", "act_length", "act_mlp")
    return dense(self.hidden_size, ("mlp", "embed"), self.execution, name="wo")(h)


def stack_name(prefix: str) -> str:
  """The module (and params key) of a scanned stack of `{prefix}_{i}` layers."""
  return prefix + "s"


def layer_stack(layer_cls, num_layers: int, execution: Execution, *args,
                static_argnums: tuple[int, ...], prefix: str = LAYER_PREFIX):
  """The modules of `num_layers` layers `layer_cls(*args)`, each rematerialised with
  `execution.remat_policy` if `execution.remat`, else scanned ones with `scanned_residuals`
  (`static_argnums` of its call, counting `self` as 0): a list of `{prefix}_{i}`, or with
  `execution.scan_layers` the one module that `apply_stack` scans. Create it in `setup` or a
  compact method; run it with `apply_stack`."""
  policy = (getattr(jax.checkpoint_policies, execution.remat_policy) if execution.remat
            else scanned_residuals if execution.scan_layers else None)
  if policy is not None:
    layer_cls = nn.remat(layer_cls, policy=policy, static_argnums=static_argnums)
  if execution.scan_layers:
    return layer_cls(*args, name=stack_name(prefix))
  return [layer_cls(*args, name=f"{prefix}_{i}") for i in range(num_layers)]


def apply_stack(stack, num_layers: int, x, *args):
  """Runs `layer(x, *args)` through the layers of `layer_stack` in turn -> (last output, the
  last layer's input). Scanned, the layers' parameters (and dropout keys) are split along a
  leading axis named STACK_AXIS; the carry keeps the previous state for the second output (a copy
  per layer, rather than every layer's output as a scan output)."""
  if isinstance(stack, (list, tuple)):
    previous = x
    for layer in stack:
      previous, x = x, layer(x, *args)
    return x, previous
  step = lambda layer, carry: ((layer(carry[0], *args), carry[0]), None)
  scan = nn.scan(step, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                 length=num_layers, metadata_params={nn.PARTITION_NAME: STACK_AXIS})
  (x, previous), _ = scan(stack, (x, x))
  return x, previous
