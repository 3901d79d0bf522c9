"""Tiny PreFLMR for CPU smoke runs: random weights, a built-in tiny vocab, 32x32 images.

  python -m preflmr_jax.main --config configs/tiny.py --workdir /tmp/preflmr_tiny

It trains on the SAMPLE M2KR task (`preflmr_jax/data/sample.py`: coloured shapes, 64 passages)
through the real TFDS builders and grain pipeline; the sample is written and built on first use under
~/.cache/preflmr_jax/m2kr_sample (`--config.data.sample_dir=DIR` to put it elsewhere).
`--config.data.source=synthetic` generates the same task in memory instead.

`configs/tiny.py:width=64` sets every tower's width (default 32; FFN 2x, 4 heads) and
`vision_width=M` the vision tower's alone (widths: positive multiples of 4): the model-size axes
of the CPU smoke sweeps (configs/scaling.py:smoke, configs/sweeps/vision_scaling.py:smoke). The
model is config_defaults.tiny_config.
"""

from preflmr_jax import config_defaults, config_files


def get_config(arg=None):
  arg = config_files.parse_arg(arg, where="configs/tiny.py", width=32, vision_width=0)
  return config_defaults.tiny_config(arg.width, arg.vision_width, where="configs/tiny.py")
