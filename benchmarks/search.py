"""Top-k search on this machine: exact search vs the PLAID-style index; MaxSim vs ColBERT's.

  python benchmarks/search.py [--quick] [--sizes 2000 8000 32000] [--nprobe 1] [--ncandidates 256]

Part 1: `search.exact_search` vs `index.build` (once, timed separately) + `index.search` at nbits 2
and 4, on synthetic clustered, L2-normalised corpora of increasing size (documents of 16-64 tokens
padded to 64, dim 128; 512 topics of 8 latent token centres each; C = 1024 index centroids at every
size; nprobe=1 and ncandidates=256 as ColBERTv2 searches at k=10). Reports queries/s for a batch
of 16 queries x 32 tokens (k=10), recall@10 of the index against exact search, speed-up over
exact search, peak RSS growth during the step (sampled every 5 ms; psutil if present, else /proc
or ru_maxrss) and the bytes of the padded fp32
corpus vs the compressed index; cands/q is the mean number of documents in the probed lists.

Part 2: `late_interaction.maxsim` / `maxsim_chunked` vs `colbert.modeling.colbert.colbert_score`
(PyPI colbert-ai, benchmark-only; not in requirements.txt) on the same fp32 tensors: 1 query x 32
tokens vs 1000 documents x 180 tokens x 128. Counts 2*Lq*N*Ld*dim FLOPs per call.

Timings are the median of several repeats after a warm-up call (which also compiles).
"""

import argparse
import datetime
import os
import platform
import resource
import statistics
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch

from preflmr_jax import index as plaid  # noqa: E402
from preflmr_jax import late_interaction  # noqa: E402
from preflmr_jax.late_interaction import maxsim, maxsim_chunked  # noqa: E402
from preflmr_jax.search import exact_search  # noqa: E402

try:
  import psutil
except ImportError:  # optional
  psutil = None

DIM, DOC_LEN, MIN_DOC_LEN = 128, 64, 16
BATCH, QUERY_LEN, K = 16, 32, 10
LATENT_CENTERS, TOPICS, CENTERS_PER_TOPIC = 1024, 512, 8
NUM_CENTROIDS = 1024  # index k-means centroids, every size (ColBERTv2: ~16 sqrt(tokens))
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


def unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def make_corpus(n, seed=0):
  """Clustered corpus: each document has a topic; its tokens are noisy copies of the topic's
  latent token centres. Queries are noisy tokens of random documents (their 'positives')."""
  rng = np.random.default_rng(seed)
  centers = unit(rng.standard_normal((LATENT_CENTERS, DIM), dtype=np.float32))
  topic_centers = rng.integers(0, LATENT_CENTERS, size=(TOPICS, CENTERS_PER_TOPIC))
  topics = rng.integers(0, TOPICS, size=n)
  picks = rng.integers(0, CENTERS_PER_TOPIC, size=(n, DOC_LEN))
  docs = centers[topic_centers[topics[:, None], picks]]  # [n, Ld, dim]
  docs += 0.08 * rng.standard_normal(docs.shape, dtype=np.float32)  # ~ cos 0.7 to the centre
  docs /= np.linalg.norm(docs, axis=-1, keepdims=True)
  lengths = rng.integers(MIN_DOC_LEN, DOC_LEN + 1, size=n)
  mask = np.arange(DOC_LEN)[None] < lengths[:, None]
  docs *= mask[..., None]  # padded document tokens are zeros, as the encoder emits
  positives = rng.integers(0, n, size=BATCH)
  tok = rng.integers(0, lengths[positives][:, None], size=(BATCH, QUERY_LEN))
  q = docs[positives[:, None], tok] + 0.08 * rng.standard_normal((BATCH, QUERY_LEN, DIM),
                                                                   dtype=np.float32)
  return docs, mask, unit(q).astype(np.float32)


def recall(found, truth):
  return np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth)])


def fmt_bytes(b):
  return f"{b / 2**20:.1f} MiB"


def part1(sizes, repeats, nprobe, ncandidates, chunk_size):
  print(f"Part 1: top-{K} search, batch {BATCH} queries x {QUERY_LEN} tokens; documents "
        f"{MIN_DOC_LEN}-{DOC_LEN} tokens (padded to {DOC_LEN}) x {DIM}, fp32; exact chunk_size="
        f"{chunk_size}; index nprobe={nprobe} ncandidates={ncandidates}; median of {repeats}")
  print("RSS = peak process RSS growth during the step (build: build; search: warm-up + timed "
        "calls; exact: includes copying the corpus to the JAX device)\n")
  header = (f"{'docs':>6} {'tokens':>8} {'C':>5}  {'method':<14} {'build s':>8} {'ms/batch':>9} "
            f"{'queries/s':>9} {'vs exact':>8} {'recall@10':>9} {'data':>11} {'RSS':>11} "
            f"{'cands/q':>8} {'build RSS':>10}")
  print(header)
  print("-" * len(header))
  for n in sizes:
    docs, mask, q = make_corpus(n)
    n_tokens = int(mask.sum())
    c = NUM_CENTROIDS
    with PeakRss() as mem:
      jd, jm, jq = jnp.asarray(docs), jnp.asarray(mask), jnp.asarray(q)
      run = lambda: exact_search(jq, None, jd, jm, K, chunk_size)[1].block_until_ready()
      t_exact, truth = median_seconds(run, repeats)
      truth = np.asarray(truth)
    jd = jm = None  # free the device copy of the corpus before building
    print(f"{n:>6} {n_tokens:>8} {c:>5}  {'exact':<14} {'-':>8} {t_exact * 1e3:>9.1f} "
          f"{BATCH / t_exact:>9.1f} {1:>7.2f}x {1:>9.3f} {fmt_bytes(docs.nbytes):>11} "
          f"{fmt_bytes(mem.growth):>11}")
    chunks = [(docs[i:i + 4096], mask[i:i + 4096]) for i in range(0, n, 4096)]
    for nbits in (2, 4):
      with PeakRss() as build_mem:
        start = time.perf_counter()
        ix = plaid.build(chunks, num_centroids=c, nbits=nbits)
        t_build = time.perf_counter() - start
      ix_bytes = sum(getattr(ix, name).nbytes for name in plaid._ARRAYS)
      with PeakRss() as mem:
        run = lambda: plaid.search(ix, q, None, K, nprobe=nprobe, ncandidates=ncandidates)
        t, (_, found) = median_seconds(run, repeats)
      probed = np.asarray(plaid._probe(q, ix.centroids, nprobe))  # diagnostics: candidates/query
      cands = (plaid._candidates(ix, probed, np.ones(q.shape[:2], bool), K) >= 0).sum(1).mean()
      print(f"{'':>6} {'':>8} {'':>5}  {f'index nbits={nbits}':<14} {t_build:>8.1f} "
            f"{t * 1e3:>9.1f} {BATCH / t:>9.1f} {t_exact / t:>7.2f}x {recall(found, truth):>9.3f} "
            f"{fmt_bytes(ix_bytes):>11} {fmt_bytes(mem.growth):>11} {cands:>8.0f} "
            f"{fmt_bytes(build_mem.growth):>10}")
    del docs, mask, chunks


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
                      help="2k documents only, fewer repeats (< 1 min)")
  parser.add_argument("--sizes", type=int, nargs="+", help="corpus sizes (documents)")
  parser.add_argument("--nprobe", type=int, default=1,
                      help="centroids probed per query token (ColBERTv2 uses 1 at k=10)")
  parser.add_argument("--ncandidates", type=int, default=256,
                      help="candidates kept for the rerank (ColBERTv2: 256 at k=10)")
  parser.add_argument("--chunk_size", type=int, default=256, help="exact_search documents/step")
  args = parser.parse_args()
  repeats = 2 if args.quick else 3
  sizes = args.sizes or ([2000] if args.quick else [2000, 8000, 32000])

  print(f"date {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}")
  print(f"python {platform.python_version()}  jax {jax.__version__}  numpy {np.__version__}  "
        f"torch {torch.__version__}  colbert-ai {_dist_version('colbert-ai')}  "
        f"psutil {psutil.__version__ if psutil else 'absent'}")
  print(f"jax devices: {jax.devices()}  cpus: {os.cpu_count()}  "
        f"torch threads: {torch.get_num_threads()}  machine: {platform.machine()}\n")
  part1(sizes, repeats, args.nprobe, args.ncandidates, args.chunk_size)
  part2(repeats)


if __name__ == "__main__":
  main()
