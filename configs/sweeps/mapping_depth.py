r"""Sweep: the transformer mapping network's depth (`model.mapping.num_layers`, the checkpoints'
`transformer_mapping_num_hidden_layers`) over 1, 2, 4, 6, 12 layers, everything else fixed: ViT-B/32 +
BERT-base with the stage-1 recipe (config_defaults.stage1_sweep_config).

  python launch/sweep.py configs/sweeps/mapping_depth.py --backend tpu-vm --tpu NAME --zone ZONE \
      --workdir_root gs://my-bucket/sweeps -- --config.tokenizer=... --config.data.data_dir=... \
      --config.data.tasks=...
  python -m preflmr_jax.tools.scaling_law --sweep_dir gs://my-bucket/sweeps/mapping_depth

`:smoke` is the CPU stand-in: the tiny model with 1, 2 and 4 mapping layers.
"""

from preflmr_jax import config_defaults, config_files

DEPTHS = (1, 2, 4, 6, 12)
SMOKE_DEPTHS = (1, 2, 4)


def get_config(arg=None):
  arg = config_files.parse_arg(arg, where="configs/sweeps/mapping_depth.py",
                               **config_defaults.STAGE1_SWEEP_ARG)
  return config_defaults.stage1_sweep_config(arg, where="configs/sweeps/mapping_depth.py")


def sweep(arg=None):
  if arg not in (None, "", "smoke"):
    raise ValueError(f"configs/sweeps/mapping_depth.py: sweep argument {arg!r}; use none or 'smoke'")
  return [{"model.mapping.num_layers": d} for d in (SMOKE_DEPTHS if arg else DEPTHS)]
