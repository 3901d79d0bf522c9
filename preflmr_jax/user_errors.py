"""The mistakes a user fixes from the message alone, and the checks that raise them.

Each is one line naming what to change: `config.<key>=<value>: <why>`, `--<flag>=<path>: <why>`.
The command-line programs print a `UserError` as that one line and exit with status 2
(`cli.run`, `exit_codes.USAGE`); every other exception keeps its traceback. Each class is also the
builtin a library caller would catch (a `ConfigError` is a `ValueError`, ...).
"""

import contextlib
from typing import Iterator

import numpy as np


class UserError(Exception):
  """A bad config value, flag or path."""


class ConfigError(UserError, ValueError):
  """A config value or flag that cannot work (checked before anything is compiled)."""


class BadFile(UserError, ValueError):
  """A file that is not what it should be: truncated, corrupt, another format or another model."""


class MissingPath(UserError, FileNotFoundError):
  """A path (or its bucket) that does not exist."""


class NotAFolder(UserError, NotADirectoryError):
  """A path that must be a folder and is a file."""


class NoAccess(UserError, PermissionError):
  """Storage that refuses access (permissions, credentials)."""


class Unreachable(UserError, ConnectionError):
  """A storage endpoint that cannot be reached."""


class NotWritable(UserError, OSError):
  """An output location that cannot be written."""


@contextlib.contextmanager
def naming(what: str, value, *types: type[UserError]) -> Iterator[None]:
  """Re-raises a `types` error from the block (default: any UserError) as the same type, its
  message prefixed `what=value: `: a lower layer names the file, this the flag or key."""
  try:
    yield
  except types or UserError as e:
    raise type(e)(f"{what}={value}: {e}") from None


def require(ok: bool, key: str, value, why: str) -> None:
  """The config check: `ConfigError("config.<key>=<value>: <why>")` unless `ok`."""
  if not ok:
    raise ConfigError(f"config.{key}={value!r}: {why}")


def is_int(value) -> bool:
  """An integer and not a bool (True would pass as 1)."""
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def require_int(key: str, value, low: int, why: str = "") -> int:
  """`value` as an int, or the error `config.<key>=<value>: must be an integer >= <low><why>`."""
  require(is_int(value) and value >= low, key, value, f"must be an integer >= {low}{why}")
  return int(value)
