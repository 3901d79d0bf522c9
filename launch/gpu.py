r"""Multi-host GPU through SLURM or plain ssh with jax.distributed's environment. `--dry-run` prints
the exact commands (and the sbatch script) and runs nothing.

  python launch/gpu.py slurm --nodes 2 --gpus_per_node 8 --job tiny [--partition P] -- \
      python -m preflmr_jax.main --config configs/tiny.py --workdir gs://BUCKET/tiny \
      --config.distributed=True
  python launch/gpu.py hosts --hosts gpu0,gpu1 [--port 29500] [--remote_dir '~/preflmr_jax'] -- \
      python -m preflmr_jax.main ... --config.distributed=True

`slurm` submits a batch job (sbatch reads the script from stdin) whose srun starts one process per
GPU, as JAX's SLURM detection expects; JAX finds its peers from SLURM's environment. A process then
holds one GPU, so `config.mesh.tensor` must be 1 (`sharding.check_batch_sharding`); `hosts` keeps
a node's GPUs in one process. `hosts` starts the command on every host over ssh at once, with
JAX_COORDINATOR_ADDRESS (the first host), JAX_NUM_PROCESSES and JAX_PROCESS_ID set (read by
`--config.distributed=True`, `sharding.initialize_distributed`). Both expect this checkout and its
environment (requirements.txt, then `pip install "jax[cuda12]==<the pinned version>"`) at the same
path on every host, and a workdir they all see (a gs:// bucket, or a shared filesystem).

Preemption: a run that exits with exit_codes.PREEMPTED (143: the trainer saved a step on SIGTERM)
is started again, up to `--max-restarts` times, and resumes. `slurm` asks for SIGTERM `--grace`
seconds before the time limit (`--signal=TERM@GRACE`) and the batch script requeues its own job
(`--requeue`, `scontrol requeue`); `hosts` reruns the command on every host (each host's own loop).
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import subprocess
import sys
from typing import Sequence

from launch import shell


@dataclasses.dataclass(frozen=True)
class Slurm:
  nodes: int = 1
  gpus_per_node: int = 8
  partition: str = ""
  time: str = ""  # e.g. 24:00:00
  max_restarts: int = shell.MAX_RESTARTS  # requeues of a preempted job
  grace: int = shell.SAVE_GRACE_S  # seconds before the time limit at which the run gets SIGTERM


@dataclasses.dataclass(frozen=True)
class Hosts:
  hosts: tuple[str, ...]
  port: int = 29500
  remote_dir: str = "~/preflmr_jax"
  max_restarts: int = shell.MAX_RESTARTS  # reruns of a preempted command


def sbatch_script(slurm: Slurm, command: str, job: str) -> str:
  # One task per GPU, each seeing all of its node's GPUs: JAX's SLURM detection (SlurmCluster) makes
  # process SLURM_LOCALID drive GPU number SLURM_LOCALID. One task per node would drive only GPU 0;
  # --gpus-per-task=1 would bind each task to one GPU, numbered 0 in it, which JAX then misses.
  options = [f"--job-name={job}", f"--nodes={slurm.nodes}",
             f"--ntasks-per-node={slurm.gpus_per_node}", f"--gpus-per-node={slurm.gpus_per_node}",
             "--output=slurm-%x-%j.out"]
  options += [f"--partition={slurm.partition}"] * bool(slurm.partition)
  options += [f"--time={slurm.time}"] * bool(slurm.time)
  # Preemption: SIGTERM to every process of the step (not this script) `grace` seconds before the
  # time limit, for the trainer to save and exit with PREEMPTED; this script then requeues its own
  # job (a requeued job appends to the same log). SLURM_RESTART_COUNT counts the requeues.
  options += ["--requeue", f"--signal=TERM@{slurm.grace}", "--open-mode=append"]
  preempted, most = shell.PREEMPTED, slurm.max_restarts
  lines = ["#!/bin/bash", *(f"#SBATCH {o}" for o in options), "set -euo pipefail",
           "restarts=${SLURM_RESTART_COUNT:-0}",
           'echo "[preflmr] start $(date -u +%FT%TZ), job $SLURM_JOB_ID, restart $restarts"',
           f"srun bash -c {shlex.quote(command)} && rc=0 || rc=$?",
           'echo "[preflmr] exit status $rc"',
           f'if [ "$rc" -eq {preempted} ] && [ "$restarts" -lt {most} ]; then',
           f'  echo "[preflmr] preempted: requeueing, restart $((restarts + 1)) of at most {most}"',
           '  scontrol requeue "$SLURM_JOB_ID" || echo "[preflmr] requeue refused: submit the '
           'job again to resume"',
           f'elif [ "$rc" -eq {preempted} ]; then',
           f'  echo "[preflmr] preempted; no restarts left (--max-restarts={most})"',
           "fi",
           'exit "$rc"']
  return "\n".join(lines) + "\n"


def submit(slurm: Slurm, command: str, job: str, comment: str = "") -> list[shell.Command]:
  """One sbatch job running `command` (a shell command line) on every node."""
  return [shell.command("sbatch", stdin=sbatch_script(slurm, command, job), comment=comment)]


def host_commands(hosts: Hosts, command: str, comment: str = "") -> list[shell.Command]:
  """One ssh per host, all to be started together (`execute_together`). Each host reruns its
  process while it exits with `shell.PREEMPTED` (`shell.restart_loop`): the trainer stops every
  process at the same step on a preemption notice, so all of them restart and meet again."""
  if not hosts.hosts:
    raise ValueError("--hosts: give at least one host")
  coordinator = f"{hosts.hosts[0]}:{hosts.port}"
  return [shell.command("ssh", host, shell.remote_script(
      f"cd {hosts.remote_dir}",
      f"export JAX_COORDINATOR_ADDRESS={coordinator} JAX_NUM_PROCESSES={len(hosts.hosts)} "
      f"JAX_PROCESS_ID={i}", shell.restart_loop(command, hosts.max_restarts)),
                        comment=f"{comment + ', ' if comment else ''}process {i}")
          for i, host in enumerate(hosts.hosts)]


def execute_together(commands: Sequence[shell.Command], dry_run: bool) -> None:
  """Starts every command at once (the processes of one JAX program wait for each other). A run
  still preempted after its restarts ends this launcher with `shell.PREEMPTED`."""
  for cmd in commands:
    print(cmd, flush=True)
  if dry_run:
    return
  procs = [subprocess.Popen(list(cmd.argv), cwd=shell.REPO_ROOT) for cmd in commands]
  failed = [(cmd, code) for cmd, code in zip(commands, [p.wait() for p in procs]) if code]
  if failed:
    preempted = all(shell.is_preempted(code) for _, code in failed)
    print(("preempted, no restarts left: " if preempted else "failed: ") + "; ".join(
        f"{shlex.join(c.argv)} (exit status {code})" for c, code in failed), file=sys.stderr,
          flush=True)
    raise SystemExit(shell.PREEMPTED if preempted else 1)


REQUIRED = {"slurm": (), "hosts": ("hosts",)}


def add_flags(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--nodes", type=int, default=1, help="slurm: hosts per job.")
  parser.add_argument("--gpus_per_node", type=int, default=8)
  parser.add_argument("--partition", default="")
  parser.add_argument("--time", default="", help="slurm: time limit, e.g. 24:00:00.")
  parser.add_argument("--grace", type=shell.non_negative, default=Slurm.grace,
                      help="slurm: seconds before the time limit at which the run gets SIGTERM "
                      "to save and stop (--signal=TERM@GRACE; SLURM may send it up to 60 s "
                      "earlier); more than a step and a checkpoint save take.")
  parser.add_argument("--max-restarts", dest="max_restarts", type=shell.non_negative,
                      default=shell.MAX_RESTARTS, help="Times a preempted run (exit status 143) "
                      "is started again (slurm: requeued).")
  parser.add_argument("--hosts", default="", help="hosts: comma-separated, the first coordinates.")
  parser.add_argument("--port", type=int, default=Hosts.port)
  parser.add_argument("--remote_dir", default=Hosts.remote_dir)


def slurm_from_args(args: argparse.Namespace) -> Slurm:
  return Slurm(args.nodes, args.gpus_per_node, args.partition, args.time, args.max_restarts,
               args.grace)


def hosts_from_args(args: argparse.Namespace) -> Hosts:
  return Hosts(tuple(filter(None, args.hosts.split(","))), args.port, args.remote_dir,
               args.max_restarts)


def main(argv: Sequence[str]) -> None:
  parser = shell.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("scheduler", choices=("slurm", "hosts"))
  add_flags(parser)
  parser.add_argument("--job", default="preflmr", help="slurm: job name.")
  parser.add_argument("--dry-run", action="store_true", help="Print the commands; run nothing.")
  own, command = shell.split_command(argv)
  args = parser.parse_args(own)
  if not command:
    parser.error("give the command after --")
  shell.require(parser, args, REQUIRED[args.scheduler], args.dry_run)
  if args.scheduler == "slurm":
    shell.execute(submit(slurm_from_args(args), shlex.join(command), args.job), args.dry_run)
  else:
    try:
      commands = host_commands(hosts_from_args(args), shlex.join(command))
    except ValueError as e:
      parser.error(str(e))
    execute_together(commands, args.dry_run)


if __name__ == "__main__":
  main(sys.argv[1:])
