r"""Sweeps as code: a config file's `sweep(arg)` lists the points; this expands them into one
train -> eval job per point and launches them.

  python launch/sweep.py configs/scaling.py --backend tpu-vm --tpu NAME --zone ZONE \
      --workdir_root gs://BUCKET/sweeps [--dry-run] [-- --config.key=value ...]
  python launch/sweep.py configs/scaling.py:smoke --backend local --fit

`sweep(arg)` (called with the text after `:`, or without arguments) returns a list of dicts, one
per point: `{"arg": "vision=L,text=base"}` sets the config file's own argument for that point, any
other key is a config override (`{"model.mapping.num_layers": 4}` -> `--config.model.mapping.num_layers=4`),
and an optional `"name"` names the point (default: built from the argument and the overrides).
Each point is validated up front (its config must build), then runs

  python -m preflmr_jax.main     --config FILE:ARG --workdir ROOT/SWEEP/POINT [overrides]
  python -m preflmr_jax.evaluate --config FILE:ARG --checkpoint ROOT/SWEEP/POINT --output ROOT/SWEEP/POINT/eval

Arguments after `--` (`--config.*` overrides only) go to both commands of every point;
`--eval_flags` adds eval-binary flags (e.g. "--split=valid --batch_size=128"). Backends:
`local` runs the points here one after another (`--fit` then runs the scaling-law tool on the
results); `tpu-vm` runs them one after another on one pod, in one detached job (launch/tpu_vm.py;
each point logs to its own ~/preflmr_logs/JOB.log); `xpk` and `slurm`
queue one workload / batch job per point (launch/xpk.py, launch/gpu.py); `hosts` runs them one after
another on a list of GPU hosts (launch/gpu.py). Multi-host backends add `--config.distributed=True`.

A point's eval runs only after its training finished (exit status 0). A training run preempted
(exit_codes.PREEMPTED, 143) is started again by the backend and resumes (the pod's loop, SLURM's
requeue, xpk's restarts, each host's loop; `--max-restarts`), then evaluates. `local` stops the
sweep at a preempted point, says so and exits with 143: rerunning the same sweep resumes it.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shlex
import sys
from typing import Any, Sequence

from launch import gpu, shell, tpu_vm, xpk

BACKENDS = ("local", "tpu-vm", "xpk", "slurm", "hosts")
LOCAL_ROOT = "/tmp/preflmr_sweeps"


@dataclasses.dataclass(frozen=True)
class Point:
  name: str  # the workdir's folder name under ROOT/SWEEP
  config: str  # FILE[:ARG]
  overrides: tuple[tuple[str, Any], ...]


def _slug(text: str) -> str:
  return re.sub(r"[^A-Za-z0-9._]+", "-", text).strip("-")


def _point_name(arg: str, overrides: dict[str, Any]) -> str:
  parts = [_slug(a) for a in arg.split(",") if a]
  parts += [_slug(f"{key.split('.')[-1]}={value}") for key, value in overrides.items()]
  return "_".join(parts) or "default"


def load_points(spec: str) -> tuple[str, list[Point]]:
  """(sweep name, points) of `FILE[:ARG]`; every point's config is built once to check it."""
  from preflmr_jax import config_files, optimizer  # pylint: disable=g-import-not-at-top
  from preflmr_jax.models import model_config as mc  # pylint: disable=g-import-not-at-top

  path, _, arg = spec.partition(":")
  module = config_files.load_module(path)
  if not callable(getattr(module, "sweep", None)):
    raise ValueError(f"{path} defines no sweep(): nothing to expand")
  raw = module.sweep(arg) if arg else module.sweep()
  if not isinstance(raw, (list, tuple)) or not raw:
    raise ValueError(f"{path}: sweep({arg!r}) must return a non-empty list of dicts")
  points = []
  for i, item in enumerate(raw):
    if not isinstance(item, dict):
      raise ValueError(f"{path}: sweep point {i} is {item!r}, not a dict")
    item = dict(item)
    point_arg = str(item.pop("arg", arg))
    name = _slug(str(item.pop("name", "") or _point_name(point_arg, item)))
    config = f"{path}:{point_arg}" if point_arg else path
    try:
      built = config_files.load_config(config, item)
      # What can be checked without the run's devices (the trainer checks the rest first thing).
      mc.PreFLMRConfig.from_dict(built.model)
      optimizer.validate(built.optimizer, built.num_train_steps)
    except Exception as e:  # any failure to build: name the point
      raise ValueError(f"{path}: sweep point {i} ({name}: {config} {item}) does not build a valid "
                       f"config: {e}") from e
    points.append(Point(name, config, tuple(item.items())))
  names = [p.name for p in points]
  if len(set(names)) < len(names):
    raise ValueError(f"{path}: sweep point names are not unique: {names}; give each a 'name'")
  return _slug(os.path.splitext(os.path.basename(path))[0] + (f"-{arg}" if arg else "")), points


def point_commands(point: Point, workdir: str, extra: Sequence[str] = (),
                   eval_flags: Sequence[str] = ()) -> list[list[str]]:
  """The train and eval command lines of one point."""
  from preflmr_jax import workdir as layout  # pylint: disable=g-import-not-at-top
  overrides = [f"--config.{k}={v}" for k, v in point.overrides] + list(extra)
  return [["python", "-m", "preflmr_jax.main", f"--config={point.config}", f"--workdir={workdir}",
           *overrides],
          ["python", "-m", "preflmr_jax.evaluate", f"--config={point.config}",
           f"--checkpoint={workdir}", f"--output={layout.eval_dir(workdir)}", *overrides,
           *eval_flags]]


def job_name(sweep: str, point: str, index: int, taken: Sequence[str] = ()) -> str:
  """A scheduler-safe job name (lowercase letters, digits and '-', at most 40 characters), not one
  of `taken`."""
  name = re.sub(r"[^a-z0-9]+", "-", f"{sweep}-{point}".lower()).strip("-")
  if len(name) > xpk.MAX_WORKLOAD_NAME or not name[:1].isalpha() or name in taken:
    name = re.sub(r"[^a-z0-9]+", "-", f"p-{sweep}".lower())[:xpk.MAX_WORKLOAD_NAME - 4]
    name = f"{name.strip('-')}-{index:03d}"
  return name


def fit_command(sweep_dir: str) -> list[str]:
  return ["python", "-m", "preflmr_jax.tools.scaling_law", f"--sweep_dir={sweep_dir}"]


def launch(args: argparse.Namespace, extra: Sequence[str]) -> None:
  sweep, points = load_points(args.config)
  sweep = args.name or sweep
  root = args.workdir_root or LOCAL_ROOT
  sweep_dir = f"{root.rstrip('/')}/{sweep}"
  eval_flags = shlex.split(args.eval_flags)
  multi_host = args.backend != "local"
  if multi_host:
    extra = [*extra, "--config.distributed=True"]
  jobs, names, steps = [], [], []  # (how to run, commands): all built before anything runs
  for i, point in enumerate(points):
    comment = f"point {i + 1}/{len(points)}: {point.name}"
    argvs = point_commands(point, f"{sweep_dir}/{point.name}", extra, eval_flags)
    line = shell.chain(argvs)  # eval after a finished train; SIGTERM reaches the running one
    job = job_name(sweep, point.name, i, names)
    names.append(job)
    if args.backend == "local":
      commands = [shell.command(*a, comment=comment if j == 0 else "") for j, a in enumerate(argvs)]
    elif args.backend == "tpu-vm":
      steps.append((job, line))  # one pod: the points run in turn, in one job (below)
      continue
    elif args.backend == "xpk":
      commands = xpk.run(xpk.cluster_from_args(args), line, job, comment)
    elif args.backend == "slurm":
      commands = gpu.submit(gpu.slurm_from_args(args), line, job, comment)
    else:
      commands = gpu.host_commands(gpu.hosts_from_args(args), line, comment)
    jobs.append((gpu.execute_together if args.backend == "hosts" else shell.execute, commands))
  if steps:
    jobs.append((shell.execute, tpu_vm.run(
        tpu_vm.pod_from_args(args), steps,
        f"{len(steps)} points, one after another (jobs {', '.join(job for job, _ in steps)})",
        args.max_restarts)))
  for i, (execute, commands) in enumerate(jobs):
    try:
      execute(commands, args.dry_run)
    except SystemExit as e:
      if e.code == shell.PREEMPTED and args.backend == "local":
        print(f"# the sweep stopped at point {i + 1}/{len(points)} ({points[i].name}), preempted: "
              "run this sweep again to resume it (a finished point's training resumes at its "
              "last step, with nothing left to train, and its eval runs again)", file=sys.stderr,
              flush=True)
      raise
  fit = shell.command(*fit_command(sweep_dir), comment="the scaling-law fit of the results")
  if args.fit and args.backend == "local":
    shell.execute([fit], args.dry_run)
  else:
    print(f"# when every point has finished, the scaling-law fit:\n{shlex.join(fit.argv)}")


def parse(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
  own, extra = shell.split_command(argv)
  backend = shell.ArgumentParser(add_help=False)
  backend.add_argument("--backend", choices=BACKENDS, default="local",
                       help="Where the points run. Every backend but local adds its launcher's "
                       "flags (--backend tpu-vm --help lists them).")
  parser = shell.ArgumentParser(description=__doc__.split("\n\n")[0], parents=[backend])
  parser.add_argument("config", help="A config file with sweep(), FILE[:ARG].")
  parser.add_argument("--workdir_root", default="",
                      help=f"Folder of the sweeps' workdirs (local default {LOCAL_ROOT}); for the "
                      "multi-host backends one every host sees: gs://BUCKET/PATH, or a shared "
                      "filesystem path.")
  parser.add_argument("--name", default="", help="Sweep name (default: FILE[-ARG]).")
  parser.add_argument("--eval_flags", default="", help="Extra eval-binary flags.")
  parser.add_argument("--fit", action="store_true", help="local: fit the scaling law at the end.")
  parser.add_argument("--dry-run", action="store_true", help="Print the commands; run nothing.")
  chosen = backend.parse_known_args(own)[0].backend
  {"tpu-vm": tpu_vm.add_flags, "xpk": xpk.add_flags, "slurm": gpu.add_flags,
   "hosts": gpu.add_flags}.get(chosen, lambda p: None)(parser)
  args = parser.parse_args(own)
  bad = [a for a in extra if not a.startswith("--config.")]
  if bad:
    parser.error(f"arguments after -- must be --config.* overrides (eval flags go in "
                 f"--eval_flags): {bad}")
  required = {"local": (), "tpu-vm": tpu_vm.REQUIRED, "xpk": (*xpk.REQUIRED, "image"),
              "slurm": gpu.REQUIRED["slurm"], "hosts": gpu.REQUIRED["hosts"]}[args.backend]
  # Multi-host: a folder every host sees.
  required += ("workdir_root",) * (args.backend != "local")
  shell.require(parser, args, required, placeholders=args.dry_run)
  if args.workdir_root.startswith("gs://") and not args.workdir_root[5:].strip("/"):
    parser.error(f"--workdir_root={args.workdir_root}: name a bucket, gs://BUCKET[/PATH]")
  return args, extra


def main(argv: Sequence[str]) -> None:
  args, extra = parse(argv)
  try:
    launch(args, extra)
  except (ValueError, FileNotFoundError) as e:  # a bad sweep file or point, a missing program
    print(f"error: {e}", file=sys.stderr)
    raise SystemExit(shell.USAGE) from None


if __name__ == "__main__":
  main(sys.argv[1:])
