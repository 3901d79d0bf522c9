"""A Cloud TPU VM pod with gcloud: create it, install this checkout, run one command on every
worker, follow its log, delete it. `--dry-run` prints the exact commands and runs nothing.

  python launch/tpu_vm.py create  --tpu NAME --zone us-west4-a --accelerator v5litepod-16
  python launch/tpu_vm.py install --tpu NAME --zone us-west4-a
  python launch/tpu_vm.py run     --tpu NAME --zone us-west4-a --job tiny -- \
      python -m preflmr_jax.main --config configs/tiny.py --workdir /mnt/shared/tiny \
      --config.distributed=True
  python launch/tpu_vm.py logs    --tpu NAME --zone us-west4-a --job tiny [--worker 0]
  python launch/tpu_vm.py delete  --tpu NAME --zone us-west4-a

`install` ships the committed tree (`git archive HEAD`) to every worker and builds a Python 3.11
venv there with uv (TPU VM images ship an older Python) holding requirements.txt and jax[tpu] of
the same JAX version. `run` executes the command from the checkout in that venv on all workers at
once (a multi-host JAX program), appending its output to ~/preflmr_logs/JOB.log on each worker.
Workdirs must be visible to every worker (a gcsfuse-mounted bucket or NFS).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shlex
import sys
from typing import Sequence

if __package__ in (None, ""):  # `python launch/tpu_vm.py`: import from this checkout
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from launch import shell  # pylint: disable=g-import-not-at-top

ARCHIVE = "/tmp/preflmr_jax.tar.gz"
REMOTE_DIR = "~/preflmr_jax"
VENV = "~/preflmr_venv"
LOGS = "~/preflmr_logs"
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"  # torch is only the tests' reference


@dataclasses.dataclass(frozen=True)
class Pod:
  name: str
  zone: str
  project: str = ""
  accelerator: str = "v5litepod-16"
  version: str = "v2-alpha-tpuv5-lite"  # the TPU VM software image for v5e
  spot: bool = False


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
  return [shell.command(*_gcloud(pod, "create", pod.name), f"--accelerator-type={pod.accelerator}",
                        f"--version={pod.version}", *(["--spot"] if pod.spot else []))]


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


def run(pod: Pod, command: str, job: str = "run", comment: str = "") -> list[shell.Command]:
  """`command` (a shell command line) on every worker, from the checkout, in the venv."""
  script = shell.remote_script(
      f"cd {REMOTE_DIR}", f"source {VENV}/bin/activate", f"mkdir -p {LOGS}", "set -o pipefail",
      f"( {command} ) 2>&1 | tee -a {LOGS}/{job}.log")
  return [ssh(pod, script, comment=comment)]


def logs(pod: Pod, job: str = "run", worker: int = 0) -> list[shell.Command]:
  return [ssh(pod, f"tail -n 200 -F {LOGS}/{job}.log", worker=str(worker))]


def delete(pod: Pod) -> list[shell.Command]:
  return [shell.command(*_gcloud(pod, "delete", pod.name), "--quiet")]


REQUIRED = ("tpu", "zone")  # flags without a usable default


def add_flags(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--tpu", default="", help="TPU VM (pod) name (required).")
  parser.add_argument("--zone", default="", help="Required.")
  parser.add_argument("--project", default="", help="Default: gcloud's configured project.")
  parser.add_argument("--accelerator", default=Pod.accelerator, help="e.g. v5litepod-256.")
  parser.add_argument("--version", default=Pod.version, help="TPU VM software version.")
  parser.add_argument("--spot", action="store_true", help="Create spot (preemptible) capacity.")


def pod_from_args(args: argparse.Namespace) -> Pod:
  return Pod(args.tpu, args.zone, args.project, args.accelerator, args.version, args.spot)


def main(argv: Sequence[str]) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("action", choices=("create", "install", "run", "logs", "delete"))
  add_flags(parser)
  parser.add_argument("--job", default="run", help="Log name (~/preflmr_logs/JOB.log).")
  parser.add_argument("--worker", type=int, default=0, help="logs: which worker's log.")
  parser.add_argument("--dry-run", action="store_true", help="Print the commands; run nothing.")
  own, command = shell.split_command(argv)
  args = parser.parse_args(own)
  shell.require(parser, args, REQUIRED, args.dry_run)
  pod = pod_from_args(args)
  if args.action == "run":
    if not command:
      parser.error("run needs the command after --")
    commands = run(pod, shlex.join(command), args.job)
  elif command:
    parser.error(f"{args.action} takes no command after --")
  elif args.action == "logs":
    commands = logs(pod, args.job, args.worker)
  else:
    commands = {"create": create, "install": install, "delete": delete}[args.action](pod)
  shell.execute(commands, args.dry_run)


if __name__ == "__main__":
  main(sys.argv[1:])
