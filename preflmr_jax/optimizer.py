"""AdamW with two learning rates, freezing by config, clipping and gradient accumulation (optax).

Every parameter gets one label (docs/recipe.md):
  "mapping"  the vision MLP, the mapping network and their input / output linears: the "mapping"
             union of models/param_groups.py (`config.optimizer.mapping_learning_rate`);
  "rest"     everything else that trains (`config.optimizer.learning_rate`);
  "frozen"   parameters matched by a `config.freeze` pattern: no update and no optimiser state.

The transformation, outermost first:

  multi_transform by frozen / trainable
    frozen:    set_to_zero                               (no state at all)
    trainable: MultiSteps(k)                             (only when grad_accum_steps > 1)
                 clip_by_global_norm                     (over the trainable gradients only)
                 multi_transform by mapping / rest
                   AdamW(schedule), weight decay on every parameter or, by default, masked
                   off biases and LayerNorm scales (`decay_params`)

Freezing is the outermost split so that no inner transformation ever sees a frozen leaf: the
accumulator, the clipping norm and Adam's moments all cover trainable parameters only (the frozen
positions hold `optax.MaskedNode()`), whether or not the train step stops gradients into frozen
parameters. Clipping runs on the accumulated (mean) gradient, so k micro-steps clip exactly like one
step on the k-times larger batch.

Step counts (`num_train_steps`, `warmup_steps`) are train-loop steps: with accumulation the loop
makes k calls per optimizer update and the schedules are read at `update_count * k`.

The state holds arrays only (no Python-side state) and mirrors the params tree, with
`optax.MaskedNode()` holes where parameters are frozen: each per-parameter leaf sits under that
parameter's key path with its shape, so it takes the parameter's sharding (by path, or with
`optax.tree_utils.tree_map_params(tx, fn, state)`; that function's extra-trees form rejects the
holes) and `jax.jit(tx.init, out_shardings=...)` creates it sharded.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import jax
import numpy as np
import optax

from preflmr_jax.models import param_groups
from preflmr_jax.user_errors import ConfigError, is_int, require, require_int

LABELS = ("mapping", "rest", "frozen")
SCHEDULES = ("linear", "cosine", "constant")

# Which parameters take weight decay (`config.optimizer.decay_params`): "all" as the official
# training's AdamW (transformers' and PyTorch's apply it to every parameter), or "no_bias_norm":
# none on biases and LayerNorm scales.
DECAY_PARAMS = ("no_bias_norm", "all")
_NO_DECAY = ("/bias", "/scale")


def _path(key_path) -> str:
  return jax.tree_util.keystr(key_path, simple=True, separator="/")


def _compile_pattern(pattern: str) -> re.Pattern:
  """`re.match` anchored at the start of the path, and the match must end at a "/" boundary, so that
  "vision" freezes `vision/...` but not `vision_projection/...`."""
  try:
    return re.compile(rf"(?:{pattern})(?:(?<=/)|(?=/|$))")
  except re.error as e:
    raise ConfigError(f"config.freeze: {pattern!r} is not a valid regex ({e})") from None


def param_labels(params: Any, freeze_patterns: Sequence[str] | str) -> Any:
  """A tree like `params` (arrays or ShapeDtypeStructs) of "mapping" | "rest" | "frozen".

  A parameter is frozen when a pattern matches its "/"-joined path from the start up to a component
  boundary (e.g. "vision", "query_text/layer_[0-5]", ".*/pooler"); frozen wins over "mapping".
  Raises ValueError, naming `config.freeze`, for a pattern that matches nothing, and for a
  top-level key that models/param_groups.py does not declare (it would get no deliberate label).
  """
  if isinstance(freeze_patterns, str):
    freeze_patterns = (freeze_patterns,)
  compiled = [(p, _compile_pattern(p)) for p in freeze_patterns]
  paths = [_path(kp) for kp, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  mapping = {k: param_groups.in_group(k, "mapping") for k in {p.split("/")[0] for p in paths}}
  for pattern, regex in compiled:
    if not any(regex.match(path) for path in paths):
      raise ConfigError(f"config.freeze: pattern {pattern!r} matches no parameter; top-level "
                        f"groups are {sorted(mapping)}")

  def label(key_path, _):
    path = _path(key_path)
    if any(regex.match(path) for _, regex in compiled):
      return "frozen"
    return "mapping" if mapping[path.split("/")[0]] else "rest"

  return jax.tree_util.tree_map_with_path(label, params)


def validate(opt_cfg, num_train_steps: int) -> None:
  """Checks `config.optimizer` and `config.num_train_steps` up front, naming the bad key."""
  require_int("num_train_steps", num_train_steps, 1)
  require(opt_cfg.schedule in SCHEDULES, "optimizer.schedule", opt_cfg.schedule,
          f"must be one of {SCHEDULES}")
  for key in ("learning_rate", "mapping_learning_rate", "weight_decay", "grad_clip_norm"):
    # Finite in float32, where the update is computed: 1e39 is infinite there.
    value = opt_cfg[key]
    with np.errstate(over="ignore"):
      finite = bool(np.isfinite(np.float32(value)))
    require(value >= 0 and finite, f"optimizer.{key}", value, "must be >= 0 and finite in float32")
  warmup = opt_cfg.warmup_steps
  require(is_int(warmup) and 0 <= warmup <= num_train_steps, "optimizer.warmup_steps", warmup,
          f"must be an integer in [0, config.num_train_steps={num_train_steps}]")
  require(0 <= opt_cfg.end_fraction <= 1, "optimizer.end_fraction", opt_cfg.end_fraction,
          "must be in [0, 1]")
  for key in ("b1", "b2"):
    require(0 <= opt_cfg[key] < 1, f"optimizer.{key}", opt_cfg[key], "must be in [0, 1)")
  require(opt_cfg.eps > 0, "optimizer.eps", opt_cfg.eps, "must be > 0")
  require(opt_cfg.decay_params in DECAY_PARAMS, "optimizer.decay_params", opt_cfg.decay_params,
          f"must be one of {DECAY_PARAMS}")
  k = opt_cfg.grad_accum_steps
  require_int("optimizer.grad_accum_steps", k, 1)
  require(num_train_steps % k == 0, "optimizer.grad_accum_steps", k,
          f"must divide config.num_train_steps={num_train_steps} (no partial last update)")


def learning_rate_schedule(peak: float, opt_cfg, num_train_steps: int) -> optax.Schedule:
  """Linear warmup 0 -> peak over warmup_steps, then linear / cosine decay to peak * end_fraction at
  num_train_steps, or constant.

  Built as warmup + join rather than optax.warmup_{constant,cosine_decay}_schedule: those give 0
  forever with warmup_steps=0 (constant) or fail when warmup_steps == num_train_steps (cosine).
  """
  warmup, schedule = opt_cfg.warmup_steps, opt_cfg.schedule
  decay_steps = max(num_train_steps - warmup, 1)
  if schedule == "constant":
    after = optax.constant_schedule(peak)
  elif schedule == "linear":
    after = optax.linear_schedule(peak, peak * opt_cfg.end_fraction, decay_steps)
  elif schedule == "cosine":
    after = optax.cosine_decay_schedule(peak, decay_steps, alpha=opt_cfg.end_fraction)
  else:
    raise ConfigError(f"config.optimizer.schedule={schedule!r}: must be one of {SCHEDULES}")
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def learning_rates(config, step) -> dict[str, Any]:
  """The learning rates in effect at train-loop `step` (for logging)."""
  opt = config.optimizer
  k = opt.grad_accum_steps
  at = (step // k) * k
  return {label: learning_rate_schedule(peak, opt, config.num_train_steps)(at)
          for label, peak in (("mapping", opt.mapping_learning_rate), ("rest", opt.learning_rate))}


def _decay_mask(params):
  return jax.tree_util.tree_map_with_path(
      lambda kp, _: not _path(kp).endswith(_NO_DECAY), params)


def _adamw(peak: float, opt_cfg, num_train_steps: int) -> optax.GradientTransformation:
  schedule = learning_rate_schedule(peak, opt_cfg, num_train_steps)
  k = opt_cfg.grad_accum_steps
  # Adam's count advances once per update; the schedule is in train-loop steps.
  lr = schedule if k == 1 else (lambda count: schedule(count * k))
  kw = dict(b1=opt_cfg.b1, b2=opt_cfg.b2, eps=opt_cfg.eps)
  if opt_cfg.weight_decay > 0:
    mask = None if opt_cfg.decay_params == "all" else _decay_mask
    return optax.adamw(lr, weight_decay=opt_cfg.weight_decay, mask=mask, **kw)
  return optax.adam(lr, **kw)


def make_optimizer(config, params) -> tuple[optax.GradientTransformation, Any]:
  """-> (transformation, labels) for `params` (arrays or ShapeDtypeStructs).

  Raises ValueError for bad `config.optimizer` / `config.freeze` values before anything compiles.
  """
  opt = config.optimizer
  validate(opt, config.num_train_steps)
  labels = param_labels(params, config.freeze)
  require(any(label != "frozen" for label in jax.tree.leaves(labels)), "freeze", config.freeze,
          "freezes every parameter")

  # Inside the trainable branch frozen positions are MaskedNodes; the labels must have that shape.
  inner_labels = jax.tree.map(lambda l: optax.MaskedNode() if l == "frozen" else l, labels)
  trainable = optax.multi_transform(
      {"mapping": _adamw(opt.mapping_learning_rate, opt, config.num_train_steps),
       "rest": _adamw(opt.learning_rate, opt, config.num_train_steps)}, inner_labels)
  if opt.grad_clip_norm > 0:
    trainable = optax.chain(optax.clip_by_global_norm(opt.grad_clip_norm), trainable)
  if opt.grad_accum_steps > 1:
    trainable = optax.MultiSteps(trainable, every_k_schedule=opt.grad_accum_steps)
    trainable = trainable.gradient_transformation()

  split = jax.tree.map(lambda l: "frozen" if l == "frozen" else "trainable", labels)
  tx = optax.multi_transform({"frozen": optax.set_to_zero(), "trainable": trainable}, split)
  return tx, labels


def count_trainable(params, labels) -> dict[str, int]:
  """Parameter counts per label, plus "trainable" (mapping + rest) and "total", for logging."""
  counts = dict.fromkeys(LABELS, 0)
  for leaf, label in zip(jax.tree.leaves(params), jax.tree.leaves(labels)):
    counts[label] += int(np.prod(leaf.shape))
  counts["trainable"] = counts["mapping"] + counts["rest"]
  counts["total"] = counts["trainable"] + counts["frozen"]
  return counts
