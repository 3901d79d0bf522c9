r"""Sweep: the amount of stage-1 training data, 10K / 100K / 1M queries of the mixture
(`config.data.max_train_examples`: a fixed subset, nested across amounts for one
`config.data.subset_seed`), everything else fixed: ViT-B/32 + BERT-base with the stage-1 recipe
(config_defaults.stage1_sweep_config). Training length is a fixed number of epochs (EPOCHS passes
over each subset), so compute grows with the data; warmup is a tenth of the steps, at most 500.

  python launch/sweep.py configs/sweeps/pretraining_data.py --backend tpu-vm --tpu NAME --zone ZONE \
      --workdir_root gs://my-bucket/sweeps -- --config.tokenizer=... --config.data.data_dir=... \
      --config.data.tasks=...
  python -m preflmr_jax.tools.scaling_law --sweep_dir gs://my-bucket/sweeps/pretraining_data

The fit's x axes are parameters (the same for every point here) and training compute, which for
this sweep is proportional to the number of examples. `:smoke` is the CPU stand-in: 96, 384 and
1536 SAMPLE queries (all of them), two epochs each.
"""

import math

from preflmr_jax import config_defaults, config_files

AMOUNTS = (10_000, 100_000, 1_000_000)
EPOCHS = 4
SMOKE_AMOUNTS = (96, 384, 1536)
SMOKE_EPOCHS = 2


def get_config(arg=None):
  arg = config_files.parse_arg(arg, where="configs/sweeps/pretraining_data.py",
                               **config_defaults.STAGE1_SWEEP_ARG)
  return config_defaults.stage1_sweep_config(arg, where="configs/sweeps/pretraining_data.py")


def point(examples: int, epochs: int, batch_size: int, max_warmup: int) -> dict:
  steps = math.ceil(epochs * examples / batch_size)
  return {"name": f"examples-{examples}", "data.max_train_examples": examples,
          "num_train_steps": steps,
          "optimizer.warmup_steps": min(max_warmup, steps // 10)}


def sweep(arg=None):
  if arg not in (None, "", "smoke"):
    raise ValueError(f"configs/sweeps/pretraining_data.py: sweep argument {arg!r}; use none or "
                     "'smoke'")
  config = get_config(arg)
  amounts, epochs = (SMOKE_AMOUNTS, SMOKE_EPOCHS) if arg else (AMOUNTS, EPOCHS)
  return [point(n, epochs, config.batch_size, config.optimizer.warmup_steps) for n in amounts]
