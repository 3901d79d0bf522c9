"""Top-k search at PreFLMR's shapes: exact search, our PLAID (JAX) and colbert-ai's PLAID.

  python benchmarks/search.py [--quick] [--sizes 10000 50000] [--query_lens 113 320]
      [--colbert_python /tmp/colbert_venv/bin/python] [--work_dir /tmp/preflmr_jax_search_bench]

Part 1, on one corpus per size from benchmarks/plaid_corpus.py (real word-piece embeddings through
a fixed projection, documents from topic mixtures, mean ~180 tokens of at most 512, dim 128, unit
rows; queries of 113 and 320 tokens built around a positive document):
- exact: `search.search_streaming` over the corpus in chunks of similar length (documents sorted
  by length, each chunk padded to its longest rounded up to 64): its top-100 is the truth.
- jax plaid: `index.build` (PLAID's number of centroids; nbits 2 and 4, or --nbits) and
  `index.search` at PLAID's settings for k=10 and k=100 (`SearchOptions.for_k`) and a wider one.
- colbert plaid: colbert-ai 0.2.22's indexer and searcher on the same embeddings
  (benchmarks/colbert_plaid.py, run in its own environment given by --colbert_python: colbert-ai,
  faiss-cpu, torch; not in requirements), nbits 2, at the same settings (ncells, threshold,
  ndocs), with every query token in candidate generation (query_maxlen = Lq) and with colbert's
  default 32.
Reported per method: build time and peak RSS, index bytes, queries/s, speed-up over exact,
recall@10 and @100 against exact search, search memory (peak RSS growth). colbert searches one
query at a time (queries/s: the median query's); ours a group of 4 (the median of 3 runs over all
the queries). Built corpora and both engines' indexes (with their build figures and, for ours,
the k-means sample size) are kept in --work_dir and reused: delete an index to rebuild it after
changing the build.

Part 2: `late_interaction.maxsim` / `maxsim_chunked` vs `colbert.modeling.colbert.colbert_score`
(when colbert-ai is importable here) on the same fp32 tensors: 1 query x 32 tokens vs 1000
documents x 180 tokens x 128. Counts 2*Lq*N*Ld*dim FLOPs per call.

Timings are the median of several repeats after a warm-up call (which also compiles).
"""

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch

from preflmr_jax import index as plaid  # noqa: E402
from preflmr_jax import search  # noqa: E402
from preflmr_jax import late_interaction  # noqa: E402
from preflmr_jax.late_interaction import maxsim, maxsim_chunked  # noqa: E402

import plaid_corpus  # noqa: E402  (next to this script)

try:
  import psutil
except ImportError:  # optional
  psutil = None

DIM = 128
K_MAX = 100
NBITS = (2, 4)
COLBERT_N, COLBERT_LD = 1000, 180


def median_seconds(fn, repeats):
  """(median wall time of fn() after one warm-up call (which also compiles), its last result)."""
  out = fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    out = fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times), out


def rss_bytes():
  """Current resident set size of this process."""
  if psutil is not None:
    return psutil.Process().memory_info().rss
  try:
    with open("/proc/self/statm") as f:
      return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
  except OSError:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakRss:
  """Context manager: peak RSS growth over the entry value, sampled by a thread every 5 ms."""

  def __enter__(self):
    self.start = self.peak = rss_bytes()
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._sample, daemon=True)
    self._thread.start()
    return self

  def _sample(self):
    while not self._stop.wait(0.005):
      self.peak = max(self.peak, rss_bytes())

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join()
    self.peak = max(self.peak, rss_bytes())
    self.growth = self.peak - self.start


def read_json(path):
  with open(path) as f:
    return json.load(f)


def unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def recall(found, truth, k):
  return float(np.mean([len(set(f[:k]) & set(t[:k])) / k for f, t in zip(found, truth)]))


def fmt_bytes(b):
  return f"{b / 2**20:.1f} MiB" if b < 2**30 else f"{b / 2**30:.2f} GiB"


def exact_top(corpus, q, k):
  """(seconds per query, top-k ids [B, k]) by exact MaxSim, chunks of similar length."""
  lengths = np.diff(corpus.doc_offsets)
  order = np.argsort(lengths, kind="stable")

  def chunks():
    for i in range(0, len(order), 256):
      ids = order[i:i + 256]
      yield plaid_corpus.padded(corpus, ids, -(-int(lengths[ids].max()) // 64) * 64)

  search.search_streaming(q[:1], chunks(), k)[1].block_until_ready()  # compile every width
  start = time.perf_counter()
  _, top = search.search_streaming(q, chunks(), k)
  top = np.asarray(top)
  return (time.perf_counter() - start) / len(q), order[top]


def settings():
  """(name, our SearchOptions, colbert's (ncells, threshold, ndocs), k)."""
  rows = []
  for name, k, options in [("k=10", 10, plaid.SearchOptions.for_k(10)),
                           ("k=100", 100, plaid.SearchOptions.for_k(100)),
                           ("wide", 100, plaid.SearchOptions.for_k(100, nprobe=4, threshold=0.4,
                                                                    keep=4096, candidates=8192,
                                                                    rerank=1024))]:
    rows.append((name, options, (options.nprobe, options.threshold, options.keep), k))
  return rows


def run_colbert(python, args, log):
  out = subprocess.run([python, os.path.join(os.path.dirname(__file__), "colbert_plaid.py"),
                        *map(str, args)], capture_output=True, text=True, check=False)
  with open(log, "a") as f:
    f.write(out.stderr)
  if out.returncode:
    raise RuntimeError(f"colbert_plaid.py {args[0]} failed ({out.returncode}); see {log}")
  return json.loads(out.stdout.strip().splitlines()[-1])


def part1(sizes, query_lens, num_queries, colbert_python, work_dir, nbits_list=NBITS):
  print(f"Part 1: {num_queries} queries per length; corpus from benchmarks/plaid_corpus.py; "
        "recall against exact search; build RSS = peak growth during our build, colbert's "
        "process peak (its mmap-read corpus included); search RSS = peak growth over the loaded "
        "index, warm-up included (exact: the padded chunks)\n")
  header = (f"{'docs':>6} {'tokens':>9} {'Lq':>4}  {'method':<30} {'build s':>8} {'build RSS':>10} "
            f"{'index':>10} {'q/s':>7} {'vs exact':>8} {'R@10':>6} {'R@100':>6} {'search RSS':>10}")
  print(header)
  print("-" * len(header))
  for n in sizes:
    corpus = plaid_corpus.make_corpus(n)
    tokens = corpus.tokens.shape[0]
    lengths = np.diff(corpus.doc_offsets)
    width = int(lengths.max())
    c = plaid.default_num_centroids(tokens)

    def chunks():
      for i in range(0, n, 1024):
        yield plaid_corpus.padded(corpus, np.arange(i, min(i + 1024, n)), width)

    built = {}
    for nbits in nbits_list:
      path = os.path.join(work_dir, f"jax{n}_nbits{nbits}.plaid.npz")
      if os.path.exists(path):  # an earlier run's build and its figures
        ix = plaid.load(path)
        stats = read_json(path + ".json")
        if stats.get("sample_size") != plaid.default_sample_size(c):
          print(f"note: {path} was built with a k-means sample of {stats.get('sample_size')} "
                f"tokens, not today's default {plaid.default_sample_size(c)}; delete it to rebuild",
                flush=True)
      else:
        with PeakRss() as build_mem:
          start = time.perf_counter()
          ix = plaid.build(chunks, c, nbits=nbits)
          seconds = time.perf_counter() - start
        stats = {"seconds": seconds, "rss": build_mem.growth,
                 "sample_size": plaid.default_sample_size(c)}
        plaid.save(ix, path)
        with open(path + ".json", "w") as f:
          json.dump(stats, f)
      built[nbits] = (ix, stats["seconds"], stats["rss"],
                      sum(getattr(ix, name).nbytes for name in plaid._ARRAYS))
    fp16_bytes = tokens * DIM * 2
    colbert_index = None
    if colbert_python:
      emb = os.path.join(work_dir, f"corpus{n}")
      colbert_index = os.path.join(work_dir, f"colbert{n}_nbits2")
      log = os.path.join(work_dir, "colbert.log")
      if not os.path.exists(os.path.join(emb, "doc_offsets.npy")):
        plaid_corpus.save_for_colbert(corpus, emb)
      colbert_json = os.path.join(colbert_index, "bench.json")
      if os.path.exists(colbert_json):
        colbert_build = read_json(colbert_json)
      else:
        colbert_build = run_colbert(colbert_python, ["index", "--embeddings", emb, "--index",
                                                     colbert_index, "--nbits", 2, "--threads",
                                                     os.cpu_count()], log)
    for lq in query_lens:
      q, _ = plaid_corpus.make_queries(corpus, num_queries, lq)
      with PeakRss() as exact_mem:
        t_exact, truth = exact_top(corpus, q, K_MAX)
      print(f"{n:>6} {tokens:>9} {lq:>4}  {'exact (fp32)':<30} {'-':>8} {'-':>10} "
            f"{fmt_bytes(tokens * DIM * 4):>10} {1 / t_exact:>7.2f} {1:>7.2f}x {1:>6.3f} "
            f"{1:>6.3f} {fmt_bytes(exact_mem.growth):>10}")
      for name, options, (ncells, threshold, ndocs), k in settings():
        for nbits, (ix, t_build, build_rss, ix_bytes) in built.items():
          with PeakRss() as search_mem:
            t, (_, found) = median_seconds(lambda: plaid.search(ix, q, None, k, options), 3)
          t /= len(q)
          build = (f"{t_build:>8.1f} {fmt_bytes(build_rss):>10} {fmt_bytes(ix_bytes):>10}"
                   if name == "k=10" else f"{'':>8} {'':>10} {'':>10}")
          r100 = f"{recall(found, truth, 100):>6.3f}" if k >= 100 else f"{'-':>6}"
          print(f"{'':>6} {'':>9} {'':>4}  {f'jax plaid {nbits}b C={c} {name}':<30} {build} "
                f"{1 / t:>7.2f} {t_exact / t:>7.2f}x {recall(found, truth, 10):>6.3f} {r100} "
                f"{fmt_bytes(search_mem.growth):>10}")
        if colbert_index:
          qfile = os.path.join(work_dir, f"q{n}_{lq}.npy")
          np.save(qfile, q)
          for maxlen in (lq, 32):
            out = os.path.join(work_dir, "colbert_search.json")
            run_colbert(colbert_python, [
                "search", "--index", colbert_index, "--queries", qfile, "--k", k, "--ncells",
                ncells, "--threshold", threshold, "--ndocs", ndocs, "--query-maxlen", maxlen,
                "--threads", os.cpu_count(), "--out", out], log)
            res = read_json(out)
            t_c = res["seconds_per_query"]
            found = np.asarray([ids + [-1] * (k - len(ids)) for ids in res["ids"]])
            build = (f"{colbert_build['build_seconds']:>8.1f} "
                     f"{fmt_bytes(colbert_build['peak_rss_bytes']):>10} "
                     f"{fmt_bytes(colbert_build['index_bytes']):>10}"
                     if name == "k=10" and maxlen == lq else f"{'':>8} {'':>10} {'':>10}")
            r100 = f"{recall(found, truth, 100):>6.3f}" if k >= 100 else f"{'-':>6}"
            label = f"colbert 2b C={colbert_build['num_centroids']} {name} q{maxlen}"
            print(f"{'':>6} {'':>9} {'':>4}  {label:<30} {build} {1 / t_c:>7.2f} "
                  f"{t_exact / t_c:>7.2f}x {recall(found, truth, 10):>6.3f} {r100} "
                  f"{fmt_bytes(res['search_rss_growth_bytes']):>10}")
    padded_bytes = n * width * DIM * 2
    for nbits, (_, _, _, ix_bytes) in built.items():
      print(f"{'':>6} index bytes, {nbits} bits: {ix_bytes / fp16_bytes:.3f} of the fp16 tokens "
            f"({fmt_bytes(fp16_bytes)}), {ix_bytes / padded_bytes:.3f} of the fp16 corpus padded "
            f"to {width} tokens ({fmt_bytes(padded_bytes)})")
    corpus = built = None  # free them before the next size


def part2(repeats):
  print(f"\nPart 2: MaxSim scoring, 1 query x 32 tokens vs {COLBERT_N} docs x {COLBERT_LD} tokens "
        f"x {DIM}, fp32 (documents 32-{COLBERT_LD} valid tokens); median of {repeats}")
  rng = np.random.default_rng(1)
  Q = unit(rng.standard_normal((1, 32, DIM), dtype=np.float32))
  D = unit(rng.standard_normal((COLBERT_N, COLBERT_LD, DIM), dtype=np.float32))
  lengths = rng.integers(32, COLBERT_LD + 1, size=COLBERT_N)
  D_mask = np.arange(COLBERT_LD)[None] < lengths[:, None]
  D *= D_mask[..., None]
  flops = 2 * 32 * COLBERT_N * COLBERT_LD * DIM
  jq, jd, jm = jnp.asarray(Q), jnp.asarray(D), jnp.asarray(D_mask)
  chunk, _ = late_interaction.chunk_sizes(1, 32, COLBERT_N, COLBERT_LD,
                                          late_interaction.default_tile_bytes())
  rows = [(name, *median_seconds(lambda: np.asarray(fn(jq, jd, jm).block_until_ready())[0],
                                 repeats))
          for name, fn in [("maxsim", maxsim),
                           (f"maxsim_chunked({chunk})", maxsim_chunked)]]  # default tile
  try:
    import colbert
    from colbert.infra.config import ColBERTConfig
    from colbert.modeling.colbert import colbert_score
  except Exception as e:  # noqa: BLE001 -- any import failure: report it, keep the rest
    print(f"colbert-ai not importable ({type(e).__name__}: {e}); install for this benchmark only:"
          f" pip install colbert-ai==0.2.22 faiss-cpu ujson GitPython gitdb smmap --no-deps")
    colbert_score = None
  ref = None
  if colbert_score is not None:
    config = ColBERTConfig()  # default: interaction='colbert', no GPUs visible -> CPU
    tq, td, tm = torch.from_numpy(Q), torch.from_numpy(D), torch.from_numpy(D_mask)
    with torch.inference_mode():
      t_ref, ref = median_seconds(lambda: colbert_score(tq, td, tm, config), repeats)
      ref = ref.numpy()
    version = getattr(colbert, "__version__", None) or _dist_version("colbert-ai")
    rows.append((f"colbert_score ({version})", t_ref, ref))
  header = f"{'method':<26} {'ms':>8} {'GFLOP/s':>8} {'vs colbert':>10} {'max|diff|':>9}"
  print(header)
  print("-" * len(header))
  for name, t, s in rows:
    ratio = f"{t_ref / t:>9.2f}x" if ref is not None else f"{'n/a':>10}"
    diff = f"{np.abs(s - ref).max():>9.1e}" if ref is not None else f"{'n/a':>9}"
    print(f"{name:<26} {t * 1e3:>8.2f} {flops / t / 1e9:>8.1f} {ratio} {diff}")


def _dist_version(name):
  try:
    from importlib.metadata import version
    return version(name)
  except Exception:  # noqa: BLE001
    return "?"


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true",
                      help="2k documents, 4 queries of 113 tokens, no colbert (a few minutes)")
  parser.add_argument("--sizes", type=int, nargs="+", help="corpus sizes (documents)")
  parser.add_argument("--query_lens", type=int, nargs="+", default=[113, 320])
  parser.add_argument("--queries", type=int, default=16, help="queries per length")
  parser.add_argument("--nbits", type=int, nargs="+", default=list(NBITS),
                      help="our index's bits per residual dimension (colbert's is 2)")
  parser.add_argument("--colbert_python", default="",
                      help="python of an environment with colbert-ai 0.2.22 and faiss-cpu")
  parser.add_argument("--work_dir", default="/tmp/preflmr_jax_search_bench")
  args = parser.parse_args()
  sizes = args.sizes or ([2000] if args.quick else [10000, 50000])
  query_lens = [113] if args.quick else args.query_lens
  num_queries = 4 if args.quick else args.queries
  colbert_python = "" if args.quick else args.colbert_python
  os.makedirs(args.work_dir, exist_ok=True)

  print(f"date {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}")
  print(f"python {platform.python_version()}  jax {jax.__version__}  numpy {np.__version__}  "
        f"torch {torch.__version__}  psutil {psutil.__version__ if psutil else 'absent'}  "
        f"colbert: {colbert_python or 'not run'}")
  print(f"jax devices: {jax.devices()}  cpus: {os.cpu_count()}  "
        f"torch threads: {torch.get_num_threads()}  machine: {platform.machine()}\n")
  part1(sizes, query_lens, num_queries, colbert_python, args.work_dir, args.nbits)
  part2(2 if args.quick else 3)


if __name__ == "__main__":
  main()
