"""Data and evaluation under faults, on copies of the SAMPLE build: records that do not decode are
replaced (the same stream for any number of processes) up to config.data.max_bad_records; damaged
shards and records are errors naming the file and the rebuild command, never passages "None"; the
embedding cache follows the passages' content; the eval binary checks its tasks and outputs before
any work, keeps each finished task, and writes files with the user's umask."""

import glob
import json
import logging
import os
import shutil
import stat
import subprocess
import sys

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from array_record.python import array_record_module

from preflmr_jax import config_files, data, evaluate, evaluation, exit_codes, tokenization
from preflmr_jax.data import m2kr, pipeline
from preflmr_jax.models import model_config as mc
from preflmr_jax.models import preflmr

REBUILD = "rebuild it: python -m preflmr_jax.data.prepare"


@pytest.fixture
def data_dir(sample_data_dir, tmp_path):
  """A copy of the SAMPLE build, to damage."""
  shutil.copytree(sample_data_dir, tmp_path / "tfds")
  return str(tmp_path / "tfds")


def _shard(data_dir, kind, split):
  return glob.glob(os.path.join(m2kr.dataset_dir(data_dir, "SAMPLE", kind),
                                f"*-{split}.array_record-*"))[0]


def _rewrite(data_dir, kind, split, change):
  """Rewrites the split's shard with record i's bytes as `change(i, bytes, features)` returns
  them, and records its size as the build does."""
  folder = m2kr.dataset_dir(data_dir, "SAMPLE", kind)
  features = tfds.builder_from_directory(folder).info.features
  path = _shard(data_dir, kind, split)
  reader = array_record_module.ArrayRecordReader(path)
  raws = reader.read_all()
  reader.close()
  writer = array_record_module.ArrayRecordWriter(path, "group_size:1")  # as TFDS writes them
  for i, raw in enumerate(raws):
    writer.write(change(i, raw, features))
  writer.close()
  with open(os.path.join(folder, "metadata.json")) as f:
    metadata = json.load(f)
  metadata["splits"][split]["shard_bytes"] = [os.path.getsize(path)]
  with open(os.path.join(folder, "metadata.json"), "w") as f:
    json.dump(metadata, f)
  return path


def _replace(record, **fields):
  """A record's bytes -> its bytes with `fields` changed."""
  def change(i, raw, features):
    if i != record:
      return raw
    example = {k: v.decode() if isinstance(v, bytes) and k != "image" else v
               for k, v in features.deserialize_example_np(raw).items()}
    example.update(fields)
    return features.serialize_example(example)
  return change


# ------------------------------------------------------------------ 5: training records


def _iterator(config, **kwargs):
  model_config = mc.PreFLMRConfig.from_dict(config.model)
  return data.make_train_iterator(config, model_config, tokenization.tiny_tokenizer(), **kwargs)


@pytest.fixture
def damaged_train(data_dir, tiny_config):
  """The training shard with two bad records in the second global batch of 8: one whose image PIL
  cannot open, one whose bytes are no example at all. -> (data_dir, their indices, shard)."""
  stream = pipeline._global_stream([("SAMPLE", 1.0)], [1536], tiny_config().seed)
  image, garbage = stream[8 + 2][1], stream[8 + 5][1]
  bad_image = _replace(image, image=b"not an image")
  path = _rewrite(data_dir, "queries", "train",
                  lambda i, raw, f: b"\x08garbage" if i == garbage else bad_image(i, raw, f))
  return data_dir, (image, garbage), path


@pytest.mark.slow
def test_records_that_do_not_decode_are_replaced_the_same_for_any_process_count(damaged_train,
                                                                             caplog, tiny_config):
  data_dir, bad, path = damaged_train
  config = tiny_config(**{"data.data_dir": data_dir, "batch_size": 8, "num_negatives": 1})
  caplog.set_level(logging.WARNING)
  it = _iterator(config)
  whole = [next(it), next(it)]
  it.close()  # no batches read ahead in the background
  assert set(whole[1]) == set(data.BATCH_KEYS) and whole[1]["query_input_ids"].shape[0] == 8
  # Each bad record's row holds the task's next record: its positive is that record's passage.
  queries = m2kr.load_queries(data_dir, "SAMPLE", "train")
  passages = m2kr.load_passages(data_dir, "SAMPLE", "train")
  index = {passages[i]["passage_id"]: i for i in range(len(passages))}
  for row, record in zip((2, 5), bad):
    positive = whole[1]["doc_labels"][row * 2]
    assert positive in [index[p] for p in queries[record + 1]["pos_item_ids"]]
  logged = [r.getMessage() for r in caplog.records if "max_bad_records" in r.getMessage()]
  assert len(logged) == 2 and all(path in m and "SAMPLE" in m for m in logged), logged
  assert "undecodable image" in logged[0] and f"record {bad[0]}:" in logged[0]
  assert f"record {bad[1]}:" in logged[1] and "2 of config.data.max_bad_records=100" in logged[1]
  # Two processes make the same global batch; a resumed iterator continues with it.
  halves = [_iterator(config, process_index=p, process_count=2) for p in range(2)]
  for it in halves:
    it.set_state({"source": "m2kr", "step": 1})
  shares = [next(it) for it in halves]
  for it in halves:
    it.close()
  for key, value in whole[1].items():
    np.testing.assert_array_equal(np.concatenate([s[key] for s in shares]), value, err_msg=key)


@pytest.mark.slow
@pytest.mark.parametrize("limit", [0, 1])
def test_past_max_bad_records_the_stop_names_task_file_and_the_key(damaged_train, limit,
                                                                   tiny_config):
  data_dir, bad, path = damaged_train
  config = tiny_config(**{"data.data_dir": data_dir, "batch_size": 8, "num_negatives": 1,
                      "data.max_bad_records": limit})
  it = _iterator(config)
  next(it)
  with pytest.raises(ValueError) as error:
    next(it)
  it.close()
  message = str(error.value)
  assert f"{limit + 1} training records do not decode, over config.data.max_bad_records={limit}" \
      in message and f"M2KR SAMPLE: {path} record {bad[limit]}" in message and REBUILD in message
  assert "\n" not in message


def test_a_corrupt_chunk_is_an_error_naming_its_record(data_dir):
  path = _shard(data_dir, "passages", "test_passages")
  with open(path, "r+b") as f:  # a byte of the 14th record's chunk (one record per chunk)
    f.seek(3000)
    byte = f.read(1)
    f.seek(3000)
    f.write(bytes([byte[0] ^ 0x40]))
  passages = m2kr.load_passages(data_dir, "SAMPLE", "test")  # sizes and counts still match
  with pytest.raises(m2kr.CorruptRecordError, match=rf"M2KR SAMPLE: {path} record 13: Corrupted"):
    passages.__getitems__(range(len(passages)))
  assert passages[12]["passage_id"] == "SAMPLE_p12"


# ------------------------------------------------------------------ 6: damaged shards


def test_a_record_without_its_text_is_an_error_not_none(data_dir):
  def drop_text(i, raw, features):
    if i != 3:
      return raw
    from tensorflow_datasets.core.example_serializer import tf_example_pb2  # pylint: disable=g-import-not-at-top
    example = tf_example_pb2.Example()
    example.features.feature["passage_id"].bytes_list.value.append(b"SAMPLE_p03")
    return example.SerializeToString()
  path = _rewrite(data_dir, "passages", "test_passages", drop_text)
  passages = m2kr.load_passages(data_dir, "SAMPLE", "test")
  with pytest.raises(m2kr.CorruptRecordError, match=rf"{path} record 3: no passage_content; "
                                                    f"{REBUILD}"):
    passages[3]


@pytest.mark.slow
def test_a_truncated_passages_shard_stops_the_eval_binary_naming_file_and_rebuild(
    data_dir, tmp_path, trained_workdir):
  path = _shard(data_dir, "passages", "test_passages")
  with open(path, "rb") as f:
    whole = f.read()
  with open(path, "wb") as f:
    f.write(whole[:65536])  # at a block boundary: array_record reads it as zero records
  out = subprocess.run(
      [sys.executable, "-m", "preflmr_jax.evaluate", "--config", "configs/tiny.py",
       "--checkpoint", str(trained_workdir), "--tasks", "SAMPLE", "--split", "test",
       "--data_dir", data_dir, "--output", str(tmp_path / "out"), "--embedding_cache", "off"],
      cwd=config_files.REPO_ROOT, capture_output=True, text=True, timeout=300,
      env=dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1"))
  assert out.returncode == exit_codes.USAGE
  assert out.stderr.strip().splitlines()[-1] == (
      f"error: M2KR SAMPLE passages test_passages: {path}: "
      f"65536 bytes, the build wrote {len(whole)}; the build is damaged: {REBUILD} --source DIR "
      f"--image_root DIR --tasks SAMPLE --data_dir {data_dir} --overwrite"), out.stderr[-2000:]
  assert not os.path.exists(tmp_path / "out")  # nothing written
  # A build from before shard sizes were recorded: the record count read from the file.
  folder = m2kr.dataset_dir(data_dir, "SAMPLE", "passages")
  with open(os.path.join(folder, "metadata.json")) as f:
    metadata = json.load(f)
  del metadata["splits"]["test_passages"]["shard_bytes"]
  with open(os.path.join(folder, "metadata.json"), "w") as f:
    json.dump(metadata, f)
  with pytest.raises(m2kr.DamagedBuildError, match=rf"{path}: unreadable \(no record index\)"):
    m2kr.load_passages(data_dir, "SAMPLE", "test")


def _encoder(config):
  """Random parameters on one device (drawn with numpy: faster than the model's initialisers)."""
  model_config = mc.PreFLMRConfig.from_dict(config.model)
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda x: (0.02 * rng.standard_normal(x.shape)).astype(x.dtype),
                        preflmr.abstract_params(model_config))
  mesh = evaluation.eval_mesh(jax.devices()[:1])
  params = jax.device_put(params, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  tok = tokenization.tiny_tokenizer()
  return evaluation.Encoder(model_config, params, tok, tok, mesh, batch_size=64)


def test_the_embedding_cache_follows_the_passages_content(data_dir, tmp_path, monkeypatch,
                                                          tiny_config):
  old = os.umask(0o022)
  try:
    encoder, cache = _encoder(tiny_config()), tmp_path / "cache"
    encoded = []
    documents = encoder.encode_documents
    monkeypatch.setattr(encoder, "encode_documents",
                        lambda *a: encoded.append(1) or documents(*a))

    def corpus():
      encoded.clear()
      result = evaluation.encode_corpus(encoder, m2kr.load_passages(data_dir, "SAMPLE", "test"),
                                        "SAMPLE", str(cache))
      return result, bool(encoded)

    first, encoded_first = corpus()
    assert encoded_first and len(os.listdir(cache)) == 1
    assert corpus()[1] is False  # reused
    entry = cache / os.listdir(cache)[0]
    assert stat.S_IMODE(entry.stat().st_mode) == 0o644  # the umask's, not 0600
    # A rebuild whose passages 0 and 1 trade texts: dataset_info.json, sizes and counts as before.
    info = os.path.join(m2kr.dataset_dir(data_dir, "SAMPLE", "passages"), "dataset_info.json")
    info_before = open(info).read()
    texts = [first.texts[1], first.texts[0]]
    swap = [_replace(i, passage_content=texts[i]) for i in (0, 1)]
    _rewrite(data_dir, "passages", "test_passages", lambda i, raw, f: swap[i](i, raw, f) if i < 2 else raw)
    assert open(info).read() == info_before
    second, encoded_second = corpus()
    assert encoded_second and second.texts[:2] == texts and len(os.listdir(cache)) == 2
  finally:
    os.umask(old)


# ------------------------------------------------------------------ 7: evaluation loses nothing


@pytest.fixture
def two_tasks(data_dir):
  """SAMPLE and a copy of it built as OVEN."""
  for kind in ("queries", "passages"):
    shutil.copytree(m2kr.dataset_dir(data_dir, "SAMPLE", kind),
                    m2kr.dataset_dir(data_dir, "OVEN", kind))
  return data_dir


def test_tasks_and_output_are_checked_before_the_checkpoint_is_loaded(two_tasks, tmp_path,
                                                                       monkeypatch, tiny_config):
  def restore(*args, **kwargs):
    raise AssertionError("the checkpoint was loaded")
  monkeypatch.setattr(evaluate, "restore", restore)
  out = str(tmp_path / "out")
  with pytest.raises(m2kr.NotBuiltError, match="OKVQA passages are not built"):
    evaluate.run(tiny_config(), "ckpt", ["SAMPLE", "OKVQA"], "test", two_tasks, out)
  (tmp_path / "file").write_text("")
  for flag, kwargs in (("--output", {"output": str(tmp_path / "file" / "out")}),
                       ("--embedding_cache", {"output": out,
                                              "cache_dir": str(tmp_path / "file" / "cache")})):
    with pytest.raises(OSError, match=rf"^{flag}={tmp_path}/file/\w+: cannot create it \(Not a "
                       "directory"):
      evaluate.run(tiny_config(), "ckpt", ["SAMPLE", "OVEN"], "test", two_tasks, **kwargs)
  assert os.listdir(out) == []  # the probe is gone


def test_results_are_written_after_each_task_with_the_umask(two_tasks, tmp_path, monkeypatch,
                                                            tiny_config):
  model_config = mc.PreFLMRConfig.from_dict(tiny_config().model)
  tok = tokenization.tiny_tokenizer()
  monkeypatch.setattr(evaluate, "restore", lambda config, checkpoint, step, mesh: evaluate.Restored(
      model_config, preflmr.abstract_params(model_config), tok, tok, checkpoint, 7))

  def evaluate_task(encoder, data_dir, task, *args, **kwargs):
    if task == "OVEN":
      raise RuntimeError("OVEN crashed")
    return ({"Recall@1": 0.5, "headline": "Recall@1", "num_queries": 1, "num_passages": 2},
            [{"question_id": "q", "passage_ids": ["p"], "scores": [1.0]}])
  monkeypatch.setattr(evaluation, "evaluate_task", evaluate_task)
  out = tmp_path / "out"
  old = os.umask(0o022)
  try:
    with pytest.raises(RuntimeError, match="OVEN crashed"):
      evaluate.run(tiny_config(), "ckpt", ["SAMPLE", "OVEN"], "test", two_tasks, str(out))
  finally:
    os.umask(old)
  results = json.loads((out / "results.json").read_text())
  assert list(results) == ["SAMPLE"] and results["SAMPLE"]["step"] == 7
  assert "| SAMPLE |" in (out / "results.md").read_text()
  for name in ("results.json", "results.md", "SAMPLE_rankings.jsonl"):
    assert stat.S_IMODE((out / name).stat().st_mode) == 0o644, name
