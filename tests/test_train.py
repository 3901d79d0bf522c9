"""The trainer: sharded step equals single-device, resume is exact, freezing holds, the tiny config
learns the sample task, bad configs fail before compiling, non-finite steps never reach a
checkpoint, SIGTERM saves and stops."""

import json
import logging
import os
import pathlib
import signal

import flax.linen as nn
import jax
import numpy as np
import pytest

import preflmr_jax
from preflmr_jax import checkpointing, data, preemption, sharding, tokenization, train
from preflmr_jax import workdir as layout
from preflmr_jax.models import layer_stacks
from preflmr_jax.models import model_config as mc
from preflmr_jax.models import preflmr

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _step_on_mesh(config, mesh_config, steps=2):
  """Runs `steps` of the trainer's own jitted step on `mesh_config`; returns (losses, params)."""
  mesh = sharding.make_mesh(mesh_config, jax.devices()[:np.prod(list(mesh_config.values()))])
  setup = train.setup_train_step(config, mesh)
  it = data.make_train_iterator(config, setup.model_config, tokenization.tiny_tokenizer(), 0, 1)
  losses = []
  with jax.set_mesh(mesh), nn.logical_axis_rules(setup.rules):
    state = jax.jit(setup.init_state, static_argnums=0,
                    out_shardings=setup.state_shardings)(config.seed)
    for _ in range(steps):
      state, metrics = setup.train_step(state, sharding.global_batch(mesh, next(it), setup.rules))
      losses.append(float(metrics["loss"]))
  return losses, jax.device_get(state.params)


def _compare_steps(config, mesh_config, ref_losses, ref_params):
  losses, params = _step_on_mesh(config, mesh_config)
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, err_msg=str(mesh_config))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               layer_stacks.unstack(params), ref_params)


@pytest.mark.slow
def test_sharded_train_step_equals_single_device(comparable_step):
  config = comparable_step()
  one_device = {"data": 1, "fsdp": 1, "tensor": 1}
  ref_losses, ref_params = _step_on_mesh(config, one_device)
  initial = preflmr.init_params(mc.PreFLMRConfig.from_dict(config.model), jax.random.key(0))
  moved = [np.abs(a - b).max() for a, b in zip(jax.tree.leaves(ref_params), jax.tree.leaves(initial))]
  assert max(moved) > 1e-3  # the comparison below is not between untouched parameters
  # All three axes at once: the batch over data x fsdp, weights over fsdp and tensor; dropout
  # draws the same masks.
  _compare_steps(config, {"data": 2, "fsdp": 2, "tensor": 2}, ref_losses, ref_params)
  # Scanned layers (stacked params, the same initial ones), sharded; dropout off, as scanned
  # layers draw their masks from split keys.
  no_dropout = {f"model.{tower}.{rate}": 0.0 for tower in ("text", "mapping")
                for rate in ("dropout_rate", "attention_dropout_rate")}
  ref = _step_on_mesh(comparable_step(**no_dropout), one_device)
  scanned = comparable_step(**no_dropout, **{"model.scan_layers": True})
  _compare_steps(scanned, {"data": 2, "fsdp": 2, "tensor": 2}, *ref)


@pytest.mark.slow
def test_the_pallas_maxsim_step_equals_the_xla_step_with_per_device_negatives(comparable_step):
  """The kernel (interpreted here) in a shard_map of each device's own group, against the loss's
  vmap over groups of XLA's MaxSim: same losses and parameters."""
  mesh = {"data": 2, "fsdp": 2, "tensor": 1}
  ref = _step_on_mesh(comparable_step(in_batch_negatives="per_device"), mesh)
  _compare_steps(comparable_step(in_batch_negatives="per_device", maxsim_impl="pallas"), mesh,
                 *ref)


@pytest.mark.slow
@pytest.mark.parametrize("scope,groups", [("global", 1), ("per_device", 8)])
def test_in_batch_negatives_scope_reaches_the_loss(monkeypatch, scope, groups, tiny_config):
  """per_device hands the loss one group per batch shard (the loss's own test checks that this is
  the mean of the per-device losses); global, one group."""
  seen = []
  loss = train.losses.contrastive_loss
  monkeypatch.setattr(train.losses, "contrastive_loss",
                      lambda *a, groups=1, **k: seen.append(groups) or loss(*a, groups=groups, **k))
  config = tiny_config(in_batch_negatives=scope)
  mesh = sharding.make_mesh({"data": 4, "fsdp": 2, "tensor": 1})
  setup = train.setup_train_step(config, mesh)
  with jax.set_mesh(mesh), nn.logical_axis_rules(setup.rules):
    setup.train_step.trace(setup.abstract_state, setup.abstract_batch)
  assert seen == [groups]


@pytest.mark.slow
def test_dropout_prng_impl_rbg_trains_keeps_the_init_and_must_resume_with_rbg(tmp_path, short_run):
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  init = lambda c: jax.jit(train.setup_train_step(c, mesh).init_state, static_argnums=0)(0)
  rbg = init(short_run(dropout_prng_impl="rbg"))
  assert rbg.rng.shape == (4,)  # rbg key data; threefry's is (2,)
  jax.tree.map(np.testing.assert_array_equal, rbg.params, init(short_run()).params)
  base = {"num_train_steps": 2, "log_every_steps": 1, "checkpoint_every_steps": 2}
  train.train_and_evaluate(short_run(dropout_prng_impl="rbg", **base), str(tmp_path))
  assert all(np.isfinite(m["loss"]) for m in _read_metrics(tmp_path))
  with pytest.raises(ValueError, match="config.dropout_prng_impl='threefry2x32' needs"):
    train.train_and_evaluate(short_run(**{**base, "num_train_steps": 3}), str(tmp_path))


def _read_metrics(workdir):
  return layout.read_metrics(workdir)


def _final_params(workdir, config, step=None):
  model_config = mc.PreFLMRConfig.from_dict(config.model)
  abstract = preflmr.abstract_params(model_config)
  return checkpointing.restore_params(str(workdir), abstract, step=step)


@pytest.mark.slow
def test_resume_is_exact(trained_workdir, tmp_path, short_run, caplog):
  """Stopped after step 3 (saved off the 2-step interval, as the last step), then resumed to step
  6: the same parameters and losses as the straight 6-step run."""
  base = {"num_train_steps": 6, "checkpoint_every_steps": 2}
  train.train_and_evaluate(short_run(**{**base, "num_train_steps": 3}), str(tmp_path))
  train.train_and_evaluate(short_run(**base), str(tmp_path))
  config = short_run(**base)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-6),
               _final_params(tmp_path, config), _final_params(trained_workdir, config))
  a, b = _read_metrics(trained_workdir), _read_metrics(tmp_path)
  assert [m["step"] for m in b] == [1, 2, 3, 4, 5, 6]
  np.testing.assert_allclose([m["loss"] for m in a], [m["loss"] for m in b], rtol=1e-5)
  # Run again, finished: nothing compiles or trains.
  with caplog.at_level(logging.INFO):
    assert train.train_and_evaluate(config, str(tmp_path)) == {}
  assert "nothing to train: at step 6, config.num_train_steps=6" in caplog.text
  assert "compiled" not in caplog.text and _read_metrics(tmp_path) == b


@pytest.mark.slow
def test_stage1_freezes_everything_but_the_mapping_structures(tmp_path, short_run):
  config = short_run("configs/stage.py:1", num_train_steps=3, log_every_steps=1,
                     checkpoint_every_steps=1)
  train.train_and_evaluate(config, str(tmp_path))
  first, last = (_final_params(tmp_path, config, step) for step in (1, 3))
  for group in first:
    if group.startswith(("vision_projection", "mapping_")):
      assert any(np.abs(np.asarray(a) - np.asarray(b)).max() > 0
                 for a, b in zip(jax.tree.leaves(first[group]), jax.tree.leaves(last[group]))), group
    else:
      jax.tree.map(np.testing.assert_array_equal, last[group], first[group])


@pytest.mark.slow
@pytest.mark.parametrize("source,steps,accuracy", [("m2kr", 1500, 0.9), ("synthetic", 300, 0.3)])
def test_tiny_config_learns_the_sample_task(tmp_path, source, steps, accuracy, cli):
  """The README's main command learns SAMPLE, through the TFDS builds + grain (m2kr) and through
  the in-memory generator (synthetic: the same task, a shorter run well past chance), printing a
  screenful; then the demo on the trained workdir ranks each query's true passage first (all but
  one query at most). One device, XLA's default optimisation: the steps run for longer than they
  take to compile."""
  workdir = tmp_path / "run"
  out = cli("preflmr_jax.main", "--config=configs/tiny.py", f"--workdir={workdir}",
            f"--config.data.source={source}", f"--config.num_train_steps={steps}",
            env={"XLA_FLAGS": ""})
  assert out.returncode == 0, out.stderr[-3000:]
  console = (out.stdout + out.stderr).strip().splitlines()
  assert len(console) <= 40 and f"done: step {steps} in" in console[-2], console
  metrics = _read_metrics(workdir)
  assert metrics[-1]["step"] == steps
  assert metrics[0]["accuracy"] < 0.25, metrics[0]  # chance: 1/16
  assert metrics[-1]["accuracy"] >= accuracy, metrics[-3:]
  assert metrics[-1]["loss"] < metrics[0]["loss"]
  if source == "m2kr":
    demo = cli("preflmr_jax.demo", "--config=configs/tiny.py", f"--checkpoint={workdir}",
               f"--workdir={tmp_path}", env={"XLA_FLAGS": ""})
    assert demo.returncode == 0, demo.stderr[-3000:]
    scores = json.loads((tmp_path / "scores.json").read_text())
    firsts = [scores["passages"][order[0]]["id"] for order in scores["ranking"]]
    hits = sum(first == q["positive"] for first, q in zip(firsts, scores["queries"]))
    assert hits >= len(scores["queries"]) - 1, demo.stdout


@pytest.mark.parametrize("overrides,message", [
    ({"batch_size": 12}, "config.batch_size=12: must be divisible by the 8 batch shards"),
    ({"mesh.data": 16}, "config.mesh"),
    ({"logical_axis_rules": (("embedd", "fsdp"),)}, "config.logical_axis_rules: unknown logical"),
    ({"freeze": ("visoin",)}, "config.freeze"),
    ({"nan_policy": "ignore"}, "config.nan_policy"),
    ({"in_batch_negatives": "local"}, "config.in_batch_negatives=.local.: must be one of"),
    ({"dropout_prng_impl": "philox"}, "config.dropout_prng_impl"),
    ({"maxsim_impl": "triton"}, "config.maxsim_impl"),
    ({"maxsim_impl": "pallas", "score_chunk_size": 8}, "config.score_chunk_size=8: chunks the xla"),
])
def test_bad_configs_fail_before_compiling(tmp_path, overrides, message, short_run):
  config = short_run(**overrides)
  with pytest.raises(ValueError, match=message):
    train.train_and_evaluate(config, str(tmp_path))
  assert not os.path.exists(tmp_path / "checkpoints") or not os.listdir(tmp_path / "checkpoints")


class _NaNAfter:
  """Wraps a data iterator; from the given step on, images are NaN."""

  def __init__(self, it, bad_step):
    self.it, self.bad_step, self.count = it, bad_step, 0

  def __next__(self):
    batch = dict(next(self.it))
    self.count += 1
    if self.count >= self.bad_step:
      batch["pixel_values"] = np.full_like(batch["pixel_values"], np.nan)
    return batch

  def get_state(self):
    return self.it.get_state()

  def set_state(self, state):
    self.it.set_state(state)


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_nonfinite_steps_never_reach_a_checkpoint(tmp_path, monkeypatch, policy, short_run):
  make = data.make_train_iterator
  monkeypatch.setattr(data, "make_train_iterator", lambda *a, **k: _NaNAfter(make(*a, **k), 3))
  config = short_run(num_train_steps=4, log_every_steps=1, checkpoint_every_steps=2,
                     nan_policy=policy)
  if policy == "stop":
    with pytest.raises(FloatingPointError, match="non-finite loss, gradient or update at step 3"):
      train.train_and_evaluate(config, str(tmp_path))
    ckpt = checkpointing.Checkpointer(str(tmp_path / "checkpoints"))
    assert ckpt.latest_step() == 2
    ckpt.close()
  else:
    train.train_and_evaluate(config, str(tmp_path))
  params = _final_params(tmp_path, config)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


class _SigtermAt:
  """Wraps a data iterator; sends this process SIGTERM while producing batch `at`, as a preemption
  notice would arrive in the middle of a step."""

  def __init__(self, it, at):
    self.it, self.at, self.count = it, at, 0

  def __next__(self):
    self.count += 1
    if self.count == self.at:
      os.kill(os.getpid(), signal.SIGTERM)
    return next(self.it)

  def get_state(self):
    return self.it.get_state()

  def set_state(self, state):
    self.it.set_state(state)


@pytest.mark.slow
def test_sigterm_saves_the_current_step_and_stops_then_resumes_exactly(trained_workdir, tmp_path,
                                                                      monkeypatch, tiny_config, short_run):
  base = {"num_train_steps": 6, "log_every_steps": 1, "checkpoint_every_steps": 4}
  make = data.make_train_iterator
  handler = signal.getsignal(signal.SIGTERM)
  with monkeypatch.context() as m:
    m.setattr(data, "make_train_iterator", lambda *a, **k: _SigtermAt(make(*a, **k), 3))
    with pytest.raises(preemption.Preempted, match="saved step 3"):
      train.train_and_evaluate(short_run(**base), str(tmp_path / "preempted"))
  assert signal.getsignal(signal.SIGTERM) == handler  # the trainer's handler is gone again
  ckpt = checkpointing.Checkpointer(str(tmp_path / "preempted" / "checkpoints"))
  assert ckpt.all_steps() == [3]  # saved off-interval at the preempted step, then stopped
  ckpt.close()
  assert [m["step"] for m in _read_metrics(tmp_path / "preempted")] == [1, 2, 3]
  train.train_and_evaluate(short_run(**base), str(tmp_path / "preempted"))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-6),
               _final_params(tmp_path / "preempted", tiny_config()),
               _final_params(trained_workdir, tiny_config()))


@pytest.mark.slow
def test_init_params_from_another_run_and_from_a_published_folder(trained_workdir, tmp_path,
                                                                  tiny_config, short_run,
                                                                  monkeypatch):
  """With zero learning rates the final parameters are exactly the starting ones; no random
  parameters are drawn (their init compiles for minutes at the release shapes)."""
  frozen_lr = {"optimizer.learning_rate": 0.0, "optimizer.mapping_learning_rate": 0.0}
  source = _final_params(trained_workdir, tiny_config())
  model_config = mc.PreFLMRConfig.from_dict(tiny_config().model)
  published = preflmr.init_params(model_config, jax.random.key(7))

  def train_without_drawing(config, workdir):
    def no_draw(*_):
      raise AssertionError("random parameters drawn for a run that loads its parameters")
    with monkeypatch.context() as m:
      m.setattr(preflmr, "random_params", no_draw)
      train.train_and_evaluate(config, workdir)

  train_without_drawing(short_run(num_train_steps=1, init_params_from=str(trained_workdir),
                                  **frozen_lr), str(tmp_path / "b"))
  jax.tree.map(np.testing.assert_array_equal, _final_params(tmp_path / "b", tiny_config()), source)

  preflmr_jax.PretrainedPreFLMR(model_config, published).save_pretrained(str(tmp_path / "pub"))
  train_without_drawing(short_run(num_train_steps=1, init_from=str(tmp_path / "pub"), **frozen_lr),
                        str(tmp_path / "c"))
  jax.tree.map(np.testing.assert_array_equal, _final_params(tmp_path / "c", tiny_config()),
               jax.device_get(published))
  recorded = layout.read_run_info(tmp_path / "c")["config"]  # where the run started from
  assert recorded["init_from"] == str(tmp_path / "pub") and recorded["num_train_steps"] == 1

  # A folder under the other key says where it goes; a model that does not fit names the array.
  with pytest.raises(ValueError, match="a published PreFLMR folder; it goes in config.init_from"):
    train.train_and_evaluate(short_run(init_params_from=str(tmp_path / "pub")), str(tmp_path / "d"))
  with pytest.raises(FileNotFoundError, match="workdir or step folder goes in config.init_params_"):
    train.train_and_evaluate(short_run(init_from=str(trained_workdir)), str(tmp_path / "d"))
  wider = tiny_config("configs/tiny.py:width=64", init_from=str(tmp_path / "pub"))
  with pytest.raises(ValueError, match=r"config.init_from=.*pub does not match config.model: "
                     r"params/document_head/kernel: the folder has shape \(32, 16\) float32, the "
                     r"model expects \(64, 16\) float32"):
    train.train_and_evaluate(wider, str(tmp_path / "e"))


@pytest.mark.slow
def test_periodic_evaluation_logs_the_eval_binary_metrics(tmp_path, short_run):
  config = short_run(num_train_steps=4, log_every_steps=4, eval_every_steps=2,
                     eval_max_queries=8, eval_ks=(1, 5))
  summary = train.train_and_evaluate(config, str(tmp_path))
  logged = _read_metrics(tmp_path)
  assert [m["step"] for m in logged] == [2, 4]  # eval steps are logged steps, with the loss
  for m in logged:
    assert "loss" in m and 0 <= m["eval/SAMPLE/Recall@1"] <= m["eval/SAMPLE/Recall@5"] <= 1
  assert summary["eval/SAMPLE/Recall@5"] == logged[-1]["eval/SAMPLE/Recall@5"]
  with pytest.raises(ValueError, match="config.eval_every_steps needs"):
    train.train_and_evaluate(short_run(eval_every_steps=2, **{"data.source": "synthetic"}),
                             str(tmp_path / "synthetic"))
