"""PreFLMR ViT-L on one GPU: train-step throughput and MFU, encoding throughput, MaxSim bandwidth.

  python benchmarks/gpu.py --quick --json /tmp/gpu.json --md /tmp/gpu.md   # H100 / H200
  python benchmarks/gpu.py --json /tmp/gpu.json --md /tmp/gpu.md           # more rows
  JAX_PLATFORMS=cpu python benchmarks/gpu.py --tiny --json /tmp/g.json --md /tmp/g.md  # CPU smoke

Train: the trainer's own step (`train.setup_train_step`) for configs/release.py:vit_l (vision
frozen, AdamW) in bf16 compute with fp32 master weights, on random batches padded like real ones
(queries ~20 real tokens, documents ~180 of doc_maxlen). Rows are QUERIES:VARIANT; a variant is a
set of config overrides (VARIANTS: the reference recipe `base`; `rbg` dropout bits; `cudnn` fused
attention, which drops attention-probability dropout; remat policies; `cudnn_scan` scanned layer
stacks; `cudnn_scan_remat` scanned, saving only each layer's input; `*_graphs` scanned stacks,
asking XLA to record their loops into CUDA graphs too (an XLA option); `*_xlanorm` scanned stacks
with softmax and layer norms left to XLA's own kernels instead of Triton fusions (an XLA option: a
shorter compile); `cudnn_pallas` the loss's MaxSim as the fused Pallas kernel). The rows go in
groups of --compile_group: a group's rows are lowered, compiled side by side (minutes each), then
timed one by one with nothing else compiling. MFU =
model FLOPs (`preflmr_jax/models/flops.py`: 2 per MAC of every matmul at the padded lengths;
backward = 2x forward for trainable groups; the frozen vision tower forward only) / step time / the
card's peak dense bf16 FLOP/s. "XLA util" uses XLA's cost_analysis FLOPs of the compiled step
instead. On a GPU, "launches" is what a step makes the host issue (CUDA graphs and the thunks
outside them) and "slice copy GiB" what its dynamic slices copy (a scanned stack's layer slices),
read from XLA's dump of the compiled step (`preflmr_jax/tools/gpu_launches.py`).
Encode: jitted `encode_queries` / `encode_documents`, random bf16 weights, with XLA and with cuDNN
attention (their embeddings' max difference shows the fused path computes the same thing).
MaxSim: `late_interaction.maxsim_chunked` of a query batch against an on-device corpus for a few
score-tile budgets, and the fused kernel (`maxsim_kernel.maxsim_pallas`, bf16; on a GPU also with
the block shapes of --pallas_blocks); corpus bytes read per second are compared with a device copy
(`x + 1`: read + write) measured in the same run.
A failing measurement is recorded with its error and the run goes on; --json / --md are rewritten
after every measurement, so a run that is cut off keeps what it measured.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import copy
import datetime
import glob
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback

START = time.perf_counter()
# The largest train rows need more than JAX's default 75% of device memory (nothing else runs).
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from preflmr_jax import (  # noqa: E402
    config_files, data, late_interaction, maxsim_kernel, optimizer, sharding, train)
from preflmr_jax.models import model_config as mc_lib  # noqa: E402
from preflmr_jax.models.flops import encode_flops, train_flops, trainable_groups  # noqa: E402
from preflmr_jax.models import preflmr  # noqa: E402
from preflmr_jax.tools import gpu_launches  # noqa: E402

CLS, SEP, MASK, Q_MARK, D_MARK = 101, 102, 103, 1, 2
# Dense bf16 tensor-core peak and nominal HBM bandwidth by device_kind substring, first match wins
# (NVL parts have other clocks: pass --peak_tflops).
PEAK_TFLOPS = {"NVL": None, "H200": 989.4, "H100 80GB HBM3": 989.4, "H100 SXM": 989.4}
HBM_TBPS = {"NVL": None, "H200": 4.8, "H100 80GB HBM3": 3.35, "H100 SXM": 3.35}
_CUDNN = {"dropout_prng_impl": "rbg", "model.attention": "cudnn",
          **{f"model.{s}.attention_dropout_rate": 0.0 for s in ("text", "vision", "mapping")}}
# Rows, most wanted first (a run cut short keeps the groups it timed): the layouts and the compile
# flag at 64 queries, the largest batches and the MaxSim kernel, then the reference recipe and what
# each switch adds. 128 queries without remat need more memory than an H100 has.
DEFAULT_ROWS = ("64:cudnn,64:cudnn_scan,64:cudnn_scan_xlanorm,128:cudnn_remat,128:cudnn_scan_remat,"
                "64:cudnn_pallas,32:base,32:rbg,32:cudnn")
MORE_ROWS = "128:remat,128:remat_dots,64:cudnn_scan_graphs"
# The GPU MaxSim kernel's other block shapes (per program: queries x documents x query-token tile x
# document-token tile; powers of two).
PALLAS_BLOCKS = "4x16x64x64,16x4x64x64,8x8x128x64,8x8x64x32,8x8x32x64"
# `_graphs`: asks XLA to record the scanned layers' loops (WHILE) and conditionals into CUDA graphs
# too. Not a default row: compiled for an H100 on a CPU host, the step's thunks stay the same
# (docs/performance.md, "What a GPU step issues"). The option takes the whole list of command
# types (XLA refuses "+WHILE").
_GRAPHS = {"xla_gpu_enable_command_buffer": "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,"
                                            "CONDITIONAL"}
# `_xlanorm`: without XLA's rewrite of softmax and layer norms into Triton fusions, whose tiling
# search is most of the step's HLO passes on a GPU (a shorter compile: docs/performance.md, "Where
# that GPU compile goes"); what it costs or saves in step time is the row's to measure.
_XLA_NORMS = {"xla_disable_hlo_passes": "triton-softmax-rewriter"}
# The train-step rows' settings: dotted config overrides, and XLA compile options (`xla_*` keys,
# `compile(compiler_options)`). Master weights stay fp32 in all.
VARIANTS = {
    "base": {},  # the reference recipe: threefry dropout everywhere, XLA attention
    "rbg": {"dropout_prng_impl": "rbg"},  # dropout bits from the GPU's generator
    "cudnn": _CUDNN,  # + cuDNN fused attention (which has no attention dropout)
    "cudnn_remat": {**_CUDNN, "model.remat": True, "model.remat_policy": "dots_saveable"},
    "remat": {"model.remat": True, "model.remat_policy": "nothing_saveable"},
    "remat_dots": {"model.remat": True, "model.remat_policy": "dots_saveable"},
    "cudnn_scan": {**_CUDNN, "model.scan_layers": True},  # one scanned layer per stack
    # + the forward recomputed in the backward: a scanned layer saves only its input, so its stacks
    # take little memory and little copying (docs/performance.md, "What a GPU step issues").
    "cudnn_scan_remat": {**_CUDNN, "model.scan_layers": True, "model.remat": True,
                         "model.remat_policy": "nothing_saveable"},
    "cudnn_pallas": {**_CUDNN, "maxsim_impl": "pallas"},  # the loss's MaxSim as one kernel
    "cudnn_scan_graphs": {**_CUDNN, "model.scan_layers": True, **_GRAPHS},
    "scan_graphs": {"dropout_prng_impl": "rbg", "model.scan_layers": True, **_GRAPHS},
    "cudnn_scan_xlanorm": {**_CUDNN, "model.scan_layers": True, **_XLA_NORMS},
}


def variant_settings(variant: str) -> tuple[dict, dict]:
  """(config overrides, XLA compile options) of a train-step variant."""
  xla = {k: v for k, v in VARIANTS[variant].items() if k.startswith("xla_")}
  return {k: v for k, v in VARIANTS[variant].items() if k not in xla}, xla


def log(msg):
  print(f"[{time.perf_counter() - START:6.1f}s] {msg}", flush=True)


def with_overrides(config, overrides):
  """A copy of `config` with dotted keys set ("model.text.attention_dropout_rate": 0.0)."""
  return config_files.apply_overrides(copy.deepcopy(config), overrides)


def lookup(table, kind):
  return next((v for k, v in table.items() if k.lower() in kind.lower()), None)


# ---------------------------------------------------------------------------------- helpers
def make_batch(config, mc, queries, query_tokens, doc_tokens, seed=0):
  """Random inputs shaped as `data.batch_spec`: [CLS] [Q]/[D] text [SEP], then [MASK] (queries) or
  [PAD] (documents) padding; ~query_tokens / doc_tokens real tokens (+-25%)."""
  rng = np.random.default_rng(seed)
  spec = data.batch_spec(config, mc, queries)
  vocab = mc.text.vocab_size

  def ids_and_mask(shape, target, marker, pad):
    n, length = shape
    lengths = np.clip(rng.integers(int(0.75 * target), int(1.25 * target) + 1, n), 6, length)
    ids = rng.integers(min(1000, vocab // 2), vocab, shape)
    mask = np.arange(length)[None] < lengths[:, None]
    ids[:, 0], ids[:, 1] = CLS, marker
    ids[np.arange(n), lengths - 1] = SEP
    ids[~mask] = pad
    return ids.astype(np.int32), mask.astype(np.int32)

  q_ids, q_mask = ids_and_mask(spec["query_input_ids"].shape, query_tokens, Q_MARK, MASK)
  q_ids[:, 4] = mc.instruction_token_id  # the instruction's ":" (text is masked up to there)
  d_ids, d_mask = ids_and_mask(spec["doc_input_ids"].shape, min(doc_tokens, mc.doc_maxlen),
                               D_MARK, 0)
  positives = np.full(spec["positive_labels"].shape, -1, np.int32)
  positives[:, 0] = np.arange(len(positives)) * (spec["doc_labels"].shape[0] // len(positives))
  known = dict(query_input_ids=q_ids, query_attention_mask=q_mask, doc_input_ids=d_ids,
               doc_attention_mask=d_mask, pixel_values=rng.standard_normal(
                   spec["pixel_values"].shape, dtype=np.float32),
               positive_labels=positives)  # each query's own positive: document i * (1 + n)
  batch = {}
  for key, s in spec.items():
    # Other keys (e.g. doc_labels) get the row index: every document a distinct passage.
    rows = np.arange(s.shape[0]).reshape((-1,) + (1,) * (len(s.shape) - 1))
    batch[key] = known[key] if key in known else np.broadcast_to(rows, s.shape).astype(s.dtype)
    assert batch[key].shape == s.shape and batch[key].dtype == s.dtype, key
  return batch


def random_params(abstract, dtype, seed=1):
  """N(0, 0.02) arrays shaped as `abstract`, one small jitted draw per distinct shape (one jit of
  the whole tree, or of slices of one buffer, took minutes to compile for ViT-L)."""
  leaves, treedef = jax.tree.flatten(abstract)
  draw = jax.jit(lambda key, shape: 0.02 * jax.random.normal(key, shape, dtype),
                 static_argnums=1)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return treedef.unflatten([draw(k, tuple(a.shape)) for k, a in zip(keys, leaves)])


def time_loop(fn, iters, warmup=1):
  """Mean seconds per call over `iters` back-to-back calls (one sync at the end)."""
  for _ in range(warmup):
    jax.block_until_ready(fn())
  t = time.perf_counter()
  for _ in range(iters):
    out = fn()
  jax.block_until_ready(out)
  return (time.perf_counter() - t) / iters


def compile_lowered(lowered, options=None):
  """-> (compiled, seconds, XLA FLOPs of the compiled (else the lowered) computation or None).
  `options`: XLA compiler options. Thread-safe: the rows' compiles run side by side (XLA releases
  the GIL)."""
  t = time.perf_counter()
  compiled = lowered.compile(options)
  seconds = time.perf_counter() - t
  for stage in (compiled, lowered):
    try:
      cost = stage.cost_analysis()
      cost = cost[0] if isinstance(cost, (list, tuple)) else cost
      if (cost or {}).get("flops"):
        return compiled, seconds, float(cost["flops"])
    except Exception:  # pylint: disable=broad-except  (not every backend implements it)
      pass
  return compiled, seconds, None


def compile_timed(jitted, *args):
  """Lowers and compiles: -> (compiled, compile seconds, XLA FLOPs or None)."""
  return compile_lowered(jitted.lower(*args))


def compile_all(lowered: dict, options: dict | None = None) -> dict:
  """name -> compile_lowered(...) or the exception, compiling every entry at once (with
  `options[name]`, if any)."""
  def one(name):
    try:
      return compile_lowered(lowered[name], (options or {}).get(name))
    except Exception as e:  # pylint: disable=broad-except
      traceback.print_exc()
      return e
  with concurrent.futures.ThreadPoolExecutor(max(1, len(lowered))) as pool:
    return dict(zip(lowered, pool.map(one, lowered)))


def profile(fn, calls, top=40):
  """Device time of `calls` calls of fn by kernel (jax.profiler trace, read with ProfileData):
  per-stream totals and the `top` kernels, in ms per call, with their HLO op where recorded; and
  the host's time by event name (inclusive: an event's time holds its children's), to see what
  the host does while the device waits."""
  folder = tempfile.mkdtemp()
  jax.block_until_ready(fn())
  options = jax.profiler.ProfileOptions()
  options.python_tracer_level = 0  # XLA's and the runtime's events, not Python's (nor the trace's)
  with jax.profiler.trace(folder, profiler_options=options):
    for _ in range(calls):
      out = fn()
    jax.block_until_ready(out)
  data = jax.profiler.ProfileData.from_file(
      glob.glob(f"{folder}/**/*.xplane.pb", recursive=True)[0])
  lines, kernels, ops, host = (collections.Counter(), collections.Counter(), {},
                               collections.Counter())
  for plane in data.planes:
    if plane.name.startswith("/host:"):
      for line in plane.lines:
        for event in line.events:
          host[event.name[:160]] += event.duration_ns / 1e6 / calls
    if not plane.name.startswith("/device:"):
      continue
    for line in plane.lines:
      for event in line.events:
        ms = event.duration_ns / 1e6 / calls
        lines[f"{plane.name} {line.name}"] += ms
        kernels[(line.name, event.name)] += ms
        if (line.name, event.name) not in ops:
          stats = dict(event.stats)
          ops[(line.name, event.name)] = str(stats.get("hlo_op") or stats.get("long_name") or
                                             "")[:160]
  return {"lines_ms": dict(lines.most_common()),
          "top": [{"line": l, "kernel": k[:160], "ms": ms, "hlo_op": ops[(l, k)]}
                  for (l, k), ms in kernels.most_common(top)],
          "host_top": [{"event": name, "ms": ms} for name, ms in host.most_common(top)]}


def memory_stats():
  stats = jax.devices()[0].memory_stats() or {}
  return {k: stats[k] for k in ("peak_bytes_in_use", "bytes_in_use", "bytes_limit") if k in stats}


def gib(n):
  return None if n is None else n / 2 ** 30


class Bench:
  """The settings, the results so far, and the state shared between measurements."""

  def __init__(self, args):
    self.args = args
    self.config = config_files.load_config(args.config)
    self.config.model.dtype = "bfloat16"  # compute; param_dtype stays float32 (master weights)
    if self.config.model.param_dtype != "float32":
      raise ValueError("master weights must be float32 (config.model.param_dtype)")
    self.config.mesh = dict(data=1, fsdp=1, tensor=1)
    self.mc = mc_lib.PreFLMRConfig.from_dict(self.config.model)
    self.mesh = sharding.make_mesh(self.config.mesh, jax.devices()[:1])
    self.rules = tuple(tuple(rule) for rule in self.config.logical_axis_rules)
    device = jax.devices()[0]
    peak = args.peak_tflops or lookup(PEAK_TFLOPS, device.device_kind)
    self.peak = peak * 1e12 if peak else None
    self.results = {
        "device_kind": device.device_kind, "platform": device.platform, "jax": jax.__version__,
        "python": platform.python_version(), "argv": sys.argv[1:], "config": args.config,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "peak_bf16_tflops": peak, "nominal_hbm_tbps": lookup(HBM_TBPS, device.device_kind),
        "model": dict(dtype=self.mc.dtype, param_dtype=self.mc.param_dtype, output=self.mc.output,
                      query_maxlen=self.mc.query_maxlen, query_length=self.mc.query_length,
                      doc_maxlen=self.mc.doc_maxlen, num_negatives=self.config.num_negatives,
                      freeze=list(self.config.freeze)),
        "copy": [], "maxsim": [], "train": [], "encode": []}
    self.setups, self.state, self.init_state = {}, None, None

  def save(self):
    self.results["memory_gib"] = {k: gib(v) for k, v in memory_stats().items()}
    self.results["elapsed_s"] = time.perf_counter() - START
    if self.args.json:
      with open(self.args.json, "w") as f:
        json.dump(self.results, f, indent=1)
    if self.args.md:
      with open(self.args.md, "w") as f:
        f.write(markdown(self.results))

  def guarded(self, section, fn, *args):
    """Runs a section's shared setup + measurements; a setup failure becomes an error row."""
    try:
      fn(*args)
    except Exception as e:  # pylint: disable=broad-except
      traceback.print_exc()
      self.results[section].append({"name": "setup", "error": f"{type(e).__name__}: {e}"[:2000]})

  def attempt(self, section, name, fn, *args):
    """Runs one measurement; an exception becomes an error row and the run goes on."""
    log(f"{section}: {name}")
    try:
      row = {"name": name, **fn(*args)}
    except Exception as e:  # pylint: disable=broad-except
      traceback.print_exc()
      row = {"name": name, "error": f"{type(e).__name__}: {e}"[:2000]}
    self.results[section].append(row)
    peak = memory_stats().get("peak_bytes_in_use")
    log(f"  {json.dumps(row, default=str)[:300]}"
        + ("" if peak is None else f"\n  peak device memory so far {gib(peak):.1f} GiB"))
    self.save()

  # ---------------------------------------------------------------------------- sections
  def copy_bandwidth(self, nbytes, iters):
    x = jnp.ones((nbytes // 4,), jnp.float32)
    add = jax.jit(lambda a: a + 1)  # reads and writes every byte; XLA cannot elide it
    seconds = time_loop(lambda: add(x), iters)
    return {"bytes": nbytes, "ms": seconds * 1e3, "gb_per_s": 2 * nbytes / seconds / 1e9}

  def maxsim_section(self, n_docs, batches, lq, tiles, iters, ld=180, dim=128):
    """bf16, then fp32 corpora of n_docs documents; bf16 rows for each score-tile budget."""
    block = min(n_docs, 4096)  # tiled: fewer than 2^32 random numbers, values do not matter
    make = lambda key: jnp.tile(jax.random.normal(key, (block, ld, dim), jnp.bfloat16),
                                (n_docs // block, 1, 1))
    D = jax.jit(make)(jax.random.key(2))
    lengths = jax.random.randint(jax.random.key(3), (n_docs,), 32, ld + 1)
    D_mask = jnp.arange(ld)[None] < lengths[:, None]
    for dtype in ("bfloat16", "float32"):
      D = D.astype(dtype)  # rebinding frees the bf16 corpus
      for b in batches:
        Q = jax.random.normal(jax.random.key(4), (b, lq, dim), jnp.float32)
        Q = (Q / jnp.linalg.norm(Q, axis=-1, keepdims=True)).astype(dtype)
        for tile in (tiles if dtype == "bfloat16" else tiles[:1]):
          self.attempt("maxsim", f"{dtype} {b}x{lq} tile {tile >> 20} MiB", self.maxsim, D,
                       D_mask, Q, tile, iters)
        if dtype == "bfloat16":  # the fused kernel: no token scores in HBM
          self.attempt("maxsim", f"{dtype} {b}x{lq} pallas", self.maxsim, D, D_mask, Q, None,
                       iters)
          nvidia = "nvidia" in self.results["device_kind"].lower()  # Triton: CUDA only
          for blocks in self.args.pallas_blocks if nvidia else ():
            self.attempt("maxsim", f"{dtype} {b}x{lq} pallas {'x'.join(map(str, blocks))}",
                         self.maxsim, D, D_mask, Q, None, iters, blocks)

  def maxsim(self, D, D_mask, Q, tile_bytes, iters, blocks=None):
    """maxsim_chunked with `tile_bytes`, or (None) maxsim_kernel.maxsim_pallas (GPU `blocks`)."""
    (n, ld, dim), (b, lq, _) = D.shape, Q.shape
    if tile_bytes is None:
      chunk = query_chunk = None
      run = lambda: maxsim_kernel.maxsim_pallas(Q, D, D_mask, gpu_blocks=blocks)
    else:
      chunk, query_chunk = late_interaction.chunk_sizes(b, lq, n, ld, tile_bytes)
      run = lambda: late_interaction.maxsim_chunked(Q, D, D_mask, tile_bytes=tile_bytes)
    seconds = time_loop(run, iters)
    tflops = 2 * b * n * lq * ld * dim / seconds / 1e12
    peak = self.results["peak_bf16_tflops"]
    corpus_gbps = (D.nbytes + D_mask.nbytes) / seconds / 1e9
    copy_bw = next((c["gb_per_s"] for c in self.results["copy"] if "gb_per_s" in c), None)
    return {"dtype": str(D.dtype), "queries": b, "query_tokens": lq, "docs": n, "doc_tokens": ld,
            "dim": dim, "tile_mib": None if tile_bytes is None else tile_bytes / 2**20,
            "chunk_size": chunk,
            "query_chunk": query_chunk, "ms": seconds * 1e3,
            "tflop_per_s": tflops, "of_peak": tflops / peak if peak else None,
            "docs_per_s": n / seconds,
            "corpus_gb_per_s": corpus_gbps, "of_copy_bw": corpus_gbps / copy_bw if copy_bw else None,
            # f32 token scores written and read back once, if XLA does not fuse matmul and max
            "score_gb_per_s_if_unfused": 8 * b * lq * n * ld / seconds / 1e9}

  def encode_section(self, n, iters):
    """Both encoders with XLA and with cuDNN attention (same bf16 weights): speed, agreement."""
    params = random_params(preflmr.abstract_params(self.mc), jnp.bfloat16)  # serving weights
    batch = make_batch(self.config, self.mc, n, self.args.query_tokens, self.args.doc_tokens)
    inputs = {"queries": [jnp.asarray(batch[k]) for k in
                          ("query_input_ids", "query_attention_mask", "pixel_values")],
              "documents": [jnp.asarray(batch[k][:n]) for k in
                            ("doc_input_ids", "doc_attention_mask")]}
    methods = {"queries": preflmr.PreFLMR.encode_queries,
               "documents": preflmr.PreFLMR.encode_documents}
    lowered = {}
    for attention, overrides in (("xla", {}), ("cudnn", _CUDNN)):
      mc = mc_lib.PreFLMRConfig.from_dict(with_overrides(self.config, overrides).model)
      for kind, method in methods.items():
        model = preflmr.PreFLMR(mc)
        fn = jax.jit(lambda p, *x, model=model, method=method: model.apply(
            {"params": p}, *x, method=method))
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
          try:
            lowered[(kind, attention)] = fn.lower(params, *inputs[kind])
          except Exception as e:  # pylint: disable=broad-except
            traceback.print_exc()
            lowered[(kind, attention)] = e
    log(f"encode: compiling {len(lowered)} functions at once")
    done = compile_all({k: v for k, v in lowered.items() if not isinstance(v, Exception)})
    compiled = {k: done.get(k, v) for k, v in lowered.items()}  # XLA rows first: the reference
    outputs = {}
    for (kind, attention), c in compiled.items():
      self.attempt("encode", f"{kind} {n} {attention}", self.encode, kind, attention, c, params,
                   inputs[kind], iters, outputs)

  def encode(self, kind, attention, compiled, params, inputs, iters, outputs):
    if isinstance(compiled, Exception):
      raise compiled
    compiled, compile_s, hw = compiled
    seconds = time_loop(lambda: compiled(params, *inputs), iters)
    (emb, mask) = outputs[(kind, attention)] = compiled(params, *inputs)
    n, flops = inputs[0].shape[0], encode_flops(self.mc, kind, inputs[0].shape[0])
    row = {"kind": kind, "attention": attention, "batch": n, "compile_s": compile_s,
           "ms": seconds * 1e3,
           "tokens": self.mc.query_length if kind == "queries" else self.mc.doc_maxlen,
           "examples_per_s": n / seconds, "model_tflop": flops / 1e12,
           "xla_tflop": hw / 1e12 if hw else None, "tflop_per_s": flops / seconds / 1e12,
           "mfu": flops / seconds / self.peak if self.peak else None}
    if attention != "xla" and (kind, "xla") in outputs:  # same weights: embeddings must agree
      ref = outputs[(kind, "xla")][0]
      row["max_abs_diff_vs_xla"] = float(jnp.max(jnp.abs(emb - ref) * mask[..., None]))
    return row

  def setup(self, variant, queries):
    """(config, StepSetup) of one train row."""
    if (variant, queries) not in self.setups:
      config = with_overrides(self.config, variant_settings(variant)[0])
      config.batch_size = queries
      self.setups[(variant, queries)] = config, train.setup_train_step(config, self.mesh)
    return self.setups[(variant, queries)]

  def lower_train(self, queries, variant):
    config, setup = self.setup(variant, queries)
    batch = make_batch(config, self.mc, queries, self.args.query_tokens, self.args.doc_tokens)
    batch = {k: jax.device_put(v, sharding.batch_sharding(self.mesh, v.ndim, setup.rules))
             for k, v in batch.items()}
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(setup.rules):
      return setup.train_step.lower(setup.abstract_state, batch), batch

  def fresh_state(self, config, setup):
    """Random fp32 params (built once per parameter layout, then carried from row to row: rows of
    one layout, per-layer or scanned, have the same state shapes but the dropout key's), AdamW
    state, the row's dropout key."""
    if (self.state is None or any(x.is_deleted() for x in jax.tree.leaves(self.state.params))
        or jax.tree.structure(self.state.params) != jax.tree.structure(
            setup.abstract_state.params)):
      self.state = None  # frees the other layout's state first
      params = random_params(setup.abstract_state.params, jnp.float32)
      self.state = train.TrainState(
          step=jnp.int32(0), params=params, opt_state=jax.jit(setup.tx.init)(params),
          rng=None, nonfinite_steps=jnp.int32(0), first_nonfinite_step=jnp.int32(-1))
    key = jax.random.key_data(jax.random.key(0, impl=config.dropout_prng_impl))
    return jax.device_put(self.state.replace(rng=key), setup.state_shardings)

  def train(self, queries, variant, compiled, batch, steps, dump=None):
    if isinstance(compiled, Exception):
      raise compiled
    compiled, compile_s, hw = compiled
    config, setup = self.setup(variant, queries)
    docs = queries * (1 + config.num_negatives)
    row = {"queries": queries, "docs": docs, "variant": variant, "compile_s": compile_s,
           **{k.replace("model.", ""): v for k, v in VARIANTS[variant].items()
              if "dropout_rate" not in k}}
    issued = gpu_launches.read_or_error(dump) if dump else {}  # an unread dump costs the counts
    if "error" in issued:
      row["launches_error"] = issued["error"][:500]
    elif issued:
      row.update(launches=issued["launches"], kernels=issued["kernels"],
                 launches_by_kind=issued["by_kind"], slice_copy_gib=gib(issued["slice_copy_bytes"]))
    mem, stats = compiled.memory_analysis(), memory_stats()
    if mem is not None:  # bytes beyond the (donated) arguments, from XLA's buffer assignment
      need = mem.temp_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
      row["step_gib"] = gib(need)
      if "bytes_limit" in stats and stats["bytes_in_use"] + need > stats["bytes_limit"]:
        free = gib(stats["bytes_limit"] - stats["bytes_in_use"])
        return {**row, "skipped": f"needs {gib(need):.1f} GiB, {free:.1f} GiB free"}
    state = self.fresh_state(config, setup)

    def step():
      nonlocal state
      state, metrics = compiled(state, batch)
      return metrics

    seconds = time_loop(step, steps, warmup=2)
    loss = float(step()["loss"])
    if self.args.profile == f"{queries}:{variant}":
      self.results["profile"] = {"row": self.args.profile, **profile(step, 3)}
    self.state = state
    trainable = trainable_groups(setup.labels)
    flops = train_flops(self.mc, queries, docs, trainable)
    counts = optimizer.count_trainable(setup.abstract_state.params, setup.labels)
    return {**row, "step_ms": seconds * 1e3, "queries_per_s": queries / seconds,
            "docs_per_s": docs / seconds, "model_tflop": flops / 1e12,
            "xla_tflop": hw / 1e12 if hw else None, "tflop_per_s": flops / seconds / 1e12,
            "mfu": flops / seconds / self.peak if self.peak else None,
            "xla_util": hw / seconds / self.peak if self.peak and hw else None,
            "loss": loss, "params_total": counts["total"],
            "params_trainable": counts["trainable"], "trainable_groups": sorted(trainable)}

  def train_section(self, rows, steps, group):
    """Times the rows `group` at a time: a group's steps are lowered and compiled side by side,
    then timed one by one with nothing else running."""
    for start in range(0, len(rows), group):
      self.train_group(rows[start:start + group], steps)
    self.state = None  # frees the train state

  def train_group(self, rows, steps):
    lowered, batches = {}, {}
    for queries, variant in rows:
      name = f"{queries}:{variant}"
      log(f"train: lowering {name}")
      try:
        lowered[name], batches[name] = self.lower_train(queries, variant)
      except Exception as e:  # pylint: disable=broad-except
        traceback.print_exc()
        self.results["train"].append({"name": name, "error": f"{type(e).__name__}: {e}"[:2000]})
    log(f"train: compiling {len(lowered)} steps at once")
    # On a GPU XLA also dumps each step's thunks: the launches it makes the host issue.
    dumps = ({name: tempfile.mkdtemp() for name in lowered}
             if jax.devices()[0].platform == "gpu" else {})
    options = {name: {**variant_settings(name.partition(":")[2])[1],
                      **(gpu_launches.dump_options(dumps[name]) if name in dumps else {})}
               for name in lowered}
    try:
      compiled = compile_all(lowered, options)
      for queries, variant in rows:
        name = f"{queries}:{variant}"
        if name in compiled:
          self.attempt("train", name, self.train, queries, variant, compiled.pop(name),
                       batches.pop(name), steps, dumps.get(name))
    finally:
      for dump in dumps.values():
        shutil.rmtree(dump, ignore_errors=True)


# ---------------------------------------------------------------------------------- report
COLUMNS = {  # section -> (header, key, format)
    "train": [("queries:variant", "name", ""), ("step ms", "step_ms", ".1f"),
              ("queries/s", "queries_per_s", ".4g"), ("model TFLOP", "model_tflop", ".3g"),
              ("XLA TFLOP", "xla_tflop", ".3g"), ("TFLOP/s", "tflop_per_s", ".3g"),
              ("MFU", "mfu", ".1%"), ("XLA util", "xla_util", ".1%"),
              ("step GiB", "step_gib", ".1f"), ("launches", "launches", "d"),
              ("slice copy GiB", "slice_copy_gib", ".1f"), ("compile s", "compile_s", ".0f")],
    "encode": [("kind batch", "name", ""), ("tokens", "tokens", "d"), ("ms", "ms", ".1f"),
               ("examples/s", "examples_per_s", ".4g"), ("TFLOP/s", "tflop_per_s", ".3g"),
               ("MFU", "mfu", ".1%"), ("max|diff| vs xla", "max_abs_diff_vs_xla", ".2g"),
               ("compile s", "compile_s", ".0f")],
    "maxsim": [("dtype BxLq tile", "name", ""), ("docs", "docs", "d"),
               ("chunk", "chunk_size", "d"), ("query chunk", "query_chunk", "d"),
               ("ms", "ms", ".1f"), ("TFLOP/s", "tflop_per_s", ".3g"),
               ("of bf16 peak", "of_peak", ".1%"),
               ("docs/s", "docs_per_s", ".3g"), ("corpus GB/s", "corpus_gb_per_s", ".3g"),
               ("of copy bw", "of_copy_bw", ".1%"),
               ("scores GB/s*", "score_gb_per_s_if_unfused", ".3g")],
    "copy": [("copy", "name", ""), ("bytes", "bytes", "d"), ("ms", "ms", ".2f"),
             ("GB/s (read+write)", "gb_per_s", ".3g")],
}


def tables(r):
  m = r["model"]
  titles = {
      "train": f"Train step ({r['config']}; bf16 compute, fp32 master weights; "
               f"{m['num_negatives']} negative(s)/query; {m['query_length']} query tokens, "
               f"doc_maxlen {m['doc_maxlen']}; frozen: {', '.join(m['freeze']) or 'none'})",
      "encode": "Encoding (bf16 weights and compute, random weights; XLA vs cuDNN attention)",
      "maxsim": ("MaxSim (late_interaction.maxsim_chunked by score-tile budget, and the Pallas "
                 "kernel; corpus on device)"),
      "copy": f"Device copy bandwidth (nominal HBM {r['nominal_hbm_tbps'] or '?'} TB/s)"}
  out = []
  for section in ("train", "encode", "maxsim", "copy"):
    rows = []
    for row in r[section]:
      note = (row.get("error") or row.get("skipped") or row.get("launches_error") or
              "").splitlines()
      rows.append(["-" if row.get(key) is None else format(row[key], fmt)
                   for _, key, fmt in COLUMNS[section]] + [note[0][:100] if note else ""])
    out.append((titles[section], [h for h, _, _ in COLUMNS[section]] + ["note"], rows))
  return out


def markdown(r):
  peak = r["peak_bf16_tflops"]
  mem = r.get("memory_gib", {}).get("peak_bytes_in_use")
  lines = [f"### {r['device_kind']} ({r['date']}, jax {r['jax']})", "",
           f"`python benchmarks/gpu.py {' '.join(r['argv'])}`: peak bf16 "
           f"{f'{peak} TFLOP/s' if peak else 'unknown (pass --peak_tflops)'}, peak device memory "
           f"{'-' if mem is None else f'{mem:.1f}'} GiB, {r['elapsed_s']:.0f} s.", ""]
  for title, header, rows in tables(r):
    lines += [f"{title}:", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(x.replace("|", "/") for x in row) + " |" for row in rows] + [""]
  if "profile" in r:
    p = r["profile"]
    lines += [f"Profile of train row {p['row']} (device ms per step):", "",
              "| stream | ms |", "|---|---|"]
    lines += [f"| {k} | {v:.2f} |" for k, v in p["lines_ms"].items()] + [""]
    lines += ["| kernel | stream | ms | HLO op |", "|---|---|---|---|"]
    lines += [f"| {t['kernel'][:80].replace('|', '/')} | {t['line']} | {t['ms']:.2f} | "
              f"{t['hlo_op'][:80].replace('|', '/')} |" for t in p["top"]] + [""]
    lines += ["| host event (inclusive) | ms |", "|---|---|"]
    lines += [f"| {t['event'][:80].replace('|', '/')} | {t['ms']:.2f} |"
              for t in p.get("host_top", [])] + [""]
  lines.append("\\*f32 token-score traffic (write + read) if XLA does not fuse the MaxSim matmul "
               "with its max over document tokens.")
  return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------ main
def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="fewer rows, sizes and steps")
  parser.add_argument("--tiny", action="store_true", help="configs/tiny.py shapes, for a CPU run")
  parser.add_argument("--json", help="write every number to this file")
  parser.add_argument("--md", help="write markdown tables to this file (for RESULTS.md)")
  parser.add_argument("--config", help="config file[:arg] (default configs/release.py:vit_l)")
  parser.add_argument("--train_rows", help=f"QUERIES:VARIANT,... with VARIANT in {list(VARIANTS)} "
                      f"(default {DEFAULT_ROWS}; without --quick also {MORE_ROWS})")
  parser.add_argument("--steps", type=int, help="timed train steps per row")
  parser.add_argument("--compile_group", type=int, default=3,
                      help="train rows compiled side by side before they are timed")
  parser.add_argument("--encode_batch", type=int, help="examples per encoding call (default 256)")
  parser.add_argument("--peak_tflops", type=float, help="peak dense bf16 TFLOP/s of the device")
  parser.add_argument("--skip", default="", help="comma list of: copy,maxsim,train,encode")
  parser.add_argument("--query_tokens", type=int, default=20, help="real query tokens (+-25%%)")
  parser.add_argument("--doc_tokens", type=int, default=180, help="real document tokens (+-25%%)")
  parser.add_argument("--profile", help="a train row (e.g. 32:cudnn) to profile: device time "
                      "per kernel after its timing")
  parser.add_argument("--compile_cache", help="persistent compile cache folder (faster reruns)")
  parser.add_argument("--pallas_blocks", default=PALLAS_BLOCKS,
                      help="GPU only: more MaxSim kernel rows, QUERIESxDOCSxQUERY_TOKENSxDOC_TOKENS "
                      f"per program, comma-separated (default {PALLAS_BLOCKS}; the kernel's own "
                      f"default is {'x'.join(map(str, maxsim_kernel.GPU_BLOCKS))})")
  args = parser.parse_args()
  try:
    args.pallas_blocks = [maxsim_kernel.check_gpu_blocks(int(x) for x in item.split("x"))
                          for item in filter(None, args.pallas_blocks.split(","))]
  except ValueError as e:
    parser.error(f"--pallas_blocks={args.pallas_blocks!r}: {e}")
  quick, tiny = args.quick, args.tiny
  args.config = args.config or ("configs/tiny.py" if tiny else "configs/release.py:vit_l")
  default_rows = (("8:base,8:cudnn" if quick else "8:base,8:cudnn,16:remat") if tiny else
                  DEFAULT_ROWS + ("" if quick else "," + MORE_ROWS))
  rows = []
  for item in filter(None, (args.train_rows or default_rows).split(",")):
    queries, _, variant = item.partition(":")
    if not queries.isdigit() or (variant or "base") not in VARIANTS:
      parser.error(f"--train_rows: bad row {item!r}; variants are {list(VARIANTS)}")
    rows.append((int(queries), variant or "base"))
  if args.compile_group < 1:
    parser.error(f"--compile_group={args.compile_group}: needs at least 1")
  steps = args.steps or (3 if tiny else 10 if quick else 20)
  skip = set(filter(None, args.skip.split(",")))
  if args.compile_cache:
    jax.config.update("jax_compilation_cache_dir", args.compile_cache)

  bench = Bench(args)
  r = bench.results
  peak = r["peak_bf16_tflops"]
  log(f"{r['device_kind']} ({r['platform']}), jax {jax.__version__}, "
      f"{f'peak bf16 {peak} TFLOP/s' if peak else 'unknown peak (pass --peak_tflops)'}; "
      f"{args.config}: {bench.mc.query_length} query tokens, doc_maxlen {bench.mc.doc_maxlen}")
  if r["platform"] == "cpu" and not tiny:
    log("warning: full-size shapes on CPU are very slow; use --tiny")
  if args.config == "configs/release.py:vit_l":
    try:  # stage 3 differs from the release-shape config in learning rates only, if at all
      s3 = config_files.load_config("configs/stage.py:3,vit_l")
      r["stage3_same_step"] = (tuple(s3.freeze) == tuple(bench.config.freeze)
                               and s3.model.output == bench.mc.output)
      log(f"configs/stage.py:3,vit_l trains the same groups with the same output: "
          f"{r['stage3_same_step']}{' (not run separately)' if r['stage3_same_step'] else ''}")
    except Exception as e:  # pylint: disable=broad-except
      log(f"could not compare with configs/stage.py:3,vit_l: {type(e).__name__}: {e}")

  # Cheap sections first; train before encode: it is the main result if time runs out.
  if "copy" not in skip:
    bench.attempt("copy", "x + 1", bench.copy_bandwidth, (64 if tiny else 4096) << 20, 10)
  if "maxsim" not in skip:
    bench.guarded("maxsim", bench.maxsim_section,
                  256 if tiny else 4096 * (24 if quick else 48),  # ~100k / ~200k documents
                  (4,) if tiny else (32,) if quick else (32, 1),  # query batches
                  32 if tiny else bench.mc.query_length,
                  (1 << 20,) if tiny else tuple(m << 20 for m in (256, 64, 1024)),
                  3 if tiny or quick else 5)
  if "train" not in skip:
    bench.guarded("train", bench.train_section, rows, steps, args.compile_group)
  if "encode" not in skip:
    bench.guarded("encode", bench.encode_section, args.encode_batch or (16 if tiny else 256),
                  5 if quick else 10)
  bench.save()
  print("\n" + markdown(r), flush=True)


if __name__ == "__main__":
  main()
