r"""GKE with xpk: build the image, run one command as a workload on TPU slices, follow its logs,
delete it. `--dry-run` prints the exact commands and runs nothing.

  python launch/xpk.py build  --image gcr.io/PROJECT/preflmr_jax:v1
  python launch/xpk.py run    --cluster CLUSTER --tpu-type v5litepod-256 --num-slices 2 \
      --image IMAGE --workload tiny -- python -m preflmr_jax.main --config configs/tiny.py \
      --workdir gs://BUCKET/tiny --config.distributed=True
  python launch/xpk.py logs   --cluster CLUSTER --workload tiny [--slice 0 --worker 0 | --worker all]
  python launch/xpk.py delete --cluster CLUSTER --workload tiny

The cluster comes from `xpk cluster create` (see xpk's README). `build` makes an image of this
checkout with requirements.txt and jax[tpu] (launch/Dockerfile); xpk runs the command in it on
every host of `--num-slices` slices. A failed workload is restarted up to `--max-restarts` times
(xpk restarts on exit codes 42 and 127-255: a preempted run, exit_codes.PREEMPTED = 143 after the
trainer saved a step on SIGTERM, or a host killed; not a Python error, exit status 1): the run
resumes from its last checkpoint. `--grace` is the pods' termination grace period, the time the
trainer has from SIGTERM to its saved step. Workdirs must be visible to every host: a gs://
bucket, or a bucket mounted through the GCS FUSE CSI driver by `xpk storage attach NAME
--type=gcsfuse --mount-point=/gcs/BUCKET ...`, named here with `--storage NAME`.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import shlex
import sys
from typing import Sequence

from launch import shell, tpu_vm

# xpk's own rule for workload names.
WORKLOAD_NAME = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
MAX_WORKLOAD_NAME = 40


@dataclasses.dataclass(frozen=True)
class Cluster:
  name: str
  tpu_type: str = "v5litepod-16"
  num_slices: int = 1
  image: str = ""
  zone: str = ""
  project: str = ""
  max_restarts: int = shell.MAX_RESTARTS  # preemptions and host failures; not a crash loop
  grace: int = shell.SAVE_GRACE_S  # seconds from SIGTERM to SIGKILL (xpk's own default: 30)
  storage: tuple[str, ...] = ()  # `xpk storage attach` names mounted into the workload


def check_workload_name(name: str) -> str:
  if len(name) > MAX_WORKLOAD_NAME or not WORKLOAD_NAME.fullmatch(name):
    raise ValueError(f"xpk workload name {name!r}: use lowercase letters, digits and '-', starting "
                     f"with a letter, at most {MAX_WORKLOAD_NAME} characters")
  return name


def _where(cluster: Cluster) -> tuple[str, ...]:
  return (f"--cluster={cluster.name}",
          *((f"--zone={cluster.zone}",) if cluster.zone else ()),
          *((f"--project={cluster.project}",) if cluster.project else ()))


def build(image: str) -> list[shell.Command]:
  return [shell.command("docker", "build", "-f", "launch/Dockerfile",
                        f"--build-arg=JAX_VERSION={tpu_vm.jax_version()}", "-t", image, "."),
          shell.command("docker", "push", image)]


def run(cluster: Cluster, command: str, workload: str, comment: str = "") -> list[shell.Command]:
  if not cluster.image:
    raise ValueError("--image is required (build it with `python launch/xpk.py build`)")
  return [shell.command("xpk", "workload", "create", *_where(cluster),
                        f"--workload={check_workload_name(workload)}",
                        f"--tpu-type={cluster.tpu_type}", f"--num-slices={cluster.num_slices}",
                        f"--docker-image={cluster.image}", f"--max-restarts={cluster.max_restarts}",
                        f"--termination-grace-period-seconds={cluster.grace}",
                        *(f"--storage={name}" for name in cluster.storage),
                        "--command", command, comment=comment)]


def max_pods(cluster: Cluster) -> int:
  """An upper bound on the workload's pods (one per host): the number in an accelerator type counts
  chips or TensorCores, and every host has at least one."""
  size = cluster.tpu_type.rpartition("-")[2]
  if not size.isdigit():
    raise ValueError(f"--tpu-type={cluster.tpu_type}: expected GENERATION-SIZE, e.g. v5litepod-256")
  return int(size) * cluster.num_slices


def logs(cluster: Cluster, workload: str, worker: str = "0", slice_index: int = 0,
         lines: int = 200) -> list[shell.Command]:
  """Follows one pod (`worker` of slice `slice_index`; worker 0 of slice 0 is JAX process 0), or
  every pod with `worker="all"`. kubectl's own defaults (10 lines, at most 5 pods) would hide
  most of a multi-host run."""
  selector = [f"jobset.sigs.k8s.io/jobset-name={workload}"]
  if worker == "all":
    streams = [f"--max-log-requests={max_pods(cluster)}"]
  elif worker.isdigit():
    selector += [f"jobset.sigs.k8s.io/job-index={slice_index}",
                 f"batch.kubernetes.io/job-completion-index={worker}"]
    streams = []
  else:
    raise ValueError(f"--worker={worker}: a worker index within the slice, or 'all'")
  # kubectl's current context is the cluster xpk last used.
  return [shell.command("kubectl", "logs", "--follow", "--prefix", f"--tail={lines}", *streams,
                        f"--selector={','.join(selector)}")]


def delete(cluster: Cluster, workload: str) -> list[shell.Command]:
  return [shell.command("xpk", "workload", "delete", *_where(cluster), f"--workload={workload}")]


REQUIRED = ("cluster",)  # and --image to run


def add_flags(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--cluster", default="", help="GKE cluster made by `xpk cluster create`.")
  parser.add_argument("--tpu-type", dest="tpu_type", default=Cluster.tpu_type)
  parser.add_argument("--num-slices", dest="num_slices", type=int, default=1)
  parser.add_argument("--image", default="", help="Image built by `launch/xpk.py build`.")
  parser.add_argument("--zone", default="")
  parser.add_argument("--project", default="")
  parser.add_argument("--max-restarts", dest="max_restarts", type=shell.non_negative,
                      default=Cluster.max_restarts, help="Restarts of a preempted (exit status "
                      "143) or otherwise killed workload (xpk restarts on 42 and 127-255).")
  parser.add_argument("--grace", type=shell.non_negative, default=Cluster.grace,
                      help="Seconds a pod has from SIGTERM (preemption, deletion) to SIGKILL: more "
                      "than a step and a checkpoint save take.")
  parser.add_argument("--storage", action="append", default=[], help="An `xpk storage attach` "
                      "name to mount (repeatable), e.g. a gcsfuse bucket for the workdir.")


def cluster_from_args(args: argparse.Namespace) -> Cluster:
  return Cluster(args.cluster, args.tpu_type, args.num_slices, args.image, args.zone, args.project,
                 args.max_restarts, args.grace, tuple(args.storage))


def main(argv: Sequence[str]) -> None:
  parser = shell.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("action", choices=("build", "run", "logs", "delete"))
  add_flags(parser)
  parser.add_argument("--workload", default="")
  parser.add_argument("--worker", default="0", help="logs: the pod's index within its slice, or "
                      "'all' (pass the run's --tpu-type and --num-slices).")
  parser.add_argument("--slice", dest="slice_index", type=int, default=0, help="logs: the slice.")
  parser.add_argument("--lines", type=int, default=200, help="logs: lines shown before following "
                      "(-1: the whole log).")
  parser.add_argument("--dry-run", action="store_true", help="Print the commands; run nothing.")
  own, command = shell.split_command(argv)
  args = parser.parse_args(own)
  if bool(command) != (args.action == "run"):
    parser.error("run needs the command after --; the other actions take none")
  try:
    if args.action == "build":
      if not args.image:
        raise ValueError("build needs --image")
      commands = build(args.image)
    else:
      shell.require(parser, args, REQUIRED, args.dry_run)
      cluster = cluster_from_args(args)
      if not args.workload:
        raise ValueError(f"{args.action} needs --workload")
      if args.action == "run":
        commands = run(cluster, shlex.join(command), args.workload)
      elif args.action == "logs":
        commands = logs(cluster, args.workload, args.worker, args.slice_index, args.lines)
      else:
        commands = delete(cluster, args.workload)
  except ValueError as e:
    parser.error(str(e))
  shell.execute(commands, args.dry_run)


if __name__ == "__main__":
  main(sys.argv[1:])
