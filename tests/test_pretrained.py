"""End to end: a tiny checkpoint in the published layout, written from the PyTorch reference PreFLMR
(preflmr_jax/testing/torch_reference.py: transformers modules and the official recipe), loaded
with `load_pretrained`; embeddings, masks and scores against that reference."""

import dataclasses
import json
import os
import stat
import string

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from PIL import Image
from safetensors.flax import save_file as save_flax
from safetensors.numpy import load_file, save_file

import preflmr_jax
from preflmr_jax import conversion, image_processing, tokenization
from preflmr_jax.models import layer_stacks
from preflmr_jax.models.model_config import PreFLMRConfig, TextConfig, VisionConfig
from preflmr_jax.testing import torch_reference
from preflmr_jax.user_errors import NotWritable

TEXT = TextConfig(vocab_size=tokenization.TINY_VOCAB_SIZE, hidden_size=32, num_layers=2, num_heads=4,
                  intermediate_size=37, max_position_embeddings=64)
MAPPING = TextConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=40)
VISION = VisionConfig(hidden_size=24, num_layers=3, num_heads=4, intermediate_size=48, patch_size=8,
                      image_size=32)
DIM, PREFIX, QLEN, CROSS = 16, 4, 16, 12


def reference_config() -> PreFLMRConfig:
  colon, punct = tokenization.mask_token_ids(tokenization.tiny_tokenizer())
  return PreFLMRConfig(text=TEXT, vision=VISION, mapping=MAPPING, dim=DIM, query_maxlen=QLEN,
                       doc_maxlen=48, mapping_prefix_length=PREFIX,
                       mapping_cross_attention_length=CROSS,
                       instruction_token_id=colon, skip_token_ids=punct)


def encode_queries(reference, ids, mask, pixels, output=None):
  q, q_mask = reference.queries(torch_reference.to_torch(ids).long(),
                                torch_reference.to_torch(mask).long(), torch_reference.nchw(pixels),
                                output)
  return q.numpy(), q_mask.numpy()


def encode_documents(reference, ids, mask):
  d, d_mask = reference.documents(torch_reference.to_torch(ids).long(),
                                  torch_reference.to_torch(mask).long())
  return d.numpy(), d_mask.numpy()


def naive_maxsim(q, d, d_mask):
  scores = np.zeros((len(q), len(d)))
  for i in range(len(q)):
    for j in range(len(d)):
      sim = q[i].astype(np.float64) @ d[j].astype(np.float64).T  # [Lq, Ld]
      sim[:, d_mask[j] == 0] = -np.inf
      scores[i, j] = sim.max(axis=1).sum()
  return scores


def write_checkpoint(folder, oracle, text_output=True):
  os.makedirs(folder)
  mapping_dir = os.path.join(folder, "mapping_config")
  os.makedirs(mapping_dir)
  with open(os.path.join(mapping_dir, "config.json"), "w") as f:
    json.dump(torch_reference.hf_bert_config(MAPPING).to_dict(), f)
  hf = {
      "architectures": ["FLMRModelForRetrieval"], "model_type": "flmr", "dim": DIM,
      "text_config": torch_reference.hf_bert_config(TEXT).to_dict(),
      "vision_config": torch_reference.hf_clip_config(VISION).to_dict(),
      "mapping_network_prefix_length": PREFIX, "transformer_mapping_num_hidden_layers": 1,
      "transformer_mapping_config_base": "mapping_config",
      "transformer_mapping_cross_attention_length": CROSS, "query_maxlen": QLEN,
      "mask_instruction_token": ":", "mask_punctuation": True,
      "query_concat_output_from_text_encoder": text_output,
      "query_concat_output_from_vision_encoder": True, "use_vision_encoder": True,
      "use_transformer_mapping_network": True, "separate_query_and_context_text_encoder": True,
      "separate_query_and_context_vision_encoder": False, "query_mask_input_ids_skip_list": [],
  }
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(hf, f)
  state = oracle.published_state_dict()
  # A buffer that older checkpoints carry: ignored on load.
  state["query_text_encoder.bert_model.embeddings.position_ids"] = np.arange(64)[None]
  save_file(state, os.path.join(folder, "model.safetensors"))
  tok = tokenization.tiny_tokenizer()
  tok.save_pretrained(os.path.join(folder, "query_tokenizer"))
  tok.save_pretrained(os.path.join(folder, "context_tokenizer"))
  return folder


@pytest.fixture(scope="module")
def oracle():
  return torch_reference.TorchPreFLMR(reference_config(), attention="eager", std=0.2)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, oracle):
  return write_checkpoint(str(tmp_path_factory.mktemp("ckpt") / "tiny_preflmr"), oracle)


def _inputs():
  tok = tokenization.tiny_tokenizer()
  queries = tokenization.QueryTokenizer(tok, QLEN)(
      ["what is the name of this building?", "who made it", "colour: of the car?"],
      ["Using the image, answer:", "Retrieve a passage", None])
  rng = np.random.default_rng(0)
  images = [Image.fromarray(rng.integers(0, 255, (40 + 9 * i, 50, 3), np.uint8)) for i in range(3)]
  pixels = image_processing.preprocess_images(images, VISION.image_size)
  docs = tokenization.DocumentTokenizer(tok, 48)(
      ["The tower, built in 1889, is 330 m tall!", "A red car; parked (outside).",
       "short", "Paris is the capital of France. It has many museums and a river."],
      padding="longest")
  colon, punct = tokenization.mask_token_ids(tok)
  return queries, pixels, docs, colon, punct


@pytest.mark.slow
def test_load_pretrained_matches_pytorch_reference(checkpoint, oracle):
  model = preflmr_jax.load_pretrained(checkpoint)
  queries, pixels, docs, colon, punct = _inputs()
  assert model.config.instruction_token_id == colon and model.config.skip_token_ids == punct
  q, q_mask = model.encode_queries(queries["input_ids"], queries["attention_mask"], pixels)
  d, d_mask = model.encode_documents(docs["input_ids"], docs["attention_mask"])
  q_ref, q_mask_ref = encode_queries(oracle, queries["input_ids"], queries["attention_mask"], pixels)
  d_ref, d_mask_ref = encode_documents(oracle, docs["input_ids"], docs["attention_mask"])

  assert q.shape == (3, QLEN + PREFIX + VISION.num_patches, DIM)
  np.testing.assert_allclose(q, q_ref, atol=1e-5, rtol=0)
  np.testing.assert_array_equal(q_mask, q_mask_ref)
  np.testing.assert_allclose(d, d_ref, atol=1e-5, rtol=0)
  np.testing.assert_array_equal(d_mask, d_mask_ref)
  # The instruction is masked in the first two queries, and punctuation in the documents.
  assert q_mask[0, 2] == 0 and q_mask[1, 2] == 0 and d_mask_ref[1].sum() < docs["attention_mask"][1].sum()
  scores = preflmr_jax.maxsim(q, d, d_mask)
  np.testing.assert_allclose(scores, naive_maxsim(q_ref, d_ref, d_mask_ref), atol=1e-4, rtol=0)


def test_scanned_layers_encode_and_export_the_published_weights(checkpoint, oracle):
  published = preflmr_jax.load_pretrained(checkpoint)
  scanned = preflmr_jax.PretrainedPreFLMR(dataclasses.replace(published.config, scan_layers=True),
                                          layer_stacks.stack(published.params))
  queries, pixels, docs, _, _ = _inputs()
  q, _ = scanned.encode_queries(queries["input_ids"], queries["attention_mask"], pixels)
  d, _ = scanned.encode_documents(docs["input_ids"], docs["attention_mask"])
  q_ref, _ = encode_queries(oracle, queries["input_ids"], queries["attention_mask"], pixels)
  d_ref, _ = encode_documents(oracle, docs["input_ids"], docs["attention_mask"])
  np.testing.assert_allclose(q, q_ref, atol=1e-5, rtol=0)
  np.testing.assert_allclose(d, d_ref, atol=1e-5, rtol=0)
  exported, original = scanned.state_dict(), published.state_dict()
  assert exported.keys() == original.keys()
  for k in original:
    np.testing.assert_array_equal(exported[k], original[k], err_msg=k)


def test_stage1_output_is_vision_tokens_only(tmp_path, oracle):
  folder = write_checkpoint(str(tmp_path / "stage1"), oracle, text_output=False)
  model = preflmr_jax.load_pretrained(folder)
  assert model.config.output == "mapping_only"
  queries, pixels, _, colon, _ = _inputs()
  q, q_mask = model.encode_queries(queries["input_ids"], queries["attention_mask"], pixels)
  q_ref, q_mask_ref = encode_queries(oracle, queries["input_ids"], queries["attention_mask"], pixels,
                                     output="mapping_only")
  assert q.shape[1] == PREFIX + VISION.num_patches
  np.testing.assert_allclose(q, q_ref, atol=1e-5, rtol=0)
  np.testing.assert_array_equal(q_mask, q_mask_ref)


def test_save_load_round_trip_is_exact(tmp_path, checkpoint):
  first = preflmr_jax.load_pretrained(checkpoint)
  umask = os.umask(0o027)
  try:
    first.save_pretrained(str(tmp_path / "copy"))
  finally:
    os.umask(umask)
  second = preflmr_jax.load_pretrained(str(tmp_path / "copy"))
  assert second.config == first.config
  flat = lambda m: conversion.traverse_util.flatten_dict(m.params, sep="/")
  a, b = flat(first), flat(second)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)
  original = load_file(os.path.join(checkpoint, "model.safetensors"))
  written = load_file(str(tmp_path / "copy" / "model.safetensors"))
  assert set(written) == set(original) - {"query_text_encoder.bert_model.embeddings.position_ids"}
  for k in written:
    np.testing.assert_array_equal(written[k], original[k], err_msg=k)
  with open(os.path.join(checkpoint, "config.json")) as f, open(tmp_path / "copy" / "config.json") as g:
    assert json.load(f) == json.load(g)
  assert second.query_tokenizer.get_vocab() == first.query_tokenizer.get_vocab()
  assert second.document_tokenizer.get_vocab() == first.document_tokenizer.get_vocab()
  # No temporary folder left behind.
  assert sorted(os.listdir(tmp_path)) == ["copy"]
  # open()'s and mkdir()'s modes under the umask (safetensors alone would make its file 0600).
  mode = lambda name: stat.S_IMODE(os.stat(tmp_path / "copy" / name).st_mode)
  assert mode("model.safetensors") == mode("config.json") == 0o640
  assert mode("") == 0o750


def test_trained_model_saves_in_published_layout(tmp_path, checkpoint):
  model = preflmr_jax.load_pretrained(checkpoint)
  fresh = preflmr_jax.PretrainedPreFLMR(model.config, model.params)  # no hf_config: generated
  fresh.save_pretrained(str(tmp_path / "out"))
  again = preflmr_jax.load_pretrained(str(tmp_path / "out"))
  assert again.config == model.config
  assert os.path.isfile(tmp_path / "out" / "transformer_mapping_config" / "config.json")


def _variant(src, dst, *, leave_out=(), edit_config=None):
  """Checkpoint `src` at `dst` as links, less `leave_out`; `edit_config(dict)` edits config.json."""
  os.makedirs(dst)
  for name in os.listdir(src):
    if name not in leave_out and not (edit_config and name == "config.json"):
      os.symlink(os.path.join(src, name), os.path.join(dst, name))
  if edit_config:
    with open(os.path.join(src, "config.json")) as f:
      hf = json.load(f)
    edit_config(hf)
    with open(os.path.join(dst, "config.json"), "w") as f:
      json.dump(hf, f)
  return str(dst)


def _edit_checkpoint(src, dst, edit):
  """A variant of `src` whose weights are `edit(state dict)`-ed in place."""
  _variant(src, dst, leave_out=("model.safetensors",))
  state = load_file(os.path.join(src, "model.safetensors"))
  edit(state)
  save_file(state, os.path.join(dst, "model.safetensors"))
  return dst


def test_aliased_prefixes_are_accepted(tmp_path, checkpoint):
  def rename(state):
    for k in list(state):
      for old, new in (("context_vision_encoder.", "query_vision_encoder."),
                       ("context_vision_projection.", "query_vision_projection."),
                       ("query_text_encoder.bert_model.", "query_text_encoder.text_model.")):
        if k.startswith(old):
          state[new + k[len(old):]] = state.pop(k)
  model = preflmr_jax.load_pretrained(_edit_checkpoint(checkpoint, str(tmp_path / "a"), rename))
  ref = preflmr_jax.load_pretrained(checkpoint)
  np.testing.assert_array_equal(model.params["vision"]["pre_layrnorm"]["scale"],
                                ref.params["vision"]["pre_layrnorm"]["scale"])


def test_duplicated_copies_must_agree(tmp_path, checkpoint):
  def duplicate(state):
    key = "context_vision_projection.model.0.bias"
    state["query_vision_projection.model.0.bias"] = state[key] + 1
  with pytest.raises(conversion.ConversionError, match="model.0.bias"):
    preflmr_jax.load_pretrained(_edit_checkpoint(checkpoint, str(tmp_path / "d"), duplicate))


@pytest.mark.parametrize("edit,message", [
    (lambda s: s.pop("transformer_mapping_output_linear.bias"),
     "missing key 'transformer_mapping_output_linear.bias'"),
    (lambda s: s.__setitem__("transformer_mapping_network.layer.1.output.dense.bias", np.zeros(3)),
     "unexpected key.*transformer_mapping_network.layer.1.output.dense.bias"),
    (lambda s: s.__setitem__("context_text_encoder_linear.weight", np.zeros((8, 32), np.float32)),
     "shape mismatch for key 'context_text_encoder_linear.weight'"),
])
def test_bad_checkpoints_name_the_key(tmp_path, checkpoint, edit, message):
  with pytest.raises(conversion.ConversionError, match=message):
    preflmr_jax.load_pretrained(_edit_checkpoint(checkpoint, str(tmp_path / "bad"), edit))


def test_config_of_another_size_fails_with_shape_error(tmp_path, checkpoint):
  folder = _variant(checkpoint, tmp_path / "other", edit_config=lambda hf: hf.update(dim=8))
  with pytest.raises(conversion.ConversionError, match="shape mismatch for key"):
    preflmr_jax.load_pretrained(folder)


def test_pickle_weights_are_refused(tmp_path, checkpoint):
  folder = _variant(checkpoint, tmp_path / "pickled", leave_out=("model.safetensors",))
  (tmp_path / "pickled" / "pytorch_model.bin").write_bytes(b"not opened")
  with pytest.raises(ValueError, match="refusing to read pickle-based weights"):
    preflmr_jax.load_pretrained(folder)


def test_unknown_mapping_base_is_an_error(tmp_path, checkpoint):
  folder = tmp_path / "hub"
  os.makedirs(folder)
  with open(os.path.join(checkpoint, "config.json")) as f:
    hf = json.load(f)
  hf["transformer_mapping_config_base"] = "some-org/some-hub-model"
  with open(folder / "config.json", "w") as f:
    json.dump(hf, f)
  with pytest.raises(ValueError, match="transformer_mapping_config_base"):
    preflmr_jax.load_pretrained(str(folder))


def test_save_refuses_to_clobber_a_folder_that_is_not_a_checkpoint(tmp_path, checkpoint):
  model = preflmr_jax.load_pretrained(checkpoint)
  (tmp_path / "notes").mkdir()
  (tmp_path / "notes" / "my_notes.txt").write_text("keep me")
  with pytest.raises(NotWritable, match="exists and is not empty; pass overwrite=True"):
    model.save_pretrained(str(tmp_path / "notes"))
  with pytest.raises(NotWritable, match="is not a published folder"):
    model.save_pretrained(str(tmp_path / "notes"), overwrite=True)
  assert (tmp_path / "notes" / "my_notes.txt").read_text() == "keep me"
  model.save_pretrained(str(tmp_path / "ckpt"))
  model.save_pretrained(str(tmp_path / "ckpt"), overwrite=True)  # a checkpoint may be replaced
  assert oct(os.stat(tmp_path / "ckpt").st_mode & 0o777) != oct(0o700)


def test_bfloat16_checkpoint_loads(tmp_path, checkpoint):
  state = load_file(os.path.join(checkpoint, "model.safetensors"))
  folder = tmp_path / "bf16"
  _variant(checkpoint, folder, leave_out=("model.safetensors",))
  save_flax({k: jnp.asarray(v, jnp.bfloat16) for k, v in state.items()
             if k != "query_text_encoder.bert_model.embeddings.position_ids"},
            str(folder / "model.safetensors"))
  model = preflmr_jax.load_pretrained(str(folder))
  ref = preflmr_jax.load_pretrained(checkpoint)
  got = np.asarray(model.params["query_head"]["kernel"])
  want = np.asarray(ref.params["query_head"]["kernel"]).astype(ml_dtypes.bfloat16).astype(np.float32)
  np.testing.assert_array_equal(got, want)


def test_out_of_vocab_ids_are_an_error_not_nan(checkpoint):
  model = preflmr_jax.load_pretrained(checkpoint)
  ids = np.full((1, 8), TEXT.vocab_size, np.int32)
  with pytest.raises(ValueError, match="vocab_size"):
    model.encode_documents(ids, np.ones_like(ids))


@pytest.mark.parametrize("key,value,message", [
    ("use_transformer_mapping_network", None, "use_transformer_mapping_network"),  # FLMR, not PreFLMR
    ("context_concat_output_from_vision_encoder", True, "context_concat_output_from_vision_encoder"),
    ("transformer_mapping_num_hidden_layers", None, "transformer_mapping_num_hidden_layers"),
    ("transformer_mapping_config_base", None, "transformer_mapping_config_base"),
])
def test_unsupported_or_missing_config_values_name_the_key(tmp_path, checkpoint, key, value, message):
  def edit(hf):
    if value is None:
      hf.pop(key)  # a missing key means FLMRConfig's default
    else:
      hf[key] = value
  folder = _variant(checkpoint, tmp_path / "cfg", edit_config=edit)
  with pytest.raises(ValueError, match=message):
    preflmr_jax.load_pretrained(folder)


def test_punctuation_ids_cover_string_punctuation():
  _, punct = tokenization.mask_token_ids(tokenization.tiny_tokenizer())
  assert len(punct) == len(string.punctuation)


def test_a_folder_missing_a_tokenizer_uses_its_other_one_or_the_fallback():
  model = lambda q, d: preflmr_jax.PretrainedPreFLMR(reference_config(), None, query_tokenizer=q,
                                                     document_tokenizer=d)
  no_call = lambda: pytest.fail("the fallback is for a folder without tokenizers")
  assert model("q", "d").tokenizers(no_call) == ("q", "d")
  assert model("q", None).tokenizers(no_call) == ("q", "q")
  assert model(None, "d").tokenizers(no_call) == ("d", "d")
  assert model(None, None).tokenizers(lambda: "config's") == ("config's", "config's")
