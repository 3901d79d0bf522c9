"""Scanned vs per-layer (looped) layer stacks: train-step compile time, step time and memory.

  python benchmarks/scan_layers.py [--quick] [--tpu_python PATH] [--gpu_python PATH]
                                   [--skip cpu,tpu,gpu] [--cpu_config C]
                                   [--tpu_cases vit_l,vit_l_remat,400m_800m]

- cpu: the trainer's own step (`train.setup_train_step`, fp32, AdamW, one CPU device, synthetic
  batches; benchmarks/run.py's train row) at the ViT-B release shapes (or `--cpu_config`),
  `config.model.scan_layers` off then on: compile time (trace, lower, XLA compile), median step
  time, XLA's buffer bytes.
- tpu: the compile-only plan (`preflmr_jax.tools.plan --topology`, libtpu on this CPU host) of
  the ViT-L release (without and with remat) and the 400m/800m scaling point (--tpu_cases), on
  v5e-16 (and v5e-256 without --quick), both layouts: compile time and XLA's memory per device.
  Needs a Python with jax[tpu] (`requirements-tpu-plan.txt`, e.g. in a venv made with
  --system-site-packages): --tpu_python.
- gpu: the same plan for NVIDIA GPUs (`--topology h100:1`, and `h100:8` without --quick; jax's
  CUDA plugin on this CPU host, `requirements-gpu-plan.txt`: --gpu_python) of the ViT-L release
  in bfloat16 at 32 queries per GPU (benchmarks/gpu.py's `32:base` row), also with each of
  GPU_XLA_FLAGS in XLA_FLAGS. XLA compiles for a chip it cannot see, so it skips autotuning: on a
  GPU the compile takes longer. Also what a step makes the host issue (the plan's `gpu_launches`):
  launches (CUDA graphs and the thunks outside them) and the bytes copied by dynamic slices.

Prints a table with the ratios scanned/looped (each pair measured in this run), then one JSON
line. Nothing is written to the committed results.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

START = time.perf_counter()
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# --tpu_cases key: (name, config, overrides, largest fsdp: the 400m/800m widths 1152 and 1600 do not
# split 256 ways, so on v5e-256 its mesh is data=4 fsdp=64)
REMAT = {"model.remat": True, "model.remat_policy": "dots_saveable"}
TPU_CASES = {
    "vit_l": ("ViT-L release", "configs/release.py:vit_l", {}, 256),
    "vit_l_remat": ("ViT-L release, remat dots_saveable", "configs/release.py:vit_l", REMAT, 256),
    "400m_800m": ("400m/800m point", "configs/scaling.py:vision=400m,text=800m", {}, 64),
}
TOPOLOGIES = {"v5e:4x4": 16, "v5e:16x16": 256}
GPU_TOPOLOGIES = {"h100:1": 1, "h100:8": 8}
GPU_QUERIES = 32  # per GPU
# The GPU rows again with these XLA flags: softmax and layer norms left to XLA's own kernels rather
# than rewritten into Triton fusions, whose tiling search is most of the step's HLO passes.
GPU_XLA_FLAGS = {"no Triton norms": "--xla_disable_hlo_passes=triton-softmax-rewriter"}


def log(msg):
  print(f"[{time.perf_counter() - START:6.1f}s] {msg}", flush=True)


def cpu_rows(quick: bool, config: str | None) -> list[dict]:
  sys.path.insert(0, HERE)
  import run  # pylint: disable=import-outside-toplevel  (benchmarks/run.py's train row)
  name, config = ("ViT-B", run.VIT_B) if config is None else (config, config)
  overrides = {"batch_size": 2, **({"model.doc_maxlen": 128} if quick and config == run.VIT_B
                                   else {})}
  rows = []
  for scan in (False, True):
    log(f"cpu {name} train step, scan_layers={scan}")
    row = run.train_row(name, config, {**overrides, "model.scan_layers": scan},
                        2 if quick else 3, limit=1.0)
    rows.append({"where": "cpu", "case": f"{name} train step, {row['case']}", "scan": scan,
                 "compile_s": row["compile_s"], "step_ms": row["step_ms"],
                 "bytes": None if row["step_gib"] is None else row["step_gib"] * 2**30,
                 "others": row["others"]})
    log(f"  compile {row['compile_s']:.1f} s, step {row['step_ms']:.0f} ms")
    run.release_memory()
  return rows


def tpu_rows(python: str, quick: bool, cases: list[str]) -> list[dict]:
  topologies = {k: v for k, v in TOPOLOGIES.items() if not quick or v == 16}
  return plan_rows(python, "tpu", topologies, [TPU_CASES[c] for c in cases], 1)


def gpu_rows(python: str, quick: bool) -> list[dict]:
  topologies = {k: v for k, v in GPU_TOPOLOGIES.items() if not quick or v == 1}
  name, config, _, max_fsdp = TPU_CASES["vit_l"]
  case = lambda label: [(f"{name}, bf16{label}", config, {"model.dtype": "bfloat16"}, max_fsdp)]
  rows = plan_rows(python, "gpu", topologies, case(""), GPU_QUERIES)
  for label, flags in GPU_XLA_FLAGS.items():
    rows += plan_rows(python, "gpu", topologies, case(f", {label}"), GPU_QUERIES, flags)
  return rows


def plan_rows(python: str, where: str, topologies: dict, cases: list, per_device: int,
              xla_flags: str = "") -> list:
  """The compile-only plan of each case on each topology, looped then scanned (`xla_flags`
  added to XLA_FLAGS)."""
  env = {**os.environ, "JAX_PLATFORMS": "",
         "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {xla_flags}".strip()}
  rows = []
  for name, config, overrides, max_fsdp in cases:
    for topology, devices in topologies.items():
      fsdp = min(devices, max_fsdp)
      batch = devices * per_device
      for scan in (False, True):
        args = [python, "-m", "preflmr_jax.tools.plan", f"--config={config}",
                f"--topology={topology}", f"--mesh=data={devices // fsdp},fsdp={fsdp},tensor=1",
                f"--batch_size={batch}", f"--config.model.scan_layers={scan}",
                *(f"--config.{k}={v}" for k, v in overrides.items())]
        log(f"{where} {name} on {topology} (fsdp={fsdp}), scan_layers={scan}")
        out = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, check=False,
                             env=env)
        if out.returncode:
          raise RuntimeError(f"{' '.join(args)} failed:\n{out.stderr[-3000:]}")
        plan = json.loads(out.stdout.strip().splitlines()[-1])
        memory = plan["memory_per_device"]
        mesh = "" if fsdp == devices else f", data={devices // fsdp} fsdp={fsdp}"
        rows.append({"where": f"{where} {topology}", "case": f"{name}, batch {batch}{mesh}",
                     "scan": scan,
                     "compile_s": plan["compile_s"], "step_ms": None,
                     "bytes": memory.get("peak_bytes") or memory["total_bytes"], "others": None,
                     "gpu_launches": plan.get("gpu_launches")})
        log(f"  compile {plan['compile_s']:.1f} s, {rows[-1]['bytes'] / 2**30:.2f} GiB/device")
  return rows


def table(rows: list[dict]) -> str:
  lines = ["| where | case | layers | compile | step | memory | launches, slice copies | "
           "scanned/looped |", "|---|---|---|---|---|---|---|---|"]
  looped = {}
  for r in rows:
    key = (r["where"], r["case"])
    ratio = "-"
    if r["scan"] and key in looped:
      base = looped[key]
      parts = [f"compile {r['compile_s'] / base['compile_s']:.2f}x"]
      if r["step_ms"] and base["step_ms"]:
        parts.append(f"step {r['step_ms'] / base['step_ms']:.2f}x")
      if r["bytes"] and base["bytes"]:
        parts.append(f"memory {r['bytes'] / base['bytes']:.2f}x")
      ratio = ", ".join(parts)
    else:
      looped[key] = r
    step = "-" if r["step_ms"] is None else f"{r['step_ms']:.0f} ms"
    memory = "-" if r["bytes"] is None else f"{r['bytes'] / 2**30:.2f} GiB"
    launches = r.get("gpu_launches")
    launches = ("-" if not launches or "error" in launches else
                f"{launches['launches']}, {launches['slice_copy_bytes'] / 2**30:.1f} GiB")
    lines.append(f"| {r['where']} | {r['case']} | {'scanned' if r['scan'] else 'looped'} | "
                 f"{r['compile_s']:.1f} s | {step} | {memory} | {launches} | {ratio} |")
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true",
                      help="ViT-B at doc_maxlen 128, fewer steps; v5e-16 only")
  parser.add_argument("--tpu_python", help="a Python with jax[tpu] for the compile-only rows")
  parser.add_argument("--gpu_python", help="a Python with jax's CUDA plugin for the GPU rows")
  parser.add_argument("--skip", default="", help="comma-separated sections: cpu, tpu, gpu")
  parser.add_argument("--cpu_config", help="the cpu rows' config (default: the ViT-B release)")
  parser.add_argument("--tpu_cases", default=",".join(TPU_CASES),
                      help=f"comma-separated compile-only cases, of {list(TPU_CASES)}")
  args = parser.parse_args()
  skip = set(filter(None, args.skip.split(",")))
  if unknown := skip - {"cpu", "tpu", "gpu"}:
    parser.error(f"--skip: unknown section(s) {sorted(unknown)}")
  cases = list(filter(None, args.tpu_cases.split(",")))
  if unknown := set(cases) - set(TPU_CASES):
    parser.error(f"--tpu_cases: unknown case(s) {sorted(unknown)}; cases are {list(TPU_CASES)}")
  if "tpu" not in skip and not args.tpu_python:
    parser.error("the tpu rows need --tpu_python (a Python with jax[tpu]); or --skip tpu")
  if "gpu" not in skip and not args.gpu_python:
    parser.error("the gpu rows need --gpu_python (a Python with jax's CUDA plugin); or --skip gpu")
  rows = []
  if "tpu" not in skip:
    rows += tpu_rows(args.tpu_python, args.quick, cases)
  if "gpu" not in skip:
    rows += gpu_rows(args.gpu_python, args.quick)
  if "cpu" not in skip:
    rows += cpu_rows(args.quick, args.cpu_config)
  print(table(rows))
  print(json.dumps({"rows": rows}))


if __name__ == "__main__":
  main()
