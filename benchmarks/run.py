"""The CPU benchmarks in one run: PreFLMR encoding, MaxSim and train steps against PyTorch / ColBERT
and against this machine's matmul limit.

  python benchmarks/run.py [--quick] [--json] [--results PATH | --write-results]
                          [--skip encode,maxsim,train,ViT-B,ViT-L,tiny]

Prints one table; --results PATH writes it, with the machine and versions, to PATH, and
--write-results to the committed benchmarks/RESULTS.md (a full run only: never --quick). With --json the last
stdout line is one JSON object: every row, and the headline figures, each the worst (smallest)
over the rows measured: encoder_speedup_vs_pytorch and encoder_fraction_of_matmul over the query
and document rows, maxsim_fraction_of_matmul and maxsim_speedup_vs_colbert over the
maxsim_chunked rows (null, with maxsim_note, when colbert-ai is missing). --quick: ViT-B only,
small batches, fewer repeats, a 128-token doc_maxlen in the ViT-B train step. Rows:

- matmul: a 2048^3 fp32 matmul, jnp and torch; the faster is the machine's practical limit, and
  every "% of matmul" below is a GFLOP/s over it.
- encode: examples/s of `PreFLMR.encode_queries` / `encode_documents` (jitted, as
  evaluation.Encoder runs them) for the ViT-B and ViT-L release shapes (configs/release.py),
  vs `torch_reference.TorchPreFLMR` (HF transformers modules, sdpa attention) holding the same random
  weights, on the same batch; ours/torch is the ratio of median times over interleaved repeats.
  Documents are padded to doc_maxlen (512) on both sides; their encoder (BERT-base) is the same
  in both releases, so it is measured once. FLOPs: analytic, 2 per multiply-add of every matmul
  at the padded lengths (`models.flops.encode_flops`); XLA's cost analysis of our compiled function
  (all ops) is shown beside it. "documents, eval binary": the eval binary pads a batch only to its
  longest document rounded up to a multiple of 64 (evaluation.DOC_LENGTH_MULTIPLE, batches sorted by
  length); ours that way vs ours padded to 512, on documents of ~180 real tokens.
- maxsim: `late_interaction.maxsim_chunked` (chunk sizes from its default score-tile budget, as
  search.exact_search uses it) and plain `maxsim` vs colbert-ai's `colbert_score`
  (one call per query, as it scores one query at a time) on B queries x Lq tokens against 1000
  documents x 180 tokens x 128 (32-180 valid), fp32; FLOPs 2*B*Lq*N*Ld*dim. Timed in blocks of 3
  calls per method (encoders.timeit): calls this short otherwise measure the caches and threads
  the previous contender left behind.
- train: steady-state examples/s of the trainer's own step (`train.setup_train_step`, fp32, AdamW,
  the config's frozen groups) on a 1-device mesh, synthetic batches of `data.batch_spec`'s shapes;
  compile time apart. FLOPs: analytic (`models.flops.train_flops`: backward 2x forward where
  trained).

"others" is the share of all CPUs that other processes used during the row (well above 0%:
the timings are unreliable, and ours/torch inflated: PyTorch's OpenMP threads stall on a shared
CPU far more than XLA's fused code does, e.g. ViT-B queries 0.46 s on 1 thread, 3.4 s on 2).
"""

from __future__ import annotations

import argparse
import dataclasses
import ctypes
import datetime
import gc
import importlib.metadata
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import time

START = time.perf_counter()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
HERE = os.path.dirname(os.path.abspath(__file__))
COMMITTED_RESULTS = os.path.join(HERE, "RESULTS.md")

import encoders  # noqa: E402  (CPU info, interleaved timing, matmul limit, token batches)
import gpu as gpu_bench  # noqa: E402  (timed compile)
import maxsim as maxsim_bench  # noqa: E402  (MaxSim inputs)

import flax  # noqa: E402
import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from preflmr_jax import (  # noqa: E402
    config_files, data, evaluation, late_interaction, sharding, train)
from preflmr_jax.models import model_config as mc_lib  # noqa: E402
from preflmr_jax.models import flops as flops_lib  # noqa: E402
from preflmr_jax.models import preflmr  # noqa: E402
from preflmr_jax.testing import torch_reference  # noqa: E402

SECTIONS = ("encode", "maxsim", "train")  # the matmul limit always runs
VIT_B, VIT_L, TINY = "configs/release.py:vit_b", "configs/release.py:vit_l", "configs/tiny.py"


@dataclasses.dataclass(frozen=True)
class Settings:
  matmul_repeats: int
  repeats: int  # interleaved timed calls per encode / maxsim row
  encode: tuple  # (name, config, queries per call, documents per call or 0)
  maxsim: tuple  # (queries B, query tokens Lq)
  train: tuple  # (name, config, overrides, timed steps)


QUICK = Settings(
    matmul_repeats=3, repeats=3,
    encode=(("ViT-B", VIT_B, 2, 1),),
    maxsim=((1, 32), (8, 32)),
    train=(("tiny", TINY, {"batch_size": 8}, 5),
           ("ViT-B", VIT_B, {"batch_size": 2, "model.doc_maxlen": 128}, 2)))
FULL = Settings(
    matmul_repeats=10, repeats=5,
    encode=(("ViT-B", VIT_B, 16, 4), ("ViT-L", VIT_L, 4, 0)),
    maxsim=((1, 32), (8, 32), (1, 320), (8, 320)),
    # ViT-B at 2 queries: 3 GiB of state and 5 GiB of XLA temporaries on CPU (4 queries: 10.5).
    train=(("tiny", TINY, {"batch_size": 8}, 20),
           ("ViT-B", VIT_B, {"batch_size": 2}, 3)))


def log(msg):
  print(f"[{time.perf_counter() - START:6.1f}s] {msg}", flush=True)


def release_memory() -> float:
  """Frees what the last section left (and returns glibc's free pages to the OS: the
  reference model's gigabytes would otherwise stay resident under the train step's); -> RSS GiB."""
  gc.collect()
  try:
    ctypes.CDLL("libc.so.6").malloc_trim(0)
  except (OSError, AttributeError):  # not glibc
    pass
  return rss_gib()


def rss_gib() -> float:
  """This process's resident memory now (the table reports the peak)."""
  try:
    with open("/proc/self/statm") as f:
      return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30
  except OSError:
    return float("nan")


def dist_version(name):
  try:
    return importlib.metadata.version(name)
  except importlib.metadata.PackageNotFoundError:
    return None


def median_and_best(times: list[float]) -> tuple[float, float]:
  return statistics.median(times), min(times)


# ================================================================================= environment
def environment() -> dict:
  return {
      "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
      "python": platform.python_version(), "jax": jax.__version__, "flax": flax.__version__,
      "torch": torch.__version__, "transformers": transformers.__version__,
      "numpy": np.__version__, "colbert_ai": dist_version("colbert-ai"),
      "cpu": encoders.cpu_model(), "cores": os.cpu_count(), "machine": platform.machine(),
      "jax_devices": [str(d) for d in jax.devices()], "torch_threads": torch.get_num_threads(),
      "load_average_start": round(os.getloadavg()[0], 2), "gpu": gpu_found()}


def gpu_found() -> str | None:
  """`nvidia-smi -L` when a GPU is visible (these rows still run on the CPU), else None."""
  if not shutil.which("nvidia-smi"):
    return None
  try:
    out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20)
  except (OSError, subprocess.SubprocessError):
    return None
  if out.returncode != 0:
    return None
  return out.stdout.strip() or None


# ================================================================================ matmul limit
def matmul_limit(repeats: int) -> dict:
  clock = encoders.cpu_clock()
  gflops = encoders.matmul_gflops(2048, repeats)
  return {"jnp": gflops["jnp.dot"], "torch": gflops["torch.mm"], "limit": max(gflops.values()),
          "others": encoders.others_share(clock, encoders.cpu_clock())}


# ==================================================================================== encoding
def query_inputs(rng, mc, n):
  """[CLS] [Q] instruction ":" question [SEP] [MASK]..., and random pixels (NHWC)."""
  ids, mask = encoders.make_batch(rng, n, mc.query_maxlen, mc.text.vocab_size, query=True)
  ids[:, 4] = mc.instruction_token_id  # the instruction ends at position 4 (masked up to there)
  size = mc.vision.image_size
  pixels = rng.standard_normal((n, size, size, mc.vision.num_channels), dtype=np.float32)
  return [ids, mask, pixels]


def document_inputs(rng, mc, n):
  """[CLS] [D] text [SEP] [PAD]..., 256-512 real tokens of doc_maxlen."""
  return list(encoders.make_batch(rng, n, mc.doc_maxlen, mc.text.vocab_size, query=False))


def to_torch(inputs):
  ids, mask, *pixels = inputs
  out = [torch.from_numpy(ids).long(), torch.from_numpy(mask).long()]
  return out + [torch.from_numpy(p.transpose(0, 3, 1, 2).copy()) for p in pixels]


def encode_section(settings: Settings, limit: float, skip: set) -> list[dict]:
  rows = []
  for name, path, n_queries, n_docs in settings.encode:
    if name in skip:
      continue
    mc = mc_lib.PreFLMRConfig.from_dict(config_files.load_config(path).model)
    log(f"encode {name}: building the PyTorch model and converting its weights")
    start = time.perf_counter()
    reference = torch_reference.TorchPreFLMR(mc)
    params = torch_reference.flax_params(reference, mc)
    log(f"  built in {time.perf_counter() - start:.0f} s")
    rng = np.random.default_rng(0)
    cases = [("queries", query_inputs(rng, mc, n_queries), reference.queries)]
    if n_docs:
      cases.append(("documents", document_inputs(rng, mc, n_docs), reference.documents))
    for kind, inputs, torch_fn in cases:
      rows.append(encode_row(name, mc, kind, params, inputs, torch_fn, settings.repeats, limit))
      log("  " + " | ".join(encode_cells(rows[-1])))
    if n_docs:
      rows.append(bucket_row(name, mc, params, 4 * n_docs, settings.repeats, limit))
      log("  " + " | ".join(encode_cells(rows[-1])))
    log(f"  RSS {rss_gib():.1f} GiB")
    del reference, params, cases
  return rows


def encode_row(name, mc, kind, params, inputs, torch_fn, repeats, limit) -> dict:
  method = getattr(preflmr.PreFLMR, f"encode_{kind}")
  model = preflmr.PreFLMR(mc)
  fn = jax.jit(lambda p, *x: model.apply({"params": p}, *x, method=method))
  jax_in, torch_in = [jnp.asarray(x) for x in inputs], to_torch(inputs)
  compiled, compile_s, xla_flops = gpu_bench.compile_timed(fn, params, *jax_in)
  ours_fn = lambda: jax.block_until_ready(compiled(params, *jax_in))
  # Same computation: embeddings and masks of this very batch, ours vs torch.
  (emb, mask), (ref_emb, ref_mask) = ours_fn(), torch_fn(*torch_in)
  diff = float(np.abs(np.asarray(emb) - ref_emb.numpy()).max())
  masks_equal = bool(np.array_equal(np.asarray(mask), ref_mask.numpy()))
  clock = encoders.cpu_clock()
  times = encoders.timeit({"ours": ours_fn, "torch": lambda: torch_fn(*torch_in)}, repeats)
  others = encoders.others_share(clock, encoders.cpu_clock())
  (ours, ours_best), (ref, ref_best) = median_and_best(times["ours"]), median_and_best(times["torch"])
  n = inputs[0].shape[0]
  flops = flops_lib.encode_flops(mc, kind, n)
  tokens = (f"{mc.query_maxlen} tokens + {mc.vision.image_size}px image -> {mc.query_length}"
            if kind == "queries" else f"{mc.doc_maxlen} tokens")
  return {"name": f"{name} {kind}", "case": f"{n} x ({tokens})", "shape": name, "kind": kind,
          "batch": n, "ours_ex_s": n / ours, "torch_ex_s": n / ref, "speedup": ref / ours,
          "speedup_best_of": ref_best / ours_best,
          "ours_fraction_of_matmul": flops / ours / 1e9 / limit,
          "torch_fraction_of_matmul": flops / ref / 1e9 / limit,
          "model_gflop_per_example": flops / n / 1e9,
          "xla_gflop_per_example": xla_flops / n / 1e9 if xla_flops else None,
          "compile_s": compile_s, "max_abs_diff": diff, "masks_equal": masks_equal,
          "others": others}


def bucket_row(name, mc, params, n, repeats, limit) -> dict:
  """The eval binary's document encoding (evaluation.Encoder.documents: the batch padded to its
  longest document rounded up to DOC_LENGTH_MULTIPLE) vs padding every batch to doc_maxlen, on
  n documents of 135-225 real tokens (~180, as gpu.py). Same weights, ours only."""
  rng = np.random.default_rng(1)
  lengths = rng.integers(135, 226, n)
  mask = (np.arange(mc.doc_maxlen)[None] < lengths[:, None]).astype(np.int32)
  ids = np.where(mask, rng.integers(1000, mc.text.vocab_size, mask.shape), encoders.PAD)
  ids[:, 0], ids[:, 1] = encoders.CLS, encoders.D_MARK
  ids[np.arange(n), lengths - 1] = encoders.SEP
  ids = ids.astype(np.int32)
  width = -(-int(lengths.max()) // evaluation.DOC_LENGTH_MULTIPLE) * evaluation.DOC_LENGTH_MULTIPLE
  model = preflmr.PreFLMR(mc)
  fn = jax.jit(lambda p, *x: model.apply({"params": p}, *x,
                                         method=preflmr.PreFLMR.encode_documents))
  full, short = [jnp.asarray(ids), jnp.asarray(mask)], [jnp.asarray(ids[:, :width]),
                                                        jnp.asarray(mask[:, :width])]
  (e_full, m_full), (e_short, m_short) = fn(params, *full), fn(params, *short)
  diff = float(np.abs(np.asarray(e_full)[:, :width] - np.asarray(e_short)).max())
  m_full, m_short = np.asarray(m_full), np.asarray(m_short)
  masks_equal = not m_full[:, width:].any() and np.array_equal(m_full[:, :width], m_short)
  clock = encoders.cpu_clock()
  times = encoders.timeit({"short": lambda: jax.block_until_ready(fn(params, *short)),
                           "full": lambda: jax.block_until_ready(fn(params, *full))}, repeats)
  others = encoders.others_share(clock, encoders.cpu_clock())
  (t_short, best_short), (t_full, best_full) = (median_and_best(times[k])
                                                for k in ("short", "full"))
  flops = flops_lib.encode_flops(mc, "documents", n)  # at doc_maxlen: the padded work
  return {"name": f"{name} documents, eval binary", "shape": name, "kind": "documents_bucketed",
          "case": f"{n} x (135-225 of {mc.doc_maxlen} tokens): padded to {width} vs "
                  f"{mc.doc_maxlen}", "batch": n,
          "ours_ex_s": n / t_short, "torch_ex_s": n / t_full, "speedup": t_full / t_short,
          "speedup_best_of": best_full / best_short,
          "ours_fraction_of_matmul": None, "torch_fraction_of_matmul": flops / t_full / 1e9 / limit,
          "model_gflop_per_example": flops / n / 1e9, "xla_gflop_per_example": None,
          "compile_s": None, "max_abs_diff": diff, "masks_equal": masks_equal, "others": others,
          "reference": f"ours padded to {mc.doc_maxlen}"}


# ====================================================================================== MaxSim
def import_colbert():
  """(colbert_score, its config, None) or (None, None, why not)."""
  try:
    from colbert.infra.config import ColBERTConfig
    from colbert.modeling.colbert import colbert_score
  except Exception as e:  # noqa: BLE001 -- any import failure: report it, keep the rest
    return None, None, (f"colbert-ai not importable ({type(e).__name__}: {e}); install it for "
                        "this benchmark only: pip install colbert-ai==0.2.22 faiss-cpu ujson "
                        "GitPython gitdb smmap --no-deps")
  return colbert_score, ColBERTConfig(), None  # default: interaction='colbert', CPU


def maxsim_section(settings: Settings, limit: float) -> tuple[list[dict], str | None]:
  colbert_score, colbert_config, missing = import_colbert()
  if missing:
    log(missing)
  rows = []
  for b, lq in settings.maxsim:
    Q, D, D_mask = maxsim_bench.make_inputs(b, lq)
    jq, jd, jm = jnp.asarray(Q), jnp.asarray(D), jnp.asarray(D_mask)
    tq, td, tm = torch.from_numpy(Q), torch.from_numpy(D), torch.from_numpy(D_mask)
    # Chunk sizes from the default score-tile budget, as search.exact_search scores.
    chunk, qc = late_interaction.chunk_sizes(b, lq, len(D), D.shape[1],
                                             late_interaction.default_tile_bytes())
    fns = {f"maxsim_chunked({chunk},{qc})": lambda: late_interaction.maxsim_chunked(jq, jd, jm),
           "maxsim": lambda: late_interaction.maxsim(jq, jd, jm)}
    fns = {k: (lambda f=f: np.asarray(f())) for k, f in fns.items()}
    if colbert_score:
      fns["colbert"] = lambda: torch.stack(
          [colbert_score(tq[i:i + 1], td, tm, colbert_config) for i in range(b)]).numpy()
    with torch.inference_mode():
      outputs = {k: f() for k, f in fns.items()}  # also compiles ours
      clock = encoders.cpu_clock()
      times = encoders.timeit(fns, settings.repeats, warmup=0, block=3)
    others = encoders.others_share(clock, encoders.cpu_clock())
    flops = 2 * b * lq * maxsim_bench.N_DOCS * maxsim_bench.DOC_LEN * maxsim_bench.DIM
    ref = statistics.median(times["colbert"]) if colbert_score else None
    for method in list(fns)[:2]:
      t = statistics.median(times[method])
      rows.append({
          "name": f"maxsim B={b} Lq={lq}", "method": method, "queries": b, "query_tokens": lq,
          "case": (f"{b} x {lq} vs {maxsim_bench.N_DOCS} x {maxsim_bench.DOC_LEN} x "
                   f"{maxsim_bench.DIM}"),
          "ms": t * 1e3, "gflop_s": flops / t / 1e9, "fraction_of_matmul": flops / t / 1e9 / limit,
          "colbert_gflop_s": flops / ref / 1e9 if ref else None,
          "colbert_fraction_of_matmul": flops / ref / 1e9 / limit if ref else None,
          "speedup_vs_colbert": ref / t if ref else None,
          "max_abs_diff_vs_colbert": (float(np.abs(outputs[method] - outputs["colbert"]).max())
                                      if colbert_score else None),
          "others": others})
      log("  " + " | ".join(maxsim_cells(rows[-1])))
  return rows, missing


# ================================================================================== train step
def synthetic_batch(config, mc, mesh) -> dict:
  """`data.batch_spec` shapes: random token ids in the vocab, all-ones masks, random pixels."""
  rng = np.random.default_rng(0)
  batch = {}
  for key, spec in data.batch_spec(config, mc).items():
    if key.endswith("input_ids"):
      value = rng.integers(min(1000, mc.text.vocab_size // 2), mc.text.vocab_size, spec.shape)
    elif key.endswith("attention_mask"):
      value = np.ones(spec.shape)
    elif key == "pixel_values":
      value = rng.standard_normal(spec.shape)
    elif key == "positive_labels":  # each query's own positive only: document i * (1 + n)
      value = np.full(spec.shape, -1)
      value[:, 0] = np.arange(spec.shape[0]) * (1 + config.num_negatives)
    else:  # doc_labels: every document a distinct passage
      value = np.arange(spec.shape[0])
    batch[key] = jax.device_put(value.astype(spec.dtype),
                                sharding.batch_sharding(mesh, len(spec.shape),
                                                        config.logical_axis_rules))
  return batch


def train_section(settings: Settings, limit: float, skip: set) -> list[dict]:
  rows = []
  for name, path, overrides, steps in settings.train:
    if name in skip:
      continue
    log(f"train {name}: {overrides}")
    rows.append(train_row(name, path, overrides, steps, limit))
    log("  " + " | ".join(train_cells(rows[-1])))
    log(f"  RSS {release_memory():.1f} GiB")
  return rows


def train_row(name, path, overrides, steps, limit) -> dict:
  config = config_files.load_config(path, {"mesh.data": 1, "mesh.fsdp": 1, "mesh.tensor": 1,
                                           "num_negatives": 1, **overrides})
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  setup = train.setup_train_step(config, mesh)
  mc = setup.model_config
  batch = synthetic_batch(config, mc, mesh)
  init = jax.jit(setup.init_state, static_argnums=0, out_shardings=setup.state_shardings)
  state = init(config.seed)
  with jax.set_mesh(mesh), nn.logical_axis_rules(setup.rules):
    compiled, compile_s, xla_flops = gpu_bench.compile_timed(setup.train_step,
                                                             setup.abstract_state, batch)
  mem = compiled.memory_analysis()  # XLA's buffer assignment: state + the step's temporaries
  step_gib = None if mem is None else (mem.argument_size_in_bytes + mem.temp_size_in_bytes
                                       + mem.output_size_in_bytes - mem.alias_size_in_bytes) / 2**30
  clock, times = encoders.cpu_clock(), []
  for _ in range(steps + 1):  # the first step is a warm-up
    start = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - start)
  others = encoders.others_share(clock, encoders.cpu_clock())
  step_s = statistics.median(times[1:])
  queries, docs = config.batch_size, config.batch_size * (1 + config.num_negatives)
  trainable = flops_lib.trainable_groups(setup.labels)
  flops = flops_lib.train_flops(mc, queries, docs, trainable)
  return {"name": f"train {name}", "config": path, "overrides": overrides,
          "case": (f"{queries} queries + {docs} docs ({config.num_negatives} neg), query "
                   f"{mc.query_length} / doc {mc.doc_maxlen} tokens"),
          "queries": queries, "docs": docs, "steps": steps, "step_ms": step_s * 1e3,
          "queries_per_s": queries / step_s, "docs_per_s": docs / step_s, "compile_s": compile_s,
          "model_gflop_per_step": flops / 1e9,
          "xla_gflop_per_step": xla_flops / 1e9 if xla_flops else None,
          "fraction_of_matmul": flops / step_s / 1e9 / limit, "loss": float(metrics["loss"]),
          "step_gib": step_gib,
          "frozen": list(config.freeze), "others": others}


# ====================================================================================== report
HEADER = ["measurement", "case", "ours", "reference", "ours/ref", "ours %mm", "ref %mm", "others",
          "notes"]


PCT = lambda x: "-" if x is None else f"{x:.0%}"
RATIO = lambda x: "-" if x is None else f"{x:.2f}x"


def matmul_cells(mm: dict) -> list[str]:
  return ["matmul limit", "2048^3 fp32", f"jnp {mm['jnp']:.1f} GFLOP/s",
          f"torch {mm['torch']:.1f} GFLOP/s", RATIO(mm["jnp"] / mm["torch"]),
          PCT(mm["jnp"] / mm["limit"]), PCT(mm["torch"] / mm["limit"]), PCT(mm["others"]),
          f"limit {mm['limit']:.1f} GFLOP/s"]


def encode_cells(e: dict) -> list[str]:
  xla = e["xla_gflop_per_example"]
  return [f"encode {e['name']}", e["case"], f"{e['ours_ex_s']:.3g} ex/s",
          f"{e.get('reference', 'torch')} {e['torch_ex_s']:.3g} ex/s", RATIO(e["speedup"]), PCT(e["ours_fraction_of_matmul"]),
          PCT(e["torch_fraction_of_matmul"]), PCT(e["others"]),
          f"best-of {e['speedup_best_of']:.2f}x; max abs diff {e['max_abs_diff']:.1e}, masks "
          f"{'equal' if e['masks_equal'] else 'DIFFER'}; {e['model_gflop_per_example']:.3g} "
          f"GFLOP/ex (XLA {'-' if xla is None else f'{xla:.3g}'})"
          + ("" if e["compile_s"] is None else f"; compile {e['compile_s']:.0f} s")]


def maxsim_cells(m: dict) -> list[str]:
  diff, colbert = m["max_abs_diff_vs_colbert"], m["colbert_gflop_s"]
  return [m["name"], f"{m['method']}: {m['case']}", f"{m['gflop_s']:.1f} GFLOP/s",
          "n/a" if colbert is None else f"colbert_score {colbert:.1f} GFLOP/s",
          RATIO(m["speedup_vs_colbert"]), PCT(m["fraction_of_matmul"]),
          PCT(m["colbert_fraction_of_matmul"]), PCT(m["others"]),
          f"{m['ms']:.1f} ms" + ("" if diff is None else f"; max abs diff {diff:.1e}")]


def train_cells(t: dict) -> list[str]:
  xla = t["xla_gflop_per_step"]
  gib = "-" if t["step_gib"] is None else f"{t['step_gib']:.3g}"
  return [t["name"], t["case"], f"{t['queries_per_s']:.3g} queries/s", "-", "-",
          PCT(t["fraction_of_matmul"]), "-", PCT(t["others"]),
          f"step {t['step_ms']:.0f} ms (median of {t['steps']}); compile {t['compile_s']:.0f} s; "
          f"{gib} GiB (XLA buffers); "
          f"{t['model_gflop_per_step']:.4g} GFLOP/step (XLA {'-' if xla is None else f'{xla:.4g}'})"
          f"; loss {t['loss']:.3f}; frozen: {', '.join(t['frozen']) or 'none'}"]


def table_rows(r: dict) -> list[list[str]]:
  return ([matmul_cells(r["matmul"])] + [encode_cells(e) for e in r["encode"]]
          + [maxsim_cells(m) for m in r["maxsim"]] + [train_cells(t) for t in r["train"]])


def markdown_table(rows: list[list[str]]) -> str:
  lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
  lines += ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in rows]
  return "\n".join(lines)


def markdown(r: dict, table: str) -> str:
  env = r["env"]
  gpu = ((f"A GPU is visible ({env['gpu']}), but the rows above ran on the CPU. "
          if env["gpu"] else "No GPU on this machine: the rows above ran on the CPU. ")
         + "GPU figures (ViT-L train step MFU, encoding, MaxSim vs memory bandwidth) come from "
         "the prepared script `benchmarks/gpu.py` (`python benchmarks/gpu.py --quick --json "
         "/tmp/gpu.json --md /tmp/gpu.md` on an H100 / H200) and are in "
         "benchmarks/RESULTS_GPU.md.")
  notes = __doc__.split("Rows:", 1)[1].strip()
  lines = [
      "# Benchmark results", "",
      f"`python benchmarks/run.py{' --quick' if r['quick'] else ''}` ({env['date']}, "
      f"{r['elapsed_s']:.0f} s{'; skipped: ' + ', '.join(r['skipped']) if r['skipped'] else ''})",
      "",
      f"- device: CPU, {env['cpu']}, {env['cores']} logical cores ({env['machine']}); jax "
      f"devices {', '.join(env['jax_devices'])}; torch threads {env['torch_threads']}",
      f"- versions: python {env['python']}, jax {env['jax']}, flax {env['flax']}, torch "
      f"{env['torch']}, transformers {env['transformers']}, numpy {env['numpy']}, colbert-ai "
      f"{env['colbert_ai'] or 'not installed'}",
      f"- load: load average {env['load_average_start']} at the start, "
      f"{r['load_average_end']} at the end; other processes used up to "
      f"{r['other_processes_cpu_share']:.0%} of the CPUs during a row; peak RSS "
      f"{r['peak_rss_gib']:.1f} GiB",
      f"- matmul limit (2048^3 fp32, the faster of jnp and torch): {r['matmul']['limit']:.1f} "
      "GFLOP/s", "", table, "", "Rows:", "", notes, ""]
  if r["colbert_missing"]:
    lines += [f"MaxSim reference missing: {r['colbert_missing']}", ""]
  lines += ["## GPU", "", gpu, ""]
  return "\n".join(lines)


def headline(r: dict) -> dict:
  """The JSON summary: each headline figure is the worst (smallest) over the measured rows."""
  low = lambda xs: round(min(xs), 3) if xs else None
  mx = [m for m in r["maxsim"] if m["method"].startswith("maxsim_chunked")]
  vs_torch = [e for e in r["encode"] if "reference" not in e]
  return {
      "encoder_speedup_vs_pytorch": low([e["speedup"] for e in vs_torch]),
      "encoder_fraction_of_matmul": low([e["ours_fraction_of_matmul"] for e in vs_torch]),
      "eval_document_bucketing_speedup": low([e["speedup"] for e in r["encode"]
                                              if e not in vs_torch]),
      "maxsim_fraction_of_matmul": low([m["fraction_of_matmul"] for m in mx]),
      "maxsim_speedup_vs_colbert": (None if r["colbert_missing"] else
                                    low([m["speedup_vs_colbert"] for m in mx])),
      "maxsim_note": r["colbert_missing"],
      "train_queries_per_s": {t["name"]: round(t["queries_per_s"], 3) for t in r["train"]},
      "matmul_gflops": round(r["matmul"]["limit"], 1),
      "other_processes_cpu_share": round(r["other_processes_cpu_share"], 3),
      "quick": r["quick"], "skipped": r["skipped"], "elapsed_s": round(r["elapsed_s"], 1),
      "peak_rss_gib": round(r["peak_rss_gib"], 2),
      "rows": {"matmul": r["matmul"], "encode": r["encode"], "maxsim": r["maxsim"],
               "train": r["train"]},
      "env": r["env"],
  }


# ======================================================================================== main
def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true",
                      help="ViT-B only, small batches, fewer repeats (a few minutes on 2 cores)")
  parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
  where = parser.add_mutually_exclusive_group()
  where.add_argument("--results", help="markdown file to write the results to (overwritten)")
  where.add_argument("--write-results", action="store_true",
                     help=f"overwrite the committed {os.path.relpath(COMMITTED_RESULTS)}")
  parser.add_argument("--skip", default="", help=f"comma list of sections ({', '.join(SECTIONS)})"
                      " and shapes (ViT-B, ViT-L, tiny) to leave out, e.g. while iterating")
  args = parser.parse_args()
  if args.write_results and (args.quick or args.skip):
    parser.error("--write-results records a full run: drop --quick and --skip, or write "
                 "elsewhere with --results PATH")
  results_path = COMMITTED_RESULTS if args.write_results else args.results
  settings = QUICK if args.quick else FULL
  skip = set(filter(None, args.skip.split(",")))
  known = set(SECTIONS) | {row[0] for row in settings.encode + settings.train}
  if skip - known:
    parser.error(f"--skip: unknown {sorted(skip - known)}; known: {sorted(known)}")
  if jax.default_backend() != "cpu":
    parser.error(f"JAX runs on {jax.default_backend()}: these rows compare with PyTorch on the "
                 "CPU; unset JAX_PLATFORMS, or use benchmarks/gpu.py for the GPU")
  torch.set_num_threads(os.cpu_count())

  r = {"quick": args.quick, "skipped": sorted(skip), "env": environment()}
  env = r["env"]
  log(f"python {env['python']}  jax {env['jax']}  flax {env['flax']}  torch {env['torch']}  "
      f"transformers {env['transformers']}  colbert-ai {env['colbert_ai']}")
  log(f"cpu: {env['cpu']} ({env['cores']} cores)  load average {env['load_average_start']}  "
      f"torch threads {env['torch_threads']}  gpu: {env['gpu'] or 'none'}")

  # ---------------------------------------------------------------------------- sections
  r["matmul"] = matmul_limit(settings.matmul_repeats)
  limit = r["matmul"]["limit"]
  log(" | ".join(matmul_cells(r["matmul"])))
  r["encode"] = [] if "encode" in skip else encode_section(settings, limit, skip)
  log(f"RSS {release_memory():.1f} GiB")
  r["maxsim"], r["colbert_missing"] = ([], None) if "maxsim" in skip else maxsim_section(
      settings, limit)
  r["train"] = [] if "train" in skip else train_section(settings, limit, skip)

  # ------------------------------------------------------------------------------ report
  r["load_average_end"] = round(os.getloadavg()[0], 2)
  r["other_processes_cpu_share"] = max(
      [r["matmul"]["others"]] + [x["others"] for s in ("encode", "maxsim", "train") for x in r[s]])
  r["elapsed_s"] = time.perf_counter() - START
  r["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
  table = markdown_table(table_rows(r))
  print("\n" + table + "\n")
  if results_path:
    os.makedirs(os.path.dirname(os.path.abspath(results_path)), exist_ok=True)
    with open(results_path, "w") as f:
      f.write(markdown(r, table))
    print(f"wrote {results_path} ({r['elapsed_s']:.0f} s)")
  if args.json:
    print(json.dumps(headline(r), default=str))


if __name__ == "__main__":
  main()
