"""Properties of the PreFLMR assembly across compute settings (parity lives in test_pretrained.py)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from preflmr_jax import late_interaction, tokenization
from preflmr_jax.models import layer_stacks, layers
from preflmr_jax.models import model_config as mc
from preflmr_jax.models import preflmr


@pytest.fixture(scope="module")
def setup():
  t = mc.TextConfig(**mc.text_shape("tiny"))
  colon, punct = tokenization.mask_token_ids(tokenization.tiny_tokenizer())
  config = mc.PreFLMRConfig(text=t, vision=mc.VisionConfig(**mc.vision_shape("tiny")),
                            mapping=dataclasses.replace(t, num_layers=2), query_maxlen=16,
                            doc_maxlen=24, mapping_cross_attention_length=16,
                            mapping_prefix_length=4, dim=16, instruction_token_id=colon,
                            skip_token_ids=punct)
  tok = tokenization.tiny_tokenizer()
  q = tokenization.QueryTokenizer(tok, 16)(["what is this?", "where is it"], ["answer this:", None])
  d = tokenization.DocumentTokenizer(tok, 24)(["A tower, in Paris.", "apples; pears!"])
  pixels = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
  inputs = (q["input_ids"], q["attention_mask"], pixels, d["input_ids"], d["attention_mask"])
  return config, preflmr.init_params(config, jax.random.key(0)), inputs


def _apply(config, params, inputs, **kw):
  return jax.jit(lambda p, x: preflmr.PreFLMR(config).apply({"params": p}, *x, **kw))(params, inputs)


@pytest.mark.slow
def test_embeddings_are_unit_or_zero_and_masks_apply(setup):
  config, params, inputs = setup
  (q, q_mask), (d, d_mask) = _apply(config, params, inputs)
  assert q.shape == (2, config.query_length, config.dim) and q.dtype == jnp.float32
  for e, m in ((q, q_mask), (d, d_mask)):
    norms = np.linalg.norm(e, axis=-1)
    np.testing.assert_allclose(norms[m == 1], 1.0, atol=1e-5)
    assert (norms[m == 0] == 0).all()
  assert q_mask[0, 2] == 0 and q_mask[1, 2] == 1  # instruction masked only where there is one
  assert d_mask[0].sum() < inputs[4][0].sum()  # "," and "." are masked in the document


@pytest.mark.slow
def test_remat_changes_nothing(setup):
  kw = dict(remat=True, remat_policy="dots_saveable")
  config, params, inputs = setup
  ref = _apply(config, params, inputs)
  out = _apply(dataclasses.replace(config, **kw), params, inputs)
  jax.tree.map(np.testing.assert_array_equal, out, ref)
  loss = lambda c: lambda p: jnp.sum(_apply(c, p, inputs)[0][0] ** 3)
  g_ref = jax.grad(loss(config))(params)
  g = jax.grad(loss(dataclasses.replace(config, **kw)))(params)
  for leaf in jax.tree.leaves(g_ref):
    assert np.isfinite(leaf).all()
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, equal_nan=False),
               g, g_ref)


def test_the_layer_table_converts_both_ways(setup):
  config, params, _ = setup
  scanned = dataclasses.replace(config, scan_layers=True)
  stacked = layer_stacks.stack(params)
  shapes = lambda tree: jax.tree.map(lambda x: (x.shape, x.dtype), tree)
  assert shapes(stacked) == shapes(preflmr.abstract_params(scanned))
  assert shapes(preflmr.abstract_params(config)) == shapes(params)  # traced scanned, unstacked
  assert stacked["mapping_layers"]["attention"]["query"]["kernel"].shape[0] == 2
  assert "layer_0" not in stacked["vision"] and "mapping_layer_0" not in stacked
  np.testing.assert_array_equal(stacked["query_text"]["layers"]["mlp"]["wi"]["kernel"][1],
                                params["query_text"]["layer_1"]["mlp"]["wi"]["kernel"])
  jax.tree.map(np.testing.assert_array_equal, layer_stacks.unstack(stacked), params)
  assert layer_stacks.is_stacked(stacked) and not layer_stacks.is_stacked(params)
  # Abstract trees convert too, and the stacked axis is the logical `layers` axis.
  assert shapes(layer_stacks.unstack(preflmr.abstract_params(scanned))) == shapes(params)
  boxed = jax.eval_shape(lambda: preflmr.PreFLMR(scanned).init(
      jax.random.key(0), **preflmr.dummy_inputs(scanned))["params"])
  spec = jax.tree.map(lambda b: b.names, boxed["vision"]["layers"]["mlp"]["wi"]["kernel"],
                      is_leaf=lambda b: hasattr(b, "names"))
  assert spec == (layers.STACK_AXIS, "embed", "mlp")


@pytest.mark.slow
@pytest.mark.parametrize("remat_policy", [None, "dots_saveable"])
def test_scanned_layers_equal_the_loop(setup, remat_policy):
  """One nn.scan per layer stack, saving layers.scanned_residuals or rematerialised with a remat
  policy, computes what the per-layer loop does, forward and backward, on the same parameters
  (test_encoders: scan alone vs HF)."""
  config, params, inputs = setup
  stacked = layer_stacks.stack(params)
  remat = {"remat": True, "remat_policy": remat_policy} if remat_policy else {}
  scanned = dataclasses.replace(config, scan_layers=True, **remat)
  for a, b in zip(jax.tree.leaves(_apply(scanned, stacked, inputs)),
                  jax.tree.leaves(_apply(config, params, inputs))):
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)
  loss = lambda c: lambda p: jnp.sum(_apply(c, p, inputs)[0][0] ** 3)
  g_ref = jax.grad(loss(config))(params)
  g = layer_stacks.unstack(jax.grad(loss(scanned))(stacked))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g, g_ref)
  assert any(np.abs(x).max() > 0 for x in jax.tree.leaves(g_ref["mapping_layer_1"]))


@pytest.mark.slow
def test_gradients_through_maxsim_are_finite_and_reach_every_trained_part(setup):
  """Masked tokens are exact zeros: normalising them must not put NaN into the gradients."""
  config, params, inputs = setup

  def loss(p):
    (q, _), (d, d_mask) = _apply(config, p, inputs)
    scores = late_interaction.maxsim(q, d, d_mask)
    return -jax.nn.log_softmax(scores, axis=1).trace()

  grads = jax.grad(loss)(params)
  for path, leaf in jax.tree_util.tree_leaves_with_path(grads):
    assert np.isfinite(leaf).all(), jax.tree_util.keystr(path)
  for part in ("query_text", "document_text", "query_head", "document_head", "vision",
               "vision_projection", "mapping_input", "mapping_layer_0", "mapping_output"):
    assert any(np.abs(x).max() > 0 for x in jax.tree.leaves(grads[part])), part


@pytest.mark.slow
def test_bf16_compute_with_fp32_params(setup):
  config, params, inputs = setup
  ref = _apply(config, params, inputs)
  out = _apply(dataclasses.replace(config, dtype="bfloat16"), params, inputs)
  for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref)):
    assert a.dtype == jnp.float32  # embeddings are normalised in float32
    np.testing.assert_allclose(a, b, atol=2e-2)
  bf16 = preflmr.init_params(dataclasses.replace(config, param_dtype="bfloat16"), jax.random.key(0))
  assert {x.dtype for x in jax.tree.leaves(bf16)} == {jnp.dtype(jnp.bfloat16)}


def _no_attention_dropout(config, **kw):
  off = lambda sub: dataclasses.replace(sub, attention_dropout_rate=0.0)
  return dataclasses.replace(config, text=off(config.text), vision=off(config.vision),
                             mapping=off(config.mapping), **kw)


@pytest.mark.slow
def test_fused_attention_path_matches_and_keeps_the_parameter_names(setup, monkeypatch):
  """attention='cudnn' runs jax.nn.dot_product_attention in [B, L, H, D] layout with the padding
  mask as a bias; here its XLA implementation stands in for cuDNN (CPU). Checks the layout, mask
  and scale plumbing, values and gradients; cuDNN itself is checked by benchmarks/gpu.py."""
  monkeypatch.setitem(layers._FUSED_BACKEND, "cudnn", "xla")
  config, params, inputs = setup
  reference = _no_attention_dropout(config, dtype="bfloat16")
  fused = dataclasses.replace(reference, attention="cudnn")
  assert (jax.tree.structure(preflmr.abstract_params(fused))
          == jax.tree.structure(preflmr.abstract_params(reference)))
  for a, b in zip(jax.tree.leaves(_apply(fused, params, inputs)),
                  jax.tree.leaves(_apply(reference, params, inputs))):
    np.testing.assert_allclose(a, b, atol=2e-2)
  # Padding matters: documents and queries above have padded positions.
  assert not np.asarray(inputs[4]).all() and not np.asarray(inputs[1]).all()
  loss = lambda c: lambda p: jnp.sum(_apply(c, p, inputs, deterministic=False,
                                            rngs={"dropout": jax.random.key(1)})[0][0] ** 2)
  g, g_ref = jax.grad(loss(fused))(params), jax.grad(loss(reference))(params)
  for x, y in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(x, y, atol=5e-2 * max(1.0, float(np.abs(y).max())))


def test_fused_attention_refuses_attention_dropout(setup, monkeypatch):
  monkeypatch.setitem(layers._FUSED_BACKEND, "cudnn", "xla")  # CPU
  config, _, _ = setup
  with pytest.raises(ValueError, match="config.model.text.attention_dropout_rate"):
    dataclasses.replace(config, attention="cudnn", dtype="bfloat16")
  with pytest.raises(ValueError, match="config.model.dtype"):
    _no_attention_dropout(config, attention="cudnn")
  with pytest.raises(ValueError, match="config.model.attention"):
    dataclasses.replace(config, attention="flash")
  attention = layers.MultiHeadAttention(8, 2, 0.1, layers.Execution(attention="cudnn"))
  x = jnp.ones((1, 3, 8))
  variables = attention.init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="no attention dropout"):
    attention.apply(variables, x, deterministic=False, rngs={"dropout": jax.random.key(0)})


@pytest.mark.slow
def test_dropout_is_active_only_when_not_deterministic(setup):
  config, params, inputs = setup
  a = _apply(config, params, inputs)
  b = _apply(config, params, inputs, deterministic=False, rngs={"dropout": jax.random.key(3)})
  assert np.abs(np.asarray(a[0][0]) - np.asarray(b[0][0])).max() > 1e-3


def test_query_skip_token_ids_drop_tokens_from_text_and_cross_attention(setup):
  config, params, inputs = setup
  skip = int(inputs[0][0, 3])
  (q, q_mask), _ = _apply(dataclasses.replace(config, query_skip_token_ids=(skip,)), params, inputs)
  (q_ref, _), _ = _apply(config, params, inputs)
  assert q_mask[0, 3] == 0 and (q[0, 3] == 0).all()
  # The mapping tokens change too: the skipped token is out of the cross-attention.
  mapped = slice(config.query_maxlen + config.mapping_prefix_length, None)
  assert np.abs(np.asarray(q[0, mapped]) - np.asarray(q_ref[0, mapped])).max() > 1e-6


def test_wrong_query_length_is_a_clear_error(setup):
  config, params, inputs = setup
  with pytest.raises(ValueError, match="query_maxlen"):
    _apply(config, params, (inputs[0][:, :8], inputs[1][:, :8]) + inputs[2:])
