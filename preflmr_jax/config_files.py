"""Config files as code: `path[:arg]` -> `get_config(arg)`, as `ml_collections.config_flags` reads them.

For programs that take a config without absl flags (tests, the sweep launcher, config files built on
other config files). Relative paths resolve against the working directory, then the repository root
(the folder that holds `configs/`), so `configs/tiny.py` works from anywhere in a checkout.
"""

from __future__ import annotations

import importlib.util
import os
import types
from typing import Any, Mapping, Optional

import ml_collections

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def resolve(path: str) -> str:
  for candidate in (path, os.path.join(REPO_ROOT, path)):
    if os.path.isfile(candidate):
      return os.path.abspath(candidate)
  raise FileNotFoundError(f"config file {path!r} not found (also looked under {REPO_ROOT})")


def load_module(path: str) -> types.ModuleType:
  """Executes the config file at `path` as a fresh module (never cached: files may change)."""
  path = resolve(path)
  name = "preflmr_config_" + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not callable(getattr(module, "get_config", None)):
    raise ValueError(f"config file {path} defines no get_config()")
  return module


def apply_overrides(config: ml_collections.ConfigDict,
                    overrides: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """Sets dotted keys (`{"mesh.fsdp": 4}`) in place; unknown keys fail, naming the key."""
  for key, value in overrides.items():
    node, parts = config, key.split(".")
    for i, part in enumerate(parts):
      if not isinstance(node, (ml_collections.ConfigDict, dict)) or part not in node:
        raise KeyError(f"config key {'.'.join(parts[:i + 1])!r} does not exist (override {key!r})")
      if i < len(parts) - 1:
        node = node[part]
    node[parts[-1]] = value
  return config


def load_config(spec: str, overrides: Optional[Mapping[str, Any]] = None
                ) -> ml_collections.ConfigDict:
  """`"configs/stage1.py:vit_l"` -> that file's `get_config("vit_l")`, then `overrides` applied."""
  path, _, arg = spec.partition(":")
  config = load_module(path).get_config(*([arg] if arg else []))
  return apply_overrides(config, overrides or {})
