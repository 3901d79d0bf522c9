r"""The eval binary: a checkpoint -> passage corpus encoding -> exact MaxSim search -> M2KR metrics.

  python -m preflmr_jax.evaluate --config configs/tiny.py --checkpoint WORKDIR_OR_STEP_OR_FOLDER \
      --tasks SAMPLE --split test --data_dir DIR --output OUT [--ks 1,5,10] [--batch_size 64]

`--checkpoint` is a run's workdir (its latest complete step; `--step N` for another), one step's
folder, or a published PreFLMR folder (`config.json` + `model.safetensors`: its own config and
tokenizers are used, not `--config`'s model). Only parameters are restored, never the optimiser
state, replicated on every device. The work is `evaluation.evaluate_task` per task (corpus and
queries encoded over every device of every process, search sharded over the devices, the
dataset's own instructions, Recall@K / PseudoRecall@K of `metrics.py`). Outputs in OUT:
`results.json` (`{task: {"Recall@5": ..., "PseudoRecall@5": ..., "headline": ...,
"num_queries": ..., "num_passages": ..., "queries_without_positive_in_corpus": ...
(kept: Recall misses), "checkpoint": ..., "step": ..., "params": ...,
"train_flops": ...}}`; training compute from the run's `run.json`, null for a published folder),
`results.md` (one row per task, the headline metric in bold) and `<task>_rankings.jsonl`
(`{"question_id", "passage_ids", "scores"}` per query, best first, shorter than the largest K
when the compressed index finds fewer candidates; the trainer can mine hard
negatives from it, `config.data.hard_negatives_dir`). Multi-host, every process runs this command;
they share the work and process 0 writes. Every path may be a gs:// URL (storage.py).

Every task's data (built, its shards intact) and the output and cache folders (writable) are
checked before the checkpoint is loaded; results.json and results.md are rewritten after each
task, so a failure in a later task keeps the finished ones.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Optional, Sequence

import jax
import numpy as np
from absl import app, flags, logging
from etils import epath
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from preflmr_jax import (checkpointing, cli, evaluation, pretrained, sharding, storage,
                         tokenization, user_errors)
from preflmr_jax import workdir as layout
from preflmr_jax.data import m2kr, pipeline
from preflmr_jax.models import model_config as mc
from preflmr_jax.models import preflmr
from preflmr_jax.user_errors import BadFile, ConfigError, MissingPath


@dataclasses.dataclass
class Restored:
  model_config: mc.PreFLMRConfig
  params: Any
  query_tokenizer: Any
  document_tokenizer: Any
  checkpoint: str
  step: Optional[int]  # None for a published folder


def check_checkpoint(checkpoint: str, step: Optional[int] = None) -> Optional[epath.Path]:
  """A published folder (returns None), or a workdir / step folder holding a complete checkpoint
  (`step`, default the latest; returns its step folder), or a one-line error naming --checkpoint."""
  folder = storage.path(checkpoint, "--checkpoint")
  try:
    storage.must_exist(folder, "--checkpoint")
  except MissingPath as e:
    raise MissingPath(f"{e}; {checkpointing.train_first(folder)}") from None
  with storage.errors("--checkpoint", folder):
    if pretrained.is_published(folder):
      if step is not None:
        raise ConfigError(f"--step={step}: --checkpoint={folder} is a published folder, one set "
                          "of weights without steps")
      return None
    with user_errors.naming("--checkpoint", folder, MissingPath):
      return checkpointing.find_step_dir(folder, step)


def restore(config, checkpoint: str, step: Optional[int] = None,
            mesh: Optional[Mesh] = None) -> Restored:
  """Parameters (only, replicated on `mesh`, default `evaluation.eval_mesh()`) and tokenizers
  from a workdir / step folder / published folder (checked as `check_checkpoint` does)."""
  replicated = NamedSharding(mesh or evaluation.eval_mesh(), P())
  step_dir = check_checkpoint(checkpoint, step)
  folder = storage.path(checkpoint, "--checkpoint")
  if step_dir is None:
    with storage.errors("--checkpoint", folder):
      with user_errors.naming("--checkpoint", folder, BadFile, MissingPath):
        model = pretrained.load_pretrained(folder)
    query_tok, doc_tok = model.tokenizers(
        lambda: tokenization.tokenizer_from_config(config.tokenizer))
    return Restored(model.config, jax.device_put(model.params, replicated), query_tok, doc_tok,
                    checkpoint, None)
  model_config = mc.PreFLMRConfig.from_dict(config.model)
  model_config.check_devices(replicated.mesh.devices.flat)
  tok = tokenization.tokenizer_from_config(config.tokenizer)
  tokenization.check_tokenizer(tok, model_config)
  # Whatever mesh the checkpoint was saved from.
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                          preflmr.abstract_params(model_config))
  with storage.errors("--checkpoint", folder):
    params = checkpointing.restore_params(step_dir, abstract)
  return Restored(model_config, params, tok, tok, checkpoint, int(step_dir.name))


def define_weights_flags(checkpoint_help: str) -> list[flags.FlagHolder]:
  """--config, --checkpoint and --step, as every program that reads a run's weights (this one, the
  demo, export) takes them. absl counts them as this module's: another program declares them its
  key flags (`flags.declare_key_flag`) for its --help to list them."""
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  return [config_flags.DEFINE_config_file("config", None, "Experiment config file (path[:arg])."),
          flags.DEFINE_string("checkpoint", None, checkpoint_help),
          flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest complete one).")]


def markdown(results: dict[str, dict[str, Any]]) -> str:
  """One row per task; the headline metric in bold; the metrics grouped in the order of the log
  line (Recall, PseudoRecall, ...), each by K."""
  names = list(dict.fromkeys(k for r in results.values() for k in r if "@" in k))
  families = list(dict.fromkeys(n.split("@")[0] for n in names))
  names.sort(key=lambda n: (families.index(n.split("@")[0]), int(n.split("@")[1])))
  lines = ["| task | queries | passages | " + " | ".join(names) + " |",
           "| --- | --- | --- | " + " | ".join("---" for _ in names) + " |"]
  for task, r in results.items():
    cells = [(f"**{r[n]:.4f}**" if n == r["headline"] else f"{r[n]:.4f}") if n in r else ""
             for n in names]
    lines.append(f"| {task} | {r['num_queries']} | {r['num_passages']} | " + " | ".join(cells)
                 + " |")
  return "\n".join(lines) + "\n"


def run(config, checkpoint: str, tasks: Sequence[str], split: str, data_dir: str, output: str,
        ks: Sequence[int] = (1, 5, 10), batch_size: int = 64, step: Optional[int] = None,
        cache_dir: Optional[str] = None, index: Optional[evaluation.IndexOptions] = None
        ) -> dict[str, dict[str, Any]]:
  """Evaluates `tasks` and writes results.json, results.md and <task>_rankings.jsonl to output."""
  output = storage.path(output, "--output")
  if split not in m2kr.SPLITS:
    raise ConfigError(f"--split={split!r}: expected one of {m2kr.SPLITS}")
  if batch_size < 1:
    raise ConfigError(f"--batch_size={batch_size}: must be >= 1")
  try:
    tasks = [m2kr.canonical_task(t, data_dir) for t in tasks or ()]
  except ValueError as e:
    raise ConfigError(f"--tasks={','.join(tasks)}: {e}") from None
  tasks = tasks or [t for t, _ in pipeline.parse_tasks(config.data.tasks, data_dir)]
  if not tasks:
    raise ConfigError("no tasks to evaluate: pass --tasks or set config.data.tasks")
  # What can fail without the model fails before it is loaded: every task's data, and the
  # folders written to (process 0 writes the outputs, every process its embedding cache).
  evaluation.check_tasks(data_dir, tasks, split)
  write = jax.process_index() == 0  # every process gets the same results
  if write:
    storage.check_writable(output, "--output")
  if cache_dir:
    storage.check_writable(storage.path(cache_dir, "--embedding_cache"), "--embedding_cache")
  mesh = evaluation.eval_mesh()
  restored = restore(config, checkpoint, step, mesh)
  logging.info("evaluating %s%s", restored.checkpoint,
               "" if restored.step is None else f", step {restored.step}")
  encoder = evaluation.Encoder(restored.model_config, restored.params, restored.query_tokenizer,
                               restored.document_tokenizer, mesh, batch_size)
  size = {"params": sum(int(np.prod(x.shape)) for x in jax.tree.leaves(restored.params)),
          "train_flops": _train_flops(checkpoint, restored.step)}
  results = {}
  for task in tasks:
    result, rankings = evaluation.evaluate_task(encoder, data_dir, task, split, ks,
                                                cache_dir=cache_dir, index=index)
    result.update(checkpoint=restored.checkpoint, step=restored.step, split=split, **size)
    results[task] = result
    logging.info("%s/%s: %s", task, split,
                 " ".join(f"{k}={v:.4f}" for k, v in result.items() if "@" in k))
    if write:  # after each task: a later task's failure keeps the finished ones
      storage.write_text(layout.rankings_path(output, task),
                         "".join(json.dumps(r) + "\n" for r in rankings))
      storage.write_text(layout.results_path(output), json.dumps(results, indent=2) + "\n")
      storage.write_text(layout.results_table_path(output), markdown(results))
  return results


def _train_flops(checkpoint: str, step: Optional[int]) -> Optional[float]:
  """Training compute up to `step`: the trainer's FLOPs per step (`run.json` in the workdir, found
  from the workdir or a step folder) times the step; None for a published folder or a workdir
  without run.json."""
  if step is None:
    return None
  folder = storage.path(checkpoint, "--checkpoint")
  # The workdir itself, or a step folder's (<workdir>/checkpoints/<step>).
  in_workdir = folder.parent.name == layout.CHECKPOINTS
  for candidate in (folder, folder.parent.parent) if in_workdir else (folder,):
    info = layout.read_run_info(candidate)
    if info is not None:
      return float(info["train_flops_per_step"]) * step
  return None


def main(argv):
  del argv  # cli.run refuses extra arguments
  f = flags.FLAGS
  config = f.config
  if config.get("distributed"):
    sharding.initialize_distributed()
  try:
    ks = [int(k) for k in f.ks.split(",")]
  except ValueError:
    ks = []
  if not ks or min(ks) < 1:
    raise app.UsageError(f"--ks={f.ks!r}: expected comma-separated integers >= 1")
  check_checkpoint(f.checkpoint, f.step)  # before the data (the sample may be built first)
  data_dir = f.data_dir or pipeline.resolve_data_dir(config)
  cache_dir = {"": os.path.join(pipeline.cache_root(), "embeddings"), "off": None}.get(f.embedding_cache, f.embedding_cache)
  index = evaluation.IndexOptions.parse(f.index)
  if index:
    index.check(max(ks))  # before the checkpoint and the corpus are read
  results = run(config, f.checkpoint, [t for t in f.tasks.split(",") if t], f.split, data_dir, f.output, ks,
                f.batch_size, f.step, cache_dir, index)
  if jax.process_index() == 0:
    print(markdown(results), end="")


def define_flags():
  """Defined only when run as a program (tools are imported together in tests)."""
  define_weights_flags("A run's workdir, one step's folder or a published PreFLMR folder.")
  flags.DEFINE_string("tasks", "", "Comma-separated M2KR tasks (default: config.data.tasks).")
  flags.DEFINE_string("split", "test", "train, valid or test.")
  flags.DEFINE_string("data_dir", "", "TFDS data_dir (default: config.data.data_dir / the sample).")
  flags.DEFINE_string("output", None, "Output folder.")
  flags.DEFINE_string("ks", "1,5,10", "Recall@K cut-offs.")
  flags.DEFINE_integer("batch_size", 64, "Encoding batch size (all devices together).")
  flags.DEFINE_string("index", "", "Search a PLAID index instead of exhaustively (and report "
                      "its recall vs exact search): 'plaid' for the defaults, or KEY=VALUE pairs "
                      "such as nbits=2,nprobe=4,threshold=0.4 (docs/evaluation.md).")
  flags.DEFINE_string("embedding_cache", "", "Corpus embedding cache folder ('' = "
                      "$XDG_CACHE_HOME/preflmr_jax/embeddings, 'off' = none).")


if __name__ == "__main__":
  define_flags()
  flags.mark_flags_as_required(["config", "checkpoint", "output"])
  cli.run(main, outputs=["output"])
