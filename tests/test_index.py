"""PLAID index on a clustered synthetic corpus: exhaustive settings equal exact search, recall
against exact search, compression error per nbits, packing, save/load round trip and clear
errors."""

import dataclasses

import numpy as np
import pytest

from preflmr_jax import index as plaid
from preflmr_jax import search
from preflmr_jax.user_errors import ConfigError

DIM, CLUSTERS, N, LD, B, LQ, K = 32, 32, 400, 12, 32, 8, 10
CHUNK = 100  # documents per build chunk: the build streams 4 chunks


def _unit(x):
  return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _corpus(seed=0):
  """Documents mix tokens of 3 random clusters (centre + noise); queries are noisy tokens of
  document b * 12."""
  rng = np.random.default_rng(seed)
  centres = _unit(rng.normal(size=(CLUSTERS, DIM)))
  picks = np.stack([rng.choice(CLUSTERS, 3, replace=False) for _ in range(N)])
  which = np.take_along_axis(picks, rng.integers(0, 3, (N, LD)), axis=1)
  docs = _unit(centres[which] + 0.05 * rng.normal(size=(N, LD, DIM)))
  mask = np.arange(LD) < rng.integers(6, LD + 1, N)[:, None]
  docs = np.where(mask[..., None], docs, 0.0).astype(np.float32)
  src = np.arange(B) * 12
  q = _unit(docs[src, :LQ] + 0.05 * rng.normal(size=(B, LQ, DIM)))
  q_mask = mask[src, :LQ]
  return docs, mask, q, q_mask


@pytest.fixture(scope="module")
def data():
  return _corpus()


_BUILT = {}


def _index(data, nbits):
  if nbits not in _BUILT:
    docs, mask = data[:2]
    chunks = [(docs[i:i + CHUNK], mask[i:i + CHUNK]) for i in range(0, N, CHUNK)]
    _BUILT[nbits] = plaid.build(chunks, num_centroids=64, nbits=nbits, kmeans_iters=8)
  return _BUILT[nbits]


def _recall(data, index, **kw):
  docs, mask, q, q_mask = data
  _, want = search.exact_search(q, q_mask, docs, mask, K, chunk_size=128)
  _, got = plaid.search(index, q, q_mask, K, **kw)
  return np.mean([len(set(g) & set(w)) / K for g, w in zip(got, np.asarray(want))])


def _reconstruction_error(data, index):
  docs, mask = data[:2]
  rec, rec_mask = plaid.decompress(index, np.arange(N))
  np.testing.assert_array_equal(rec_mask[:, :LD], mask)
  return float(np.mean(np.sum((np.asarray(rec)[:, :LD] - docs) ** 2, -1)[mask]))


def _exhaustive(index):
  return plaid.SearchOptions(nprobe=index.num_centroids, threshold=-np.inf, candidates=N, keep=N,
                             rerank=N, group=5)


def test_every_list_probed_and_nothing_pruned_is_exact_search(data):
  """Exact search over the decompressed corpus is what the index approximates: with every list
  probed and every candidate kept, the index returns its ranking and scores."""
  docs, mask, q, q_mask = data
  index = _index(data, 2)
  rec, rec_mask = plaid.decompress(index, np.arange(N))
  want_scores, want = search.exact_search(q, q_mask, np.asarray(rec), rec_mask, K, chunk_size=128)
  scores, got = plaid.search(index, q, q_mask, K, _exhaustive(index))
  np.testing.assert_array_equal(got, np.asarray(want))
  np.testing.assert_allclose(scores, np.asarray(want_scores), rtol=1e-5, atol=1e-5)


def test_candidates_cover_the_exact_top_10(data):
  docs, mask, q, q_mask = data
  index = _index(data, 2)
  assert index.num_docs == N and index.codes.shape == (mask.sum(),)
  _, want = search.exact_search(q, q_mask, docs, mask, K, chunk_size=128)
  _, best, ids, _ = plaid._query_centroid_scores(q, q_mask, index.centroids, 4, None)
  cands = [plaid._candidates(index, np.asarray(i), np.asarray(b), v, 0.0, N)
           for i, b, v in zip(ids, best, q_mask)]
  assert all(set(w) <= set(c) for w, c in zip(np.asarray(want), cands))  # no loss before rerank
  assert max(len(c) for c in cands) < N  # and the probe does prune
  capped = [plaid._candidates(index, np.asarray(i), np.asarray(b), v, 0.0, 40)
            for i, b, v in zip(ids, best, q_mask)]
  assert max(len(c) for c in capped) == 40
  # The cap keeps the documents that the probed lists score best: the exact top 10 here.
  assert np.mean([len(set(w) & set(c)) / K for w, c in zip(np.asarray(want), capped)]) >= 0.95


@pytest.mark.parametrize("num_centroids, nprobe", [(600, 1), (600, 3), (600, 600), (40, 2)])
def test_query_centroid_scores_are_their_definition(num_centroids, nprobe):
  """Stage 1 against numpy: the scores table (0 at masked query tokens), each valid token's
  nprobe best centroids, and each centroid's best over the valid tokens. 600 centroids span
  three score tiles, the last one partly padding."""
  rng = np.random.default_rng(nprobe)
  g, lq = 3, 20
  centroids = _unit(rng.normal(size=(num_centroids, DIM)))
  q = _unit(rng.normal(size=(g, lq, DIM)))
  valid = np.arange(lq) < np.array([[20], [13], [1]])
  q = np.where(valid[..., None], q, 0.0).astype(np.float32)
  table, best, ids, centroid_best = map(np.asarray, plaid._query_centroid_scores(
      q, valid, centroids, nprobe, "highest"))
  scores = np.einsum("gqd,cd->gqc", q.astype(np.float64), centroids)
  np.testing.assert_allclose(table, np.swapaxes(scores, 1, 2), atol=1e-6)
  # ids are distinct, score what `best` says, and `best` is the nprobe highest scores, in order
  # (ids are not compared: near-ties order differently in float32 and float64).
  assert all(len(set(row)) == nprobe for row in ids[valid])
  np.testing.assert_allclose(best[valid], np.take_along_axis(scores, ids, -1)[valid], atol=1e-6)
  np.testing.assert_allclose(best[valid], -np.sort(-scores, axis=-1)[..., :nprobe][valid],
                             atol=1e-6)
  np.testing.assert_allclose(centroid_best,
                             np.max(np.where(valid[..., None], scores, -np.inf), axis=1),
                             atol=1e-6)


@pytest.mark.parametrize("threshold", [0.5, 0.8, -np.inf])
def test_centroid_interaction_is_pruned_maxsim_over_centroid_scores(data, threshold):
  """Stages 2/3 against their definition: a candidate's score is the sum over query tokens of the
  best query-centroid score among its tokens whose centroid's best score over the query reaches
  the threshold (tokens under it are dropped on the host); a candidate with none left ranks
  after the rest."""
  _, _, q, q_mask = data
  index = _index(data, 2)
  g, keep = 4, 16
  table, _, _, centroid_best = plaid._query_centroid_scores(q[:g], q_mask[:g], index.centroids,
                                                            1, None)
  table, centroid_best = np.asarray(table), np.asarray(centroid_best)
  docs = np.stack([np.random.default_rng(i).permutation(N)[:64] for i in range(g)])
  docs[:, -5:] = -1  # padding
  live = centroid_best >= threshold
  assert 0 < live.mean() < 1 or threshold == -np.inf
  tokens = plaid._flat(index, docs, residuals=False, live_centroids=live)
  got = np.asarray(plaid._centroid_interaction(table, tokens.codes, tokens.seg,
                                               tokens.step_query, docs >= 0, keep))
  for i in range(g):
    want = np.full(docs.shape[1], -np.inf)
    for j, d in enumerate(docs[i]):
      if d < 0:
        continue
      c = index.codes[index.doc_offsets[d]:index.doc_offsets[d + 1]]
      c = c[live[i][c]]
      # table rows are 0 at masked query tokens, so the sum runs over the valid ones
      want[j] = table[i][c].max(0).sum() if len(c) else -1e30
    np.testing.assert_allclose(np.sort(want[got[i]]), np.sort(want)[-keep:], rtol=1e-6)


def test_recall_at_10_against_exact_search(data):
  """PLAID's settings for k=10 (1 centroid per token, threshold 0.5, 64 reranked): at 4 bits the
  issue's 0.95 (measured 0.97). At 2 bits quantisation alone costs more on 32 dimensions:
  exhaustive settings measured 0.93, PLAID's 0.92 (near-ties at ranks 8-10 swapped)."""
  index = _index(data, 2)
  assert _recall(data, index) >= 0.9
  assert _recall(data, index) >= _recall(data, index, options=_exhaustive(index)) - 0.03
  assert _recall(data, index, options=plaid.SearchOptions(
      nprobe=4, threshold=0.3, candidates=64, keep=32, rerank=16)) >= 0.9
  assert _recall(data, _index(data, 4)) >= 0.95
  assert _recall(data, _index(data, 8)) >= 0.97


def test_no_id_outside_the_corpus(data):
  """Whatever the query (masked tokens, every token masked, tiny caps, k past every candidate):
  ids are corpus ids, best first, and -1 (score -inf) only after the last one found."""
  docs, mask, q, q_mask = data
  index = _index(data, 2)
  rng = np.random.default_rng(3)
  odd = _unit(rng.normal(size=(6, LQ, DIM)))
  odd_mask = rng.random((6, LQ)) < 0.5
  odd_mask[0] = False  # a query with no valid token finds nothing
  for options, k in [(None, K), (plaid.SearchOptions(nprobe=1, threshold=0.9, candidates=20,
                                                     keep=20, rerank=20, group=4), 20),
                     (dataclasses.replace(_exhaustive(index), candidates=N + 7, keep=N + 7,
                                          rerank=N + 7), N + 7)]:
    for queries, queries_mask in ((q, q_mask), (odd, odd_mask)):
      scores, ids = plaid.search(index, queries, queries_mask, k, options)
      assert ids.shape == (len(queries), k) and ids.dtype == np.int32
      assert np.all((ids >= -1) & (ids < N))
      assert np.array_equal(ids == -1, np.isneginf(scores))
      found = ids >= 0
      assert np.all(found[:, :-1] >= found[:, 1:])  # every -1 after the found ones
      for row, row_scores in zip(ids, scores):
        assert np.all(np.diff(row_scores[row >= 0]) <= 0)
        assert len(set(row[row >= 0])) == (row >= 0).sum()
  scores, ids = plaid.search(index, odd[:1], odd_mask[:1], K)
  assert (ids == -1).all()


def test_more_bits_reconstruct_better_and_8_bits_is_close(data):
  errors = [_reconstruction_error(data, _index(data, b)) for b in plaid.NBITS]
  assert all(a > b for a, b in zip(errors, errors[1:])), errors
  assert errors[-1] < 1e-4, errors  # squared L2 per unit-norm token
  recalls = [_recall(data, _index(data, b)) for b in plaid.NBITS]
  assert min(recalls) >= 0.85 and recalls[-1] >= recalls[0], recalls


@pytest.mark.parametrize("nbits", plaid.NBITS)
def test_pack_unpack_round_trip(nbits):
  b = np.random.default_rng(nbits).integers(0, 2**nbits, (5, DIM)).astype(np.uint8)
  packed = plaid._pack(b, nbits)
  assert packed.shape == (5, DIM * nbits // 8) and packed.dtype == np.uint8
  np.testing.assert_array_equal(plaid._unpack(packed, nbits), b)


def test_found_documents_and_short_candidate_lists(data):
  docs, mask, q, q_mask = data
  index = _index(data, 2)
  scores, ids = plaid.search(index, q, q_mask, K)
  assert scores.shape == ids.shape == (B, K) and ids.dtype == np.int32
  assert np.all(ids[:, 0] == np.arange(B) * 12)  # the source document wins
  assert np.all(np.diff(scores, axis=1) <= 0)
  # k beyond every candidate: the tail is -inf / -1.
  scores, ids = plaid.search(index, q[:1], q_mask[:1], N + 5, plaid.SearchOptions(
      nprobe=1, candidates=N + 5, keep=N + 5, rerank=N + 5))
  assert np.isneginf(scores[0, -5:]).all() and (ids[0, -5:] == -1).all()


def test_decompress_no_documents(data):
  index = _index(data, 2)
  rec, rec_mask = plaid.decompress(index, [])
  assert rec.shape == (0, index.max_doc_len, DIM) and rec_mask.shape == (0, index.max_doc_len)


def test_save_load_round_trip(data, tmp_path):
  docs, mask, q, q_mask = data
  index = _index(data, 2)
  path = tmp_path / "corpus.plaid.npz"
  plaid.save(index, path)
  assert [p.name for p in tmp_path.iterdir()] == ["corpus.plaid.npz"]  # no temp file left
  loaded = plaid.load(path)
  assert loaded.nbits == 2
  for name in plaid._ARRAYS:
    np.testing.assert_array_equal(getattr(loaded, name), getattr(index, name))
  for got, want in zip(plaid.search(loaded, q, q_mask, K), plaid.search(index, q, q_mask, K)):
    np.testing.assert_array_equal(got, want)


def test_bad_nbits(data):
  docs, mask = data[:2]
  with pytest.raises(ValueError, match="nbits must be one of"):
    plaid.build([(docs, mask)], num_centroids=8, nbits=3)


def test_corrupt_files_name_the_path(data, tmp_path):
  index = _index(data, 1)
  garbage = tmp_path / "garbage.npz"
  garbage.write_bytes(b"not an index at all")
  with pytest.raises(ValueError, match="garbage.npz"):
    plaid.load(garbage)

  good = tmp_path / "good.npz"
  plaid.save(index, good)
  truncated = tmp_path / "truncated.npz"
  truncated.write_bytes(good.read_bytes()[:-2000])
  with pytest.raises(ValueError, match="truncated.npz"):
    plaid.load(truncated)

  with np.load(good) as z:
    files = dict(z)
  files["residuals"] = files["residuals"][:, :-1]  # wrong shape for nbits=1
  bad_shape = tmp_path / "bad_shape.npz"
  np.savez(bad_shape, **files)
  with pytest.raises(ValueError, match="bad_shape.npz.*residuals"):
    plaid.load(bad_shape)

  files = dict(np.load(good))
  files["meta"] = np.array(str(files["meta"]).replace('"version": 1', '"version": 99'))
  old = tmp_path / "old.npz"
  np.savez(old, **files)
  with pytest.raises(ValueError, match="old.npz.*version"):
    plaid.load(old)


def test_an_index_of_another_corpus_or_size_names_the_file(data, tmp_path):
  docs, mask = data[:2]
  index = plaid.build([(docs, mask)], num_centroids=16, nbits=2, corpus_key="SAMPLE_abc")
  path = tmp_path / "corpus.plaid.npz"
  plaid.save(index, path)
  assert plaid.load(path, corpus_key="SAMPLE_abc", dim=DIM).corpus_key == "SAMPLE_abc"
  with pytest.raises(ValueError, match="corpus.plaid.npz: built for another corpus"):
    plaid.load(path, corpus_key="SAMPLE_def")
  with pytest.raises(ValueError, match="corpus.plaid.npz: built for 32-dimensional embeddings"):
    plaid.load(path, dim=128)
  with pytest.raises(ValueError, match=r"q must be \[B, Lq, 32\] for this index"):
    plaid.search(index, np.zeros((1, 4, 128), np.float32), None, K)


@pytest.mark.parametrize("change, message", [
    (dict(nprobe=0), "nprobe=0: must be an integer >= 1"),
    (dict(candidates=2.5), "candidates=2.5: must be an integer >= 1"),
    (dict(keep=8), "need candidates >= keep >= rerank >= k=10"),
    (dict(rerank=5, keep=5), "need candidates >= keep >= rerank >= k=10"),
    (dict(threshold=float("nan")), "threshold=nan: must be a number"),
])
def test_search_options_out_of_range_name_the_field(data, change, message):
  options = dataclasses.replace(plaid.SearchOptions.for_k(K), **change)
  with pytest.raises(ConfigError) as error:
    plaid.search(_index(data, 2), data[2], data[3], K, options)
  assert str(error.value).startswith("SearchOptions.") and message in str(error.value)


def test_default_number_of_centroids_is_plaids():
  # ColBERT's indexer: 2 ** floor(log2(16 * sqrt(tokens))).
  for tokens, want in [(5923, 1024), (1_800_000, 16384), (9_000_000, 32768), (1, 16)]:
    assert plaid.default_num_centroids(tokens) == want


def test_k_means_sample_size(data):
  """16 tokens per centroid by default (at least 65,536); a bad or too small size names itself."""
  assert plaid.default_sample_size(32768) == 524288 and plaid.default_sample_size(64) == 65536
  chunks = [data[:2]]
  with pytest.raises(ConfigError, match="sample_size=0: must be an integer >= 1"):
    plaid.build(chunks, num_centroids=64, sample_size=0)
  with pytest.raises(ValueError, match=r"num_centroids=64 needs 1 <= C <= sampled valid tokens .32."):
    plaid.build(chunks, num_centroids=64, sample_size=32)


def test_sharded_search_equals_single_device_search(data):
  """Shards on the 8 simulated devices: with every list probed and nothing pruned, the merged
  top-k is the whole index's; with PLAID's settings each shard prunes its own documents, and the
  recall stays that of one index."""
  docs, mask, q, q_mask = data
  index = _index(data, 2)
  shards = plaid.shard(index, 8)
  assert sum(s.num_docs for s in shards) == N
  assert sum(s.codes.size for s in shards) == index.codes.size
  scores, ids = plaid.search_sharded(shards, q, q_mask, K, _exhaustive(index))
  want_scores, want = plaid.search(index, q, q_mask, K, _exhaustive(index))
  np.testing.assert_array_equal(ids, want)
  np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-5)
  _, want = search.exact_search(q, q_mask, docs, mask, K, chunk_size=128)
  _, got = plaid.search_sharded(shards, q, q_mask, K)
  assert np.mean([len(set(g) & set(w)) / K for g, w in zip(got, np.asarray(want))]) >= 0.9
  with pytest.raises(ConfigError, match="num_shards=0"):
    plaid.shard(index, 0)


def test_a_sharded_folder_loads_whole_or_a_hosts_share(data, tmp_path):
  """save(num_shards=3) writes a folder; load joins it back into the index; load_shards reads
  some shards (a host's), whose search returns corpus ids: two hosts' top-k, merged, are the
  whole index's."""
  _, _, q, q_mask = data
  index = _index(data, 2)
  folder = tmp_path / "corpus.plaid"
  plaid.save(index, folder, num_shards=3)
  assert sorted(p.name for p in folder.iterdir()) == [
      "meta.json", "shard_00000-of-00003.npz", "shard_00001-of-00003.npz",
      "shard_00002-of-00003.npz", "shared.npz"]
  whole = plaid.load(folder, dim=DIM)
  for name in plaid._ARRAYS:
    np.testing.assert_array_equal(getattr(whole, name), getattr(index, name), err_msg=name)
  options = _exhaustive(index)
  want_scores, want = plaid.search(index, q, q_mask, K, options)
  hosts = [plaid.load_shards(folder, which=[0, 1]), plaid.load_shards(folder, which=[2])]
  assert hosts[1][0].first_doc == hosts[0][1].first_doc + hosts[0][1].num_docs
  found = [plaid.search_sharded(shards, q, q_mask, K, options) for shards in hosts]
  scores = np.concatenate([s for s, _ in found], axis=1)
  ids = np.concatenate([i for _, i in found], axis=1)
  assert ids.min() >= 0 and (ids[:, K:] >= hosts[1][0].first_doc).all()
  order = np.lexsort((ids, -scores), axis=1)[:, :K]
  np.testing.assert_array_equal(np.take_along_axis(ids, order, 1), want)
  np.testing.assert_allclose(np.take_along_axis(scores, order, 1), want_scores, rtol=1e-5,
                             atol=1e-5)

  with pytest.raises(ConfigError, match=r"which=\[3\]: .* has shards 0..2"):
    plaid.load_shards(folder, which=[3])
  with pytest.raises(ValueError, match="built for another corpus"):
    plaid.load_shards(folder, corpus_key="other")
  (folder / "shard_00001-of-00003.npz").write_bytes(b"damaged")
  with pytest.raises(ValueError, match="shard_00001-of-00003.npz: not a readable"):
    plaid.load(folder)
  (folder / "meta.json").unlink()  # as a save cut off before its last file
  with pytest.raises(ValueError, match="corpus.plaid: not a sharded PLAID index .no meta.json"):
    plaid.load_shards(folder)


@pytest.mark.parametrize("num_shards", [2, 3, 7])
def test_build_sharded_writes_what_save_of_build_writes(data, tmp_path, num_shards):
  """Encoding straight into shard files gives the same folder as building in memory and saving:
  shard boundaries fall inside the build's chunks (100 documents) and across them."""
  docs, mask = data[:2]
  chunks = [(docs[i:i + CHUNK], mask[i:i + CHUNK]) for i in range(0, N, CHUNK)]
  options = dict(num_centroids=64, nbits=2, kmeans_iters=8, corpus_key="c")
  whole = plaid.build(chunks, **options)
  plaid.save(whole, tmp_path / "saved", num_shards=num_shards)
  plaid.build_sharded(chunks, tmp_path / "built", num_shards, **options)
  names = sorted(p.name for p in (tmp_path / "saved").iterdir())
  assert sorted(p.name for p in (tmp_path / "built").iterdir()) == names
  assert (tmp_path / "built" / "meta.json").read_text() == (
      tmp_path / "saved" / "meta.json").read_text()
  for a, b in zip(plaid.load_shards(tmp_path / "built"), plaid.load_shards(tmp_path / "saved")):
    assert a.first_doc == b.first_doc
    for name in plaid._ARRAYS:
      np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)


def test_build_sharded_to_a_bucket_and_its_errors(data, gcs):
  """A gs:// folder, written shard by shard: loads back as the in-memory build. A rebuild into
  the folder first removes its meta.json, so a rebuild cut short never reads as complete."""
  docs, mask = data[:2]
  chunks = [(docs[i:i + CHUNK], mask[i:i + CHUNK]) for i in range(0, N, CHUNK)]
  url = f"gs://{gcs.bucket}/corpus.plaid"
  plaid.build_sharded(chunks, url, 4, num_centroids=64, kmeans_iters=8)
  assert gcs.names("corpus.plaid/")[-1] == "corpus.plaid/shared.npz"
  assert len(gcs.names("corpus.plaid/")) == 6
  whole = plaid.load(url)
  want = plaid.build(chunks, num_centroids=64, kmeans_iters=8)
  for name in plaid._ARRAYS:
    np.testing.assert_array_equal(getattr(whole, name), getattr(want, name), err_msg=name)

  # a source whose second pass stops short (a corpus that changed between the passes)
  passes = iter([lambda: iter(chunks), lambda: iter(chunks[:2])])
  with pytest.raises(ValueError, match="fewer documents in pass 2 than in pass 1 .400."):
    plaid.build_sharded(lambda: next(passes)(), url, 4, num_centroids=64, kmeans_iters=8)
  assert "corpus.plaid/meta.json" not in gcs.names("corpus.plaid/")
  with pytest.raises(ValueError, match="not a sharded PLAID index"):
    plaid.load_shards(url)
  with pytest.raises(ConfigError, match=r"num_shards=401: must be in \[1, 400\]"):
    plaid.build_sharded(chunks, url, 401, num_centroids=64, kmeans_iters=8)
  with pytest.raises(ConfigError, match="num_shards=0"):
    plaid.build_sharded(chunks, url, 0, num_centroids=64, kmeans_iters=8)
