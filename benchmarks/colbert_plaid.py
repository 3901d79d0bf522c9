r"""colbert-ai's PLAID (the reference implementation) on precomputed token embeddings, on CPU.

Runs in its own environment (colbert-ai 0.2.22, faiss-cpu, torch CPU), as a subprocess of our
benchmarks, so that both indexes see exactly the same embeddings:

  python benchmarks/colbert_plaid.py index --embeddings DIR --index DIR --nbits 2 [--kmeans-iters 4]
      [--resume]
  python benchmarks/colbert_plaid.py search --index DIR --queries Q.npy --k 100 --ncells 2 \
      --threshold 0.45 --ndocs 1024 --out results.json [--threads 2] [--query-maxlen 32]

DIR holds tokens.npy [T, 128] float32/float16 (unit rows, documents concatenated in order) and
doc_offsets.npy [N+1] int64 (benchmarks/plaid_corpus.save_for_colbert writes both); Q.npy is
[B, Lq, 128] float32. colbert's pids are our document ids 0..N-1.

Indexing runs colbert's own CollectionIndexer (plan, k-means, residual codec, chunks, IVF) with
only its encoder replaced by a reader of DIR; Indexer/Launcher are avoided (they spawn processes).
colbert picks its number of centroids itself: 2**floor(log2(16 * sqrt(num_embeddings))).
Searching uses IndexScorer directly, as Searcher always loads a model checkpoint; one query at a
time, as colbert searches. Its memory is the peak RSS growth over the loaded index (warm-up
included), as search.py measures ours. Both print one JSON line to stdout (colbert's chatter goes
to stderr).
"""

import argparse
import contextlib
import json
import os
import random
import resource
import shutil
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TORCH_EXTENSIONS_DIR", "/tmp/colbert_torch_ext")  # compiled C++ ops

import numpy as np  # noqa: E402
import torch  # noqa: E402

DIM = 128


def peak_rss():
  """(this process's peak RSS, its children's), bytes (Linux reports KiB)."""
  own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
  return own, children


def rss_status(field):
  """VmRSS or VmHWM (the peak since start or since `reset_peak_rss`) of this process, bytes."""
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1]) * 1024
  raise KeyError(field)


def reset_peak_rss():
  """VmHWM := VmRSS (Linux >= 4.0), so that a later peak counts only what comes after."""
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")


@contextlib.contextmanager
def stdout_to_stderr():
  """fd 1 -> fd 2 (faiss prints from C++), so that stdout carries only our JSON line."""
  sys.stdout.flush()
  saved = os.dup(1)
  os.dup2(2, 1)
  try:
    yield
  finally:
    sys.stdout.flush()
    os.dup2(saved, 1)
    os.close(saved)


def set_threads(n):
  torch.set_num_threads(n)
  try:
    import faiss
    faiss.omp_set_num_threads(n)
  except ImportError:
    pass


class PrecomputedEncoder:
  """Stands in for colbert's CollectionEncoder: a passage is its pid, its embeddings are read
  from the memory-mapped tokens (fp32 on CPU, as CollectionIndexer.index asserts)."""

  def __init__(self, tokens, offsets):
    self.tokens, self.offsets = tokens, offsets

  def encode_passages(self, passages):
    if len(passages) == 0:
      return None, None
    pids = np.asarray(passages, np.int64)
    starts, ends = self.offsets[pids], self.offsets[pids + 1]
    lens = ends - starts
    if np.array_equal(pids, np.arange(pids[0], pids[0] + len(pids))):
      rows = self.tokens[starts[0]:ends[-1]]  # a chunk of consecutive passages: one slice
    else:
      first = np.cumsum(lens) - lens
      rows = self.tokens[np.repeat(starts - first, lens) + np.arange(int(lens.sum()))]
    embs = torch.from_numpy(np.ascontiguousarray(rows, dtype=np.float32))
    return embs, [int(n) for n in lens]


def run_index(a):
  from colbert.data import Collection
  from colbert.indexing.collection_indexer import CollectionIndexer
  from colbert.indexing.index_saver import IndexSaver
  from colbert.infra import ColBERTConfig, Run, RunConfig

  class PrecomputedCollectionIndexer(CollectionIndexer):
    # CollectionIndexer.__init__ (collection_indexer.py:41-59 in 0.2.22) loads a Checkpoint and
    # builds a CollectionEncoder; everything after it is colbert's own.
    def __init__(self, config, num_docs, encoder, verbose=1):
      self.verbose = verbose
      self.config = config
      self.rank, self.nranks = 0, 1
      self.use_gpu = False
      self.collection = Collection.cast(list(range(num_docs)))
      self.encoder = encoder
      self.saver = IndexSaver(config)

  tokens = np.load(os.path.join(a.embeddings, "tokens.npy"), mmap_mode="r")
  offsets = np.load(os.path.join(a.embeddings, "doc_offsets.npy")).astype(np.int64)
  assert tokens.ndim == 2 and tokens.shape[1] == DIM, tokens.shape
  assert offsets[0] == 0 and offsets[-1] == len(tokens), (offsets[[0, -1]], len(tokens))
  num_docs = len(offsets) - 1
  index = os.path.abspath(a.index)
  earlier = 0.0
  if a.resume:
    # colbert's own resume: it reloads plan.json and the codec and skips finished chunks
    if not os.path.exists(os.path.join(index, "plan.json")):
      sys.exit(f"--resume: {index} holds no colbert plan.json to resume from")
    times = [os.path.getmtime(os.path.join(index, n)) for n in os.listdir(index)]
    earlier = max(times) - min(times)  # plan written to last chunk saved; misses the sampling
  else:
    if os.path.isdir(index) and os.listdir(index):
      # only ever delete what looks like an earlier colbert index
      if not os.path.exists(os.path.join(index, "plan.json")):
        sys.exit(f"{index} is not empty and holds no colbert index (plan.json); not overwriting")
      shutil.rmtree(index)
    os.makedirs(index)
  set_threads(a.threads)
  random.seed(a.seed)  # colbert samples pids with `random`, shuffles with torch
  np.random.seed(a.seed)
  torch.manual_seed(a.seed)
  run_root = tempfile.mkdtemp(prefix="colbert_run_")
  try:
    with stdout_to_stderr(), Run().context(RunConfig(nranks=1, rank=0, experiment="plaid_bench",
                                                    root=run_root)):
      config = ColBERTConfig(nbits=a.nbits, dim=DIM, index_path=index,
                             kmeans_niters=a.kmeans_iters, doc_maxlen=512, index_bsize=a.bsize,
                             rank=0, nranks=1, resume=a.resume)
      indexer = PrecomputedCollectionIndexer(config, num_docs, PrecomputedEncoder(tokens, offsets),
                                             verbose=a.verbose)
      start = time.perf_counter()
      indexer.run(shared_lists=[[[None]]])
      build = time.perf_counter() - start
  finally:
    shutil.rmtree(run_root, ignore_errors=True)
  with open(os.path.join(index, "metadata.json")) as f:
    meta = json.load(f)
  index_bytes = sum(os.path.getsize(os.path.join(d, n))
                    for d, _, names in os.walk(index) for n in names)
  own, children = peak_rss()
  out = {"build_seconds": round(earlier + build, 3), "resumed_after_seconds": round(earlier, 3),
         "index_bytes": index_bytes,
         "num_centroids": int(meta["num_partitions"]),
         "num_embeddings": int(meta["num_embeddings"]), "num_docs": num_docs,
         "num_chunks": int(meta["num_chunks"]), "nbits": a.nbits,
         "kmeans_iters": a.kmeans_iters, "threads": a.threads,
         "peak_rss_bytes": own, "peak_rss_children_bytes": children}
  assert out["num_embeddings"] == len(tokens), (out["num_embeddings"], len(tokens))
  with open(os.path.join(index, "bench.json"), "w") as f:
    json.dump(out, f)
  print(json.dumps(out), flush=True)


def run_search(a):
  from colbert.infra import ColBERTConfig
  from colbert.modeling.colbert import ColBERT
  from colbert.search.index_storage import IndexScorer

  set_threads(a.threads)
  queries = np.load(a.queries)
  assert queries.ndim == 3 and queries.shape[2] == DIM, queries.shape
  # colbert's CPU path multiplies fp32 centroids by Q: fp16 queries would not run
  queries = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32))
  lq = queries.shape[1]
  if a.ndocs // 4 < a.k:
    print(f"warning: colbert returns at most ndocs // 4 = {a.ndocs // 4} documents, k = {a.k}",
          file=sys.stderr)
  with stdout_to_stderr():
    start = time.perf_counter()
    ColBERT.try_load_torch_extensions(use_gpu=False)  # segmented_maxsim for the final scoring
    scorer = IndexScorer(a.index, use_gpu=False, load_index_with_mmap=False)
    load = time.perf_counter() - start
    reset_peak_rss()
    loaded_rss = rss_status("VmRSS")
    # query_maxlen cuts the query before candidate generation and centroid pruning only; the
    # final MaxSim always uses all Lq rows. Lq by default, so that every token finds candidates.
    config = ColBERTConfig(ncells=a.ncells, centroid_score_threshold=a.threshold, ndocs=a.ndocs,
                           query_maxlen=a.query_maxlen or lq, dim=DIM)
    scorer.rank(config, queries[:1])  # warm-up: first-call allocations, thread pools
    ids, scores, times = [], [], []
    for q in queries:
      t = time.perf_counter()
      pids, s = scorer.rank(config, q[None])
      times.append(time.perf_counter() - t)
      ids.append([int(p) for p in pids[:a.k]])
      scores.append([float(x) for x in s[:a.k]])
  own, children = peak_rss()
  summary = {"seconds_per_query": statistics.median(times), "total_seconds": sum(times),
             "load_seconds": load, "search_rss_growth_bytes": rss_status("VmHWM") - loaded_rss,
             "num_queries": len(queries), "query_len": lq,
             "query_maxlen": config.query_maxlen, "k": a.k, "ncells": a.ncells,
             "threshold": a.threshold, "ndocs": a.ndocs, "threads": a.threads,
             "min_results": min(len(i) for i in ids),
             "peak_rss_bytes": own, "peak_rss_children_bytes": children}
  if a.out:
    with open(a.out, "w") as f:
      json.dump({"ids": ids, "scores": scores, **summary}, f)
  print(json.dumps(summary), flush=True)


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  sub = p.add_subparsers(dest="command", required=True)
  i = sub.add_parser("index", help="build a PLAID index from DIR/tokens.npy, DIR/doc_offsets.npy")
  i.add_argument("--embeddings", required=True, help="DIR with tokens.npy and doc_offsets.npy")
  i.add_argument("--index", required=True, help="index directory (an earlier index is replaced)")
  i.add_argument("--nbits", type=int, default=2, choices=(1, 2, 4))
  i.add_argument("--kmeans-iters", type=int, default=4)
  i.add_argument("--bsize", type=int, default=64, help="colbert's index_bsize (unused here)")
  i.add_argument("--threads", type=int, default=1)
  i.add_argument("--seed", type=int, default=12345)
  i.add_argument("--resume", action="store_true",
                 help="continue a cut-off build in --index (build_seconds then adds the earlier "
                      "run's span, from its files' times)")
  i.add_argument("--verbose", type=int, default=1, help="colbert's verbosity (to stderr)")
  s = sub.add_parser("search", help="top-k for each query of a [B, Lq, 128] .npy")
  s.add_argument("--index", required=True)
  s.add_argument("--queries", required=True)
  s.add_argument("--k", type=int, default=100)
  s.add_argument("--ncells", type=int, default=2)
  s.add_argument("--threshold", type=float, default=0.45, help="centroid_score_threshold")
  s.add_argument("--ndocs", type=int, default=1024)
  s.add_argument("--query-maxlen", type=int, default=0,
                 help="query rows used for candidate generation (0: all; colbert's default 32)")
  s.add_argument("--threads", type=int, default=1)
  s.add_argument("--out", help="results JSON: ids, scores per query plus the timings")
  a = p.parse_args()
  run_index(a) if a.command == "index" else run_search(a)


if __name__ == "__main__":
  main()
