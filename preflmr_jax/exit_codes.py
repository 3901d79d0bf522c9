"""Exit statuses of the training binary (`python -m preflmr_jax.main`), read by the launchers.

- 0: the run finished (`num_train_steps` reached).
- `PREEMPTED` (143 = 128 + SIGTERM, the conventional status of a process ended by SIGTERM): the
  trainer got SIGTERM (a preemption or maintenance notice, SLURM's warning before the time limit),
  saved a complete checkpoint step and stopped; rerunning the same command resumes from that step.
  The launchers restart on it (launch/tpu_vm.py's loop, SLURM `--requeue`, xpk `--max-restarts`).
- `INTERRUPTED` (130 = 128 + SIGINT): Ctrl-C, one process: saved as for `PREEMPTED`; nothing
  restarts it.
- `USAGE` (2): a user's mistake (a bad config value, flag or path), printed as one line
  (`cli.run`). Nothing restarts it.
- 1: a failure (an exception, with its traceback). Rerunning would fail the same way; nothing
  restarts it.

No imports: the launchers load this file without importing the package (and JAX).
"""

PREEMPTED = 143
INTERRUPTED = 130
USAGE = 2
