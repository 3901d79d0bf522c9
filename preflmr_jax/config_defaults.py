"""Defaults shared by the experiment configs in `configs/` (which stay short: a few overrides each).

Configs are `ml_collections.ConfigDict`s; every tool takes `--config path/to/config.py[:arg]` and
`--config.key=value` overrides. `config.model` becomes a `PreFLMRConfig` (models/model_config.py).
The model shapes the config files share are built here: the release shapes (configs/release.py),
the tiny CPU model (configs/tiny.py), the scaling grid (configs/scaling.py) and the stage-1 sweeps'
base (configs/sweeps/). Builders that take a config file's argument name that file (`where`) in
their errors.
"""

from __future__ import annotations

import ml_collections

from preflmr_jax import recipe, sharding, tokenization
from preflmr_jax.models import model_config as mc
from preflmr_jax.models import param_groups
from preflmr_jax.user_errors import ConfigError


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
  config.logical_axis_rules = sharding.LOGICAL_AXIS_RULES
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
  # The loss's MaxSim: "xla" (late_interaction) or "pallas" (maxsim_kernel: one fused kernel, its
  # token scores never in memory; TPU / GPU kernels, interpret mode on CPU). train.MAXSIM_IMPLS.
  config.maxsim_impl = "xla"
  config.init_params_from = ""  # another run's workdir (or checkpoint step folder) to start from
  config.optimizer = ml_collections.ConfigDict(dict(
      learning_rate=1e-5,  # everything trainable but the mapping structures
      # Vision MLP, mapping network and their linears: the official configs' rate.
      mapping_learning_rate=recipe.MAPPING_LEARNING_RATE,
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
  config.freeze = param_groups.patterns("vision")
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
      # Batches produced ahead of the train step per process (per worker with num_workers), each
      # in its own thread; 0: on demand (docs/data.md: why not grain's default).
      prefetch_batches=2,
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


# The PreFLMR releases by name: each one's vision tower (model_config.vision_shape); both text
# encoders are BERT-base. Parameter counts: configs/release.py.
RELEASE_SHAPES = {"vit_b": "B/32", "vit_l": "L/14", "vit_g": "bigG/14"}


def release_config(shape: str) -> ml_collections.ConfigDict:
  """A PreFLMR release's shape (`RELEASE_SHAPES`), with the base settings."""
  config = base_config()
  config.model = model_dict(text="base", vision=RELEASE_SHAPES[shape])
  return config


def tiny_config(width: int = 32, vision_width: int = 0, *,
                where: str = "configs/tiny.py") -> ml_collections.ConfigDict:
  """The tiny CPU model (configs/tiny.py): every tower `width` wide (FFN 2x, 4 heads), the vision
  tower `vision_width` (0: `width`), trained from scratch on SAMPLE with the built-in tiny vocab."""
  vision_width = vision_width or width
  for key, value in (("width", width), ("vision_width", vision_width)):
    if value <= 0 or value % 4:  # 4 heads of equal width
      raise ConfigError(f"{where}: {key}={value} is not a positive multiple of 4")
  config = base_config()
  colon_id, punctuation_ids = tokenization.mask_token_ids(tokenization.tiny_tokenizer())
  config.model = model_dict(
      text="tiny", vision="tiny", query_maxlen=32, doc_maxlen=64, mapping_prefix_length=4, dim=16,
      mapping_cross_attention_length=32, instruction_token_id=colon_id,
      skip_token_ids=punctuation_ids)
  # The mapping network reads the text encoder's states: it takes the text width.
  for tower, w in (("text", width), ("mapping", width), ("vision", vision_width)):
    config.model[tower].update(hidden_size=w, intermediate_size=2 * w)
  config.tokenizer = "tiny"
  config.data.tasks = "SAMPLE"
  config.data.num_workers = 0
  # Trains from scratch: in-batch recall@1 from chance (1/16) to > 0.9 in ~1500 steps (~1 min on 2
  # CPU cores).
  config.num_train_steps = 1500
  config.log_every_steps = 100
  config.checkpoint_every_steps = 500
  config.freeze = ()
  config.optimizer.learning_rate = 1e-3
  config.optimizer.mapping_learning_rate = 1e-3
  config.optimizer.warmup_steps = 50
  return config


def smoke_config(width: int = 32, vision_width: int = 0, *,
                 where: str) -> ml_collections.ConfigDict:
  """`tiny_config` trained briefly on SAMPLE: the CPU stand-in for a scaling-grid point
  (configs/scaling.py:smoke) and for the stage-1 sweeps' points."""
  config = tiny_config(width, vision_width, where=where)
  config.num_train_steps = 200
  config.log_every_steps = 50
  config.checkpoint_every_steps = 200
  config.optimizer.warmup_steps = 20
  return config


# The paper's scaling grid (configs/scaling.py; docs/scaling_grid.md): vision tower x text encoders.
SCALING_VISION = {"B": "B/32", "L": "L/14", "400m": "400m"}
SCALING_TEXT = ("base", "large", "800m")


def scaling_config(vision: str = "B", text: str = "base", *,
                   where: str) -> ml_collections.ConfigDict:
  """A scaling-grid point: both text encoders take the `text` shape, the mapping network its
  width."""
  if vision not in SCALING_VISION:
    raise ConfigError(f"{where}: vision={vision!r} is not one of {list(SCALING_VISION)}")
  if text not in SCALING_TEXT:
    raise ConfigError(f"{where}: text={text!r} is not one of {list(SCALING_TEXT)}")
  config = base_config()
  config.model = model_dict(text=text, vision=SCALING_VISION[vision])
  return config


# The stage-1 sweeps' argument (configs/sweeps/*.py; a config_files.parse_arg spec): a scaling-grid
# point, or `smoke` (the tiny model `width` wide, its vision tower `vision_width`) as its CPU
# stand-in.
STAGE1_SWEEP_ARG = dict(vision="B", text="base", smoke=False, width=32, vision_width=0)


def stage1_sweep_config(arg: ml_collections.ConfigDict, *,
                        where: str) -> ml_collections.ConfigDict:
  """The fixed part of the paper's stage-1 sweeps (configs/sweeps/): a scaling-grid model trained
  with the stage-1 recipe (recipe.apply: only the mapping structures train; vision and text
  encoders frozen) and the run settings below. A sweep file's argument (`STAGE1_SWEEP_ARG`):

    --config configs/sweeps/vision_scaling.py:vision=L,text=base        # a pod-scale point
    --config configs/sweeps/vision_scaling.py:smoke[,width=N][,vision_width=M]   # its CPU stand-in

  Pod-scale runs are sized for a v5e-16 (16 GiB per chip; docs/scaling_grid.md and each sweep's
  plan in docs/planning.md): global batch 256 in bf16 with fp32 master weights, the batch sharded over
  `fsdp`, 10,000 steps. These run settings are ours, not the paper's. The data come from the
  command line: `--config.tokenizer=.../query_tokenizer --config.data.data_dir=...
  --config.data.tasks=...`. The smoke stand-in is `smoke_config` (the tiny model at those widths,
  200 steps on SAMPLE), with the stage-1 model but nothing frozen (its random encoders could not
  serve frozen).
  """
  if arg.smoke:
    config = smoke_config(arg.width, arg.vision_width, where=where)
  else:
    config = scaling_config(arg.vision, arg.text, where=where)
    config.model.dtype = "bfloat16"
    config.batch_size = 256
    config.mesh.update(data=1, fsdp=-1)
    config.num_train_steps = 10_000
    config.log_every_steps = 100
    config.checkpoint_every_steps = 1000
    config.optimizer.warmup_steps = 500
  config = recipe.apply(config, 1)
  if arg.smoke:
    # Stage 1 freezes pre-trained encoders; the tiny ones are random, so frozen they leave nothing
    # to learn (recall stays at chance). The smoke run keeps the stage-1 model (mapping-only
    # output) and trains all of it.
    config.freeze = ()
  return config
