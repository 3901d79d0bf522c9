r"""Builds M2KR tasks from the published parquet export into TFDS (array_record) datasets.

  python -m preflmr_jax.data.prepare --source /data/M2KR --image_root /data/M2KR_images \
      --tasks OVEN,OKVQA --data_dir /data/m2kr_tfds

`--source` holds `<PREFIX>_data/` and `<PREFIX>_passages/` per task (`m2kr.TASKS`: task names
or folder prefixes, any case; `--tasks all` for the ten published tasks). A task of your own
(any other name) is described by `<NAME>_task.json` in `--source` or by `--task_type` and
`--headline` (`tasks.py`). Prints what was
written (task, split, count) and what was skipped or converted (record ids and reasons; long
lists cut short), and writes the full report to `<data_dir>/m2kr_prepare_report.json`. Exits
non-zero only when no query split with records remains.

Re-running is safe: a task already built is kept as it is (TFDS does not rewrite an existing
version), and a note says when its source files (name, size, mtime) or options changed since.
`--overwrite` rebuilds the tasks given; `--rebuild_changed` rebuilds only the changed ones.
A build is written aside and renamed when complete, so an interrupted run leaves no partial
dataset (an overwritten one is deleted first). `--data_dir` may be a gs:// URL: each dataset is
built locally, then uploaded with its `dataset_info.json` last (what readers look for). `--source`
and `--image_root` are local folders.
"""

from __future__ import annotations

import collections
import json
import os
import sys
from typing import Optional, Sequence, TextIO

from preflmr_jax import storage
from preflmr_jax.data import m2kr, m2kr_build
from preflmr_jax.data import tasks as tasks_lib

PUBLISHED_TASKS = tuple(t for t in m2kr.TASKS if t != "SAMPLE")


def _reason_kind(reason: str) -> str:
  """The reason without its specifics ("corrupt image: OSError: ..." -> "corrupt image")."""
  return reason.split(":", 1)[0].strip()


def _print_issues(title: str, issues: Sequence[m2kr_build.Issue], out: TextIO,
                  max_listed: int):
  if not issues:
    return
  print(f"{title}: {len(issues)}", file=out)
  for kind, n in collections.Counter(_reason_kind(i.reason) for i in issues).most_common():
    print(f"  {n:>8d}  {kind}", file=out)
  for issue in issues[:max_listed]:
    print(f"  {issue}", file=out)
  if len(issues) > max_listed:
    print(f"  ... and {len(issues) - max_listed} more (all in the report file)", file=out)


def describe(source: str, name: str, task_type: Optional[str], headline: Optional[str]) -> dict:
  """A user's task's description: `<NAME>_task.json` in `source`, with the flags' values over
  its fields; a ValueError naming the file or flag and the field."""
  file = tasks_lib.source_file(source, tasks_lib.check_name(name))
  description = tasks_lib.read(file) if file.exists() else {}
  flags = {k: v for k, v in (("type", task_type), ("headline", headline)) if v}
  if not description and not flags:
    raise ValueError(f"unknown task {name!r}: not one of the published M2KR tasks "
                     f"{list(PUBLISHED_TASKS)}; to prepare a task of your own, describe it in "
                     f"{file} ({{\"type\": ..., \"headline\": ...}}) or with --task_type and "
                     "--headline (tasks.py)")
  where = " and ".join(([str(file)] if description else []) +
                       (["--task_type / --headline"] if flags else []))
  return tasks_lib.check({**description, **flags}, where)


def run(source: str, image_root: Optional[str], tasks: Sequence[str], data_dir: str, *,
        overwrite: bool = False, rebuild_changed: bool = False,
        max_image_side: Optional[int] = m2kr_build.DEFAULT_MAX_IMAGE_SIDE,
        num_workers: Optional[int] = None, out: Optional[TextIO] = None,
        max_listed: int = 20, task_type: Optional[str] = None,
        headline: Optional[str] = None) -> int:
  """The command: builds, prints the summary, writes the report; returns the exit code."""
  out = out or sys.stdout
  try:
    data_dir = storage.path(data_dir, "--data_dir")
  except ValueError as e:
    print(f"error: {e}", file=out)
    return 2
  for flag, folder in (("--source", source), ("--image_root", image_root)):
    if folder is not None and storage.is_remote(folder):
      print(f"error: {flag} {folder!r}: must be a local folder (copy it, or mount the bucket "
            "with gcsfuse)", file=out)
      return 2
  if not os.path.isdir(source):
    print(f"error: --source {source!r} is not a folder", file=out)
    return 2
  if image_root is not None and not os.path.isdir(image_root):
    print(f"error: --image_root {image_root!r} is not a folder", file=out)
    return 2
  names = list(PUBLISHED_TASKS if [t.lower() for t in tasks] == ["all"] else tasks)
  described = {}
  try:
    for i, name in enumerate(names):
      try:
        names[i] = m2kr.canonical_task(name)
      except ValueError:  # a task of the user's own: it needs a description
        described[name.strip()] = describe(source, name.strip(), task_type, headline)
        names[i] = name.strip()
  except ValueError as e:
    print(f"error: {e}", file=out)
    return 2
  if image_root is None:
    print("warning: no --image_root: queries with an img_path will be skipped", file=out)
  try:
    storage.ensure_dir(data_dir, "--data_dir")
    for name, description in described.items():
      tasks_lib.write(data_dir, name, description)
  except OSError as e:
    print(f"error: {e}", file=out)
    return 2
  report = m2kr_build.build(source, image_root, names, data_dir, overwrite=overwrite,
                      rebuild_changed=rebuild_changed, max_image_side=max_image_side,
                      num_workers=num_workers)

  print(f"\nM2KR in {data_dir}:", file=out)
  for w in report.written:
    state = "reused" if w.get("reused") else "written"
    print(f"  {w['task']:<9s} {w['kind']:<8s} {w['split']:<15s} {w['count']:>10d}  {state}",
          file=out)
  if not report.written:
    print("  nothing", file=out)
  for note in report.notes:
    print(f"note: {note}", file=out)
  _print_issues("skipped records", report.skipped, out, max_listed)
  _print_issues("converted records", report.converted, out, max_listed)

  path = data_dir / m2kr.REPORT_FILE
  payload = {"source": os.path.abspath(source),
             "image_root": None if image_root is None else os.path.abspath(image_root),
             "tasks": names, **report.to_json()}
  storage.write_text(path, json.dumps(payload, indent=1))
  print(f"report: {path}", file=out)
  if not report.usable:
    print("error: no usable query split (see the notes above)", file=out)
    return 1
  return 0


def main(argv):
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  sys.exit(run(f.source, f.image_root, f.tasks, f.data_dir, overwrite=f.overwrite,
               rebuild_changed=f.rebuild_changed, max_image_side=f.max_image_side or None,
               num_workers=f.num_workers, task_type=f.task_type, headline=f.headline))


if __name__ == "__main__":
  from absl import flags  # pylint: disable=g-import-not-at-top
  from preflmr_jax import cli  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("source", None, "Folder of the parquet export (<PREFIX>_data/, ...).")
  flags.DEFINE_string("image_root", None, "Folder that img_path is relative to "
                      "(may be left out for text-only tasks).")
  flags.DEFINE_list("tasks", None, f"Tasks, comma-separated, or 'all': {list(m2kr.TASKS)}.")
  flags.DEFINE_string("data_dir", None, "TFDS data folder to write to.")
  flags.DEFINE_bool("overwrite", False, "Rebuild tasks that are already built.")
  flags.DEFINE_bool("rebuild_changed", False,
                    "Rebuild tasks whose source files or options changed since they were built.")
  flags.DEFINE_integer("max_image_side", m2kr_build.DEFAULT_MAX_IMAGE_SIDE,
                       "Downscale longer images to this side (0: no limit).", lower_bound=0)
  flags.DEFINE_integer("num_workers", None, "Image-checking threads (default min(8, CPUs)).",
                       lower_bound=1)
  flags.DEFINE_enum("task_type", None, list(tasks_lib.TYPES),
                    "For a task of your own (not a published name): its type.")
  flags.DEFINE_string("headline", None, "For a task of your own: its headline metric, "
                      "Recall@K or PseudoRecall@K.")
  for _name in ("source", "tasks", "data_dir"):
    flags.mark_flag_as_required(_name)
  cli.run(main, outputs=["data_dir"])
