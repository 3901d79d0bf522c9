"""Configs build, their parameter counts match the published totals, bad values fail up front."""

import json
import pathlib
import shutil
import subprocess
import sys

import pytest

from preflmr_jax import config_defaults, config_files, recipe, tokenization
from preflmr_jax.models import model_config as mc
from preflmr_jax.tools.count_params import count_params

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("spec,total", [
    ("configs/release.py:vit_b", 326.7e6),
    ("configs/release.py:vit_l", 543.2e6),
    ("configs/release.py:vit_g", 2.085e9),
])
@pytest.mark.slow
def test_release_parameter_counts(spec, total):
  counts = count_params(mc.PreFLMRConfig.from_dict(config_files.load_config(spec).model))
  assert abs(counts["total"] - total) / total < 1e-3, counts
  assert counts["query_text"] == counts["document_text"]
  assert abs(counts["query_text"] - 109.5e6) / 109.5e6 < 1e-3  # BERT-base with pooler
  assert counts["heads"] == 2 * 768 * 128
  assert sum(v for k, v in counts.items() if k != "total") == counts["total"]


def test_release_shapes_by_name():
  assert (config_files.load_config("configs/release.py").to_dict()
          == config_files.load_config("configs/release.py:vit_l").to_dict())
  with pytest.raises(ValueError, match=r"^configs/release\.py: shape='vit_h' is not one of "
                     r"\['vit_b', 'vit_l', 'vit_g'\]$"):
    config_files.load_config("configs/release.py:vit_h")


@pytest.mark.slow
@pytest.mark.parametrize("vision", ["B", "L", "400m"])
@pytest.mark.parametrize("text", ["base", "large", "800m"])
def test_scaling_grid_points(vision, text):
  counts = count_params(mc.PreFLMRConfig.from_dict(config_files.load_config(f"configs/scaling.py:vision={vision},text={text}").model))
  expected_text = {"base": 109.5e6, "large": 335.1e6, "800m": 800e6}[text]
  tolerance = 0.05 if text == "800m" else 1e-3
  assert abs(counts["query_text"] - expected_text) / expected_text < tolerance
  if vision == "400m":
    assert abs(counts["vision"] - 400e6) / 400e6 < 0.05


def test_scaling_rejects_unknown_points():
  with pytest.raises(ValueError, match=r"^configs/scaling\.py: vision='H' is not one of"):
    config_files.load_config("configs/scaling.py:vision=H,text=base")
  with pytest.raises(ValueError, match=r"^configs/scaling\.py: argument 'size=large': unknown key"):
    config_files.load_config("configs/scaling.py:size=large")


def test_tiny_widths():
  config = config_files.load_config("configs/tiny.py:64,16")  # width, vision_width
  assert [config.model[t].hidden_size for t in ("text", "mapping", "vision")] == [64, 64, 16]
  assert config_files.load_config("configs/tiny.py:width=64").model.vision.hidden_size == 64
  for spec, message in [
      ("configs/tiny.py:width=30", "configs/tiny.py: width=30 is not a positive multiple of 4"),
      ("configs/tiny.py:vision_width=-4", "configs/tiny.py: vision_width=-4 is not a positive"),
      ("configs/scaling.py:smoke,width=6", "configs/scaling.py: width=6 is not a positive"),
      ("configs/sweeps/vision_scaling.py:smoke,vision_width=2",
       "configs/sweeps/vision_scaling.py: vision_width=2 is not a positive")]:
    with pytest.raises(ValueError, match="^" + message.replace(".", r"\.")):
      config_files.load_config(spec)


def test_tiny_config_is_tiny_and_consistent():
  config = config_files.load_config("configs/tiny.py")
  model = mc.PreFLMRConfig.from_dict(config.model)
  assert count_params(model)["total"] < 1e6
  tokenization.check_tokenizer(tokenization.tokenizer_from_config(config.tokenizer), model)


@pytest.mark.parametrize("override,key", [
    ({"text": {"num_heads": 5}}, "config.model.text.hidden_size"),
    ({"vision": {"image_size": 30}}, "config.model.vision.image_size"),
    ({"output": "both"}, "config.model.output"),
    ({"mapping": {"hidden_size": 64, "num_heads": 4}}, "config.model.mapping.hidden_size"),
    ({"dtype": "float64"}, "config.model.dtype"),
    ({"remat_policy": "save_all"}, "config.model.remat_policy"),
    ({"typo_key": 1}, "config.model: unknown key"),
])
def test_bad_model_values_fail_naming_the_key(override, key):
  d = config_files.load_config("configs/tiny.py").model.to_dict()
  for k, v in override.items():
    if isinstance(v, dict):
      d[k].update(v)
    else:
      d[k] = v
  with pytest.raises(ValueError, match=key.replace(".", r"\.")):
    mc.PreFLMRConfig.from_dict(d)


def test_count_params_cli_prints_json_last():
  out = subprocess.run([sys.executable, "-m", "preflmr_jax.tools.count_params",
                        "--config", "configs/release.py:vit_b"],
                       cwd=ROOT, check=True, capture_output=True, text=True).stdout
  counts = json.loads(out.strip().splitlines()[-1])
  assert counts["total"] == 326725504
  assert set(counts) >= {"total", "vision", "query_text", "document_text", "mapping", "heads"}


# ------------------------------------------------------------------------- config arguments

def _parse(arg):
  return config_files.parse_arg(arg, where="configs/x.py", stage=0, shape="tiny", lr=0.1,
                                smoke=False).to_dict()


@pytest.mark.parametrize("arg,expected", [
    (None, dict(stage=0, shape="tiny", lr=0.1, smoke=False)),
    ("", dict(stage=0, shape="tiny", lr=0.1, smoke=False)),
    ("2,vit_l", dict(stage=2, shape="vit_l", lr=0.1, smoke=False)),  # positional, in spec order
    ("shape=vit_b,3", dict(stage=3, shape="vit_b", lr=0.1, smoke=False)),  # skips set keys
    ("stage=1, lr=1e-3", dict(stage=1, shape="tiny", lr=1e-3, smoke=False)),
    ("smoke", dict(stage=0, shape="tiny", lr=0.1, smoke=True)),  # a bool key's bare name
    ("smoke=False,2", dict(stage=2, shape="tiny", lr=0.1, smoke=False)),
])
def test_parse_arg_forms(arg, expected):
  assert _parse(arg) == expected


@pytest.mark.parametrize("arg,why", [
    ("shap=vit_l", "unknown key 'shap'"),
    ("1,tiny,0.5,true,x", "'x' is one positional item too many"),
    ("2,stage=3", "stage is set twice"),
    ("smoke,smoke", "smoke is set twice"),
    ("stage=two", "stage='two' is not of type int"),
    ("1.5", "stage='1.5' is not of type int"),
    ("lr=fast", "lr='fast' is not of type float"),
    ("smoke=maybe", "smoke='maybe' is not of type bool"),
])
def test_parse_arg_errors_are_one_line_naming_the_file_and_keys(arg, why):
  with pytest.raises(ValueError) as e:
    _parse(arg)
  message = str(e.value)
  assert "\n" not in message and message.startswith(f"configs/x.py: argument {arg!r}: {why}; ")
  assert message.endswith("keys in order: stage: int = 0, shape: str = 'tiny', lr: float = 0.1, "
                          "smoke: bool = False")


# --------------------------------------------------------------------------------- stages

@pytest.mark.parametrize("stage", recipe.STAGES)
@pytest.mark.parametrize("shape", ["tiny", "vit_b", "vit_l", "vit_g"])
def test_stage_configs_apply_the_recipe_to_the_shape(stage, shape):
  config = config_files.load_config(f"configs/stage.py:{stage},{shape}").to_dict()
  base = (config_defaults.tiny_config() if shape == "tiny"
          else config_defaults.release_config(shape)).to_dict()
  assert config["model"] == {**base["model"], "output": recipe.OUTPUT[stage]}
  assert config["freeze"] == recipe.FREEZE[stage]
  # The release shapes train on the official mixture, the tiny one on SAMPLE.
  tasks = "SAMPLE" if shape == "tiny" else recipe.TASKS[stage]
  assert config["data"] == {**base["data"], "tasks": tasks}
  # The published settings (recipe.published; docs/recipe.md), the same in every stage.
  assert config["optimizer"] == {**base["optimizer"], **dict(
      learning_rate=1e-5, mapping_learning_rate=1e-4, schedule="constant", warmup_steps=0,
      weight_decay=0.0, decay_params="all", grad_clip_norm=0.0, eps=1e-8)}
  assert (config["in_batch_negatives"], config["num_negatives"]) == ("per_device", 4)
  assert config["mask_duplicate_positives"] is False  # the reference loss
  recipe_keys = {"model", "freeze", "data", "optimizer", "in_batch_negatives", "num_negatives",
                 "mask_duplicate_positives"}
  assert ({k: v for k, v in config.items() if k not in recipe_keys}
          == {k: v for k, v in base.items() if k not in recipe_keys})


def test_stage_recipe_facts():
  assert recipe.OUTPUT == {1: "mapping_only", 2: "full", 3: "full"}
  assert recipe.FREEZE[1] == (
      "query_text", "document_text", "query_head", "document_head", "vision")
  assert recipe.FREEZE[2] == recipe.FREEZE[3] == ("vision",)
  assert recipe.TASKS[2] == "E-VQA"
  assert recipe.TASKS[1].split(",") == [f"{t}*1" for t in
                                       ("WIT", "CC3M", "LLaVA", "MSMARCO", "OVEN", "KVQA")]


def test_stage_arguments():
  assert (config_files.load_config("configs/stage.py:2").to_dict()
          == config_files.load_config("configs/stage.py:stage=2,shape=tiny").to_dict())
  for spec, message in [
      ("configs/stage.py", r"configs/stage\.py: stage=0 is not one of \[1, 2, 3\]"),
      ("configs/stage.py:4,vit_l", r"configs/stage\.py: stage=4 is not one of \[1, 2, 3\]"),
      ("configs/stage.py:2,vit_h", r"configs/stage\.py: shape='vit_h' is not one of \['tiny', "
                                   r"'vit_b', 'vit_l', 'vit_g'\]"),
      ("configs/stage.py:2,vit_l,x", r"configs/stage\.py: argument '2,vit_l,x': 'x' is one "
                                     r"positional item too many")]:
    with pytest.raises(ValueError, match="^" + message):
      config_files.load_config(spec)


# ----------------------------------------------------------------- config files stand alone

# Every config file, with arguments it takes.
CONFIG_ARGS = {
    "tiny.py": ["", "width=64,vision_width=16"],
    "release.py": ["", "vit_b", "vit_g"],
    "stage.py": ["1", "2,vit_b", "3,vit_l"],
    "scaling.py": ["", "L,800m", "smoke", "smoke,width=16"],
    "sweeps/vision_scaling.py": ["", "vision=400m", "smoke,vision_width=16"],
    "sweeps/mapping_depth.py": ["", "smoke"],
    "sweeps/pretraining_data.py": ["", "smoke"],
}


def test_every_config_file_is_listed():
  assert {str(p.relative_to(ROOT / "configs")) for p in (ROOT / "configs").rglob("*.py")} == set(
      CONFIG_ARGS)


@pytest.mark.parametrize("name", sorted(CONFIG_ARGS))
def test_a_config_file_copied_outside_the_repository_loads(name, tmp_path, monkeypatch):
  """Config files share code through the package, never by loading each other by path: each one,
  alone in a folder outside the checkout with neither the working directory nor the repository
  root holding `configs/`, builds the same configs and sweep points."""
  def build(path):
    configs = [config_files.load_config(f"{path}:{a}" if a else path).to_dict()
               for a in CONFIG_ARGS[name]]
    module = config_files.load_module(path)
    return configs, module.sweep() if hasattr(module, "sweep") else None

  expected = build(f"configs/{name}")
  copy = tmp_path / "elsewhere" / pathlib.Path(name).name
  copy.parent.mkdir()
  shutil.copy(ROOT / "configs" / name, copy)
  monkeypatch.chdir(tmp_path)
  monkeypatch.setattr(config_files, "REPO_ROOT", str(tmp_path / "no_repository"))
  with pytest.raises(FileNotFoundError):  # the checkout's configs/ is out of reach
    config_files.load_config("configs/tiny.py")
  assert build(str(copy)) == expected
