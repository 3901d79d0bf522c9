"""Two JAX processes on this machine (4 simulated CPU devices each, collectives over gloo), started
the way `launch/gpu.py hosts` starts them: the trainer and the eval binary run multi-host end to end
(global batches from each host's rows, one Orbax checkpoint, process 0 writing the outputs)."""

import json
import os
import socket
import subprocess
import sys

import pytest

from launch import shell

SMOKE = "configs/scaling.py:smoke"


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _run_two_processes(argv, tmp_path, tag):
  port = _free_port()
  procs = []
  for i in range(2):
    env = dict(os.environ, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
               JAX_PROCESS_ID=str(i))
    env["XLA_FLAGS"] = env["XLA_FLAGS"].replace("device_count=8", "device_count=4")
    log = open(tmp_path / f"{tag}{i}.log", "w")
    procs.append((subprocess.Popen([sys.executable, "-m", *argv, "--config.distributed=True"],
                                   cwd=shell.REPO_ROOT, env=env, stdout=log,
                                   stderr=subprocess.STDOUT), log))
  for i, (proc, log) in enumerate(procs):
    try:
      code = proc.wait(timeout=1200)
    finally:
      log.close()
    assert code == 0, (tmp_path / f"{tag}{i}.log").read_text()[-4000:]
  return [(tmp_path / f"{tag}{i}.log").read_text() for i in range(2)]


@pytest.mark.slow
def test_two_processes_train_then_evaluate(tmp_path):
  workdir = tmp_path / "w"
  logs = _run_two_processes(
      ["preflmr_jax.main", f"--config={SMOKE}", f"--workdir={workdir}",
       "--config.num_train_steps=6", "--config.log_every_steps=3",
       "--config.checkpoint_every_steps=6", "--config.optimizer.warmup_steps=1"], tmp_path, "train")
  assert all("JAX process %d/2, 4 local devices, 8 in all" % i in log for i, log in enumerate(logs))
  steps = [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert steps == [3, 6]  # written once, by process 0
  assert sorted(os.listdir(workdir / "checkpoints")) == ["6"]
  run = json.loads((workdir / "run.json").read_text())
  assert run["devices"] == 8 and run["global_batch"] == 8

  _run_two_processes(["preflmr_jax.evaluate", f"--config={SMOKE}", f"--checkpoint={workdir}",
                      f"--output={workdir}/eval"], tmp_path, "eval")
  results = json.loads((workdir / "eval" / "results.json").read_text())["SAMPLE"]
  assert results["step"] == 6 and results["params"] == run["params_total"]
  assert results["train_flops"] == pytest.approx(6 * run["train_flops_per_step"])
  assert results["num_queries"] > 0 and 0 <= results["Recall@1"] <= 1
