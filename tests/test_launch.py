"""Launchers and the sweep expander: golden dry-run outputs (nothing runs), bad input, the scaling
grid's configs, and the CPU smoke sweep end to end (train -> eval -> scaling-law fit).

Regenerate the goldens after an intended change with
`UPDATE_GOLDENS=1 python -m pytest tests/test_launch.py` and review the diff.
"""

import contextlib
import json
import os
import pathlib
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
from preflmr_jax.tools import plan

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
    "xpk_run_fuse": (xpk, ["run", *XPK, "--num-slices=2", "--max-restarts=0", "--storage=ckpt",
                           "--workload=tiny", "--", *TRAIN[:4], "--workdir=/gcs/my-bucket/tiny",
                           TRAIN[-1]]),
    "xpk_logs": (xpk, ["logs", *XPK, "--workload=tiny", "--slice=1", "--worker=2"]),
    "xpk_logs_all": (xpk, ["logs", *XPK, "--num-slices=2", "--workload=tiny", "--worker=all",
                           "--lines=-1"]),
    "xpk_delete": (xpk, ["delete", *XPK, "--workload=tiny"]),
    "gpu_slurm": (gpu, ["slurm", "--nodes=4", "--partition=a100", "--time=24:00:00", "--job=tiny",
                        "--dry-run", "--", *TRAIN]),
    "gpu_hosts": (gpu, ["hosts", "--hosts=gpu0,gpu1,gpu2", "--dry-run", "--", *TRAIN]),
    "sweep_local": (sweep, [*SWEEP, "--backend=local"]),
    "sweep_tpu_vm": (sweep, [*SWEEP, "--backend=tpu-vm", *TPU, "--",
                             "--config.tokenizer=/mnt/shared/PreFLMR_ViT-L/query_tokenizer"]),
    "sweep_xpk": (sweep, [*SWEEP, "--backend=xpk", *XPK]),
    "sweep_slurm": (sweep, [*SWEEP, "--backend=slurm", "--nodes=2",
                            "--eval_flags=--split=valid --batch_size=128"]),
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
  monkeypatch.setattr(subprocess, "run", lambda argv, **kw: ran.append(argv) or
                      subprocess.CompletedProcess(argv, 0))
  sweep.main(["configs/scaling.py:smoke", f"--workdir_root={tmp_path}", "--fit"])
  assert [a[2] for a in ran] == ["preflmr_jax.main", "preflmr_jax.evaluate"] * 3 + [
      "preflmr_jax.tools.scaling_law"]
  assert all(a[0] == sys.executable for a in ran)  # `python` is this interpreter
  assert f"--workdir={tmp_path}/scaling-smoke/smoke-16" in ran[0]


def test_local_backend_stops_at_a_failure_naming_it(monkeypatch, tmp_path):
  monkeypatch.setattr(subprocess, "run", lambda argv, **kw: subprocess.CompletedProcess(argv, 3))
  with pytest.raises(SystemExit, match="exit status 3: python -m preflmr_jax.main"):
    sweep.main(["configs/scaling.py:smoke", f"--workdir_root={tmp_path}"])


def _write_config(tmp_path, body):
  path = tmp_path / "my_sweep.py"
  path.write_text("from preflmr_jax import config_files\n\n"
                  "def get_config(arg=None):\n"
                  "  return config_files.load_config('configs/tiny.py')\n\n" + body)
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
])
def test_bad_flags_are_refused_before_anything_runs(argv, message, capsys, nothing_runs):
  with pytest.raises(SystemExit):
    sweep.main(argv)
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


def test_tpu_vm_run_detaches_and_a_new_run_frees_the_tpu(tmp_path):
  """The generated worker scripts, run by bash here (a fake home, sudo as a no-op wrapper): `run`
  returns at once and the command goes on; the next `run` (or `stop`) ends it first."""
  (tmp_path / "preflmr_jax").mkdir()
  (tmp_path / "preflmr_venv" / "bin").mkdir(parents=True)
  (tmp_path / "preflmr_venv" / "bin" / "activate").write_text("")
  (tmp_path / "bin").mkdir()
  (tmp_path / "bin" / "sudo").write_text('#!/bin/sh\nexec "$@"\n')
  (tmp_path / "bin" / "sudo").chmod(0o755)
  env = {**os.environ, "HOME": str(tmp_path), "PATH": f"{tmp_path}/bin:{os.environ['PATH']}"}
  pod = tpu_vm.Pod("t", "z")
  pidfile = tmp_path / "run.pid"

  def worker(commands):
    script = _remote(commands[0]).replace(tpu_vm.RUN_PID, str(pidfile))
    return subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True,
                          timeout=60, check=True)

  groups = []
  try:
    started = worker(tpu_vm.run(pod, [("a", "echo working; sleep 60"), ("b", "echo second")]))
    assert "log: ~/preflmr_logs/a.log, ~/preflmr_logs/b.log" in started.stdout
    logs = tmp_path / "preflmr_logs"
    _wait_for(logs / "a.log", "working")
    group = int(pidfile.read_text())
    groups.append(group)
    os.killpg(group, 0)  # still running after the "ssh session" ended
    worker(tpu_vm.run(pod, [("c", "exit 3"), ("d", "sleep 60")]))  # ends the first run, then runs
    _wait_until_gone(group)
    assert "exit status" not in (logs / "a.log").read_text() and not (logs / "b.log").exists()
    _wait_for(logs / "c.log", "[preflmr] exit status 3")
    assert (logs / "c.log").read_text().startswith("[preflmr] start ")
    _wait_for(logs / "d.log", "start")
    groups.append(int(pidfile.read_text()))
    worker(tpu_vm.stop(pod))
    _wait_until_gone(groups[-1])
  finally:  # nothing outlives the test
    groups += [int(pidfile.read_text())] if pidfile.exists() else []
    for group in groups:
      with contextlib.suppress(ProcessLookupError):
        os.killpg(group, signal.SIGKILL)


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


def test_smoke_points_compile_on_the_simulated_mesh():
  _, points = sweep.load_points("configs/scaling.py:smoke")
  params = []
  for point in points:
    result = plan.plan(config_files.load_config(point.config), {"data": 2, "fsdp": 4})
    assert result["flops_per_step"] > 0
    params.append(result["params_total"])
  assert params == sorted(params) and len(set(params)) == 3


# --------------------------------------------------------------- the smoke sweep, end to end

@pytest.mark.slow
def test_smoke_sweep_trains_evaluates_and_fits(tmp_path, one_device_env):
  out = subprocess.run([sys.executable, "launch/sweep.py", "configs/scaling.py:smoke",
                        "--backend=local", f"--workdir_root={tmp_path}", "--fit"],
                       cwd=shell.REPO_ROOT, capture_output=True, text=True, check=False,
                       env=one_device_env)
  assert out.returncode == 0, out.stderr[-3000:]
  sweep_dir = tmp_path / "scaling-smoke"
  for width in (16, 32, 64):
    point = sweep_dir / f"smoke-{width}"
    run = json.loads((point / "run.json").read_text())
    results = json.loads((point / "eval" / "results.json").read_text())["SAMPLE"]
    assert results["step"] == 200 and results["params"] == run["params_total"]
    assert results["train_flops"] == pytest.approx(200 * run["train_flops_per_step"])
    assert 0 <= results[results["headline"]] <= 1
  fits = json.loads(out.stdout.strip().splitlines()[-1])["fits"]
  assert {f["x_axis"] for f in fits} == {"params", "train_flops"}
  assert all(len(f["names"]) == 3 for f in fits)
  assert (sweep_dir / "scaling_law.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert "| SAMPLE |" in (sweep_dir / "scaling_law.md").read_text()
