"""Published PreFLMR checkpoints (HF layout: `config.json` + `model.safetensors`) in and out.

  model = preflmr_jax.load_pretrained("/path/to/PreFLMR_ViT-L")
  Q, Q_mask = model.encode_queries(input_ids, attention_mask, pixel_values)   # NHWC pixels
  D, D_mask = model.encode_documents(input_ids, attention_mask)
  model.save_pretrained("/path/to/copy")                                      # same layout back

Folders may be local or gs:// URLs (storage.py). Weights are read from safetensors only: unpickling
a PyTorch `.bin` file can run arbitrary code.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import stat
import tempfile
import uuid
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import traverse_util
from safetensors import safe_open
from safetensors.numpy import save_file

from preflmr_jax import conversion, storage, tokenization
from preflmr_jax.models import layer_stacks
from preflmr_jax.models import model_config as mc
from preflmr_jax.models import token_masks
from preflmr_jax.models.preflmr import PreFLMR, abstract_params
from preflmr_jax.user_errors import BadFile, MissingPath, NotAFolder, NotWritable

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_DIRS = {"query": "query_tokenizer", "document": "context_tokenizer"}
MAPPING_CONFIG_DIR = "transformer_mapping_config"
_BERT_BASE_NAMES = ("bert-base-uncased", "google-bert/bert-base-uncased")

# HF config.json field -> our field, for the BERT and CLIP sub-configs (HF defaults fill the rest).
_BERT_FIELDS = dict(vocab_size="vocab_size", hidden_size="hidden_size",
                    num_hidden_layers="num_layers", num_attention_heads="num_heads",
                    intermediate_size="intermediate_size",
                    max_position_embeddings="max_position_embeddings",
                    type_vocab_size="type_vocab_size", layer_norm_eps="layer_norm_eps",
                    hidden_act="hidden_act", hidden_dropout_prob="dropout_rate",
                    attention_probs_dropout_prob="attention_dropout_rate")
_CLIP_FIELDS = dict(hidden_size="hidden_size", num_hidden_layers="num_layers",
                    num_attention_heads="num_heads", intermediate_size="intermediate_size",
                    patch_size="patch_size", image_size="image_size", num_channels="num_channels",
                    hidden_act="hidden_act", layer_norm_eps="layer_norm_eps",
                    attention_dropout="attention_dropout_rate")
# bert-base-uncased = HF BertConfig's defaults; VisionConfig() = CLIPVisionConfig's (ViT-B/32).
_HF_BERT_DEFAULTS = mc.TextConfig()


def _from_hf(d: Mapping[str, Any], fields: Mapping[str, str], defaults) -> dict[str, Any]:
  out = dataclasses.asdict(defaults)
  out.update({ours: d[theirs] for theirs, ours in fields.items() if theirs in d})
  return out


def _to_hf(c, fields: Mapping[str, str]) -> dict[str, Any]:
  return {theirs: getattr(c, ours) for theirs, ours in fields.items()}


def _fail(folder, key: str, msg: str):
  raise BadFile(f"{epath.Path(folder) / CONFIG_FILE}: {key}: {msg}")


def _read_json(path: epath.Path) -> dict[str, Any]:
  try:
    return json.loads(path.read_text())
  except ValueError as e:  # truncated or not JSON
    raise BadFile(f"{path}: not valid JSON ({e})") from None


# `FLMRConfig`'s defaults (what a key missing from config.json means to the official code).
FLMR_DEFAULTS = dict(
    dim=128, mapping_network_prefix_length=32, mask_punctuation=True, use_vision_encoder=True,
    separate_query_and_context_text_encoder=False, separate_query_and_context_vision_encoder=False,
    query_concat_output_from_vision_encoder=True, query_concat_output_from_text_encoder=True,
    context_concat_output_from_vision_encoder=False, context_concat_output_from_text_encoder=True,
    use_transformer_mapping_network=False, transformer_mapping_config_base=None,
    transformer_mapping_num_hidden_layers=None, mask_instruction_token=None,
    transformer_mapping_cross_attention_length=32, query_mask_input_ids_skip_list=[])
# Settings this implementation reproduces (every released PreFLMR checkpoint has them).
_REQUIRED = dict(use_vision_encoder=True, use_transformer_mapping_network=True,
                 separate_query_and_context_text_encoder=True,
                 separate_query_and_context_vision_encoder=False,
                 query_concat_output_from_vision_encoder=True,
                 context_concat_output_from_vision_encoder=False,
                 context_concat_output_from_text_encoder=True)


def _tokenizer_length(tokenizer, key: str, default: int) -> int:
  """FLMR tokenizers keep their lengths (`query_maxlen`, `doc_maxlen`) in tokenizer_config.json."""
  value = getattr(tokenizer, "init_kwargs", {}).get(key) if tokenizer is not None else None
  return int(value) if value else default


def model_config_from_hf(hf: Mapping[str, Any], folder: storage.PathLike, query_tokenizer=None,
                         document_tokenizer=None) -> mc.PreFLMRConfig:
  """Our `PreFLMRConfig` from a published `config.json` dict (missing keys mean FLMRConfig's defaults)."""
  if hf.get("model_type", "flmr") != "flmr":
    _fail(folder, "model_type", f"{hf['model_type']!r}: not a PreFLMR checkpoint (model_type "
          "'flmr')")
  hf = {**FLMR_DEFAULTS, **hf}
  for key, want in _REQUIRED.items():
    if hf[key] != want:
      _fail(folder, key, f"{hf[key]!r} is not supported (PreFLMR checkpoints have {want})")
  text = _from_hf(hf.get("text_config") or {}, _BERT_FIELDS, _HF_BERT_DEFAULTS)
  vision = _from_hf(hf.get("vision_config") or {}, _CLIP_FIELDS, mc.VisionConfig())

  base = hf["transformer_mapping_config_base"]
  if not isinstance(base, str):
    _fail(folder, "transformer_mapping_config_base",
          f"{base!r}: expected 'bert-base-uncased' or a local folder with a BERT {CONFIG_FILE}")
  if base in _BERT_BASE_NAMES:
    mapping = dataclasses.asdict(_HF_BERT_DEFAULTS)
  else:  # a folder holding a BERT config.json; relative paths are taken from the checkpoint
    path = (epath.Path(base) if storage.is_remote(base) or os.path.isabs(base)
            else epath.Path(folder) / base)
    if not (path / CONFIG_FILE).is_file():
      _fail(folder, "transformer_mapping_config_base",
            f"{base!r} is neither 'bert-base-uncased' nor a local folder with a BERT {CONFIG_FILE} "
            "(models are never downloaded from a hub)")
    mapping = _from_hf(_read_json(path / CONFIG_FILE), _BERT_FIELDS,
                       _HF_BERT_DEFAULTS)
  layers = hf["transformer_mapping_num_hidden_layers"]
  if not isinstance(layers, int) or layers < 1:
    _fail(folder, "transformer_mapping_num_hidden_layers", f"{layers!r}: expected an int >= 1")
  mapping["num_layers"] = layers

  # Token ids for the masks: written by `hf_config_from_model` for models trained here (possibly
  # another vocab); else from the tokenizers, as the official model does; else bert-base-uncased's.
  instruction = hf["mask_instruction_token"]
  colon_id, punctuation_ids = token_masks.BERT_UNCASED_COLON_ID, token_masks.BERT_UNCASED_PUNCTUATION_IDS
  if query_tokenizer is not None and instruction is not None:
    colon_id = tokenization.first_token_id(query_tokenizer, instruction)
  if document_tokenizer is not None:
    punctuation_ids = tokenization.mask_token_ids(document_tokenizer)[1]
  colon_id = hf.get("instruction_token_id", colon_id)
  punctuation_ids = tuple(hf.get("punctuation_token_ids", punctuation_ids))
  derived = query_tokenizer is not None and document_tokenizer is not None
  if not derived and "instruction_token_id" not in hf:
    if text["vocab_size"] != _HF_BERT_DEFAULTS.vocab_size:
      _fail(folder, "text_config.vocab_size",
            f"{text['vocab_size']} is not bert-base-uncased's; the mask token ids need the "
            f"checkpoint's {TOKENIZER_DIRS['query']}/ and {TOKENIZER_DIRS['document']}/ folders")
    if instruction not in (None, ":"):
      _fail(folder, "mask_instruction_token",
            f"{instruction!r} needs the checkpoint's {TOKENIZER_DIRS['query']}/ folder")
  return mc.PreFLMRConfig.from_dict(dict(
      text=text, vision=vision, mapping=mapping, dim=hf["dim"],
      query_maxlen=hf.get("query_maxlen", _tokenizer_length(query_tokenizer, "query_maxlen", 32)),
      doc_maxlen=hf.get("doc_maxlen", _tokenizer_length(
          document_tokenizer, "doc_maxlen", min(512, text["max_position_embeddings"]))),
      mapping_prefix_length=hf["mapping_network_prefix_length"],
      mapping_cross_attention_length=hf["transformer_mapping_cross_attention_length"],
      output="full" if hf["query_concat_output_from_text_encoder"] else "mapping_only",
      mask_instruction_token=instruction is not None, instruction_token_id=colon_id,
      query_skip_token_ids=tuple(hf["query_mask_input_ids_skip_list"] or ()),
      mask_punctuation=hf["mask_punctuation"], skip_token_ids=punctuation_ids))


def hf_config_from_model(c: mc.PreFLMRConfig) -> dict[str, Any]:
  """A published-style `config.json` dict for our config (used when saving a model we trained)."""
  return {
      "architectures": ["FLMRModelForRetrieval"], "model_type": "flmr", "dim": c.dim,
      "text_config": {"model_type": "flmr_text_model", **_to_hf(c.text, _BERT_FIELDS)},
      "vision_config": {"model_type": "flmr_vision_model", **_to_hf(c.vision, _CLIP_FIELDS)},
      "mapping_network_prefix_length": c.mapping_prefix_length,
      "transformer_mapping_cross_attention_length": c.mapping_cross_attention_length,
      "transformer_mapping_num_hidden_layers": c.mapping.num_layers,
      "transformer_mapping_config_base": (
          "bert-base-uncased" if dataclasses.replace(c.mapping, num_layers=12) == _HF_BERT_DEFAULTS
          else MAPPING_CONFIG_DIR),
      "mask_instruction_token": ":" if c.mask_instruction_token else None,
      "mask_punctuation": c.mask_punctuation,
      "query_mask_input_ids_skip_list": list(c.query_skip_token_ids),
      "query_concat_output_from_text_encoder": c.output == "full",
      "query_concat_output_from_vision_encoder": True,
      "use_vision_encoder": True, "use_transformer_mapping_network": True,
      "separate_query_and_context_text_encoder": True,
      "separate_query_and_context_vision_encoder": False,
      "query_maxlen": c.query_maxlen, "doc_maxlen": c.doc_maxlen,
      "instruction_token_id": c.instruction_token_id,
      "punctuation_token_ids": list(c.skip_token_ids),
  }


def _load_file(path: epath.Path) -> dict[str, np.ndarray]:
  """One safetensors file as NumPy arrays; bfloat16 tensors come back as ml_dtypes.bfloat16."""
  out = {}
  # safetensors reads local files (memory-mapped): a gs:// file is copied to a temporary one.
  with storage.local_copy(path) as local:
    try:
      with safe_open(local, framework="flax") as f:  # the numpy reader refuses bfloat16
        for key in f.keys():
          out[key] = np.asarray(f.get_tensor(key))
    except Exception as e:  # a truncated or foreign file: name it
      raise BadFile(f"{path}: not a readable safetensors file ({e})") from e
  return out


def read_safetensors(folder: storage.PathLike) -> dict[str, np.ndarray]:
  """All tensors of `model.safetensors` (or its sharded form); refuses pickle-based weights."""
  path = weights_file(folder)
  if path.name == WEIGHTS_FILE:
    return _load_file(path)
  state = {}
  for shard in sorted(set(_read_json(path)["weight_map"].values())):
    state.update(_load_file(path.parent / shard))
  return state


def weights_file(folder: storage.PathLike) -> epath.Path:
  """`model.safetensors`, else its index (sharded weights); a folder without them is an error,
  which names pickle-based weights if it holds those."""
  folder = epath.Path(folder)
  for path in (folder / WEIGHTS_FILE, folder / WEIGHTS_INDEX_FILE):
    if path.is_file():
      return path
  pickled = [n for n in ("pytorch_model.bin", "model.bin") if (folder / n).is_file()]
  if pickled:
    raise BadFile(
        f"{folder / pickled[0]}: refusing to read pickle-based weights (unpickling runs "
        "arbitrary code). Convert once in a trusted environment, e.g. `python -c \"import torch; "
        "from safetensors.torch import save_file; save_file({k: v.contiguous() for k, v in "
        f"torch.load('{pickled[0]}', weights_only=True).items()}}, '{WEIGHTS_FILE}')\"`.")
  raise MissingPath(f"{folder}: no {WEIGHTS_FILE} (or {WEIGHTS_INDEX_FILE})")


def _flat_shapes(tree) -> dict[str, tuple[int, ...]]:
  return {k: v.shape for k, v in traverse_util.flatten_dict(tree, sep="/").items()}


@dataclasses.dataclass
class PretrainedPreFLMR:
  """A PreFLMR config with its parameters, ready to encode; `save_pretrained` writes the HF layout."""

  config: mc.PreFLMRConfig
  params: Any
  hf_config: dict[str, Any] | None = None  # the loaded config.json, written back unchanged
  query_tokenizer: Any = None  # transformers BertTokenizerFast, when the folder has one
  document_tokenizer: Any = None

  def __post_init__(self):
    model = PreFLMR(self.config)

    def queries(params, ids, mask, pixels):
      return model.apply({"params": params}, ids, mask, pixels, method=PreFLMR.encode_queries)

    def documents(params, ids, mask):
      return model.apply({"params": params}, ids, mask, method=PreFLMR.encode_documents)

    self._queries, self._documents = jax.jit(queries), jax.jit(documents)

  def tokenizers(self, fallback: Callable[[], Any]) -> tuple[Any, Any]:
    """(query, document) tokenizers: the folder's; one it lacks is the other (they share the
    vocab); `fallback()` (e.g. the config's) for both when it has neither."""
    query, document = self.query_tokenizer, self.document_tokenizer
    if query is None:
      query = fallback() if document is None else document
    return query, query if document is None else document

  def _check_ids(self, input_ids):
    # Out-of-range ids would embed as NaN (jnp.take's fill), never as an error.
    ids = np.asarray(input_ids)
    vocab = self.config.text.vocab_size
    if ids.size and (ids.min() < 0 or ids.max() >= vocab):
      raise ValueError(f"token ids must be in [0, {vocab}) (text_config.vocab_size), got "
                       f"[{ids.min()}, {ids.max()}]: tokenizer and checkpoint do not match")

  def encode_queries(self, input_ids, attention_mask, pixel_values):
    """(Q [B, Lq, dim], Q_mask [B, Lq]); `pixel_values` NHWC float32 after CLIP preprocessing."""
    self._check_ids(input_ids)
    return self._queries(self.params, jnp.asarray(input_ids, jnp.int32),
                         jnp.asarray(attention_mask, jnp.int32),
                         jnp.asarray(pixel_values, jnp.float32))

  def encode_documents(self, input_ids, attention_mask):
    """(D [N, Ld, dim], D_mask [N, Ld])."""
    self._check_ids(input_ids)
    return self._documents(self.params, jnp.asarray(input_ids, jnp.int32),
                           jnp.asarray(attention_mask, jnp.int32))

  def state_dict(self) -> dict[str, np.ndarray]:
    """The parameters under their published PyTorch names (per layer, whatever the layout)."""
    params = jax.tree.map(lambda x: np.asarray(x, np.float32), layer_stacks.unstack(self.params))
    return conversion.flax_to_torch(params, conversion.preflmr_rules(self.config))

  def _write_folder(self, folder: str) -> None:
    """config.json, model.safetensors and the tokenizer folders into the local `folder`."""
    hf = self.hf_config or hf_config_from_model(self.config)
    config_file = os.path.join(folder, CONFIG_FILE)
    with open(config_file, "w") as f:
      json.dump(hf, f, indent=2, sort_keys=True)
    base = hf.get("transformer_mapping_config_base", _BERT_BASE_NAMES[0])
    if base not in _BERT_BASE_NAMES and not os.path.isabs(base):  # a folder beside config.json
      os.makedirs(os.path.join(folder, base))
      with open(os.path.join(folder, base, CONFIG_FILE), "w") as f:
        json.dump({"model_type": "bert", **_to_hf(self.config.mapping, _BERT_FIELDS)}, f, indent=2)
    weights = os.path.join(folder, WEIGHTS_FILE)
    save_file(self.state_dict(), weights, metadata={"format": "pt"})
    # safetensors creates its file 0600: config.json's mode instead (open()'s, under the umask).
    os.chmod(weights, stat.S_IMODE(os.stat(config_file).st_mode))
    for side, name in TOKENIZER_DIRS.items():
      tok = getattr(self, f"{side}_tokenizer")
      if tok is not None:
        tok.save_pretrained(os.path.join(folder, name))

  def save_pretrained(self, path: storage.PathLike, overwrite: bool = False) -> None:
    """Writes config.json, model.safetensors and tokenizer folders; the folder appears complete
    or not at all: locally written to a temporary sibling, then renamed; on gs:// written to a
    local temporary folder, then uploaded with config.json last (readers require it). An existing
    non-empty `path` is replaced only with `overwrite=True` and only if it holds a checkpoint (a
    config.json); it is deleted first."""
    dest = storage.path(path, "save_pretrained path")
    remote = storage.is_remote(dest)
    if not remote:
      dest = epath.Path(os.path.abspath(dest))
    check_destination(dest, overwrite)
    if remote:
      with tempfile.TemporaryDirectory(prefix="preflmr_jax_save_") as tmp:
        self._write_folder(tmp)
        if dest.is_dir():
          dest.rmtree()
        storage.upload_dir(tmp, dest, last=(CONFIG_FILE,))
      return
    parent = os.path.dirname(dest)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{dest.name}.{uuid.uuid4().hex}")
    os.mkdir(tmp)  # the umask's mode (mkdtemp's folders are private)
    try:
      self._write_folder(tmp)
      if dest.exists():
        shutil.rmtree(dest)
      os.rename(tmp, dest)
    except BaseException:
      shutil.rmtree(tmp, ignore_errors=True)
      raise


def is_published(folder: epath.Path) -> bool:
  """A published folder (its config.json) rather than a run's workdir or step folder, which never
  hold one; `load_pretrained` names whatever else it lacks."""
  return (folder / CONFIG_FILE).is_file()


def check_destination(dest: epath.Path, overwrite: bool, what: str = "") -> None:
  """`save_pretrained` writes `dest` if it is empty or missing, or, with `overwrite`, replaces a
  published folder; anything else is `NotWritable` (prefixed `what=dest: ` when given)."""
  named = f"{what}={dest}: " if what else f"{dest} "
  if dest.is_file():
    raise NotAFolder(f"{named}is a file, not a folder")
  if not (dest.is_dir() and any(dest.iterdir())):
    return
  if not overwrite:
    raise NotWritable(f"{named}exists and is not empty; "
                      f"{'pass --overwrite' if what else 'pass overwrite=True'} to replace it")
  if not is_published(dest):
    raise NotWritable(f"{named}is not a published folder (no {CONFIG_FILE}); not replacing it")


def load_pretrained(path: storage.PathLike, dtype: str = "float32") -> PretrainedPreFLMR:
  """Reads a PreFLMR folder, local or gs://. `dtype` is the parameter and
  compute dtype.

  A missing key, an unexpected key or a shape mismatch raises `conversion.ConversionError` naming
  the key.
  """
  path = storage.path(path, "PreFLMR folder")
  if not path.is_dir():
    raise MissingPath(f"{path}: not a folder (expected {CONFIG_FILE} + {WEIGHTS_FILE})")
  config_path = path / CONFIG_FILE
  if not config_path.is_file():
    raise MissingPath(f"{path}: no {CONFIG_FILE}")
  hf = _read_json(config_path)
  tokenizers = {}
  for side, name in TOKENIZER_DIRS.items():
    folder = path / name
    tokenizers[side] = tokenization.load_bert_tokenizer(folder) if folder.is_dir() else None
  config = model_config_from_hf(hf, path, tokenizers["query"], tokenizers["document"])
  config = dataclasses.replace(config, dtype=dtype, param_dtype=dtype)
  expected = _flat_shapes(abstract_params(config))
  params = conversion.torch_to_flax(read_safetensors(path), conversion.preflmr_rules(config),
                                    expected)
  params = jax.tree.map(lambda x: jnp.asarray(x, dtype), params)
  return PretrainedPreFLMR(config, params, hf, tokenizers["query"], tokenizers["document"])


__all__ = ["PretrainedPreFLMR", "check_destination", "hf_config_from_model", "is_published",
           "load_pretrained", "model_config_from_hf", "read_safetensors", "weights_file"]
