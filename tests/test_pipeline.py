"""The M2KR input pipeline on real TFDS builds of the sample folder: determinism, host shards,
negatives, mixture weights, exact iterator state, instructions, text-only queries, config errors."""

import json
import shutil
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from preflmr_jax import config_files, data, image_processing, tokenization
from preflmr_jax.data import instructions, m2kr, m2kr_build, pipeline, sample
from preflmr_jax.models import model_config as mc


def _copy_task(source, name, passage_id, positives, every=1):
  """SAMPLE's folders as task `name`, passage ids renamed by `passage_id`, each query's positives
  given by `positives(its positive)`, every `every`-th query kept."""
  for kind, column in (("data", "pos_item_ids"), ("passages", "passage_id")):
    shutil.copytree(source / f"SAMPLE_{kind}", source / f"{name}_{kind}")
    for path in (source / f"{name}_{kind}").glob("*.parquet"):
      rows = pq.read_table(path).to_pylist()
      rows = rows[::every] if kind == "data" else rows
      for row in rows:
        row[column] = ([passage_id(p) for p in positives(row[column][0])] if kind == "data"
                       else passage_id(row[column]))
      pq.write_table(pa.Table.from_pylist(rows), path)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  """SAMPLE, plus copies of it as other tasks: "OVEN" with its own passage ids (VQA instructions)
  and "KVQA" sharing SAMPLE's ids, half its queries, each with two positives (its own and the next
  passage)."""
  root = tmp_path_factory.mktemp("m2kr")
  sample.write_sample(str(root / "source"))
  _copy_task(root / "source", "OVEN", lambda p: f"OVEN_{p}", lambda p: [p])
  _copy_task(root / "source", "KVQA", lambda p: p,
             lambda p: [p, f"{p[:-2]}{(int(p[-2:]) + 1) % 64:02d}"], every=2)
  report = m2kr_build.build(str(root / "source"), str(root / "source" / "images"),
                      ["SAMPLE", "OVEN", "KVQA"], str(root / "tfds"))
  assert report.usable, report.to_json()
  return str(root / "tfds")


def _config(data_dir, **overrides):
  return config_files.load_config("configs/tiny.py", {"data.data_dir": data_dir, **overrides})


def _iterator(config, **kwargs):
  model_config = mc.PreFLMRConfig.from_dict(config.model)
  return data.make_train_iterator(config, model_config, tokenization.tiny_tokenizer(), **kwargs)


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


@pytest.mark.slow
def test_batches_have_the_interface_shapes(data_dir):
  config = _config(data_dir)
  batch = next(_iterator(config, process_index=0, process_count=1))
  spec = data.batch_spec(config, mc.PreFLMRConfig.from_dict(config.model))
  assert set(batch) == set(data.BATCH_KEYS) == set(spec)
  for k, v in spec.items():
    assert batch[k].shape == v.shape and batch[k].dtype == v.dtype, k


@pytest.mark.slow
def test_same_seed_same_batches_other_seed_other_batches(data_dir):
  a = _take(_iterator(_config(data_dir), process_index=0, process_count=1), 3)
  b = _take(_iterator(_config(data_dir), process_index=0, process_count=1), 3)
  _assert_same(a, b)
  c = _take(_iterator(_config(data_dir, seed=1), process_index=0, process_count=1), 3)
  assert not np.array_equal(a[0]["pixel_values"], c[0]["pixel_values"])


def test_each_epoch_takes_every_query_once_reshuffled():
  stream = pipeline._global_stream([("SAMPLE", 1.0)], [10], seed=7)
  epochs = [[stream[i][1] for i in range(e * 10, (e + 1) * 10)] for e in range(2)]
  assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(10))
  assert epochs[0] != epochs[1]
  assert all(stream[i][0] == 0 for i in range(20))


def test_training_subsets_are_fixed_by_the_seed_and_nested():
  small, large = (pipeline.train_subset(5000, "OVEN", n, seed=0) for n in (100, 1000))
  assert len(small) == 100 and len(large) == 1000 and set(small) <= set(large)
  np.testing.assert_array_equal(small, pipeline.train_subset(5000, "OVEN", 100, seed=0))
  assert set(small) != set(pipeline.train_subset(5000, "OVEN", 100, seed=1))
  assert set(small) != set(pipeline.train_subset(5000, "WIT", 100, seed=0))  # per task
  assert len(pipeline.train_subset(50, "OVEN", 100, seed=0)) == 50  # all of a small task
  assert pipeline.subset_shares([("OVEN", 2.0), ("WIT", 1.0)], 100) == [67, 34]


def test_training_reads_only_its_subset(data_dir):
  records = m2kr.load_queries(data_dir, "SAMPLE", "train")
  passages = m2kr.load_passages(data_dir, "SAMPLE", "train")
  index = {passages[i]["passage_id"]: i for i in range(len(passages))}
  chosen = pipeline.train_subset(len(records), "SAMPLE", 24, seed=3)
  allowed = {index[p] for i in chosen for p in records[int(i)]["pos_item_ids"]}

  def positives(config):  # query i's positive is document i * (1 + n)
    batches = _take(_iterator(config, process_index=0, process_count=1), 6)
    return {int(x) for b in batches for x in b["doc_labels"][::1 + config.num_negatives]}

  subset = _config(data_dir, **{"data.max_train_examples": 24, "data.subset_seed": 3})
  assert positives(subset) <= allowed  # two epochs of the 24 queries
  assert not positives(_config(data_dir)) <= allowed


@pytest.mark.parametrize("prefetch", [0, 3])
def test_the_iterator_reads_at_most_prefetch_batches_ahead(data_dir, monkeypatch, prefetch):
  made = []
  make = pipeline._HostRows.map_with_index
  monkeypatch.setattr(pipeline._HostRows, "map_with_index",
                      lambda self, step, pairs: made.append(step) or make(self, step, pairs))
  it = _iterator(_config(data_dir, **{"data.prefetch_batches": prefetch}), process_index=0,
                 process_count=1)
  _take(it, 2)
  deadline = time.monotonic() + 10  # the threads read ahead while the train step would run
  while len(made) < 2 + prefetch and time.monotonic() < deadline:
    time.sleep(0.01)
  time.sleep(0.2)
  it.close()
  assert sorted(made) == list(range(2 + prefetch))  # grain's default reads 500 batches ahead


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
def test_the_global_batch_does_not_depend_on_the_number_of_processes(data_dir, workers):
  config = _config(data_dir, **{"data.tasks": "SAMPLE=3,OVEN=1", "batch_size": 8,
                                "num_negatives": 2, "data.num_workers": workers})
  whole = _take(_iterator(config, process_index=0, process_count=1), 3)
  for count in (2, 4):
    hosts = [_iterator(config, process_index=p, process_count=count) for p in range(count)]
    shares = [_take(it, 3) for it in hosts]
    for it in hosts:
      it.close()
    assert shares[0][0]["query_input_ids"].shape[0] == config.batch_size // count
    joined = [{k: np.concatenate([share[s][k] for share in shares]) for k in whole[s]}
              for s in range(3)]
    _assert_same(joined, whole)


@pytest.mark.slow
def test_a_run_resumes_with_another_number_of_processes(data_dir):
  config = _config(data_dir)
  two = [_iterator(config, process_index=p, process_count=2) for p in range(2)]
  for it in two:
    _take(it, 2)
  state = two[0].get_state()
  assert state == two[1].get_state()  # the same on every host
  one = _iterator(config, process_index=0, process_count=1)
  one.set_state(state)
  _assert_same(_take(one, 1), _take(_iterator(config, process_index=0, process_count=1), 3)[2:])


@pytest.mark.slow
def test_negatives_are_never_a_positive_of_their_query(data_dir):
  config = _config(data_dir, num_negatives=3)
  it = _iterator(config, process_index=0, process_count=1)
  records = m2kr.load_queries(data_dir, "SAMPLE", "train")
  passages = m2kr.load_passages(data_dir, "SAMPLE", "train")
  assert all(len(records[i]["pos_item_ids"]) == 1 for i in range(len(records)))
  for batch in _take(it, 20):
    labels = batch["doc_labels"].reshape(config.batch_size, 4)
    assert (labels[:, 1:] != labels[:, :1]).all()
    assert all(len(set(row)) == 4 for row in labels.tolist())  # distinct negatives
    assert labels.min() >= 0 and labels.max() < len(passages)


def test_a_passage_that_several_tasks_hold_has_one_label(data_dir):
  """KVQA's corpus holds SAMPLE's passage ids: the same labels, so the loss can tell a copy of a
  positive across tasks; OVEN's own ids get new labels."""
  label_of = {}
  corpora = {t: pipeline._Corpus.load(data_dir, t, "train", label_of)
             for t in ("SAMPLE", "KVQA", "OVEN")}
  np.testing.assert_array_equal(corpora["SAMPLE"].labels, np.arange(64))
  kvqa = corpora["KVQA"]
  np.testing.assert_array_equal(
      kvqa.labels, [corpora["SAMPLE"].index[p] for p in kvqa.index])  # by id, not by position
  np.testing.assert_array_equal(corpora["OVEN"].labels, np.arange(64, 128))
  config = _config(data_dir, **{"data.tasks": "SAMPLE,KVQA,OVEN", "batch_size": 16})
  for batch in _take(_iterator(config, process_index=0, process_count=1), 4):
    assert 0 <= batch["doc_labels"].min() and batch["doc_labels"].max() < 128


@pytest.mark.slow
def test_positive_labels_list_every_positive_of_the_query(data_dir):
  config = _config(data_dir, num_negatives=2, **{"data.tasks": "KVQA", "data.max_positives": 3})
  for batch in _take(_iterator(config, process_index=0, process_count=1), 4):
    rows, docs = batch["positive_labels"], batch["doc_labels"].reshape(config.batch_size, 3)
    assert rows.shape == (config.batch_size, 3) and (rows[:, 2] == -1).all()
    np.testing.assert_array_equal(rows[:, 1], (rows[:, 0] + 1) % 64)  # its own, then the next
    for row, (positive, *negatives) in zip(rows.tolist(), docs.tolist()):
      assert positive in row and not set(negatives) & set(row)


@pytest.mark.slow
def test_a_mixture_by_size_multiples_weighs_each_task_by_its_queries(data_dir):
  """"SAMPLE*1,KVQA*1" concatenates the two (official configs' form): 128 + 64 queries, so 2/3
  of the examples are SAMPLE's; "SAMPLE,KVQA" weighs them equally. KVQA rows list 2 positives."""
  def sample_share(tasks):
    config = _config(data_dir, **{"data.tasks": tasks, "batch_size": 32})
    rows = np.concatenate([b["positive_labels"] for b in
                           _take(_iterator(config, process_index=0, process_count=1), 25)])
    return np.mean(rows[:, 1] == -1)
  assert abs(sample_share("SAMPLE*1,KVQA*1") - 2 / 3) < 0.05
  assert abs(sample_share("SAMPLE,KVQA") - 1 / 2) < 0.05
  assert pipeline.sized("WIT*0.15,OVEN") and not pipeline.sized("WIT=0.15,OVEN")
  with pytest.raises(ValueError, match="mixes weights .TASK=w. and multiples"):
    pipeline.parse_tasks("SAMPLE*2,KVQA=1")


def test_mixture_follows_the_weights(data_dir):
  config = _config(data_dir, **{"data.tasks": "SAMPLE=3,OVEN=1", "batch_size": 32})
  n_sample = len(m2kr.load_passages(data_dir, "SAMPLE", "train"))
  labels = np.concatenate([b["doc_labels"][::2] for b in
                           _take(_iterator(config, process_index=0, process_count=1), 25)])
  share = np.mean(labels < n_sample)  # OVEN's passage ids, not SAMPLE's, follow in label space
  assert abs(share - 0.75) < 0.05, share


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
def test_iterator_state_continues_exactly(data_dir, workers):
  config = _config(data_dir, **{"data.num_workers": workers})
  it = _iterator(config, process_index=0, process_count=1)
  _take(it, 3)
  state = it.get_state()
  expected = _take(it, 2)
  it.close()
  again = _iterator(config, process_index=0, process_count=1)
  again.set_state(state)
  _assert_same(_take(again, 2), expected)
  again.close()
  if workers:  # worker processes produce exactly what the main process would
    _assert_same(expected, _take(_iterator(_config(data_dir), process_index=0, process_count=1),
                                 5)[3:])


def test_state_of_another_source_is_refused(data_dir):
  it = _iterator(_config(data_dir), process_index=0, process_count=1)
  with pytest.raises(ValueError, match="not a 'm2kr' data iterator state"):
    it.set_state({"source": "synthetic", "step": 3})


def test_training_draws_templates_a_task_without_keeps_its_own_instruction(data_dir):
  config = _config(data_dir)
  model_config = mc.PreFLMRConfig.from_dict(config.model)
  corpus = pipeline._Corpus.load(data_dir, "OVEN", "train")
  tok = tokenization.tiny_tokenizer()
  train = pipeline._MakeExample("OVEN", corpus, 1, tok, model_config)
  assert train.templates == instructions.VQA
  assert pipeline._MakeExample("SAMPLE", corpus, 1, tok, model_config).templates is None
  seen = set()
  for seed in range(40):
    record = {"question_id": "q", "question": "what?", "instruction": "Own:", "image": b"",
              "pos_item_ids": ["OVEN_SAMPLE_p03"], "answers": []}
    ids = train.random_map(record, np.random.default_rng(seed))["query_input_ids"]
    seen.add(tuple(ids.tolist()))
  assert len(seen) > 3  # the instruction varies across examples


def test_text_only_query_gets_a_black_image(data_dir):
  config = _config(data_dir)
  model_config = mc.PreFLMRConfig.from_dict(config.model)
  corpus = pipeline._Corpus.load(data_dir, "SAMPLE", "train")
  make = pipeline._MakeExample("SAMPLE", corpus, 1, tokenization.tiny_tokenizer(), model_config)
  record = {"question_id": "q", "question": "what?", "instruction": "Own:", "image": b"",
            "pos_item_ids": ["SAMPLE_p03"], "answers": []}
  example = make.random_map(record, np.random.default_rng(0))
  size = model_config.vision.image_size
  black = image_processing.preprocess_images([Image.new("RGB", (size, size))], size)[0]
  np.testing.assert_allclose(example["pixel_values"], black)
  assert example["doc_labels"][0] == 3


@pytest.mark.parametrize("overrides,error,message", [
    ({"data.tasks": ""}, ValueError, "config.data.tasks is empty"),
    ({"data.tasks": "OVEN,NOPE"}, ValueError, "config.data.tasks='OVEN,NOPE'.*unknown M2KR task"),
    ({"data.tasks": "OVEN=0"}, ValueError, "weight of OVEN must be positive"),
    ({"data.tasks": "OVEN*-1"}, ValueError, "weight of OVEN must be positive"),
    ({"data.tasks": "OVEN,oven"}, ValueError, "OVEN given twice"),
    ({"num_negatives": 64}, ValueError, "config.num_negatives=64: SAMPLE's corpus has only 64"),
    ({"data.tasks": "OKVQA"}, FileNotFoundError, "OKVQA.*not built.*preflmr_jax.data.prepare"),
    ({"data.num_workers": -1}, ValueError, "config.data.num_workers=-1"),
    ({"data.prefetch_batches": -1}, ValueError, "config.data.prefetch_batches=-1"),
    ({"data.max_train_examples": -5}, ValueError, "config.data.max_train_examples=-5"),
])
def test_bad_data_configs_name_the_key(data_dir, overrides, error, message):
  with pytest.raises(error, match=message):
    _iterator(_config(data_dir, **overrides), process_index=0, process_count=1)


def test_real_tasks_without_data_dir_ask_for_prepare():
  config = config_files.load_config("configs/tiny.py", {"data.tasks": "OVEN"})
  with pytest.raises(ValueError, match="config.data.data_dir is not set"):
    pipeline.resolve_data_dir(config)


def test_mined_hard_negatives_are_drawn_first_never_a_positive(data_dir, tmp_path):
  records = m2kr.load_queries(data_dir, "SAMPLE", "train")
  passages = m2kr.load_passages(data_dir, "SAMPLE", "train")
  pid = [passages[i]["passage_id"] for i in range(len(passages))]
  with open(tmp_path / "SAMPLE_rankings.jsonl", "w") as f:
    for i in range(len(records)):
      r = records[i]
      # Its positive first (must be skipped), then passages 10 and 11.
      ranking = r["pos_item_ids"] + [pid[10], pid[11]]
      f.write(json.dumps({"question_id": r["question_id"], "passage_ids": ranking}) + "\n")
  config = _config(data_dir, num_negatives=3,
                   **{"data.hard_negatives_dir": str(tmp_path), "data.hard_negatives_depth": 3})
  for batch in _take(_iterator(config, process_index=0, process_count=1), 5):
    labels = batch["doc_labels"].reshape(config.batch_size, 4)
    for pos, *negs in labels.tolist():
      mined = {10, 11} - {pos}
      assert mined <= set(negs) and pos not in negs


def test_a_missing_hard_negatives_folder_is_an_error(data_dir, tmp_path):
  config = _config(data_dir, **{"data.hard_negatives_dir": str(tmp_path / "typo")})
  with pytest.raises(FileNotFoundError, match=f"config.data.hard_negatives_dir={tmp_path / 'typo'}: "
                     "no such folder"):
    _iterator(config, process_index=0, process_count=1)


def test_malformed_rankings_name_the_line(data_dir, tmp_path):
  (tmp_path / "SAMPLE_rankings.jsonl").write_text('{"question_id": "a", "passage_ids": []}\nnope\n')
  config = _config(data_dir, **{"data.hard_negatives_dir": str(tmp_path)})
  with pytest.raises(ValueError, match="SAMPLE_rankings.jsonl:2: not a rankings line"):
    _iterator(config, process_index=0, process_count=1)
  (tmp_path / "SAMPLE_rankings.jsonl").write_text(
      '{"question_id": "a", "passage_ids": ["SAMPLE_p01"]}\n'
      '{"question_id": "b", "passage_ids": ["SAMPLE_p02", "OVEN_SAMPLE_p02"]}\n')
  with pytest.raises(ValueError, match=r"SAMPLE_rankings.jsonl:2: passage_ids holds "
                     r"\['OVEN_SAMPLE_p02'\], not in SAMPLE's train corpus"):
    _iterator(config, process_index=0, process_count=1)
