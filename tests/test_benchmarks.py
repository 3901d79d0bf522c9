"""The benchmark scripts run end to end on small shapes, so that they do not rot between the runs
that fill RESULTS*.md. Their timings are never asserted; what they measure is checked elsewhere."""

import json
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run(args, env, timeout=900):
  out = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=timeout)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  return out.stdout


@pytest.mark.slow
def test_run_quick_without_the_release_shapes(tmp_path, one_device_env):
  results = tmp_path / "RESULTS.md"
  stdout = _run(["benchmarks/run.py", "--quick", "--skip", "ViT-B", "--json", "--results",
                 str(results)], one_device_env)
  summary = json.loads(stdout.strip().splitlines()[-1])
  for key in ("encoder_speedup_vs_pytorch", "encoder_fraction_of_matmul",
              "maxsim_fraction_of_matmul", "maxsim_speedup_vs_colbert"):
    assert key in summary
  assert summary["maxsim_fraction_of_matmul"] > 0 and summary["train_queries_per_s"]["train tiny"] > 0
  text = results.read_text()
  assert text.startswith("# Benchmark results") and "maxsim_chunked(" in text


@pytest.mark.slow
def test_quick_runs_never_rewrite_the_committed_results(one_device_env):
  committed = ROOT / "benchmarks" / "RESULTS.md"
  before = committed.read_bytes()
  out = subprocess.run([sys.executable, "benchmarks/run.py", "--quick", "--write-results"], cwd=ROOT,
                       env=one_device_env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 2 and "--write-results records a full run" in out.stderr, out.stderr
  assert committed.read_bytes() == before


@pytest.mark.slow
def test_gpu_script_on_cpu_with_tiny_shapes(tmp_path, one_device_env):
  env = {**one_device_env, "JAX_PLATFORMS": "cpu"}
  _run(["benchmarks/gpu.py", "--tiny", "--quick", "--skip", "encode", "--profile", "8:base",
        "--train_rows", "8:base,8:cudnn,8:scan_graphs", "--compile_group", "2",
        "--json", str(tmp_path / "gpu.json"), "--md", str(tmp_path / "gpu.md")], env)
  r = json.loads((tmp_path / "gpu.json").read_text())
  rows = {row["name"]: row for row in r["train"]}
  assert sorted(rows) == ["8:base", "8:cudnn", "8:scan_graphs"]  # from two groups
  assert rows["8:base"]["step_ms"] > 0 and rows["8:base"]["loss"] > 0
  assert "cuDNN" in rows["8:cudnn"]["error"]  # no GPU here: recorded, and the run went on
  # XLA accepts the GPU options on any backend (a misspelt type is refused at compile).
  assert rows["8:scan_graphs"]["step_ms"] > 0 and "WHILE" in rows["8:scan_graphs"][
      "xla_gpu_enable_command_buffer"]
  assert [m["chunk_size"] for m in r["maxsim"]] and r["copy"][0]["gb_per_s"] > 0
  assert [m["ms"] > 0 for m in r["maxsim"] if m["name"].endswith("pallas")] == [True]
  assert r["profile"]["row"] == "8:base" and r["profile"]["host_top"][0]["ms"] > 0
  assert "Train step" in (tmp_path / "gpu.md").read_text()


@pytest.mark.slow
def test_scan_layers_benchmark_on_the_tiny_config(one_device_env):
  stdout = _run(["benchmarks/scan_layers.py", "--quick", "--skip", "tpu,gpu", "--cpu_config",
                 "configs/tiny.py"], one_device_env)
  rows = json.loads(stdout.strip().splitlines()[-1])["rows"]
  assert [r["scan"] for r in rows] == [False, True]
  assert all(r["compile_s"] > 0 and r["step_ms"] > 0 for r in rows)
  assert re.search(r"\| compile \d+\.\d\dx, step \d+\.\d\dx", stdout.splitlines()[-2])


@pytest.mark.slow
def test_search_benchmark_on_a_small_corpus(tmp_path, one_device_env):
  """Exact search and our index on 300 documents (colbert-ai is not installed here): every row
  has its figures."""
  args = ["benchmarks/search.py", "--sizes", "300", "--query_lens", "24", "--queries", "2",
          "--nbits", "2", "--work_dir", str(tmp_path)]
  stdout = _run(args, one_device_env)
  rows = [line for line in stdout.splitlines() if "exact (fp32)" in line or "jax plaid" in line]
  assert len(rows) == 4, stdout  # exact, then k=10, k=100 and the wide setting
  recalls = [float(x) for line in rows for x in re.findall(r"\s(\d\.\d{3})\s", line)]
  assert recalls[:2] == [1.0, 1.0] and all(0 < r <= 1 for r in recalls), rows
  assert re.search(r"index bytes, 2 bits: 0\.\d+ of the fp16 tokens", stdout)
  assert "colbert_score" in stdout or "colbert-ai not importable" in stdout
  assert (tmp_path / "jax300_nbits2.plaid.npz").exists()  # kept for the next run
