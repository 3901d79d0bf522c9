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
  # One iteration (a lower bound): the condition's kernel and its copy to the host, twice.
  assert counts["by_kind"]["kWhile"] == 2
  assert counts["launches"] == 3 + 2 * 2 + 4 + 1


def test_a_sequence_it_cannot_read_is_an_error(tmp_path):
  dump = _copy(SCAN, tmp_path)
  sequence = next(dump.glob("*.thunk_sequence_after_thunk_passes.txt"))
  sequence.write_text(sequence.read_text() + "unexpected_section:\n")
  with pytest.raises(ValueError, match=r"line \d+ \('unexpected_section'\) does not follow"):
    gpu_launches.read(str(dump))


def test_a_folder_without_a_dump_names_it(tmp_path):
  with pytest.raises(FileNotFoundError, match=f"no XLA GPU dump .* in {tmp_path}"):
    gpu_launches.read(str(tmp_path))
  # What the plan and gpu.py report instead of stopping.
  assert gpu_launches.read_or_error(str(tmp_path))["error"].startswith(
      "FileNotFoundError: no XLA GPU dump")
  assert gpu_launches.read_or_error(SCAN)["launches"] == 16


def test_two_modules_in_one_folder_are_refused(tmp_path):
  dump = _copy(SCAN, tmp_path)
  for path in dump.glob("module_0001.*"):
    shutil.copy(path, dump / path.name.replace("module_0001", "module_0002"))
  with pytest.raises(ValueError, match="more than one module's dump"):
    gpu_launches.read(str(dump))


def _sequence(tmp_path, text):
  path = tmp_path / "sequence.txt"
  path.write_text(text)
  thunks, end = gpu_launches._parse(gpu_launches._lines(str(path)), 0, 0)
  return thunks, end


def test_a_conditional_inside_a_branch_keeps_its_own_branches(tmp_path):
  """Labels belong to the thunk two columns to their left: the inner conditional's branches stay
  its own, the outer one's next branch the outer one's (written as XLA prints them)."""
  thunks, end = _sequence(tmp_path, """\
001: kConditional  [source | sink]
  false_branch:
    002: kConditional [source | sink]
      false_branch:
        003: kCustomKernel [source | sink] a
      true_branch:
        004: kCustomKernel [source | sink] b
  true_branch:
    005: kCustomKernel [source | sink] c
006: kCustomKernel [source | sink] d
""")
  assert end == 10 and [t.index for t in thunks] == [1, 6]
  outer = thunks[0].sections
  assert [t.index for t in outer["true_branch"]] == [5]
  inner = outer["false_branch"][0].sections
  assert {k: [t.index for t in v] for k, v in inner.items()} == {"false_branch": [3],
                                                                 "true_branch": [4]}


def test_an_empty_branch_takes_nothing_after_it(tmp_path):
  thunks, end = _sequence(tmp_path, """\
001: kConditional  [source | sink]
  false_branch:
    002: kCustomKernel [source | sink] a
  true_branch:
003: kCustomKernel [source | sink] b
""")
  assert end == 5 and [t.index for t in thunks] == [1, 3]
  assert thunks[0].sections["true_branch"] == []


def test_a_slice_handed_to_a_library_call_is_no_copy():
  """A dynamic-slice fusion that points cuBLAS at a slice (its result a tuple, as XLA prints a
  library call's) copies nothing; one that copies the slice writes its bytes."""
  sliced = ("  %p0 = f32[4,8,8]{2,1,0} parameter(0)",
            "  %p1 = s32[] parameter(1)",
            "  %c = s32[] constant(0)",
            "  %ds = f32[1,8,8]{2,1,0} dynamic-slice(%p0, %p1, %c, %c), "
            "dynamic_slice_sizes={1,8,8}")
  gemm = ("  %b = f32[8,8]{1,0} bitcast(%ds)",
          '  ROOT %cc = (f32[8,8]{1,0}, s8[4194304]{0}) custom-call(%b, %b), '
          'custom_call_target="__cublas$gemm"')
  assert gpu_launches._slice_bytes([*sliced, *gemm]) is None
  assert gpu_launches._slice_bytes([*sliced, "  ROOT %cp = f32[1,8,8]{2,1,0} copy(%ds)"]) == 256


def test_an_async_collective_is_one_launch(tmp_path):
  """On several GPUs XLA starts collectives on their own stream: the start (which nests the
  collective) and the wait are each a launch, the wait no kernel (lines as XLA prints them for the tiny step on
  two hosts of two H100s)."""
  (tmp_path / "m.thunk_sequence_after_thunk_passes.txt").write_text("""\
026: kAsyncStart    [prev=000 (1)  | next=031 (5) ] stream=communication_stream[0], async_id=26
    025: kAllGather [source | sink] kAllGather
027: kCopy          [source        | next=029 (2) ] kCopy
029: kCustomKernel  [prev=027 (2)  | next=000 (3) ] loop_add_fusion_43 grid: [1, 1, 1]
030: kAsyncDone     [source        | sink         ] async_id=26
000: kCommandBuffer [prev=000 (2)  | next=000 (2) ]
    140: kCustomKernel [source        | next=144 (4) ] loop_transpose_fusion_36 grid: [16, 1, 1]
    141: kCustomKernel [source        | next=143 (2) ] loop_transpose_fusion_28 grid: [64, 1, 1]
""")
  (tmp_path / "m.thunk_metadata.txt").write_text("")
  hlo = tmp_path / "m.sm_9.0a_gpu_after_optimizations.txt"
  hlo.write_text("ENTRY %main.1 () -> f32[] {\n}\n")
  counts = gpu_launches.read(str(tmp_path))
  assert counts["by_kind"] == {"kAsyncStart": 1, "kCopy": 1, "kCustomKernel": 1, "kAsyncDone": 1,
                               "kCommandBuffer": 1}
  assert counts["launches"] == 5 and counts["kernels"] == 3 + 2
