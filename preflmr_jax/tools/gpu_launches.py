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
  counts = read(folder)                # per call of the executable (read_or_error: {"error": ...}
                                       # instead of raising, for reports that go on without):
    launches          what the host issues: command buffers, thunks outside them, and the
                      predicate copies of conditionals and of loops of unknown length
    kernels           kernels, copies and library calls, inside command buffers or not (a
                      stream's wait for another is a launch, not a kernel)
    by_kind           launches by thunk kind (kCommandBuffer, kCustomKernel, kConditional, ...)
    slice_copies      copies of dynamic slices: in a scanned layer stack, each layer's parameter
    slice_copy_bytes  slices and saved activations out of (or into) their stacks, and the bytes
                      they write (each also reads as many)
    host_syncs        loops without a known trip count and conditionals (outside command
                      buffers), each waiting for the device (per iteration, for a loop); the counts
                      take one iteration of such a loop and the larger branch of a conditional
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import math
import os
import re

# Bits per element of XLA's element types (f8e4m3fn, f8e5m2, ...: 8).
_BITS = {"pred": 8, "s4": 4, "u4": 4, "s8": 8, "u8": 8, "bf16": 16, "f16": 16, "s16": 16, "u16": 16,
         "f32": 32, "s32": 32, "u32": 32, "f64": 64, "s64": 64, "u64": 64, "c64": 64, "c128": 128}
_THUNK = re.compile(r"(\d+): (\w+)")
# Thunks printed with others nested under them: a command buffer's are its kernels; a dynamic-slice
# fusion's is its copy and an async start's the collective it starts, each one kernel in all.
_NESTS = ("kCommandBuffer", "kDynamicSliceFusion", "kAsyncStart")
# Thunks that make a stream wait for another's work: the host issues them, no kernel runs.
_WAITS = ("kAsyncDone", "kWaitForStreams")
_COMPUTATION = re.compile(r"(?:ENTRY )?%([\w.\-]+) .*\{$")
_INSTRUCTION = re.compile(r"\s*(?:ROOT )?%([\w.\-]+) = (\w+)\[([\d,]*)\]\S* ([\w\-]+)\((.*)")
# A dynamic-slice fusion holding one of these points a library call or a kernel at a slice (no
# copy of its own); the others copy a slice out of a stack or write an update into one.
_COMPUTES = re.compile(r"\s(custom-call|fusion|dot|convolution)\(")


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


def _owns(kind: str, own_indent: int, label: str, label_indent: int, sections: dict) -> bool:
  """Whether a section label met right after a thunk (or its sections) is the thunk's own: XLA
  prints a loop's "condition:" unindented at any depth, then its "body:", and a conditional's
  branches, two columns right of the thunk."""
  if kind == "kWhile" and not sections:
    return label == "condition"
  own = label_indent == own_indent + 2 and label not in sections
  return own and (label == "body" if kind == "kWhile" else kind == "kConditional")


def _parse(lines, i: int, indent: int) -> tuple[list[_Thunk], int]:
  """The thunks from line i on indented by `indent` or more, each with what is nested under it
  (the lines right after it, further right) and its sections; stops at a label it does not own or
  at a line indented less."""
  thunks = []
  while i < len(lines) and lines[i][1] is not None and lines[i][0] >= indent:
    own_indent, index, kind = lines[i]
    i += 1
    nested = []
    if i < len(lines) and lines[i][1] is not None and lines[i][0] > own_indent:
      if kind not in _NESTS:
        raise ValueError(f"thunk {index} ({kind}) nests thunks; tools/gpu_launches.py does not "
                         "know how that kind runs them")
      nested, i = _parse(lines, i, lines[i][0])
    sections = {}
    while (i < len(lines) and lines[i][1] is None
           and _owns(kind, own_indent, lines[i][2], lines[i][0], sections)):
      sections[lines[i][2]], i = _parse(lines, i + 1, own_indent + 1)
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
    if _COMPUTES.search(line):  # before the shape: a library call's result is a tuple
      return None
    if not (m := _INSTRUCTION.match(line)):
      continue
    name, dtype, dims, op, args = m.groups()
    shapes[name] = (dtype, dims)
    if op == "dynamic-slice":
      total += _bytes(dtype, dims)
    elif op == "dynamic-update-slice":
      update = re.findall(r"%([\w.\-]+)", args)[1:2]
      if not update or update[0] not in shapes:
        raise ValueError(f"a dynamic-update-slice's update operand not found in: {line.strip()}")
      total += _bytes(*shapes[update[0]])
  return total


def _branches(line: str) -> list[str]:
  """A conditional's branch computations (`branch_computations={...}`, or true / false)."""
  listed = line.partition("branch_computations={")[2].partition("}")[0]
  return (re.findall(r"%([\w.\-]+)", listed) if listed else
          [b for key in ("true_computation", "false_computation") if (b := _attr(line, key))])


def _slice_copies(comps, name: str) -> tuple[int, int]:
  """(copies, bytes) of one run of computation `name`, through its loops (trip count times, once
  when unknown), calls and the larger branch of each conditional."""
  copies = copy_bytes = 0
  for line in comps.get(name, ()):
    runs, callees = 1, []
    if " while(" in line:
      n = _trip_count(line)
      runs, callees = (1 if n is None else n), [_attr(line, "body")]
    elif " call(" in line:
      callees = [_attr(line, "to_apply")]
    elif " conditional(" in line:
      n, b = max((_slice_copies(comps, b) for b in _branches(line)), default=(0, 0))
      copies, copy_bytes = copies + n, copy_bytes + b
    elif '"name":"dynamic_slice_fusion"' in line:
      written = _slice_bytes(comps.get(_attr(line, "calls"), []))
      if written is not None:
        copies, copy_bytes = copies + 1, copy_bytes + written
    for callee in filter(None, callees):
      n, b = _slice_copies(comps, callee)
      copies, copy_bytes = copies + runs * n, copy_bytes + runs * b
  return copies, copy_bytes


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
        f"no XLA GPU dump (a step from jax's persistent compilation cache leaves none) in "
        f"{folder}: it needs the thunk sequence, the thunk metadata and the optimised HLO")
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
      name = names.get(t.index, f"thunk {t.index}")
      parts = []  # a loop's sections: (thunks, runs)
      if t.kind == "kWhile":
        if name not in trips:
          raise ValueError(f"{sequence}: loop thunk {t.index} ({name}) is no loop of {hlo}")
        n = trips[name]
        if n is None:  # each of its conditions copied to the host, which waits on it
          parts = [(t.sections.get("condition", []), 2 * times),
                   (t.sections.get("body", []), times)]
          if not in_graph:
            syncs.append(f"{name} (a loop, trip count unknown)")
            launches[t.kind] += 2 * times
        else:  # XLA runs the body n times without its condition
          parts = [(t.sections.get("body", []), n * times)]
      elif t.kind == "kConditional":  # its predicate copied to the host, which waits on it
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
        if t.kind == "kCommandBuffer":
          kernels += count(t.nested, times, True)[1]
        elif t.kind not in _WAITS:
          kernels += times
      for part, runs in parts:
        sub_launches, sub_kernels = count(part, runs, in_graph)
        launches.update(sub_launches)
        kernels += sub_kernels
    return launches, kernels

  by_kind, kernels = count(thunks, 1, False)
  entry = re.search(r"^ENTRY %([\w.\-]+)", hlo_text, re.M)
  if entry is None:
    raise ValueError(f"{hlo}: no ENTRY computation")
  copies, copy_bytes = _slice_copies(_computations(hlo_text), entry.group(1))
  return {"launches": sum(by_kind.values()), "kernels": kernels,
          "by_kind": dict(by_kind.most_common()), "slice_copies": copies,
          "slice_copy_bytes": copy_bytes, "host_syncs": syncs}


def read_or_error(folder: str) -> dict:
  """`read(folder)`, or {"error": why} for a dump it cannot read (e.g. another XLA's format)."""
  try:
    return read(folder)
  except Exception as e:  # pylint: disable=broad-except  (foreign input: any parse failure)
    return {"error": f"{type(e).__name__}: {e}"}
