"""Configs build, their parameter counts match the published totals, bad values fail up front."""

import json
import pathlib
import subprocess
import sys

import pytest

from preflmr_jax import config_files, tokenization
from preflmr_jax.models import model_config as mc
from preflmr_jax.tools.count_params import count_params

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("spec,total", [
    ("configs/preflmr_vit_b.py", 326.7e6),
    ("configs/preflmr_vit_l.py", 543.2e6),
    ("configs/preflmr_vit_g.py", 2.085e9),
])
def test_release_parameter_counts(spec, total):
  counts = count_params(mc.PreFLMRConfig.from_dict(config_files.load_config(spec).model))
  assert abs(counts["total"] - total) / total < 1e-3, counts
  assert counts["query_text"] == counts["document_text"]
  assert abs(counts["query_text"] - 109.5e6) / 109.5e6 < 1e-3  # BERT-base with pooler
  assert counts["heads"] == 2 * 768 * 128
  assert sum(v for k, v in counts.items() if k != "total") == counts["total"]


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
  with pytest.raises(ValueError, match="vision='H'"):
    config_files.load_config("configs/scaling.py:vision=H,text=base")
  with pytest.raises(ValueError, match="bad argument"):
    config_files.load_config("configs/scaling.py:size=large")


def test_tiny_config_is_tiny_and_consistent():
  config = config_files.load_config("configs/tiny.py")
  model = mc.PreFLMRConfig.from_dict(config.model)
  assert count_params(model)["total"] < 1e6
  tokenization.check_mask_ids(tokenization.tokenizer_from_config(config.tokenizer),
                              model.instruction_token_id, model.skip_token_ids)


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
                        "--config", "configs/preflmr_vit_b.py"],
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
