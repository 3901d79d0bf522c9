"""tools/gpu_launches.py against real XLA GPU dumps.

tests/golden/gpu_dump holds what XLA (jax 0.10.2's CUDA plugin, compiling for an H100 on a CPU host)
wrote for two small programs (the folder's make.py; `gpu_launches.dump_options`): the thunk
sequence before and after XLA's thunk passes (which record runs of kernels into CUDA graphs; no
second sequence where they changed nothing), the thunks' HLO names and the optimised HLO.
"""

import os
import shutil

import pytest

from preflmr_jax.tools import gpu_launches

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "gpu_dump")
SCAN, NESTED = os.path.join(GOLDEN, "scan"), os.path.join(GOLDEN, "nested")


def test_a_scan_with_its_body_in_a_cuda_graph():
  """`make.scan`, counted by hand from its sequence: 2 copies and a kernel; the loop, whose trip
  count (3) XLA knows, so its condition never runs: per iteration a slice copy, a CUDA graph of
  the 7 body kernels, the stacking copy and the counter's kernel; then one CUDA graph of the last
  7 kernels."""
  counts = gpu_launches.read(SCAN)
  assert counts["by_kind"] == {"kCustomKernel": 1 + 3, "kDynamicSliceFusion": 3 * 2,
                               "kCommandBuffer": 3 + 1, "kCopy": 2}
  assert counts["launches"] == 3 + 3 * 4 + 1
  assert counts["kernels"] == 3 + 3 * (1 + 7 + 1 + 1) + 7
  # Each iteration slices one [64, 64] f32 weight out of its stack and writes one into another.
  assert counts["slice_copies"] == 6
  assert counts["slice_copy_bytes"] == 3 * 2 * 64 * 64 * 4
  assert counts["host_syncs"] == []


def test_nested_loops_and_a_conditional():
  """`make.nested` (no CUDA graphs): 2 copies; the outer loop's 2 iterations of a slice copy, a
  copy, the inner loop's 3 iterations of 4 thunks and a kernel; the predicate's kernel, the
  conditional (its predicate copied to the host) and the larger of its branches (2 kernels)."""
  counts = gpu_launches.read(NESTED)
  assert counts["kernels"] == 2 + 2 * (2 + 3 * 4 + 1) + 1 + 2
  assert counts["launches"] == counts["kernels"] + 1  # the conditional's predicate
  assert counts["by_kind"]["kConditional"] == 1 and "kWhile" not in counts["by_kind"]
  assert counts["slice_copies"] == 2 + 2 * 3  # a [3, 64, 64] block, then a [64, 64] weight
  assert counts["slice_copy_bytes"] == 2 * (3 * 64 * 64 * 4) + 2 * 3 * (64 * 64 * 4)
  assert len(counts["host_syncs"]) == 1 and "conditional" in counts["host_syncs"][0]


def _copy(source, tmp_path):
  return shutil.copytree(source, tmp_path / "dump")


def test_without_thunk_passes_every_kernel_is_a_launch(tmp_path):
  """The first sequence alone (as XLA writes it when its passes change nothing)."""
  dump = _copy(SCAN, tmp_path)
  os.remove(next(dump.glob("*.thunk_sequence_after_thunk_passes.txt")))
  counts = gpu_launches.read(str(dump))
  assert "kCommandBuffer" not in counts["by_kind"]
  assert counts["launches"] == counts["kernels"] == 3 + 3 * (1 + 7 + 1 + 1) + 7


def test_a_loop_without_a_known_trip_count_runs_its_condition_and_waits(tmp_path):
  dump = _copy(SCAN, tmp_path)
  hlo = next(dump.glob("*_gpu_after_optimizations.txt"))
  text = hlo.read_text()
  assert '"known_trip_count":{"n":"3"}' in text
  hlo.write_text(text.replace('"known_trip_count":{"n":"3"}', '"known_trip_count":null'))
  counts = gpu_launches.read(str(dump))
  assert len(counts["host_syncs"]) == 1 and "trip count unknown" in counts["host_syncs"][0]
  assert counts["launches"] == 3 + 2 + 4 + 1  # one iteration: a lower bound


def test_a_sequence_it_cannot_read_is_an_error(tmp_path):
  dump = _copy(SCAN, tmp_path)
  sequence = next(dump.glob("*.thunk_sequence_after_thunk_passes.txt"))
  sequence.write_text(sequence.read_text() + "unexpected_section:\n")
  with pytest.raises(ValueError, match=r"line \d+ \('unexpected_section'\) does not follow"):
    gpu_launches.read(str(dump))


def test_a_folder_without_a_dump_names_it(tmp_path):
  with pytest.raises(FileNotFoundError, match=f"{tmp_path}: no XLA GPU dump"):
    gpu_launches.read(str(tmp_path))


def test_two_modules_in_one_folder_are_refused(tmp_path):
  dump = _copy(SCAN, tmp_path)
  for path in dump.glob("module_0001.*"):
    shutil.copy(path, dump / path.name.replace("module_0001", "module_0002"))
  with pytest.raises(ValueError, match="more than one module's dump"):
    gpu_launches.read(str(dump))
