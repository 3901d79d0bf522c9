"""A point of the paper's scaling grid: vision tower x text encoders.

  --config configs/scaling.py:vision=400m,text=800m

vision: B (CLIP ViT-B/32), L (CLIP ViT-L/14), 400m (SoViT-400m/14 shape, 412M);
text:   base (BERT-base, 110M), large (BERT-large, 335M), 800m (width 1600 x 24 layers, 790M).
Both text encoders (query and document) take the text shape; the mapping network takes its width.
Parameters, FLOPs and memory per point: docs/scaling_grid.md.

The whole grid as a sweep (one train -> eval job per point), then the scaling-law fit:

  python launch/sweep.py configs/scaling.py --backend tpu-vm --tpu NAME --zone ZONE \
      --workdir_root gs://my-bucket/sweeps --dry-run
  python -m preflmr_jax.tools.scaling_law --sweep_dir gs://my-bucket/sweeps/scaling

`configs/scaling.py:smoke` stands in for the grid on a CPU: three widths of the tiny model on the
SAMPLE task, a few steps each (`python launch/sweep.py configs/scaling.py:smoke --backend local
--fit`); a single point is `configs/scaling.py:smoke=64` (the tiny model at width 64).
"""

from preflmr_jax import config_defaults, config_files

VISION = {"B": "B/32", "L": "L/14", "400m": "400m"}
TEXT = ("base", "large", "800m")
SMOKE_WIDTHS = (16, 32, 64)


def parse(arg: str | None) -> dict[str, str]:
  point = {"vision": "B", "text": "base"}
  for item in filter(None, (arg or "").split(",")):
    key, sep, value = item.partition("=")
    if not sep or key not in point:
      raise ValueError(f"configs/scaling.py: bad argument {item!r}; use vision=B|L|400m,text=base|large|800m")
    point[key] = value
  if point["vision"] not in VISION:
    raise ValueError(f"configs/scaling.py: vision={point['vision']!r} is not one of {sorted(VISION)}")
  if point["text"] not in TEXT:
    raise ValueError(f"configs/scaling.py: text={point['text']!r} is not one of {list(TEXT)}")
  return point


def smoke_config(tiny_arg: str = ""):
  """configs/tiny.py:`tiny_arg` (its widths) trained briefly on SAMPLE: a grid point's CPU
  stand-in (also the base of the stage-1 sweeps' smoke variants)."""
  config = config_files.load_config(f"configs/tiny.py:{tiny_arg}" if tiny_arg else "configs/tiny.py")
  config.num_train_steps = 200
  config.log_every_steps = 50
  config.checkpoint_every_steps = 200
  config.optimizer.warmup_steps = 20
  return config


def get_config(arg=None):
  if arg and arg.split("=")[0] == "smoke":
    return smoke_config(f"width={arg.partition('=')[2] or 32}")
  point = parse(arg)
  config = config_defaults.base_config()
  config.model = config_defaults.model_dict(text=point["text"], vision=VISION[point["vision"]])
  return config


def sweep(arg=None):
  """The points (`launch/sweep.py`): each sets this file's argument."""
  if arg == "smoke":
    return [{"arg": f"smoke={w}"} for w in SMOKE_WIDTHS]
  if arg:
    raise ValueError(f"configs/scaling.py: sweep argument {arg!r}; use none (the grid) or 'smoke'")
  return [{"arg": f"vision={v},text={t}"} for v in VISION for t in TEXT]
