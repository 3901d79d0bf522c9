r"""Export a trained run as a published PreFLMR folder: the HF layout that `load_pretrained`, the eval
binary and the official PyTorch code read.

  python -m preflmr_jax.export --config configs/tiny.py --checkpoint WORKDIR [--step N] \
      --output FOLDER [--overwrite]

`--checkpoint` is what the eval binary takes: a run's workdir (its latest complete step; `--step N`
for another) or one step's folder (a published folder is re-written). Only the parameters are
read. FOLDER gets `config.json` (the model config under the official keys, plus the mask token ids
of the run's vocab), `model.safetensors` (float32, per layer whatever the run's layout) and
`query_tokenizer/` + `context_tokenizer/` (the run's `config.tokenizer`, which encodes both sides),
so the folder loads with its tokenizers and needs no `--config`. It appears whole or not at all
(`PretrainedPreFLMR.save_pretrained`); an existing folder is replaced only with `--overwrite`, and
only if it holds a published folder. FOLDER may be a gs:// URL. Multi-host, process 0 writes.
"""

from __future__ import annotations

from typing import Optional

import jax
from absl import flags, logging

from preflmr_jax import cli, evaluate, pretrained, storage


def export(config, checkpoint: str, output: str, step: Optional[int] = None,
           overwrite: bool = False) -> evaluate.Restored:
  """Writes the parameters of `checkpoint` (and the run's tokenizers) to `output` as a published
  folder; returns what was restored."""
  dest = storage.path(output, "--output")
  with storage.errors("--output", dest):  # before the checkpoint is read
    pretrained.check_destination(dest, overwrite, "--output")
  restored = evaluate.restore(config, checkpoint, step)
  if jax.process_index() == 0:
    model = pretrained.PretrainedPreFLMR(restored.model_config, jax.device_get(restored.params),
                                         query_tokenizer=restored.query_tokenizer,
                                         document_tokenizer=restored.document_tokenizer)
    with storage.errors("--output", dest):
      model.save_pretrained(dest, overwrite=overwrite)
  return restored


def _main(argv):
  del argv  # cli.run refuses extra arguments
  f = flags.FLAGS
  restored = export(f.config, f.checkpoint, f.output, f.step, f.overwrite)
  step = "" if restored.step is None else f", step {restored.step}"
  logging.info("exported %s%s to %s", restored.checkpoint, step, f.output)


__all__ = ["export"]

if __name__ == "__main__":
  for holder in evaluate.define_weights_flags("A run's workdir or one step's folder (a published "
                                              "folder is re-written)."):
    flags.declare_key_flag(holder)
  flags.DEFINE_string("output", None, "The published folder to write.")
  flags.DEFINE_bool("overwrite", False, "Replace an existing published folder at --output.")
  flags.mark_flags_as_required(["config", "checkpoint", "output"])
  cli.run(_main, outputs=["output"])
