r"""A point of the paper's scaling grid: vision tower x text encoders.

  --config configs/scaling.py:vision=400m,text=800m

vision: B (CLIP ViT-B/32), L (CLIP ViT-L/14), 400m (SoViT-400m/14 shape, 412M);
text:   base (BERT-base, 110M), large (BERT-large, 335M), 800m (width 1600 x 24 layers, 790M).
Both text encoders (query and document) take the text shape; the mapping network takes its width.
Parameters, FLOPs and memory per point: docs/scaling_grid.md.

The whole grid as a sweep (one train -> eval job per point), then the scaling-law fit. The points
carry the model only, with the defaults' run settings (global batch 8, float32): a pod run gives
its own after `--` (those of docs/launching.md's example are for a v5e-16), with its data:

  python launch/sweep.py configs/scaling.py --backend tpu-vm --tpu NAME --zone ZONE \
      --workdir_root gs://my-bucket/sweeps -- --config.mesh.fsdp=16 --config.batch_size=16 \
      --config.model.dtype=bfloat16 --config.tokenizer=... --config.data.data_dir=... \
      --config.data.tasks=...
  python -m preflmr_jax.tools.scaling_law --sweep_dir gs://my-bucket/sweeps/scaling

`configs/scaling.py:smoke` stands in for the grid on a CPU: three widths of the tiny model on the
SAMPLE task, a few steps each (`python launch/sweep.py configs/scaling.py:smoke --backend local
--fit`); a single point is `configs/scaling.py:smoke,width=64` (the tiny model at width 64).
"""

from preflmr_jax import config_defaults, config_files

SMOKE_WIDTHS = (16, 32, 64)


def get_config(arg=None):
  arg = config_files.parse_arg(arg, where="configs/scaling.py", vision="B", text="base",
                               smoke=False, width=32)
  if arg.smoke:
    return config_defaults.smoke_config(arg.width, where="configs/scaling.py")
  return config_defaults.scaling_config(arg.vision, arg.text, where="configs/scaling.py")


def sweep(arg=None):
  """The points (`launch/sweep.py`): each sets this file's argument."""
  if arg == "smoke":
    return [{"arg": f"smoke,width={w}", "name": f"smoke-{w}"} for w in SMOKE_WIDTHS]
  if arg:
    raise ValueError(f"configs/scaling.py: sweep argument {arg!r}; use none (the grid) or 'smoke'")
  return [{"arg": f"vision={v},text={t}"} for v in config_defaults.SCALING_VISION
          for t in config_defaults.SCALING_TEXT]
