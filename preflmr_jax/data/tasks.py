"""Tasks a user brings: their own image + question -> passage data, under their own name.

The data is in the M2KR layout (`<NAME>_data/` and `<NAME>_passages/` parquet, images under an
image root; `m2kr_build.py`). What the published tasks take from tables in the code, a user's
task takes from a small description, `<NAME>_task.json` in the source folder or `prepare`'s
`--task_type` / `--headline` flags:

  {"type": "vqa", "headline": "PseudoRecall@5"}

  type      which training instructions its queries draw (`instructions.py`): "vqa" (image +
            question), "caption", "image_to_document", or "text" (the dataset's own instruction)
  headline  the metric results.md puts first: "Recall@K" or "PseudoRecall@K" (needs answers)

`prepare` checks it and keeps it with the build (`<data_dir>/m2kr_tasks/<NAME>.json`), so training
(`--config.data.tasks=NAME`) and evaluation (`--tasks NAME`) read the same description.
"""

from __future__ import annotations

import json
import re
from typing import Any, Optional

from etils import epath

from preflmr_jax import storage
from preflmr_jax.data import instructions
from preflmr_jax.user_errors import ConfigError

TYPES = tuple(instructions.BY_TYPE)
FIELDS = ("type", "headline")
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]*$")
_HEADLINE = re.compile(r"(Recall|PseudoRecall)@[1-9][0-9]*$")
_BUILD_FOLDER = "m2kr_tasks"


def source_file(source_dir, name: str) -> epath.Path:
  """Where a task's description sits next to its data."""
  return epath.Path(source_dir) / f"{name}_task.json"


def check_name(name: str) -> str:
  if not _NAME.match(name):
    raise ValueError(f"task name {name!r}: use letters, digits, '_' and '-', starting with a "
                     "letter (it names the <NAME>_data / <NAME>_passages folders)")
  return name


def check(description: Any, where: str) -> dict[str, str]:
  """The description's fields, checked; errors name `where` (its file or flags) and the field."""
  if not isinstance(description, dict):
    raise ConfigError(f"{where}: expected a JSON object with {list(FIELDS)}")
  unknown = sorted(set(description) - set(FIELDS))
  if unknown:
    raise ConfigError(f"{where}: unknown field(s) {unknown}; expected {list(FIELDS)}")
  for field in FIELDS:
    if field not in description:
      raise ConfigError(f"{where}: missing field {field!r}")
  if description["type"] not in TYPES:
    raise ConfigError(f"{where}: type={description['type']!r} is not one of {TYPES}")
  if not isinstance(description["headline"], str) or not _HEADLINE.match(description["headline"]):
    raise ConfigError(f"{where}: headline={description['headline']!r} is not 'Recall@K' or "
                      "'PseudoRecall@K' (K >= 1)")
  return {field: description[field] for field in FIELDS}


def read(path: epath.Path) -> dict[str, str]:
  try:
    description = json.loads(path.read_text())
  except ValueError as e:
    raise ValueError(f"{path}: not JSON ({e})") from None
  return check(description, str(path))


def _build_file(data_dir, name: str) -> epath.Path:
  return storage.path(data_dir, "data_dir") / _BUILD_FOLDER / f"{name}.json"


def write(data_dir, name: str, description: dict[str, str]) -> None:
  path = _build_file(data_dir, check_name(name))
  storage.ensure_dir(path.parent, "--data_dir")
  storage.write_text(path, json.dumps(check(description, str(path)), indent=1))


def described(data_dir, name: str) -> Optional[dict[str, str]]:
  """The description `prepare` kept for task `name` in `data_dir`; None if there is none."""
  if not _NAME.match(name):
    return None
  path = _build_file(data_dir, name)
  return read(path) if path.exists() else None


__all__ = ["FIELDS", "TYPES", "check", "check_name", "described", "read", "source_file", "write"]
