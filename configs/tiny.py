"""Tiny PreFLMR for CPU smoke runs: random weights, a built-in tiny vocab, 32x32 images.

  python -m preflmr_jax.main --config configs/tiny.py --workdir /tmp/preflmr_tiny

It trains on the SAMPLE M2KR task (`preflmr_jax/data/sample.py`: coloured shapes, 64 passages)
through the real TFDS builders and grain pipeline; the sample is written and built on first use under
~/.cache/preflmr_jax/m2kr_sample (`--config.data.sample_dir=DIR` to put it elsewhere).
`--config.data.source=synthetic` generates the same task in memory instead.

`configs/tiny.py:width=64` sets every tower's width (default 32; FFN 2x, 4 heads) and
`vision_width=M` the vision tower's alone: the model-size axes of the CPU smoke sweeps
(configs/scaling.py:smoke, configs/sweeps/vision_scaling.py:smoke).
"""

from preflmr_jax import config_defaults, tokenization


def parse_widths(arg: str | None) -> dict[str, int]:
  """"width=N[,vision_width=M]" -> {"width": N, "vision_width": M (default N)}."""
  widths = {}
  for item in filter(None, (arg or "").split(",")):
    key, _, value = item.partition("=")
    if key not in ("width", "vision_width") or not value.isdigit() or int(value) % 4 or not int(value):
      raise ValueError(f"configs/tiny.py: bad argument {item!r}; use width=N[,vision_width=M] "
                       "with N, M positive multiples of 4")
    widths[key] = int(value)
  widths.setdefault("width", 32)
  widths.setdefault("vision_width", widths["width"])
  return widths


def get_config(arg=None):
  widths = parse_widths(arg)
  config = config_defaults.base_config()
  colon_id, punctuation_ids = tokenization.mask_token_ids(tokenization.tiny_tokenizer())
  config.model = config_defaults.model_dict(
      text="tiny", vision="tiny", query_maxlen=32, doc_maxlen=64, mapping_prefix_length=4, dim=16,
      mapping_cross_attention_length=32, instruction_token_id=colon_id,
      skip_token_ids=punctuation_ids)
  for tower, width in (("text", widths["width"]), ("mapping", widths["width"]),  # reads text
                       ("vision", widths["vision_width"])):
    config.model[tower].update(hidden_size=width, intermediate_size=2 * width)
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
