"""The scaling-law tool: power-law fits of synthetic sweeps, its outputs, its errors and its CLI."""

import json
import math

import numpy as np
import pytest

from preflmr_jax.tools import scaling_law

PARAMS = [1e4, 3e4, 1e5, 3e5, 1e6, 1e7]


def _write(sweep, name, results):
  path = sweep / name / "eval" / "results.json"
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(results if isinstance(results, str) else json.dumps(results))
  return path


def _entry(value, params, train_flops=None, headline="Recall@5"):
  entry = {headline: value, "headline": headline, "num_queries": 40, "checkpoint": "/ckpt",
           "step": 30, "split": "test", "params": params}
  if train_flops is not None:
    entry["train_flops"] = train_flops
  return entry


def _sweep(tmp_path, noise=0.0, seed=0):
  """SAMPLE: metric = 0.01 * params^0.25 and train_flops = 1e3 * params^2, so 0.125 vs compute;
  OKVQA: error = 2 * params^-0.1."""
  rng = np.random.default_rng(seed)
  for i, n in enumerate(PARAMS):
    jitter = np.exp(noise * rng.standard_normal(2))
    _write(tmp_path, f"p{i}", {
        "SAMPLE": _entry(0.01 * n**0.25 * jitter[0], int(n), 1e3 * n**2),
        "OKVQA": _entry(1 - 2 * n**-0.1 * jitter[1], int(n), 1e3 * n**2, headline="Recall@10")})
  return tmp_path


def _fits(points, target="metric"):
  return {(f.task, f.x_axis): f for f in scaling_law.fit_sweep(points, target)}


def test_fit_power_law_exact():
  x = np.array([1.0, 10.0, 100.0, 1000.0])
  fit = scaling_law.fit_power_law(x, 3.0 * x**-0.5)
  assert fit.a == pytest.approx(3.0) and fit.b == pytest.approx(-0.5) and fit.r2 == pytest.approx(1)
  assert fit.n == 4
  with pytest.raises(ValueError, match="positive"):
    scaling_law.fit_power_law([1.0, 2.0], [0.0, 1.0])
  with pytest.raises(ValueError, match="distinct"):
    scaling_law.fit_power_law([5.0, 5.0], [1.0, 2.0])


def test_recovers_exponents_vs_params_and_compute(tmp_path):
  paths = scaling_law.find_results(_sweep(tmp_path))
  assert [p.parent.parent.name for p in paths] == [f"p{i}" for i in range(len(PARAMS))]
  fits = _fits(scaling_law.load_results(paths))
  vs_params, vs_flops = fits["SAMPLE", "params"].fit, fits["SAMPLE", "train_flops"].fit
  assert abs(vs_params.b - 0.25) < 1e-3 and vs_params.a == pytest.approx(0.01, rel=1e-2)
  assert abs(vs_flops.b - 0.125) < 1e-3 and vs_params.r2 > 0.9999 and vs_flops.n == len(PARAMS)
  assert fits["SAMPLE", "params"].metric == "Recall@5"
  assert fits["OKVQA", "params"].metric == "Recall@10"


def test_recovers_exponent_with_noise(tmp_path):
  fits = _fits(scaling_law.load_results(scaling_law.find_results(_sweep(tmp_path, noise=0.01))))
  assert abs(fits["SAMPLE", "params"].fit.b - 0.25) < 0.02
  assert abs(fits["SAMPLE", "train_flops"].fit.b - 0.125) < 0.01
  assert 0.98 < fits["SAMPLE", "params"].fit.r2 < 1


def test_target_error(tmp_path):
  points = scaling_law.load_results(scaling_law.find_results(_sweep(tmp_path)))
  fits = _fits(points, target="error")
  assert abs(fits["OKVQA", "params"].fit.b + 0.1) < 1e-3
  assert fits["OKVQA", "params"].fit.a == pytest.approx(2.0, rel=1e-2)
  assert abs(fits["OKVQA", "train_flops"].fit.b + 0.05) < 1e-3
  assert fits["OKVQA", "params"].target == "error"
  with pytest.raises(ValueError, match="target"):
    scaling_law.fit_sweep(points, target="loss")


def test_nonpositive_metric_is_dropped_and_reported(tmp_path):
  for i, n in enumerate(PARAMS[:4]):
    _write(tmp_path, f"p{i}", {"SAMPLE": _entry(0.0 if i == 0 else 0.01 * n**0.25, int(n))})
  points = scaling_law.load_results(scaling_law.find_results(tmp_path))
  fits = _fits(points)
  vs_params = fits["SAMPLE", "params"]
  assert vs_params.fit.n == 3 and abs(vs_params.fit.b - 0.25) < 1e-3
  assert vs_params.names == ["p1", "p2", "p3"] and vs_params.dropped == ["p0: Recall@5 = 0 <= 0"]
  # No train_flops anywhere: the compute fit is not possible, with the reason.
  assert fits["SAMPLE", "train_flops"].fit is None
  assert fits["SAMPLE", "train_flops"].reason == "no point has train_flops"
  text = scaling_law.markdown(points, list(fits.values()))
  assert "dropped p0: Recall@5 = 0 <= 0" in text and "no fit: no point has train_flops" in text
  assert "nan" not in json.dumps(scaling_law.summary(list(fits.values()))).lower()


def test_missing_train_flops_skips_point_and_too_few_points(tmp_path):
  _write(tmp_path, "small", {"SAMPLE": _entry(0.3, 1000, 1e9)})
  _write(tmp_path, "large", {"SAMPLE": _entry(0.5, 2000)})
  fits = _fits(scaling_law.load_results(scaling_law.find_results(tmp_path)))
  assert fits["SAMPLE", "params"].fit.n == 2
  flops = fits["SAMPLE", "train_flops"]
  assert flops.fit is None and flops.dropped == ["large: no train_flops"]
  assert "need >= 2" in flops.reason


def test_outputs_written(tmp_path):
  sweep = _sweep(tmp_path / "sweep")
  points = scaling_law.load_results(scaling_law.find_results(sweep))
  fits = scaling_law.fit_sweep(points)
  png = tmp_path / "scaling_law.png"
  scaling_law.plot(fits, png)
  assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n") and png.stat().st_size > 1000
  text = scaling_law.markdown(points, fits)
  assert "| SAMPLE | params | Recall@5 | 0.2500 |" in text
  assert "| point | params | train_flops | SAMPLE (Recall@5) | OKVQA (Recall@10) |" in text
  assert "| p0 | 10,000 | 1e+11 |" in text


@pytest.mark.parametrize("content,match", [
    ("{not json", "not valid JSON"),
    ([1, 2], "JSON object of task"),
    ({"SAMPLE": 3}, "expected an object of metrics"),
    ({"SAMPLE": {"Recall@5": 0.5, "params": 10}}, "has no 'headline'"),
    ({"SAMPLE": {"headline": "Recall@5", "params": 10}}, "headline metric 'Recall@5' has no value"),
    ({"SAMPLE": {"headline": "Recall@5", "Recall@5": "high", "params": 10}}, "Recall@5='high'"),
    ({"SAMPLE": {"headline": "Recall@5", "Recall@5": 0.5, "params": 10, "train_flops": "x"}},
     "train_flops='x' is not a finite number"),
])
def test_malformed_results_name_the_file(tmp_path, content, match):
  path = _write(tmp_path, "bad", content if isinstance(content, str) else json.dumps(content))
  with pytest.raises(ValueError, match=match) as e:
    scaling_law.load_results(scaling_law.find_results(tmp_path))
  assert str(path) in str(e.value)


def test_missing_params_names_file_and_task(tmp_path):
  path = _write(tmp_path, "p0", {"SAMPLE": {"headline": "Recall@5", "Recall@5": 0.5}})
  points = scaling_law.load_results([path])
  with pytest.raises(ValueError, match="task 'SAMPLE' has no 'params'") as e:
    scaling_law.fit_sweep(points)
  assert str(path) in str(e.value)


def test_empty_or_missing_dir(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"\*/eval/results.json") as e:
    scaling_law.find_results(tmp_path)
  assert str(tmp_path) in str(e.value)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    scaling_law.find_results(tmp_path / "nope")
  with pytest.raises(FileNotFoundError, match="nope.json"):
    scaling_law.load_results([tmp_path / "nope.json"])


def test_cli_writes_outputs_and_prints_json_last(tmp_path, cli):
  sweep, out = _sweep(tmp_path / "sweep"), tmp_path / "out"
  run = cli("preflmr_jax.tools.scaling_law", "--sweep_dir", str(sweep), "--out", str(out), "--target", "error")
  assert run.returncode == 0, run.stderr[-3000:]
  result = json.loads(run.stdout.strip().splitlines()[-1])
  assert result["target"] == "error"
  fit = {(f["task"], f["x_axis"]): f["fit"] for f in result["fits"]}["OKVQA", "params"]
  assert math.isclose(fit["b"], -0.1, abs_tol=1e-3)
  assert "| task | x axis |" in run.stdout
  assert json.loads((out / "scaling_law.json").read_text()) == result
  assert (out / "scaling_law.md").read_text().strip() and (out / "scaling_law.png").stat().st_size

  # Explicit files instead of a sweep dir.
  files = ",".join(str(p) for p in scaling_law.find_results(sweep))
  run = cli("preflmr_jax.tools.scaling_law", "--results", files, "--out", str(tmp_path / "out2"))
  assert run.returncode == 0, run.stderr[-3000:]
  assert len(json.loads(run.stdout.strip().splitlines()[-1])["fits"]) == 4


def test_cli_empty_dir_fails_with_message(tmp_path, cli):
  run = cli("preflmr_jax.tools.scaling_law", "--sweep_dir", str(tmp_path))
  assert run.returncode != 0
  assert "no results files found" in run.stderr and "*/eval/results.json" in run.stderr
