r"""Sweep: how retrieval scales with the vision tower (ViT-B/32, ViT-L/14, the ~400M SoViT shape),
text fixed at BERT-base, stage-1 recipe (config_defaults.stage1_sweep_config).

  python launch/sweep.py configs/sweeps/vision_scaling.py --backend tpu-vm --tpu NAME --zone ZONE \
      --workdir_root gs://my-bucket/sweeps -- --config.tokenizer=... --config.data.data_dir=... \
      --config.data.tasks=...
  python -m preflmr_jax.tools.scaling_law --sweep_dir gs://my-bucket/sweeps/vision_scaling

`:smoke` is the CPU stand-in: the tiny model's vision tower at widths 16 / 32 / 64.
"""

from preflmr_jax import config_defaults, config_files

VISION = ("B", "L", "400m")
SMOKE_VISION_WIDTHS = (16, 32, 64)


def get_config(arg=None):
  arg = config_files.parse_arg(arg, where="configs/sweeps/vision_scaling.py",
                               **config_defaults.STAGE1_SWEEP_ARG)
  return config_defaults.stage1_sweep_config(arg, where="configs/sweeps/vision_scaling.py")


def sweep(arg=None):
  if arg == "smoke":
    return [{"arg": f"smoke,vision_width={w}"} for w in SMOKE_VISION_WIDTHS]
  if arg:
    raise ValueError(f"configs/sweeps/vision_scaling.py: sweep argument {arg!r}; use none or 'smoke'")
  return [{"arg": f"vision={v},text=base"} for v in VISION]
