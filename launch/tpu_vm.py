r"""A Cloud TPU VM pod with gcloud: create it, install this checkout, run commands on every worker,
follow a worker's log, stop the run, delete the pod. `--dry-run` prints the exact commands and runs
nothing.

  python launch/tpu_vm.py create  --tpu NAME --zone us-west4-a --accelerator v5litepod-16
  python launch/tpu_vm.py install --tpu NAME --zone us-west4-a
  python launch/tpu_vm.py run     --tpu NAME --zone us-west4-a --job tiny -- \
      python -m preflmr_jax.main --config configs/tiny.py --workdir gs://BUCKET/tiny \
      --config.distributed=True
  python launch/tpu_vm.py logs    --tpu NAME --zone us-west4-a --job tiny [--worker 0]
  python launch/tpu_vm.py stop    --tpu NAME --zone us-west4-a
  python launch/tpu_vm.py delete  --tpu NAME --zone us-west4-a

`create` picks the TPU software version of the accelerator's generation (`--version` overrides it).
`install` ships the committed tree (`git archive HEAD`) to every worker and builds a Python 3.11
venv there with uv (TPU VM images ship an older Python) holding requirements.txt and jax[tpu] of
the same JAX version. `run` first frees the TPU (ends what an earlier `run` started and any process
holding a TPU device, removes a stale libtpu lockfile), then starts the command on all workers at
once (a multi-host JAX program), detached from the ssh session: it goes on when ssh ends, appending
its output and exit status to ~/preflmr_logs/JOB.log on each worker. A run that exits with
exit_codes.PREEMPTED (143: the trainer saved a step on SIGTERM) is started again on that worker, up
to `--max-restarts` times, and resumes. Workdirs must be visible to every worker: a gs:// bucket (or
a gcsfuse / NFS mount).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shlex
import sys
from typing import Sequence

from launch import shell

ARCHIVE = "/tmp/preflmr_jax.tar.gz"
REMOTE_DIR = "~/preflmr_jax"
VENV = "~/preflmr_venv"
LOGS = "~/preflmr_logs"
RUN_PID = "/tmp/preflmr_run.pid"  # the process group of the running `run` (gone on reboot)
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"  # torch is only the tests' reference

# TPU software version for JAX by generation, as Google lists them
# (cloud.google.com/tpu/docs/runtimes); the key is the accelerator type without its size.
RUNTIME_VERSIONS = {
    "v2": "tpu-ubuntu2204-base",
    "v3": "tpu-ubuntu2204-base",
    "v4": "tpu-ubuntu2204-base",
    "v5litepod": "v2-alpha-tpuv5-lite",  # v5e
    "v5p": "v2-alpha-tpuv5",
    "v6e": "v2-alpha-tpuv6e",
}

# A TPU is held through /dev/accel* (v4 and older) or /dev/vfio/* (v5e, v5p, v6e); libtpu also
# refuses to start while its lockfile is left from a killed run.
LIBTPU_LOCKFILE = "/tmp/libtpu_lockfile"
TPU_HOLDERS = "sudo lsof -t /dev/accel* /dev/vfio/* 2>/dev/null"
FREE_TPU = (
    f'if [ -f {RUN_PID} ]; then kill -9 -- "-$(cat {RUN_PID})" 2>/dev/null; rm -f {RUN_PID}; fi',
    f'pids=$({TPU_HOLDERS} | sort -u)',
    'if [ -n "$pids" ]; then sudo kill -9 $pids; fi',
    f'for i in $(seq 30); do [ -z "$({TPU_HOLDERS})" ] && break; sleep 1; done',
    f"sudo rm -f {LIBTPU_LOCKFILE}",
)


@dataclasses.dataclass(frozen=True)
class Pod:
  name: str
  zone: str
  project: str = ""
  accelerator: str = "v5litepod-16"
  version: str = ""  # default: the accelerator generation's (`runtime_version`)
  spot: bool = False


def runtime_version(accelerator: str) -> str:
  """The TPU software version for `accelerator` (e.g. v5p-128 -> v2-alpha-tpuv5)."""
  generation = accelerator.rpartition("-")[0]
  if generation not in RUNTIME_VERSIONS:
    raise ValueError(f"--accelerator={accelerator}: unknown TPU generation {generation!r} (known: "
                     f"{', '.join(RUNTIME_VERSIONS)}); give the software version with --version")
  return RUNTIME_VERSIONS[generation]


def jax_version() -> str:
  """The JAX version requirements.txt pins (the TPU build must be the same)."""
  with open(os.path.join(shell.REPO_ROOT, "requirements.txt")) as f:
    match = re.search(r"^jax==(\S+)", f.read(), re.MULTILINE)
  if not match:
    raise ValueError("requirements.txt pins no jax==VERSION")
  return match.group(1)


def _gcloud(pod: Pod, verb: str, *args: str) -> tuple[str, ...]:
  project = (f"--project={pod.project}",) if pod.project else ()
  return ("gcloud", "compute", "tpus", "tpu-vm", verb, *args, f"--zone={pod.zone}", *project)


def ssh(pod: Pod, script: str, worker: str = "all", comment: str = "") -> shell.Command:
  return shell.command(*_gcloud(pod, "ssh", pod.name), f"--worker={worker}",
                       "--command", script, comment=comment)


def create(pod: Pod) -> list[shell.Command]:
  version = pod.version or runtime_version(pod.accelerator)
  return [shell.command(*_gcloud(pod, "create", pod.name), f"--accelerator-type={pod.accelerator}",
                        f"--version={version}", *(["--spot"] if pod.spot else []))]


def install(pod: Pod) -> list[shell.Command]:
  script = shell.remote_script(
      f"rm -rf {REMOTE_DIR}", f"mkdir -p {REMOTE_DIR}",
      f"tar -xzf ~/{os.path.basename(ARCHIVE)} -C {REMOTE_DIR}",
      "export PATH=$HOME/.local/bin:$PATH",
      "(command -v uv >/dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh)",
      f"uv venv --allow-existing --python 3.11 {VENV}",
      f"uv pip install --python {VENV}/bin/python --index-strategy unsafe-best-match "
      f"--extra-index-url {TORCH_CPU_INDEX} -r {REMOTE_DIR}/requirements.txt "
      f'"jax[tpu]=={jax_version()}"')
  return [
      shell.command("git", "archive", "--format=tar.gz", f"--output={ARCHIVE}", "HEAD",
                    comment="the committed tree (uncommitted changes are not shipped)"),
      shell.command(*_gcloud(pod, "scp", ARCHIVE, f"{pod.name}:{os.path.basename(ARCHIVE)}"),
                    "--worker=all"),
      ssh(pod, script)]


def log_path(job: str) -> str:
  return f"{LOGS}/{job}.log"


def _step(job: str, command: str, max_restarts: int) -> str:
  """`command`, rerun while it is preempted (`shell.restart_loop`), with its output and each
  attempt's start time and exit status appended to the job's log."""
  # A run ended by SIGTERM before it could clean up may leave libtpu's lockfile (`FREE_TPU`).
  return (f"{shell.restart_loop(command, max_restarts, f'sudo rm -f {LIBTPU_LOCKFILE}')} "
          f">> {log_path(job)} 2>&1")


def run(pod: Pod, steps: Sequence[tuple[str, str]], comment: str = "",
        max_restarts: int = shell.MAX_RESTARTS) -> list[shell.Command]:
  """Runs each (job, shell command line) of `steps` in turn on every worker, from the checkout, in
  the venv, detached from ssh (setsid + nohup) so that it outlives the session; a step that exits
  with `shell.PREEMPTED` is run again, up to `max_restarts` times; a failed step does not stop the
  next. Frees the TPU first (`FREE_TPU`).

  Every worker reruns its own process: the trainer stops all processes at the same step on a
  preemption notice, so all of them exit with `PREEMPTED` and start again together."""
  # `$$` of the detached shell is its process group (setsid): what the next run or `stop` kills
  # (SIGKILL to the whole group, restart loop included: nothing restarts).
  detached = "; ".join([f"echo $$ > {RUN_PID}",
                        *(_step(job, cmd, max_restarts) for job, cmd in steps),
                        f"rm -f {RUN_PID}"])
  script = shell.remote_script(
      f"cd {REMOTE_DIR}", f"source {VENV}/bin/activate", f"mkdir -p {LOGS}", *FREE_TPU,
      f"{{ setsid nohup bash -c {shlex.quote(detached)} > /dev/null 2>&1 < /dev/null & }}",
      f'echo "started on $(hostname); log: {", ".join(log_path(job) for job, _ in steps)}"')
  comment = ", ".join(filter(None, [comment, "detached: `logs --job JOB` follows it, `stop` ends "
                                             "it"]))
  return [ssh(pod, script, comment=comment)]


def stop(pod: Pod) -> list[shell.Command]:
  return [ssh(pod, shell.remote_script(*FREE_TPU))]


def logs(pod: Pod, job: str = "run", worker: int = 0, lines: int = 200) -> list[shell.Command]:
  return [ssh(pod, f"tail -n {'+1' if lines < 0 else lines} -F {log_path(job)}",
              worker=str(worker))]


def delete(pod: Pod) -> list[shell.Command]:
  return [shell.command(*_gcloud(pod, "delete", pod.name), "--quiet")]


REQUIRED = ("tpu", "zone")  # flags without a usable default


def add_flags(parser: argparse.ArgumentParser) -> None:
  """The pod and how a run restarts (what `run` and a sweep need)."""
  parser.add_argument("--tpu", default="", help="TPU VM (pod) name (required).")
  parser.add_argument("--zone", default="", help="Required.")
  parser.add_argument("--project", default="", help="Default: gcloud's configured project.")
  parser.add_argument("--max-restarts", dest="max_restarts", type=shell.non_negative,
                      default=shell.MAX_RESTARTS,
                      help="run: times a preempted command (exit status 143) is started again on "
                      "the pod.")


def add_create_flags(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--accelerator", default=Pod.accelerator, help="create: e.g. v5litepod-256.")
  parser.add_argument("--version", default="", help="create: TPU VM software version (default: "
                      "the one Google lists for the accelerator's generation).")
  parser.add_argument("--spot", action="store_true", help="create: spot (preemptible) capacity.")


def pod_from_args(args: argparse.Namespace) -> Pod:
  created = {k: getattr(args, k) for k in ("accelerator", "version", "spot") if hasattr(args, k)}
  return Pod(args.tpu, args.zone, args.project, **created)


def main(argv: Sequence[str]) -> None:
  parser = shell.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("action", choices=("create", "install", "run", "logs", "stop", "delete"))
  add_flags(parser)
  add_create_flags(parser)
  parser.add_argument("--job", default="run", help="Log name (~/preflmr_logs/JOB.log).")
  parser.add_argument("--worker", type=int, default=0, help="logs: which worker's log.")
  parser.add_argument("--lines", type=int, default=200, help="logs: lines shown before following "
                      "(-1: the whole log).")
  parser.add_argument("--dry-run", action="store_true", help="Print the commands; run nothing.")
  own, command = shell.split_command(argv)
  args = parser.parse_args(own)
  shell.require(parser, args, REQUIRED, args.dry_run)
  pod = pod_from_args(args)
  try:
    if args.action == "run":
      if not command:
        parser.error("run needs the command after --")
      commands = run(pod, [(args.job, shlex.join(command))], max_restarts=args.max_restarts)
    elif command:
      parser.error(f"{args.action} takes no command after --")
    elif args.action == "logs":
      commands = logs(pod, args.job, args.worker, args.lines)
    else:
      commands = {"create": create, "install": install, "stop": stop,
                  "delete": delete}[args.action](pod)
  except ValueError as e:
    parser.error(str(e))
  shell.execute(commands, args.dry_run)


if __name__ == "__main__":
  main(sys.argv[1:])
