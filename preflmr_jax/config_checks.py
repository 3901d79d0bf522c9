"""How a bad config value is reported: one line, `config.<key>=<value>: <why>`, naming the key.

Every check of a training config (`train.validate`, `optimizer.validate`, the batch interface, the
data sources, the config builders) raises through `require`, so a user sees the same shape of
message whichever check caught the value.
"""

import numpy as np


def require(ok: bool, key: str, value, why: str) -> None:
  if not ok:
    raise ValueError(f"config.{key}={value!r}: {why}")


def is_int(value) -> bool:
  """An integer and not a bool (True would pass as 1)."""
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def require_int(key: str, value, low: int, why: str = "") -> int:
  """`value` as an int, or the error `config.<key>=<value>: must be an integer >= <low><why>`."""
  require(is_int(value) and value >= low, key, value, f"must be an integer >= {low}{why}")
  return int(value)
