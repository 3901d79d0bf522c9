"""Launchers and the sweep expander: golden dry-run outputs (nothing runs), bad input, the scaling
grid's configs, and the CPU smoke sweep end to end (train -> eval -> scaling-law fit).

Regenerate the goldens after an intended change with
`UPDATE_GOLDENS=1 python -m pytest tests/test_launch.py` and review the diff.
"""

import contextlib
import json
import os
import pathlib
import shlex
import signal
import subprocess
import sys
import time

import jax
import pytest

from launch import gpu, shell, sweep, tpu_vm, xpk
from preflmr_jax import config_files, sharding
from preflmr_jax.models import model_config as mc
from preflmr_jax.models import preflmr

GOLDEN_DIR = pathlib.Path(__file__).parent / "golden" / "launch"
TPU = ["--tpu=preflmr-v5e", "--zone=us-west4-a", "--project=my-project", "--dry-run"]
XPK = ["--cluster=preflmr", "--tpu-type=v5litepod-256", "--image=gcr.io/my-project/preflmr:v1",
       "--dry-run"]
TRAIN = ["python", "-m", "preflmr_jax.main", "--config=configs/tiny.py",
         "--workdir=gs://my-bucket/tiny", "--config.distributed=True"]
SWEEP = ["configs/scaling.py", "--workdir_root=gs://my-bucket/sweeps", "--dry-run"]

CASES = {
    "tpu_vm_create": (tpu_vm, ["create", *TPU, "--accelerator=v5litepod-16", "--spot"]),
    "tpu_vm_install": (tpu_vm, ["install", *TPU]),
    "tpu_vm_run": (tpu_vm, ["run", *TPU, "--job=tiny", "--", *TRAIN]),
    "tpu_vm_logs": (tpu_vm, ["logs", *TPU, "--job=tiny", "--worker=3"]),
    "tpu_vm_stop": (tpu_vm, ["stop", *TPU]),
    "tpu_vm_delete": (tpu_vm, ["delete", *TPU]),
    "xpk_build": (xpk, ["build", "--image=gcr.io/my-project/preflmr:v1", "--dry-run"]),
    "xpk_run": (xpk, ["run", *XPK, "--workload=tiny", "--", *TRAIN]),
    "xpk_run_fuse": (xpk, ["run", *XPK, "--num-slices=2", "--max-restarts=0", "--grace=60",
                           "--storage=ckpt", "--workload=tiny", "--", *TRAIN[:4],
                           "--workdir=/gcs/my-bucket/tiny", TRAIN[-1]]),
    "xpk_logs": (xpk, ["logs", *XPK, "--workload=tiny", "--slice=1", "--worker=2"]),
    "xpk_logs_all": (xpk, ["logs", *XPK, "--num-slices=2", "--workload=tiny", "--worker=all",
                           "--lines=-1"]),
    "xpk_delete": (xpk, ["delete", *XPK, "--workload=tiny"]),
    "gpu_slurm": (gpu, ["slurm", "--nodes=4", "--partition=a100", "--time=24:00:00", "--job=tiny",
                        "--dry-run", "--", *TRAIN]),
    "gpu_hosts": (gpu, ["hosts", "--hosts=gpu0,gpu1,gpu2", "--dry-run", "--", *TRAIN]),
    "sweep_local": (sweep, [*SWEEP, "--backend=local"]),
    "sweep_tpu_vm": (sweep, [*SWEEP, "--backend=tpu-vm", *TPU, "--max-restarts=1", "--",
                             "--config.tokenizer=/mnt/shared/PreFLMR_ViT-L/query_tokenizer"]),
    "sweep_xpk": (sweep, [*SWEEP, "--backend=xpk", *XPK]),
    "sweep_slurm": (sweep, [*SWEEP, "--backend=slurm", "--nodes=2", "--max-restarts=5",
                            "--grace=900", "--eval_flags=--split=valid --batch_size=128"]),
    "sweep_hosts": (sweep, [*SWEEP, "--backend=hosts", "--hosts=gpu0,gpu1"]),
    "sweep_tpu_vm_placeholders": (sweep, ["configs/scaling.py", "--backend=tpu-vm", "--dry-run"]),
}


@pytest.fixture
def nothing_runs(monkeypatch):
  def refuse(*args, **kwargs):
    raise AssertionError(f"a dry run started a process: {args}")
  monkeypatch.setattr(subprocess, "run", refuse)
  monkeypatch.setattr(subprocess, "Popen", refuse)


@pytest.mark.parametrize("case", sorted(CASES))
def test_dry_run_matches_golden(case, capsys, nothing_runs):
  module, argv = CASES[case]
  module.main(argv)
  out = capsys.readouterr().out
  golden = GOLDEN_DIR / f"{case}.txt"
  if os.environ.get("UPDATE_GOLDENS"):
    golden.parent.mkdir(parents=True, exist_ok=True)
    golden.write_text(out)
  assert out == golden.read_text(), f"{case}: dry-run output changed (UPDATE_GOLDENS=1 to accept)"


def test_scaling_sweep_prints_the_whole_grid(capsys, nothing_runs):
  sweep.main(["configs/scaling.py", "--backend=tpu-vm", "--dry-run"])
  out = capsys.readouterr().out
  for vision in ("B", "L", "400m"):
    for text in ("base", "large", "800m"):
      assert out.count(f"--config=configs/scaling.py:vision={vision},text={text} ") == 2
  assert out.count("gcloud compute tpus tpu-vm ssh") == 1  # one pod: the points run in turn


def test_local_backend_runs_the_commands_in_order(monkeypatch, tmp_path):
  ran = []
  monkeypatch.setattr(shell, "_run", lambda argv, stdin: ran.append(argv) or 0)
  sweep.main(["configs/scaling.py:smoke", f"--workdir_root={tmp_path}", "--fit"])
  assert [a[2] for a in ran] == ["preflmr_jax.main", "preflmr_jax.evaluate"] * 3 + [
      "preflmr_jax.tools.scaling_law"]
  assert all(a[0] == sys.executable for a in ran)  # `python` is this interpreter
  assert f"--workdir={tmp_path}/scaling-smoke/smoke-16" in ran[0]


def test_local_backend_stops_at_a_failure_naming_it(monkeypatch, tmp_path):
  monkeypatch.setattr(shell, "_run", lambda argv, stdin: 3)
  with pytest.raises(SystemExit, match="exit status 3: python -m preflmr_jax.main"):
    sweep.main(["configs/scaling.py:smoke", f"--workdir_root={tmp_path}"])


@pytest.mark.parametrize("status", [shell.PREEMPTED, -signal.SIGTERM])
def test_local_backend_reports_a_preempted_point_and_resumes_when_rerun(status, monkeypatch,
                                                                        tmp_path, capsys):
  """The second point's training is preempted: its eval and the third point do not run, the sweep
  says so and exits with PREEMPTED (not a failure); the same sweep run again runs every point."""
  ran, preempt = [], [3]  # the third command run: point 2's training

  def run(argv, stdin):
    ran.append(argv[2:4])
    return status if len(ran) in preempt else 0

  monkeypatch.setattr(shell, "_run", run)
  argv = ["configs/scaling.py:smoke", f"--workdir_root={tmp_path}"]
  with pytest.raises(SystemExit) as e:
    sweep.main(argv)
  assert e.value.code == shell.PREEMPTED
  assert [a[0] for a in ran] == ["preflmr_jax.main", "preflmr_jax.evaluate", "preflmr_jax.main"]
  err = capsys.readouterr().err
  assert f"preempted (exit status {status}): python -m preflmr_jax.main" in err
  assert "stopped at point 2/3 (smoke-32), preempted: run this sweep again" in err
  assert "failed" not in err
  ran.clear()
  preempt.clear()
  sweep.main(argv)
  assert [a[0] for a in ran] == ["preflmr_jax.main", "preflmr_jax.evaluate"] * 3


def _write_config(tmp_path, body):
  path = tmp_path / "my_sweep.py"
  path.write_text("from preflmr_jax import config_defaults\n\n"
                  "def get_config(arg=None):\n"
                  "  return config_defaults.tiny_config()\n\n" + body)
  return str(path)


@pytest.mark.parametrize("body, message", [
    ("", "defines no sweep()"),
    ("def sweep():\n  return []\n", "non-empty list"),
    ("def sweep():\n  return [3]\n", "sweep point 0 is 3"),
    ("def sweep():\n  return [{'no_such_key': 1}]\n", "sweep point 0 .*no_such_key"),
    ("def sweep():\n  return [{'num_train_steps': 5, 'optimizer.warmup_steps': 50}]\n",
     "sweep point 0 .*warmup_steps"),
    ("def sweep():\n  return [{'model.text.num_heads': 5}]\n", "sweep point 0 .*num_heads"),
    ("def sweep():\n  return [{'seed': 1, 'name': 'a'}, {'seed': 2, 'name': 'a'}]\n",
     "not unique"),
])
def test_bad_sweeps_fail_up_front_naming_the_point(tmp_path, body, message, nothing_runs):
  with pytest.raises(ValueError, match=message):
    sweep.load_points(_write_config(tmp_path, body))


def test_points_name_their_overrides_and_format_values(tmp_path):
  path = _write_config(tmp_path, "def sweep():\n"
                       "  return [{'seed': s, 'optimizer.learning_rate': 1e-3} for s in (1, 2)]\n")
  name, points = sweep.load_points(path)
  assert name == "my_sweep" and [p.name for p in points] == [
      "seed-1_learning_rate-0.001", "seed-2_learning_rate-0.001"]
  train, evaluate = sweep.point_commands(points[0], "/w/p")
  assert "--config.seed=1" in train and "--config.optimizer.learning_rate=0.001" in evaluate
  assert sweep.job_name("my_sweep", points[0].name, 0) == "my-sweep-seed-1-learning-rate-0-001"
  assert sweep.job_name("s", "x" * 60, 7) == "p-s-007"
  assert sweep.job_name("s", "a_b", 1, taken=["s-a-b"]) == "p-s-001"  # "a-b" came first
  for name in (sweep.job_name("scaling", p, i) for i, p in enumerate(["a", "B_c", "z" * 80])):
    assert xpk.check_workload_name(name) == name


@pytest.mark.parametrize("argv, message", [
    (["configs/scaling.py", "--backend=tpu-vm", "--zone=z", "--workdir_root=/w"], "--tpu is required"),
    (["configs/scaling.py", "--backend=xpk", "--cluster=c", "--workdir_root=/w"], "--image"),
    (["configs/scaling.py", "--backend=slurm"], "--workdir_root is required"),
    (["configs/scaling.py", "--workdir_root=gs://"], "--workdir_root=gs://: name a bucket"),
    (["configs/scaling.py", "--", "--batch_size=3"], "--config"),
    (["configs/scaling.py", "--backend=nope"], "invalid choice"),
    (["configs/nope.py", "--dry-run"], "error: config file 'configs/nope.py' not found"),
])
def test_bad_flags_are_refused_before_anything_runs(argv, message, capsys, nothing_runs):
  with pytest.raises(SystemExit) as e:
    sweep.main(argv)
  assert e.value.code == 2
  assert message in capsys.readouterr().err


def test_launcher_flag_errors(capsys, nothing_runs):
  with pytest.raises(SystemExit):
    tpu_vm.main(["run", "--tpu=t", "--zone=z"])
  assert "needs the command" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    xpk.main(["run", "--cluster=c", "--image=i", "--workload=Bad_Name", "--", "python"])
  assert "xpk workload name 'Bad_Name'" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    gpu.main(["hosts", "--", "python"])
  assert "--hosts is required" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    tpu_vm.main(["create", "--tpu=t", "--zone=z", "--accelerator=v9x-8"])
  assert "--accelerator=v9x-8: unknown TPU generation 'v9x'" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    xpk.main(["logs", "--cluster=c", "--workload=w", "--worker=first"])
  assert "--worker=first: a worker index" in capsys.readouterr().err


def test_flags_take_dashes_or_underscores(capsys):
  args, extra = sweep.parse(
      ["configs/scaling.py", "--backend", "tpu-vm", "--tpu", "t", "--zone", "z", "--dry_run",
       "--workdir-root=gs://b/s", "--max_restarts", "5", "--eval-flags", "--split=valid --x-y=1",
       "--", "--config.batch_size=16"])
  assert (args.dry_run, args.workdir_root, args.max_restarts) == (True, "gs://b/s", 5)
  assert args.eval_flags == "--split=valid --x-y=1" and extra == ["--config.batch_size=16"]
  args, _ = sweep.parse(["configs/scaling.py", "--eval_flags", "--dry_run=x --split=valid"])
  assert args.eval_flags == "--dry_run=x --split=valid" and not args.dry_run  # a value, kept
  with pytest.raises(SystemExit):
    sweep.parse(["configs/scaling.py", "--dry_runs"])
  assert "unrecognized arguments: --dry_runs" in capsys.readouterr().err
  # A sweep's tpu-vm flags are the pod's and the restarts', not pod creation's.
  with pytest.raises(SystemExit):
    sweep.parse(["configs/scaling.py", "--backend=tpu-vm", "--help"])
  shown = capsys.readouterr().out
  assert "--max-restarts" in shown and "--accelerator" not in shown and "'-' or '_'" in shown


@pytest.mark.parametrize("accelerator, version", [
    ("v4-32", "tpu-ubuntu2204-base"), ("v5litepod-256", "v2-alpha-tpuv5-lite"),
    ("v5p-128", "v2-alpha-tpuv5"), ("v6e-16", "v2-alpha-tpuv6e")])
def test_tpu_software_version_follows_the_generation(accelerator, version, capsys, nothing_runs):
  tpu_vm.main(["create", *TPU, f"--accelerator={accelerator}"])
  assert f"--accelerator-type={accelerator} --version={version}\n" in capsys.readouterr().out
  tpu_vm.main(["create", *TPU, f"--accelerator={accelerator}", "--version=tpu-vm-custom"])
  assert "--version=tpu-vm-custom\n" in capsys.readouterr().out


def _remote(command):
  """The script of a `gcloud ... ssh --command SCRIPT`, as the worker's shell gets it."""
  return command.argv[command.argv.index("--command") + 1]


def _wait_for(path, text, seconds=10):
  deadline = time.monotonic() + seconds
  while not (path.exists() and text in path.read_text()):
    assert time.monotonic() < deadline, f"{path}: no {text!r} after {seconds} s"
    time.sleep(0.05)


def _wait_until_gone(group, seconds=10):
  """SIGKILL is delivered asynchronously."""
  deadline = time.monotonic() + seconds
  with pytest.raises(ProcessLookupError):
    while time.monotonic() < deadline:
      os.killpg(group, 0)
      time.sleep(0.05)


class _Worker:
  """A TPU VM worker faked here: the generated worker scripts run by bash with a fake home (the
  checkout, the venv, the logs) and sudo as a no-op wrapper."""

  def __init__(self, home):
    (home / "preflmr_jax").mkdir()
    (home / "preflmr_venv" / "bin").mkdir(parents=True)
    (home / "preflmr_venv" / "bin" / "activate").write_text("")
    _executable(home / "bin" / "sudo", 'exec "$@"')
    self.env = {**os.environ, "HOME": str(home), "PATH": f"{home}/bin:{os.environ['PATH']}"}
    self.logs = home / "preflmr_logs"
    self.pidfile = home / "run.pid"
    self.groups = []  # process groups started: all killed at the end

  def run(self, commands):
    script = _remote(commands[0]).replace(tpu_vm.RUN_PID, str(self.pidfile))
    return subprocess.run(["bash", "-c", script], env=self.env, capture_output=True, text=True,
                          timeout=60, check=True)

  def group(self):
    """The process group of the detached run now running."""
    self.groups.append(int(self.pidfile.read_text()))
    return self.groups[-1]

  def kill_all(self):
    if self.pidfile.exists():
      self.groups.append(int(self.pidfile.read_text()))
    for group in self.groups:
      with contextlib.suppress(ProcessLookupError, ValueError):
        os.killpg(group, signal.SIGKILL)


@pytest.fixture
def worker(tmp_path):
  fake = _Worker(tmp_path)
  try:
    yield fake
  finally:  # nothing outlives the test
    fake.kill_all()


def _executable(path, body):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(f"#!/bin/sh\n{body}\n")
  path.chmod(0o755)


def test_tpu_vm_run_detaches_and_a_new_run_frees_the_tpu(worker):
  """`run` returns at once and the command goes on; the next `run` (or `stop`) ends it first."""
  pod = tpu_vm.Pod("t", "z")
  started = worker.run(tpu_vm.run(pod, [("a", "echo working; sleep 60"), ("b", "echo second")]))
  assert "log: ~/preflmr_logs/a.log, ~/preflmr_logs/b.log" in started.stdout
  logs = worker.logs
  _wait_for(logs / "a.log", "working")
  group = worker.group()
  os.killpg(group, 0)  # still running after the "ssh session" ended
  worker.run(tpu_vm.run(pod, [("c", "exit 3"), ("d", "sleep 60")]))  # ends the first run, then runs
  _wait_until_gone(group)
  assert "exit status" not in (logs / "a.log").read_text() and not (logs / "b.log").exists()
  _wait_for(logs / "c.log", "[preflmr] exit status 3")
  assert (logs / "c.log").read_text().startswith("[preflmr] start ")
  assert "preempted" not in (logs / "c.log").read_text()  # a failure is not restarted
  _wait_for(logs / "d.log", "start")
  group = worker.group()
  worker.run(tpu_vm.stop(pod))
  _wait_until_gone(group)


# ------------------------------------------------------------------ preemption and restarts

def _attempts(tmp_path, statuses):
  """A command line that counts its runs in a file and exits with `statuses[i]` on run i + 1 (the
  last status from then on); and that file."""
  counter = tmp_path / "attempts"
  cases = "".join(f"{i + 1}) exit {code};; " for i, code in enumerate(statuses[:-1]))
  script = (f"echo attempt >> {counter}; "
            f"case $(($(wc -l < {counter}))) in {cases}*) exit {statuses[-1]};; esac")
  return shlex.join(["sh", "-c", script]), counter


def _runs(counter):
  return counter.read_text().count("attempt") if counter.exists() else 0


@pytest.mark.parametrize("statuses, max_restarts, runs", [
    ([143, 143, 0], 3, 3),  # preempted twice, then it finishes: 0
    ([1], 3, 1),  # a failure is not restarted
    ([143], 2, 3),  # preempted every time: two restarts, then it ends preempted
    ([143, 0], 0, 1),  # --max-restarts=0
])
def test_restart_loop_reruns_only_a_preempted_command(statuses, max_restarts, runs, tmp_path):
  """The loop of the tpu-vm and hosts backends, in bash and in a POSIX sh (dash): the remote login
  shell runs the hosts one."""
  for sh in ("bash", "sh"):
    command, counter = _attempts(tmp_path, statuses)
    counter.unlink(missing_ok=True)
    out = subprocess.run([sh, "-c", shell.restart_loop(command, max_restarts)], capture_output=True,
                         text=True, timeout=30, check=False)
    assert _runs(counter) == runs, (sh, out.stdout, out.stderr)
    assert out.returncode == statuses[min(runs, len(statuses)) - 1], sh
    assert out.stdout.count("[preflmr] start ") == runs
    for restart in range(1, runs):
      assert f"[preflmr] preempted: restart {restart} of at most {max_restarts}" in out.stdout
    assert ("no restarts left" in out.stdout) == (out.returncode == shell.PREEMPTED), sh


def test_tpu_vm_run_restarts_a_preempted_command_on_the_worker(worker, tmp_path):
  """Exit status 143 twice, then 0: three attempts, each in the job's log."""
  command, counter = _attempts(tmp_path, [143, 143, 0])
  worker.run(tpu_vm.run(tpu_vm.Pod("t", "z"), [("p", command)]))
  _wait_for(worker.logs / "p.log", "[preflmr] exit status 0")
  log = (worker.logs / "p.log").read_text()
  assert _runs(counter) == 3
  assert log.count("[preflmr] start ") == 3 and log.count("[preflmr] exit status 143") == 2
  assert "restart 2 of at most 3" in log


def test_hosts_restart_a_preempted_command_on_each_host(tmp_path):
  command, counter = _attempts(tmp_path, [143, 0])
  commands = gpu.host_commands(gpu.Hosts(("h0", "h1"), remote_dir=str(tmp_path)), command)
  out = subprocess.run(["sh", "-c", commands[1].argv[2]], capture_output=True, text=True,
                       timeout=30, check=False)  # what ssh h1 runs
  assert out.returncode == 0 and _runs(counter) == 2
  assert "restart 1 of at most 3" in out.stdout


@pytest.mark.parametrize("codes, status, message", [
    ((143, 143), shell.PREEMPTED, "preempted, no restarts left: "),
    ((143, 1), 1, "failed: "),
])
def test_hosts_launcher_tells_preempted_from_failed(codes, status, message, capsys):
  commands = [shell.command("sh", "-c", f"exit {code}") for code in codes]
  with pytest.raises(SystemExit) as e:
    gpu.execute_together(commands, dry_run=False)
  assert e.value.code == status
  assert message in capsys.readouterr().err


@pytest.mark.parametrize("status, restart_count, requeue_ok, requeued", [
    (143, None, True, True),  # the first run, preempted: requeued
    (143, "2", True, True),
    (143, "3", True, False),  # --max-restarts=3 used up
    (143, None, False, False),  # SLURM refused the requeue (e.g. MaxBatchRequeue)
    (1, None, True, False),  # a failure
    (0, None, True, False),
])
def test_slurm_script_requeues_its_preempted_job(status, restart_count, requeue_ok, requeued,
                                                  tmp_path):
  """The sbatch script run here, srun and scontrol faked."""
  requeues = tmp_path / "requeues"
  _executable(tmp_path / "bin" / "srun", 'exec "$@"')
  _executable(tmp_path / "bin" / "scontrol",
              f'echo "$@" >> {requeues}; exit {0 if requeue_ok else 1}')
  env = {**os.environ, "PATH": f"{tmp_path}/bin:{os.environ['PATH']}", "SLURM_JOB_ID": "1234"}
  env.pop("SLURM_RESTART_COUNT", None)
  if restart_count is not None:
    env["SLURM_RESTART_COUNT"] = restart_count
  script = gpu.sbatch_script(gpu.Slurm(), f"exit {status}", "job")
  assert "#SBATCH --requeue\n#SBATCH --signal=TERM@300\n#SBATCH --open-mode=append\n" in script
  out = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True,
                       timeout=30, check=False)
  assert out.returncode == status, out.stderr
  assert (requeues.read_text() if requeues.exists() else "") == (
      "requeue 1234\n" if requeued or (status == 143 and not requeue_ok) else "")
  assert f"[preflmr] exit status {status}" in out.stdout
  assert ("requeue refused" in out.stdout) == (status == 143 and not requeue_ok)
  assert ("no restarts left" in out.stdout) == (restart_count == "3")


@pytest.mark.parametrize("signal_group", [False, True])
def test_sweep_line_passes_sigterm_to_the_training_and_skips_its_eval(signal_group, tmp_path):
  """A point's `train && eval` line: SIGTERM to the shell alone (xpk's container signals its
  command's first process) or to every process (SLURM's --signal): the training gets it, saves and
  exits with PREEMPTED, and the eval does not run."""
  ready, saved, evaluated = tmp_path / "ready", tmp_path / "saved", tmp_path / "evaluated"
  train = ["sh", "-c", f'trap "echo saved > {saved}; exit 143" TERM; echo ready > {ready}; '
           "while :; do sleep 0.05; done"]
  line = shell.chain([train, ["sh", "-c", f"echo evaluated > {evaluated}"]])
  proc = subprocess.Popen(["bash", "-c", line], start_new_session=True)
  try:
    _wait_for(ready, "ready")
    if signal_group:
      os.killpg(proc.pid, signal.SIGTERM)
    else:
      proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == shell.PREEMPTED
    assert saved.exists() and not evaluated.exists()
  finally:
    with contextlib.suppress(ProcessLookupError):
      os.killpg(proc.pid, signal.SIGKILL)


def test_sweep_line_passes_on_a_sigterm_that_comes_before_the_shell_holds_the_pid(tmp_path):
  """The shell may get SIGTERM after starting the training but before `pid=$!` (a window of
  microseconds that a busy machine hits about once in a hundred tries): the training still gets
  the signal. A DEBUG trap sends the SIGTERM in exactly that window."""
  evaluated = tmp_path / "evaluated"
  train = ["sh", "-c", "trap 'exit 143' TERM; while :; do sleep 0.05; done"]
  line = shell.chain([train, ["sh", "-c", f"echo evaluated > {evaluated}"]])
  in_window = ("trap '[[ -z $sent && $BASH_COMMAND == \"pid=\\$!\" ]] && "
               "{ sent=1; kill -TERM $$; }' DEBUG; ")
  proc = subprocess.Popen(["bash", "-c", in_window + line], start_new_session=True)
  try:
    assert proc.wait(timeout=20) == shell.PREEMPTED
    assert not evaluated.exists()
  finally:
    with contextlib.suppress(ProcessLookupError):
      os.killpg(proc.pid, signal.SIGKILL)


@pytest.mark.parametrize("train_status, evaluated", [(0, True), (1, False), (143, False)])
def test_sweep_line_evaluates_only_a_finished_training(train_status, evaluated, tmp_path):
  marker = tmp_path / "evaluated"
  line = shell.chain([["sh", "-c", f"exit {train_status}"], ["sh", "-c", f"echo > {marker}"]])
  assert subprocess.run(["bash", "-c", line], timeout=30, check=False).returncode == train_status
  assert marker.exists() == evaluated


def _signal_a_launcher(tmp_path, trap: str, send) -> tuple[int, str]:
  """Runs a launcher whose command runs `trap` (a shell trap) and loops; once it runs,
  `send(launcher)`; returns the launcher's (status, stderr)."""
  ready = tmp_path / "ready"
  command = ["sh", "-c", f"{trap}; echo ready > {ready}; while :; do sleep 0.05; done"]
  code = f"from launch import shell; shell.execute([shell.command(*{command!r})], dry_run=False)"
  launcher = subprocess.Popen([sys.executable, "-c", code], cwd=shell.REPO_ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              start_new_session=True)
  try:
    _wait_for(ready, "ready")
    send(launcher)
    _, err = launcher.communicate(timeout=20)
    return launcher.returncode, err
  finally:
    with contextlib.suppress(ProcessLookupError):
      os.killpg(launcher.pid, signal.SIGKILL)


def test_launcher_passes_sigterm_on_and_reports_the_preemption(tmp_path):
  """A local run whose launcher alone gets SIGTERM (a container's PID 1): the command gets it too,
  and the launcher waits for it, says it was preempted and exits with PREEMPTED."""
  code, err = _signal_a_launcher(tmp_path, 'trap "exit 143" TERM',
                                 lambda launcher: launcher.send_signal(signal.SIGTERM))
  assert code == shell.PREEMPTED, err
  assert "preempted (exit status 143): sh -c" in err


def test_ctrl_c_in_a_terminal_leaves_the_command_to_finish_and_is_reported(tmp_path):
  """Ctrl-C reaches the launcher and its command (one process group): the launcher waits for the
  command (the trainer saves, exits INTERRUPTED), says so and exits with INTERRUPTED."""
  code, err = _signal_a_launcher(tmp_path, 'trap "sleep 0.3; exit 130" INT',
                                 lambda launcher: os.killpg(launcher.pid, signal.SIGINT))
  assert code == shell.INTERRUPTED, err
  assert "interrupted (exit status 130): sh -c" in err and "Traceback" not in err


def test_the_launchers_restart_on_the_trainers_preemption_status():
  from preflmr_jax import exit_codes  # pylint: disable=g-import-not-at-top
  assert shell.PREEMPTED == exit_codes.PREEMPTED == 128 + signal.SIGTERM
  # xpk restarts a workload whose container exits with 42 or 127-255 (xpk's get_restart_exit_codes)
  assert 127 <= shell.PREEMPTED <= 255


def test_scripts_run_from_the_repository_root_as_files():
  out = subprocess.run([sys.executable, "launch/sweep.py", "configs/scaling.py:smoke",
                        "--dry-run"], cwd=shell.REPO_ROOT, capture_output=True, text=True,
                       check=False)
  assert out.returncode == 0, out.stderr
  assert out.stdout.count("python -m preflmr_jax.main") == 3


def test_initialize_distributed_reads_the_process_environment(monkeypatch):
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
  monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
  monkeypatch.setenv("JAX_PROCESS_ID", "2")
  sharding.initialize_distributed()
  assert calls == [{"num_processes": 4, "process_id": 2}]
  monkeypatch.delenv("JAX_NUM_PROCESSES")
  monkeypatch.delenv("JAX_PROCESS_ID")
  sharding.initialize_distributed()  # SLURM / Cloud TPU: JAX detects them itself
  assert calls[-1] == {}
  monkeypatch.setenv("JAX_PROCESS_ID", "first")
  with pytest.raises(ValueError, match="JAX_PROCESS_ID='first'"):
    sharding.initialize_distributed()


# ------------------------------------------------------------------------- the scaling grid

@pytest.mark.slow
def test_every_grid_point_builds_a_model(nothing_runs):
  _, points = sweep.load_points("configs/scaling.py")
  assert len(points) == 9
  totals = {}
  for point in points:
    config = mc.PreFLMRConfig.from_dict(config_files.load_config(point.config).model)
    shapes = preflmr.abstract_params(config)  # jax.eval_shape: nothing is allocated
    totals[point.name] = sum(x.size for x in jax.tree.leaves(shapes))
  # Each axis grows the model: bigger vision or text tower -> more parameters.
  for text in ("base", "large", "800m"):
    assert (totals[f"vision-B_text-{text}"] < totals[f"vision-L_text-{text}"]
            < totals[f"vision-400m_text-{text}"])
  for vision in ("B", "L", "400m"):
    assert (totals[f"vision-{vision}_text-base"] < totals[f"vision-{vision}_text-large"]
            < totals[f"vision-{vision}_text-800m"])


def test_smoke_points_grow_the_model():
  _, points = sweep.load_points("configs/scaling.py:smoke")
  params = []
  for point in points:
    shapes = preflmr.abstract_params(
        mc.PreFLMRConfig.from_dict(config_files.load_config(point.config).model))
    params.append(sum(x.size for x in jax.tree.leaves(shapes)))
  assert params == sorted(params) and len(set(params)) == 3


# --------------------------------------------------------------- the smoke sweep, end to end

@pytest.mark.slow
def test_smoke_sweep_trains_evaluates_and_fits(tmp_path, one_device_env):
  # 20 steps a point (the overrides after `--` reach every point): the machinery, not the fit's
  # quality, is under test here.
  out = subprocess.run([sys.executable, "launch/sweep.py", "configs/scaling.py:smoke",
                        "--backend=local", f"--workdir_root={tmp_path}", "--fit", "--",
                        "--config.num_train_steps=20", "--config.log_every_steps=10"],
                       cwd=shell.REPO_ROOT, capture_output=True, text=True, check=False,
                       env=one_device_env)
  assert out.returncode == 0, out.stderr[-3000:]
  sweep_dir = tmp_path / "scaling-smoke"
  for width in (16, 32, 64):
    point = sweep_dir / f"smoke-{width}"
    run = json.loads((point / "run.json").read_text())
    results = json.loads((point / "eval" / "results.json").read_text())["SAMPLE"]
    assert results["step"] == 20 and results["params"] == run["params_total"]
    assert results["train_flops"] == pytest.approx(20 * run["train_flops_per_step"])
    assert 0 <= results[results["headline"]] <= 1
  fits = json.loads(out.stdout.strip().splitlines()[-1])["fits"]
  assert {f["x_axis"] for f in fits} == {"params", "train_flops"}
  assert all(len(f["names"]) == 3 for f in fits)
  assert (sweep_dir / "scaling_law.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert "| SAMPLE |" in (sweep_dir / "scaling_law.md").read_text()
