"""A point of the paper's scaling grid: vision tower x text encoders.

  --config configs/scaling.py:vision=400m,text=800m

vision: B (CLIP ViT-B/32), L (CLIP ViT-L/14), 400m (SoViT-400m/14 shape, 412M);
text:   base (BERT-base, 110M), large (BERT-large, 335M), 800m (width 1600 x 24 layers, 790M).
Both text encoders (query and document) take the text shape; the mapping network takes its width.
"""

from preflmr_jax import config_defaults

VISION = {"B": "B/32", "L": "L/14", "400m": "400m"}
TEXT = ("base", "large", "800m")


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


def get_config(arg=None):
  point = parse(arg)
  config = config_defaults.base_config()
  config.model = config_defaults.model_dict(text=point["text"], vision=VISION[point["vision"]])
  return config
