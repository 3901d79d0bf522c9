"""tools/gpu_launches.py against a real XLA GPU dump.

tests/golden/gpu_dump holds what XLA (jax 0.10.2's CUDA plugin, compiling for an H100 on a CPU host)
wrote for a 3-step `lax.scan` whose body holds seven kernels and stacks one output, followed by
seven kernels (`gpu_launches.dump_options`; the folder's make.py rewrites it): the thunk sequence
before and after XLA's thunk passes (which record runs of kernels into CUDA graphs), the thunks'
HLO names and the optimised HLO.
"""

import os
import shutil

import pytest

from preflmr_jax.tools import gpu_launches

DUMP = os.path.join(os.path.dirname(__file__), "golden", "gpu_dump")
AFTER_PASSES = "module_0001.jit_f.thunk_sequence_after_thunk_passes.txt"


def test_counts_the_launches_of_the_recorded_sequence():
  """Counted by hand from the sequence: 2 copies and a kernel, the loop (4 condition checks; per
  iteration a slice copy, a CUDA graph of the 7 body kernels, the stacking copy and the counter's
  kernel), then one CUDA graph of the last 7 kernels."""
  counts = gpu_launches.read(DUMP)
  assert counts["by_kind"] == {"kCustomKernel": 1 + 4 + 3, "kDynamicSliceFusion": 3 * 2,
                               "kCommandBuffer": 3 + 1, "kCopy": 2}
  assert counts["launches"] == 3 + 4 + 3 * 4 + 1
  assert counts["kernels"] == 3 + 4 + 3 * (1 + 7 + 1 + 1) + 7
  # Each iteration slices one [64, 64] f32 weight out of its stack and writes one into another.
  assert counts["slice_copies"] == 6
  assert counts["slice_copy_bytes"] == 3 * 2 * 64 * 64 * 4
  assert counts["unknown_trip_counts"] == []


def test_without_thunk_passes_every_kernel_is_a_launch(tmp_path):
  """XLA writes no second sequence when its passes change nothing (e.g. too few kernels to be
  worth a CUDA graph): then the first one is what runs."""
  dump = shutil.copytree(DUMP, tmp_path / "dump")
  os.remove(dump / AFTER_PASSES)
  counts = gpu_launches.read(str(dump))
  assert "kCommandBuffer" not in counts["by_kind"]
  assert counts["launches"] == counts["kernels"] == 3 + 4 + 3 * (1 + 7 + 1 + 1) + 7


def test_a_loop_without_a_known_trip_count_is_named(tmp_path):
  dump = shutil.copytree(DUMP, tmp_path / "dump")
  hlo = next(dump.glob("*_gpu_after_optimizations.txt"))
  text = hlo.read_text()
  assert '"known_trip_count":{"n":"3"}' in text
  hlo.write_text(text.replace('"known_trip_count":{"n":"3"}', '"known_trip_count":null'))
  counts = gpu_launches.read(str(dump))
  assert counts["unknown_trip_counts"] == ["while.6"]
  assert counts["launches"] == 3 + 2 + 4 + 1  # the loop counted once: a lower bound


def test_a_folder_without_a_dump_names_it(tmp_path):
  with pytest.raises(FileNotFoundError, match=f"{tmp_path}: no XLA GPU dump"):
    gpu_launches.read(str(tmp_path))
