"""A user's mistake on the command line is one line, `error: ...`, exit status 2, no traceback, and
leaves no output folder behind; an internal error keeps its traceback (cli.py)."""

import logging
import shutil
import subprocess
import sys

import pytest

import preflmr_jax
from preflmr_jax import cli as console
from preflmr_jax import config_files, evaluate, exit_codes

TINY = "--config=configs/tiny.py"


def _one_line_error(run) -> str:
  lines = run.stderr.strip().splitlines()
  assert run.returncode == exit_codes.USAGE, run.stderr[-3000:]
  assert len(lines) == 1 and lines[0].startswith("error: "), run.stderr[-3000:]
  return lines[0]


@pytest.mark.parametrize("args,message", [
    ((TINY, "--config.num_train_step=5"),
     'error: --config.num_train_step: no such config key. Did you mean "num_train_steps" instead '
     'of "num_train_step"?'),
    ((TINY, "--config.mesh.dta=2"), 'error: --config.mesh.dta: no such config key. Did you mean '
     '"data"'),
    ((TINY, "--config.foo=1"), "error: --config.foo: no such config key."),
    ((TINY, "--config.data.num_negatives=2"), "error: --config.data.num_negatives: no such config "
     "key."),
    ((TINY, "--config.num_train_steps=many"), "error: --config.num_train_steps=many: invalid "
     "literal for int()"),
    ((TINY, "--config.num_train_steps=0"), "error: config.num_train_steps=0: must be an integer >= 1"),
    ((TINY, "--config.data.tasks=OVEM"), "error: config.data.tasks='OVEM': unknown M2KR task 'OVEM'"),
    ((TINY, "--config.mesh.data=3"), "error: config.mesh {'data': 3, 'fsdp': 1, 'tensor': 1} needs "
     "3 devices, but 1 are available"),
    (("--config=configs/nope.py",), "error: --config=configs/nope.py: no such file"),
    (("--config=configs/tiny.py:width=abc",), "error: configs/tiny.py: argument 'width=abc': "
     "width='abc' is not of type int"),
    (("--config=configs/tiny.py:width=6",), "error: configs/tiny.py: width=6 is not a positive "
     "multiple of 4"),
    ((TINY, "--no_such_flag=1"), "error: Unknown command line flag 'no_such_flag'"),
    ((TINY, "--config.eval_split=validation"), "error: config.eval_split='validation': must be one "
     "of ('train', 'valid', 'test')"),
    ((TINY, "--config.model.attention=cudnn", "--config.model.dtype=bfloat16",
      *(f"--config.model.{m}.attention_dropout_rate=0" for m in ("text", "vision", "mapping"))),
     "error: config.model.attention='cudnn': cuDNN's fused attention runs on NVIDIA GPUs; the "
     "devices here are cpu"),
    ((TINY, "--config.model.text.vocab_size=10"), "error: config.model.text.vocab_size=10: the "
     "tokenizer has 768 ids, beyond the embedding table"),
    ((TINY, "--config.tokenizer=configs/tiny.py"), "error: config.tokenizer=configs/tiny.py: "
     "Tokenizer folder 'configs/tiny.py' is a file"),
    ((TINY, "--config.data.sample_dir=configs/tiny.py"), "error: config.data.sample_dir="
     "configs/tiny.py: configs/tiny.py is a file, not a folder"),
])
def test_training_mistakes_are_one_line(tmp_path, cli, args, message):
  workdir = tmp_path / "new" / "run"
  line = _one_line_error(cli("preflmr_jax.main", *args, f"--workdir={workdir}"))
  assert line.startswith(message), line
  assert not (tmp_path / "new").exists()


def test_a_workdir_that_is_a_file(tmp_path, cli):
  (tmp_path / "run").write_text("")
  line = _one_line_error(cli("preflmr_jax.main", TINY, f"--workdir={tmp_path / 'run'}"))
  assert line == f"error: --workdir={tmp_path / 'run'}: is a file, not a folder"


def test_distributed_without_a_cluster(tmp_path, one_device_env):
  env = {k: v for k, v in one_device_env.items()  # what JAX's cluster detection reads
         if not k.startswith(("SLURM_", "OMPI_", "JAX_COORDINATOR", "KUBERNETES_", "TPU_",
                              "MEGASCALE_"))}
  run = subprocess.run([sys.executable, "-m", "preflmr_jax.main", TINY, "--config.distributed=True",
                        f"--workdir={tmp_path}"], cwd=config_files.REPO_ROOT, env=env, capture_output=True,
                       text=True, timeout=600, check=False)
  assert _one_line_error(run).startswith("error: config.distributed=True: "), run.stderr[-3000:]


def test_a_workdir_that_cannot_be_created(tmp_path, cli):
  (tmp_path / "file").write_text("")
  line = _one_line_error(cli("preflmr_jax.main", TINY, f"--workdir={tmp_path / 'file' / 'run'}"))
  assert line == (f"error: --workdir={tmp_path / 'file' / 'run'}: cannot create it (Not a "
                  f"directory: {tmp_path / 'file' / 'run'})")


def test_a_config_file_that_fails_is_named(tmp_path, cli):
  (tmp_path / "noarg.py").write_text("def get_config():\n  return None\n")
  (tmp_path / "syntax.py").write_text("def get_config(:\n")
  line = _one_line_error(cli("preflmr_jax.main", f"--config={tmp_path}/noarg.py:foo",
                             f"--workdir={tmp_path}/w"))
  assert line.startswith(f"error: --config={tmp_path}/noarg.py:foo: get_config() takes 0 "
                         "positional arguments but 1 was given"), line
  line = _one_line_error(cli("preflmr_jax.main", f"--config={tmp_path}/syntax.py",
                             f"--workdir={tmp_path}/w"))
  assert line.startswith(f"error: {tmp_path}/syntax.py, line 1: "), line


def test_evaluating_before_training_says_train_first(tmp_path, cli):
  (tmp_path / "run").mkdir()
  output = tmp_path / "eval"
  line = _one_line_error(cli("preflmr_jax.evaluate", TINY, f"--checkpoint={tmp_path / 'run'}",
                             f"--output={output}"))
  assert "no complete checkpoint" in line and "train first: python -m preflmr_jax.main" in line
  assert not output.exists()
  line = _one_line_error(cli("preflmr_jax.evaluate", TINY, f"--checkpoint={tmp_path / 'none'}",
                             f"--output={output}"))
  assert line == (f"error: --checkpoint={tmp_path / 'none'}: no such folder; train first: "
                  f"python -m preflmr_jax.main --config CONFIG --workdir {tmp_path / 'none'}")
  assert not output.exists()


@pytest.mark.parametrize("program,flag", [("preflmr_jax.evaluate", "--help"),
                                          ("preflmr_jax.evaluate", "-h"),
                                          ("preflmr_jax.export", "--help"),
                                          ("preflmr_jax.demo", "--help")])
def test_help_exits_0_listing_the_weights_flags(cli, program, flag):
  run = cli(program, flag)
  assert run.returncode == 0, run.stderr[-3000:]
  for name in ("config", "checkpoint", "step"):  # defined in evaluate.py for all three
    assert f"\n  --{name}: " in run.stdout, run.stdout


@pytest.mark.parametrize("program,args,flag", [("preflmr_jax.main", (TINY,), "--workdir"),
                                               ("preflmr_jax.export", (TINY, "--checkpoint=x"),
                                                "--output")])
def test_a_required_flag_left_out_is_named(cli, program, args, flag):
  line = _one_line_error(cli(program, *args))
  assert line == f"error: {flag} is required (--help lists the flags)"


def test_an_internal_error_keeps_its_traceback(tmp_path, cli):
  program = ("from preflmr_jax import cli\n"
             "def main(argv):\n"
             "  raise RuntimeError('a bug')\n"
             "cli.run(main)\n")
  (tmp_path / "prog.py").write_text(program)
  run = cli("prog", cwd=tmp_path)
  assert run.returncode == 1, run.stderr[-3000:]
  assert "Traceback" in run.stderr and "RuntimeError: a bug" in run.stderr


def test_a_data_dir_without_the_sample_says_how_to_build_it(tmp_path, cli):
  line = _one_line_error(cli("preflmr_jax.main", TINY, f"--config.data.data_dir={tmp_path}",
                             f"--workdir={tmp_path / 'run'}"))
  assert "M2KR SAMPLE" in line and "are not built" in line, line
  assert f"python -m preflmr_jax.data.sample --out DIR --data_dir {tmp_path}" in line
  assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("args,message", [
    (("--tasks=SAMPL",), "error: --tasks=SAMPL: unknown M2KR task 'SAMPL'"),
    (("--batch_size=0",), "error: --batch_size=0: must be >= 1"),
    (("--batch_size=-3",), "error: --batch_size=-3: must be >= 1"),
    (("--split=tset",), "error: --split='tset': expected one of"),
    (("--ks=0,5",), "error: --ks='0,5': expected comma-separated integers >= 1"),
])
def test_evaluation_mistakes_are_one_line(trained_workdir, tmp_path, cli, args, message):
  output = tmp_path / "eval"
  line = _one_line_error(cli("preflmr_jax.evaluate", TINY, f"--checkpoint={trained_workdir}",
                             f"--output={output}", *args))
  assert line.startswith(message), line
  assert not output.exists()


def test_a_checkpoint_item_as_checkpoint_names_its_step_folder(trained_workdir, tmp_path, cli):
  item = trained_workdir / "checkpoints" / "6" / "params"
  line = _one_line_error(cli("preflmr_jax.evaluate", TINY, f"--checkpoint={item}",
                             f"--output={tmp_path / 'eval'}"))
  assert line == (f"error: --checkpoint={item}: {item} is one item of a checkpoint: pass its step "
                  f"folder {item.parent}")


def test_a_broken_published_folder_is_one_line_naming_the_file(trained_workdir, tmp_path, cli):
  """What a published folder can lack or hold instead of PreFLMR weights, each named."""
  restored = evaluate.restore(config_files.load_config("configs/tiny.py"), str(trained_workdir))
  good = tmp_path / "pub"
  preflmr_jax.PretrainedPreFLMR(restored.model_config, restored.params).save_pretrained(good)
  config_json = (good / "config.json").read_bytes()
  weights = (good / "model.safetensors").read_bytes()
  cases = {  # files replaced (None: removed)
      "no_weights": ({"model.safetensors": None}, "no model.safetensors"),
      "pickle": ({"model.safetensors": None, "pytorch_model.bin": b"\x80"},
                 "refusing to read pickle-based weights"),
      "truncated": ({"model.safetensors": weights[:100]},
                    "model.safetensors: not a readable safetensors file"),
      "bad_json": ({"config.json": config_json[:50]}, "config.json: not valid JSON"),
      "bert": ({"config.json": b'{"model_type": "bert"}'},
               "config.json: model_type: 'bert': not a PreFLMR checkpoint"),
  }
  for name, (files, message) in cases.items():
    folder = tmp_path / name
    shutil.copytree(good, folder)
    for file, content in files.items():
      (folder / file).unlink() if content is None else (folder / file).write_bytes(content)
    line = _one_line_error(cli("preflmr_jax.evaluate", TINY, f"--checkpoint={folder}",
                               f"--output={tmp_path / 'eval'}"))
    assert message in line and str(folder) in line, (name, line)
  step_folder = trained_workdir / "checkpoints" / "6"
  line = _one_line_error(cli("preflmr_jax.evaluate", TINY, f"--checkpoint={step_folder}",
                             "--step=4", f"--output={tmp_path / 'eval'}"))
  assert line == (f"error: --checkpoint={step_folder}: step 4 asked for, but {step_folder} is step "
                  "6's folder")
  line = _one_line_error(cli("preflmr_jax.evaluate", TINY, f"--checkpoint={good}", "--step=4",
                             f"--output={tmp_path / 'eval'}"))
  assert line == (f"error: --step=4: --checkpoint={good} is a published folder, one set of "
                  "weights without steps")
  (tmp_path / "file").write_text("")
  line = _one_line_error(cli("preflmr_jax.export", TINY, f"--checkpoint={trained_workdir}",
                             f"--output={tmp_path / 'file'}"))
  assert line == f"error: --output={tmp_path / 'file'}: is a file, not a folder"


def test_progress_off_a_terminal_is_log_lines_not_a_bar(capfd, caplog):
  caplog.set_level(logging.INFO)
  assert list(console.progress(range(4), "SAMPLE passages", " batches", every=0)) == [0, 1, 2, 3]
  lines = [r.getMessage() for r in caplog.records]
  assert lines[0].startswith("SAMPLE passages: 1/4 batches done, ") and lines[0].endswith(" left")
  assert len(lines) == 3  # none for the last one: the caller says what comes next
  assert "\r" not in capfd.readouterr().err
  caplog.clear()
  assert list(console.progress(iter("ab"), "index: encoding", " chunks", every=0)) == ["a", "b"]
  assert [r.getMessage() for r in caplog.records] == ["index: encoding: 1 chunks done",
                                                      "index: encoding: 2 chunks done"]
  caplog.clear()
  assert list(console.progress(range(3), "hidden", show=False, every=0)) == [0, 1, 2]
  assert not caplog.records


def test_what_a_library_prints_goes_to_the_log_file_only(capsys, caplog):
  caplog.set_level(logging.INFO)
  with console.prints_to_log_file():
    print("Downloading and preparing dataset\nDataset", end=" ")
    assert [r.getMessage() for r in caplog.records] == ["Downloading and preparing dataset"]
    print("prepared.", end="")  # a line's end left out: logged when the block ends
    sys.stdout.write("\r")
  with console.prints_to_log_file():
    sys.stdout.write("10%\r20%\r")
    sys.stdout.write("\n")  # the "\r\n" of one line, split over two writes
  assert capsys.readouterr().out == ""
  assert [(r.getMessage(), r.file_only) for r in caplog.records] == [
      ("Downloading and preparing dataset", True), ("Dataset prepared.", True), ("10%", True),
      ("20%", True)]
