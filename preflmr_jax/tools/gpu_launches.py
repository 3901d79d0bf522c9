"""What a compiled GPU executable makes the host issue per call, read from XLA's dump of it.

XLA's GPU runtime runs an executable as a sequence of thunks: kernels, copies, cuBLAS / cuDNN
calls, loops, conditionals, and command buffers (CUDA graphs recorded from runs of such thunks,
launched as one). The host issues every thunk outside a command buffer, once per loop iteration;
a kernel inside one costs no launch of its own. A loop whose trip count XLA knows runs its body
that many times without evaluating its condition; any other loop, and every conditional, copies
its predicate to the host and waits for the device. XLA writes the sequence when it dumps a
module (`*.thunk_sequence_after_thunk_passes.txt`, or `*.thunk_sequence.txt` where no thunk pass
changed it), with each thunk's HLO name (`*.thunk_metadata.txt`) and the optimised HLO, which
holds the loops' trip counts.

  options = dump_options(folder)       # compile options: XLA writes the dump into `folder`
  counts = read(folder)                # per call of the executable:
    launches          what the host issues: command buffers, and thunks outside them
    kernels           kernels, copies and library calls, inside command buffers or not
    by_kind           launches by thunk kind (kCommandBuffer, kCustomKernel, kConditional, ...)
    slice_copies      copies of dynamic slices: in a scanned layer stack, each layer's parameter
    slice_copy_bytes  slices and saved activations out of (or into) their stacks, and the bytes
                      they write (each also reads as many)
    host_syncs        loops without a known trip count and conditionals, each waiting for the
                      device (per iteration for a loop); the counts take one iteration of such a
                      loop and the larger branch of a conditional
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import math
import os
import re
from typing import Iterator

# Bits per element of XLA's element types (f8e4m3fn, f8e5m2, ...: 8).
_BITS = {"pred": 8, "s4": 4, "u4": 4, "s8": 8, "u8": 8, "bf16": 16, "f16": 16, "s16": 16, "u16": 16,
         "f32": 32, "s32": 32, "u32": 32, "f64": 64, "s64": 64, "u64": 64, "c64": 64, "c128": 128}
_THUNK = re.compile(r"(\d+): (\w+)")
_COMPUTATION = re.compile(r"(?:ENTRY )?%([\w.\-]+) .*\{$")
_INSTRUCTION = re.compile(r"\s*(?:ROOT )?%([\w.\-]+) = (\w+)\[([\d,]*)\]\S* ([\w\-]+)\((.*)")
# A dynamic-slice fusion holding one of these points a library call or a kernel at a slice (no
# copy of its own); the others copy a slice out of a stack or write an update into one.
_COMPUTES = {"custom-call", "fusion", "dot", "convolution"}


def dump_options(folder: str) -> dict[str, object]:
  """Compile options (`jax.stages.Lowered.compile(compiler_options)`) that dump to `folder`."""
  return {"xla_dump_to": folder, "xla_dump_hlo_as_text": True}


@dataclasses.dataclass
class _Thunk:
  kind: str
  index: int
  nested: list["_Thunk"]  # a command buffer's thunks, a dynamic-slice fusion's copy
  sections: dict[str, list["_Thunk"]]  # a loop's "condition" and "body", a conditional's branches


def _lines(path: str) -> list[tuple[int, int | None, str]]:
  """(indent, thunk index or None for a section label, kind or label) per non-empty line."""
  out = []
  with open(path) as f:
    for line in f:
      if line.strip():
        indent = len(line) - len(line.lstrip())
        m = _THUNK.match(line.strip())
        out.append((indent, int(m.group(1)), m.group(2)) if m else
                   (indent, None, line.strip().rstrip(":")))
  return out


def _owns(kind: str, label: str, sections: dict) -> bool:
  """Whether the section `label`, met right after `kind`'s thunk or its sections, is its own: a
  loop has a condition then a body, a conditional its branches (XLA prints a loop's "condition:"
  label unindented at any depth, so labels go by kind, not by indent)."""
  if kind == "kWhile":
    return label == ("condition" if not sections else "body" if len(sections) == 1 else None)
  return kind == "kConditional" and label not in ("condition", "body")


def _parse(lines, i: int, indent: int) -> tuple[list[_Thunk], int]:
  """The thunks at `indent` from line i on, each with what is nested under it; stops at a label
  or a shallower line."""
  thunks = []
  while i < len(lines) and lines[i][1] is not None and lines[i][0] >= indent:
    own_indent, index, kind = lines[i]
    i += 1
    nested = []
    if i < len(lines) and lines[i][1] is not None and lines[i][0] > own_indent:
      nested, i = _parse(lines, i, lines[i][0])
    sections = {}
    while i + 1 < len(lines) and lines[i][1] is None and _owns(kind, lines[i][2], sections):
      sections[lines[i][2]], i = _parse(lines, i + 1, lines[i + 1][0])
    thunks.append(_Thunk(kind, index, nested, sections))
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
  bits = 8 if dtype.startswith("f8") else _BITS.get(dtype)
  if bits is None:
    raise ValueError(f"element type {dtype!r}: its size is unknown to tools/gpu_launches.py")
  return math.prod(int(d) for d in filter(None, dims.split(","))) * bits // 8


def _slice_bytes(fused: list[str]) -> int | None:
  """Bytes a dynamic-slice fusion copies (its slices, or the updates it writes into a stack); None
  for one that copies nothing."""
  shapes, total = {}, 0
  for line in fused:
    if not (m := _INSTRUCTION.match(line)):
      continue
    name, dtype, dims, op, args = m.groups()
    if op in _COMPUTES:
      return None
    shapes[name] = (dtype, dims)
    if op == "dynamic-slice":
      total += _bytes(dtype, dims)
    elif op == "dynamic-update-slice":
      update = re.findall(r"%([\w.\-]+)", args)[1:2]
      if not update or update[0] not in shapes:
        raise ValueError(f"a dynamic-update-slice's update operand not found in: {line.strip()}")
      total += _bytes(*shapes[update[0]])
  return total


def _walk(comps, name: str, times: int) -> Iterator[tuple[str, int]]:
  """(computation, runs per execution) from `name` through loop bodies (trip count times, once
  when unknown), calls and conditional branches (every branch, as if each ran)."""
  yield name, times
  for line in comps.get(name, ()):
    if " while(" in line:
      n = _trip_count(line)
      yield from _walk(comps, _attr(line, "body"), times * (1 if n is None else n))
    elif " conditional(" in line:
      for branch in re.findall(r"%([\w.\-]+)", line.partition("branch_computations={")[2]
                               .partition("}")[0]):
        yield from _walk(comps, branch, times)
    elif " call(" in line and (callee := _attr(line, "to_apply")):
      yield from _walk(comps, callee, times)


def _find(folder: str, suffix: str) -> str | None:
  found = glob.glob(os.path.join(folder, f"*{suffix}"))
  if len(found) > 1:
    raise ValueError(f"{folder}: more than one module's dump ({', '.join(sorted(found))}); "
                     "dump one executable per folder")
  return found[0] if found else None


def read(folder: str) -> dict:
  """Per-call counts of the one module dumped into `folder` (see the module docstring)."""
  sequence = (_find(folder, ".thunk_sequence_after_thunk_passes.txt")
              or _find(folder, ".thunk_sequence.txt"))
  metadata = _find(folder, ".thunk_metadata.txt")
  hlo = _find(folder, "_gpu_after_optimizations.txt")
  if not (sequence and metadata and hlo):
    raise FileNotFoundError(
        f"{folder}: no XLA GPU dump (thunk sequence, thunk metadata and optimised HLO); a step "
        "loaded from jax's persistent compilation cache is not compiled, and leaves none")
  lines = _lines(sequence)
  thunks, end = _parse(lines, 0, 0)
  if end < len(lines):
    raise ValueError(f"{sequence}: line {end + 1} ({lines[end][2]!r}) does not follow the thunk "
                     "sequence format tools/gpu_launches.py reads")
  with open(metadata) as f:
    names = {int(i): a for a, i in re.findall(
        r'profile_annotation: "([^"]*)"\s*thunk_id: (\d+)', f.read())}
  with open(hlo) as f:
    hlo_text = f.read()
  trips = {m.group(1): _trip_count(m.group(0))
           for m in re.finditer(r"%([\w.\-]+) = [^\n]* while\([^\n]*", hlo_text)}
  syncs = []

  def count(thunks, times: int, in_graph: bool) -> tuple[collections.Counter, int]:
    """(launches by kind, kernels) of `times` runs of `thunks`."""
    launches, kernels = collections.Counter(), 0
    for t in thunks:
      parts = []  # a loop's sections: (thunks, runs)
      name = names.get(t.index, f"thunk {t.index}")
      if t.kind == "kWhile":
        n = trips.get(name)
        if n is None:  # the condition runs every iteration; outside a graph the host waits on it
          syncs.extend([] if in_graph else [f"{name} (a loop, trip count unknown)"])
          parts = [(t.sections.get("condition", []), 2 * times),
                   (t.sections.get("body", []), times)]
        else:
          parts = [(t.sections.get("body", []), n * times)]
      elif t.kind == "kConditional":  # outside a graph: its predicate copied to the host
        if not in_graph:
          syncs.append(f"{name} (a conditional)")
          launches[t.kind] += times
        branches = [count(b, times, in_graph) for b in t.sections.values()]
        sub_launches, sub_kernels = max(branches, key=lambda c: (sum(c[0].values()), c[1]),
                                        default=(collections.Counter(), 0))
        launches.update(sub_launches)
        kernels += sub_kernels
      else:
        if not in_graph:
          launches[t.kind] += times
        # What a dynamic-slice fusion nests is its own copy: one kernel.
        kernels += (count(t.nested, times, True)[1] if t.kind == "kCommandBuffer" else times)
      for part, runs in parts:
        sub_launches, sub_kernels = count(part, runs, in_graph)
        launches.update(sub_launches)
        kernels += sub_kernels
    return launches, kernels

  by_kind, kernels = count(thunks, 1, False)
  comps = _computations(hlo_text)
  entry = re.search(r"^ENTRY %([\w.\-]+)", hlo_text, re.M)
  if entry is None:
    raise ValueError(f"{hlo}: no ENTRY computation")
  copies = copy_bytes = 0
  for comp, times in _walk(comps, entry.group(1), 1):
    for line in comps.get(comp, ()):
      if '"name":"dynamic_slice_fusion"' in line and (fused := _attr(line, "calls")):
        written = _slice_bytes(comps.get(fused, []))
        if written is not None:
          copies += times
          copy_bytes += times * written
  return {"launches": sum(by_kind.values()), "kernels": kernels,
          "by_kind": dict(by_kind.most_common()), "slice_copies": copies,
          "slice_copy_bytes": copy_bytes, "host_syncs": syncs}
