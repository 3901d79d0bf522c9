"""gs:// end to end against a real GCS emulator (tests/gcs.py): checkpoints (an interrupted save is
never restored), TFDS data read from a bucket, the trainer into gs://BUCKET/run, a resume from it
and the eval binary into gs://BUCKET/run/eval, and bad gs:// input as one-line errors naming the
path."""

import io
import json
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from preflmr_jax import checkpointing, storage, user_errors, workdir
from preflmr_jax.data import m2kr

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _tree(seed):
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("data",))
  put = lambda x: jax.device_put(x, NamedSharding(mesh, P()))
  key = jax.random.key(seed)
  return {"w": put(jax.random.normal(key, (4, 4))), "b": put(jnp.arange(4.0) + seed)}


def _abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def test_checkpoints_on_gs_and_an_interrupted_save_is_never_restored(gcs, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  run = f"gs://{gcs.bucket}/run"
  trees = {step: _tree(step) for step in (1, 2)}
  with checkpointing.Checkpointer(workdir.checkpoints_dir(run)) as ckpt:
    for step, tree in trees.items():
      assert ckpt.save(step, tree, tree, {"step": step})
    ckpt.wait()
  names = gcs.names("run/checkpoints/")
  assert {f"run/checkpoints/{step}/commit_success.txt" for step in (1, 2)} <= set(names)
  assert any(n.startswith("run/checkpoints/2/params/") for n in names)

  gcs.delete(f"run/checkpoints/2/{checkpointing.COMMIT_FILE}")  # step 2's save never finished
  abstract = _abstract(trees[1])
  with checkpointing.Checkpointer(workdir.checkpoints_dir(run)) as ckpt:
    assert ckpt.latest_step() == 1 and ckpt.all_steps() == [1]
    _, params, _, meta = ckpt.restore_latest(abstract, abstract)
    assert meta == {"step": 1}
    jax.tree.map(np.testing.assert_array_equal, params, trees[1])
    with pytest.raises(FileNotFoundError, match="no complete checkpoint for step 2"):
      ckpt.restore(2, abstract, abstract)
    # The resumed run saves step 2 again, over the unfinished folder.
    assert ckpt.save(2, trees[2], trees[2], {"step": 2})
    ckpt.wait()
    assert ckpt.latest_step() == 2
  jax.tree.map(np.testing.assert_array_equal, checkpointing.restore_params(run, abstract), trees[2])
  assert os.listdir(tmp_path) == []  # no local "gs:" folder


def _sample_data_dir():
  """The SAMPLE task's TFDS build (tests/conftest.py's cache)."""
  from preflmr_jax import config_files  # pylint: disable=g-import-not-at-top
  from preflmr_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  return pipeline.resolve_data_dir(config_files.load_config("configs/tiny.py", {}))


def test_tfds_data_dir_on_gs_is_read_like_the_local_one(gcs):
  """TFDS metadata through epath, the array_record files through array_record's own GCS reader."""
  local = _sample_data_dir()
  remote = storage.path(f"gs://{gcs.bucket}/tfds", "data_dir")
  storage.upload_dir(local, remote)
  for load in (m2kr.load_queries, m2kr.load_passages):
    want, got = load(local, "SAMPLE", "test"), load(os.fspath(remote), "SAMPLE", "test")
    assert len(got) == len(want) and got.path.startswith("gs://")
    assert got.__getitems__([0, 5, len(got) - 1]) == want.__getitems__([0, 5, len(want) - 1])
  with pytest.raises(m2kr.NotBuiltError, match="OKVQA queries are not built"):
    m2kr.load_queries(os.fspath(remote), "OKVQA", "test")


def test_prepare_writes_its_build_and_report_into_a_bucket(gcs, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  from preflmr_jax.data import prepare, sample  # pylint: disable=g-import-not-at-top
  source = os.path.join(os.path.dirname(_sample_data_dir()), "source")
  data_dir = f"gs://{gcs.bucket}/m2kr"
  out = io.StringIO()
  assert prepare.run(source, os.path.join(source, sample.IMAGES), ["SAMPLE"], data_dir,
                     out=out) == 0, out.getvalue()
  names = gcs.names("m2kr/")
  assert f"m2kr/{m2kr.REPORT_FILE}" in names
  for kind in ("queries", "passages"):
    assert f"m2kr/m2kr_{kind}/SAMPLE/{m2kr.VERSION}/dataset_info.json" in names
  assert json.loads(gcs.read(f"m2kr/{m2kr.REPORT_FILE}"))["usable"]
  assert len(m2kr.load_queries(data_dir, "SAMPLE", "test")) == len(
      m2kr.load_queries(_sample_data_dir(), "SAMPLE", "test"))
  out = io.StringIO()
  images = os.path.join(source, sample.IMAGES)
  assert prepare.run(source, images, ["SAMPLE"], data_dir, out=out) == 0
  assert "reused" in out.getvalue()
  out = io.StringIO()
  assert prepare.run(f"gs://{gcs.bucket}/src", None, ["SAMPLE"], data_dir, out=out) == 2
  assert "--source 'gs://" in out.getvalue() and "must be a local folder" in out.getvalue()
  assert os.listdir(tmp_path) == []


@pytest.mark.slow
def test_published_folder_index_and_scaling_law_in_a_bucket(gcs, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  import preflmr_jax  # pylint: disable=g-import-not-at-top
  from preflmr_jax import config_files, tokenization  # pylint: disable=g-import-not-at-top
  from preflmr_jax import index as plaid  # pylint: disable=g-import-not-at-top
  from preflmr_jax.models import model_config as mc, preflmr  # pylint: disable=g-import-not-at-top
  from preflmr_jax.tools import scaling_law  # pylint: disable=g-import-not-at-top
  bucket = f"gs://{gcs.bucket}"
  # A published folder (weights, config, tokenizers) saved to and loaded from the bucket.
  config = mc.PreFLMRConfig.from_dict(config_files.load_config("configs/tiny.py", {}).model)
  params = preflmr.init_params(config, jax.random.key(0))
  tok = tokenization.tiny_tokenizer()
  preflmr_jax.PretrainedPreFLMR(config, params, query_tokenizer=tok,
                                document_tokenizer=tok).save_pretrained(f"{bucket}/pub")
  assert "pub/config.json" in gcs.names("pub/") and "pub/model.safetensors" in gcs.names("pub/")
  loaded = preflmr_jax.load_pretrained(f"{bucket}/pub")
  jax.tree.map(np.testing.assert_array_equal, loaded.params, jax.device_get(params))
  assert loaded.query_tokenizer.get_vocab() == tok.get_vocab()
  with pytest.raises(user_errors.NotWritable, match="not empty"):
    preflmr_jax.PretrainedPreFLMR(config, params).save_pretrained(f"{bucket}/pub")
  # The PLAID index.
  docs = np.random.default_rng(0).standard_normal((16, 4, 8)).astype(np.float32)
  built = plaid.build([(docs, np.ones((16, 4), bool))], 4, 2)
  plaid.save(built, f"{bucket}/corpus.plaid.npz")
  np.testing.assert_array_equal(plaid.load(f"{bucket}/corpus.plaid.npz").codes, built.codes)
  plaid.save(built, f"{bucket}/sharded.plaid", num_shards=2)  # a folder of shards
  second = plaid.load_shards(f"{bucket}/sharded.plaid", which=[1])[0]
  np.testing.assert_array_equal(second.codes, built.codes[built.doc_offsets[second.first_doc]:])
  # Scaling-law inputs (a sweep of workdirs) and outputs.
  for i, n in enumerate((1e4, 1e5, 1e6)):
    storage.write_text(workdir.results_path(workdir.eval_dir(f"{bucket}/sweep/p{i}")), json.dumps(
        {"SAMPLE": {"Recall@5": 0.01 * n**0.25, "headline": "Recall@5", "params": n}}))
  points = scaling_law.load_results(scaling_law.find_results(f"{bucket}/sweep"))
  assert [p.name for p in points] == ["p0", "p1", "p2"]
  fits = scaling_law.fit_sweep(points, "metric")
  scaling_law.plot(fits, f"{bucket}/sweep/scaling_law.png")
  assert gcs.read("sweep/scaling_law.png").startswith(b"\x89PNG")
  assert os.listdir(tmp_path) == []


@pytest.fixture
def run_in(cli, gcs, tmp_path):
  """The tiny config's `python -m <module>` against the emulator, from an empty folder (which
  must stay empty: nothing meant for gs:// lands on the local disk)."""
  return lambda module, *args: cli(module, f"--config={ROOT}/configs/tiny.py", *args,
                                   env={storage.EMULATOR_VAR: gcs.url}, cwd=tmp_path)


@pytest.mark.slow
def test_train_resume_and_evaluate_in_a_bucket(gcs, run_in, tmp_path):
  """The pod path: workdir, eval output and embedding cache on gs:// (the data stays local here:
  reading TFDS through the emulator is slow, and tested above)."""
  run = f"gs://{gcs.bucket}/run"
  train_args = [f"--workdir={run}", "--config.log_every_steps=2",
                "--config.checkpoint_every_steps=2", "--config.optimizer.warmup_steps=0"]
  train = lambda steps: run_in("preflmr_jax.main", *train_args,
                               f"--config.num_train_steps={steps}")
  first = train(2)
  assert first.returncode == 0, first.stderr[-3000:]
  assert "run/checkpoints/2/commit_success.txt" in gcs.names("run/")
  second = train(4)
  assert second.returncode == 0, second.stderr[-3000:]
  assert f"resumed from {run} at step 2" in second.stderr

  names = gcs.names("run/")
  for step in (2, 4):
    assert f"run/checkpoints/{step}/{checkpointing.COMMIT_FILE}" in names
    assert any(n.startswith(f"run/checkpoints/{step}/params/") for n in names)
  assert [json.loads(line)["step"] for line in gcs.read("run/metrics.jsonl").splitlines()] == [2, 4]
  assert len([n for n in names if "/events.out.tfevents." in n]) == 2  # one per run start
  info = json.loads(gcs.read("run/run.json"))
  assert info["train_flops_per_step"] > 0 and info["devices"] == 1

  out = run_in("preflmr_jax.evaluate", f"--checkpoint={run}", f"--output={run}/eval",
               "--tasks=SAMPLE", "--split=test", "--ks=1,5", "--batch_size=16",
               f"--embedding_cache=gs://{gcs.bucket}/cache")
  assert out.returncode == 0, out.stderr[-3000:]
  results = json.loads(gcs.read("run/eval/results.json"))["SAMPLE"]
  assert results["step"] == 4 and results["num_queries"] > 0 and 0 <= results["Recall@1"] <= 1
  assert results["train_flops"] == pytest.approx(4 * info["train_flops_per_step"])
  rankings = gcs.read("run/eval/SAMPLE_rankings.jsonl").decode().splitlines()
  assert len(rankings) == results["num_queries"]
  assert b"| SAMPLE |" in gcs.read("run/eval/results.md")
  assert len(gcs.names("cache/")) == 1
  for folder in (tmp_path, ROOT):
    assert not (folder / "gs:").exists()
  assert os.listdir(tmp_path) == []


def _last_line(completed) -> str:
  return completed.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_bad_gs_input_is_a_one_line_error_naming_the_path(gcs, run_in, tmp_path):
  absent = f"gs://{gcs.bucket}-absent/run"
  cases = [
      (("preflmr_jax.main", f"--workdir={absent}"),
       f"error: --workdir={absent}: bucket gs://{gcs.bucket}-absent does not exist"),
      (("preflmr_jax.evaluate", f"--checkpoint=gs://{gcs.bucket}/nothing",
        f"--output=gs://{gcs.bucket}/out"),
       f"error: --checkpoint=gs://{gcs.bucket}/nothing: no such folder; train first: python -m "
       f"preflmr_jax.main --config CONFIG --workdir gs://{gcs.bucket}/nothing"),
      (("preflmr_jax.main", "--workdir=gs://"),
       "error: --workdir=gs://: a gs:// URL needs a bucket (gs://BUCKET/...)"),
  ]
  for (module, *args), message in cases:
    completed = run_in(module, *args)
    assert completed.returncode == 2 and _last_line(completed) == message, completed.stderr[-2000:]
  assert gcs.names() == [] and os.listdir(tmp_path) == []  # nothing written, no local "gs:"
