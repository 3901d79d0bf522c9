"""Config files as code: `path[:arg]` -> `get_config(arg)`, as `ml_collections.config_flags` reads them.

For programs that take a config without absl flags (tests, the sweep launcher). Relative paths
resolve against the working directory, then the repository root (the folder that holds `configs/`),
so `configs/tiny.py` works from anywhere in a checkout. `parse_arg` reads a config file's argument.
"""

from __future__ import annotations

import importlib.util
import os
import types
from typing import Any, Mapping, Optional

import ml_collections

from preflmr_jax.user_errors import ConfigError, MissingPath

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def resolve(path: str) -> str:
  for candidate in (path, os.path.join(REPO_ROOT, path)):
    if os.path.isfile(candidate):
      return os.path.abspath(candidate)
  raise MissingPath(f"config file {path!r} not found (also looked under {REPO_ROOT})")


def load_module(path: str) -> types.ModuleType:
  """Executes the config file at `path` as a fresh module (never cached: files may change)."""
  path = resolve(path)
  name = "preflmr_config_" + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not callable(getattr(module, "get_config", None)):
    raise ConfigError(f"config file {path} defines no get_config()")
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
  """`"configs/stage.py:2,vit_l"` -> that file's `get_config("2,vit_l")`, then `overrides`
  applied."""
  path, _, arg = spec.partition(":")
  config = load_module(path).get_config(*([arg] if arg else []))
  return apply_overrides(config, overrides or {})


def _convert(value: str, default: Any) -> Any:
  if isinstance(default, bool):  # before int: bool is an int
    if value.lower() not in ("true", "false", "1", "0"):
      raise ValueError
    return value.lower() in ("true", "1")
  return type(default)(value)


def parse_arg(arg: Optional[str], *, where: str, **spec) -> ml_collections.ConfigDict:
  """A config file's argument (the text after `:`), as big_vision's configs read theirs.

    parse_arg("2,vit_l", where="configs/stage.py", stage=0, shape="tiny")  # stage=2, shape="vit_l"

  `spec` gives each key's default, whose type (int, float, str, bool) is the key's. Items are
  comma-separated: `key=value` sets that key, a bool key's bare name sets it True, and any other
  bare item fills the next key not yet set, in spec order. An unknown key, a positional item too
  many, a key set twice or a value not of its key's type fails in one line naming `where` and the
  keys.
  """
  keys = ", ".join(f"{k}: {type(v).__name__} = {v!r}" for k, v in spec.items())

  def fail(why: str):
    raise ConfigError(f"{where}: argument {arg!r}: {why}; keys in order: {keys}")

  values = {}
  for item in filter(None, (i.strip() for i in (arg or "").split(","))):
    key, sep, value = item.partition("=")
    if sep:
      if key not in spec:
        fail(f"unknown key {key!r}")
    elif isinstance(spec.get(item), bool):
      value = "true"
    else:
      free = [k for k in spec if k not in values]
      if not free:
        fail(f"{item!r} is one positional item too many")
      key, value = free[0], item
    if key in values:
      fail(f"{key} is set twice")
    try:
      values[key] = _convert(value, spec[key])
    except ValueError:
      fail(f"{key}={value!r} is not of type {type(spec[key]).__name__}")
  return ml_collections.ConfigDict({**spec, **values})
