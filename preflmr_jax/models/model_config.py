"""Model hyper-parameters: frozen dataclasses (hashable, so Flax modules can hold them) and named shapes.

Experiment configs (`configs/*.py`, `ml_collections`) describe the model as plain dicts built from the
named shapes below; `PreFLMRConfig.from_dict` turns `config.model` into the dataclass the modules take.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from preflmr_jax.models import layers
from preflmr_jax.models.token_masks import (BERT_UNCASED_COLON_ID, BERT_UNCASED_PUNCTUATION_IDS,
                                            TINY_VOCAB_SIZE)
from preflmr_jax.user_errors import ConfigError

_OUTPUTS = ("full", "mapping_only")


@dataclasses.dataclass(frozen=True)
class TextConfig:
  """A BERT encoder (HF `BertConfig` semantics, post-LayerNorm)."""

  vocab_size: int = 30522
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  intermediate_size: int = 3072
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  hidden_act: str = "gelu"
  dropout_rate: float = 0.1
  attention_dropout_rate: float = 0.1


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  """A CLIP vision transformer (HF `CLIPVisionConfig` semantics, pre-LayerNorm)."""

  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  intermediate_size: int = 3072
  patch_size: int = 32
  image_size: int = 224
  num_channels: int = 3
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  attention_dropout_rate: float = 0.0

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2


@dataclasses.dataclass(frozen=True)
class PreFLMRConfig:
  """The whole PreFLMR model."""

  text: TextConfig = TextConfig()
  vision: VisionConfig = VisionConfig()
  # The transformer mapping network: BERT layers with cross-attention to the query encoder's states.
  mapping: TextConfig = TextConfig(num_layers=1)
  dim: int = 128
  query_maxlen: int = 32
  doc_maxlen: int = 512
  # Number of tokens the vision MLP produces from the CLS state (`mapping_network_prefix_length`).
  mapping_prefix_length: int = 32
  # "full": [text; MLP; mapping] query tokens. "mapping_only": stage 1, [MLP; mapping] only.
  output: str = "full"
  # The mapping network cross-attends to the first `mapping_cross_attention_length` query states.
  mapping_cross_attention_length: int = 32
  # Zero the query instruction up to its first ":" (id `instruction_token_id`) in the text tokens.
  mask_instruction_token: bool = True
  instruction_token_id: int = BERT_UNCASED_COLON_ID
  # Query token ids dropped from the text tokens and the cross-attention (published default: none).
  query_skip_token_ids: tuple[int, ...] = ()
  # Zero document tokens that are a single punctuation character (ids `skip_token_ids`).
  mask_punctuation: bool = True
  skip_token_ids: tuple[int, ...] = BERT_UNCASED_PUNCTUATION_IDS
  # How the modules compute (`execution`, a layers.Execution): compute and parameter dtypes,
  # per-layer remat with a named policy, and the attention implementation: "xla" (any backend;
  # exact HF semantics incl. attention dropout) or "cudnn" (fused attention on NVIDIA GPUs;
  # bf16/fp16, attention dropout 0); each layer stack as a Python loop or one `nn.scan` over
  # stacked parameters (`scan_layers`: one layer compiled per stack; its own params layout,
  # models/layer_stacks.py).
  dtype: str = "float32"
  param_dtype: str = "float32"
  remat: bool = False
  remat_policy: str = "nothing_saveable"
  attention: str = "xla"
  scan_layers: bool = False

  def __post_init__(self):
    # Fail here, naming the config key, rather than deep inside XLA.
    def check(ok, key, msg):
      if not ok:
        raise ConfigError(f"config.model.{key}: {msg}")

    def positive_ints(obj, prefix, names):
      for name in names:
        value = getattr(obj, name)
        check(isinstance(value, int) and not isinstance(value, bool) and value >= 1,
              prefix + name, f"must be a positive integer, got {value!r}")

    positive_ints(self, "", ("dim", "query_maxlen", "doc_maxlen", "mapping_prefix_length",
                             "mapping_cross_attention_length"))
    for name, sub in (("text", self.text), ("vision", self.vision), ("mapping", self.mapping)):
      positive_ints(sub, f"{name}.", [f.name for f in dataclasses.fields(sub) if f.type == "int"])
      for f in dataclasses.fields(sub):
        if f.name.endswith("dropout_rate"):
          check(0 <= getattr(sub, f.name) < 1, f"{name}.{f.name}",
                f"must be in [0, 1), got {getattr(sub, f.name)!r}")
    for name, sub in (("text", self.text), ("vision", self.vision), ("mapping", self.mapping)):
      check(sub.hidden_size % sub.num_heads == 0, f"{name}.hidden_size",
            f"{sub.hidden_size} is not divisible by num_heads={sub.num_heads}")
      check(sub.hidden_act in layers.ACTIVATIONS, f"{name}.hidden_act",
            f"{sub.hidden_act!r} is not one of {tuple(layers.ACTIVATIONS)}")
      check(sub.num_layers >= 1, f"{name}.num_layers", f"must be >= 1, got {sub.num_layers}")
    check(self.vision.image_size % self.vision.patch_size == 0, "vision.image_size",
          f"{self.vision.image_size} is not a multiple of patch_size={self.vision.patch_size}")
    check(self.vision.num_layers >= 2, "vision.num_layers",
          "must be >= 2: the mapping network reads the penultimate layer")
    # HF BertLayer cross-attention projects the encoder states with hidden_size-wide linears.
    check(self.mapping.hidden_size == self.text.hidden_size, "mapping.hidden_size",
          f"{self.mapping.hidden_size} must equal text.hidden_size={self.text.hidden_size} "
          "(the mapping network cross-attends to the query encoder's hidden states)")
    check(self.query_maxlen <= self.text.max_position_embeddings, "query_maxlen",
          f"{self.query_maxlen} exceeds text.max_position_embeddings")
    check(self.doc_maxlen <= self.text.max_position_embeddings, "doc_maxlen",
          f"{self.doc_maxlen} exceeds text.max_position_embeddings")
    check(self.output in _OUTPUTS, "output", f"{self.output!r} is not one of {_OUTPUTS}")
    check(self.remat_policy in layers.REMAT_POLICIES, "remat_policy",
          f"{self.remat_policy!r} is not one of {layers.REMAT_POLICIES}")
    for key in ("dtype", "param_dtype"):
      check(getattr(self, key) in ("float32", "bfloat16", "float16"), key,
            f"{getattr(self, key)!r} is not float32, bfloat16 or float16")
    check(self.attention in layers.ATTENTION_IMPLEMENTATIONS, "attention",
          f"{self.attention!r} is not one of {layers.ATTENTION_IMPLEMENTATIONS}")
    if self.attention in layers.FUSED_DTYPES:
      dtypes = layers.FUSED_DTYPES[self.attention]
      check(self.dtype in dtypes, "dtype",
            f"attention={self.attention!r} computes in one of {dtypes}, got {self.dtype!r}")
    for name, sub in (("text", self.text), ("vision", self.vision), ("mapping", self.mapping)):
      error = layers.attention_dropout_error(self.attention, sub.attention_dropout_rate)
      check(error is None, f"{name}.attention_dropout_rate", error)

  def check_devices(self, devices) -> None:
    """ConfigError unless the model can run on `devices` (cuDNN attention needs NVIDIA GPUs)."""
    platforms = sorted({d.platform for d in devices})
    if self.attention == "cudnn" and platforms != ["gpu"]:
      raise ConfigError(f"config.model.attention='cudnn': cuDNN's fused attention runs on NVIDIA "
                        f"GPUs; the devices here are {', '.join(platforms)} (use 'xla')")

  @property
  def execution(self) -> layers.Execution:
    return layers.Execution(self.dtype, self.param_dtype, self.remat, self.remat_policy,
                            self.attention, self.scan_layers)

  @property
  def query_length(self) -> int:
    """Number of late-interaction tokens per query."""
    text = 0 if self.output == "mapping_only" else self.query_maxlen
    return text + self.mapping_prefix_length + self.vision.num_patches

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "PreFLMRConfig":
    """Builds the dataclass from `config.model` (a dict / ConfigDict); unknown keys are errors."""
    d = dict(d.to_dict() if hasattr(d, "to_dict") else d)
    subs = {"text": TextConfig, "vision": VisionConfig, "mapping": TextConfig}
    kwargs = {}
    for key, value in d.items():
      if key in subs:
        kwargs[key] = _build(subs[key], value, f"config.model.{key}")
      else:
        kwargs[key] = tuple(value) if isinstance(value, list) else value
    return _build(cls, kwargs, "config.model")

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def _build(cls, d, where):
  if isinstance(d, cls):
    return d
  d = dict(d.to_dict() if hasattr(d, "to_dict") else d)
  names = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(d) - names)
  if unknown:
    raise ConfigError(f"{where}: unknown key(s) {unknown}; expected some of {sorted(names)}")
  return cls(**d)


# ----------------------------------------------------------------------------------------------
# Named shapes. Counts are with pooler (text) and post_layernorm (vision), as in the HF checkpoints.
# ----------------------------------------------------------------------------------------------

TEXT_SHAPES: dict[str, dict[str, Any]] = {
    "tiny": dict(vocab_size=TINY_VOCAB_SIZE, hidden_size=32, num_layers=2, num_heads=4,
                 intermediate_size=64, max_position_embeddings=128),
    "minilm_l6": dict(hidden_size=384, num_layers=6, num_heads=12, intermediate_size=1536),
    "base": dict(hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072),  # 109.5M
    "large": dict(hidden_size=1024, num_layers=24, num_heads=16, intermediate_size=4096),  # 335.1M
    # ~800M: BERT-large depth (24) at width 1600 (25 heads of 64, FFN 4x) -> 790.0M with pooler.
    # Keeping BERT-large's depth and head size and widening is the simplest step to 800M.
    "800m": dict(hidden_size=1600, num_layers=24, num_heads=25, intermediate_size=6400),
}

VISION_SHAPES: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden_size=32, num_layers=3, num_heads=4, intermediate_size=64, patch_size=8,
                 image_size=32),
    "B/32": dict(hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072, patch_size=32),
    "B/16": dict(hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072, patch_size=16),
    "L/14": dict(hidden_size=1024, num_layers=24, num_heads=16, intermediate_size=4096, patch_size=14),
    # ~400M: the shape-optimised SoViT-400m/14 (Alabdulmohsin et al. 2023, SigLIP So400m): width 1152,
    # depth 27, MLP 4304, 16 heads -> 412.4M in CLIP layout. A published compute-optimal shape between
    # ViT-L (303M) and ViT-H (632M) rather than an ad-hoc one.
    "400m": dict(hidden_size=1152, num_layers=27, num_heads=16, intermediate_size=4304,
                 patch_size=14),
    # OpenCLIP ViT-bigG/14 (PreFLMR_ViT-G), exact GELU.
    "bigG/14": dict(hidden_size=1664, num_layers=48, num_heads=16, intermediate_size=8192,
                    patch_size=14, hidden_act="gelu"),
}


def text_shape(name: str, **overrides) -> dict[str, Any]:
  if name not in TEXT_SHAPES:
    raise ConfigError(f"unknown text shape {name!r}; known: {sorted(TEXT_SHAPES)}")
  return dataclasses.asdict(TextConfig(**{**TEXT_SHAPES[name], **overrides}))


def vision_shape(name: str, **overrides) -> dict[str, Any]:
  if name not in VISION_SHAPES:
    raise ConfigError(f"unknown vision shape {name!r}; known: {sorted(VISION_SHAPES)}")
  return dataclasses.asdict(VisionConfig(**{**VISION_SHAPES[name], **overrides}))
