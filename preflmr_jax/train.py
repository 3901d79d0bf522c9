"""The PreFLMR trainer: one jitted, sharded train step and a linear loop (big_vision style).

  python -m preflmr_jax.main --config configs/tiny.py --workdir /tmp/preflmr_tiny

`train_and_evaluate(config, workdir)` resumes from `workdir/checkpoints` when it holds a checkpoint.
Outputs: TensorBoard events and `metrics.jsonl` (one JSON object per logged step) in `workdir`, a
local folder or a gs:// URL (layout: workdir.py).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import secrets
import time
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from preflmr_jax import (checkpointing, cli, data, losses, maxsim_kernel, optimizer, preemption,
                         pretrained, sharding, storage, tensorboard_events, tokenization)
from preflmr_jax import workdir as layout
from preflmr_jax.data import m2kr
from preflmr_jax.models import flops as model_flops
from preflmr_jax.models import layer_stacks
from preflmr_jax.models import model_config as mc
from preflmr_jax.models import preflmr
from preflmr_jax.user_errors import (BadFile, ConfigError, MissingPath, is_int, naming, require,
                                     require_int)


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array  # raw uint32 key data, so that it checkpoints as a plain array
  # Non-finite steps are never applied; the host stops (or logs) at the next log / checkpoint step.
  nonfinite_steps: jax.Array
  first_nonfinite_step: jax.Array


# jax.random implementations for the dropout stream (parameters always initialise with the
# default threefry): "rbg" / "unsafe_rbg" use the backend's bit generator, far cheaper on GPU/TPU.
DROPOUT_PRNG_IMPLS = ("threefry2x32", "rbg", "unsafe_rbg")
# Whose documents a query is scored against: the global batch's, or only those on its own device
# (the official training: DDP without gathering).
IN_BATCH_NEGATIVES = ("global", "per_device")
# The loss's MaxSim (config.maxsim_impl): the jitted einsum, or the fused Pallas kernel.
MAXSIM_IMPLS = ("xla", "pallas")


def validate(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> None:
  """Config checks that must fail before anything is compiled, naming the key: the trainer's and
  the planner's (tools/plan.py) one check of a config on `mesh`."""
  for key, low in (("num_train_steps", 1), ("log_every_steps", 1), ("checkpoint_every_steps", 1),
                   ("keep_checkpoints", 1), ("batch_size", 1), ("num_negatives", 0),
                   ("eval_every_steps", 0), ("eval_max_queries", 1), ("score_chunk_size", 0),
                   ("max_nonfinite_steps", 0)):
    require_int(key, config[key], low,
                " (0: off)" if key in ("eval_every_steps", "score_chunk_size") else "")
  # jax.random.key takes a uint32 seed on every backend.
  require(is_int(config.seed) and 0 <= config.seed < 2**32, "seed", config.seed,
          "must be an integer in [0, 2**32)")
  rules = config.logical_axis_rules
  sharding.check_batch_sharding(mesh, rules)  # each process can feed its own rows
  shards = sharding.num_batch_shards(mesh, rules)
  require(config.batch_size % shards == 0, "batch_size", config.batch_size,
          f"must be divisible by the {shards} batch shards (mesh axes "
          f"{sharding.batch_axes(rules)}: config.logical_axis_rules' act_batch)")
  data.local_batch_size(config, jax.process_count())
  require(config.dropout_prng_impl in DROPOUT_PRNG_IMPLS, "dropout_prng_impl",
          config.dropout_prng_impl, f"must be one of {DROPOUT_PRNG_IMPLS}")
  require(config.nan_policy in ("stop", "skip"), "nan_policy", config.nan_policy,
          "must be 'stop' or 'skip'")
  require(config.in_batch_negatives in IN_BATCH_NEGATIVES, "in_batch_negatives",
          config.in_batch_negatives, f"must be one of {IN_BATCH_NEGATIVES}")
  require(config.maxsim_impl in MAXSIM_IMPLS, "maxsim_impl", config.maxsim_impl,
          f"must be one of {MAXSIM_IMPLS}")
  require(config.maxsim_impl == "xla" or not config.score_chunk_size, "score_chunk_size",
          config.score_chunk_size, "chunks the xla MaxSim only; the pallas kernel keeps no token "
          "scores: set it to 0")
  require(all(is_int(k) and k >= 1 for k in config.eval_ks), "eval_ks", config.eval_ks,
          "must be positive integers")
  require(config.eval_split in m2kr.SPLITS, "eval_split", config.eval_split,
          f"must be one of {m2kr.SPLITS}")
  if config.eval_every_steps and config.data.source != "m2kr":
    raise ConfigError("config.eval_every_steps needs config.data.source='m2kr' (it evaluates the "
                      f"tasks' {config.eval_split} split), got {config.data.source!r}")
  optimizer.validate(config.optimizer, config.num_train_steps)
  model_config = mc.PreFLMRConfig.from_dict(config.model)
  model_config.check_devices(mesh.devices.flat)
  # One process's share of a global batch is built in host memory: a batch that cannot fit would
  # fail inside numpy or grain, far from the key that set it.
  batch_bytes = sum(math.prod(v.shape) * np.dtype(v.dtype).itemsize
                    for v in data.batch_spec(config, model_config).values())
  host_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  require(batch_bytes / jax.process_count() < host_bytes / 2, "batch_size", config.batch_size,
          f"one process's share of a batch takes {batch_bytes / jax.process_count() / 2**30:.1f} "
          f"GiB of host memory; this host has {host_bytes / 2**30:.0f} GiB")
  # Each device scores its queries against every document of the global batch; unchunked, XLA
  # keeps all their token scores (e.g. 103 GiB per v5e chip for ViT-L at 4096 queries).
  docs = config.batch_size * (1 + config.num_negatives)
  per_chunk = config.score_chunk_size or docs
  score_bytes = (config.batch_size // shards) * min(per_chunk, docs) * 4 * (
      model_config.query_length * model_config.doc_maxlen)
  if score_bytes > 2**31:
    logging.warning("the loss's token scores take %.1f GiB per device; set config.score_chunk_size "
                    "(documents scored at once) to bound them", score_bytes / 2**30)


def make_train_step(model: preflmr.PreFLMR, tx: optax.GradientTransformation, labels,
                    config: ml_collections.ConfigDict, negative_groups: int = 1):
  """(state, batch) -> (state, metrics). Pure; the caller jits it with shardings and donation.

  `negative_groups` (losses.contrastive_loss's `groups`): 1 scores every query against the whole
  global batch; the number of batch shards gives per-device in-batch negatives (the Pallas path
  then takes its groups from the mesh: one per batch shard).

  `labels` (optimizer.param_labels) marks frozen parameters: no gradient flows into them, which
  saves their backward pass and keeps them out of the logged gradient norm.
  """
  mask = config.mask_duplicate_positives
  batch_axes = sharding.batch_axes(config.logical_axis_rules)
  if config.maxsim_impl != "pallas":
    loss = functools.partial(losses.contrastive_loss, chunk_size=config.score_chunk_size,
                             groups=negative_groups)
  elif negative_groups == 1:  # each device scores its own queries against every document
    loss = functools.partial(losses.contrastive_loss, maxsim=functools.partial(
        maxsim_kernel.maxsim_sharded, batch_axes=batch_axes))
  else:  # each device scores its own queries against its own documents
    loss = functools.partial(losses.contrastive_loss_per_shard, batch_axes=batch_axes,
                             maxsim=maxsim_kernel.maxsim_pallas)

  def loss_fn(params, batch, rng):
    params = jax.tree.map(lambda p, label: jax.lax.stop_gradient(p) if label == "frozen" else p,
                          params, labels)
    (q, _), (d, d_mask) = model.apply(
        {"params": params}, batch["query_input_ids"], batch["query_attention_mask"],
        batch["pixel_values"], batch["doc_input_ids"], batch["doc_attention_mask"],
        deterministic=False, rngs={"dropout": rng})
    return loss(q, d, d_mask, config.num_negatives,
                doc_labels=batch["doc_labels"] if mask else None,
                positive_labels=batch["positive_labels"] if mask else None)

  def train_step(state: TrainState, batch):
    rng = jax.random.fold_in(
        jax.random.wrap_key_data(state.rng, impl=config.dropout_prng_impl), state.step)
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, rng)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # A step whose loss, gradient or update is not finite (an overflowing learning rate or decay
    # turns a finite gradient into an infinite update) leaves params and optimiser state untouched.
    # A finite update norm bounds every entry by sqrt(float max), so params of any sane size stay
    # finite; checking the new params themselves instead compiles far slower.
    finite = (jnp.isfinite(loss) & jnp.isfinite(grad_norm)
              & jnp.isfinite(optax.tree.norm(updates)))
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    state = state.replace(
        step=state.step + 1, params=keep(params, state.params),
        opt_state=keep(opt_state, state.opt_state),
        nonfinite_steps=state.nonfinite_steps + (~finite).astype(jnp.int32),
        first_nonfinite_step=jnp.where((state.first_nonfinite_step < 0) & ~finite, state.step,
                                       state.first_nonfinite_step))
    return state, {**metrics, "grad_norm": grad_norm}

  return train_step


def _abstract_with(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree,
                      shardings)


@dataclasses.dataclass(frozen=True)
class StepSetup:
  """Everything the loop (and the compile-only planner) needs, built from shapes alone."""
  model_config: mc.PreFLMRConfig
  model: preflmr.PreFLMR
  rules: tuple
  tx: optax.GradientTransformation
  labels: Any  # optimizer.param_labels
  state_shardings: TrainState
  abstract_state: TrainState  # ShapeDtypeStructs carrying `state_shardings`
  abstract_batch: dict  # ShapeDtypeStructs of one global batch, sharded as the loop feeds it
  # (seed, params or None) -> state, the params random if None; jit it with `state_shardings`
  init_state: Callable[..., TrainState]
  train_step: Callable  # jitted, donated state; call under `jax.set_mesh` + the logical rules
  negative_groups: int  # shares of the batch whose documents are each query's negatives


def setup_train_step(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> StepSetup:
  """Model, optimiser, state shardings and the jitted train step for `config` on `mesh`.

  Nothing is allocated: parameters and optimiser state are described by `jax.eval_shape`, and their
  shardings follow the config's logical-axis rules (optimiser state mirrors its parameter's).
  """
  model_config = mc.PreFLMRConfig.from_dict(config.model)
  model = preflmr.PreFLMR(model_config)
  rules = sharding.axis_rules(config.logical_axis_rules)
  boxed = preflmr.logical_params(model_config)
  sharding.check_rules(rules, sharding.logical_axis_names(boxed))
  sharding.check_divisible(boxed, mesh, rules)
  param_shardings = nn.meta.unbox(sharding.logical_to_shardings(boxed, mesh, rules))
  abstract_params = nn.meta.unbox(boxed)
  tx, labels = optimizer.make_optimizer(config, abstract_params)
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  state_shardings = TrainState(
      step=replicated, params=param_shardings,
      opt_state=sharding.state_shardings_like_params(abstract_opt, abstract_params,
                                                     param_shardings, mesh),
      rng=replicated, nonfinite_steps=replicated, first_nonfinite_step=replicated)

  def init_state(seed, params=None):
    params_rng, dropout_rng = jax.random.split(jax.random.key(seed))
    if config.dropout_prng_impl != "threefry2x32":
      dropout_rng = jax.random.key(jax.random.bits(dropout_rng, dtype=jnp.uint32),
                                   impl=config.dropout_prng_impl)
    if params is None:
      params = preflmr.random_params(model_config, params_rng)
    return TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params),
                      rng=jax.random.key_data(dropout_rng), nonfinite_steps=jnp.int32(0),
                      first_nonfinite_step=jnp.int32(-1))

  abstract_state = _abstract_with(
      jax.eval_shape(functools.partial(init_state, 0), abstract_params),
      state_shardings)
  abstract_batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype,
                                            sharding=sharding.batch_sharding(mesh, v.ndim, rules))
                    for k, v in data.batch_spec(config, model_config).items()}
  groups = (sharding.num_batch_shards(mesh, rules) if config.in_batch_negatives == "per_device"
            else 1)
  train_step = jax.jit(make_train_step(model, tx, labels, config, groups), donate_argnums=0,
                       out_shardings=(state_shardings, replicated))
  return StepSetup(model_config=model_config, model=model, rules=rules, tx=tx, labels=labels,
                   state_shardings=state_shardings, abstract_state=abstract_state,
                   abstract_batch=abstract_batch, init_state=init_state, train_step=train_step,
                   negative_groups=groups)


def run_info(config: ml_collections.ConfigDict, setup: StepSetup) -> dict[str, Any]:
  """Size and compute of a run (`workdir/run.json`; the eval binary and the scaling-law tool read
  it). FLOPs are the analytic model's (`models/flops.py`: every matmul at padded lengths, backward
  2x where a group trains), all devices together: the model's arithmetic, not what a mesh or
  rematerialisation adds, the same for scanned and looped layers."""
  docs = config.batch_size * (1 + config.num_negatives)
  flops = float(model_flops.train_flops(setup.model_config, config.batch_size, docs,
                                        model_flops.trainable_groups(setup.labels),
                                        setup.negative_groups))
  counts = optimizer.count_trainable(setup.abstract_state.params, setup.labels)
  return {"params_total": int(counts["total"]), "params_trainable": int(counts["trainable"]),
          "train_flops_per_step": flops, "train_flops_per_example": flops / config.batch_size,
          "global_batch": int(config.batch_size), "devices": jax.device_count()}


def make_evaluator(config, setup: StepSetup, mesh, params, tokenizer):
  """params -> {"eval/<task>/Recall@K": ...}: retrieval evaluation (`evaluation.py`) of the first
  `config.eval_max_queries` queries of each training task's `config.eval_split`, on the training
  mesh with the parameters as they are sharded there. Every process calls it."""
  from preflmr_jax import evaluation  # pylint: disable=g-import-not-at-top
  from preflmr_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  data_dir = pipeline.resolve_data_dir(config)
  tasks = [task for task, _ in pipeline.parse_tasks(config.data.tasks, data_dir)]
  encoder = evaluation.Encoder(setup.model_config, params, tokenizer, tokenizer, mesh,
                               batch_size=max(config.batch_size, jax.device_count()),
                               rules=setup.rules)

  def run(params) -> dict[str, float]:
    encoder.set_params(params)
    evaluated = evaluation.evaluate_tasks(encoder, data_dir, tasks, config.eval_split,
                                          tuple(config.eval_ks), max_queries=config.eval_max_queries)
    return {f"eval/{task}/{k}": float(v) for task, (result, _) in evaluated.items()
            for k, v in result.items() if "@" in k}

  return run


class MetricsLog:
  """The logged steps: metrics.jsonl (one object per logged step; layout.MetricsFile) and
  TensorBoard scalars on process 0, both through `storage` (local or gs://); one log line per
  logged step, with the speed and the time left, on every process."""

  def __init__(self, workdir, resume_step: int, num_train_steps: int):
    self._main = jax.process_index() == 0
    self._num_train_steps = num_train_steps
    self._events = (tensorboard_events.EventWriter(layout.tensorboard_dir(workdir))
                    if self._main else None)
    self._file = layout.MetricsFile(workdir, resume_step) if self._main else None

  def write(self, step: int, scalars: dict[str, float]) -> None:
    shown = " ".join(f"{k}={v:.4g}" for k, v in scalars.items()
                     if k not in ("steps_per_sec", "examples_per_sec")
                     and not k.endswith("learning_rate"))
    speed = scalars.get("steps_per_sec", 0.0)
    left = (self._num_train_steps - step) / speed if speed else float("nan")
    logging.info("step %d/%d: %s (%.3g steps/s, %s left)", step, self._num_train_steps, shown,
                 speed, cli.duration(left))
    if self._main:
      self._events.write_scalars(step, scalars)
      self._file.write(step, scalars)

  def flush(self) -> None:
    """On object storage the logs are rewritten whole, every few seconds: also with checkpoints."""
    for out in (self._events, self._file):
      if out:
        out.flush()

  def close(self) -> None:
    for out in (self._events, self._file):
      if out:
        out.close()


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Trains `config` in `workdir` (resuming if it holds a checkpoint); returns the last metrics.

  Raises `preemption.Preempted` after a preemption notice (SIGTERM; Ctrl-C too with one process):
  at the next step boundary once that step is saved, or at once, with nothing new to save, before
  the first step.
  """
  # A notice during set-up (data, compilation, restore) stops the run before it takes a step.
  with preemption.PreemptionWatcher() as watcher:
    return _train(config, storage.path(workdir, "--workdir"), watcher)


def _train(config, workdir, watcher) -> dict[str, float]:
  # ---------------------------------------------------------------------------------- setup
  mesh = sharding.make_mesh(config.mesh)
  validate(config, mesh)
  _check_init_sources(config)
  setup = setup_train_step(config, mesh)
  tokenizer = tokenization.tokenizer_from_config(config.tokenizer)
  tokenization.check_tokenizer(tokenizer, setup.model_config)
  storage.check_writable(workdir, "--workdir")

  # ---------------------------------------------------------------- data and checkpoints
  train_iter = data.make_train_iterator(config, setup.model_config, tokenizer,
                                        process_index=jax.process_index(),
                                        process_count=jax.process_count())
  ckpt = checkpointing.Checkpointer(layout.checkpoints_dir(workdir),
                                    max_to_keep=config.keep_checkpoints,
                                    save_interval_steps=config.checkpoint_every_steps)
  try:
    with jax.set_mesh(mesh), nn.logical_axis_rules(setup.rules):
      _write_run_info(config, setup, workdir)
      watcher.stop_before_start()
      state, start = _start_state(config, setup, ckpt, train_iter, workdir)
      if start >= config.num_train_steps:
        logging.info("nothing to train: at step %d, config.num_train_steps=%d (raise it to "
                     "train further)", start, config.num_train_steps)
        return {}
      evaluator = (make_evaluator(config, setup, mesh, state.params, tokenizer)
                   if config.eval_every_steps else None)
      log = MetricsLog(workdir, start, config.num_train_steps)
      tick = time.perf_counter()
      train_step = setup.train_step.lower(setup.abstract_state, setup.abstract_batch).compile()
      logging.info("train step lowered and compiled in %.1f s", time.perf_counter() - tick)
      try:
        watcher.stop_before_start(start)
        return _loop(config, mesh, state, start, train_step, train_iter, ckpt, watcher,
                     log, evaluator)
      finally:
        log.close()
  finally:  # also on errors: close commits the saves in flight (all of them precede the error)
    try:
      ckpt.close()
    finally:
      if hasattr(train_iter, "close"):  # grain worker processes
        train_iter.close()


def _write_run_info(config, setup: StepSetup, workdir) -> None:
  """Logs the run's size and writes run.json (process 0), with the config of this start (its
  overrides, init_from, ...): what the run was. Then every process checks that it sees it."""
  info = run_info(config, setup)
  logging.info("%s parameters (%s trainable), global batch %d on %d device(s), %.3g GFLOPs "
               "a step", f"{info['params_total']:,}", f"{info['params_trainable']:,}",
               info["global_batch"], info["devices"], info["train_flops_per_step"] / 1e9)
  start_id, failure = secrets.randbits(31), None
  if jax.process_index() == 0:
    try:
      with storage.errors("--workdir", workdir):
        recorded = {**info, "config": json.loads(config.to_json_best_effort()),
                    "start_id": start_id}
        storage.write_text(layout.run_info_path(workdir), json.dumps(recorded, indent=2))
    except Exception as e:  # pylint: disable=broad-except  (raised once the others know)
      start_id, failure = -1, e
  if jax.process_count() > 1:  # also waits for process 0's write
    start_id = int(multihost_utils.broadcast_one_to_all(np.int32(start_id)))
  if failure is not None:
    raise failure
  if start_id < 0:
    raise ConfigError(f"--workdir={workdir}: process 0 could not write {layout.RUN_INFO} there "
                      "(its log says why)")
  _check_workdir_shared(workdir, start_id)


# How long a process waits for run.json to show this start's id: a mounted workdir may serve the
# previous start's file from its attribute caches for a while (gcsfuse: 60 s by default).
SHARED_WORKDIR_WAIT_S = 65


def _check_workdir_shared(workdir, start_id: int) -> None:
  """Raises ConfigError on every process unless all of them read back the run.json that process
  0 wrote for this start (`start_id`). Hosts that each have their own folder at --workdir (a local
  path on a pod) would otherwise fail at the first checkpoint save, hours in, or resume from
  steps that only one host holds."""
  if jax.process_count() == 1:
    return
  deadline = time.monotonic() + SHARED_WORKDIR_WAIT_S
  while (seen := _start_id(workdir))[0] != start_id and time.monotonic() < deadline:
    time.sleep(2)
  if seen[0] != start_id:
    logging.warning("%s: start_id %d after %d s, not this start's %d%s",
                    layout.run_info_path(workdir), seen[0], SHARED_WORKDIR_WAIT_S, start_id,
                    f" ({seen[1]})" if seen[1] else "")
  sees = multihost_utils.process_allgather(np.int32(seen[0] == start_id))
  blind = [str(i) for i, ok in enumerate(sees) if not ok]
  if blind:
    raise ConfigError(
        f"--workdir={workdir}: process(es) {', '.join(blind)} of {len(sees)} do not see the "
        f"{layout.RUN_INFO} that process 0 wrote there for this start; every host of a "
        "multi-host run needs the same workdir: a gs:// path or a folder on a filesystem that all "
        "hosts mount (docs/storage.md)")


def _start_id(workdir) -> tuple[int, str]:
  """(run.json's start_id as this process reads it, -1 without one; why it could not be read).
  Never raises: every process must reach the collective that follows."""
  try:
    return int((layout.read_run_info(workdir) or {}).get("start_id", -1)), ""
  except Exception as e:  # pylint: disable=broad-except
    return -1, f"{type(e).__name__}: {e}"


def _start_state(config, setup: StepSetup, ckpt, train_iter, workdir) -> tuple[TrainState, int]:
  """(state, its step): the latest checkpoint's (the data iterator set to where it was), else a
  new state, created sharded (nothing is materialised on one host) from the loaded parameters
  or random ones."""
  with storage.errors("--workdir", workdir):
    resume = ckpt.latest_step() is not None
  if not resume:
    tick = time.perf_counter()
    # Loaded params pass through: no random draw to compile and throw away.
    loaded = _initial_params(config, setup.abstract_state.params)
    state = jax.block_until_ready(jax.jit(
        setup.init_state, static_argnums=0, donate_argnums=1,
        out_shardings=setup.state_shardings)(config.seed, loaded))
    logging.info("train state initialised in %.1f s", time.perf_counter() - tick)
    return state, 0
  with storage.errors("--workdir", workdir):
    start, params, opt_state, meta = ckpt.restore_latest(setup.abstract_state.params,
                                                         setup.abstract_state.opt_state)
  if np.shape(meta["rng"]) != setup.abstract_state.rng.shape:
    raise ConfigError(f"{workdir}: checkpoint {start}'s dropout key has shape "
                      f"{np.shape(meta['rng'])}, config.dropout_prng_impl="
                      f"{config.dropout_prng_impl!r} needs {setup.abstract_state.rng.shape}: "
                      "resume with the impl the run started with")
  put = lambda x: jax.device_put(x, setup.state_shardings.step)  # replicated
  state = TrainState(
      step=put(jnp.int32(start)), params=params, opt_state=opt_state,
      rng=put(np.asarray(meta["rng"], np.uint32)),
      nonfinite_steps=put(jnp.int32(meta.get("nonfinite_steps", 0))),
      first_nonfinite_step=put(jnp.int32(meta.get("first_nonfinite_step", -1))))
  train_iter.set_state(meta["data"])
  logging.info("resumed from %s at step %d", workdir, start)
  return state, start


def _loop(config, mesh, state, start, train_step, train_iter, ckpt, watcher, log,
          evaluator=None):
  """Steps start+1 .. num_train_steps; returns the last logged metrics."""
  pending, last = [], {}
  tick = time.perf_counter()
  for step in range(start + 1, config.num_train_steps + 1):
    # The batch has no name here: a traceback through this frame (a stop, an error) would keep it,
    # and the shared memory of grain's workers under it, until the interpreter exits.
    state, metrics = train_step(
        state, sharding.global_batch(mesh, next(train_iter), config.logical_axis_rules))
    pending.append(metrics)
    stop = watcher.should_stop(step)
    is_last = step == config.num_train_steps
    evaluate_now = evaluator and (step % config.eval_every_steps == 0 or is_last) and not stop
    if step % config.log_every_steps == 0 or is_last or stop or evaluate_now:
      _check_finite(state, config)
      host = jax.device_get(pending)
      last = {k: float(np.mean([m[k] for m in host])) for k in host[0]}
      elapsed = time.perf_counter() - tick
      lrs = optimizer.learning_rates(config, step - 1)
      last.update(learning_rate=float(lrs["rest"]), mapping_learning_rate=float(lrs["mapping"]),
                  steps_per_sec=len(host) / elapsed,
                  examples_per_sec=len(host) * config.batch_size / elapsed)
      if evaluate_now:
        last.update(evaluator(state.params))
      log.write(step, last)
      pending, tick = [], time.perf_counter()
    if step % config.checkpoint_every_steps == 0 or is_last or stop:
      saving = time.perf_counter()
      _check_finite(state, config)
      ckpt.save(step, state.params, state.opt_state,
                {"step": step, "rng": np.asarray(state.rng).tolist(),
                 "data": train_iter.get_state(),
                 "nonfinite_steps": int(state.nonfinite_steps),
                 "first_nonfinite_step": int(state.first_nonfinite_step)}, force=is_last or stop)
      log.flush()  # the log never lags behind a checkpoint (object storage: see MetricsLog)
      logging.info("checkpoint of step %d saving in the background", step)
      tick += time.perf_counter() - saving  # steps/s is the steps' speed, without the save's wait
    if stop:
      raise watcher.stopped(step)
  return last


def _check_finite(state: TrainState, config) -> None:
  bad = int(state.nonfinite_steps)
  first = int(state.first_nonfinite_step) + 1
  if bad and config.nan_policy == "stop":
    raise FloatingPointError(
        f"non-finite loss, gradient or update at step {first} (and {bad - 1} later steps); it was "
        "not applied and no checkpoint was written after it. Lower the learning rate, check the "
        "data, or set config.nan_policy='skip'.")
  if bad > config.max_nonfinite_steps:
    raise FloatingPointError(
        f"{bad} non-finite steps skipped (first: step {first}), more than "
        f"config.max_nonfinite_steps={config.max_nonfinite_steps}; no checkpoint holds them.")
  if bad:
    logging.warning("%d non-finite steps skipped so far (first: step %d)", bad, first)


def _init_source(config) -> tuple[str, epath.Path] | None:
  """(config key, folder) of the run's starting point, if it has one."""
  if config.init_from and config.init_params_from:
    raise ConfigError("set at most one of config.init_from and config.init_params_from")
  for name in ("init_from", "init_params_from"):
    if config[name]:
      return f"config.{name}", storage.path(config[name], f"config.{name}")
  return None


def _check_init_sources(config) -> None:
  """The folder to start from exists and is of its key's kind, checked before anything compiles:
  a published folder for init_from, a run's workdir or step folder for init_params_from."""
  source = _init_source(config)
  if source is None:
    return
  key, folder = source
  storage.must_exist(folder, key)
  with storage.errors(key, folder):
    published = pretrained.is_published(folder)
    if key == "config.init_from":
      if not published:
        raise MissingPath(f"{key}={folder}: not a published PreFLMR folder (no "
                          f"{pretrained.CONFIG_FILE}); a run's workdir or step folder goes in "
                          "config.init_params_from")
      with naming(key, folder, BadFile, MissingPath):
        pretrained.weights_file(folder)
    else:
      if published:
        raise ConfigError(f"{key}={folder}: a published PreFLMR folder; it goes in "
                          "config.init_from")
      with naming(key, folder, MissingPath):
        checkpointing.find_step_dir(folder, None)


def _initial_params(config, abstract_params):
  """Params from `config.init_from` (a published PreFLMR folder) or `config.init_params_from`
  (another run), placed with `abstract_params`' shardings; None when neither is set."""
  source = _init_source(config)
  if source is None:
    return None
  key, folder = source
  with storage.errors(key, folder):
    if key == "config.init_from":
      loaded = pretrained.load_pretrained(folder).params  # per layer, as published
      loaded = layer_stacks.to_layout(loaded, layer_stacks.is_stacked(abstract_params))
    else:
      loaded = checkpointing.restore_params(folder, abstract_params)
  difference = checkpointing.first_difference(abstract_params, loaded, "the folder", dtypes=True)
  if difference:
    raise ConfigError(f"{key}={folder} does not match config.model: {difference}")
  logging.info("parameters from %s=%s", key, folder)
  return jax.tree.map(lambda x, a: jax.device_put(x, a.sharding), loaded, abstract_params)


__all__ = ["StepSetup", "TrainState", "make_train_step", "run_info", "setup_train_step",
           "train_and_evaluate", "validate"]
