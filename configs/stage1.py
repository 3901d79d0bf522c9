"""PreFLMR training stage 1: only the mapping structures train (docs/recipe.md).

  python -m preflmr_jax.main --config configs/stage1.py:<shape> --workdir DIR

<shape>: "tiny" (default; configs/tiny.py's model, a CPU smoke run) or "vit_b" / "vit_l" / "vit_g"
(the release shapes of configs/preflmr_vit_*.py). The vision MLP, the mapping network and their
input / output linears train at mapping_learning_rate; vision, both text encoders and both text
heads are frozen (no optimiser state). The late-interaction output is the [MLP; mapping] tokens
only: text reaches it through the mapping network's cross-attention.
"""

import os

from preflmr_jax import config_files


def apply(config):
  """The stage-1 recipe on any model config (also used by the sweeps in configs/sweeps/)."""
  config.model.output = "mapping_only"
  config.freeze = ("query_text", "document_text", "query_head", "document_head", "vision")
  config.optimizer.mapping_learning_rate = 1e-4  # the official configs' (docs/recipe.md)
  return config


def published(config):
  """The official training's settings shared by the three stages (docs/recipe.md has the sources).

  Confirmed in the official code: AdamW with eps 1e-8 and weight decay 0 (no parameter excluded),
  a constant learning rate without warmup (scheduler "none"), no gradient clipping, the mapping
  structures at 1e-4 and everything else at 1e-5, and per-device in-batch negatives (DDP without
  gathering). Not confirmed: the negatives per query (4 as in the official fine-tuning example;
  its internal pre-training config's default is 1), batch size, accumulation and steps (set on
  the official command lines, which are not published); ours are config defaults.
  """
  config.optimizer.update(learning_rate=1e-5, mapping_learning_rate=1e-4, schedule="constant",
                          warmup_steps=0, weight_decay=0.0, decay_params="all",
                          grad_clip_norm=0.0, eps=1e-8)
  config.in_batch_negatives = "per_device"
  config.num_negatives = 4
  return config


def get_config(arg=None):
  # The model shape by name: configs/shapes.py.
  config = apply(config_files.load_config(f"{os.path.dirname(__file__)}/shapes.py:{arg or 'tiny'}"))
  # The official stage-1 config's tasks, concatenated (each weighed by its size; the official
  # config also caps OVEN at 1M queries): docs/recipe.md.
  config.data.tasks = ("WIT*1,CC3M*1,LLaVA*1,MSMARCO*1,OVEN*1,KVQA*1" if arg not in (None, "tiny")
                       else "SAMPLE")
  return published(config)
