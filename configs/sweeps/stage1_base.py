"""The fixed part of the paper's stage-1 sweeps (vision_scaling.py, mapping_depth.py,
pretraining_data.py): a scaling-grid model trained with the stage-1 recipe (configs/stage1.py: only
the mapping structures train; vision and text encoders frozen) and the run settings below.

  --config configs/sweeps/stage1_base.py:vision=L,text=base           # a pod-scale point
  --config configs/sweeps/stage1_base.py:smoke[,width=N][,vision_width=M]   # its CPU stand-in

Pod-scale runs are sized for a v5e-16 (16 GiB per chip; docs/scaling_grid.md and each sweep's
plan in the README): global batch 256 in bf16 with fp32 master weights, the batch sharded over
`fsdp`, 10,000 steps. These run settings are ours, not the paper's. The data come from the command
line: `--config.tokenizer=.../query_tokenizer --config.data.data_dir=... --config.data.tasks=...`.
The smoke stand-in is configs/scaling.py's (the tiny model at those widths, 200 steps on SAMPLE),
with the stage-1 model but nothing frozen (its random encoders could not serve frozen).
"""

from preflmr_jax import config_files


def get_config(arg=None):
  head, _, rest = (arg or "").partition(",")
  if head == "smoke":
    config = config_files.load_module("configs/scaling.py").smoke_config(rest)
  else:
    config = config_files.load_config(f"configs/scaling.py:{arg}" if arg else "configs/scaling.py")
    config.model.dtype = "bfloat16"
    config.batch_size = 256
    config.mesh.update(data=1, fsdp=-1)
    config.num_train_steps = 10_000
    config.log_every_steps = 100
    config.checkpoint_every_steps = 1000
    config.optimizer.warmup_steps = 500
  config = config_files.load_module("configs/stage1.py").apply(config)
  if head == "smoke":
    # Stage 1 freezes pre-trained encoders; the tiny ones are random, so frozen they leave nothing
    # to learn (recall stays at chance). The smoke run keeps the stage-1 model (mapping-only
    # output) and trains all of it.
    config.freeze = ()
  return config
