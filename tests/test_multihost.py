"""Two JAX processes on this machine (2 simulated CPU devices each, collectives over gloo), started
the way `launch/gpu.py hosts` starts them: the trainer (with periodic evaluation) and the eval binary
run multi-host end to end and compute what one process with the same 4 devices computes. (Two
devices a process rather than more: each simulated device costs CPU time on this machine, and two
already make the batch and the corpus split within a process as well as across processes.)"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from launch import shell
from preflmr_jax import exit_codes
from preflmr_jax import workdir as layout

SMOKE = "configs/scaling.py:smoke"
DEVICES_PER_PROCESS = 2


def _env(devices, **extra):
  env = dict(os.environ, **extra)
  env["XLA_FLAGS"] = env["XLA_FLAGS"].replace("device_count=8", f"device_count={devices}")
  return env


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start_two_processes(argv, tmp_path, tag, own_args=lambda i: []):
  port = _free_port()
  procs = []
  for i in range(2):
    env = _env(DEVICES_PER_PROCESS, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
               JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i))
    log = open(tmp_path / f"{tag}{i}.log", "w")
    procs.append((subprocess.Popen([sys.executable, "-m", *argv, *own_args(i),
                                    "--config.distributed=True"],
                                   cwd=shell.REPO_ROOT, env=env, stdout=log,
                                   stderr=subprocess.STDOUT), log))
  return procs


def _wait(procs, tmp_path, tag, status=0):
  for i, (proc, log) in enumerate(procs):
    try:
      code = proc.wait(timeout=1200)
    finally:
      log.close()
    assert code == status, (tmp_path / f"{tag}{i}.log").read_text()[-4000:]
  return [(tmp_path / f"{tag}{i}.log").read_text() for i in range(2)]


def _run_two_processes(argv, tmp_path, tag):
  return _wait(_start_two_processes(argv, tmp_path, tag), tmp_path, tag)


def _run_one_process(argv, tmp_path, tag):
  log = tmp_path / f"{tag}.log"
  with open(log, "w") as f:
    code = subprocess.run([sys.executable, "-m", *argv], cwd=shell.REPO_ROOT,
                          env=_env(2 * DEVICES_PER_PROCESS),
                          stdout=f, stderr=subprocess.STDOUT, timeout=1200).returncode
  assert code == 0, log.read_text()[-4000:]


def _metrics(workdir):
  return layout.read_metrics(workdir)


def _rankings(folder):
  text = layout.rankings_path(folder, "SAMPLE").read_text()
  return [json.loads(line) for line in text.splitlines()]


@pytest.mark.slow
def test_two_processes_compute_what_one_process_computes(tmp_path):
  train_args = ["preflmr_jax.main", f"--config={SMOKE}", "--config.num_train_steps=6",
                "--config.log_every_steps=1", "--config.checkpoint_every_steps=6",
                "--config.optimizer.warmup_steps=1", "--config.eval_every_steps=3",
                "--config.eval_max_queries=16"]
  two, one = tmp_path / "two", tmp_path / "one"
  logs = _run_two_processes(train_args + [f"--workdir={two}"], tmp_path, "train")
  assert "JAX process 0/2, 2 local devices, 4 in all" in logs[0]
  assert "JAX process 1/2" not in logs[1] and "step 6/6" not in logs[1]  # only process 0 prints
  _run_one_process(train_args + [f"--workdir={one}"], tmp_path, "train1")
  a, b = _metrics(two), _metrics(one)
  assert [m["step"] for m in a] == [m["step"] for m in b] == [1, 2, 3, 4, 5, 6]  # process 0 writes
  np.testing.assert_allclose([m["loss"] for m in a], [m["loss"] for m in b], rtol=1e-5)
  for m, n in zip(a, b):  # periodic evaluation on the global mesh, every process taking part
    assert ("eval/SAMPLE/Recall@5" in m) == (m["step"] % 3 == 0)
    if "eval/SAMPLE/Recall@5" in m:
      assert m["eval/SAMPLE/Recall@5"] == pytest.approx(n["eval/SAMPLE/Recall@5"])
  assert sorted(os.listdir(two / "checkpoints")) == ["6"]
  run = json.loads((two / "run.json").read_text())
  assert run["devices"] == 4 and run["global_batch"] == 8

  eval_args = ["preflmr_jax.evaluate", f"--config={SMOKE}", f"--checkpoint={two}",
               "--embedding_cache=off"]
  _run_two_processes(eval_args + [f"--output={two}/eval"], tmp_path, "eval")
  _run_one_process(eval_args + [f"--output={one}/eval"], tmp_path, "eval1")
  results = json.loads((two / "eval" / "results.json").read_text())["SAMPLE"]
  assert results["step"] == 6 and results["params"] == run["params_total"]
  assert results["train_flops"] == pytest.approx(6 * run["train_flops_per_step"])
  assert results["num_queries"] > 0 and 0 <= results["Recall@1"] <= 1
  split, single = _rankings(two / "eval"), _rankings(one / "eval")
  assert [r["passage_ids"] for r in split] == [r["passage_ids"] for r in single]
  np.testing.assert_allclose([r["scores"] for r in split], [r["scores"] for r in single],
                             rtol=1e-5)


@pytest.mark.slow
def test_sigterm_on_one_host_makes_every_host_save_the_same_step(tmp_path):
  workdir = tmp_path / "w"
  procs = _start_two_processes(
      ["preflmr_jax.main", f"--config={SMOKE}", f"--workdir={workdir}",
       "--config.num_train_steps=100000", "--config.log_every_steps=1",
       "--config.checkpoint_every_steps=100000"], tmp_path, "train")
  deadline = time.monotonic() + 900
  while not (workdir / "metrics.jsonl").exists() or len(_metrics(workdir)) < 3:
    assert time.monotonic() < deadline and all(p.poll() is None for p, _ in procs), [
        (tmp_path / f"train{i}.log").read_text()[-3000:] for i in range(2)]
    time.sleep(1)
  procs[1][0].send_signal(signal.SIGTERM)  # only the second host is preempted
  logs = _wait(procs, tmp_path, "train", status=exit_codes.PREEMPTED)
  steps = sorted(os.listdir(workdir / "checkpoints"))
  assert len(steps) == 1 and 3 <= int(steps[0]) < 100000, steps
  for log in logs:  # both hosts stopped at that step
    assert f"preempted: saved step {steps[0]}, rerun to resume" in log


@pytest.mark.slow
def test_hosts_with_their_own_workdir_stop_before_training(tmp_path):
  # A local path on a pod: each host has its own folder there. Here each process gets its own.
  procs = _start_two_processes(["preflmr_jax.main", f"--config={SMOKE}"], tmp_path, "train",
                               own_args=lambda i: [f"--workdir={tmp_path}/host{i}"])
  logs = _wait(procs, tmp_path, "train", status=exit_codes.USAGE)
  assert (f"error: --workdir={tmp_path}/host0: process(es) 1 of 2 do not see the run.json that "
          "process 0 wrote there for this start") in logs[0], logs[0][-3000:]
  assert not (tmp_path / "host0" / "checkpoints").exists() or not os.listdir(
      tmp_path / "host0" / "checkpoints")


@pytest.mark.slow
def test_a_run_json_process_0_cannot_write_stops_every_host(tmp_path):
  (tmp_path / "w" / layout.RUN_INFO).mkdir(parents=True)  # a folder where the file goes
  procs = _start_two_processes(["preflmr_jax.main", f"--config={SMOKE}", f"--workdir={tmp_path}/w"],
                               tmp_path, "train")
  codes = [proc.wait(timeout=600) for proc, _ in procs]  # neither waits on the other for ever
  for _, log in procs:
    log.close()
  logs = [(tmp_path / f"train{i}.log").read_text() for i in range(2)]
  assert codes == [exit_codes.USAGE, exit_codes.USAGE], logs
  assert f"error: {tmp_path}/w/run.json: is a folder, not a file" in logs[0], logs[0][-3000:]
  assert (f"error: --workdir={tmp_path}/w: process 0 could not write run.json there (its log says "
          "why)") in logs[1], logs[1][-3000:]
