"""What a compiled GPU executable makes the host issue per call, read from XLA's dump of it.

XLA's GPU runtime runs an executable as a sequence of thunks: kernels, copies, cuBLAS / cuDNN
calls, loops, and command buffers (CUDA graphs recorded from runs of such thunks, launched as one).
The host issues every thunk outside a command buffer, once per loop iteration; a kernel inside one
costs no launch of its own. XLA writes the sequence when it dumps a module
(`*.thunk_sequence_after_thunk_passes.txt`, or `*.thunk_sequence.txt` where no thunk pass changed
it), with each thunk's HLO name (`*.thunk_metadata.txt`) and the optimised HLO, which holds the
loops' trip counts.

  options = dump_options(folder)       # compile options: XLA writes the dump into `folder`
  counts = read(folder)                # per call of the executable:
    launches          what the host issues: command buffers, and thunks outside them
    kernels           kernels, copies and library calls, inside command buffers or not
    by_kind           launches by thunk kind (kCommandBuffer, kCustomKernel, kDynamicSliceFusion, ...)
    slice_copies      dynamic-slice fusions run: in a scanned layer stack, a copy of each layer's
    slice_copy_bytes  parameter slices and saved activations out of (or into) their stacks, and
                      the bytes those copies write (each also reads as many)
    unknown_trip_counts  loops XLA knows no trip count of, counted once (the counts are then a
                      lower bound)
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import os
import re
from typing import Iterator

_ITEM_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4,
               "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}
_THUNK = re.compile(r"(\d+): (\w+)")
_COMPUTATION = re.compile(r"(?:ENTRY )?%([\w.\-]+) .*\{$")
_INSTRUCTION = re.compile(r"\s*(?:ROOT )?%([\w.\-]+) = (\w+)\[([\d,]*)\]\S* ([\w\-]+)\((.*)")


def dump_options(folder: str) -> dict[str, object]:
  """Compile options (`jax.stages.Lowered.compile(compiler_options)`) that dump to `folder`."""
  return {"xla_dump_to": folder, "xla_dump_hlo_as_text": True}


@dataclasses.dataclass
class _Thunk:
  kind: str
  index: int
  sections: dict[str, list["_Thunk"]]  # a loop's "condition" / "body"; "" for nested thunks


def _lines(text: str) -> list[tuple[int, int | None, str]]:
  """(indent, thunk index or None for a section label, kind or label) per non-empty line."""
  out = []
  for line in text.splitlines():
    if line.strip():
      indent = len(line) - len(line.lstrip())
      m = _THUNK.match(line.strip())
      out.append((indent, int(m.group(1)), m.group(2)) if m else
                 (indent, None, line.strip().rstrip(":")))
  return out


def _parse(lines, i: int, indent: int) -> tuple[list[_Thunk], int]:
  """The thunks at `indent` from line i on, each with what is nested under it."""
  thunks = []
  while i < len(lines) and lines[i][0] >= indent and lines[i][1] is not None:
    own_indent, index, kind = lines[i]
    i += 1
    sections = {}
    if kind == "kWhile":  # "condition:" and "body:" labels, each followed by its thunks
      while i + 1 < len(lines) and lines[i][1] is None and lines[i][0] >= own_indent:
        label = lines[i][2]
        sections[label], i = _parse(lines, i + 1, lines[i + 1][0])
    elif i < len(lines) and lines[i][1] is not None and lines[i][0] > own_indent:
      sections[""], i = _parse(lines, i, lines[i][0])
    thunks.append(_Thunk(kind, index, sections))
  return thunks, i


def _computations(hlo: str) -> dict[str, list[str]]:
  comps, current = {}, None
  for line in hlo.splitlines():
    if m := _COMPUTATION.match(line):
      current = comps.setdefault(m.group(1), [])
    elif line.startswith("}"):
      current = None
    elif current is not None:
      current.append(line)
  return comps


def _attr(line: str, name: str) -> str | None:
  m = re.search(rf"{name}=%([\w.\-]+)", line)
  return m.group(1) if m else None


def _trip_count(line: str) -> int | None:
  m = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
  return int(m.group(1)) if m else None


def _bytes(dtype: str, dims: str) -> int:
  n = _ITEM_BYTES.get(dtype, 4)
  for d in filter(None, dims.split(",")):
    n *= int(d)
  return n


def _slice_bytes(fused: list[str]) -> int:
  """Bytes a dynamic-slice fusion writes: its slices, or the updates it writes into a stack."""
  shapes, total = {}, 0
  for line in fused:
    if not (m := _INSTRUCTION.match(line)):
      continue
    name, dtype, dims, op, args = m.groups()
    shapes[name] = (dtype, dims)
    if op == "dynamic-slice":
      total += _bytes(dtype, dims)
    elif op == "dynamic-update-slice":
      update = re.findall(r"%([\w.\-]+)", args)[1]
      total += _bytes(*shapes.get(update, (dtype, dims)))
  return total


def _walk(comps, name: str, times: int) -> Iterator[tuple[str, int]]:
  """(computation, calls per execution) from `name` through its loops and calls."""
  yield name, times
  for line in comps.get(name, ()):
    if " while(" in line:
      n = _trip_count(line) or 1
      yield from _walk(comps, _attr(line, "body"), times * n)
      yield from _walk(comps, _attr(line, "condition"), times * (n + 1))
    elif " call(" in line and (callee := _attr(line, "to_apply")):
      yield from _walk(comps, callee, times)


def _find(folder: str, suffix: str) -> str | None:
  found = sorted(glob.glob(os.path.join(folder, f"*{suffix}")))
  return found[0] if found else None


def read(folder: str) -> dict:
  """Per-call counts of the one module dumped into `folder` (see the module docstring)."""
  sequence = (_find(folder, ".thunk_sequence_after_thunk_passes.txt")
              or _find(folder, ".thunk_sequence.txt"))
  metadata, hlo = _find(folder, ".thunk_metadata.txt"), _find(folder, "_gpu_after_optimizations.txt")
  if not (sequence and metadata and hlo):
    raise FileNotFoundError(f"{folder}: no XLA GPU dump (thunk sequence, thunk metadata and "
                            "optimised HLO)")
  with open(sequence) as f:
    thunks, _ = _parse(_lines(f.read()), 0, 0)
  with open(metadata) as f:
    names = {int(i): a for a, i in re.findall(
        r'profile_annotation: "([^"]*)"\s*thunk_id: (\d+)', f.read())}
  with open(hlo) as f:
    hlo_text = f.read()
  comps = _computations(hlo_text)
  trips = {m.group(1): _trip_count(m.group(0))
           for m in re.finditer(r"%([\w.\-]+) = [^\n]* while\([^\n]*", hlo_text)}

  by_kind, unknown = collections.Counter(), set()

  def trip(thunk):
    n = trips.get(names.get(thunk.index, ""))
    if n is None:
      unknown.add(names.get(thunk.index, f"thunk {thunk.index}"))
    return n or 1

  def count(thunks, times: int, in_graph: bool) -> int:
    """Kernels run; launches (outside command buffers) go into by_kind."""
    kernels = 0
    for t in thunks:
      if t.kind == "kWhile":
        n = trip(t)
        kernels += count(t.sections.get("condition", []), times * (n + 1), in_graph)
        kernels += count(t.sections.get("body", []), times * n, in_graph)
        continue
      if not in_graph:
        by_kind[t.kind] += times
      # What a dynamic-slice fusion nests is its own copy: one kernel.
      kernels += (count(t.sections.get("", []), times, True) if t.kind == "kCommandBuffer"
                  else times)
    return kernels

  kernels = count(thunks, 1, False)
  entry = next(m.group(1) for m in re.finditer(r"^ENTRY %([\w.\-]+)", hlo_text, re.M))
  copies = copy_bytes = 0
  for comp, times in _walk(comps, entry, 1):
    for line in comps.get(comp, ()):
      if '"name":"dynamic_slice_fusion"' in line and (fused := _attr(line, "calls")):
        copies += times
        copy_bytes += times * _slice_bytes(comps.get(fused, []))
  return {"launches": sum(by_kind.values()), "kernels": kernels,
          "by_kind": dict(by_kind.most_common()), "slice_copies": copies,
          "slice_copy_bytes": copy_bytes, "unknown_trip_counts": sorted(unknown)}
