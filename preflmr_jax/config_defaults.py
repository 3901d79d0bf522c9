"""Defaults shared by the experiment configs in `configs/` (which stay short: a few overrides each).

Configs are `ml_collections.ConfigDict`s; every tool takes `--config path/to/config.py[:arg]` and
`--config.key=value` overrides. `config.model` becomes a `PreFLMRConfig` (models/model_config.py).
"""

from __future__ import annotations

import ml_collections

from preflmr_jax.models import model_config as mc

# Logical axis -> mesh axis. Parameters shard their model width over `fsdp` and their heads / FFN /
# vocab over `tensor`; activations shard the batch over (`data`, `fsdp`) and heads / FFN over
# `tensor`. Axes not named here (or mapped to None) are replicated.
LOGICAL_AXIS_RULES = (
    ("act_batch", ("data", "fsdp")),
    ("act_length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("position", None),
    ("norm", None),
    ("proj", None),
)


def require(ok: bool, key: str, value, why: str) -> None:
  """The one shape of a config error: `config.<key>=<value>: <why>`."""
  if not ok:
    raise ValueError(f"config.{key}={value!r}: {why}")


def model_dict(*, text: str = "base", vision: str = "B/32", mapping_layers: int = 1,
               **overrides) -> dict:
  """`config.model` for named text / vision shapes; the mapping network copies the text width (its
  cross-attention reads the query encoder's hidden states) with `mapping_layers` layers."""
  d = dict(text=mc.text_shape(text), vision=mc.vision_shape(vision),
           mapping=mc.text_shape(text, num_layers=mapping_layers), **overrides)
  # Validate now, naming the key, rather than at first use; return every field explicitly.
  return mc.PreFLMRConfig.from_dict(d).to_dict()


def base_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.model = model_dict()
  # Tokenizer vocab: a local folder with the bert-base-uncased vocab.txt / tokenizer.json (e.g. a
  # PreFLMR checkpoint's query_tokenizer/), or "tiny" for the built-in tiny vocab. Nothing is ever
  # downloaded, so the release-shape configs leave it to be set on the command line.
  config.tokenizer = ""
  config.seed = 0
  config.batch_size = 8  # global
  config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  config.logical_axis_rules = LOGICAL_AXIS_RULES
  config.distributed = False  # call jax.distributed.initialize() (multi-host)

  # Training (preflmr_jax/train.py). batch_size is global: queries per step over all hosts.
  config.num_train_steps = 1000
  config.num_negatives = 1  # hard negatives per query; documents per step = batch_size * (1 + n)
  config.log_every_steps = 50
  config.checkpoint_every_steps = 500
  config.keep_checkpoints = 3
  # A step whose loss, gradient or updated state is not finite is never applied. "stop": fail at the
  # next log / checkpoint step; "skip": drop it and go on, up to max_nonfinite_steps, then fail.
  config.nan_policy = "stop"
  config.max_nonfinite_steps = 100
  # Dropout randomness: "threefry2x32" (jax's default) or "rbg" / "unsafe_rbg" (the backend's
  # bit generator, far cheaper on GPU/TPU; train.DROPOUT_PRNG_IMPLS).
  config.dropout_prng_impl = "threefry2x32"
  config.score_chunk_size = 0  # >0: the loss scores documents in chunks of this size
  config.init_params_from = ""  # another run's workdir (or checkpoint step folder) to start from
  config.optimizer = ml_collections.ConfigDict(dict(
      learning_rate=1e-5,  # everything trainable but the mapping structures
      mapping_learning_rate=1e-4,  # vision MLP, mapping network and their linears
      schedule="linear",  # after warmup: "linear" or "cosine" decay to end_fraction, or "constant"
      warmup_steps=0,
      end_fraction=0.0,
      b1=0.9, b2=0.999, eps=1e-8,
      weight_decay=0.0,  # AdamW
      decay_params="no_bias_norm",  # or "all" (the official AdamW's): optimizer.DECAY_PARAMS
      grad_clip_norm=1.0,  # global norm; 0 disables (the official training does not clip)
      grad_accum_steps=1,
  ))
  # Regexes over "/"-joined parameter paths (e.g. "vision/layer_3/mlp/wi/kernel"); matched
  # parameters get no update and no optimiser state. Each pattern must match something.
  config.freeze = ("vision",)
  # Periodic evaluation (preflmr_jax/evaluation.py, as the eval binary) on the first
  # eval_max_queries queries of each training task's eval_split against its whole corpus; 0: off.
  config.eval_every_steps = 0
  config.eval_split = "valid"
  config.eval_max_queries = 256
  config.eval_ks = (1, 5, 10)
  config.mask_duplicate_positives = True  # losses.contrastive_loss; False: the reference exactly
  # "global": every query against every document of the global batch; "per_device": only the
  # documents on its own device, as the official training (DDP, no gathering) computes.
  config.in_batch_negatives = "global"
  # Data (preflmr_jax/data/): "m2kr" reads TFDS builds (python -m preflmr_jax.data.prepare) of
  # `tasks` ("OVEN=2,OKVQA=1": weighted mixture) under `data_dir`; "synthetic" is for tests.
  config.data = ml_collections.ConfigDict(dict(
      source="m2kr", tasks="", data_dir="",
      num_workers=4,  # grain worker processes (tokenisation + images); 0: in the main process
      sample_dir="",  # SAMPLE task without data_dir: built here (default ~/.cache/preflmr_jax)
      # Optional mined negatives: <task>_rankings.jsonl files (the eval binary's output) here; the
      # top hard_negatives_depth (0: all) of each query's ranking are drawn first.
      hard_negatives_dir="", hard_negatives_depth=100,
      # Train on a fixed subset of about this many queries of the mixture (0: all); subsets of one
      # subset_seed are nested (the 10K one lies inside the 100K one).
      max_train_examples=0, subset_seed=0,
      # Training records that do not decode (a corrupt shard chunk, an undecodable image) are
      # replaced by their task's next record, each logged with a count per task and file; past
      # this many in one process the run stops naming the last (0: stop at the first).
      max_bad_records=100,
      # Positives of a query listed in its batch row (data.batch_spec): the loss leaves each of
      # them out of the query's negatives when it appears elsewhere in the batch.
      max_positives=16,
  ))
  config.init_from = ""  # a published PreFLMR folder (load_pretrained) to start from
  return config
