"""The eval binary end to end on the sample M2KR build: from a trainer workdir and from a published
folder, outputs consistent with the metrics' definitions, clear errors."""

import dataclasses
import json
import os
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import preflmr_jax
from preflmr_jax import data, evaluate, evaluation, metrics, tokenization, train
from preflmr_jax import index as plaid
from preflmr_jax.data import m2kr, m2kr_build, sample
from preflmr_jax.models import model_config as mc
from preflmr_jax.models import preflmr
from preflmr_jax.user_errors import ConfigError

# End to end through the eval binary on the session's trained run (tests/conftest.py).
pytestmark = pytest.mark.slow


def _encoder(restored, batch_size):
  return evaluation.Encoder(restored.model_config, restored.params, restored.query_tokenizer,
                            restored.document_tokenizer, evaluation.eval_mesh(), batch_size)


@pytest.fixture
def workdir(trained_workdir):
  return str(trained_workdir)  # the session's tiny run: 6 steps (tests/conftest.py)


@pytest.fixture
def data_dir(sample_data_dir):
  return sample_data_dir


def test_workdir_checkpoint_end_to_end(workdir, data_dir, tmp_path, tiny_config):
  results = evaluate.run(tiny_config(), workdir, ["SAMPLE"], "test", data_dir, str(tmp_path),
                         ks=(1, 5), batch_size=16)
  r = results["SAMPLE"]
  queries = m2kr.load_queries(data_dir, "SAMPLE", "test")
  passages = m2kr.load_passages(data_dir, "SAMPLE", "test")
  assert r["num_queries"] == len(queries) and r["num_passages"] == len(passages)
  assert r["step"] == 6 and r["checkpoint"] == workdir and r["headline"] == "Recall@1"
  assert json.load(open(tmp_path / "results.json")) == results
  lines = [json.loads(l) for l in open(tmp_path / "SAMPLE_rankings.jsonl")]
  assert [l["question_id"] for l in lines] == [queries[i]["question_id"]
                                               for i in range(len(queries))]
  for l in lines:
    assert len(l["passage_ids"]) == 5 and l["scores"] == sorted(l["scores"], reverse=True)
  # The metrics are those of the written rankings, by the metrics' definitions.
  rankings = [l["passage_ids"] for l in lines]
  positives = [queries[i]["pos_item_ids"] for i in range(len(queries))]
  want = metrics.recall_at_k(rankings, positives, (1, 5))
  assert r["Recall@1"] == want[1] and r["Recall@5"] == want[5]
  text = {passages[i]["passage_id"]: passages[i]["passage_content"] for i in range(len(passages))}
  pseudo = metrics.pseudo_recall_at_k(rankings, [queries[i]["answers"] for i in range(len(queries))],
                                      text, (5,))
  assert r["PseudoRecall@5"] == pseudo[5]
  table = (tmp_path / "results.md").read_text()
  assert f"**{r['Recall@1']:.4f}**" in table and "| SAMPLE |" in table
  header = [c.strip() for c in table.splitlines()[0].strip("|").split("|")]
  assert header[3:] == [k for k in r if "@" in k]  # as the log line lists them


def test_the_table_groups_the_metrics_by_kind_then_k():
  """Tasks may add their headline's K to --ks: the columns still read Recall@1, @5, @10, ..."""
  row = lambda ks, headline: {"num_queries": 1, "num_passages": 2, "headline": headline,
                              **{f"{m}@{k}": 0.5 for m in ("Recall", "PseudoRecall") for k in ks}}
  table = evaluate.markdown({"A": row((1, 10), "Recall@10"), "B": row((1, 5), "PseudoRecall@5")})
  header, _, a, b = table.splitlines()
  assert header == ("| task | queries | passages | Recall@1 | Recall@5 | Recall@10 | "
                    "PseudoRecall@1 | PseudoRecall@5 | PseudoRecall@10 |")
  assert a == "| A | 1 | 2 | 0.5000 |  | **0.5000** | 0.5000 |  | 0.5000 |"
  assert b == "| B | 1 | 2 | 0.5000 | 0.5000 |  | 0.5000 | **0.5000** |  |"


def test_scores_equal_the_model_maxsim(workdir, data_dir, tmp_path, tiny_config):
  """Top-1 scores equal MaxSim of the encoders' outputs computed directly (no search)."""
  restored = evaluate.restore(tiny_config(), workdir)
  encoder = _encoder(restored, 8)
  passages = m2kr.load_passages(data_dir, "SAMPLE", "test")
  queries = m2kr.load_queries(data_dir, "SAMPLE", "test")
  texts = [passages[i]["passage_content"] for i in range(len(passages))]
  # Each batch comes back as wide as its longest document (rounded up): pad to one width.
  batches = [encoder.documents(texts[i:i + 8]) for i in range(0, 64, 8)]
  width = max(e.shape[1] for e, _ in batches)
  assert all(e.shape[1] % evaluation.DOC_LENGTH_MULTIPLE == 0 for e, _ in batches)
  pad = lambda x: np.pad(x, [(0, 0), (0, width - x.shape[1])] + [(0, 0)] * (x.ndim - 2))
  d = np.concatenate([pad(e) for e, _ in batches])
  d_mask = np.concatenate([pad(m) for _, m in batches])
  q, _ = encoder.queries(*zip(*[(queries[i]["question"], queries[i]["instruction"],
                                 queries[i]["image"]) for i in range(4)]))
  scores = np.asarray(preflmr_jax.maxsim(q, d, d_mask))
  evaluate.run(tiny_config(), workdir, ["SAMPLE"], "test", data_dir, str(tmp_path), ks=(1,),
               batch_size=16)
  lines = [json.loads(l) for l in open(tmp_path / "SAMPLE_rankings.jsonl")][:4]
  ids = [passages[i]["passage_id"] for i in range(len(passages))]
  for row, l in zip(scores, lines):
    assert l["passage_ids"][0] == ids[int(np.argmax(row))]
    np.testing.assert_allclose(l["scores"][0], row.max(), rtol=1e-5)


def test_corpus_encoded_in_length_buckets_equals_full_padding(workdir, data_dir, monkeypatch,
                                                              tiny_config):
  """encode_corpus sorts documents by length and pads each batch only to a multiple of
  DOC_LENGTH_MULTIPLE; every passage's packed tokens equal it encoded alone at doc_maxlen."""
  monkeypatch.setattr(evaluation, "DOC_LENGTH_MULTIPLE", 8)  # tiny doc_maxlen is 64
  restored = evaluate.restore(tiny_config(), workdir)
  encoder = _encoder(restored, 8)
  widths, documents = [], encoder.encode_documents
  encoder.encode_documents = lambda t, w: widths.append(w) or documents(t, w)
  passages = m2kr.load_passages(data_dir, "SAMPLE", "test")
  corpus = evaluation.encode_corpus(encoder, passages, "SAMPLE", None)
  assert len(set(widths)) > 1 and widths == sorted(widths), widths  # sorted batches, buckets
  assert corpus.ids == [passages[i]["passage_id"] for i in range(len(passages))]
  assert sorted(corpus.passages.tolist()) == list(range(len(passages)))  # each passage once
  starts = np.concatenate([[0], np.cumsum(corpus.lengths)])
  model = preflmr.PreFLMR(restored.model_config)
  for row in (0, 5, len(corpus.passages) - 1):
    t = encoder.doc_tok([corpus.texts[corpus.passages[row]]], padding="max_length")
    e, m = model.apply({"params": restored.params}, t["input_ids"], t["attention_mask"],
                       method=preflmr.PreFLMR.encode_documents)
    m = np.asarray(m[0], bool)
    assert m.sum() == corpus.lengths[row]
    np.testing.assert_allclose(corpus.tokens[starts[row]:starts[row + 1]], np.asarray(e[0])[m],
                               atol=1e-5)


def test_published_folder(workdir, data_dir, tmp_path, tiny_config):
  restored = evaluate.restore(tiny_config(), workdir)
  folder = str(tmp_path / "published")
  preflmr_jax.PretrainedPreFLMR(restored.model_config, restored.params).save_pretrained(folder)
  a = evaluate.run(tiny_config(), workdir, ["SAMPLE"], "test", data_dir, str(tmp_path / "a"), ks=(1,))
  b = evaluate.run(tiny_config(), folder, ["SAMPLE"], "test", data_dir, str(tmp_path / "b"), ks=(1,))
  assert b["SAMPLE"]["step"] is None
  assert a["SAMPLE"]["Recall@1"] == b["SAMPLE"]["Recall@1"]


def test_checkpoint_of_another_config_names_the_parameter(workdir, data_dir, tmp_path, tiny_config):
  other = tiny_config(**{"model.dim": 8})
  with pytest.raises(ValueError, match=r"document_head/kernel: the checkpoint .* has shape \(32, 16\), the model expects \(32, 8\)"):
    evaluate.run(other, workdir, ["SAMPLE"], "test", data_dir, str(tmp_path))


def test_missing_split_or_checkpoint_is_a_clear_error(workdir, data_dir, tmp_path, tiny_config):
  with pytest.raises(ValueError, match="--split='dev'"):
    evaluate.run(tiny_config(), workdir, ["SAMPLE"], "dev", data_dir, str(tmp_path))
  with pytest.raises(FileNotFoundError, match="OKVQA.*not built"):
    evaluate.run(tiny_config(), workdir, ["OKVQA"], "test", data_dir, str(tmp_path))
  with pytest.raises(FileNotFoundError, match="no such folder"):
    evaluate.run(tiny_config(), str(tmp_path / "nope"), ["SAMPLE"], "test", data_dir, str(tmp_path))


def test_binary(workdir, data_dir, tmp_path, cli):
  out = cli("preflmr_jax.evaluate", "--config", "configs/tiny.py", "--checkpoint", workdir,
            "--tasks", "SAMPLE", "--split", "test", "--data_dir", data_dir, "--output", tmp_path,
            "--ks", "1,5", env={"XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
  assert out.returncode == 0, out.stderr[-3000:]
  assert "| SAMPLE |" in out.stdout
  results = json.load(open(tmp_path / "results.json"))
  assert set(results["SAMPLE"]) >= {"Recall@1", "Recall@5", "PseudoRecall@5", "num_queries"}


def test_embedding_cache_is_reused_and_invalidated(workdir, data_dir, tmp_path, monkeypatch,
                                                   tiny_config):
  cache = str(tmp_path / "cache")
  first = evaluate.run(tiny_config(), workdir, ["SAMPLE"], "test", data_dir, str(tmp_path / "a"),
                       ks=(1, 5), cache_dir=cache)
  assert len(os.listdir(cache)) == 1

  def no_encoding(*args, **kwargs):
    raise AssertionError("the corpus was encoded again")
  with monkeypatch.context() as m:
    m.setattr(evaluation.Encoder, "encode_documents", no_encoding)
    again = evaluate.run(tiny_config(), workdir, ["SAMPLE"], "test", data_dir, str(tmp_path / "b"),
                         ks=(1, 5), cache_dir=cache)
  assert again["SAMPLE"]["Recall@5"] == first["SAMPLE"]["Recall@5"]
  assert open(tmp_path / "a" / "SAMPLE_rankings.jsonl").read() == open(
      tmp_path / "b" / "SAMPLE_rankings.jsonl").read()
  # A damaged entry is encoded again and replaced, with the same results.
  [entry] = [os.path.join(cache, name) for name in os.listdir(cache)]
  os.truncate(entry, 100)
  damaged = evaluate.run(tiny_config(), workdir, ["SAMPLE"], "test", data_dir,
                         str(tmp_path / "d"), ks=(1, 5), cache_dir=cache)
  assert damaged["SAMPLE"]["Recall@5"] == first["SAMPLE"]["Recall@5"]
  assert os.path.getsize(entry) > 100
  # Another checkpoint (step 2 of the same run): other parameters, a new cache entry.
  evaluate.run(tiny_config(), workdir, ["SAMPLE"], "test", data_dir, str(tmp_path / "c"), ks=(1,),
               step=2, cache_dir=cache)
  assert len(os.listdir(cache)) == 2


def test_compressed_index_reports_recall_against_exact_search(workdir, data_dir, tmp_path,
                                                              monkeypatch, tiny_config):
  """The index's rankings and their overlap with exact search; the index is built once next to
  the embedding cache entry and reused, and a damaged entry is rebuilt."""
  cache = tmp_path / "cache"
  options = evaluation.IndexOptions(nbits=8, centroids=32, search=(("nprobe", 8),))
  exact = evaluate.run(tiny_config(), workdir, ["SAMPLE"], "test", data_dir, str(tmp_path / "e"),
                       ks=(1, 5), cache_dir=str(cache))["SAMPLE"]
  run = lambda out: evaluate.run(tiny_config(), workdir, ["SAMPLE"], "test", data_dir,
                                 str(tmp_path / out), ks=(1, 5), cache_dir=str(cache),
                                 index=options)["SAMPLE"]
  indexed = run("i")
  assert indexed["index"] == {"nbits": 8, "centroids": 32,
                              **dataclasses.asdict(plaid.SearchOptions.for_k(5, nprobe=8))}
  # The reported overlap is that of the two rankings files (its definition), well above chance
  # (5 of 64 passages); test_index.py measures the index's recall on structured corpora.
  top5 = lambda run: [json.loads(l)["passage_ids"] for l in open(tmp_path / run /
                                                                   "SAMPLE_rankings.jsonl")]
  overlap = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(top5("e"), top5("i"))])
  assert indexed["IndexRecallVsExact@5"] == pytest.approx(overlap) and overlap > 0.5
  assert indexed["index_search_seconds"] > 0 and indexed["index_speedup"] > 0
  assert abs(indexed["Recall@5"] - exact["Recall@5"]) <= 0.1

  [index_file] = cache.glob("*.plaid.npz")
  [embeddings] = [p for p in cache.glob("*.npz") if p != index_file]
  assert index_file.name == f"{embeddings.stem}_nbits8_c32.plaid.npz"

  def no_build(*args, **kwargs):
    raise AssertionError("the index was built again")
  index_file.write_bytes(index_file.read_bytes()[:100])  # damaged: rebuilt and rewritten
  assert run("r")["IndexRecallVsExact@5"] == indexed["IndexRecallVsExact@5"]
  with monkeypatch.context() as m:
    m.setattr(plaid, "build", no_build)
    run("c")
  for again in ("r", "c"):
    assert (tmp_path / "i" / "SAMPLE_rankings.jsonl").read_text() == (
        tmp_path / again / "SAMPLE_rankings.jsonl").read_text()
  # PLAID's own number of centroids (centroids=0) is recorded as the one built with.
  default = evaluate.run(tiny_config(), workdir, ["SAMPLE"], "test", data_dir,
                         str(tmp_path / "p"), ks=(1, 5), cache_dir=str(cache),
                         index=evaluation.IndexOptions(nbits=8))["SAMPLE"]
  [built] = [p for p in cache.glob("*.plaid.npz") if p != index_file]
  assert built.name.endswith(f"_nbits8_c{default['index']['centroids']}.plaid.npz")
  assert default["index"]["centroids"] > 0


def test_index_flag():
  parse = evaluation.IndexOptions.parse
  assert parse("") is None and parse("plaid") == evaluation.IndexOptions()
  assert parse("nbits=4, nprobe=2,threshold=0.3") == evaluation.IndexOptions(
      nbits=4, search=(("nprobe", 2), ("threshold", 0.3)))
  assert parse("candidates=512").search_options(100) == plaid.SearchOptions.for_k(
      100, candidates=512, keep=512)  # a cap under PLAID's keep lowers keep
  for text, message in [("bits=2", "--index='bits=2': expected KEY=VALUE pairs"),
                        ("nprobe=two", "--index='nprobe=two': nprobe takes an integer"),
                        ("threshold=high", "threshold takes a number")]:
    with pytest.raises(ConfigError, match=re.escape(message)):
      parse(text)
  for text, message in [("nprobe=0", "--index=nprobe=0: must be an integer >= 1"),
                        ("nbits=3", "--index=nbits=3: must be one of (1, 2, 4, 8)"),
                        ("centroids=-1", "--index=centroids=-1: must be >= 1")]:
    with pytest.raises(ConfigError, match=re.escape(message)):
      parse(text).check(10)


def test_an_index_ranking_shorter_than_k_invents_no_passage(workdir, data_dir, tmp_path,
                                                            tiny_config):
  """One of 1024 centroids probed per query token finds fewer than k=64 candidates: the missing
  ranks stay missing (misses for the metrics), never the corpus's last passage at score -inf."""
  options = evaluation.IndexOptions(nbits=8, centroids=1024, search=(("nprobe", 1),))
  out = tmp_path / "i"
  result = evaluate.run(tiny_config(), workdir, ["SAMPLE"], "test", data_dir, str(out), ks=(1, 64),
                        index=options)["SAMPLE"]

  def no_constants(name):
    raise AssertionError(f"rankings hold {name}")
  rankings = [json.loads(line, parse_constant=no_constants)
              for line in (out / "SAMPLE_rankings.jsonl").read_text().splitlines()]
  assert min(len(r["passage_ids"]) for r in rankings) < 64  # the case under test happens
  for r in rankings:
    assert len(set(r["passage_ids"])) == len(r["passage_ids"]) == len(r["scores"])
    assert all(np.isfinite(r["scores"]))
  positives = {r["question_id"]: r["pos_item_ids"]
               for r in m2kr.load_queries(data_dir, "SAMPLE", "test")}
  recall = metrics.recall_at_k([r["passage_ids"] for r in rankings],
                               [positives[r["question_id"]] for r in rankings], (64,))[64]
  assert result["Recall@64"] == pytest.approx(recall)


def test_queries_whose_positives_are_not_in_the_corpus_are_evaluated_as_misses(workdir, tmp_path,
                                                                               tiny_config):
  """The official evaluation keeps such queries (Recall misses, the same denominator as the paper);
  only training drops them."""
  source = sample.write_sample(str(tmp_path / "src"),
                               queries_per_class={"train": 1, "valid": 1, "test": 1})
  for split, orphans in (("train", 1), ("test", 2)):
    path = os.path.join(source, "SAMPLE_data", f"{split}-00000-of-00001.parquet")
    rows = pq.read_table(path).to_pylist()
    for row in rows[:orphans]:
      row["pos_item_ids"] = ["not-in-the-corpus"]
    pq.write_table(pa.Table.from_pylist(rows), path)
  data_dir = str(tmp_path / "built")
  report = m2kr_build.build(source, os.path.join(source, sample.IMAGES), ["SAMPLE"], data_dir)
  assert [i.reason for i in report.skipped] == [
      "no positive in train_passages: ['not-in-the-corpus']"]
  assert [n.reason for n in report.notes] == [
      "2 queries have no positive in test_passages: kept, each counts as a Recall miss"]
  test = m2kr.load_queries(data_dir, "SAMPLE", "test")
  assert len(test) == len(rows) and test[0]["pos_item_ids"] == ["not-in-the-corpus"]

  out = tmp_path / "out"
  result = evaluate.run(tiny_config(), workdir, ["SAMPLE"], "test", data_dir, str(out),
                        ks=(1, 64))["SAMPLE"]
  assert result["num_queries"] == len(rows) and result["queries_without_positive_in_corpus"] == 2
  rankings = [json.loads(line) for line in (out / "SAMPLE_rankings.jsonl").read_text().splitlines()]
  hits = [bool(set(r["passage_ids"]) & set(q["pos_item_ids"])) for r, q in zip(rankings, test)]
  assert not hits[0] and not hits[1] and all(hits[2:])  # all 64 passages ranked: the rest hit
  assert result["Recall@64"] == pytest.approx(np.mean(hits))


def test_rankings_of_the_train_split_become_a_runs_hard_negatives(workdir, data_dir, tmp_path,
                                                                  tiny_config):
  """The loop of docs/recipe.md: the eval binary ranks the train split, a run draws its negatives
  from each query's top 5 there (never a positive), and trains."""
  mined = tmp_path / "mined"
  evaluate.run(tiny_config(), workdir, ["SAMPLE"], "train", data_dir, str(mined), ks=(1, 5))
  top = {}  # a positive passage -> the top 5 of the queries that have it
  records = m2kr.load_queries(data_dir, "SAMPLE", "train")
  ranked = {json.loads(line)["question_id"]: json.loads(line)["passage_ids"][:5]
            for line in (mined / "SAMPLE_rankings.jsonl").read_text().splitlines()}
  assert len(ranked) == len(records)
  passages = m2kr.load_passages(data_dir, "SAMPLE", "train")
  index = {passages[i]["passage_id"]: i for i in range(len(passages))}
  for r in records:
    top.setdefault(index[r["pos_item_ids"][0]], set()).update(
        index[p] for p in ranked[r["question_id"]])
  config = tiny_config(num_negatives=2, num_train_steps=2, log_every_steps=1, checkpoint_every_steps=2,
                   **{"data.hard_negatives_dir": str(mined), "data.hard_negatives_depth": 5,
                      "optimizer.warmup_steps": 0})
  it = data.make_train_iterator(config, mc.PreFLMRConfig.from_dict(config.model),
                                tokenization.tiny_tokenizer(), 0, 1)
  for _ in range(4):
    batch = next(it)
    for (positive, *negatives), positives in zip(
        batch["doc_labels"].reshape(-1, 3).tolist(), batch["positive_labels"].tolist()):
      assert set(negatives) <= top[positive] and not set(negatives) & set(positives)
  it.close()
  metrics = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert np.isfinite(metrics["loss"])


def test_corpus_streamed_from_host_gives_the_same_rankings(workdir, data_dir, tiny_config):
  encoder = _encoder(evaluate.restore(tiny_config(), workdir), 16)
  on_device, a = evaluation.evaluate_task(encoder, data_dir, "SAMPLE", "test", (1, 5), chunk_size=16)
  streamed, b = evaluation.evaluate_task(encoder, data_dir, "SAMPLE", "test", (1, 5), chunk_size=16,
                                       device_corpus_bytes=0)
  assert [r["passage_ids"] for r in a] == [r["passage_ids"] for r in b]
  np.testing.assert_allclose([r["scores"] for r in a], [r["scores"] for r in b], rtol=1e-6)
  assert on_device["Recall@5"] == streamed["Recall@5"]
