"""Training data: the source chosen by `config.data.source`, behind one interface.

The batch (keys, shapes, dtypes, `batch_spec`, `local_batch_size`) is defined in `data/batch.py`.

Iterator protocol (as grain's `DatasetIterator`):

  it = make_train_iterator(config, model_config, tokenizer,
                           process_index=jax.process_index(), process_count=jax.process_count())
  batch = next(it)
  state = it.get_state()  # small, JSON-serialisable dict: goes into the checkpoint
  it.set_state(state)     # continues exactly there: the same batches as an uninterrupted run

Streams are deterministic given `config.seed`, and processes get disjoint shares of each global
batch.

Sources (`config.data.source`): "m2kr" (`data/pipeline.py`: grain over the TFDS builds of
`data/m2kr_build.py`; the tiny config trains on the SAMPLE task of `data/sample.py`) and "synthetic"
(`data/synthetic.py`, the same coloured-shapes task generated in memory, for tests).
"""

from typing import Any, Optional

import jax

from preflmr_jax.data.batch import (  # noqa: F401  (re-exported: data.batch_spec(...))
    BATCH_KEYS, batch_spec, local_batch_size, max_positives, num_negatives)
from preflmr_jax.user_errors import ConfigError

SOURCES = ("m2kr", "synthetic")


def _check_source(config) -> None:
  data = config.get("data")
  source = data.get("source") if data is not None else None
  if source not in SOURCES:
    raise ConfigError(f"config.data.source={source!r} is not a known data source; "
                      f"expected one of {SOURCES}")


def _processes(process_index, process_count) -> tuple[int, int]:
  # Defaults are resolved here, not at import, so that jax.distributed can start first.
  count = jax.process_count() if process_count is None else int(process_count)
  index = jax.process_index() if process_index is None else int(process_index)
  if not 0 <= index < count:
    raise ValueError(f"process_index={index} is outside [0, process_count={count})")
  return index, count


def make_train_iterator(config, model_config, tokenizer, process_index: Optional[int] = None,
                        process_count: Optional[int] = None) -> Any:
  """This host's training batch iterator for `config.data.source` (see the module docstring)."""
  index, count = _processes(process_index, process_count)
  _check_source(config)
  if config.data.source == "m2kr":
    from preflmr_jax.data import pipeline  # Sources import only when chosen.
    return pipeline.M2KRIterator(config, model_config, tokenizer, process_index=index,
                                 process_count=count)
  from preflmr_jax.data import synthetic
  return synthetic.SyntheticIterator(config, model_config, tokenizer,
                                     process_index=index, process_count=count)

