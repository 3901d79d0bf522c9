"""Optimiser: labels per stage, freezing without state, two learning rates, schedules, weight-decay
mask, clipping over trainable gradients, gradient accumulation, config errors."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from preflmr_jax import config_files, optimizer
from preflmr_jax.models import model_config as mc
from preflmr_jax.models import preflmr

MAPPING_GROUPS = {"vision_projection", "mapping_input", "mapping_layer_0", "mapping_output"}


def abstract(config):
  return preflmr.abstract_params(mc.PreFLMRConfig.from_dict(config.model))


def random_like(tree, seed, scale=1.0):
  """Gaussian numpy arrays shaped like `tree` (host-side: no per-shape compiles)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: (scale * rng.standard_normal(x.shape)).astype(x.dtype), tree)


def path_items(tree):
  return [(jax.tree_util.keystr(kp, simple=True, separator="/"), x)
          for kp, x in jax.tree_util.tree_flatten_with_path(tree)[0]]


def norm(tree) -> float:
  return float(np.sqrt(sum(np.sum(np.square(x)) for x in jax.tree.leaves(tree))))


def tiny_config(**optimizer_overrides):
  config = config_files.load_config("configs/tiny.py")
  config.num_train_steps = 12
  config.freeze = ("vision",)  # the library default (configs/tiny.py trains everything)
  config.optimizer.update(dict(schedule="constant", warmup_steps=0, grad_clip_norm=0.0))
  config.optimizer.update(optimizer_overrides)
  return config


@pytest.fixture(scope="module")
def tiny_params():
  """The tiny model's parameter tree, random values."""
  return random_like(abstract(config_files.load_config("configs/tiny.py")), seed=0, scale=0.1)


# A few leaves of each kind the labels and the weight-decay mask tell apart, under the model's
# names: compiles in a fraction of the tiny model's time. config.freeze = ("vision",).
SMALL_SHAPES = {
    "vision": {"layer_0": {"mlp": {"wi": {"kernel": (8, 16), "bias": (16,)}}},
               "post_layernorm": {"scale": (8,), "bias": (8,)}},
    "vision_projection": {"dense_0": {"kernel": (8, 16), "bias": (16,)}},
    "mapping_layer_0": {"attention_norm": {"scale": (8,), "bias": (8,)},
                        "crossattention": {"query": {"kernel": (8, 8), "bias": (8,)}}},
    "query_text": {"embeddings": {"word_embeddings": {"embedding": (20, 8)}},
                   "layer_0": {"mlp": {"wo": {"kernel": (16, 8), "bias": (8,)}}}},
    "query_head": {"kernel": (8, 4)},
}


@pytest.fixture(scope="module")
def small_params():
  shapes = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, jnp.float32), SMALL_SHAPES,
                        is_leaf=lambda x: isinstance(x, tuple))
  return random_like(shapes, seed=0)


def run(tx, params, grads_list):
  """Applies `grads_list` one by one (one jitted step); returns the params after each step and the
  final state."""
  def step(grads, state, params):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  step = jax.jit(step)
  state = jax.jit(tx.init)(params)
  history = []
  for grads in grads_list:
    params, state = step(grads, state, params)
    history.append(params)
  return history, state


def state_elements(state) -> int:
  """Array elements in the optimiser state, scalars (step counters) excluded."""
  return sum(math.prod(x.shape) for x in jax.tree.leaves(state) if len(x.shape) > 0)


# ---------------------------------------------------------------------------------- labels

@functools.lru_cache
def stage_params(shape):
  """Abstract params of a stage preset's model shape (the same tree for every stage)."""
  return abstract(config_files.load_config(f"configs/stage.py:2,{shape}"))


@pytest.mark.parametrize("shape", ["tiny", "vit_b"])
def test_stage_labels(shape):
  labels = {}
  for stage in (1, 2, 3):
    freeze = config_files.load_config(f"configs/stage.py:{stage},{shape}").freeze
    labels[stage] = dict(path_items(optimizer.param_labels(stage_params(shape), freeze)))
  for stage, by_path in labels.items():
    assert all(l == "frozen" for p, l in by_path.items() if p.startswith("vision/")), stage
    for path, label in by_path.items():
      if path.split("/")[0] in MAPPING_GROUPS:  # never caught by the "vision" pattern
        assert label == "mapping", (stage, path)
  # Stage 1 trains exactly the mapping structures.
  assert {p for p, l in labels[1].items() if l != "frozen"} == {
      p for p in labels[1] if p.split("/")[0] in MAPPING_GROUPS}
  for stage in (2, 3):
    assert {p.split("/")[0] for p, l in labels[stage].items() if l == "rest"} == {
        "query_text", "document_text", "query_head", "document_head"}


def test_stage_presets():
  stage1 = config_files.load_config("configs/stage.py:1")
  assert stage1.model.output == "mapping_only" and stage1.tokenizer == "tiny"
  assert stage1.optimizer.mapping_learning_rate == 1e-4
  for stage in (2, 3):
    config = config_files.load_config(f"configs/stage.py:{stage},vit_l")
    assert config.model.output == "full" and config.freeze == ("vision",)
    assert config.model.vision.hidden_size == 1024
  # The official training's settings (recipe.published; docs/recipe.md).
  for stage in (1, 2, 3):
    config = config_files.load_config(f"configs/stage.py:{stage},vit_l")
    opt = config.optimizer
    assert (opt.learning_rate, opt.mapping_learning_rate, opt.schedule, opt.warmup_steps) == (
        1e-5, 1e-4, "constant", 0)
    assert (opt.weight_decay, opt.grad_clip_norm, opt.eps) == (0.0, 0.0, 1e-8)
    assert config.in_batch_negatives == "per_device" and config.num_negatives == 4
    assert not config.mask_duplicate_positives
  assert config_files.load_config("configs/stage.py:2,vit_l").data.tasks == "E-VQA"
  with pytest.raises(ValueError, match="configs/stage.py: shape='vit_h' is not one of"):
    config_files.load_config("configs/stage.py:2,vit_h")


def test_freeze_patterns_match_from_the_start_at_a_path_boundary(tiny_params):
  def frozen(patterns):
    return {p for p, l in path_items(optimizer.param_labels(tiny_params, patterns))
            if l == "frozen"}
  everything = [p for p, _ in path_items(tiny_params)]
  assert frozen("vision") == {p for p in everything if p.startswith("vision/")}
  assert frozen(("query_text/layer_0",)) == {
      p for p in everything if p.startswith("query_text/layer_0/")}
  assert frozen((".*/pooler",)) == {p for p in everything if "/pooler/" in p}
  assert frozen(("query_text/embeddings/",)) == {
      p for p in everything if p.startswith("query_text/embeddings/")}
  # Frozen wins over "mapping".
  assert frozen(("mapping_layer_0",)) == {p for p in everything if p.startswith("mapping_layer_0/")}


def test_count_trainable():
  config = config_files.load_config("configs/stage.py:1,vit_b")
  params = stage_params("vit_b")
  counts = optimizer.count_trainable(params, optimizer.param_labels(params, config.freeze))
  assert counts["total"] == 326725504  # the ViT-B release (tests/test_configs.py)
  assert counts["rest"] == 0 and counts["trainable"] == counts["mapping"]
  # MLP 768->2048->4096, mapping input 768->768, one cross-attention BERT layer, output 768->128.
  layer = 4 * (768 * 768 + 768) * 2 + 2 * 768 * 3072 + 3072 + 768 + 3 * 2 * 768
  expected = (768 * 2048 + 2048 + 2048 * 4096 + 4096 + 768 * 768 + 768 + layer + 768 * 128 + 128)
  assert counts["mapping"] == expected


# ------------------------------------------------------------------ freezing and state

def freezing_config(accum):
  config = tiny_config(weight_decay=0.1, grad_clip_norm=1.0, grad_accum_steps=accum,
                       learning_rate=1e-3, mapping_learning_rate=1e-2)
  config.freeze = ("vision", "query_text/layer_1")
  return config


@pytest.mark.slow
def test_frozen_params_bit_identical_trainable_ones_move(tiny_params):
  tx, labels = optimizer.make_optimizer(freezing_config(accum=2), tiny_params)
  history, _ = run(tx, tiny_params, [random_like(tiny_params, s) for s in range(1, 5)])
  final = dict(path_items(history[-1]))
  for (path, before), (_, label) in zip(path_items(tiny_params), path_items(labels)):
    if label == "frozen":
      assert np.array_equal(before, final[path]), path
    else:
      assert not np.allclose(before, final[path]), path


@pytest.mark.parametrize("accum", [1, 2])
def test_frozen_params_have_no_optimiser_state(tiny_params, accum):
  tx, labels = optimizer.make_optimizer(freezing_config(accum), tiny_params)
  state = jax.eval_shape(tx.init, tiny_params)
  counts = optimizer.count_trainable(tiny_params, labels)
  assert counts["frozen"] > 0 and counts["mapping"] > 0 and counts["rest"] > 0
  # Adam's mu and nu (+ the accumulator) over trainable parameters only; frozen ones hold nothing.
  assert state_elements(state) == (2 + (accum > 1)) * counts["trainable"]
  frozen = {p for p, l in path_items(labels) if l == "frozen"}
  for path, _ in path_items(state):
    assert not any(path.endswith(f) for f in frozen), path


def test_stage1_state_covers_the_mapping_structures_only():
  config = config_files.load_config("configs/stage.py:1")
  params = stage_params("tiny")
  tx, labels = optimizer.make_optimizer(config, params)
  counts = optimizer.count_trainable(params, labels)
  assert state_elements(jax.eval_shape(tx.init, params)) == 2 * counts["mapping"]


def test_state_shards_like_params(tiny_params):
  """Every state leaf that mirrors a parameter can take that parameter's sharding, so the state is
  created sharded by a jitted init (here: a shape rule, as the leaves are the params' shapes)."""
  mesh = Mesh(np.asarray(jax.devices()).reshape(8), ("fsdp",), axis_types=(AxisType.Auto,))
  rule = lambda x: NamedSharding(
      mesh, PartitionSpec("fsdp") if x.shape and x.shape[0] % 8 == 0 else PartitionSpec())
  tx, _ = optimizer.make_optimizer(tiny_config(grad_accum_steps=2), tiny_params)
  state_shardings = optax.tree_utils.tree_map_params(
      tx, rule, jax.eval_shape(tx.init, tiny_params),
      transform_non_params=lambda _: NamedSharding(mesh, PartitionSpec()))
  params = jax.device_put(tiny_params, jax.tree.map(rule, tiny_params))
  state = jax.jit(tx.init, out_shardings=state_shardings)(params)
  mu = optax.tree_utils.tree_get_all_with_path(state, "mu")
  assert any(x.sharding.spec == PartitionSpec("fsdp")
             for _, tree in mu for x in jax.tree.leaves(tree))


# ------------------------------------------------------------ learning rates and schedules

def test_two_learning_rates(small_params):
  config = tiny_config(learning_rate=1e-5, mapping_learning_rate=1e-4)
  tx, labels = optimizer.make_optimizer(config, small_params)
  grads = random_like(small_params, 1)
  (params,), _ = run(tx, small_params, [grads])
  # Adam's first step is -lr * g / (|g| + eps) = -lr * sign(g) where |g| >> eps.
  lrs = {"mapping": 1e-4, "rest": 1e-5, "frozen": 0.0}
  assert set(jax.tree.leaves(labels)) == set(lrs)
  for before, after, g, label in zip(*map(jax.tree.leaves, (small_params, params, grads, labels))):
    big = np.abs(g) > 1e-3
    np.testing.assert_allclose((np.asarray(after) - before)[big], -lrs[label] * np.sign(g)[big],
                               rtol=2e-3, atol=1e-9)


@pytest.mark.parametrize("schedule,quarter", [
    ("linear", 1 - 0.9 * 0.25),
    ("cosine", 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4))),
    ("constant", 1.0),
])
def test_schedules(schedule, quarter):
  """Warmup over 10 steps, then decay over 100 to 0.1 x peak; `quarter` is a quarter into decay."""
  config = tiny_config(schedule=schedule, warmup_steps=10, end_fraction=0.1)
  fn = optimizer.learning_rate_schedule(2e-4, config.optimizer, num_train_steps=110)
  end = 1.0 if schedule == "constant" else 0.1
  for step, fraction in [(0, 0.0), (5, 0.5), (10, 1.0), (35, quarter), (110, end), (200, end)]:
    np.testing.assert_allclose(float(fn(step)), 2e-4 * fraction, rtol=1e-5, atol=1e-12)


def test_schedules_without_warmup_and_all_warmup():
  config = tiny_config(schedule="constant", warmup_steps=0)
  assert float(optimizer.learning_rate_schedule(1.0, config.optimizer, 10)(0)) == 1.0
  config = tiny_config(schedule="cosine", warmup_steps=10)
  fn = optimizer.learning_rate_schedule(1.0, config.optimizer, 10)
  assert [float(fn(s)) for s in (0, 5)] == [0.0, 0.5]


def max_change(a, b) -> float:
  return max(float(np.abs(np.asarray(x) - np.asarray(y)).max())
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_schedule_counts_train_loop_steps_under_accumulation(small_params):
  """With k = 2 the second update (after loop step 3) uses the learning rate of loop step 2."""
  config = tiny_config(schedule="constant", warmup_steps=4, grad_accum_steps=2,
                       learning_rate=1e-3, mapping_learning_rate=1e-3)
  config.num_train_steps = 8
  tx, _ = optimizer.make_optimizer(config, small_params)
  history, _ = run(tx, small_params, [random_like(small_params, 1)] * 4)
  assert max_change(history[1], small_params) == 0.0  # first update: lr(0) = 0
  assert max_change(history[3], history[2]) == pytest.approx(0.5e-3, rel=1e-3)  # lr(2) = peak / 2
  assert optimizer.learning_rates(config, 3)["rest"] == pytest.approx(0.5e-3)


# --------------------------------------------------------- weight decay, clipping, accumulation

@pytest.mark.parametrize("decay_params,decayed", [
    ("no_bias_norm", {"kernel", "embedding"}), ("all", {"kernel", "embedding", "bias", "scale"})])
def test_weight_decay_reaches_the_chosen_parameters(small_params, decay_params, decayed):
  lr, wd = 1e-2, 0.5
  config = tiny_config(weight_decay=wd, learning_rate=lr, mapping_learning_rate=lr,
                       decay_params=decay_params)
  tx, labels = optimizer.make_optimizer(config, small_params)
  (params,), _ = run(tx, small_params, [jax.tree.map(np.zeros_like, small_params)])
  after = dict(path_items(params))
  kinds = set()
  for (path, before), (_, label) in zip(path_items(small_params), path_items(labels)):
    if label == "frozen" or path.rsplit("/", 1)[1] not in decayed:
      assert np.array_equal(after[path], before), path
    else:  # shrinks: p - lr * wd * p
      np.testing.assert_allclose(after[path], before * (1 - lr * wd), rtol=1e-6, err_msg=path)
      kinds.add(path.rsplit("/", 1)[1])
  assert kinds == decayed


def first_moment_norm(state) -> float:
  """||mu|| over all Adam moments; after one step mu = (1 - b1) * (clipped) gradient."""
  return norm([tree for _, tree in optax.tree_utils.tree_get_all_with_path(state, "mu")])


def test_clipping_counts_trainable_gradients_only(small_params):
  config = tiny_config(grad_clip_norm=1.0, b1=0.9)
  tx, labels = optimizer.make_optimizer(config, small_params)
  trainable = jax.tree.map(lambda g, l: g * (l != "frozen"), random_like(small_params, 1), labels)
  unit = jax.tree.map(lambda g: g / norm(trainable), trainable)
  # Trainable norm 10 is clipped to 1.
  _, state = run(tx, small_params, [jax.tree.map(lambda g: 10 * g, unit)])
  assert first_moment_norm(state) == pytest.approx(0.1 * 1.0, rel=1e-5)
  # Trainable norm 0.5 passes unclipped although huge frozen gradients come along.
  with_frozen = jax.tree.map(lambda g, l: 0.5 * g if l != "frozen" else np.full_like(g, 1e3),
                             unit, labels)
  _, state = run(tx, small_params, [with_frozen])
  assert first_moment_norm(state) == pytest.approx(0.1 * 0.5, rel=1e-5)


def test_gradient_accumulation_equals_mean_gradient(small_params):
  k = 3
  overrides = dict(weight_decay=0.1, grad_clip_norm=1.0, learning_rate=1e-3,
                   mapping_learning_rate=1e-2)
  micro = [random_like(small_params, s, scale=0.3) for s in range(2 * k)]
  mean = [jax.tree.map(lambda *g: sum(g) / k, *micro[i:i + k]) for i in (0, k)]
  accumulated, _ = run(optimizer.make_optimizer(tiny_config(grad_accum_steps=k, **overrides),
                                                small_params)[0], small_params, micro)
  reference, _ = run(optimizer.make_optimizer(tiny_config(**overrides), small_params)[0],
                     small_params, mean)
  # Params move only on every k-th micro-step ...
  assert max_change(accumulated[0], small_params) == max_change(accumulated[1], small_params) == 0
  assert max_change(accumulated[k + 1], accumulated[k - 1]) == 0
  assert max_change(accumulated[k - 1], small_params) > 1e-3
  # ... and then as one step with the mean gradient.
  assert max_change(accumulated[k - 1], reference[0]) < 1e-6
  assert max_change(accumulated[2 * k - 1], reference[1]) < 1e-6


# ---------------------------------------------------------------------------- bad configs

@pytest.mark.parametrize("key,value", [
    ("schedule", "step"),
    ("learning_rate", -1e-5),
    ("mapping_learning_rate", -1e-4),
    ("warmup_steps", 13),
    ("warmup_steps", -1),
    ("end_fraction", 1.5),
    ("b2", 1.0),
    ("eps", 0.0),
    ("weight_decay", -0.1),
    ("decay_params", "biases"),
    ("grad_clip_norm", -1.0),
    ("grad_accum_steps", 0),
    ("grad_accum_steps", 5),  # does not divide num_train_steps=12
])
def test_bad_optimizer_values_fail_naming_the_key(small_params, key, value):
  config = tiny_config()
  config.optimizer[key] = value
  with pytest.raises(ValueError, match=rf"config\.optimizer\.{key}="):
    optimizer.make_optimizer(config, small_params)


@pytest.mark.parametrize("patterns,message", [
    (("vision", "text_encoder"), r"config\.freeze: pattern 'text_encoder' matches no parameter"),
    (("visi",), r"config\.freeze: pattern 'visi' matches no parameter"),
    (("vision[",), r"config\.freeze: 'vision\[' is not a valid regex"),
    ((".*",), r"config\.freeze=.*freezes every parameter"),
])
def test_bad_freeze_patterns_fail(tiny_params, patterns, message):
  config = tiny_config()
  config.freeze = patterns
  with pytest.raises(ValueError, match=message):
    optimizer.make_optimizer(config, tiny_params)


def test_bad_num_train_steps_fails(small_params):
  config = tiny_config()
  config.num_train_steps = 0
  with pytest.raises(ValueError, match=r"config\.num_train_steps=0"):
    optimizer.make_optimizer(config, small_params)
