"""Power-law fits of a sweep's headline metrics against parameters and training compute.

  python -m preflmr_jax.tools.scaling_law --sweep_dir DIR [--out DIR] [--target metric|error]
  python -m preflmr_jax.tools.scaling_law --results a.json,b.json --out DIR

Reads every `DIR/<point>/eval/results.json` (or the --results files), fits `y = a * x^b` by least
squares in log-log space per task, with y the headline metric (or `1 - metric` for --target=error)
and x the parameter count or the training FLOPs, and writes `scaling_law.png`, `scaling_law.md` and
`scaling_law.json` to --out (default: the sweep dir). Prints the markdown, then one JSON object (the
fits) as the last line of stdout. Folders and files may be local or gs:// URLs.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
from typing import Sequence

import numpy as np
from absl import app, flags
from etils import epath

from preflmr_jax import cli, storage, workdir
from preflmr_jax.user_errors import MissingPath

PATTERN = f"*/{workdir.EVAL}/{workdir.RESULTS}"  # <sweep dir>/<point workdir>/eval/results.json
X_AXES = {"params": "parameters", "train_flops": "training compute (FLOPs)"}
TARGETS = ("metric", "error")


def define_flags():
  """Defined only when run as a program, so that importing the module defines no absl flags."""
  flags.DEFINE_string("sweep_dir", None, f"Sweep folder; reads {PATTERN} under it.")
  flags.DEFINE_list("results", None, "Explicit results.json files (instead of --sweep_dir).")
  flags.DEFINE_string("out", None, "Output folder (default: --sweep_dir).")
  flags.DEFINE_enum("target", "metric", TARGETS, "Fit the metric, or the error 1 - metric.")


@dataclasses.dataclass(frozen=True)
class Point:
  """One task's result at one sweep point."""
  name: str  # the sweep point (its folder name)
  path: str  # the results.json it came from
  task: str
  metric: str  # the headline metric's name
  value: float
  params: float | None
  train_flops: float | None


@dataclasses.dataclass(frozen=True)
class Fit:
  a: float
  b: float
  r2: float  # in log space
  n: int


@dataclasses.dataclass(frozen=True)
class TaskFit:
  """The fit of one task's headline metric against one x axis; `fit` is None when not possible."""
  task: str
  x_axis: str  # a key of X_AXES
  metric: str
  target: str
  fit: Fit | None
  reason: str | None  # why there is no fit
  names: list[str]  # the points fitted
  x: list[float]
  y: list[float]
  dropped: list[str]  # "point: why", points left out of this fit


def find_results(sweep_dir: str) -> list[epath.Path]:
  """The sweep's results files, sorted; FileNotFoundError when there are none."""
  root = storage.path(sweep_dir, "--sweep_dir")
  if not root.is_dir():
    raise MissingPath(f"sweep dir {root} does not exist or is not a directory")
  paths = sorted(root.glob(PATTERN))
  if not paths:
    raise MissingPath(f"no results files found: nothing matches {root / PATTERN}")
  return paths


def _number(path, task, key, value, optional=False) -> float | None:
  if value is None and optional:
    return None
  # bool is an int in Python, but true/false here is a writer's bug, not a count.
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
    raise ValueError(f"{path}: task {task!r}: {key}={value!r} is not a finite number")
  return float(value)


def load_results(paths: Sequence[str | os.PathLike]) -> list[Point]:
  """One Point per (results file, task); errors name the file and the problem."""
  if not paths:
    raise MissingPath("no results files given")
  points, seen = [], {}
  for path in (storage.path(p, "--results") for p in paths):
    if not path.is_file():
      raise MissingPath(f"{path}: results file not found")
    # The sweep layout is <point>/eval/results.json; a bare results.json is named by its folder.
    name = path.parent.parent.name if path.parent.name == workdir.EVAL else path.parent.name
    if name in seen:
      raise ValueError(f"{path}: point name {name!r} is also that of {seen[name]}")
    seen[name] = path
    try:
      results = json.loads(path.read_text())
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(results, dict) or not results:
      raise ValueError(f"{path}: expected a non-empty JSON object of task -> results")
    for task, entry in results.items():
      if not isinstance(entry, dict):
        raise ValueError(f"{path}: task {task!r}: expected an object of metrics, got {entry!r}")
      metric = entry.get("headline")
      if not isinstance(metric, str):
        raise ValueError(f"{path}: task {task!r} has no 'headline' metric name")
      if metric not in entry:
        raise ValueError(f"{path}: task {task!r}: headline metric {metric!r} has no value")
      points.append(Point(
          name=name, path=str(path), task=task, metric=metric,
          value=_number(path, task, metric, entry[metric]),
          params=_number(path, task, "params", entry.get("params"), optional=True),
          train_flops=_number(path, task, "train_flops", entry.get("train_flops"), optional=True)))
  return points


def fit_power_law(x: Sequence[float], y: Sequence[float]) -> Fit:
  """Least-squares fit of log y = log a + b log x; needs positive values and >= 2 distinct x."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  if x.shape != y.shape or x.ndim != 1:
    raise ValueError(f"x and y must be 1-D and the same length, got {x.shape} and {y.shape}")
  if np.any(x <= 0) or np.any(y <= 0):
    raise ValueError("x and y must be positive (the fit is in log space)")
  if len(np.unique(x)) < 2:
    raise ValueError("need at least 2 distinct x values")
  lx, ly = np.log(x), np.log(y)
  b, log_a = np.polyfit(lx, ly, 1)
  ss_res = float(np.sum((ly - (log_a + b * lx)) ** 2))
  ss_tot = float(np.sum((ly - ly.mean()) ** 2))
  # A flat y is fitted exactly by b = 0; call that R^2 = 1 rather than 0/0.
  r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0
  return Fit(a=float(math.exp(log_a)), b=float(b), r2=r2, n=len(x))


def fit_sweep(points: Sequence[Point], target: str = "metric") -> list[TaskFit]:
  """Per task (in first-seen order), a fit against each of X_AXES."""
  if target not in TARGETS:
    raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
  by_task: dict[str, list[Point]] = {}
  for p in points:
    by_task.setdefault(p.task, []).append(p)
  fits = []
  for task, group in by_task.items():
    metric = group[0].metric
    for p in group:
      if p.metric != metric:  # mixing metrics would make the fit meaningless
        raise ValueError(f"{p.path}: task {task!r} headline is {p.metric!r}, but {group[0].path} "
                         f"has {metric!r}")
    y_name = metric if target == "metric" else f"1 - {metric}"
    for axis in X_AXES:
      kept, dropped = [], []
      for p in group:
        x = getattr(p, axis)
        y = p.value if target == "metric" else 1.0 - p.value
        if x is None and axis == "params":
          raise ValueError(f"{p.path}: task {task!r} has no 'params' (needed for the fit against "
                           f"parameters)")
        if x is None:
          dropped.append(f"{p.name}: no {axis}")
        elif x <= 0:
          dropped.append(f"{p.name}: {axis} = {x:g} <= 0")
        elif y <= 0:
          dropped.append(f"{p.name}: {y_name} = {y:g} <= 0")
        else:
          kept.append((p.name, x, y))
      names, xs, ys = map(list, zip(*kept)) if kept else ([], [], [])
      fit, reason = None, None
      if len(set(xs)) >= 2:
        fit = fit_power_law(xs, ys)
      elif all(getattr(p, axis) is None for p in group):
        reason = f"no point has {axis}"
      else:
        reason = f"{len(xs)} usable point(s) with {len(set(xs))} distinct {axis} (need >= 2)"
      fits.append(TaskFit(task, axis, metric, target, fit, reason, names, xs, ys, dropped))
  return fits


def plot(fits: Sequence[TaskFit], path: str | os.PathLike) -> None:
  """Log-log plot: one subplot per x axis, per task its points and fitted line."""
  # Lazy: the module (and its tests of the fits) need no matplotlib. Agg via its own canvas,
  # so no global pyplot state or display is touched.
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top

  fig = Figure(figsize=(6 * len(X_AXES), 4.5), layout="constrained")
  FigureCanvasAgg(fig)
  for ax, (axis, label) in zip(fig.subplots(1, len(X_AXES), squeeze=False)[0], X_AXES.items()):
    series = [f for f in fits if f.x_axis == axis and f.x]
    if not series:
      ax.text(0.5, 0.5, f"no points with {axis}", ha="center", va="center", transform=ax.transAxes)
      ax.set_title(f"vs {label}")
      continue
    for f in series:
      dots = ax.scatter(f.x, f.y)
      if f.fit is None:
        dots.set_label(f"{f.task} {f.metric} (no fit)")
        continue
      line = np.geomspace(min(f.x), max(f.x), 50)
      ax.plot(line, f.fit.a * line ** f.fit.b, color=dots.get_facecolor()[0],
              label=f"{f.task} {f.metric}: b = {f.fit.b:.3f} (R² {f.fit.r2:.2f})")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(label)
    ax.set_ylabel("headline metric" if series[0].target == "metric" else "1 - headline metric")
    ax.set_title(f"vs {label}")
    ax.legend(fontsize="small")
  image = io.BytesIO()
  fig.savefig(image, format="png", dpi=120)
  storage.write_bytes(path, image.getvalue())


def markdown(points: Sequence[Point], fits: Sequence[TaskFit]) -> str:
  """The fits table, then one row per sweep point."""
  target = fits[0].target if fits else "metric"
  lines = [f"## Power-law fits (y = a * x^b, target: {target})", "",
           "| task | x axis | metric | exponent b | coefficient a | R^2 | points | note |",
           "| --- | --- | --- | --- | --- | --- | --- | --- |"]
  for f in fits:
    note = "; ".join(([f"no fit: {f.reason}"] if f.reason else [])
                     + [f"dropped {d}" for d in f.dropped])
    y_name = f.metric if f.target == "metric" else f"1 - {f.metric}"
    if f.fit:
      cells = f"{f.fit.b:.4f} | {f.fit.a:.4g} | {f.fit.r2:.4f}"
    else:
      cells = "- | - | -"
    lines.append(f"| {f.task} | {f.x_axis} | {y_name} | {cells} | {len(f.x)} | {note} |")
  tasks = list(dict.fromkeys((p.task, p.metric) for p in points))
  rows: dict[str, dict] = {}
  for p in points:
    row = rows.setdefault(p.name, {"params": p.params, "train_flops": p.train_flops})
    row[p.task] = p.value
  fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
  lines += ["", "## Points", "",
            "| point | params | train_flops | " + " | ".join(f"{t} ({m})" for t, m in tasks) + " |",
            "| --- " * (3 + len(tasks)) + "|"]
  for name, row in rows.items():
    values = " | ".join(fmt(row.get(t), ".4f") for t, _ in tasks)
    lines.append(f"| {name} | {fmt(row['params'], ',.0f')} | {fmt(row['train_flops'], '.4g')} | "
                 f"{values} |")
  return "\n".join(lines) + "\n"


def summary(fits: Sequence[TaskFit]) -> dict:
  """The fits as JSON-able data (also the last stdout line)."""
  return {"target": fits[0].target if fits else None,
          "fits": [dataclasses.asdict(f) for f in fits]}


def main(argv):
  del argv  # cli.run refuses extra arguments
  FLAGS = flags.FLAGS  # pylint: disable=invalid-name
  if bool(FLAGS.sweep_dir) == bool(FLAGS.results):
    raise app.UsageError("give exactly one of --sweep_dir or --results")
  if not (FLAGS.out or FLAGS.sweep_dir):
    raise app.UsageError("--out is required with --results")
  try:
    out = storage.path(FLAGS.out or FLAGS.sweep_dir, "--out")
    paths = find_results(FLAGS.sweep_dir) if FLAGS.sweep_dir else FLAGS.results
    points = load_results(paths)
    fits = fit_sweep(points, FLAGS.target)
  except (ValueError, FileNotFoundError) as e:
    raise app.UsageError(str(e)) from e
  storage.ensure_dir(out, "--out")
  text = markdown(points, fits)
  storage.write_text(out / "scaling_law.md", text)
  storage.write_text(out / "scaling_law.json", json.dumps(summary(fits), indent=1) + "\n")
  plot(fits, out / "scaling_law.png")
  print(text)
  print(json.dumps(summary(fits)))


if __name__ == "__main__":
  define_flags()
  cli.run(main, outputs=["out"])
